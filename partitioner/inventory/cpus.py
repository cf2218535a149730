"""CPUs: which exist and are online, their topology and kind, and which this process may hand out.

The allowed set is the cgroup cpuset's (as hwloc finds it), else the process's affinity.
"""

from __future__ import annotations

import os
import re

from partitioner.cpuset import CpuSet
from partitioner.errors import HostReadError
from partitioner.inventory.model import Cpu
from partitioner.inventory.reader import Reader
from partitioner.kernel import sysfs
from partitioner.kernel.root import HostRoot

_CPU_DIR_RE = re.compile(r"^cpu([0-9]{1,5})$")
NODE_DIR_RE = re.compile(r"^node([0-9]{1,5})$")


def scan_cpus(r: Reader) -> dict[int, Cpu]:
    ids: list[int] = []
    for name in r.root.listdir(sysfs.CPU):
        m = _CPU_DIR_RE.match(name)
        if m:
            ids.append(int(m.group(1)))
    present = r.read_cpuset(f"{sysfs.CPU}/present")
    if present is not None and present:
        # A possible-but-absent CPU has no directory; a directory outside
        # "present" is a leftover the kernel does not count.
        present_ids = set(present)
        ids = [i for i in ids if i in present_ids]
    if not ids:
        raise HostReadError(
            f"no CPUs found under {r.root.path(sysfs.CPU)}: the tree is not a host; "
            f"make one with `partition snapshot DIR`",
            path=str(r.root.path(sysfs.CPU)),
        )
    ids.sort()
    online_set = r.read_cpuset(f"{sysfs.CPU}/online")
    online_ids = set(online_set) if online_set is not None else None
    kinds = scan_cpu_kinds(r, ids)
    allowed = scan_allowed_cpus(r)

    # The kernel's sibling, package and die lists are symmetric: read once
    # for the first CPU of each core, package or die, and reused for the
    # others (a 1024-CPU host would otherwise cost thousands of opens).
    known_siblings: dict[int, CpuSet] = {}
    known_package: dict[int, int] = {}
    known_die: dict[int, int] = {}
    cpus: dict[int, Cpu] = {}
    for i in ids:
        topo = sysfs.cpu(i, "topology")
        package = known_package.get(i)
        if package is None:
            package = r.read_int(f"{topo}/physical_package_id")
            if package is not None:
                members = r.read_cpuset(
                    f"{topo}/package_cpus_list", f"{topo}/core_siblings"
                ) or r.read_cpuset(f"{topo}/core_siblings_list")
                if members is not None and i in members:
                    known_package.update(dict.fromkeys(members, package))
        if online_ids is not None:
            online = i in online_ids
        else:
            # Old kernels (and trees without the global file): the CPU's own
            # "online" (cpu0 often has none), else whether it has a topology.
            flag = r.read_int(sysfs.cpu(i, "online"))
            online = flag == 1 if flag is not None else package is not None
        if not online or package is None:
            if online:
                r.note(f"CPU {i} is online but has no topology; taken as its own core")
            cpus[i] = Cpu(
                id=i,
                online=online,
                allowed=allowed is None or i in allowed,
                package=-1 if package is None else package,
                die=-1 if package is None else 0,
                core=-1 if package is None else i,
                node=None,
                siblings=CpuSet([i]) if online else CpuSet(),
                kind=kinds.get(i, ""),
            )
            continue
        die = known_die.get(i)
        if die is None:
            die = r.read_int(f"{topo}/die_id", 0)
            die = die if die is not None and die >= 0 else 0
            members = r.read_cpuset(f"{topo}/die_cpus_list")
            if members is not None and i in members:
                known_die.update(dict.fromkeys(members, die))
        core = r.read_int(f"{topo}/core_id", i)
        siblings = known_siblings.get(i)
        if siblings is None:
            siblings = r.read_cpuset(
                f"{topo}/thread_siblings_list", f"{topo}/thread_siblings"
            ) or r.read_cpuset(f"{topo}/core_cpus_list", f"{topo}/core_cpus")
            if siblings is None or i not in siblings:
                siblings = CpuSet([i]) | (siblings or CpuSet())
            known_siblings.update(dict.fromkeys(siblings, siblings))
        cpus[i] = Cpu(
            id=i,
            online=True,
            allowed=allowed is None or i in allowed,
            package=package,
            die=die,
            core=core if core is not None else i,
            node=None,
            siblings=siblings,
            kind=kinds.get(i, ""),
        )
    # Siblings are told about online CPUs only: an offline thread is not a sibling one can own.
    online_now = {c.id for c in cpus.values() if c.online}
    whole: dict[CpuSet, bool] = {}  # a core's siblings are one CpuSet, asked once
    for c in list(cpus.values()):
        if not c.online:
            continue
        ok = whole.get(c.siblings)
        if ok is None:
            ok = whole[c.siblings] = all(s in online_now for s in c.siblings)
        if not ok:
            cpus[c.id] = replace_cpu(c, siblings=CpuSet(s for s in c.siblings if s in online_now))
    return cpus


def scan_cpu_kinds(r: Reader, ids: list[int]) -> dict[int, str]:
    """Hybrid Intel parts list their performance and efficiency CPUs under two PMU devices.

    Without them (older kernels, trees that did not keep them), the two kinds
    still differ in base frequency, which is how hwloc tells them apart too.
    """
    kinds: dict[int, str] = {}
    for kind in ("core", "atom"):
        cs = r.read_cpuset(sysfs.pmu_cpus(kind))
        if cs is not None:
            for c in cs:
                kinds[c] = kind
    if kinds or not r.root.exists(sysfs.cpu(ids[0], "cpufreq/base_frequency")):
        return kinds
    base: dict[int, int] = {}
    for i in ids:
        f = r.read_int(sysfs.cpu(i, "cpufreq/base_frequency"))
        if f is not None:
            base[i] = f
    if len(set(base.values())) == 2:
        fast = max(base.values())
        kinds = {i: "core" if f == fast else "atom" for i, f in base.items()}
    return kinds


def scan_allowed_cpus(r: Reader) -> set[int] | None:
    """The CPUs of our cgroup's cpuset, as hwloc finds it; None when nothing restricts.

    The process's own affinity (Cpus_allowed_list) is only a fallback: root
    may pin a child outside its own affinity but never outside its cpuset.
    """
    cs = cgroup_cpuset(r)
    if cs is not None:
        return set(cs)
    status = r.read(sysfs.SELF_STATUS)
    if status:
        for line in status.splitlines():
            if line.startswith("Cpus_allowed_list:"):
                cs = r.parse_cpus(sysfs.SELF_STATUS, line.split(":", 1)[1])
                return set(cs) if cs is not None else None
    return None


def cgroup_cpuset(r: Reader) -> CpuSet | None:
    v1_path: str | None = None
    v2_path: str | None = None
    text = r.read(sysfs.SELF_CGROUP)
    if text:
        for line in text.splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            if parts[0] == "0" and parts[1] == "":
                v2_path = parts[2]
            elif "cpuset" in parts[1].split(","):
                v1_path = parts[2]
    legacy = r.read(sysfs.SELF_CPUSET)  # older kernels, and hwloc's trees
    mounts = cgroup_mounts(r)
    v1_files = (
        ("cpuset.effective_cpus", "cpuset.effective_mems"),
        ("cpuset.cpus", "cpuset.mems"),
        ("cpus", "mems"),
    )
    candidates: list[tuple[str, str, tuple[tuple[str, str], ...]]] = []
    for kind, mountpoint in mounts:
        if kind in ("v1", "cpuset") and (v1_path or legacy):
            candidates.append((mountpoint, v1_path or legacy or "/", v1_files))
        elif kind == "v2" and (v2_path or legacy) and not v1_path:
            candidates.append(
                (
                    mountpoint,
                    v2_path or legacy or "/",
                    (("cpuset.cpus.effective", "cpuset.mems.effective"),),
                )
            )
    for mountpoint, path, files in candidates:
        path = "/" + path.strip("/")
        if ".." in path.split("/"):
            r.note(f"cgroup path {path!r} leaves its hierarchy; ignored")
            continue
        # A cgroup2 group without the cpuset controller has no file: its
        # parent's set applies, up to the root.
        while True:
            base = mountpoint.rstrip("/") + (path if path != "/" else "")
            for cpus_file, mems_file in files:
                cs = r.read_cpuset(f"{base}/{cpus_file}")
                if cs is not None and cs:
                    note_mems(r, r.read_cpuset(f"{base}/{mems_file}"))
                    return cs
            if path == "/":
                break
            path = os.path.dirname(path)
    return None


def note_mems(r: Reader, mems: CpuSet | None) -> None:
    """hwloc hides NUMA nodes outside the cgroup's cpuset.mems.  They are kept here (the
    host has them, and partitions do not run in this process's cgroup) but said."""
    if mems is None:
        return
    nodes = [int(m.group(1)) for n in r.root.listdir(sysfs.NODE) if (m := NODE_DIR_RE.match(n))]
    outside = CpuSet(n for n in nodes if n not in mems)
    if outside:
        r.note(
            f"this process's cgroup cpuset allows memory on NUMA node(s) {mems} only, "
            f"not on {outside}"
        )


def cgroup_mounts(r: Reader) -> list[tuple[str, str]]:
    """(kind, mountpoint) of cpuset-capable mounts: "v1" cgroup with cpuset, "cpuset", "v2"."""
    out: list[tuple[str, str]] = []
    info = r.read(sysfs.SELF_MOUNTINFO)
    if info:
        for line in info.splitlines():
            left, sep, right = line.partition(" - ")
            f = left.split()
            rf = right.split()
            if not sep or len(f) < 5 or len(rf) < 1:
                continue
            opts = rf[2].split(",") if len(rf) > 2 else []
            out.extend(_cgroup_kind(rf[0], opts, r.mount_point(sysfs.SELF_MOUNTINFO, f[4])))
    if not out:
        mounts = r.read(sysfs.MOUNTS) or ""
        for line in mounts.splitlines():
            f = line.split()
            if len(f) >= 4:
                out.extend(_cgroup_kind(f[2], f[3].split(","), r.mount_point(sysfs.MOUNTS, f[1])))
    # cpuset v1 first: where both exist, the v1 controller is the one that holds cpuset.
    out.sort(key=lambda km: {"v1": 0, "cpuset": 1, "v2": 2}[km[0]])
    return out


def _cgroup_kind(fstype: str, opts: list[str], mountpoint: str) -> list[tuple[str, str]]:
    if fstype == "cgroup2":
        return [("v2", mountpoint)]
    if fstype == "cgroup" and "cpuset" in opts:
        return [("v1", mountpoint)]
    if fstype == "cpuset":
        return [("cpuset", mountpoint)]
    return []


def replace_cpu(c: Cpu, *, siblings: CpuSet | None = None, node: int | None = None) -> Cpu:
    # Built directly: dataclasses.replace costs more than the sysfs reads on a big host.
    return Cpu(
        id=c.id,
        online=c.online,
        allowed=c.allowed,
        package=c.package,
        die=c.die,
        core=c.core,
        node=c.node if node is None else node,
        siblings=c.siblings if siblings is None else siblings,
        kind=c.kind,
    )


_ADDRESS_SIZES = re.compile(r"^address sizes\s*:\s*(\d+) bits physical", re.MULTILINE)


def phys_bits(root: HostRoot) -> int | None:
    """The CPU's physical address bits, from ``/proc/cpuinfo``; None when it does not say."""
    m = _ADDRESS_SIZES.search(root.read(sysfs.CPUINFO) or "")
    return int(m.group(1)) if m else None
