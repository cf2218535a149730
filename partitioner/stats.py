"""What each running partition consumes, read through HostRoot: CPU, run-queue delay, memory, interrupts.

Sources (all read-only, all per QEMU process of a running partition):

- ``/proc/PID/task/TID/schedstat``: ``cpu_ns wait_ns timeslices`` of one thread
  (``Documentation/scheduler/sched-stats.rst``).  ``wait_ns`` is the time the
  thread was runnable but waited for a CPU: the interference a dedicated CPU
  should never see.  The vCPU threads are the ones the state record names;
  every other thread of the process is an emulator thread (main loop, I/O
  threads, RCU, workers).
- The per-partition cgroup, where isolation made one: its ``cpu.stat``
  ``usage_usec`` is the whole partition's CPU time, including threads that
  came and went between two reads (``schedstat`` of a thread that exited is
  gone).  :func:`collect` takes that directory as ``cgroup``; without one the
  total is the sum of the live threads.
- ``/proc/PID/smaps_rollup``: resident memory (``Rss``) and hugetlb pages
  (``Private_Hugetlb`` + ``Shared_Hugetlb``, which ``Rss`` does not count).
- ``/proc/PID/numa_maps``: pages per NUMA node (``N<node>=<pages>``), with each
  mapping's page size (``kernelpagesize_kB``); ``huge`` marks hugetlb mappings.
- ``/proc/interrupts``: the host interrupts of the partition's devices, whose
  handlers VFIO names ``vfio-msix[N](ADDRESS)``, ``vfio-msi[N](ADDRESS)`` and
  ``vfio-intx(ADDRESS)``.

Nothing here writes; a thread or process that goes away between two reads is
simply not counted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from partitioner.kernel import sysfs
from partitioner.kernel.root import HostRoot
from partitioner.units import human_size


@dataclass(frozen=True)
class ThreadTimes:
    tid: int
    cpu_ns: int  # time on a CPU
    wait_ns: int  # time runnable, waiting for a CPU (run-queue delay)
    timeslices: int


@dataclass(frozen=True)
class PartitionStats:
    name: str
    pid: int
    vcpus: Mapping[int, ThreadTimes]  # vCPU index -> its thread's times
    emulator: ThreadTimes  # every other QEMU thread, summed (tid 0)
    cpu_source: str  # "schedstat" or "cgroup"
    total_cpu_ns: int  # the whole partition: the cgroup's usage when there is one
    resident_bytes: int  # Rss: normal pages resident (QEMU itself and non-hugepage guest memory)
    hugetlb_bytes: int  # hugepages mapped (guest memory on hugepages)
    memory_per_node: Mapping[int, int] = field(default_factory=dict)  # node -> bytes, all pages
    hugepages_per_node: Mapping[int, int] = field(default_factory=dict)  # node -> bytes, hugetlb
    interrupts: Mapping[str, int] = field(default_factory=dict)  # vfio handler name -> count

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "cpu_source": self.cpu_source,
            "cpu_seconds": _s(self.total_cpu_ns),
            "vcpus": {
                str(i): {
                    "tid": t.tid,
                    "cpu_seconds": _s(t.cpu_ns),
                    "wait_seconds": _s(t.wait_ns),
                    "timeslices": t.timeslices,
                }
                for i, t in sorted(self.vcpus.items())
            },
            "emulator": {
                "cpu_seconds": _s(self.emulator.cpu_ns),
                "wait_seconds": _s(self.emulator.wait_ns),
            },
            "memory": {
                "resident_bytes": self.resident_bytes,
                "hugetlb_bytes": self.hugetlb_bytes,
                "per_node_bytes": {str(n): b for n, b in sorted(self.memory_per_node.items())},
                "hugepages_per_node_bytes": {
                    str(n): b for n, b in sorted(self.hugepages_per_node.items())
                },
            },
            "interrupts": dict(sorted(self.interrupts.items())),
        }


def _s(ns: int) -> float:
    return round(ns / 1e9, 6)


# -- parsers (pure) ----------------------------------------------------------------------


def parse_schedstat(tid: int, text: str | None) -> ThreadTimes | None:
    parts = (text or "").split()
    if len(parts) < 3:
        return None
    try:
        cpu, wait, slices = (int(p) for p in parts[:3])
    except ValueError:
        return None
    return ThreadTimes(tid=tid, cpu_ns=cpu, wait_ns=wait, timeslices=slices)


def parse_smaps_rollup(text: str | None) -> tuple[int, int]:
    """(Rss bytes, hugetlb bytes) of a process."""
    kb: dict[str, int] = {}
    for line in (text or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            kb[key.strip()] = int(parts[0])
    hugetlb = kb.get("Private_Hugetlb", 0) + kb.get("Shared_Hugetlb", 0)
    return kb.get("Rss", 0) * 1024, hugetlb * 1024


_NODE_PAGES = re.compile(r"^N(\d+)=(\d+)$")


def parse_numa_maps(text: str | None) -> tuple[dict[int, int], dict[int, int]]:
    """(bytes per node of every mapping, bytes per node of hugetlb mappings)."""
    every: dict[int, int] = {}
    huge: dict[int, int] = {}
    for line in (text or "").splitlines():
        words = line.split()
        page_kb = 4
        for w in words:
            if w.startswith("kernelpagesize_kB="):
                page_kb = int(w.split("=", 1)[1])
        is_huge = "huge" in words[2:]
        for w in words:
            m = _NODE_PAGES.match(w)
            if m is None:
                continue
            node, size = int(m.group(1)), int(m.group(2)) * page_kb * 1024
            every[node] = every.get(node, 0) + size
            if is_huge:
                huge[node] = huge.get(node, 0) + size
    return every, huge


_VFIO_HANDLER = re.compile(r"^vfio-(?:msix|msi|intx)(?:\[\d+\])?\((?P<addr>[0-9a-f:.]+)\)$")


def parse_interrupts(text: str | None, addresses: Iterable[str]) -> dict[str, int]:
    """VFIO handler name -> interrupts over all CPUs, for the functions in ``addresses``."""
    wanted = set(addresses)
    lines = (text or "").splitlines()
    if not lines or not wanted:
        return {}
    ncpu = len(lines[0].split())  # the header: CPU0 CPU1 ...
    out: dict[str, int] = {}
    for line in lines[1:]:
        parts = line.split()
        if len(parts) < ncpu + 2 or not parts[0].endswith(":"):
            continue
        m = _VFIO_HANDLER.match(parts[-1])
        if m is None or m.group("addr") not in wanted:
            continue
        try:
            count = sum(int(c) for c in parts[1 : ncpu + 1])
        except ValueError:
            continue
        out[parts[-1]] = out.get(parts[-1], 0) + count
    return out


def parse_cpu_stat(text: str | None) -> int | None:
    """``usage_usec`` of a cgroup v2 ``cpu.stat``, in nanoseconds."""
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec" and value.strip().isdigit():
            return int(value) * 1000
    return None


# -- one read of a running partition ---------------------------------------------------


def collect(
    root: HostRoot,
    name: str,
    pid: int,
    vcpu_threads: Mapping[int, int],
    devices: Iterable[str] = (),
    *,
    cgroup: str | None = None,
    interrupts_text: str | None = None,
) -> PartitionStats:
    """The figures of partition ``name`` whose QEMU is ``pid``.  ``cgroup`` is the partition's
    cgroup directory (a kernel path under /sys/fs/cgroup) when isolation made one;
    ``interrupts_text`` lets one read of /proc/interrupts serve every partition."""
    vcpu_of = {tid: i for i, tid in vcpu_threads.items()}
    vcpus: dict[int, ThreadTimes] = {}
    emu_cpu = emu_wait = emu_slices = 0
    for entry in root.listdir(sysfs.task(pid)):
        if not entry.isdigit():
            continue
        tid = int(entry)
        t = parse_schedstat(tid, root.read(sysfs.task(pid, tid, "schedstat")))
        if t is None:
            continue  # the thread exited between the listing and the read
        if tid in vcpu_of:
            vcpus[vcpu_of[tid]] = t
        else:
            emu_cpu += t.cpu_ns
            emu_wait += t.wait_ns
            emu_slices += t.timeslices
    total = emu_cpu + sum(t.cpu_ns for t in vcpus.values())
    source = "schedstat"
    if cgroup is not None:
        usage = parse_cpu_stat(root.read(f"{cgroup}/cpu.stat"))
        if usage is not None:
            total, source = usage, "cgroup"
    rss, hugetlb = parse_smaps_rollup(root.read(sysfs.proc(pid, "smaps_rollup")))
    per_node, huge_per_node = parse_numa_maps(root.read(sysfs.proc(pid, "numa_maps")))
    if interrupts_text is None:
        interrupts_text = root.read(sysfs.INTERRUPTS)
    return PartitionStats(
        name=name,
        pid=pid,
        vcpus=dict(sorted(vcpus.items())),
        emulator=ThreadTimes(tid=0, cpu_ns=emu_cpu, wait_ns=emu_wait, timeslices=emu_slices),
        cpu_source=source,
        total_cpu_ns=total,
        resident_bytes=rss,
        hugetlb_bytes=hugetlb,
        memory_per_node=per_node,
        hugepages_per_node=huge_per_node,
        interrupts=parse_interrupts(interrupts_text, devices),
    )


# -- Prometheus text exposition format ---------------------------------------------------

_HELP = {
    "vcpu_cpu_seconds_total": ("counter", "CPU time of one vCPU thread."),
    "vcpu_wait_seconds_total": (
        "counter",
        "Time one vCPU thread was runnable but waited for its CPU (run-queue delay).",
    ),
    "emulator_cpu_seconds_total": ("counter", "CPU time of the QEMU threads that are not vCPUs."),
    "emulator_wait_seconds_total": ("counter", "Run-queue delay of the QEMU emulator threads."),
    "cpu_seconds_total": ("counter", "CPU time of the whole partition."),
    "memory_resident_bytes": ("gauge", "Resident memory of the partition's QEMU, hugepages apart."),
    "memory_hugetlb_bytes": ("gauge", "Hugepage memory mapped by the partition's QEMU."),
    "memory_node_bytes": ("gauge", "Memory of the partition's QEMU on one host NUMA node."),
    "hugepages_node_bytes": ("gauge", "Hugepage memory of the partition on one host NUMA node."),
    "device_interrupts_total": ("counter", "Host interrupts of one VFIO vector of a device."),
    "up": ("gauge", "1 when the partition's QEMU runs, 0 otherwise."),
}


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus(
    stats: Iterable[PartitionStats], down: Iterable[str] = (), prefix: str = "partition"
) -> str:
    """Every partition's figures in the text exposition format (node_exporter's textfile
    collector reads it): one family per metric, the partition name as label ``partition``."""
    samples: dict[str, list[str]] = {k: [] for k in _HELP}

    def add(metric: str, labels: Mapping[str, object], value: float) -> None:
        text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        samples[metric].append(f"{prefix}_{metric}{{{text}}} {value!r}")

    for s in stats:
        part = {"partition": s.name}
        add("up", part, 1)
        for i, t in s.vcpus.items():
            add("vcpu_cpu_seconds_total", {**part, "vcpu": i}, t.cpu_ns / 1e9)
            add("vcpu_wait_seconds_total", {**part, "vcpu": i}, t.wait_ns / 1e9)
        add("emulator_cpu_seconds_total", part, s.emulator.cpu_ns / 1e9)
        add("emulator_wait_seconds_total", part, s.emulator.wait_ns / 1e9)
        add("cpu_seconds_total", part, s.total_cpu_ns / 1e9)
        add("memory_resident_bytes", part, float(s.resident_bytes))
        add("memory_hugetlb_bytes", part, float(s.hugetlb_bytes))
        for node, b in sorted(s.memory_per_node.items()):
            add("memory_node_bytes", {**part, "node": node}, float(b))
        for node, b in sorted(s.hugepages_per_node.items()):
            add("hugepages_node_bytes", {**part, "node": node}, float(b))
        for vector, n in sorted(s.interrupts.items()):
            m = _VFIO_HANDLER.match(vector)
            device = m.group("addr") if m else ""
            add("device_interrupts_total", {**part, "device": device, "vector": vector}, float(n))
    for name in down:
        add("up", {"partition": name}, 0)
    out: list[str] = []
    for metric, (kind, help_text) in _HELP.items():
        if not samples[metric]:
            continue
        out.append(f"# HELP {prefix}_{metric} {help_text}")
        out.append(f"# TYPE {prefix}_{metric} {kind}")
        out.extend(samples[metric])
    return "\n".join(out) + "\n" if out else ""


# -- for `partition status` -------------------------------------------------------------


def cgroup_of(root: HostRoot, name: str) -> str | None:
    """The partition's own cgroup v2 directory (partitioner/isolation/cgroup.py makes it at
    start), whose ``cpu.stat`` counts every thread of its QEMU; None where there is none (a
    cgroup v1 cpuset has no ``cpu.stat``): the figures then come from the threads' schedstat."""
    from partitioner.isolation.cgroup import cgroup_path, find_hierarchy

    h = find_hierarchy(root)
    if h is None or not h.v2:
        return None
    path = cgroup_path(h, name)
    return path if root.exists(f"{path}/cpu.stat") else None


def of_records(root: HostRoot, records: Mapping[str, Any]) -> dict[str, PartitionStats]:
    """Figures of every running partition among ``records`` (name -> PartitionRecord)."""
    out: dict[str, PartitionStats] = {}
    interrupts = root.read(sysfs.INTERRUPTS) or ""
    for name, rec in sorted(records.items()):
        if rec.pid is None or rec.state.value != "running":
            continue
        if not root.exists(sysfs.task(rec.pid)):
            continue
        devices = [str(d.address) for d in rec.placement.devices]
        out[name] = collect(
            root,
            name,
            rec.pid,
            rec.vcpu_threads,
            devices,
            cgroup=cgroup_of(root, name),
            interrupts_text=interrupts,
        )
    return out


def render(stats: Mapping[str, PartitionStats]) -> list[list[str]]:
    """Rows for people: CPU seconds of the vCPUs (each) and emulator threads, the longest
    vCPU run-queue delay, memory, and the devices' interrupts."""
    rows = []
    for name, s in sorted(stats.items()):
        vcpu = " ".join(f"{t.cpu_ns / 1e9:.1f}" for _, t in sorted(s.vcpus.items())) or "-"
        wait = max((t.wait_ns for t in s.vcpus.values()), default=0)
        nodes = " ".join(f"N{n}:{human_size(b)}" for n, b in sorted(s.hugepages_per_node.items()))
        rows.append(
            [
                name,
                vcpu,
                f"{s.emulator.cpu_ns / 1e9:.1f}",
                f"{wait / 1e6:.1f}",
                human_size(s.resident_bytes),
                human_size(s.hugetlb_bytes) + (f" ({nodes})" if nodes else ""),
                str(sum(s.interrupts.values())) if s.interrupts else "-",
            ]
        )
    return rows


RENDER_HEADERS = [
    "PARTITION",
    "VCPU CPU S",
    "EMULATOR S",
    "MAX WAIT MS",
    "RESIDENT",
    "HUGEPAGES",
    "IRQS",
]
