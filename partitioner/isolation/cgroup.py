"""Each partition's QEMU in a cgroup of its own, with ``vcpuN`` and ``emulator`` children
(libvirt's layout), so its CPU time and memory can be read and the kernel fences its CPUs.

Where the cgroup lives depends on the host:

- cgroup v2 with the ``cpuset`` controller: ``MOUNT/BASE/NAME`` made a threaded
  domain, ``vcpuN`` and ``emulator`` threaded children with ``cpuset.cpus`` of their own;
- cpuset only on a v1 hierarchy (this project's development machines): the same
  layout in the v1 ``cpuset`` hierarchy, where threads may be split freely;
- cgroup v2 without ``cpuset``: the same layout, grouping only (accounting; the
  threads' affinity still places them).

``BASE`` is ``partition`` (``PARTITION_CGROUP`` overrides it, so test runs sharing a
machine do not meet).  The cgroup is made for every site, ``isolation: pinned`` too:
it changes nothing outside the partition's own QEMU.  Its path is a function of the
partition's name, so a run killed after making it finds it again.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from partitioner.cpuset import CpuSet
from partitioner.errors import GuestError
from partitioner.kernel import sysfs
from partitioner.kernel.root import HostRoot

if TYPE_CHECKING:
    from partitioner.record.model import PartitionRecord

DEFAULT_BASE = "partition"


@dataclass(frozen=True)
class Hierarchy:
    mount: str  # kernel path of the mount point
    v2: bool
    cpuset: bool  # the cpuset controller is usable here

    @property
    def tasks_file(self) -> str:
        return "cgroup.threads" if self.v2 else "tasks"


def base_name() -> str:
    return os.environ.get("PARTITION_CGROUP", DEFAULT_BASE)


def find_hierarchy(root: HostRoot) -> Hierarchy | None:
    """The hierarchy to use: v2 with cpuset, else v1's cpuset, else v2 without it; None: no cgroups."""
    v2: str | None = None
    v1_cpuset: str | None = None
    for line in (root.read(sysfs.SELF_MOUNTS) or "").splitlines():
        f = line.split()
        if len(f) < 4:
            continue
        if f[2] == "cgroup2" and v2 is None:
            v2 = f[1]
        elif f[2] == "cgroup" and "cpuset" in f[3].split(",") and v1_cpuset is None:
            v1_cpuset = f[1]
    if v2 is not None and "cpuset" in (root.read(f"{v2}/cgroup.controllers") or "").split():
        return Hierarchy(v2, True, True)
    if v1_cpuset is not None:
        return Hierarchy(v1_cpuset, False, True)
    if v2 is not None:
        return Hierarchy(v2, True, False)
    return None


def cgroup_path(h: Hierarchy, name: str) -> str:
    return f"{h.mount}/{base_name()}/{name}"


def _mkdir(root: HostRoot, path: str) -> None:
    with contextlib.suppress(FileExistsError):
        os.mkdir(root.path(path))


def _enable_cpuset(root: HostRoot, path: str) -> None:
    if "cpuset" not in (root.read(f"{path}/cgroup.subtree_control") or "").split():
        root.write(f"{path}/cgroup.subtree_control", "+cpuset")


def place(
    root: HostRoot,
    name: str,
    pid: int,
    vcpu_threads: Mapping[int, int],
    vcpu_cpus: tuple[int, ...],
    reserve: CpuSet,
) -> str | None:
    """Make the partition's cgroup and move its QEMU's threads in: vCPU i to ``vcpuI``, every
    other thread to ``emulator``.  Returns the cgroup's kernel path (None: no cgroups here)."""
    h = find_hierarchy(root)
    if h is None:
        return None
    remove(root, name)  # a cgroup left by a killed run: its threads are gone or moved back
    base = f"{h.mount}/{base_name()}"
    top = f"{base}/{name}"
    _mkdir(root, base)
    mine = CpuSet(vcpu_cpus) | reserve
    if h.v2 and h.cpuset:
        _enable_cpuset(root, h.mount)
        _enable_cpuset(root, base)
    elif not h.v2:
        # A v1 cpuset takes no task before its cpus and mems are set; the base gets its
        # parent's, so nothing is narrower than the machine's own root.
        for f in ("cpuset.cpus", "cpuset.mems"):
            if not root.read(f"{base}/{f}"):
                root.write(f"{base}/{f}", root.read(f"{h.mount}/{f}") or "")
    _mkdir(root, top)
    if h.cpuset:
        root.write(f"{top}/cpuset.cpus", str(mine))
        if not h.v2:
            root.write(f"{top}/cpuset.mems", root.read(f"{base}/cpuset.mems") or "")
    children = {f"vcpu{i}": CpuSet([c]) for i, c in enumerate(vcpu_cpus)}
    children["emulator"] = reserve
    for child in children:
        _mkdir(root, f"{top}/{child}")
        if h.v2:
            # Threads of one process in different cgroups: v2 wants a threaded subtree.
            root.write(f"{top}/{child}/cgroup.type", "threaded")
    if h.v2 and h.cpuset:
        _enable_cpuset(root, top)
    if h.cpuset:
        for child, cpus in children.items():
            root.write(f"{top}/{child}/cpuset.cpus", str(cpus))
            if not h.v2:
                root.write(f"{top}/{child}/cpuset.mems", root.read(f"{top}/cpuset.mems") or "")
    if h.v2:
        root.write(f"{top}/cgroup.procs", str(pid))
    vcpu_of = {tid: i for i, tid in vcpu_threads.items()}
    for t in root.listdir(sysfs.task(pid)):
        if not t.isdigit():
            continue
        child = f"vcpu{vcpu_of[int(t)]}" if int(t) in vcpu_of else "emulator"
        try:
            root.write(f"{top}/{child}/{h.tasks_file}", t)
        except OSError as e:
            if e.errno != errno_mod.ESRCH:  # a thread that just ended
                raise
    return top


def members(root: HostRoot, path: str) -> dict[str, set[int]]:
    """child -> thread ids in it (for audit and tests)."""
    h = find_hierarchy(root)
    f = h.tasks_file if h else "cgroup.threads"
    out: dict[str, set[int]] = {}
    for child in root.listdir(path):
        if root.is_dir(f"{path}/{child}"):
            text = root.read(f"{path}/{child}/{f}") or ""
            out[child] = {int(x) for x in text.split()}
    return out


def remove(root: HostRoot, name: str, *, wait: float = 5.0) -> None:
    """Remove the partition's cgroup, and the base when it is the last.  Threads still in it (a
    QEMU left by a killed run that is still alive) go back to the hierarchy's root first."""
    h = find_hierarchy(root)
    if h is None:
        return
    base = f"{h.mount}/{base_name()}"
    top = f"{base}/{name}"
    if not root.is_dir(top):
        return
    deadline = time.monotonic() + wait
    for child in [*root.listdir(top), ""]:
        path = f"{top}/{child}" if child else top
        if child and not root.is_dir(path):
            continue
        # An exited QEMU's threads leave the cgroup a moment after it is reaped.
        _empty_and_remove(
            root, h, path, f"{h.mount}/{'cgroup.procs' if h.v2 else 'tasks'}", deadline
        )
    if not [c for c in root.listdir(base) if root.is_dir(f"{base}/{c}")]:
        with contextlib.suppress(OSError):
            os.rmdir(root.path(base))


def _empty_and_remove(root: HostRoot, h: Hierarchy, path: str, to: str, deadline: float) -> None:
    """Move the threads still in cgroup ``path`` to the tasks file ``to``, then remove it,
    waiting until ``deadline`` while the kernel says it is busy (threads of an ended process
    leave a moment later)."""
    for tid in (root.read(f"{path}/{h.tasks_file}") or "").split():
        with contextlib.suppress(OSError):
            root.write(to, tid)
    while True:
        try:
            os.rmdir(root.path(path))
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno_mod.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def fence(root: HostRoot, rec: PartitionRecord, reserve: CpuSet) -> str | None:
    """Put a just-started partition's QEMU in its cgroup (the hook ``Start`` calls)."""
    if rec.pid is None:
        return None
    try:
        return place(root, rec.name, rec.pid, rec.vcpu_threads, rec.placement.cpus, reserve)
    except OSError as e:
        raise GuestError(
            f"{rec.name}: its QEMU could not be put in a cgroup of its own "
            f"({e.filename or 'cgroup'}: {e.strerror}); is this run as root with cgroups mounted?"
        ) from e


def unfence(root: HostRoot, name: str) -> None:
    """Remove a stopped partition's cgroup (the hook ``Stop`` calls)."""
    try:
        remove(root, name)
    except OSError as e:
        raise GuestError(f"{name}: its cgroup could not be removed: {e}") from e


def add_vcpu(root: HostRoot, name: str, index: int, tid: int, cpu: int) -> str | None:
    """A vCPU added to a running partition: its ``vcpuN`` child made (the partition's cgroup
    widened to its CPU first) and its thread moved in.  Returns the child's kernel path
    (None: the partition has no cgroup here).  Idempotent."""
    h = find_hierarchy(root)
    if h is None:
        return None
    top = cgroup_path(h, name)
    if not root.is_dir(top):
        return None
    child = f"{top}/vcpu{index}"
    if h.cpuset:
        have = CpuSet.lenient(root.read(f"{top}/cpuset.cpus")) or CpuSet()
        if cpu not in have:
            root.write(f"{top}/cpuset.cpus", str(have | CpuSet([cpu])))
    _mkdir(root, child)
    if h.v2 and (root.read(f"{child}/cgroup.type") or "").strip() != "threaded":
        root.write(f"{child}/cgroup.type", "threaded")
    if h.cpuset:
        root.write(f"{child}/cpuset.cpus", str(cpu))
        if not h.v2:
            root.write(f"{child}/cpuset.mems", root.read(f"{top}/cpuset.mems") or "")
    root.write(f"{child}/{h.tasks_file}", str(tid))
    return child


def remove_vcpu(root: HostRoot, name: str, index: int, *, wait: float = 5.0) -> None:
    """A vCPU taken from a running partition: its ``vcpuN`` child removed (a thread still in
    it goes to ``emulator``) and the partition's cgroup narrowed to the CPUs it keeps.
    Idempotent."""
    h = find_hierarchy(root)
    if h is None:
        return
    top = cgroup_path(h, name)
    child = f"{top}/vcpu{index}"
    if root.is_dir(child):
        # The unplugged vCPU's thread leaves a moment after QEMU ends it.
        _empty_and_remove(root, h, child, f"{top}/emulator/{h.tasks_file}", time.monotonic() + wait)
    if h.cpuset and root.is_dir(top):
        keep = CpuSet()
        for c in root.listdir(top):
            if (c.startswith("vcpu") or c == "emulator") and root.is_dir(f"{top}/{c}"):
                keep = keep | (CpuSet.lenient(root.read(f"{top}/{c}/cpuset.cpus")) or CpuSet())
        if keep:
            root.write(f"{top}/cpuset.cpus", str(keep))
