"""Devices (rules 4, 5 and 6): each device a partition asks for, resolved to PCI functions from the
one verdict on each function, whole IOMMU groups and slots taken along."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from partitioner.errors import HostResources
from partitioner.inventory.model import Host, PciFunction
from partitioner.manifest.model import DeviceSpec, Manifest, PartitionSpec
from partitioner.pci import PciAddress
from partitioner.planning.model import DeviceAssignment, RunningPartition
from partitioner.planning.work import Work, dev_node, handful
from partitioner.vfio.preview import ClaimPreview, claim_preview, without_reset


def _device_order(
    manifest: Manifest, running: Mapping[str, RunningPartition]
) -> list[PartitionSpec]:
    """Running partitions resolve their devices first, so ``id:`` matches stay where they are."""
    return sorted(manifest.partitions.values(), key=lambda p: (p.name not in running, p.name))


def resolve_devices(
    spec: PartitionSpec,
    host: Host,
    w: Work,
    prefer: set[PciAddress],
    home: Sequence[int] = (),
) -> tuple[DeviceAssignment, ...]:
    """The partition's devices, from the one verdict on each function it names (partitioner.vfio.preview).

    ``home``: the nodes the partition can go on, best first (under ``numa: auto`` the nodes
    where its CPUs and memory fit; else its numa list or its CPU list's nodes).  A device
    asked by ``id:`` is taken there before anywhere else (rule 6)."""
    if not spec.devices:
        return ()
    auto = spec.numa == "auto" and spec.cpu_list is None
    # (function, how it was named, entry, its field), by the entry's index: the fixed entries
    # (pci:, netdev:) first, so that `id:` matches go where they are and never take them.
    by_entry: dict[int, list[tuple[PciFunction, str, DeviceSpec, str]]] = {}
    for i, dev in enumerate(spec.devices):
        field = f"devices[{i}]"
        if dev.kind == "pci":
            addr = PciAddress.parse(dev.value)
            fn = host.pci.get(addr)
            if fn is None:
                _missing(spec, dev, field, f"PCI function {addr} is not on this host", w, str(addr))
                continue
            by_entry[i] = [(fn, f"named as pci: {addr}", dev, field)]
        elif dev.kind == "netdev":
            iface = host.netdevs.get(dev.value)
            if iface is None:
                _missing(spec, dev, field, f"network interface {dev.value} is not on this host", w)
                continue
            if iface.pci is None or iface.pci not in host.pci:
                _missing(
                    spec,
                    dev,
                    field,
                    f"network interface {dev.value} is not a PCI function (virtual or on another bus)",
                    w,
                )
                continue
            by_entry[i] = [(host.pci[iface.pci], f"named as netdev: {dev.value}", dev, field)]
    fixed = {f.address for found in by_entry.values() for f, _, _, _ in found}
    vfs = w.vf_devices.get(spec.name, {})  # `vf:` devices' VFs (planning/sriov.py)
    fixed |= {a.vf.pf for a in vfs.values() if a.vf is not None}  # a VF is on its PF's node
    nodes = list(home)
    if auto:
        # The node of the devices named by address, when they have one, is the partition's.
        fixed_nodes = {n for a in fixed if (n := dev_node(host, a)) is not None}
        if fixed_nodes:
            nodes = [n for n in nodes if n in fixed_nodes] or sorted(fixed_nodes)
    for i, dev in enumerate(spec.devices):
        if dev.kind != "id":
            continue
        field = f"devices[{i}]"
        taken = {f.address for found in by_entry.values() for f, _, _, _ in found}
        found = _match_id(spec, dev, host, w, prefer, taken, nodes, one_node=auto)
        if len(found) < dev.count:
            avail = w.by_id.get(dev.value, [])
            listed = [_why_taken(f, host, w, spec.name, dev) for f in avail]
            detail = (
                f"this host has {len(avail):,} {dev.value} function{'s' if len(avail) != 1 else ''}"
                + (f" ({handful(listed)})" if avail else "")
            )
            _missing(
                spec,
                dev,
                field,
                f"wants {dev.count} free {dev.value} function{'s' if dev.count != 1 else ''}, "
                f"found {len(found)}: {detail}",
                w,
            )
        if auto and nodes:
            # The next entries follow the node this one went to.
            went = {n for f in found if (n := dev_node(host, f.address)) in nodes}
            if len(went) == 1:
                nodes = sorted(went)
            for f in found:
                if dev_node(host, f.address) is None:
                    w.notes.append(
                        f"{spec.name}: {f.address} ({dev.value}) has no NUMA node: taken because "
                        f"no free {dev.value} function is local to a node where {spec.name} fits "
                        "(rule 6)"
                    )
        by_entry[i] = [(f, f"named as id: {dev.value}", dev, field) for f in found]
    named = [item for i in sorted(by_entry) for item in by_entry[i]]

    out: list[DeviceAssignment] = []
    taken = set()
    brought_by: dict[
        PciAddress, tuple[DeviceSpec, str]
    ] = {}  # each function: the entry that brings it
    verdicts: list[tuple[ClaimPreview, DeviceSpec, str]] = []
    for fn, reason, dev, field in named:
        if fn.address in taken:
            w.problem(
                spec,
                field,
                f"{spec.name}: {fn.address} is named twice ({reason} resolves to a function already named)",
                HostResources(address=str(fn.address), iommu_group=fn.iommu_group),
            )
            continue
        v = _verdict(fn.address, host, w)
        if v.refusals:
            if fn.iommu_group is None and not host.has_iommu:
                continue  # already said once, as a precondition (rule 7)
            w.problem(
                spec,
                field,
                f"{spec.name}: {fn.address} ({fn.id}) cannot be assigned: {'; '.join(v.refusals)}",
                HostResources(
                    address=str(fn.address), iommu_group=fn.iommu_group, node=fn.numa_node
                ),
            )
            continue
        taken.add(fn.address)
        brought_by[fn.address] = (dev, field)
        verdicts.append((v, dev, field))
        out.append(_assignment(fn, reason, added=False, reset_none_ok=dev.reset_none_ok))
    for i, a in sorted(vfs.items()):
        if a.address in taken:
            w.problem(
                spec,
                f"devices[{i}]",
                f"{spec.name}: {a.address} is named twice ({a.reason} resolves to a function "
                "already named)",
                HostResources(address=str(a.address), iommu_group=a.iommu_group),
            )
            continue
        taken.add(a.address)
        brought_by[a.address] = (spec.devices[i], f"devices[{i}]")
        out.append(a)

    named_addrs = set(taken)
    covered: set[PciAddress] = set()  # functions `reset: none-ok` covers
    for v, dev, field in verdicts:
        if dev.reset_none_ok:
            # It covers the function it is on and what comes with it (its slot, its groups).
            covered.update((v.address, *v.takes_with_it))
        for member in v.added:
            if member in taken:
                continue
            other = host.pci[member]
            taken.add(member)
            brought_by[member] = (dev, field)
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
            w.problem(
                spec,
                field,
                f"{spec.name}: IOMMU group {other.iommu_group} of {v.address} also holds {member} "
                f"({other.id}, {other.driver or 'no driver'}); a group is assigned whole (rule 4): "
                f"name {member} in {spec.name} too",
                HostResources(address=str(member), iommu_group=other.iommu_group),
            )

    # Named first, in manifest order, then what they brought along (Placement.devices).
    out.sort(key=lambda a: (a.added, int(brought_by[a.address][1][len("devices[") : -1])))

    # Resets are checked here, at plan time, by the rule apply's claim asks: a function
    # without a reset of its own is reset through its bus when the partition holds all
    # that bus reaches (partitioner.vfio.preview.without_reset).
    held = [a.address for a in out]
    unreset = set(without_reset(host, held, held))
    for i, a in enumerate(out):
        fn = host.pci.get(a.address)
        if fn is None or fn.own_reset:  # None: a VF apply makes (VFs have FLR, by the spec)
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
        dev, field = brought_by[a.address]
        how = "" if not a.added else f" (it comes with {dev})"
        w.problem(
            spec,
            field,
            f"{spec.name}: {a.address} ({a.vendor_device}) has no reset method{how}: a guest that "
            f"restarts cannot be given a clean device; to accept it, add `reset: none-ok` to the "
            f"device `{dev}` at {dev.where}",
            HostResources(address=str(a.address), iommu_group=a.iommu_group),
        )

    for a in out:
        field = brought_by[a.address][1]
        owner = w.device_owner.get(a.address)
        if owner is not None and owner != spec.name:
            w.problem(
                spec,
                field,
                f"{spec.name} and {owner} both want {a.address} (rule 4: a function has one owner)",
                HostResources(address=str(a.address), iommu_group=a.iommu_group, held_by=owner),
            )
            continue
        if a.iommu_group is None:  # a VF apply makes: a group of its own, known then
            w.device_owner[a.address] = spec.name
            continue
        gowner = w.group_owner.get(a.iommu_group)
        if gowner is not None and gowner != spec.name:
            w.problem(
                spec,
                field,
                f"{spec.name} wants {a.address} in IOMMU group {a.iommu_group}, which {gowner} "
                "already owns (rule 4: a group is owned whole by one partition)",
                HostResources(address=str(a.address), iommu_group=a.iommu_group, held_by=gowner),
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
    home: Sequence[int],
    *,
    one_node: bool,
) -> list[PciFunction]:
    """Free functions matching ``vendor:device``: ones the partition already holds, then ones
    local to its ``home`` nodes (``one_node``: all on one of them where they can be, the first
    node, in address order, that has them all), then ones of no node, then the rest; lowest
    address first within each."""
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
    if prefer:
        for f in functions:
            if len(found) == count:
                return found
            if f.address in prefer and free(f):
                found.append(f)
    want = count - len(found)
    if want <= 0:
        return found
    # Functions once owned stay owned for the rest of the run: skip the taken prefix
    # (per entry kind: a function refused without `reset: none-ok` may suit one with it).
    key = f"{dev.value}/{dev.reset_none_ok}"
    start = w.id_cursor.get(key, 0)
    while start < len(functions) and not free(functions[start]):
        start += 1
    w.id_cursor[key] = start
    local: dict[int, list[PciFunction]] = {n: [] for n in home}
    nodeless: list[PciFunction] = []
    remote: list[PciFunction] = []
    enough: int | None = None  # the home node that has them all
    for i in range(start, len(functions)):  # not a copy of the rest for every partition
        f = functions[i]
        if f in found or not free(f):
            continue
        node = dev_node(host, f.address)
        if node is not None and node in local:
            local[node].append(f)
            if len(local[node]) >= want if one_node else sum(map(len, local.values())) >= want:
                enough = node
                break
        elif node is None:
            if len(nodeless) < want:
                nodeless.append(f)
        elif len(remote) < want:
            remote.append(f)
    if one_node:
        ranked = sorted(
            local,
            key=lambda n: (
                n != enough,
                -len(local[n]),
                str(local[n][0].address) if local[n] else "",
                n,
            ),
        )
        best = local[ranked[0]] if ranked else []
        rest = sorted((f for n in ranked[1:] for f in local[n]), key=lambda f: f.address)
        order = [*best, *nodeless, *rest, *remote]
    else:
        merged = sorted((f for fs in local.values() for f in fs), key=lambda f: f.address)
        order = [*merged, *nodeless, *remote]
    # Chosen by place, handed to the guest in address order.
    return found + sorted(order[:want], key=lambda f: f.address)


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


def _missing(
    spec: PartitionSpec, dev: DeviceSpec, field: str, what: str, w: Work, address: str = ""
) -> None:
    if dev.required:
        w.problem(spec, field, f"{spec.name}: {what}", HostResources(address=address))
    else:
        w.notes.append(f"{spec.name}: optional device left out: {what}")
