"""The device steps: a whole IOMMU group claimed for vfio-pci, and given back to its drivers.

Before any function is unbound, the drivers the group's functions have are saved
as a pending :class:`~partitioner.record.model.GroupClaim` (the intent), so a kill
during the claim is undone exactly once by the next run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from partitioner.engine.context import ApplyContext
from partitioner.engine.step import Step
from partitioner.errors import ApplyFailed
from partitioner.kernel import sysfs
from partitioner.kernel.root import HostRoot
from partitioner.killpoint import point
from partitioner.record.model import VFIO_PCI, GroupClaim, PartitionRecord, drop_claim
from partitioner.vfio.claim import claim_group, group_endpoints, record_function, release_group
from partitioner.vfio.ioctl import check_group


@dataclass(frozen=True)
class ClaimGroup(Step):
    target: str
    group: int
    functions: tuple[tuple[str, str | None], ...]  # (address, driver now) for the listing
    kind: str = "claim-group"

    @property
    def detail(self) -> str:
        fns = ", ".join(f"{a} ({d or 'no driver'} -> vfio-pci)" for a, d in self.functions)
        return f"IOMMU group {self.group}: {fns}"

    def do(self, ctx: ApplyContext) -> None:
        if ctx.host is None:
            raise ApplyFailed(f"claiming IOMMU group {self.group} needs the scanned host")
        placement = ctx.placement(self.target)
        none_ok = {str(d.address) for d in placement.devices if d.reset_none_ok}
        # A function without a reset of its own may be reset through its bus, when the
        # partition holds all that bus reaches: the placement's devices say what it holds.
        held = {str(d.address) for d in placement.devices}
        _claim_intent(ctx, self.target, self.group)
        try:
            # The plan's verdict asked again on the host as scanned now, reset methods
            # included, before anything is claimed (partitioner.vfio.preview).
            claim = claim_group(
                ctx.root, ctx.host, self.group, reset_none_ok=none_ok, partition=held
            )
        except BaseException:
            # claim_group gave back what it took: the intent is void.
            ctx.update(drop_claim(ctx.state.partitions[self.target], self.group))
            ctx.commit()
            raise
        point("group-claimed")
        rec = drop_claim(ctx.state.partitions[self.target], self.group)
        ctx.update(replace(rec, claims=(*rec.claims, claim)))
        try:
            # Ask the kernel itself before QEMU is started: a group that is not viable is
            # named here, not reported by QEMU later (docs/architecture.md).
            check_group(ctx.root, ctx.host, self.group, reset_none_ok=none_ok, partition=held)
        except BaseException:
            release_group(ctx.root, claim)
            ctx.update(drop_claim(ctx.state.partitions[self.target], self.group))
            raise

    def undo(self, ctx: ApplyContext) -> None:
        rec = ctx.state.partitions.get(self.target)
        if rec is None:
            return
        claim = rec.claim_of(self.group)
        if claim is not None:
            release_group(ctx.root, claim)
            ctx.update(drop_claim(rec, self.group))

    def check(self, ctx: ApplyContext) -> bool:
        rec = ctx.state.partitions.get(self.target)
        if rec is None or self.group not in rec.claim_groups():
            return False
        return _claim_in_place(ctx.root, rec, self.group)


@dataclass(frozen=True)
class ReleaseGroup(Step):
    target: str
    group: int
    functions: tuple[tuple[str, str | None], ...]  # (address, driver it goes back to)
    kind: str = "release-group"

    @property
    def detail(self) -> str:
        fns = ", ".join(f"{a} (vfio-pci -> {d or 'no driver'})" for a, d in self.functions)
        return f"IOMMU group {self.group}: {fns}"

    def do(self, ctx: ApplyContext) -> None:
        rec = ctx.state.partitions[self.target]
        claim = rec.claim_of(self.group)
        if claim is not None:
            release_group(ctx.root, claim)
            ctx.update(drop_claim(rec, self.group))

    def undo(self, ctx: ApplyContext) -> None:
        if ctx.host is None:
            raise ApplyFailed(f"claiming IOMMU group {self.group} again needs the scanned host")
        _claim_intent(ctx, self.target, self.group)
        claim = claim_group(ctx.root, ctx.host, self.group)
        rec = drop_claim(ctx.state.partitions[self.target], self.group)
        ctx.update(replace(rec, claims=(*rec.claims, claim)))

    def check(self, ctx: ApplyContext) -> bool:
        rec = ctx.state.partitions.get(self.target)
        return rec is None or self.group not in rec.claim_groups()


def _claim_intent(ctx: ApplyContext, name: str, group: int) -> None:
    """Save, before any function is unbound, the drivers the group's functions have now.

    A kill during the claim leaves this ``pending`` claim; the next run gives the functions
    back to these drivers (partitioner.record.reconcile), exactly once.
    """
    assert ctx.host is not None
    fns = [record_function(ctx.root, str(fn.address)) for fn in group_endpoints(ctx.host, group)]
    rec = ctx.record(name)
    pending = GroupClaim(group, tuple(fns), loaded_vfio_pci=False, pending=True)
    ctx.update(replace(rec, claims=(*rec.claims, pending)))
    ctx.commit()


def _claim_in_place(root: HostRoot, rec: PartitionRecord, group: int) -> bool:
    claim = rec.claim_of(group)
    if claim is None or claim.pending:
        return False
    return all(
        root.readlink_name(sysfs.pci_device(f.address, "driver")) == VFIO_PCI
        for f in claim.functions
    )
