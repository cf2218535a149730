"""What claiming one PCI function would take with it, and whether it may be assigned at all.

Pure: a function of the :class:`~partitioner.host.Host` value only.  ``partition
inspect`` shows it per function (``assignable``, ``why_not``,
``takes_with_it``); the rules are 4 and 5 of manifest.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from partitioner.host import Host, PciFunction
from partitioner.pci import PciAddress
from vfio.claim import bridge_blockers


@dataclass(frozen=True)
class ClaimPreview:
    address: PciAddress
    iommu_group: int | None
    # Other endpoints that go with it: the rest of its IOMMU group (rule 4: groups
    # are owned whole), and the free functions of its slot with their groups.
    takes_with_it: tuple[PciAddress, ...]
    stays_with_host: tuple[PciAddress, ...]  # bridges and ports of the group
    reasons: tuple[str, ...]  # why it cannot be assigned; empty when it can
    # No reset method: assignable only with `reset: none-ok` on the device.
    needs_reset_none_ok: bool = False
    groups: tuple[int, ...] = ()  # the IOMMU groups to claim (claim_group each), ascending

    @property
    def assignable(self) -> bool:
        return not self.reasons

    @property
    def why_not(self) -> str | None:
        return "; ".join(self.reasons) if self.reasons else None

    def to_json(self) -> dict[str, Any]:
        return {
            "assignable": self.assignable,
            "why_not": self.why_not,
            "takes_with_it": [str(a) for a in self.takes_with_it],
            "stays_with_host": [str(a) for a in self.stays_with_host],
            "needs_reset_none_ok": self.needs_reset_none_ok,
            "iommu_groups": list(self.groups),
        }


def _in_use(host: Host, fn: PciFunction) -> str | None:
    reasons = list(host.in_use.get(fn.address, ()))
    if fn.boot_vga and not any("boot vga" in r.lower() for r in reasons):
        reasons.append("boot VGA device (boot_vga = 1)")
    return "; ".join(reasons) if reasons else None


def claim_preview(host: Host, address: PciAddress) -> ClaimPreview:
    fn = host.pci.get(address)
    if fn is None:
        return ClaimPreview(address, None, (), (), (f"{address} is not on this host",))
    if fn.is_bridge:
        return ClaimPreview(
            address,
            fn.iommu_group,
            (),
            (),
            (f"{address} is a PCI bridge or port: bridges stay with the host",),
        )
    if fn.iommu_group is None or fn.iommu_group not in host.iommu_groups:
        why = (
            "the host has no IOMMU groups (enable VT-d / AMD-Vi in the BIOS and boot with "
            "intel_iommu=on or amd_iommu=on)"
            if not host.has_iommu
            else fn.group_problem or "it is in no IOMMU group"
        )
        return ClaimPreview(address, None, (), (), (f"{address} cannot be assigned: {why}",))

    reasons: list[str] = []
    use = _in_use(host, fn)
    if use:
        reasons.append(f"{address} is in use by the host: {use}")

    # Closure: its group; free functions of its slot; their groups; and so on.
    taken: set[PciAddress] = set()
    bridges: set[PciAddress] = set()
    groups_seen: set[int] = set()
    todo = [fn.iommu_group]
    while todo:
        g = todo.pop()
        if g in groups_seen:
            continue
        groups_seen.add(g)
        for m in host.iommu_groups[g].members:
            mf = host.pci.get(m)
            if mf is None:
                continue
            if mf.is_bridge:
                bridges.add(m)
                continue
            taken.add(m)
        for other in host.functions_in_slot(address.slot_key):
            if (
                not other.is_bridge
                and other.iommu_group is not None
                and other.iommu_group in host.iommu_groups
                and other.iommu_group not in groups_seen
                # Rule 4: only the slot functions the host is not using come along.
                and _in_use(host, other) is None
            ):
                todo.append(other.iommu_group)

    for m in sorted(taken - {address}):
        other_use = _in_use(host, host.pci[m])
        if other_use:
            reasons.append(
                f"IOMMU group {host.pci[m].iommu_group} of {address} also holds {m}, "
                f"which the host uses: {other_use}"
            )
    for g in sorted(groups_seen):
        reasons.extend(bridge_blockers(host, g))
    needs_reset = False
    for m in sorted(taken):
        if not host.pci[m].reset_methods:
            needs_reset = True
            reasons.append(
                f"{m} has no reset method: a guest that restarts cannot be given a clean "
                "device (accepted with `reset: none-ok` on the device in the manifest)"
            )
    return ClaimPreview(
        address,
        fn.iommu_group,
        tuple(sorted(taken - {address})),
        tuple(sorted(bridges)),
        tuple(reasons),
        needs_reset,
        tuple(sorted(groups_seen)),
    )
