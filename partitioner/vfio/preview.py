"""Can this PCI function be given to a partition, and what comes with it: the one answer.

Pure: a function of the :class:`~partitioner.inventory.model.Host` value only.  Every verb
asks here and nowhere else:

- ``partition inspect`` shows :func:`claim_preview` per function (``assignable``,
  ``why_not``, ``takes_with_it``);
- ``partition plan`` asks :func:`claim_preview` for every function a manifest
  names and builds the partition's devices from the answer (what is added, what
  must be named too, which functions need ``reset: none-ok``);
- ``partition apply`` asks :func:`group_refusals` again for each group just
  before it claims it, on the host as scanned at that moment (``partitioner.vfio.claim``).

The rules are 4 and 5 of docs/manifest.md, the kernel's VFIO viability rule (a group
can be opened only when every member is on vfio-pci, pci-stub, a port driver,
or no driver) and the reset check (docs/decisions.md, "One verdict", and "Reset through
the bus" for a function without a reset of its own: :func:`without_reset`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from partitioner.inventory.model import Host, PciFunction
from partitioner.pci import PciAddress

# Drivers that leave an IOMMU group viable for VFIO (they declare
# driver_managed_dma in the kernel): a bridge on pcieport, a stub.
VIABLE_DRIVERS = frozenset({"vfio-pci", "pci-stub", "pcieport"})


def stays_with_host(fn: PciFunction) -> bool:
    """A member of a group that is never claimed nor handed to a guest.

    Bridges and ports (header type 1 or 2, what the kernel calls a bridge: rule 4)
    and the chipset's other class-06 functions (host bridges, ISA/LPC bridges:
    header type 0, endpoints to the kernel, but the host runs on them: rule 5).
    """
    return fn.is_bridge or fn.class_code.startswith("06")


def _stay_reason(fn: PciFunction) -> str:
    if fn.is_bridge:
        return f"{fn.address} is a PCI bridge or port: bridges stay with the host (rule 4)"
    return (
        f"{fn.address} is a {fn.label or 'bridge'} (class {fn.class_code}, header type 0): "
        "the chipset stays with the host (rule 5)"
    )


def used_by_host(host: Host, fn: PciFunction) -> bool:
    """Rule 5: the host runs on it (inventory's ``in_use``), or it is the boot VGA device."""
    return fn.boot_vga or bool(host.in_use.get(fn.address))


def _uses(host: Host, fn: PciFunction) -> list[str]:
    """What the host uses ``fn`` for, in words; the boot VGA device said one way only."""
    said = (
        []
        if not fn.boot_vga
        else ["the boot VGA device (boot_vga = 1): the host's console runs on it"]
    )
    said += [
        r for r in host.in_use.get(fn.address, ()) if not (fn.boot_vga and "boot vga" in r.lower())
    ]
    return said


def group_endpoints(host: Host, group: int) -> tuple[PciFunction, ...]:
    """The functions of ``group`` a claim takes: every member but those that stay with the host."""
    ig = host.iommu_groups.get(group)
    if ig is None:
        return ()
    return tuple(
        host.pci[a]
        for a in sorted(ig.members)
        if a in host.pci and not stays_with_host(host.pci[a])
    )


def bridge_blockers(host: Host, group: int) -> list[str]:
    """Members of ``group`` that stay with the host but whose driver keeps the group from
    ever being viable for VFIO.

    The kernel counts a group viable only when no driver but those that manage
    DMA themselves (vfio-pci, pci-stub, pcieport) holds a member.  A bridge on
    shpchp (a conventional PCI bridge's hot-plug driver), say, blocks it: seen
    on the emulated server; so does an ISA bridge on lpc_ich.  They stay with the
    host, so this is refused, not changed: unbinding their driver is the
    operator's call.
    """
    ig = host.iommu_groups.get(group)
    out: list[str] = []
    for a in ig.members if ig is not None else ():
        fn = host.pci.get(a)
        if fn is not None and stays_with_host(fn) and fn.driver and fn.driver not in VIABLE_DRIVERS:
            what = "bridge" if fn.is_bridge else (fn.label or "chipset function")
            out.append(
                f"{what} {a} in IOMMU group {group} is bound to {fn.driver}, which keeps the "
                "group from being handed to a guest (the kernel's VFIO viability rule, rule 4); "
                f"if the host can do without it: echo {a} > /sys/bus/pci/drivers/{fn.driver}/unbind"
            )
    return out


def group_refusals(host: Host, group: int, *, of: PciAddress | None = None) -> list[str]:
    """Why IOMMU group ``group`` may not be claimed for a guest; empty when it may.

    The same sentences for ``apply`` (which asks before it claims) and for a
    function's verdict (``of``: the function asked about, so that its group-mates
    are named as such).  Reset methods are not a refusal of the group: they are
    lifted by ``reset: none-ok`` (see :func:`reset_refusal`).
    """
    ig = host.iommu_groups.get(group)
    if ig is None:
        if not host.has_iommu:
            return [
                f"IOMMU group {group} does not exist: this host has no IOMMU groups "
                "(enable VT-d / AMD-Vi in the BIOS and boot with intel_iommu=on or amd_iommu=on)"
            ]
        return [f"IOMMU group {group} does not exist on this host"]
    why: list[str] = []
    endpoints = group_endpoints(host, group)
    if not endpoints:
        why.append(f"IOMMU group {group} holds only bridges and ports, which stay with the host")
    why.extend(bridge_blockers(host, group))
    for fn in endpoints:
        if not used_by_host(host, fn):
            continue
        use = "; ".join(_uses(host, fn))
        if of is None or fn.address == of:
            why.append(f"{fn.address} is in use by the host: {use} (rule 5)")
        else:
            why.append(
                f"IOMMU group {group} of {of} also holds {fn.address}, which the host uses: "
                f"{use} (rule 5)"
            )
    return why


def bus_reset_reach(host: Host, fn: PciFunction) -> tuple[PciAddress, ...] | None:
    """Every function a reset of ``fn``'s bus reaches, when VFIO can reset ``fn`` that way;
    None when it cannot.

    The kernel resets a bus through the bridge above it (``pci_probe_reset_bus``: no root
    bus, for there is no bridge to do it), and VFIO's hot reset (the ``dev_set`` of
    ``vfio_pci_dev_set_resettable``) needs every device that reset reaches, on the bus and
    the buses below it, to be a vfio-pci device of the same user.  A bridge behind it stays
    on pcieport, and a function the host uses stays with the host: with either, no partition
    can hold them all.  What the kernel also refuses and sysfs does not show (a quirk's
    ``no_bus_reset``) is asked of the kernel by ``apply`` (``partitioner.vfio.ioctl``).
    """
    if not fn.upstream:
        return None
    below = host.functions_below(fn.upstream[-1])
    if any(stays_with_host(f) or used_by_host(host, f) for f in below):
        return None
    return tuple(f.address for f in below)


def without_reset(
    host: Host, addresses: Iterable[PciAddress], held: Collection[PciAddress]
) -> tuple[PciAddress, ...]:
    """Of ``addresses``, the functions nothing resets when one partition holds ``held``: those
    without a reset of their own whose bus VFIO cannot reset for that partition (rule 11).

    The one reset rule: the verdict on a function, ``plan`` (with the partition's devices)
    and ``apply``'s claim (with the placement's devices) ask it.
    """
    have = set(held)
    out: list[PciAddress] = []
    for a in sorted(set(addresses)):
        fn = host.pci.get(a)
        if fn is None or fn.own_reset:
            continue
        reach = bus_reset_reach(host, fn)
        if reach is not None and have.issuperset(reach):
            continue
        out.append(a)
    return tuple(out)


def reset_refusal(
    no_reset: tuple[PciAddress, ...] | list[PciAddress],
    bus_needs: Iterable[tuple[PciAddress, tuple[PciAddress, ...]]] = (),
) -> str:
    """The one sentence for functions without a reset method (and, where a reset of their
    bus would do, what the partition must hold for it)."""
    needs = {a: others for a, others in bus_needs if a in no_reset and others}
    via_bus = "".join(
        f"; {a} is reset through its bus if {', '.join(map(str, others))} "
        f"{'goes' if len(others) == 1 else 'go'} to the same partition"
        for a, others in sorted(needs.items())
    )
    return (
        f"{', '.join(map(str, no_reset))} {'has' if len(no_reset) == 1 else 'have'} no reset "
        "method: a guest that restarts cannot be given a clean device (accepted with "
        f"`reset: none-ok` on the device in the manifest){via_bus}"
    )


@dataclass(frozen=True)
class ClaimPreview:
    """The verdict on one function: whether it may be assigned, and what comes with it."""

    address: PciAddress
    iommu_group: int | None
    # Other endpoints that go with it (rule 4): ``added`` come along by themselves (its
    # slot, free, and the group they are in); ``must_name`` are in its groups but in
    # another slot, so the manifest must name them too.
    takes_with_it: tuple[PciAddress, ...]
    stays_with_host: tuple[PciAddress, ...]  # bridges, ports and chipset functions of its groups
    refusals: tuple[str, ...]  # why it cannot be assigned, whatever the manifest says
    no_reset: tuple[PciAddress, ...] = ()  # it or what it takes, without a reset method
    groups: tuple[int, ...] = ()  # the IOMMU groups to claim (claim_group each), ascending
    added: tuple[PciAddress, ...] = ()
    must_name: tuple[PciAddress, ...] = ()
    # Functions it takes that have no reset of their own but that VFIO resets through their
    # bus, everything on that bus coming along (a GPU's audio function).
    bus_reset: tuple[PciAddress, ...] = ()
    # Functions of ``no_reset`` whose bus VFIO could reset if the partition also held these.
    bus_reset_needs: tuple[tuple[PciAddress, tuple[PciAddress, ...]], ...] = ()

    @property
    def needs_reset_none_ok(self) -> bool:
        return bool(self.no_reset)

    def lacking_reset(self, held: Collection[PciAddress] = ()) -> tuple[PciAddress, ...]:
        """``no_reset`` when the partition also holds ``held`` (its other devices)."""
        have = {*held, self.address, *self.takes_with_it}
        reset = {a for a, others in self.bus_reset_needs if have.issuperset(others)}
        return tuple(a for a in self.no_reset if a not in reset)

    def blockers(
        self, *, none_ok: bool = False, held: Collection[PciAddress] = ()
    ) -> tuple[str, ...]:
        """Why it cannot be assigned; ``none_ok``: the device says `reset: none-ok`;
        ``held``: the partition's other functions."""
        lacking = () if none_ok else self.lacking_reset(held)
        if lacking:
            return (*self.refusals, reset_refusal(lacking, self.bus_reset_needs))
        return self.refusals

    @property
    def reasons(self) -> tuple[str, ...]:
        return self.blockers()

    @property
    def assignable(self) -> bool:
        return not self.reasons

    @property
    def why_not(self) -> str | None:
        return "; ".join(self.reasons) if self.reasons else None

    def short(self) -> str:
        """One word or a few for a table: yes, yes+N, name-too, none-ok, no."""
        if self.refusals:
            return "no"
        if self.no_reset:
            return "none-ok"
        if self.must_name:
            return "name-too"
        return f"yes+{len(self.added)}" if self.added else "yes"

    def to_json(self) -> dict[str, Any]:
        return {
            "assignable": self.assignable,
            "why_not": self.why_not,
            "takes_with_it": [str(a) for a in self.takes_with_it],
            "added_with_it": [str(a) for a in self.added],
            "must_be_named_with_it": [str(a) for a in self.must_name],
            "stays_with_host": [str(a) for a in self.stays_with_host],
            "needs_reset_none_ok": self.needs_reset_none_ok,
            "no_reset_method": [str(a) for a in self.no_reset],
            "reset_through_bus": [str(a) for a in self.bus_reset],
            "iommu_groups": list(self.groups),
        }


def _refused(address: PciAddress, group: int | None, why: str) -> ClaimPreview:
    return ClaimPreview(address, group, (), (), (why,))


def claim_previews(host: Host) -> dict[PciAddress, ClaimPreview]:
    """The verdict on every function of ``host`` (what ``inspect`` shows), in linear time
    for functions in groups of bounded size."""
    return {a: claim_preview(host, a) for a in sorted(host.pci)}


def claim_preview(host: Host, address: PciAddress) -> ClaimPreview:
    """The verdict on ``address``: the one answer ``inspect``, ``plan`` and ``apply`` give."""
    fn = host.pci.get(address)
    if fn is None:
        return _refused(address, None, f"{address} is not on this host")
    if stays_with_host(fn):
        return _refused(address, fn.iommu_group, _stay_reason(fn))
    if fn.iommu_group is None or fn.iommu_group not in host.iommu_groups:
        why = (
            "the host has no IOMMU groups (enable VT-d / AMD-Vi in the BIOS and boot with "
            "intel_iommu=on or amd_iommu=on)"
            if not host.has_iommu
            else fn.group_problem or "it is in no IOMMU group"
        )
        return _refused(address, None, f"{address} cannot be assigned: {why}")

    # Closure: its group; the free functions of its slot and their groups.
    taken: set[PciAddress] = set()
    stays: set[PciAddress] = set()
    groups_seen: set[int] = set()
    slot_groups = [fn.iommu_group]
    for other in host.functions_in_slot(address.slot_key):
        if (
            other.address != address
            # SR-IOV virtual functions share slot numbers without being one device: a VF
            # brings no other function of its slot, nor is brought by one.
            and other.physfn is None
            and fn.physfn is None
            and not stays_with_host(other)
            and other.iommu_group is not None
            and other.iommu_group in host.iommu_groups
            # Rule 4: only the slot functions the host is not using come along.
            and not used_by_host(host, other)
        ):
            slot_groups.append(other.iommu_group)
    for g in slot_groups:
        if g in groups_seen:
            continue
        groups_seen.add(g)
        for m in host.iommu_groups[g].members:
            mf = host.pci.get(m)
            if mf is None:
                continue
            (stays if stays_with_host(mf) else taken).add(m)

    refusals: list[str] = []
    for g in sorted(groups_seen):
        for why in group_refusals(host, g, of=address):
            if why not in refusals:
                refusals.append(why)
    others = sorted(taken - {address})
    # A VF's group-mates are never added by themselves (other VFs, the PF: no ACS between
    # them); they have to be named.
    added = tuple(
        m
        for m in others
        if m.slot_key == address.slot_key and fn.physfn is None and host.pci[m].physfn is None
    )
    must_name = tuple(m for m in others if m not in added)
    no_reset = without_reset(host, taken, taken)
    bus_reset = tuple(m for m in sorted(taken) if not host.pci[m].own_reset and m not in no_reset)
    bus_needs: list[tuple[PciAddress, tuple[PciAddress, ...]]] = []
    for m in no_reset:
        reach = bus_reset_reach(host, host.pci[m])
        if reach is not None:
            bus_needs.append((m, tuple(r for r in reach if r not in taken)))
    return ClaimPreview(
        address=address,
        iommu_group=fn.iommu_group,
        takes_with_it=tuple(others),
        stays_with_host=tuple(sorted(stays)),
        refusals=tuple(refusals),
        no_reset=no_reset,
        groups=tuple(sorted(groups_seen)),
        added=added,
        must_name=must_name,
        bus_reset=bus_reset,
        bus_reset_needs=tuple(bus_needs),
    )
