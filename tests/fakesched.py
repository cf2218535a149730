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

from treebuilder import TreeBuilder

from partitioner.cpuset import CpuSet
from partitioner.hostroot import HostRoot
from partitioner.isolation.view import PF_KTHREAD, PF_NO_SETAFFINITY, format_mask

_IRQ = re.compile(r"^/proc/irq/(\d+)/smp_affinity_list$")
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
        fields = ["S", "1", str(pid), str(pid), "0", "-1", str(flags)] + ["0"] * 12 + [str(starttime)]
        base = f"/proc/{pid}/task/{tid}"
        self._put(f"{base}/stat", f"{tid} ({comm}) " + " ".join(fields + ["0"] * 10))
        self._set_allowed(base, CpuSet.parse(allowed))
        if tid == pid:
            self._put(f"/proc/{pid}/comm", comm)
        return self

    def _set_allowed(self, base: str, cpus: CpuSet) -> None:
        self._put(
            f"{base}/status",
            f"Name:\tx\nCpus_allowed:\t{format_mask(cpus)}\nCpus_allowed_list:\t{cpus}\n",
        )

    def irq(self, n: int, affinity: str, actions: str = "", *, effective: str | None = None) -> SchedKernel:
        cpus = CpuSet.parse(affinity)
        self._put(f"/proc/irq/{n}/smp_affinity_list", str(cpus))
        self._put(f"/proc/irq/{n}/smp_affinity", format_mask(cpus))
        eff = CpuSet.parse(effective) if effective is not None else CpuSet([min(cpus & self.online)])
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
