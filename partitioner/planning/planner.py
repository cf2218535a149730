"""Placing partitions on the host: ``plan(manifest, host, running) -> Plan``.

Pure and deterministic (design.md, style.md principle 1): it reads nothing
and starts nothing, and the same inputs give the same Plan.  It is greedy and
polynomial: partitions are placed one at a time in a fixed order, each on the
best node that fits, with no search over permutations of nodes or partitions.

The rules it enforces are numbered as in ``manifest.md`` ("Rules a valid plan
obeys on the host"); every problem names its partition and the CPUs, node,
address or group concerned, and all problems are collected before raising.

Placement order:
  1. running partitions whose manifest entry they still satisfy keep exactly
     what they hold (rule 8: adding a partition never moves a running one);
  2. partitions with an explicit CPU list;
  3. the rest, those with devices or a fixed ``numa`` first, then larger
     before smaller, then by name.

Each partition's devices are resolved just before it is placed, from the one
verdict on each function (``partitioner.vfio.preview.claim_preview``, which ``inspect``
shows and ``apply`` asks again before it claims).  A partition that cannot be
placed gives back everything it took while being tried (CPUs, memory, pages,
devices): the next one is judged as if it had not been there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from partitioner.cpuset import CpuSet
from partitioner.errors import PlanError
from partitioner.inventory.model import Host, PciFunction
from partitioner.manifest.model import DeviceSpec, Manifest, PartitionSpec
from partitioner.pci import PciAddress
from partitioner.planning.mmio import settle
from partitioner.planning.model import DeviceAssignment, Placement, Plan, RunningPartition
from partitioner.units import format_size, human_size, page_size_name
from partitioner.vfio.preview import ClaimPreview, claim_preview

# A core is the set of its usable SMT siblings, as a sorted tuple.
Core = tuple[int, ...]


class _NodeRoom:
    """What is still free on one NUMA node while placing."""

    def __init__(
        self, id: int, cores: list[Core], memory_left: int, pages_left: dict[int, int]
    ) -> None:
        self.id = id
        self.memory_left = memory_left  # bytes, after the host's share and placed partitions
        self.pages_left = pages_left  # page size -> pages that are free or reservable
        self.cores = cores  # free whole cores (isolate) or free CPUs grouped by core (share)

    @property
    def cores(self) -> list[Core]:
        return self._cores

    @cores.setter
    def cores(self, value: list[Core]) -> None:
        self._cores = value
        self.free_cpus = sum(len(c) for c in value)


@dataclass
class _Work:
    """Mutable bookkeeping of one planning run."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cpu_owner: dict[int, str] = field(default_factory=dict)
    device_owner: dict[PciAddress, str] = field(default_factory=dict)
    group_owner: dict[int, str] = field(default_factory=dict)
    threads_per_core: int = 1
    by_id: dict[str, list[PciFunction]] = field(default_factory=dict)  # "8086:10d3" -> functions
    verdicts: dict[PciAddress, ClaimPreview] = field(default_factory=dict)  # claim_preview, cached
    id_cursor: dict[str, int] = field(default_factory=dict)  # by_id: first function maybe free


class _Mark:
    """What a planning run holds before one partition is placed, to give it back on failure."""

    def __init__(self, w: _Work, rooms: Mapping[int, _NodeRoom]) -> None:
        self.problems = len(w.problems)
        self.notes = len(w.notes)
        self.cpu_owner = dict(w.cpu_owner)
        self.device_owner = dict(w.device_owner)
        self.group_owner = dict(w.group_owner)
        self.id_cursor = dict(w.id_cursor)
        self.rooms = {
            n: (list(r.cores), r.memory_left, dict(r.pages_left)) for n, r in rooms.items()
        }

    def restore(self, w: _Work, rooms: Mapping[int, _NodeRoom]) -> None:
        """Back to the mark; the problems found since stay (they are the partition's reasons)."""
        del w.notes[self.notes :]
        w.cpu_owner = self.cpu_owner
        w.device_owner = self.device_owner
        w.group_owner = self.group_owner
        w.id_cursor = self.id_cursor
        for n, (cores, memory_left, pages_left) in self.rooms.items():
            rooms[n].cores, rooms[n].memory_left, rooms[n].pages_left = (
                cores,
                memory_left,
                pages_left,
            )


def _give_back_devices(name: str, w: _Work) -> None:
    w.device_owner = {a: o for a, o in w.device_owner.items() if o != name}
    w.group_owner = {g: o for g, o in w.group_owner.items() if o != name}
    w.id_cursor.clear()  # a cursor may have passed what was given back


def plan(
    manifest: Manifest, host: Host, running: Mapping[str, RunningPartition] | None = None
) -> Plan:
    """Place every partition of ``manifest`` on ``host``, or raise PlanError with every reason."""
    running = running or {}
    w = _Work(threads_per_core=host.threads_per_core())
    for fn in sorted(host.pci.values(), key=lambda f: f.address):
        w.by_id.setdefault(fn.id, []).append(fn)
    _check_preconditions(manifest, host, w)

    smt_isolate = manifest.host.smt == "isolate"
    cores_by_node = _cores_by_node(host, smt_isolate)
    host_cpus = _host_reserve(manifest, host, cores_by_node, smt_isolate, w)
    for cpu in host_cpus:
        w.cpu_owner[cpu] = "the host"

    rooms = _rooms(manifest, host, cores_by_node, host_cpus)

    # Running partitions resolve their devices first, so that one that still matches its
    # entry keeps exactly what it holds (rule 8) and `id:` matches stay where they are.
    devices: dict[str, tuple[DeviceAssignment, ...]] = {}
    for name in sorted(n for n in running if n in manifest.partitions):
        devices[name] = _resolve_devices(
            manifest.partitions[name], host, w, prefer=set(running[name].devices)
        )

    placements: dict[str, Placement] = {}
    kept = _keep_running(manifest, host, running, devices, rooms, w)
    placements.update(kept)
    for name in [n for n in devices if n not in kept]:
        _give_back_devices(name, w)  # placed anew below, in placement order
        del devices[name]

    pending = [p for p in manifest.partitions.values() if p.name not in kept]
    pending.sort(
        key=lambda p: (
            p.cpu_list is None,
            not (p.devices or p.numa != "auto"),
            -p.cpu_count,
            -p.memory_bytes,
            p.name,
        )
    )
    for spec in pending:
        # A partition that cannot be placed gives back all it took (CPUs, memory, pages,
        # devices), so that the next one is judged on the host as if it were not there,
        # and each unplaced partition is refused for its own reasons.
        mark = _Mark(w, rooms)
        held = set(running[spec.name].devices) if spec.name in running else set()
        devs = _resolve_devices(spec, host, w, prefer=held)
        placement = _place(spec, host, devs, rooms, smt_isolate, w)
        if placement is None or len(w.problems) > mark.problems:
            mark.restore(w, rooms)
        else:
            placements[spec.name] = placement

    placements, problems, notes = settle(placements, manifest, host)  # BARs, address width
    w.problems += problems
    w.notes += notes
    if w.problems:
        raise PlanError(w.problems)
    return Plan(
        accel=manifest.host.accel,
        smt=manifest.host.smt,
        host_cpus=host_cpus,
        host_memory_bytes=manifest.host.reserve_memory_bytes,
        placements={name: placements[name] for name in sorted(placements)},
        notes=tuple(w.notes),
    )


# -- rule 7: preconditions -----------------------------------------------------


def _check_preconditions(manifest: Manifest, host: Host, w: _Work) -> None:
    if manifest.host.accel == "kvm" and not host.has_kvm:
        w.problems.append(
            "host.accel is kvm but this host has no /dev/kvm: enable virtualization "
            "(VT-x / AMD-V) in the BIOS and load kvm_intel or kvm_amd; "
            "`accel: tcg` is for test beds only"
        )
    wants_devices = [p.name for p in manifest.partitions.values() if p.devices]
    if wants_devices and not host.has_iommu:
        w.problems.append(
            f"{', '.join(wants_devices)} {'asks' if len(wants_devices) == 1 else 'ask'} for PCI devices "
            "but this host has no IOMMU groups (/sys/kernel/iommu_groups is empty): turn on VT-d / "
            "AMD-Vi in the BIOS and boot with intel_iommu=on (Intel) or amd_iommu=on (AMD)"
        )
    total = sum(n.memory_bytes for n in host.nodes.values())
    reserve = manifest.host.reserve_memory_bytes
    if reserve > total:
        w.problems.append(
            f"{manifest.host.reserve_memory_where}: host.reserve.memory is {format_size(reserve)} "
            f"but this host has {human_size(total)} of memory in all (rule 3): the host cannot "
            f"keep more than it has; lower it to what the host needs (the default is 1GiB)"
        )
    sizes = set(host.hugepage_sizes)
    for p in manifest.partitions.values():
        if p.hugepage_bytes is not None and p.hugepage_bytes not in sizes:
            offered = ", ".join(page_size_name(s) for s in host.hugepage_sizes) or "none"
            hint = (
                " (1GiB pages need a CPU with pdpe1gb and the kernel argument hugepagesz=1G)"
                if p.hugepage_bytes == 1 << 30
                else ""
            )
            w.problems.append(
                f"{p.name} wants {page_size_name(p.hugepage_bytes)} hugepages but the kernel offers "
                f"{offered}{hint}; choose an offered size or `hugepages: none`"
            )


def kvm_vcpu_problems(manifest: Manifest, max_vcpus: int) -> list[str]:
    """Under ``accel: kvm``, each partition with more vCPUs than the host's KVM lets one VM
    have (``max_vcpus``: ``KvmCaps.max_vcpus``, which ``filecheck.checked_plan`` asks of
    this machine's KVM): QEMU would refuse to start it, after apply had set the host up."""
    if manifest.host.accel != "kvm":
        return []
    return [
        f"{spec.where}: {spec.name} asks for {spec.cpu_count} CPUs, one vCPU each, but this "
        f"host's KVM lets one VM have at most {max_vcpus} vCPUs (KVM_CAP_MAX_VCPUS): QEMU "
        f"would refuse to start it; give {spec.name} at most {max_vcpus} CPUs (split it into "
        "smaller partitions), or run a kernel whose KVM is built for more (x86: "
        "CONFIG_KVM_MAX_NR_VCPUS)"
        for spec in manifest.partitions.values()
        if spec.cpu_count > max_vcpus
    ]


# -- CPUs ---------------------------------------------------------------------


def _cores_by_node(host: Host, smt_isolate: bool) -> dict[int, list[Core]]:
    """Usable cores per node, lowest-numbered first.

    Under ``smt: isolate`` a core whose online siblings are not all usable
    (some outside the allowed set) is shared with whoever owns the others, so
    it is left out whole (rule 2).  Offline siblings own nothing and do not
    spoil a core.
    """
    usable = host.usable_cpus
    seen: set[int] = set()
    by_node: dict[int, list[Core]] = {n: [] for n in host.nodes}
    for cpu_id in sorted(host.cpus):
        cpu = host.cpus[cpu_id]
        if cpu_id in seen or not (cpu.online and cpu.allowed):
            continue
        siblings = [s for s in (cpu.siblings or CpuSet([cpu_id])) if s in host.cpus]
        online = [s for s in siblings if host.cpus[s].online]
        seen.update(online)
        if cpu_id not in online:
            online.append(cpu_id)
        core = tuple(sorted(online))
        node = cpu.node if cpu.node is not None else min(host.nodes, default=0)
        if smt_isolate:
            if any(s not in usable for s in core):
                continue
            by_node.setdefault(node, []).append(core)
        else:
            by_node.setdefault(node, []).append(tuple(s for s in core if s in usable))
    for cores in by_node.values():
        cores.sort()
    return by_node


def _host_reserve(
    manifest: Manifest,
    host: Host,
    cores_by_node: dict[int, list[Core]],
    smt_isolate: bool,
    w: _Work,
) -> CpuSet:
    spec = manifest.host
    usable = host.usable_cpus
    if spec.reserve_cpu_list is not None:
        wanted = spec.reserve_cpu_list
        missing = wanted - host.online_cpus
        if missing:
            w.problems.append(
                f"host.reserve.cpus names CPUs {missing} that are not online on this host "
                f"(online: {host.online_cpus})"
            )
        if smt_isolate:
            for cpu in wanted & host.online_cpus:
                sib = CpuSet(
                    s for s in host.cpus[cpu].siblings if host.cpus.get(s) and host.cpus[s].online
                )
                if not sib.issubset(wanted):
                    w.problems.append(
                        f"host.reserve.cpus takes CPU {cpu} but not its SMT siblings {sib - wanted} "
                        f"(rule 2, smt: isolate): list the whole core ({sib}) or set `host.smt: share`"
                    )
                    break
        return wanted & host.online_cpus

    # A count (default: one whole core) takes whole cores, lowest-numbered first on
    # each node, going round the nodes so each node keeps a housekeeping core.
    order = _round_robin(cores_by_node)
    if not order:
        w.problems.append("this host has no usable CPUs (none online and allowed)")
        return CpuSet()
    if spec.reserve_cpu_count is None:
        return CpuSet(order[0])
    want = spec.reserve_cpu_count
    taken: list[int] = []
    for core in order:
        if len(taken) >= want:
            break
        taken.extend(core)
    if len(taken) < want:
        w.problems.append(
            f"host.reserve.cpus asks for {want} CPUs but this host has {len(usable)} usable ({usable})"
        )
    elif len(taken) > want:
        w.notes.append(
            f"host.reserve.cpus: {want} rounded up to {len(taken)} CPUs ({CpuSet(taken)}) to keep whole cores"
        )
    return CpuSet(taken)


def _round_robin(cores_by_node: Mapping[int, list[Core]]) -> list[Core]:
    out: list[Core] = []
    depth = max((len(c) for c in cores_by_node.values()), default=0)
    for i in range(depth):
        for node in sorted(cores_by_node):
            if i < len(cores_by_node[node]):
                out.append(cores_by_node[node][i])
    return out


# -- rooms: what each node has left ---------------------------------------------


def _rooms(
    manifest: Manifest, host: Host, cores_by_node: dict[int, list[Core]], host_cpus: CpuSet
) -> dict[int, _NodeRoom]:
    total_mem = sum(n.memory_bytes for n in host.nodes.values()) or 1
    reserve = manifest.host.reserve_memory_bytes
    rooms: dict[int, _NodeRoom] = {}
    for node_id in sorted(host.nodes):
        node = host.nodes[node_id]
        # The host's reserve is shared out in proportion to node size (rule 3).
        share = reserve * node.memory_bytes // total_mem
        pages: dict[int, int] = {}
        for size in host.hugepage_sizes:
            pool = node.hugepages.get(size)
            free_pages = pool.free if pool else 0
            # Pages not yet in the pool can be reserved from the node's free memory.
            pages[size] = free_pages + max(node.free_bytes, 0) // size
        if manifest.host.smt == "isolate":
            cores = [
                c for c in cores_by_node.get(node_id, []) if not any(x in host_cpus for x in c)
            ]
        else:
            # smt: share: the host's CPUs leave their siblings free to be handed out.
            cores = [
                left
                for core in cores_by_node.get(node_id, [])
                if (left := tuple(c for c in core if c not in host_cpus))
            ]
        rooms[node_id] = _NodeRoom(node_id, cores, node.memory_bytes - share, pages)
    return rooms


# -- devices (rules 4 and 5) ----------------------------------------------------


def _device_order(
    manifest: Manifest, running: Mapping[str, RunningPartition]
) -> list[PartitionSpec]:
    """Running partitions resolve their devices first, so ``id:`` matches stay where they are."""
    return sorted(manifest.partitions.values(), key=lambda p: (p.name not in running, p.name))


def _resolve_devices(
    spec: PartitionSpec, host: Host, w: _Work, prefer: set[PciAddress]
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

    # Reset methods are checked here, at plan time, by the same rule apply's claim asks.
    for i, a in enumerate(out):
        if host.pci[a.address].reset_methods:
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
    w: _Work,
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


def _why_taken(fn: PciFunction, host: Host, w: _Work, me: str, dev: DeviceSpec) -> str:
    owner = w.device_owner.get(fn.address)
    if owner is not None and owner != me:
        return f"{fn.address} is {owner}'s"
    reasons = _verdict(fn.address, host, w).blockers(none_ok=dev.reset_none_ok)
    return f"{fn.address}: {'; '.join(reasons)}" if reasons else f"{fn.address} is free"


def _verdict(address: PciAddress, host: Host, w: _Work) -> ClaimPreview:
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


def _missing(spec: PartitionSpec, required: bool, what: str, w: _Work) -> None:
    if required:
        w.problems.append(f"{spec.name}: {what}")
    else:
        w.notes.append(f"{spec.name}: optional device left out: {what}")


# -- keeping running partitions (rule 8) ----------------------------------------


def _keep_running(
    manifest: Manifest,
    host: Host,
    running: Mapping[str, RunningPartition],
    devices: Mapping[str, tuple[DeviceAssignment, ...]],
    rooms: dict[int, _NodeRoom],
    w: _Work,
) -> dict[str, Placement]:
    kept: dict[str, Placement] = {}
    for name in sorted(running):
        spec = manifest.partitions.get(name)
        if spec is None:
            continue
        r = running[name]
        nodes = tuple(n for n, _ in r.memory_per_node)
        if not (
            len(r.cpus) == spec.cpu_count
            and (spec.cpu_list is None or CpuSet(r.cpus) == spec.cpu_list)
            and sum(b for _, b in r.memory_per_node) == spec.memory_bytes
            and r.hugepage_bytes == spec.hugepage_bytes
            and (spec.numa == "auto" or tuple(sorted(spec.numa)) == nodes)
            and tuple(sorted(a.address for a in devices[name])) == tuple(sorted(r.devices))
            and all(host.cpus.get(c) is not None and host.cpus[c].online for c in r.cpus)
            and not any(c in w.cpu_owner for c in r.cpus)
        ):
            continue  # changed: placed anew, and apply shows it as a replace
        for c in r.cpus:
            w.cpu_owner[c] = name
        for room in rooms.values():
            room.cores = [core for core in room.cores if not any(c in w.cpu_owner for c in core)]
        for node, size in r.memory_per_node:
            if node in rooms:
                rooms[node].memory_left -= size
        # Its hugepages are already out of the free pools, so only memory is counted here.
        kept[name] = _placement(spec, host, list(r.cpus), r.memory_per_node, devices[name], ())
    return kept


# -- placing one partition -----------------------------------------------------


def _place(
    spec: PartitionSpec,
    host: Host,
    devices: tuple[DeviceAssignment, ...],
    rooms: dict[int, _NodeRoom],
    smt_isolate: bool,
    w: _Work,
) -> Placement | None:
    notes: list[str] = []
    tpc = w.threads_per_core
    if smt_isolate and spec.cpu_list is None and tpc > 1 and spec.cpu_count % tpc:
        w.problems.append(
            f"{spec.name} asks for {spec.cpu_count} CPUs, but under smt: isolate a partition takes whole "
            f"cores, so its CPU count must be a multiple of {tpc} threads per core (rule 2); "
            f"ask for {spec.cpu_count - spec.cpu_count % tpc or tpc} or {spec.cpu_count + tpc - spec.cpu_count % tpc}, "
            "or set `host.smt: share`"
        )
        return None
    if spec.cpu_list is not None:
        cpus = _take_listed(spec, host, smt_isolate, rooms, w)
        if cpus is None:
            return None
        by_node: dict[int, int] = {}
        for c in cpus:
            node = _node_of(host, c)
            by_node[node] = by_node.get(node, 0) + 1
        if spec.numa != "auto":
            outside = sorted(set(by_node) - set(spec.numa))
            if outside:
                w.problems.append(
                    f"{spec.name}: its CPU list {spec.cpu_list} has CPUs on node(s) "
                    f"{', '.join(map(str, outside))}, outside its numa {', '.join(map(str, spec.numa))}"
                )
                return None
            nodes = tuple(sorted(spec.numa))
            mem = _split(spec, {n: by_node.get(n, 0) for n in nodes})
        else:
            nodes = tuple(sorted(by_node))
            if len(nodes) > 1:
                notes.append(f"spans NUMA nodes {', '.join(map(str, nodes))}, as its CPU list says")
            mem = _split(spec, by_node)
        if not _fit_memory(spec, mem, rooms, w):
            return None  # plan() gives back its CPUs
        return _placement(spec, host, cpus, mem, devices, tuple(notes))

    if spec.numa != "auto":
        return _place_on_nodes(spec, host, devices, tuple(sorted(spec.numa)), rooms, smt_isolate, w)

    # numa: auto (rule 6): one node, the devices' node when they agree.
    dev_nodes = sorted({n for a in devices if (n := _dev_node(host, a.address)) is not None})
    if len(dev_nodes) == 1:
        node = dev_nodes[0]
        why = _fits(spec, rooms.get(node), smt_isolate)
        if why is not None:
            others = [
                f"node {r.id} has {_free_cpus(r)} free"
                for r in rooms.values()
                if r.id != node and _fits(spec, r, smt_isolate) is None
            ]
            named = ", ".join(str(a.address) for a in devices if not a.added)
            w.problems.append(
                f"{spec.name} needs {why}"
                + (f"; {', '.join(others)}" if others else "")
                + f" but {spec.name}'s device{'s' if len(devices) > 1 else ''} {named} "
                f"{'are' if len(devices) > 1 else 'is'} on node {node} (rule 6); free room on node {node}, "
                f"or set `numa:` to a list of nodes to let it span them"
            )
            return None
        return _place_on_nodes(spec, host, devices, (node,), rooms, smt_isolate, w)
    if len(dev_nodes) > 1:
        notes.append(
            f"its devices are on nodes {', '.join(map(str, dev_nodes))}: placed on one node, "
            "remote to some of them"
        )

    fitting = [r for r in rooms.values() if _fits(spec, r, smt_isolate) is None]
    if not fitting:
        with_cpus = [r for r in rooms.values() if host.nodes[r.id].cpus]
        if len(with_cpus) == 1:
            w.problems.append(
                f"{spec.name} needs {_fits(spec, with_cpus[0], smt_isolate)} (rules 1 and 3)"
            )
            return None
        detail = "; ".join(f"{_fits(spec, r, smt_isolate)}" for r in with_cpus)
        w.problems.append(
            f"{spec.name} needs {spec.cpu_count} CPUs and {format_size(spec.memory_bytes)} on one NUMA "
            f"node (rule 6, numa: auto) and no node has room: it would need {detail}; "
            "set `numa:` to a list of nodes to let it span them, or make it smaller"
        )
        return None
    # Best fit: the node with the fewest free CPUs that still fits keeps large
    # holes for large partitions; ties go to the lowest node.
    best = min(fitting, key=lambda r: (_free_cpus(r), r.memory_left, r.id))
    placement = _place_on_nodes(spec, host, devices, (best.id,), rooms, smt_isolate, w)
    if placement is not None and notes:
        placement = _with_notes(placement, notes)
    return placement


def _place_on_nodes(
    spec: PartitionSpec,
    host: Host,
    devices: tuple[DeviceAssignment, ...],
    nodes: tuple[int, ...],
    rooms: dict[int, _NodeRoom],
    smt_isolate: bool,
    w: _Work,
) -> Placement | None:
    """CPUs and memory from exactly ``nodes``: spread as evenly as whole cores allow."""
    unknown = [n for n in nodes if n not in rooms]
    if unknown:
        w.problems.append(
            f"{spec.name}: numa names node(s) {', '.join(map(str, unknown))}, which this host does not have "
            f"(nodes: {', '.join(map(str, sorted(rooms)))})"
        )
        return None
    with_cpus = [n for n in nodes if host.nodes[n].cpus]
    if not with_cpus:
        w.problems.append(f"{spec.name}: none of its nodes {', '.join(map(str, nodes))} has CPUs")
        return None
    picked: dict[int, list[Core]] = {n: [] for n in with_cpus}
    need = spec.cpu_count
    cursor = {n: 0 for n in with_cpus}
    # Under isolate a unit is a whole core; under share a single CPU, taken core by
    # core so that siblings still end up together where they can.
    units_of = {
        n: rooms[n].cores if smt_isolate else [(c,) for core in rooms[n].cores for c in core]
        for n in with_cpus
    }
    progress = True
    while need > 0 and progress:
        progress = False
        for n in with_cpus:
            if need <= 0:
                break
            units = units_of[n]
            while cursor[n] < len(units):
                unit = units[cursor[n]]
                cursor[n] += 1
                if len(unit) <= need:
                    picked[n].append(unit)
                    need -= len(unit)
                    progress = True
                    break
    if need > 0:
        free = {n: _free_cpus(rooms[n]) for n in with_cpus}
        where = ", ".join(
            f"{free[n]} free on node {n} ({CpuSet(c for core in rooms[n].cores for c in core) or 'none'})"
            for n in with_cpus
        )
        extra = ""
        if smt_isolate and w.threads_per_core > 1 and spec.cpu_count % w.threads_per_core:
            extra = (
                f"; under smt: isolate a CPU count must be a multiple of {w.threads_per_core} "
                "threads per core (rule 2)"
            )
        w.problems.append(
            f"{spec.name} needs {spec.cpu_count} CPUs on node{'s' if len(with_cpus) > 1 else ''} "
            f"{', '.join(map(str, with_cpus))}: {where}{extra}"
        )
        return None
    cpus: list[int] = []
    per_node_cpus: dict[int, int] = {}
    for n in with_cpus:
        taken = picked[n]
        if smt_isolate:
            rooms[n].cores = [c for c in rooms[n].cores if c not in taken]
        else:
            used = {c for core in taken for c in core}
            rooms[n].cores = [
                t for core in rooms[n].cores if (t := tuple(c for c in core if c not in used))
            ]
        for core in taken:
            cpus.extend(core)
        per_node_cpus[n] = sum(len(c) for c in taken)
    for n in nodes:
        per_node_cpus.setdefault(n, 0)
    for c in cpus:
        w.cpu_owner[c] = spec.name
    # A numa list binds memory to every node it names: shared out evenly, even to
    # a node that got no CPUs (it becomes a memory-only node of the guest).
    mem = _split(spec, {n: 1 for n in nodes})
    if not _fit_memory(spec, mem, rooms, w):
        return None
    notes: tuple[str, ...] = ()
    if len(nodes) > 1:
        notes = (f"spans NUMA nodes {', '.join(map(str, nodes))}, as its numa list says",)
    return _placement(spec, host, cpus, mem, devices, notes)


def _take_listed(
    spec: PartitionSpec, host: Host, smt_isolate: bool, rooms: dict[int, _NodeRoom], w: _Work
) -> list[int] | None:
    assert spec.cpu_list is not None
    ok = True
    usable = host.usable_cpus
    bad = spec.cpu_list - usable
    if bad:
        offline = CpuSet(c for c in bad if c in host.cpus and not host.cpus[c].online)
        absent = CpuSet(c for c in bad if c not in host.cpus)
        disallowed = bad - offline - absent
        parts = []
        if absent:
            parts.append(f"{absent} not on this host")
        if offline:
            parts.append(f"{offline} offline")
        if disallowed:
            parts.append(f"{disallowed} outside the CPUs this process may use (cgroup cpuset)")
        w.problems.append(
            f"{spec.name}: its CPU list {spec.cpu_list} has CPUs {'; '.join(parts)} (rule 1)"
        )
        ok = False
    for c in spec.cpu_list & usable:
        owner = w.cpu_owner.get(c)
        if owner is not None:
            w.problems.append(f"{spec.name}: CPU {c} of its list is already {owner}'s (rule 1)")
            ok = False
            break
    if ok and smt_isolate:
        for c in spec.cpu_list:
            sib = CpuSet(
                s for s in host.cpus[c].siblings if host.cpus.get(s) and host.cpus[s].online
            )
            if not sib.issubset(spec.cpu_list):
                w.problems.append(
                    f"{spec.name}: its CPU list {spec.cpu_list} takes CPU {c} but not its SMT siblings "
                    f"{sib - spec.cpu_list} (rule 2, smt: isolate): list whole cores or set `host.smt: share`"
                )
                ok = False
                break
    if not ok:
        return None
    cpus = _core_order(host, spec.cpu_list)
    for c in cpus:
        w.cpu_owner[c] = spec.name
    for room in rooms.values():
        if smt_isolate:
            room.cores = [core for core in room.cores if not any(c in spec.cpu_list for c in core)]
        else:
            room.cores = [
                t for core in room.cores if (t := tuple(c for c in core if c not in spec.cpu_list))
            ]
    return cpus


def _core_order(host: Host, cpus: CpuSet) -> list[int]:
    """Node by node, core by core, siblings adjacent: the order vCPUs are numbered in."""
    out: list[int] = []
    seen: set[int] = set()
    for c in sorted(cpus, key=lambda c: (_node_of(host, c), c)):
        if c in seen:
            continue
        core = [
            s for s in sorted(host.cpus[c].siblings or CpuSet([c])) if s in cpus and s not in seen
        ]
        if c not in core:
            core = [c, *core]
        out.extend(core)
        seen.update(core)
    return out


# -- memory (rule 3) -------------------------------------------------------------


def _split(spec: PartitionSpec, cpus_per_node: Mapping[int, int]) -> tuple[tuple[int, int], ...]:
    """Memory per node in proportion to the CPUs taken there (evenly where none are),
    in whole pages of the partition's page size; the remainder goes to the first node."""
    nodes = sorted(cpus_per_node)
    if len(nodes) == 1:
        return ((nodes[0], spec.memory_bytes),)
    unit = spec.hugepage_bytes or 4096
    units = spec.memory_bytes // unit
    weights = {n: cpus_per_node[n] for n in nodes}
    if not any(weights.values()):
        weights = {n: 1 for n in nodes}
    total_w = sum(weights.values())
    share = {n: units * weights[n] // total_w for n in nodes}
    share[nodes[0]] += units - sum(share.values())
    return tuple((n, share[n] * unit) for n in nodes if share[n])


def _fit_memory(
    spec: PartitionSpec, mem: tuple[tuple[int, int], ...], rooms: dict[int, _NodeRoom], w: _Work
) -> bool:
    ok = True
    for node, size in mem:
        room = rooms[node]
        if size > room.memory_left:
            w.problems.append(
                f"{spec.name} needs {format_size(size)} of memory on node {node}, "
                f"{human_size(max(room.memory_left, 0))} is left there after the host's reserve "
                "and the other partitions (rule 3)"
            )
            ok = False
        if spec.hugepage_bytes is not None:
            pages = size // spec.hugepage_bytes
            have = room.pages_left.get(spec.hugepage_bytes, 0)
            if pages > have:
                w.problems.append(
                    f"{spec.name} needs {pages} {page_size_name(spec.hugepage_bytes)} pages on node {node}, "
                    f"{have} are free or reservable there (rule 3); reserve them at boot with "
                    f"hugepagesz={_kernel_size(spec.hugepage_bytes)} hugepages={node}:{pages}"
                )
                ok = False
    if ok:
        for node, size in mem:
            rooms[node].memory_left -= size
            if spec.hugepage_bytes is not None:
                rooms[node].pages_left[spec.hugepage_bytes] -= size // spec.hugepage_bytes
    return ok


def _kernel_size(n: int) -> str:
    return "1G" if n == 1 << 30 else f"{n >> 20}M"


# -- helpers ---------------------------------------------------------------------


def _fits(spec: PartitionSpec, room: _NodeRoom | None, smt_isolate: bool) -> str | None:
    """None if ``spec`` fits on this node alone, else what it needs there and what is free."""
    if room is None:
        return f"{spec.cpu_count} CPUs on a node this host does not have"
    need = spec.cpu_count
    for core in room.cores:
        if not smt_isolate:
            need -= min(len(core), need)
        elif len(core) <= need:
            need -= len(core)
        if need == 0:
            break
    cpus_ok = need == 0
    mem_ok = spec.memory_bytes <= room.memory_left
    pages_ok = spec.hugepage_bytes is None or (
        spec.memory_bytes // spec.hugepage_bytes <= room.pages_left.get(spec.hugepage_bytes, 0)
    )
    if cpus_ok and mem_ok and pages_ok:
        return None
    free = CpuSet(c for core in room.cores for c in core)
    parts = []
    if not cpus_ok:
        parts.append(
            f"{spec.cpu_count} CPUs on node {room.id}, {len(free)} "
            f"{'is' if len(free) == 1 else 'are'} free there" + (f" (CPUs {free})" if free else "")
        )
    if not mem_ok:
        parts.append(
            f"{format_size(spec.memory_bytes)} on node {room.id}, "
            f"{human_size(max(room.memory_left, 0))} is left there"
        )
    if not pages_ok and spec.hugepage_bytes is not None:
        parts.append(
            f"{spec.memory_bytes // spec.hugepage_bytes} {page_size_name(spec.hugepage_bytes)} pages on "
            f"node {room.id}, {room.pages_left.get(spec.hugepage_bytes, 0)} are free or reservable there"
        )
    return " and ".join(parts)


def _free_cpus(room: _NodeRoom) -> int:
    return room.free_cpus


def _node_of(host: Host, cpu: int) -> int:
    node = host.cpus[cpu].node
    return node if node is not None else min(host.nodes, default=0)


def _dev_node(host: Host, address: PciAddress) -> int | None:
    fn = host.pci.get(address)
    if fn is None or fn.numa_node is None or fn.numa_node not in host.nodes:
        return None
    return fn.numa_node


def _topology(host: Host, cpus: list[int], nodes_with_cpus: int) -> tuple[int, int, int]:
    """The guest sees the shape it got: threads per core when every core it got is whole
    and alike, one socket per NUMA node when the cores divide evenly."""
    widths: set[int] = set()
    seen: set[int] = set()
    mine = set(cpus)
    for c in cpus:
        if c in seen:
            continue
        core = [s for s in (host.cpus[c].siblings or CpuSet([c])) if s in mine]
        if c not in core:
            core.append(c)
        full = [
            s
            for s in (host.cpus[c].siblings or CpuSet([c]))
            if host.cpus.get(s) and host.cpus[s].online
        ]
        widths.add(len(core) if len(core) == len(full) else -1)
        seen.update(core)
    threads = widths.pop() if len(widths) == 1 else 1
    if threads < 1:
        threads = 1
    cores = len(cpus) // threads
    sockets = nodes_with_cpus if nodes_with_cpus > 1 and cores % nodes_with_cpus == 0 else 1
    return sockets, cores // sockets, threads


def _placement(
    spec: PartitionSpec,
    host: Host,
    cpus: list[int],
    mem: tuple[tuple[int, int], ...],
    devices: tuple[DeviceAssignment, ...],
    notes: tuple[str, ...],
) -> Placement:
    ordered = _core_order(host, CpuSet(cpus))
    nodes_with_cpus = len({_node_of(host, c) for c in ordered})
    sockets, cores, threads = _topology(host, ordered, nodes_with_cpus)
    return Placement(
        name=spec.name,
        cpus=tuple(ordered),
        sockets=sockets,
        cores=cores,
        threads=threads,
        numa_nodes=tuple(n for n, _ in mem),
        memory_per_node=mem,
        hugepage_bytes=spec.hugepage_bytes,
        devices=devices,
        spec=spec,
        notes=notes,
        cpu_nodes=tuple(_node_of(host, c) for c in ordered),
    )


def _with_notes(p: Placement, notes: list[str]) -> Placement:
    return replace(p, notes=(*p.notes, *notes))
