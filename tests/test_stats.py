"""Per-partition statistics: the parsers on real kernel text, and real TCG guests on this machine.

The live tests start two guests pinned to the same CPU: one made busy (its
kernel idles by polling, ``idle=poll``, so its vCPU never halts) and one idle;
the busy one's vCPU time grows and the idle one's does not.  ``status --json``
and ``status --prometheus`` read them through a state record in the test's own
state directory; the Prometheus text is parsed with ``prometheus_client``'s
own parser.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from guestimage import KERNEL_CMDLINE, build_guest_initramfs, guest_kernel

from partitioner.cpuset import CpuSet
from partitioner.errors import GuestError
from partitioner.guest.argv import guest_paths
from partitioner.guest.caps import QemuCaps, probe_qemu
from partitioner.guest.launch import RunningGuest, kill, launch
from partitioner.kernel.root import HostRoot
from partitioner.manifest.model import Boot, PartitionSpec
from partitioner.planning.model import Placement, Plan
from partitioner.record.model import PartitionRecord, RunState, State
from partitioner.record.store import StateStore
from partitioner.stats import (
    PartitionStats,
    ThreadTimes,
    collect,
    parse_cpu_stat,
    parse_interrupts,
    parse_numa_maps,
    parse_smaps_rollup,
    prometheus,
)
from partitioner.units import GiB, MiB

ROOT = HostRoot("/")

# /proc/interrupts of a host with two partitions' devices: MSI-X vectors of a NIC, MSI of a
# GPU, INTx of an old card (the handler names VFIO gives, drivers/vfio/pci/vfio_pci_intrs.c).
INTERRUPTS = """\
            CPU0       CPU1       CPU2       CPU3
   0:         44          0          0          0   IO-APIC   2-edge      timer
 120:          0       1500          0          3   PCI-MSIX-0000:81:00.0 0-edge      vfio-msix[0](0000:81:00.0)
 121:          0          0        250          0   PCI-MSIX-0000:81:00.0 1-edge      vfio-msix[1](0000:81:00.0)
 122:          7          0          0          0   PCI-MSI-0000:41:00.0 0-edge      vfio-msi[0](0000:41:00.0)
 123:          0          0          0         90   IO-APIC  16-fasteoi   vfio-intx(0000:05:00.0)
 124:        800          0          0          0   PCI-MSIX-0000:03:00.0 0-edge      nvme0q0
NMI:          0          0          0          0   Non-maskable interrupts
"""

# numa_maps of a QEMU with 2 MiB-page guest memory on nodes 0 and 1 and its own heap.
NUMA_MAPS = """\
55d0c2a00000 default file=/usr/bin/qemu-system-x86_64 mapped=1200 mapmax=2 N0=1200 kernelpagesize_kB=4
55d0c4000000 default heap anon=3000 dirty=3000 N0=2500 N1=500 kernelpagesize_kB=4
7f0000000000 bind:0 file=/memfd:mem0\\040(deleted) huge dirty=512 N0=512 kernelpagesize_kB=2048
7f4000000000 bind:1 file=/memfd:mem1\\040(deleted) huge dirty=256 N1=256 kernelpagesize_kB=2048
7ffd1c000000 default stack anon=9 dirty=9 N1=9 kernelpagesize_kB=4
"""


def test_interrupts_of_the_partitions_devices_only() -> None:
    got = parse_interrupts(INTERRUPTS, ["0000:81:00.0", "0000:05:00.0"])
    assert got == {
        "vfio-msix[0](0000:81:00.0)": 1503,
        "vfio-msix[1](0000:81:00.0)": 250,
        "vfio-intx(0000:05:00.0)": 90,
    }
    assert parse_interrupts(INTERRUPTS, []) == {}
    assert parse_interrupts(INTERRUPTS, ["0000:41:00.0"]) == {"vfio-msi[0](0000:41:00.0)": 7}


def test_interrupts_of_this_machine_parse() -> None:
    """The live file has the layout the parser expects: a timer or other vector counts."""
    text = ROOT.read("/proc/interrupts") or ""
    assert text.splitlines()[0].split()[0] == "CPU0"
    assert parse_interrupts(text, ["0000:ff:1f.7"]) == {}


def test_numa_maps_per_node_and_hugepages() -> None:
    every, huge = parse_numa_maps(NUMA_MAPS)
    assert huge == {0: 512 * 2 * MiB, 1: 256 * 2 * MiB}
    assert every == {
        0: (1200 + 2500) * 4096 + 512 * 2 * MiB,
        1: (500 + 9) * 4096 + 256 * 2 * MiB,
    }


def test_memory_and_cpu_of_this_process() -> None:
    """collect() on a real process: this one, its main thread standing for a vCPU."""
    me = threading.get_native_id()
    before = collect(ROOT, "self", os.getpid(), {0: me})
    spent = time.thread_time()
    while time.thread_time() - spent < 0.2:
        pass
    after = collect(ROOT, "self", os.getpid(), {0: me})
    grew = after.vcpus[0].cpu_ns - before.vcpus[0].cpu_ns
    assert grew >= 0.15e9, grew
    assert after.resident_bytes > 1 * MiB
    assert after.hugetlb_bytes == 0
    assert sum(after.memory_per_node.values()) > 0
    assert after.cpu_source == "schedstat"
    assert after.total_cpu_ns >= after.vcpus[0].cpu_ns
    rss, _ = parse_smaps_rollup(ROOT.read(f"/proc/{os.getpid()}/smaps_rollup"))
    assert abs(rss - after.resident_bytes) < 64 * MiB


def test_the_cgroup_total_wins_when_there_is_one(tmp_path: Path) -> None:
    cg = tmp_path / "sys/fs/cgroup/partition.slice/p1"
    cg.mkdir(parents=True)
    (cg / "cpu.stat").write_text("usage_usec 123456\nuser_usec 100000\nsystem_usec 23456\n")
    assert parse_cpu_stat((cg / "cpu.stat").read_text()) == 123456000
    proc = tmp_path / "proc/77/task/77"
    proc.mkdir(parents=True)
    (proc / "schedstat").write_text("5000 7000 3\n")
    s = collect(HostRoot(tmp_path), "p1", 77, {0: 77}, cgroup="/sys/fs/cgroup/partition.slice/p1")
    assert (s.cpu_source, s.total_cpu_ns) == ("cgroup", 123456000)
    assert s.vcpus[0] == ThreadTimes(tid=77, cpu_ns=5000, wait_ns=7000, timeslices=3)
    s = collect(HostRoot(tmp_path), "p1", 77, {0: 77}, cgroup="/sys/fs/cgroup/none")
    assert (s.cpu_source, s.total_cpu_ns) == ("schedstat", 5000)


def test_the_partitions_own_cgroup_is_found_where_isolation_makes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from partitioner.isolation.cgroup import cgroup_path, find_hierarchy
    from partitioner.stats import cgroup_of

    monkeypatch.delenv("PARTITION_CGROUP", raising=False)
    (tmp_path / "proc/self").mkdir(parents=True)
    mounts = tmp_path / "proc/self/mounts"
    mounts.write_text("cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n")
    (tmp_path / "sys/fs/cgroup").mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/cgroup.controllers").write_text("cpuset cpu memory\n")
    root = HostRoot(tmp_path)
    h = find_hierarchy(root)
    assert h is not None
    assert cgroup_of(root, "p1") is None  # not made yet: schedstat
    made = tmp_path / cgroup_path(h, "p1").lstrip("/")
    made.mkdir(parents=True)
    (made / "cpu.stat").write_text("usage_usec 5\n")
    assert cgroup_of(root, "p1") == cgroup_path(h, "p1") == "/sys/fs/cgroup/partition/p1"
    # A v1 cpuset hierarchy has no cpu.stat: no cgroup figures from it.
    mounts.write_text("cgroup /sys/fs/cgroup/cpuset cgroup rw,cpuset 0 0\n")
    assert cgroup_of(root, "p1") is None


def _families(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        out[f"{fam.name}:{fam.type}"] = [(s.name, s.labels, s.value) for s in fam.samples]
    return out


def test_prometheus_text_parses_with_prometheus_client() -> None:
    s = PartitionStats(
        name='fw"0',
        pid=10,
        vcpus={0: ThreadTimes(11, 2_500_000_000, 1_000_000, 9), 1: ThreadTimes(12, 0, 0, 0)},
        emulator=ThreadTimes(0, 300_000_000, 5_000, 40),
        cpu_source="schedstat",
        total_cpu_ns=2_800_000_000,
        resident_bytes=64 * MiB,
        hugetlb_bytes=2 * GiB,
        memory_per_node={0: 2 * GiB + 64 * MiB},
        hugepages_per_node={0: 2 * GiB},
        interrupts={"vfio-msix[0](0000:81:00.0)": 1503},
    )
    fams = _families(prometheus([s], down=["db0"]))
    label = {"partition": 'fw"0'}
    assert fams["partition_vcpu_cpu_seconds:counter"] == [
        ("partition_vcpu_cpu_seconds_total", {**label, "vcpu": "0"}, 2.5),
        ("partition_vcpu_cpu_seconds_total", {**label, "vcpu": "1"}, 0.0),
    ]
    assert fams["partition_vcpu_wait_seconds:counter"][0][2] == 0.001
    assert fams["partition_emulator_cpu_seconds:counter"] == [
        ("partition_emulator_cpu_seconds_total", label, 0.3)
    ]
    assert fams["partition_hugepages_node_bytes:gauge"] == [
        ("partition_hugepages_node_bytes", {**label, "node": "0"}, float(2 * GiB))
    ]
    assert fams["partition_device_interrupts:counter"] == [
        (
            "partition_device_interrupts_total",
            {**label, "device": "0000:81:00.0", "vector": "vfio-msix[0](0000:81:00.0)"},
            1503.0,
        )
    ]
    assert fams["partition_up:gauge"] == [
        ("partition_up", label, 1.0),
        ("partition_up", {"partition": "db0"}, 0.0),
    ]
    assert prometheus([]) == ""


# -- real guests ---------------------------------------------------------------------


GUEST_CPU = 1


@pytest.fixture(scope="module")
def caps() -> QemuCaps:
    if os.geteuid() != 0:
        pytest.skip("needs root: pinning another process's threads, mem-lock")
    if GUEST_CPU not in os.sched_getaffinity(0):
        pytest.skip(f"needs CPU {GUEST_CPU}")
    try:
        return probe_qemu()
    except GuestError as e:
        pytest.skip(str(e))


def _placement(name: str, kernel: Path, initrd: Path, cmdline: str) -> Placement:
    spec = PartitionSpec(
        name=name,
        cpu_count=1,
        cpu_list=None,
        memory_bytes=256 * MiB,
        hugepage_bytes=None,
        numa="auto",
        boot=Boot(str(kernel), str(initrd), cmdline),
    )
    return Placement(
        name=name,
        cpus=(GUEST_CPU,),
        sockets=1,
        cores=1,
        threads=1,
        numa_nodes=(0,),
        memory_per_node=((0, 256 * MiB),),
        hugepage_bytes=None,
        devices=(),
        spec=spec,
    )


@pytest.fixture(scope="module")
def guests(
    caps: QemuCaps, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, dict[str, RunningGuest], dict[str, Placement]]]:
    """A busy guest (idle=poll: its vCPU never halts) and an idle one, on the same CPU."""
    base = tmp_path_factory.mktemp("stats")
    kernel = guest_kernel()
    initrd = build_guest_initramfs(base / "image")
    placements = {
        # no_timer_check: a loaded host can starve TCG's early timer check into a panic.
        "busy": _placement("busy", kernel, initrd, KERNEL_CMDLINE + " no_timer_check idle=poll"),
        "idle": _placement("idle", kernel, initrd, KERNEL_CMDLINE + " no_timer_check"),
    }
    running: dict[str, RunningGuest] = {}
    try:
        for name, p in placements.items():
            plan = Plan("tcg", "isolate", CpuSet([0]), GiB, {name: p})
            paths = guest_paths(base / "run", base / "log", name, state_dir=base / "state")
            running[name] = launch(p, plan, paths, caps, root=ROOT)
        yield base, running, placements
    finally:
        for g in running.values():
            kill(g.pid, root=ROOT)


def _vcpu_seconds(g: RunningGuest) -> float:
    s = collect(ROOT, g.name, g.pid, g.vcpu_threads)
    return s.vcpus[0].cpu_ns / 1e9


@pytest.mark.qemu
def test_a_busy_guest_shows_vcpu_time_growing_an_idle_one_does_not(
    guests: tuple[Path, dict[str, RunningGuest], dict[str, Placement]],
) -> None:
    _, running, _ = guests
    busy, idle = running["busy"], running["idle"]
    # Let both boot past their kernels' start (TCG on a loaded machine is slow).
    for g in (busy, idle):
        _wait_console(Path(g.paths.console_log), "GUEST-READY")
    b0, i0 = _vcpu_seconds(busy), _vcpu_seconds(idle)
    # Wait for the busy guest to accrue half a second of CPU (however loaded this CPU is).
    deadline = time.monotonic() + 120
    while _vcpu_seconds(busy) - b0 < 0.5 and time.monotonic() < deadline:
        time.sleep(0.5)
    b1, i1 = _vcpu_seconds(busy), _vcpu_seconds(idle)
    assert b1 - b0 >= 0.5, f"the busy guest's vCPU got {b1 - b0:.2f}s"
    assert i1 - i0 < (b1 - b0) / 5, f"idle {i1 - i0:.3f}s against busy {b1 - b0:.3f}s"


@pytest.mark.qemu
def test_status_json_and_prometheus_show_the_guests(
    guests: tuple[Path, dict[str, RunningGuest], dict[str, Placement]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from partitioner.cli.main import main

    base, running, placements = guests
    state_dir = base / "record"
    state = State()
    for name, g in running.items():
        state = state.with_partition(
            PartitionRecord(
                name=name,
                state=RunState.RUNNING,
                placement=placements[name],
                pid=g.pid,
                vcpu_threads=dict(g.vcpu_threads),
                paths=g.paths.to_json(),
                started_at=g.started_at,
            )
        )
    StateStore(state_dir).save(state)
    monkeypatch.setenv("PARTITION_STATE_DIR", str(state_dir))

    assert main(["--json", "status"]) == 0
    doc = json.loads(capsys.readouterr().out)["partitions"]
    for name, g in running.items():
        st = doc[name]["stats"]
        assert st["pid"] == g.pid and st["cpu_source"] == "schedstat"
        assert list(st["vcpus"]) == ["0"] and st["vcpus"]["0"]["tid"] == g.vcpu_threads[0]
        assert st["vcpus"]["0"]["cpu_seconds"] > 0
        assert st["emulator"]["cpu_seconds"] > 0  # QEMU's main loop started the guest
        # 256 MiB of guest RAM preallocated and locked: resident, on node 0.
        assert st["memory"]["resident_bytes"] >= 256 * MiB
        assert st["memory"]["per_node_bytes"]["0"] >= 256 * MiB
        assert st["memory"]["hugetlb_bytes"] == 0 and st["interrupts"] == {}

    assert main(["status", "--prometheus"]) == 0
    fams = _families(capsys.readouterr().out)
    vcpu = {s[1]["partition"]: s[2] for s in fams["partition_vcpu_cpu_seconds:counter"]}
    assert set(vcpu) == {"busy", "idle"} and vcpu["busy"] > vcpu["idle"]
    assert {s[1]["partition"] for s in fams["partition_up:gauge"] if s[2] == 1.0} == {
        "busy",
        "idle",
    }

    assert main(["status"]) == 0
    text = capsys.readouterr().out
    assert "VCPU CPU S" in text and "MAX WAIT MS" in text


def _wait_console(log: Path, line: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if re.search(rf"^{re.escape(line)}\r?$", log.read_text(errors="replace"), re.M):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no {line} on {log} within {timeout}s")
