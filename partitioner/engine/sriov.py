"""The SR-IOV steps: a PF's VFs made, each VF's settings set through the PF, the VF claimed;
all of it put back on destroy.

Order (``engine/diff.py``): a PF's VFs are made (:class:`CreateVfs`) before any
partition comes up; a partition's VF gets its settings (:class:`ConfigureVf`) and
is then claimed for vfio-pci (:class:`ClaimVf`) before its other devices.  Going
down, the VF's claim is released, its settings are put back (:class:`ClearVf`),
and once no partition is left the PF gets back its VF count and its
``sriov_drivers_autoprobe`` (:class:`RestoreVfs`).

VFs are made with ``sriov_drivers_autoprobe`` at 0, so no host driver binds a VF
before it is configured and claimed.  The kernel refuses to change a nonzero VF
count to another nonzero one (EBUSY): the count goes to 0 first, which removes
every VF of the PF, so that is refused while any VF is bound to a host driver or
claimed by a partition (:class:`VfsInUse`, naming them).

Every change is an intent in the record before it is made (a pending
:class:`~partitioner.record.model.SriovRecord` or
:class:`~partitioner.record.model.VfRecord`); :mod:`partitioner.record.reconcile`
settles what a killed command left.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from partitioner.engine.context import ApplyContext
from partitioner.engine.devices import ClaimGroup
from partitioner.engine.step import Action, Step
from partitioner.errors import DeviceError, PreconditionError
from partitioner.kernel import sysfs
from partitioner.kernel.root import HostRoot
from partitioner.kernel.vflink import (
    VfLink,
    VfLinkError,
    pf_netdev,
    read_vf_links,
    set_vf_link,
)
from partitioner.killpoint import point
from partitioner.record.model import (
    VFIO_PCI,
    SriovRecord,
    State,
    VfRecord,
    drop_claim,
    with_vf,
    without_vf,
)


class VfsInUse(PreconditionError):
    """A PF's VF count cannot change: VFs it would remove are in use (``.pf``, ``.users``)."""

    def __init__(self, pf: str, users: Sequence[str], want: str) -> None:
        self.pf = pf
        self.users = list(users)
        super().__init__(
            f"cannot {want} of {pf}: the kernel removes every VF first, and "
            + "; ".join(self.users)
            + " (destroy the partitions that hold them, or unbind them from the host's driver)"
        )


# -- the kernel's side ----------------------------------------------------------------


def numvfs(root: HostRoot, pf: str) -> int:
    n = root.read_int(sysfs.pci_device(pf, sysfs.SRIOV_NUMVFS))
    if n is None:
        raise DeviceError(
            f"{pf} is not an SR-IOV physical function here (no {sysfs.SRIOV_NUMVFS}; "
            "is its driver bound?)",
            address=pf,
            path=sysfs.pci_device(pf, sysfs.SRIOV_NUMVFS),
        )
    return n


def autoprobe(root: HostRoot, pf: str) -> bool:
    return root.read_int(sysfs.pci_device(pf, sysfs.SRIOV_DRIVERS_AUTOPROBE), 1) != 0


def vf_address(root: HostRoot, pf: str, index: int) -> str | None:
    """The PCI address of VF ``index`` of ``pf``, if it exists now (its ``virtfnN`` link)."""
    return root.readlink_name(sysfs.pci_virtfn(pf, index))


def vf_users(root: HostRoot, state: State, pf: str) -> list[str]:
    """Who uses a VF of ``pf`` now: a host driver bound to it (other than vfio-pci), or a
    partition's claim in the record."""
    claimed: dict[str, str] = {}
    for rec in state.partitions.values():
        for c in rec.claims:
            for a in c.addresses:
                claimed[a] = rec.name
    users: list[str] = []
    for i in range(root.read_int(sysfs.pci_device(pf, sysfs.SRIOV_NUMVFS), 0) or 0):
        addr = vf_address(root, pf, i)
        if addr is None:
            continue
        drv = root.readlink_name(sysfs.pci_device(addr, "driver"))
        if addr in claimed:
            users.append(f"VF {i} ({addr}) is claimed by partition {claimed[addr]}")
        elif drv is not None and drv != VFIO_PCI:
            users.append(f"VF {i} ({addr}) is bound to the host's driver {drv}")
    return users


def _write(root: HostRoot, pf: str, leaf: str, value: str) -> None:
    path = sysfs.pci_device(pf, leaf)
    try:
        root.write(path, value)
    except OSError as e:
        raise DeviceError(
            f"writing {value} to {path} failed: {e.strerror or e}",
            address=pf,
            path=path,
            errno=e.errno,
        ) from e


def set_numvfs(root: HostRoot, pf: str, count: int) -> None:
    """Make ``pf`` have ``count`` VFs (through 0: the kernel refuses one nonzero count to another)."""
    now = numvfs(root, pf)
    if now == count:
        return
    if now and count:
        _write(root, pf, sysfs.SRIOV_NUMVFS, "0")
    _write(root, pf, sysfs.SRIOV_NUMVFS, str(count))


def set_autoprobe(root: HostRoot, pf: str, on: bool) -> None:
    if autoprobe(root, pf) != on:
        _write(root, pf, sysfs.SRIOV_DRIVERS_AUTOPROBE, "1" if on else "0")


def made(root: HostRoot, rec: SriovRecord) -> bool:
    """Whether the PF shows what a ``create`` intent asked for: the count, autoprobe off."""
    return numvfs(root, rec.pf) == rec.numvfs and not autoprobe(root, rec.pf)


def put_back(root: HostRoot, rec: SriovRecord) -> None:
    """The PF's VF count and autoprobe as they were before ``rec``'s VFs were made."""
    # Autoprobe first: VFs made again (a count that was nonzero before) are made as before.
    set_autoprobe(root, rec.pf, rec.autoprobe_before)
    set_numvfs(root, rec.pf, rec.numvfs_before)


def put_back_vf(root: HostRoot, pf: str, v: VfRecord) -> None:
    """VF ``v.index`` of ``pf`` with the settings it had before, if it still exists."""
    if vf_address(root, pf, v.index) is None:
        return  # gone with its settings (the VF count went down)
    set_vf_link(pf_netdev(root, pf), pf, v.index, v.before)


# -- the steps --------------------------------------------------------------------------


def _settle(ctx: ApplyContext, pf: str) -> None:
    """After a failed change of the PF: record what the host shows (the one rule reconcile
    follows too): a ``create`` that was made is recorded as made, anything else put back."""
    rec = ctx.state.pf(pf)
    if rec is None or not rec.pending:
        return
    if rec.op == "create" and made(ctx.root, rec):
        ctx.state = ctx.state.with_pf(replace(rec, pending=False))
    else:
        put_back(ctx.root, rec)
        ctx.state = ctx.state.without_pf(pf)
    ctx.commit()


def _restore(ctx: ApplyContext, pf: str) -> None:
    rec = ctx.state.pf(pf)
    if rec is None:
        return
    now = numvfs(ctx.root, pf)
    if now != rec.numvfs_before and now:
        users = vf_users(ctx.root, ctx.state, pf)
        if users:
            raise VfsInUse(pf, users, f"put back sriov_numvfs {rec.numvfs_before}")
    ctx.state = ctx.state.with_pf(replace(rec, pending=True, op="restore"))
    ctx.commit()
    if rec.numvfs_before and now == rec.numvfs_before:
        # The VFs stay (they were there before): their settings go back as they were.
        for v in rec.vfs:
            put_back_vf(ctx.root, pf, v)
    put_back(ctx.root, rec)
    point("vfs-restored")
    ctx.state = ctx.state.without_pf(pf)


@dataclass(frozen=True)
class CreateVfs(Step):
    """``count`` VFs made on the PF ``target``, with autoprobe off."""

    target: str  # the PF's PCI address
    count: int
    now: int | None = None  # sriov_numvfs when planned (for the listing); None: not known
    kind: str = "create-vfs"

    @property
    def detail(self) -> str:
        if self.now == self.count:
            return (
                f"{self.count} VFs there already (sriov_numvfs {self.count}): kept, and "
                "recorded so that their settings are set and put back"
            )
        was = "" if self.now is None else f" {self.now} ->"
        return (
            f"sriov_numvfs{was} {self.count}, with sriov_drivers_autoprobe 0 first (no host "
            "driver probes them)"
        )

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "pf": self.target, "vfs": self.count, "numvfs_now": self.now}

    def do(self, ctx: ApplyContext) -> None:
        root, pf = ctx.root, self.target
        now, probe = numvfs(root, pf), autoprobe(root, pf)
        total = root.read_int(sysfs.pci_device(pf, sysfs.SRIOV_TOTALVFS))
        if total is not None and self.count > total:
            raise DeviceError(
                f"{pf} can make at most {total} VFs (sriov_totalvfs), not {self.count}",
                address=pf,
            )
        if now not in (0, self.count):
            users = vf_users(root, ctx.state, pf)
            if users:
                raise VfsInUse(pf, users, f"make {self.count} VFs")
        old = ctx.state.pf(pf)
        rec = (
            SriovRecord(pf, now, probe, self.count, pending=True, op="create")
            if old is None
            # VFs an earlier apply made: what the PF had before that is what destroy puts back.
            else replace(old, numvfs=self.count, pending=True, op="create")
        )
        ctx.state = ctx.state.with_pf(rec)
        ctx.commit()
        try:
            set_autoprobe(root, pf, False)
            set_numvfs(root, pf, self.count)
        except BaseException:
            with contextlib.suppress(DeviceError, OSError):
                _settle(ctx, pf)
            raise
        point("vfs-created")
        ctx.state = ctx.state.with_pf(replace(rec, pending=False))

    def undo(self, ctx: ApplyContext) -> None:
        _restore(ctx, self.target)

    def check(self, ctx: ApplyContext) -> bool:
        rec = ctx.state.pf(self.target)
        return (
            rec is not None and not rec.pending and rec.numvfs == self.count and made(ctx.root, rec)
        )


@dataclass(frozen=True)
class RestoreVfs(Step):
    """The PF ``target`` back as it was before apply made its VFs (count and autoprobe)."""

    target: str
    numvfs: int
    numvfs_before: int
    autoprobe_before: bool
    kind: str = "restore-vfs"

    @property
    def detail(self) -> str:
        probe = "1" if self.autoprobe_before else "0"
        return (
            f"sriov_numvfs {self.numvfs} -> {self.numvfs_before}, "
            f"sriov_drivers_autoprobe back to {probe}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            **super().to_json(),
            "pf": self.target,
            "vfs": self.numvfs,
            "numvfs_back": self.numvfs_before,
            "autoprobe_back": self.autoprobe_before,
        }

    def do(self, ctx: ApplyContext) -> None:
        _restore(ctx, self.target)

    def undo(self, ctx: ApplyContext) -> None:
        CreateVfs(self.target, self.numvfs).do(ctx)

    def check(self, ctx: ApplyContext) -> bool:
        return ctx.state.pf(self.target) is None


def _want(settings: Any) -> VfLink:
    return VfLink().with_settings(settings)


@dataclass(frozen=True)
class ConfigureVf(Step):
    """VF ``index`` of ``pf`` given the partition ``target``'s settings, through the PF."""

    target: str  # the partition
    pf: str
    index: int
    settings: Any  # the manifest's VfSettings (or a VfLink): mac, vlan, qos, spoofchk, ...
    kind: str = "configure-vf"

    @property
    def detail(self) -> str:
        return f"VF {self.index} of {self.pf}: {_want(self.settings).describe()}"

    def to_json(self) -> dict[str, Any]:
        return {
            **super().to_json(),
            "pf": self.pf,
            "index": self.index,
            "settings": _want(self.settings).to_json(),
        }

    def do(self, ctx: ApplyContext) -> None:
        root, pf = ctx.root, self.pf
        rec = ctx.state.pf(pf)
        if rec is None:
            raise DeviceError(
                f"VF {self.index} of {pf}: apply did not make this PF's VFs (declare the PF "
                "in host.sriov)",
                address=pf,
            )
        held = rec.vf(self.index)
        if held is not None and held.partition != self.target:
            raise DeviceError(
                f"VF {self.index} of {pf} has the settings of partition {held.partition}",
                address=pf,
            )
        netdev = pf_netdev(root, pf)
        links = read_vf_links(netdev)
        if self.index not in links:
            raise VfLinkError(
                f"{pf} ({netdev}) has no VF {self.index} (it has {len(links)})", address=pf
            )
        before = held.before if held is not None else links[self.index]
        want = links[self.index].with_settings(self.settings)
        vrec = VfRecord(self.index, self.target, before, want, pending=True)
        ctx.state = ctx.state.with_pf(with_vf(rec, vrec))
        ctx.commit()
        try:
            set_vf_link(netdev, pf, self.index, want)
        except BaseException:
            # What was set before the refusal goes back; the intent with it.
            with contextlib.suppress(DeviceError, OSError):
                put_back_vf(root, pf, vrec)
            now = ctx.state.pf(pf)
            if now is not None:
                ctx.state = ctx.state.with_pf(without_vf(now, self.index))
            ctx.commit()
            raise
        point("vf-configured")
        now = ctx.state.pf(pf)
        assert now is not None
        ctx.state = ctx.state.with_pf(with_vf(now, replace(vrec, pending=False)))

    def undo(self, ctx: ApplyContext) -> None:
        _clear(ctx, self.pf, self.index)

    def check(self, ctx: ApplyContext) -> bool:
        rec = ctx.state.pf(self.pf)
        held = rec.vf(self.index) if rec is not None else None
        if held is None or held.pending or held.partition != self.target:
            return False
        try:
            got = read_vf_links(pf_netdev(ctx.root, self.pf)).get(self.index)
        except VfLinkError:
            return False
        return got is not None and got == got.with_settings(self.settings)


def _clear(ctx: ApplyContext, pf: str, index: int) -> None:
    rec = ctx.state.pf(pf)
    held = rec.vf(index) if rec is not None else None
    if rec is None or held is None:
        return
    ctx.state = ctx.state.with_pf(with_vf(rec, replace(held, pending=True)))
    ctx.commit()
    put_back_vf(ctx.root, pf, held)
    point("vf-cleared")
    now = ctx.state.pf(pf)
    assert now is not None
    ctx.state = ctx.state.with_pf(without_vf(now, index))


@dataclass(frozen=True)
class ClearVf(Step):
    """VF ``index`` of ``pf`` given back the settings it had before ``target`` took it."""

    target: str  # the partition
    pf: str
    index: int
    settings: VfLink  # what it was set to (undo sets it again)
    kind: str = "clear-vf"

    @property
    def detail(self) -> str:
        return f"VF {self.index} of {self.pf}: settings put back"

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "pf": self.pf, "index": self.index}

    def do(self, ctx: ApplyContext) -> None:
        _clear(ctx, self.pf, self.index)

    def undo(self, ctx: ApplyContext) -> None:
        ConfigureVf(self.target, self.pf, self.index, self.settings).do(ctx)

    def check(self, ctx: ApplyContext) -> bool:
        rec = ctx.state.pf(self.pf)
        return rec is None or rec.vf(self.index) is None


@dataclass(frozen=True)
class ClaimVf(Step):
    """VF ``index`` of ``pf`` (at ``address``) claimed for vfio-pci with its IOMMU group.

    The group is the kernel's word once the VF exists (a VF made by this apply had
    none at plan time): read from the VF's ``iommu_group`` link, then claimed as
    :class:`~partitioner.engine.devices.ClaimGroup` claims any group.
    """

    target: str  # the partition
    pf: str
    index: int
    address: str
    kind: str = "claim-vf"

    @property
    def detail(self) -> str:
        return f"VF {self.index} of {self.pf} ({self.address} -> vfio-pci)"

    def to_json(self) -> dict[str, Any]:
        return {
            **super().to_json(),
            "pf": self.pf,
            "index": self.index,
            "address": self.address,
        }

    def _group(self, ctx: ApplyContext) -> int:
        root = ctx.root
        addr = vf_address(root, self.pf, self.index)
        if addr is None:
            raise DeviceError(
                f"{self.pf} has no VF {self.index} (sriov_numvfs is "
                f"{root.read_int(sysfs.pci_device(self.pf, sysfs.SRIOV_NUMVFS), 0)})",
                address=self.pf,
            )
        if addr != self.address:
            raise DeviceError(
                f"VF {self.index} of {self.pf} is {addr}, not {self.address} as planned "
                "(the PF's VF offset or stride changed?): plan again",
                address=addr,
            )
        name = root.readlink_name(sysfs.pci_device(addr, "iommu_group"))
        if name is None or not name.isdigit():
            raise DeviceError(
                f"VF {self.index} of {self.pf} ({addr}) has no IOMMU group (is the IOMMU on?)",
                address=addr,
            )
        return int(name)

    def do(self, ctx: ApplyContext) -> None:
        group = self._group(ctx)
        from partitioner.inventory import scan
        from partitioner.pci import PciAddress

        host = ctx.host
        if (
            host is None
            or group not in host.iommu_groups
            or PciAddress.parse(self.address) not in host.pci
        ):
            # The VF was made after the host was scanned: scan it again.
            ctx.host = scan(ctx.root)
        ClaimGroup(self.target, group, ((self.address, None),)).do(ctx)
        _group_known(ctx, self.target, self.address, group)

    def undo(self, ctx: ApplyContext) -> None:
        rec = ctx.state.partitions.get(self.target)
        if rec is None:
            return
        for c in rec.claims:
            if self.address in c.addresses:
                from partitioner.vfio.claim import release_group

                release_group(ctx.root, c)
                ctx.update(drop_claim(rec, c.group))
                return

    def check(self, ctx: ApplyContext) -> bool:
        rec = ctx.state.partitions.get(self.target)
        if rec is None:
            return False
        return any(
            self.address in c.addresses
            and not c.pending
            and all(
                ctx.root.readlink_name(sysfs.pci_device(f.address, "driver")) == VFIO_PCI
                for f in c.functions
            )
            for c in rec.claims
        )


def _group_known(ctx: ApplyContext, name: str, address: str, group: int) -> None:
    """The plan's VF at ``address`` given the IOMMU group the kernel gave it, so that the
    partition is recorded (and started) with it."""
    p = ctx.plan.placements.get(name)
    if p is None:
        return
    devices = tuple(
        replace(d, iommu_group=group) if str(d.address) == address else d for d in p.devices
    )
    if devices != p.devices:
        placements = {**ctx.plan.placements, name: replace(p, devices=devices)}
        ctx.plan = replace(ctx.plan, placements=placements)
        rec = ctx.state.partitions.get(name)
        if rec is not None and rec.placement == p:
            ctx.update(replace(rec, placement=placements[name]))


# -- what the diff emits ------------------------------------------------------------------


def pf_changes(
    plan_pfs: Iterable[tuple[str, int]], state: State, now: Mapping[str, int] | None = None
) -> tuple[list[Action], list[Action]]:
    """``(restores, creations)`` that take the recorded PFs to the plan's ``(pf, vfs)``: a PF
    the plan no longer has, or with another count, is put back first; a PF without VFs
    made (or with another count, or whose recorded VFs are not there) gets them.  ``now``:
    each PF's ``sriov_numvfs`` as scanned."""
    planned = dict(plan_pfs)
    now = now or {}
    restores: list[Action] = []
    creations: list[Action] = []
    for r in state.sriov:
        if planned.get(r.pf) != r.numvfs:
            restores.append(RestoreVfs(r.pf, r.numvfs, r.numvfs_before, r.autoprobe_before))
    for pf, count in planned.items():
        was = state.pf(pf)
        # Recorded as made but not there (the host rebooted without `host setup`'s VFs):
        # made again, what the PF had before the first apply kept as what destroy puts back.
        gone = was is not None and pf in now and now[pf] != was.numvfs
        if was is None or was.numvfs != count or gone:
            creations.append(CreateVfs(pf, count, now.get(pf)))
    return restores, creations


def restore_all(state: State) -> list[Action]:
    """Every recorded PF put back, newest first: destroy's last steps once no partition is left."""
    return [
        RestoreVfs(r.pf, r.numvfs, r.numvfs_before, r.autoprobe_before)
        for r in reversed(state.sriov)
    ]


def clears_of(partition: str, state: State) -> list[Action]:
    """The partition's VFs given their settings back (after its claims are released)."""
    return [
        ClearVf(partition, r.pf, v.index, v.want)
        for r in state.sriov
        for v in r.vfs
        if v.partition == partition
    ]
