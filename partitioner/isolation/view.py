"""What runs where on the host, read through the HostRoot: tasks, interrupts, the workqueue mask.

Everything here is a read; the snapshot it returns is what :mod:`moves` plans on and
what ``audit`` judges, so both can be tested against trees.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from partitioner.cpuset import CpuListSyntaxError, CpuSet
from partitioner.kernel import sysfs
from partitioner.kernel.root import HostRoot

# include/linux/sched.h
PF_KTHREAD = 0x00200000
PF_NO_SETAFFINITY = 0x04000000

WORKQUEUE_MASK = sysfs.WORKQUEUE_CPUMASK
DEFAULT_IRQ_AFFINITY = sysfs.IRQ_DEFAULT_AFFINITY

# vfio-pci names its interrupt handlers "vfio-msix[3](0000:00:03.0)", "vfio-msi[0](...)",
# "vfio-intx(...)" (drivers/vfio/pci/vfio_pci_intrs.c).
_VFIO_ACTION = re.compile(
    r"^vfio-(?:msix|msi|intx)(?:\[\d+\])?\(([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])\)$"
)


@dataclass(frozen=True)
class Task:
    tid: int
    pid: int  # its thread group (process)
    comm: str
    starttime: int  # clock ticks after boot: with tid, names the task across pid reuse
    flags: int
    allowed: CpuSet

    @property
    def kthread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)

    @property
    def movable(self) -> bool:
        """False for what the kernel keeps where it is (per-CPU kernel threads): EINVAL on a move."""
        return not self.flags & PF_NO_SETAFFINITY


@dataclass(frozen=True)
class Irq:
    irq: int
    affinity: CpuSet  # smp_affinity_list: what was asked
    effective: CpuSet | None  # effective_affinity_list where the kernel has it
    actions: tuple[str, ...]  # handler names: who owns it

    @property
    def owner(self) -> str:
        return ",".join(self.actions) or "-"

    def vfio_device(self) -> str | None:
        for a in self.actions:
            m = _VFIO_ACTION.match(a)
            if m:
                return m.group(1)
        return None

    @property
    def where(self) -> CpuSet:
        return self.effective if self.effective is not None else self.affinity


@dataclass(frozen=True)
class HostWork:
    tasks: tuple[Task, ...]
    irqs: tuple[Irq, ...]
    workqueue_mask: CpuSet | None  # None: the kernel has no unbound workqueue mask file
    default_irq_affinity: CpuSet | None
    online: CpuSet


def _mask(text: str | None) -> CpuSet | None:
    if text is None:
        return None
    try:
        return CpuSet.from_mask(text)
    except (CpuListSyntaxError, ValueError):
        return None


def read_task(root: HostRoot, pid: int, tid: int) -> Task | None:
    """One task from /proc/PID/task/TID, or None if it is gone (tasks come and go while read)."""
    base = sysfs.task(pid, tid)
    stat = root.read(f"{base}/stat")
    status = root.read(f"{base}/status")
    if stat is None or status is None:
        return None
    try:
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        # Fields from 3 (state) on: flags is field 9, starttime field 22 (proc(5)).
        flags = int(fields[9 - 3])
        starttime = int(fields[22 - 3])
    except (ValueError, IndexError):
        return None
    allowed = None
    for line in status.splitlines():
        if line.startswith("Cpus_allowed_list:"):
            allowed = CpuSet.lenient(line.split(":", 1)[1].strip())
    if allowed is None:
        return None
    return Task(tid=tid, pid=pid, comm=comm, starttime=starttime, flags=flags, allowed=allowed)


def process_threads(root: HostRoot, pid: int) -> list[Task]:
    out = []
    for t in root.listdir(sysfs.task(pid)):
        if t.isdigit():
            task = read_task(root, pid, int(t))
            if task is not None:
                out.append(task)
    return out


def read_tasks(root: HostRoot) -> list[Task]:
    out: list[Task] = []
    for p in root.listdir(sysfs.PROC):
        if p.isdigit():
            out.extend(process_threads(root, int(p)))
    return sorted(out, key=lambda t: t.tid)


def read_irqs(root: HostRoot) -> list[Irq]:
    out = []
    for n in root.listdir(sysfs.PROC_IRQ):
        if not n.isdigit():
            continue
        aff = CpuSet.lenient(root.read(sysfs.proc_irq(n, "smp_affinity_list")))
        if aff is None:
            continue
        eff = CpuSet.lenient(root.read(sysfs.proc_irq(n, "effective_affinity_list")))
        actions_text = root.read(sysfs.irq(n, "actions"))
        if actions_text is not None:
            actions = tuple(a for a in actions_text.split(",") if a)
        else:
            # /proc/irq/N/ has a directory per handler, named after it.
            actions = tuple(
                e for e in root.listdir(sysfs.proc_irq(n)) if root.is_dir(sysfs.proc_irq(n, e))
            )
        out.append(Irq(int(n), aff, eff, actions))
    return sorted(out, key=lambda i: i.irq)


def read_online(root: HostRoot) -> CpuSet:
    return CpuSet.lenient(root.read(sysfs.CPU_ONLINE)) or CpuSet()


def read_host_work(root: HostRoot) -> HostWork:
    return HostWork(
        tasks=tuple(read_tasks(root)),
        irqs=tuple(read_irqs(root)),
        workqueue_mask=_mask(root.read(WORKQUEUE_MASK)),
        default_irq_affinity=_mask(root.read(DEFAULT_IRQ_AFFINITY)),
        online=read_online(root),
    )


def format_mask(cpus: CpuSet) -> str:
    """A cpumask in the kernel's hex syntax, 32-bit words separated by commas ("ff,00000003")."""
    value = 0
    for c in cpus:
        value |= 1 << c
    words = []
    while True:
        words.append(value & 0xFFFFFFFF)
        value >>= 32
        if not value:
            break
    head, *rest = reversed(words)
    return ",".join([f"{head:x}", *(f"{w:08x}" for w in rest)])


def running_processes(root: HostRoot) -> Mapping[int, str]:
    """pid -> comm of every process (for irqbalance and the like)."""
    out = {}
    for p in root.listdir(sysfs.PROC):
        if p.isdigit():
            comm = root.read(sysfs.proc(p, "comm"))
            if comm is not None:
                out[int(p)] = comm
    return out
