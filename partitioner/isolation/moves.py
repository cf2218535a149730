"""What moves where: a pure function of the layout and of what runs on the host now.

Each move names the value it replaces, so the runtime actions can record it and put
it back.  Tasks the kernel will not move (per-CPU kernel threads) are not moves but
findings: only the boot-time settings can take them off a partition's CPUs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from partitioner.cpuset import CpuSet
from partitioner.isolation.layout import Layout, PartitionCpus
from partitioner.isolation.view import DEFAULT_IRQ_AFFINITY, WORKQUEUE_MASK, HostWork, Irq, Task


@dataclass(frozen=True)
class TaskMove:
    tid: int
    pid: int
    comm: str
    starttime: int
    old: CpuSet
    new: CpuSet


@dataclass(frozen=True)
class IrqMove:
    irq: int
    owner: str
    old: CpuSet
    new: CpuSet


@dataclass(frozen=True)
class MaskMove:
    path: str  # the unbound workqueue cpumask, or default_smp_affinity
    old: CpuSet
    new: CpuSet


@dataclass(frozen=True)
class Moves:
    tasks: tuple[TaskMove, ...]
    irqs: tuple[IrqMove, ...]
    masks: tuple[MaskMove, ...]
    pinned_by_kernel: tuple[Task, ...]  # on a partition CPU, and the kernel refuses to move them

    def __bool__(self) -> bool:
        return bool(self.tasks or self.irqs or self.masks)

    def count(self) -> int:
        return len(self.tasks) + len(self.irqs) + len(self.masks)


def _off(cpus: CpuSet, layout: Layout) -> CpuSet:
    """Where host work that may run on ``cpus`` goes: the part of them in the reserve, else all of it."""
    kept = cpus & layout.reserve
    return kept if kept else layout.reserve


def irq_owner(irq: Irq, layout: Layout) -> PartitionCpus | None:
    """The partition whose device the interrupt is, or None for the host's interrupts."""
    dev = irq.vfio_device()
    return layout.owner_of_device(dev) if dev is not None else None


def irq_target(irq: Irq, layout: Layout) -> CpuSet | None:
    """The CPUs a partition's own device interrupt belongs on, or None for the host's interrupts."""
    owner = irq_owner(irq, layout)
    return owner.cpus if owner is not None else None


def own_irq_moves(
    layout: Layout, irqs: Iterable[Irq], refused_irqs: frozenset[int] = frozenset()
) -> list[tuple[str, IrqMove]]:
    """The partitions' own device interrupts that are not on their partition's CPUs, each with
    the partition's name."""
    out = []
    for i in irqs:
        owner = irq_owner(i, layout)
        if owner is not None and i.irq not in refused_irqs and i.affinity != owner.cpus:
            out.append((owner.name, IrqMove(i.irq, i.owner, i.affinity, owner.cpus)))
    return out


def plan_moves(
    layout: Layout,
    work: HostWork,
    guests: Mapping[int, str],
    *,
    refused_irqs: frozenset[int] = frozenset(),
) -> Moves:
    """Every change that takes the host's work off the partitions' CPUs.

    ``guests`` maps the pid of each running partition's QEMU to its name: its threads are
    already placed (vCPUs on their CPUs, the emulator on the reserve) and are not moved.
    ``refused_irqs`` are interrupts the kernel already refused to move: not asked again.
    """
    fenced = layout.partition_cpus
    tasks: list[TaskMove] = []
    unmovable: list[Task] = []
    for t in work.tasks:
        if t.pid in guests or t.allowed.isdisjoint(fenced):
            continue
        if not t.movable:
            unmovable.append(t)
            continue
        tasks.append(
            TaskMove(t.tid, t.pid, t.comm, t.starttime, t.allowed, _off(t.allowed, layout))
        )
    irqs = [m for _, m in own_irq_moves(layout, work.irqs, refused_irqs)]
    irqs += [
        IrqMove(i.irq, i.owner, i.affinity, _off(i.affinity, layout))
        for i in work.irqs
        if i.irq not in refused_irqs
        and irq_owner(i, layout) is None
        and not i.affinity.isdisjoint(fenced)
    ]
    masks: list[MaskMove] = []
    for path, mask in (
        (WORKQUEUE_MASK, work.workqueue_mask),
        (DEFAULT_IRQ_AFFINITY, work.default_irq_affinity),
    ):
        if mask is not None and not mask.isdisjoint(fenced):
            masks.append(MaskMove(path, mask, _off(mask, layout)))
    return Moves(tuple(tasks), tuple(irqs), tuple(masks), tuple(unmovable))
