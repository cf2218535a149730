"""A HostRoot that plays the kernel's scheduler and interrupt core on a tree, for isolation's tests.

The code under test moves tasks with ``sched_setaffinity`` and interrupts, the
unbound workqueue mask and ``default_smp_affinity`` with writes, as on a live host;
this class answers the way the kernel does:

- ``sched_setaffinity(tid, cpus)``: ESRCH for a task that is not there, EINVAL
  for a task with ``PF_NO_SETAFFINITY`` (per-CPU kernel threads,
  ``kernel/sched/core.c``) and for a set with no online CPU; otherwise the
  task's ``Cpus_allowed_list`` (and ``Cpus_allowed``) change.
- ``/proc/irq/N/smp_affinity_list``: EIO for an interrupt the kernel manages or
  cannot move (``irq_can_set_affinity_usr()`` false, ``kernel/irq/proc.c``),
  EINVAL for a set with no online CPU, ENOENT for an interrupt that is gone;
  otherwise both ``smp_affinity_list`` and ``smp_affinity`` change, and
  ``effective_affinity_list`` becomes the first online CPU of the set (x86's
  vector domain targets one CPU).
- ``/proc/irq/default_smp_affinity``, ``/sys/devices/virtual/workqueue/cpumask``:
  hex masks; EINVAL when no online CPU is in them.

Failures are injected with :meth:`refuse` (an errno for one task or interrupt)
and :meth:`die_after` (the process is killed after N writes: a ``Killed``
exception stands for SIGKILL, nothing after it runs).
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from treebuilder import TreeBuilder

from partitioner.cpuset import CpuSet
from partitioner.isolation.view import PF_KTHREAD, PF_NO_SETAFFINITY, format_mask
from partitioner.kernel.root import HostRoot

_IRQ = re.compile(r"^/proc/irq/(\d+)/smp_affinity_list$")
NIC = "0000:81:00.0"
WQ, DEFAULT = "/sys/devices/virtual/workqueue/cpumask", "/proc/irq/default_smp_affinity"
MASKS = ("/proc/irq/default_smp_affinity", "/sys/devices/virtual/workqueue/cpumask")


class Killed(BaseException):
    """SIGKILL, as a test sees it: raised from a write, caught by nobody in the code under test."""


class SchedKernel(HostRoot):
    def __init__(self, tree: TreeBuilder, online: str) -> None:
        super().__init__(tree.root)
        self.tree = tree
        self.online = CpuSet.parse(online)
        self._put("/sys/devices/system/cpu/online", online)
        self.refusals: dict[tuple[str, int], int] = {}
        self.writes = 0
        self._die_at: int | None = None
        self.irq_refusals_on_restore: set[int] = set()

    # -- building the tree ---------------------------------------------------

    def _put(self, kernel_path: str, text: str) -> None:
        p = self.path(kernel_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text + "\n")

    def task(
        self,
        pid: int,
        comm: str,
        allowed: str,
        *,
        tid: int | None = None,
        kthread: bool = False,
        percpu: bool = False,
        starttime: int = 100,
    ) -> SchedKernel:
        tid = pid if tid is None else tid
        flags = (PF_KTHREAD if kthread else 0) | (PF_NO_SETAFFINITY if percpu else 0)
        # proc(5): pid (comm) state ppid pgrp session tty tpgid flags ... starttime is field 22.
        fields = (
            ["S", "1", str(pid), str(pid), "0", "-1", str(flags)] + ["0"] * 12 + [str(starttime)]
        )
        base = f"/proc/{pid}/task/{tid}"
        stat = f"{tid} ({comm}) " + " ".join(fields + ["0"] * 10)
        self._put(f"{base}/stat", stat)
        self._set_allowed(base, CpuSet.parse(allowed))
        if tid == pid:
            self._put(f"/proc/{pid}/comm", comm)
            self._put(f"/proc/{pid}/stat", stat)
        return self

    def _set_allowed(self, base: str, cpus: CpuSet) -> None:
        self._put(
            f"{base}/status",
            f"Name:\tx\nCpus_allowed:\t{format_mask(cpus)}\nCpus_allowed_list:\t{cpus}\n",
        )

    def irq(
        self, n: int, affinity: str, actions: str = "", *, effective: str | None = None
    ) -> SchedKernel:
        cpus = CpuSet.parse(affinity)
        self._put(f"/proc/irq/{n}/smp_affinity_list", str(cpus))
        self._put(f"/proc/irq/{n}/smp_affinity", format_mask(cpus))
        eff = (
            CpuSet.parse(effective) if effective is not None else CpuSet([min(cpus & self.online)])
        )
        self._put(f"/proc/irq/{n}/effective_affinity_list", str(eff))
        self._put(f"/sys/kernel/irq/{n}/actions", actions)
        return self

    def mask(self, path: str, cpus: str) -> SchedKernel:
        self._put(path, format_mask(CpuSet.parse(cpus)))
        return self

    def refuse(self, kind: str, ident: int, code: int) -> None:
        self.refusals[(kind, ident)] = code

    def die_after(self, writes: int) -> None:
        self._die_at = self.writes + writes

    def _count(self) -> None:
        if self._die_at is not None and self.writes >= self._die_at:
            self._die_at = None
            raise Killed()
        self.writes += 1

    # -- the kernel's part ---------------------------------------------------

    def _tid_dir(self, tid: int) -> str | None:
        for pid in self.listdir("/proc"):
            if pid.isdigit() and self.exists(f"/proc/{pid}/task/{tid}"):
                return f"/proc/{pid}/task/{tid}"
        return None

    def sched_setaffinity(self, tid: int, cpus: CpuSet) -> None:
        self._count()
        base = self._tid_dir(tid)
        if base is None:
            raise OSError(errno.ESRCH, os.strerror(errno.ESRCH))
        code = self.refusals.get(("task", tid))
        if code:
            raise OSError(code, os.strerror(code))
        stat = self.read(f"{base}/stat") or ""
        flags = int(stat[stat.rindex(")") + 2 :].split()[6])
        if flags & PF_NO_SETAFFINITY or not cpus & self.online:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        self._set_allowed(base, cpus)

    def write(self, kernel_path: str, value: str) -> None:
        m = _IRQ.match(kernel_path)
        if m:
            self._count()
            n = int(m.group(1))
            if not self.exists(kernel_path):
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), kernel_path)
            code = self.refusals.get(("irq", n))
            if code:
                raise OSError(code, os.strerror(code), kernel_path)
            cpus = CpuSet.parse(value.strip())
            if not cpus & self.online:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), kernel_path)
            self.irq(n, str(cpus), self.read(f"/sys/kernel/irq/{n}/actions") or "")
            return
        if kernel_path in MASKS:
            self._count()
            cpus = CpuSet.from_mask(value)
            if not cpus & self.online:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), kernel_path)
            self._put(kernel_path, format_mask(cpus))
            return
        raise AssertionError(f"isolation wrote {kernel_path!r}, which this fake does not play")


def small_host(root: Path) -> SchedKernel:
    """CPUs 0-3; the reserve is 0 and partition fw0 (pid 500, vCPUs 501-502) has 2-3 and NIC."""
    k = SchedKernel(TreeBuilder(root), "0-3")
    k.task(1, "init", "0-3")
    k.task(2, "kthreadd", "0-3", kthread=True)
    k.task(20, "ksoftirqd/2", "2", kthread=True, percpu=True)
    k.task(30, "kworker/u8:0", "0-3", kthread=True)
    k.task(100, "sshd", "0-3").task(100, "sshd", "0-3", tid=101)  # a thread too
    k.task(200, "pinned-to-0", "0")
    k.task(300, "pinned-to-3", "3")
    k.task(400, "half", "1-2")
    k.task(500, "qemu-fw0", "0").task(500, "CPU 0/TCG", "2", tid=501).task(
        500, "CPU 1/TCG", "3", tid=502
    )
    k.irq(0, "0-3", "timer")
    k.irq(24, "0-3", "ahci[0000:00:1f.2]")
    k.irq(25, "3", "eth0")
    k.irq(26, "0", "virtio0")
    k.irq(40, "0-3", f"vfio-msix[0]({NIC})")
    k.irq(41, "0-3", "vfio-msix[0](0000:42:00.0)")  # another device: the host's
    k.irq(50, "2", "nvme0q2")  # a managed queue interrupt
    k.mask(WQ, "0-3").mask(DEFAULT, "0-3")
    k.refuse("irq", 0, errno.EIO)
    k.refuse("irq", 50, errno.EIO)
    return k
