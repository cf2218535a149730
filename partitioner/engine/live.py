"""The live steps (rule 11): CPUs, memory and devices added to and taken from a running guest.

Each step knows the placement before it and after it.  ``do`` records the change as
an intent (:class:`~partitioner.record.model.LiveIntent`) and saves the record, then
asks QEMU, then records the placement after it; ``undo`` asks for the opposite.  A
command killed between the two saves leaves the intent, and the next run takes what
the guest really has from QEMU (:func:`settle_from_guest`, which reconciliation
calls too).

- A vCPU is added with the guest paused, pinned to its host CPU and moved into the
  partition's cgroup before the guest may run it; a removed one is asked of the
  guest (``device_del``), waited for, and its CPU given back.
- Memory grows by reserving pages on the node first (a hugepage step before this
  one), then raising the node's virtio-mem ``requested-size`` and waiting until the
  guest has plugged it; it shrinks the other way round.
- A device's group is claimed (the claim step before this one), exposed to a
  confined QEMU inside its root, and hot-plugged into a spare slot; on removal it is
  unplugged, waited for, withdrawn, and given back (the release step after this).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from partitioner.cpuset import CpuSet
from partitioner.engine.context import ApplyContext
from partitioner.engine.step import Step
from partitioner.errors import ApplyFailed, GuestError
from partitioner.isolation.cgroup import add_vcpu, remove_vcpu
from partitioner.killpoint import point
from partitioner.planning.model import DeviceAssignment, Placement
from partitioner.record.model import LiveIntent, PartitionRecord, RunState
from partitioner.units import format_size, page_size_name

if TYPE_CHECKING:
    from partitioner.guest.qmp import Qmp


def _record(ctx: ApplyContext, name: str) -> PartitionRecord:
    rec = ctx.state.partitions.get(name)
    if rec is None or rec.state is not RunState.RUNNING or rec.pid is None:
        raise ApplyFailed(
            f"partition {name} is not running: a live change needs its guest running "
            "(start it, or apply with --replace)"
        )
    return rec


@contextlib.contextmanager
def _qmp(ctx: ApplyContext, rec: PartitionRecord) -> Iterator[Qmp]:
    from partitioner.guest.argv import GuestPaths
    from partitioner.guest.qmp import Qmp

    if not rec.paths:
        raise ApplyFailed(f"partition {rec.name}: the record names no QMP socket")
    paths = GuestPaths.from_json(dict(rec.paths))
    with Qmp(paths.qmp, timeout=max(10.0, ctx.live_timeout), partition=rec.name) as qmp:
        yield qmp


def _intent(ctx: ApplyContext, name: str, op: str, after: Placement, *, resume: bool) -> None:
    rec = ctx.state.partitions[name]
    ctx.update(replace(rec, live=LiveIntent(op, after, resume)))
    ctx.commit()


def _done(ctx: ApplyContext, name: str, placement: Placement, **fields: object) -> None:
    rec = ctx.state.partitions[name]
    ctx.update(replace(rec, placement=placement, live=None, **fields))  # type: ignore[arg-type]


def settle_from_guest(ctx: ApplyContext, name: str) -> None:
    """Record what the guest really has after a live change that failed half-way, and drop
    the intent (the one rule reconciliation follows too)."""
    from partitioner.guest.view import observe
    from partitioner.record.reconcile import seen_placement

    rec = ctx.state.partitions[name]
    if rec.live is None:
        return
    with _qmp(ctx, rec) as qmp:
        view = observe(qmp)
    placement = seen_placement(rec.placement, rec.live.after, view)
    threads = {i: t for i, t in view.vcpus.items() if i < len(placement.cpus)}
    _done(ctx, name, placement, vcpu_threads=threads)
    ctx.commit()


@dataclass(frozen=True)
class LiveStep(Step):
    """A live change: listed as ``KIND NAME DETAIL`` (``add-cpus db0 4 -> 6 (CPUs 12-13, pinned)``)."""

    target: str
    before: Placement
    after: Placement

    def __str__(self) -> str:
        return f"{self.kind} {self.target} {self.detail}"

    def ending_at(self, after: Placement) -> LiveStep:
        """This step with the placement it leaves replaced (the last of a change ends at the plan's)."""
        return replace(self, after=after)

    def check(self, ctx: ApplyContext) -> bool:
        rec = ctx.state.partitions.get(self.target)
        return rec is not None and rec.live is None and self._shows(rec.placement, self.after)

    def _shows(self, have: Placement, want: Placement) -> bool:
        raise NotImplementedError

    def do(self, ctx: ApplyContext) -> None:
        raise NotImplementedError

    def undo(self, ctx: ApplyContext) -> None:
        raise NotImplementedError

    def _failed(self, ctx: ApplyContext) -> None:
        with contextlib.suppress(GuestError, OSError, ApplyFailed):
            settle_from_guest(ctx, self.target)


# -- CPUs ------------------------------------------------------------------------


def _plug(
    ctx: ApplyContext, rec: PartitionRecord, added: tuple[tuple[int, int], ...]
) -> dict[int, int]:
    """Plug the vCPUs ``added`` (index, host CPU) with the guest paused; each pinned and in the
    partition's cgroup before the guest runs again.  Returns index -> thread id."""
    from partitioner.guest.live import paused, plug_cpu

    threads: dict[int, int] = {}
    with _qmp(ctx, rec) as qmp, paused(qmp):
        for index, cpu in added:
            tid = plug_cpu(qmp, index)
            point("cpu-plugged")
            # Into its own cgroup first: the thread was born in the emulator's, whose cpuset
            # does not hold the partition's CPUs (the kernel refuses that affinity there).
            add_vcpu(ctx.root, rec.name, index, tid, cpu)
            try:
                os.sched_setaffinity(tid, {cpu})
            except OSError as e:
                raise GuestError(
                    f"cannot pin the new vCPU {index} (thread {tid}) of partition {rec.name} "
                    f"to CPU {cpu}: {e.strerror}",
                    partition=rec.name,
                ) from e
            threads[index] = tid
    return threads


def _unplug(ctx: ApplyContext, rec: PartitionRecord, vcpus: tuple[int, ...]) -> None:
    from partitioner.guest.live import unplug_cpu

    with _qmp(ctx, rec) as qmp:
        for index in sorted(vcpus, reverse=True):
            unplug_cpu(qmp, index, ctx.live_timeout)
            point("cpu-unplugged")
            remove_vcpu(ctx.root, rec.name, index)


def _is_running(ctx: ApplyContext, rec: PartitionRecord) -> bool:
    with _qmp(ctx, rec) as qmp:
        return bool(qmp.status() == "running")


def _add_vcpus(
    step: LiveStep, ctx: ApplyContext, to: Placement, added: tuple[tuple[int, int], ...]
) -> None:
    """Plug ``added`` (index, host CPU) into ``step``'s partition, which ends placed as ``to``:
    the intent first, the record of the threads after (a failure half-way records what the
    guest has)."""
    rec = _record(ctx, step.target)
    _intent(ctx, step.target, "add-cpus", to, resume=_is_running(ctx, rec))
    try:
        threads = _plug(ctx, rec, added)
    except BaseException:
        step._failed(ctx)
        raise
    point("live-changed")
    rec = ctx.state.partitions[step.target]
    _done(ctx, step.target, to, vcpu_threads={**rec.vcpu_threads, **threads})


def _remove_vcpus(step: LiveStep, ctx: ApplyContext, to: Placement, gone: tuple[int, ...]) -> None:
    """Unplug the vCPUs ``gone`` from ``step``'s partition, which ends placed as ``to``."""
    rec = _record(ctx, step.target)
    _intent(ctx, step.target, "remove-cpus", to, resume=False)
    try:
        _unplug(ctx, rec, gone)
    except BaseException:
        step._failed(ctx)
        raise
    point("live-changed")
    rec = ctx.state.partitions[step.target]
    threads = {i: t for i, t in rec.vcpu_threads.items() if i not in gone}
    _done(ctx, step.target, to, vcpu_threads=threads)


def _beyond(longer: Placement, shorter: Placement) -> tuple[tuple[int, int], ...]:
    """(index, host CPU) of the vCPUs ``longer`` has and ``shorter`` has not."""
    n = len(shorter.cpus)
    return tuple((i, c) for i, c in enumerate(longer.cpus) if i >= n)


@dataclass(frozen=True)
class AddCpus(LiveStep):
    target: str
    before: Placement
    after: Placement
    kind: str = "add-cpus"

    @property
    def added(self) -> tuple[tuple[int, int], ...]:
        return _beyond(self.after, self.before)

    @property
    def detail(self) -> str:
        cpus = CpuSet(c for _, c in self.added)
        return f"{len(self.before.cpus)} -> {len(self.after.cpus)} (CPUs {cpus}, pinned)"

    def _shows(self, have: Placement, want: Placement) -> bool:
        return have.cpus == want.cpus

    def do(self, ctx: ApplyContext) -> None:
        _add_vcpus(self, ctx, self.after, self.added)

    def undo(self, ctx: ApplyContext) -> None:
        have = len(_record(ctx, self.target).placement.cpus)
        gone = tuple(i for i, _ in self.added if i < have)
        if gone:
            _remove_vcpus(self, ctx, self.before, gone)


@dataclass(frozen=True)
class RemoveCpus(LiveStep):
    target: str
    before: Placement
    after: Placement
    kind: str = "remove-cpus"

    @property
    def removed(self) -> tuple[tuple[int, int], ...]:
        return _beyond(self.before, self.after)

    @property
    def detail(self) -> str:
        cpus = CpuSet(c for _, c in self.removed)
        return f"{len(self.before.cpus)} -> {len(self.after.cpus)} (CPUs {cpus} given back)"

    def _shows(self, have: Placement, want: Placement) -> bool:
        return have.cpus == want.cpus

    def do(self, ctx: ApplyContext) -> None:
        _remove_vcpus(self, ctx, self.after, tuple(i for i, _ in self.removed))

    def undo(self, ctx: ApplyContext) -> None:
        have = len(_record(ctx, self.target).placement.cpus)
        back = tuple((i, c) for i, c in self.removed if i >= have)
        if back:
            _add_vcpus(self, ctx, self.before, back)


# -- memory ----------------------------------------------------------------------


def _node_bytes(p: Placement, node: int) -> int:
    return sum(b for n, b in p.memory_per_node if n == node)


def _resize(ctx: ApplyContext, rec: PartitionRecord, want: Placement, node: int) -> None:
    from partitioner.guest.live import set_memory

    plugged = dict(want.plugged_per_node).get(node, 0)
    with _qmp(ctx, rec) as qmp:
        set_memory(qmp, node, plugged, ctx.live_timeout)


@dataclass(frozen=True)
class _Memory(LiveStep):
    target: str
    before: Placement
    after: Placement
    node: int

    @property
    def detail(self) -> str:
        old, new = _node_bytes(self.before, self.node), _node_bytes(self.after, self.node)
        said = f"{format_size(self.before.memory_bytes)} -> {format_size(self.after.memory_bytes)}"
        if self.after.hugepage_bytes:
            pages = abs(new - old) // self.after.hugepage_bytes
            size = page_size_name(self.after.hugepage_bytes)
            return f"{said} (node {self.node}, {pages} x {size} pages)"
        return f"{said} (node {self.node})"

    def _shows(self, have: Placement, want: Placement) -> bool:
        return _node_bytes(have, self.node) == _node_bytes(want, self.node)

    def do(self, ctx: ApplyContext) -> None:
        rec = _record(ctx, self.target)
        _intent(ctx, self.target, self.kind, self.after, resume=False)
        try:
            _resize(ctx, rec, self.after, self.node)
        except BaseException:
            self._failed(ctx)
            raise
        point("live-changed")
        _done(ctx, self.target, self.after)

    def undo(self, ctx: ApplyContext) -> None:
        rec = _record(ctx, self.target)
        if _node_bytes(rec.placement, self.node) == _node_bytes(self.before, self.node):
            return
        _intent(ctx, self.target, self.kind, self.before, resume=False)
        _resize(ctx, rec, self.before, self.node)
        _done(ctx, self.target, self.before)


@dataclass(frozen=True)
class GrowMemory(_Memory):
    kind: str = "grow-memory"


@dataclass(frozen=True)
class ShrinkMemory(_Memory):
    kind: str = "shrink-memory"


# -- devices ---------------------------------------------------------------------


def _chroot(ctx: ApplyContext, rec: PartitionRecord) -> Path | None:
    """The confined QEMU's root, where a device hot-plugged later must be exposed (None:
    the partition runs unconfined and opens host paths itself)."""
    from partitioner.guest.argv import GuestPaths

    if rec.uid is None or not rec.paths:
        return None
    return GuestPaths.from_json(dict(rec.paths)).chroot


@dataclass(frozen=True)
class AttachDevice(LiveStep):
    target: str
    before: Placement
    after: Placement
    group: int
    kind: str = "attach-device"

    @property
    def devices(self) -> tuple[DeviceAssignment, ...]:
        return tuple(d for d in self.after.devices if d.iommu_group == self.group)

    @property
    def detail(self) -> str:
        return ", ".join(str(d.address) for d in self.devices)

    def _shows(self, have: Placement, want: Placement) -> bool:
        return self.group in have.iommu_groups

    def do(self, ctx: ApplyContext) -> None:
        from partitioner.guest.argv import hotplug_device_id
        from partitioner.guest.jail import expose_device
        from partitioner.guest.live import attach_vfio
        from partitioner.guest.view import vfio_devices

        rec = _record(ctx, self.target)
        _intent(ctx, self.target, self.kind, self.after, resume=False)
        try:
            jail = _chroot(ctx, rec)
            with _qmp(ctx, rec) as qmp:
                have = vfio_devices(qmp)
                for d in self.devices:
                    if str(d.address) in have:
                        continue
                    slot = self.after.hotplug_slot(str(d.address))
                    if slot is None:
                        raise ApplyFailed(
                            f"partition {self.target}: no spare slot is planned for {d.address}"
                        )
                    if jail is not None and rec.uid is not None and d.iommu_group is not None:
                        expose_device(ctx.root, jail, rec.uid, str(d.address), d.iommu_group)
                    attach_vfio(qmp, str(d.address), f"hp{slot}", hotplug_device_id(slot))
                    point("device-plugged")
        except BaseException:
            self._failed(ctx)
            raise
        point("live-changed")
        _done(ctx, self.target, self.after)

    def undo(self, ctx: ApplyContext) -> None:
        rec = _record(ctx, self.target)
        _intent(ctx, self.target, "detach-device", self.before, resume=False)
        _unplug_devices(ctx, rec, self.devices)
        _done(ctx, self.target, self.before)


def _unplug_devices(
    ctx: ApplyContext, rec: PartitionRecord, devices: tuple[DeviceAssignment, ...]
) -> None:
    from partitioner.guest.jail import withdraw_device
    from partitioner.guest.live import detach_device
    from partitioner.guest.view import vfio_devices

    jail = _chroot(ctx, rec)
    with _qmp(ctx, rec) as qmp:
        have = vfio_devices(qmp)
        for d in devices:
            dev_id = have.get(str(d.address))
            if dev_id is not None:
                detach_device(qmp, dev_id, ctx.live_timeout)
                point("device-unplugged")
        for d in devices:
            if jail is not None and d.iommu_group is not None:
                withdraw_device(ctx.root, jail, str(d.address), d.iommu_group)


@dataclass(frozen=True)
class DetachDevice(LiveStep):
    target: str
    before: Placement
    after: Placement
    group: int
    kind: str = "detach-device"

    @property
    def devices(self) -> tuple[DeviceAssignment, ...]:
        return tuple(d for d in self.before.devices if d.iommu_group == self.group)

    @property
    def detail(self) -> str:
        return ", ".join(str(d.address) for d in self.devices)

    def _shows(self, have: Placement, want: Placement) -> bool:
        return self.group not in have.iommu_groups

    def do(self, ctx: ApplyContext) -> None:
        rec = _record(ctx, self.target)
        _intent(ctx, self.target, self.kind, self.after, resume=False)
        try:
            _unplug_devices(ctx, rec, self.devices)
        except BaseException:
            self._failed(ctx)
            raise
        point("live-changed")
        _done(ctx, self.target, self.after)

    def undo(self, ctx: ApplyContext) -> None:
        AttachDevice(self.target, self.after, self.before, self.group).do(ctx)


@dataclass(frozen=True)
class Rerecord(LiveStep):
    """A running partition whose plan differs only in how it is written down (its devices
    listed in another order): the record takes the plan's placement; the guest is not asked."""

    target: str
    before: Placement
    after: Placement
    kind: str = "record"

    @property
    def detail(self) -> str:
        return "(the guest keeps what it has)"

    def _shows(self, have: Placement, want: Placement) -> bool:
        return have == want

    def do(self, ctx: ApplyContext) -> None:
        _done(ctx, self.target, self.after)

    def undo(self, ctx: ApplyContext) -> None:
        _done(ctx, self.target, self.before)
