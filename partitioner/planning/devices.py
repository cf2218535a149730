"""Devices (rules 4, 5 and 6): each device a partition asks for, resolved to PCI functions from the
one verdict on each function, whole IOMMU groups and slots taken along."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

from partitioner.inventory.model import Host, PciFunction
from partitioner.manifest.model import DeviceSpec, Manifest, PartitionSpec
from partitioner.pci import PciAddress
from partitioner.planning.model import DeviceAssignment, RunningPartition
from partitioner.planning.work import Work
from partitioner.vfio.preview import ClaimPreview, claim_preview, without_reset


def _device_order(
    manifest: Manifest, running: Mapping[str, RunningPartition]
) -> list[PartitionSpec]:
    """Running partitions resolve their devices first, so ``id:`` matches stay where they are."""
    return sorted(manifest.partitions.values(), key=lambda p: (p.name not in running, p.name))


def resolve_devices(
    spec: PartitionSpec, host: Host, w: Work, prefer: set[PciAddress]
) -> tuple[DeviceAssignment, ...]:
    """The partition's devices, from the one verdict on each function it names (partitioner.vfio.preview)."""
    named: list[tuple[PciFunction, str, DeviceSpec]] = []  # function, how it was named, entry
    for dev in spec.devices:
        if dev.kind == "pci":
            addr = PciAddress.parse(dev.value)
            fn = host.pci.get(addr)
            if fn is None:
                _missing(spec, dev.required, f"PCI function {addr} is not on this host", w)
                continue
            named.append((fn, f"named as pci: {addr}", dev))
        elif dev.kind == "netdev":
            iface = host.netdevs.get(dev.value)
            if iface is None:
                _missing(
                    spec, dev.required, f"network interface {dev.value} is not on this host", w
                )
                continue
            if iface.pci is None or iface.pci not in host.pci:
                _missing(
                    spec,
                    dev.required,
                    f"network interface {dev.value} is not a PCI function (virtual or on another bus)",
                    w,
                )
                continue
            named.append((host.pci[iface.pci], f"named as netdev: {dev.value}", dev))
        else:
            found = _match_id(
                spec,
                dev,
                host,
                w,
                prefer,
                exclude={f.address for f, _, _ in named},
            )
            if len(found) < dev.count:
                avail = [f for f in host.pci.values() if f.id == dev.value]
                detail = (
                    f"this host has {len(avail)} {dev.value} function{'s' if len(avail) != 1 else ''}"
                    + (
                        f" ({', '.join(_why_taken(f, host, w, spec.name, dev) for f in avail)})"
                        if avail
                        else ""
                    )
                )
                _missing(
                    spec,
                    dev.required,
                    f"wants {dev.count} free {dev.value} function{'s' if dev.count != 1 else ''}, "
                    f"found {len(found)}: {detail}",
                    w,
                )
            named.extend((f, f"named as id: {dev.value}", dev) for f in found)

    out: list[DeviceAssignment] = []
    taken: set[PciAddress] = set()
    brought_by: dict[PciAddress, DeviceSpec] = {}  # each function: the entry that brings it
    verdicts: list[tuple[ClaimPreview, DeviceSpec]] = []
    for fn, reason, dev in named:
        if fn.address in taken:
            w.problems.append(
                f"{spec.name}: {fn.address} is named twice ({reason} resolves to a function already named)"
            )
            continue
        v = _verdict(fn.address, host, w)
        if v.refusals:
            if fn.iommu_group is None and not host.has_iommu:
                continue  # already said once, as a precondition (rule 7)
            w.problems.append(
                f"{spec.name}: {fn.address} ({fn.id}) cannot be assigned: {'; '.join(v.refusals)}"
            )
            continue
        taken.add(fn.address)
        brought_by[fn.address] = dev
        verdicts.append((v, dev))
        out.append(_assignment(fn, reason, added=False, reset_none_ok=dev.reset_none_ok))

    named_addrs = set(taken)
    covered: set[PciAddress] = set()  # functions `reset: none-ok` covers
    for v, dev in verdicts:
        if dev.reset_none_ok:
            # It covers the function it is on and what comes with it (its slot, its groups).
            covered.update((v.address, *v.takes_with_it))
        for member in v.added:
            if member in taken:
                continue
            other = host.pci[member]
            taken.add(member)
            brought_by[member] = dev
            group = other.iommu_group
            out.append(_assignment(other, f"same slot as {v.address} (IOMMU group {group})", True))
            w.notes.append(
                f"{spec.name}: {member} ({other.id}) added: it shares the slot of {v.address}"
                + (
                    f" and IOMMU group {group}"
                    if group == v.iommu_group
                    else f" (its own IOMMU group {group} goes along)"
                )
            )
        for member in v.must_name:
            if member in named_addrs:
                continue
            other = host.pci[member]
            w.problems.append(
                f"{spec.name}: IOMMU group {other.iommu_group} of {v.address} also holds {member} "
                f"({other.id}, {other.driver or 'no driver'}); a group is assigned whole (rule 4): "
                f"name {member} in {spec.name} too"
            )

    # Resets are checked here, at plan time, by the rule apply's claim asks: a function
    # without a reset of its own is reset through its bus when the partition holds all
    # that bus reaches (partitioner.vfio.preview.without_reset).
    held = [a.address for a in out]
    unreset = set(without_reset(host, held, held))
    for i, a in enumerate(out):
        fn = host.pci[a.address]
        if fn.own_reset:
            continue
        if a.address not in unreset:
            w.notes.append(
                f"{spec.name}: {a.address} ({a.vendor_device}) has no reset of its own: VFIO "
                f"resets it through the bus below {fn.upstream[-1]}, all of which {spec.name} "
                "holds"
            )
            continue
        if a.address in covered:
            out[i] = replace(a, reset_none_ok=True)
            continue
        dev = brought_by[a.address]
        how = "" if not a.added else f" (it comes with {dev})"
        w.problems.append(
            f"{spec.name}: {a.address} ({a.vendor_device}) has no reset method{how}: a guest that "
            f"restarts cannot be given a clean device; to accept it, add `reset: none-ok` to the "
            f"device `{dev}` at {dev.where}"
        )

    for a in out:
        owner = w.device_owner.get(a.address)
        if owner is not None and owner != spec.name:
            w.problems.append(
                f"{spec.name} and {owner} both want {a.address} (rule 4: a function has one owner)"
            )
            continue
        gowner = w.group_owner.get(a.iommu_group)
        if gowner is not None and gowner != spec.name:
            w.problems.append(
                f"{spec.name} wants {a.address} in IOMMU group {a.iommu_group}, which {gowner} "
                "already owns (rule 4: a group is owned whole by one partition)"
            )
            continue
        w.device_owner[a.address] = spec.name
        w.group_owner[a.iommu_group] = spec.name
    return tuple(out)


def _match_id(
    spec: PartitionSpec,
    dev: DeviceSpec,
    host: Host,
    w: Work,
    prefer: set[PciAddress],
    exclude: set[PciAddress],
) -> list[PciFunction]:
    """Free functions matching ``vendor:device``: ones the partition already holds, then
    ones on its numa nodes, then the rest, lowest address first."""
    nodes = set(spec.numa) if spec.numa != "auto" else set()
    functions = w.by_id.get(dev.value, [])
    count = dev.count

    def free(f: PciFunction) -> bool:
        return (
            f.address not in exclude
            and f.address not in w.device_owner
            and (f.iommu_group is None or f.iommu_group not in w.group_owner)
            and not _verdict(f.address, host, w).blockers(none_ok=dev.reset_none_ok)
        )

    found: list[PciFunction] = []
    if prefer or nodes:
        tiers: tuple[Callable[[PciFunction], bool], ...] = (
            lambda f: f.address in prefer,
            lambda f: f.numa_node in nodes,
        )
        for tier in tiers:
            for f in functions:
                if len(found) == count:
                    return found
                if tier(f) and f not in found and free(f):
                    found.append(f)
    # Functions once owned stay owned for the rest of the run: skip the taken prefix
    # (per entry kind: a function refused without `reset: none-ok` may suit one with it).
    key = f"{dev.value}/{dev.reset_none_ok}"
    start = w.id_cursor.get(key, 0)
    while start < len(functions) and not free(functions[start]):
        start += 1
    w.id_cursor[key] = start
    for f in functions[start:]:
        if len(found) == count:
            break
        if f not in found and free(f):
            found.append(f)
    return found


def _why_taken(fn: PciFunction, host: Host, w: Work, me: str, dev: DeviceSpec) -> str:
    owner = w.device_owner.get(fn.address)
    if owner is not None and owner != me:
        return f"{fn.address} is {owner}'s"
    reasons = _verdict(fn.address, host, w).blockers(none_ok=dev.reset_none_ok)
    return f"{fn.address}: {'; '.join(reasons)}" if reasons else f"{fn.address} is free"


def _verdict(address: PciAddress, host: Host, w: Work) -> ClaimPreview:
    """The one verdict on a function (partitioner.vfio.preview), asked once per planning run."""
    v = w.verdicts.get(address)
    if v is None:
        v = w.verdicts[address] = claim_preview(host, address)
    return v


def _assignment(
    fn: PciFunction, reason: str, added: bool, reset_none_ok: bool = False
) -> DeviceAssignment:
    assert fn.iommu_group is not None
    return DeviceAssignment(
        address=fn.address,
        iommu_group=fn.iommu_group,
        vendor_device=fn.id,
        driver=fn.driver,
        added=added,
        reason=reason,
        reset_none_ok=reset_none_ok,
    )


def _missing(spec: PartitionSpec, required: bool, what: str, w: Work) -> None:
    if required:
        w.problems.append(f"{spec.name}: {what}")
    else:
        w.notes.append(f"{spec.name}: optional device left out: {what}")
