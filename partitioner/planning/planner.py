"""Placing partitions on the host: ``plan(manifest, host, running) -> Plan``.

Pure and deterministic (docs/architecture.md: a pure core): it reads nothing
and starts nothing, and the same inputs give the same Plan.  It is greedy and
polynomial: partitions are placed one at a time in a fixed order, each on the
best node that fits, with no search over permutations of nodes or partitions.

The rules it enforces are numbered as in ``docs/manifest.md`` ("Rules a valid plan
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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from partitioner.cpuset import CpuSet
from partitioner.errors import PlanError, PlanProblem
from partitioner.gcpause import collector_paused
from partitioner.inventory.model import Host
from partitioner.manifest.model import Manifest, PartitionSpec
from partitioner.planning.cpus import grow_cpus, host_reserve, smt_count_problems, usable_cores
from partitioner.planning.devices import resolve_devices
from partitioner.planning.live import hotplugged_after, live_bounds_refusal
from partitioner.planning.memory import fit_growth, split_bounds, split_plugged
from partitioner.planning.mmio import settle
from partitioner.planning.model import (
    DeviceAssignment,
    Placement,
    Plan,
    RunningPartition,
)
from partitioner.planning.place import home_nodes, place, placement_of
from partitioner.planning.sriov import plan_sriov
from partitioner.planning.work import (
    Mark,
    NodeRoom,
    Work,
    dev_node,
    give_back_devices,
    handful,
    located,
    node_of,
    node_rooms,
    take_out,
)
from partitioner.units import format_size, human_size, page_size_name


@collector_paused()
def plan(
    manifest: Manifest, host: Host, running: Mapping[str, RunningPartition] | None = None
) -> Plan:
    """Place every partition of ``manifest`` on ``host``, or raise PlanError with every reason."""
    running = running or {}
    w = Work(threads_per_core=host.threads_per_core())
    for fn in sorted(host.pci.values(), key=lambda f: f.address):
        w.by_id.setdefault(fn.id, []).append(fn)
    _check_preconditions(manifest, host, w)
    sriov = plan_sriov(manifest, host, running, w)  # each `vf:` device's VF, in w.vf_devices

    smt_isolate = manifest.host.smt == "isolate"
    cores_by_node = usable_cores(host, smt_isolate)
    host_cpus = host_reserve(manifest, host, cores_by_node, smt_isolate, w)
    for cpu in host_cpus:
        w.cpu_owner[cpu] = "the host"

    rooms = node_rooms(manifest, host, cores_by_node, host_cpus)

    # Running partitions resolve their devices first, so that one that still matches its
    # entry keeps exactly what it holds (rule 8) and `id:` matches stay where they are.
    devices: dict[str, tuple[DeviceAssignment, ...]] = {}
    for name in sorted(n for n in running if n in manifest.partitions):
        spec = manifest.partitions[name]
        devices[name] = resolve_devices(
            spec,
            host,
            w,
            prefer=set(running[name].devices),
            home=home_nodes(spec, host, rooms, smt_isolate),
        )

    placements: dict[str, Placement] = {}
    kept, growing = _keep_running(manifest, host, running, devices, rooms, smt_isolate, w)
    placements.update(kept)
    staying = set(kept) | {g.spec.name for g in growing}
    for name in [n for n in devices if n not in staying]:
        give_back_devices(name, w)  # placed anew below, in placement order
        del devices[name]

    pending = [p for p in manifest.partitions.values() if p.name not in staying]
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
        if growing and spec.cpu_list is None:
            # Running partitions grow (rule 11) after the explicit lists, which name their
            # CPUs, and before the partitions the planner places where it likes.
            placements.update(_grow(growing, host, rooms, smt_isolate, w))
            growing = []
        # A partition that cannot be placed gives back all it took (CPUs, memory, pages,
        # devices), so that the next one is judged on the host as if it were not there,
        # and each unplaced partition is refused for its own reasons.
        mark = Mark(w, rooms)
        held = set(running[spec.name].devices) if spec.name in running else set()
        devs = resolve_devices(
            spec, host, w, prefer=held, home=home_nodes(spec, host, rooms, smt_isolate)
        )
        placement = place(spec, host, devs, rooms, smt_isolate, w)
        if placement is None or len(w.problems) > mark.problems:
            mark.restore(w, rooms)
        else:
            placements[spec.name] = placement
    placements.update(_grow(growing, host, rooms, smt_isolate, w))

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
        confine=manifest.host.confine,
        sriov=sriov,
    )


# -- rule 7: preconditions -----------------------------------------------------


def _check_preconditions(manifest: Manifest, host: Host, w: Work) -> None:
    if manifest.host.accel == "kvm" and not host.has_kvm:
        w.problem(
            None,
            "host.accel",
            "host.accel is kvm but this host has no /dev/kvm: enable virtualization "
            "(VT-x / AMD-V) in the BIOS and load kvm_intel or kvm_amd; "
            "`accel: tcg` is for test beds only",
        )
    wants_devices = [p.name for p in manifest.partitions.values() if p.devices]
    if wants_devices and not host.has_iommu:
        w.problem(
            None,
            "",
            f"{handful(wants_devices)} {'asks' if len(wants_devices) == 1 else 'ask'} for PCI devices "
            "but this host has no IOMMU groups (/sys/kernel/iommu_groups is empty): turn on VT-d / "
            "AMD-Vi in the BIOS and boot with intel_iommu=on (Intel) or amd_iommu=on (AMD)",
        )
    _check_walls(manifest, host, wants_devices, w)
    total = sum(n.memory_bytes for n in host.nodes.values())
    reserve = manifest.host.reserve_memory_bytes
    if reserve > total:
        w.problem(
            None,
            "host.reserve.memory",
            f"host.reserve.memory is {format_size(reserve)} "
            f"but this host has {human_size(total)} of memory in all (rule 3): the host cannot "
            f"keep more than it has; lower it to what the host needs (the default is 1GiB)",
            where=manifest.host.reserve_memory_where,
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
            w.problem(
                p,
                "hugepages",
                f"{p.name} wants {page_size_name(p.hugepage_bytes)} hugepages but the kernel offers "
                f"{offered}{hint}; choose an offered size or `hugepages: none`",
            )


def _check_walls(manifest: Manifest, host: Host, wants_devices: list[str], w: Work) -> None:
    """Rule 10: what the manifest loosens of the walls between partitions is said on every
    run; a device is not assigned without interrupt remapping unless it was asked for."""
    if not manifest.host.confine:
        w.notes.append(
            "warning: host.confine is false: every partition's QEMU runs as root with every "
            "capability, so a guest that escapes its QEMU owns the host and every other "
            "partition (rule 10); for debugging only, `audit` reports it"
        )
    if not wants_devices or not host.has_iommu:
        return
    who = f"{handful(wants_devices)} {'asks' if len(wants_devices) == 1 else 'ask'} for PCI devices"
    if host.interrupt_remapping is False:
        if manifest.host.allow_unsafe_interrupts:
            w.notes.append(
                f"warning: {who} on a host without interrupt remapping, allowed by "
                "host.allow_unsafe_interrupts: a guest can forge interrupts (MSI writes) "
                "to the host and to other partitions (rule 10)"
            )
        else:
            w.problem(
                None,
                "host.allow_unsafe_interrupts",
                f"{who} but this host has no interrupt remapping (no IR- interrupt chip in "
                "the kernel's interrupt list): a guest could forge interrupts to the host and to other "
                "partitions (rule 10); remove intremap=off / nointremap from the kernel "
                "command line and turn on x2APIC / interrupt remapping (VT-d or AMD-Vi) in "
                "the firmware, or, knowing the risk, set host.allow_unsafe_interrupts: true",
            )
    elif host.interrupt_remapping is None:
        w.notes.append(
            f"{who}: whether this host remaps interrupts cannot be told (the kernel's "
            "interrupt list cannot be read); `partition host check` says more"
            + (
                " (allowed without it by host.allow_unsafe_interrupts)"
                if manifest.host.allow_unsafe_interrupts
                else ""
            )
        )


def kvm_vcpu_problems(manifest: Manifest, max_vcpus: int) -> list[PlanProblem]:
    """Under ``accel: kvm``, each partition with more vCPUs than the host's KVM lets one VM
    have (``max_vcpus``: ``KvmCaps.max_vcpus``, which ``planning.files.checked_plan`` asks of
    this machine's KVM): QEMU would refuse to start it, after apply had set the host up."""
    if manifest.host.accel != "kvm":
        return []
    return [
        located(
            spec,
            "cpus",
            f"{spec.name} asks for {spec.cpu_count} CPUs, one vCPU each, but this "
            f"host's KVM lets one VM have at most {max_vcpus} vCPUs (KVM_CAP_MAX_VCPUS): QEMU "
            f"would refuse to start it; give {spec.name} at most {max_vcpus} CPUs (split it into "
            "smaller partitions), or run a kernel whose KVM is built for more (x86: "
            "CONFIG_KVM_MAX_NR_VCPUS)",
        )
        for spec in manifest.partitions.values()
        if spec.cpus_max > max_vcpus and not spec.dynamic_cpus
    ] + [
        located(
            spec,
            "max_cpus",
            f"{spec.name} has max_cpus {spec.cpus_max}: it is started with that many vCPU "
            f"slots, but this host's KVM lets one VM have at most {max_vcpus} vCPUs "
            f"(KVM_CAP_MAX_VCPUS): QEMU would refuse to start it; lower max_cpus to "
            f"{max_vcpus} or less, or run a kernel whose KVM is built for more (x86: "
            "CONFIG_KVM_MAX_NR_VCPUS)",
        )
        for spec in manifest.partitions.values()
        if spec.cpus_max > max_vcpus and spec.dynamic_cpus
    ]


# -- keeping running partitions (rule 8) ----------------------------------------


def _keep_running(
    manifest: Manifest,
    host: Host,
    running: Mapping[str, RunningPartition],
    devices: Mapping[str, tuple[DeviceAssignment, ...]],
    rooms: dict[int, NodeRoom],
    smt_isolate: bool,
    w: Work,
) -> tuple[dict[str, Placement], list[_Growth]]:
    """The running partitions that stay where they are: those that still match their entry
    (rule 8), and those whose entry changed only in what rule 11 changes live, within their
    bounds and slots.  The second keep their CPUs, nodes and devices and give back what they
    lose; what they gain is returned as a :class:`_Growth`, taken later by :func:`_grow`."""
    kept: dict[str, Placement] = {}
    growing: list[_Growth] = []
    for name in sorted(running):
        spec = manifest.partitions.get(name)
        if spec is None:
            continue
        r = running[name]
        old = r.placement
        nodes = tuple(n for n, _ in r.memory_per_node)
        exact = (
            len(r.cpus) == spec.cpu_count
            and (spec.cpu_list is None or CpuSet(r.cpus) == spec.cpu_list)
            and sum(b for _, b in r.memory_per_node) == spec.memory_bytes
            and r.hugepage_bytes == spec.hugepage_bytes
            and (spec.numa == "auto" or tuple(sorted(spec.numa)) == nodes)
            and tuple(sorted(a.address for a in devices[name])) == tuple(sorted(r.devices))
            and all(host.cpus.get(c) is not None and host.cpus[c].online for c in r.cpus)
            and not any(c in w.cpu_owner for c in r.cpus)
        )
        dynamic = _dynamic(spec) or (old is not None and _dynamic(old.spec))
        if old is not None and (dynamic or not exact) and _live(spec, old, devices[name], host, w):
            grow = _keep_live(spec, old, devices[name], host, rooms, smt_isolate, w)
            # A count that is not whole cores is a problem, and nothing is taken for it.
            whole = smt_count_problems(spec, smt_isolate, w)
            if grow.pending and whole:
                growing.append(grow)
            else:
                kept[name] = grow.placement(grow.kept, host)
            continue
        if not exact or (dynamic and old is not None):
            # Changed (a dynamic one beyond what is live: its bounds): placed anew, and apply
            # shows it as a replace.
            continue
        for c in r.cpus:
            w.cpu_owner[c] = name
        take_out(rooms, set(r.cpus), smt_isolate)
        for node, size in r.memory_per_node:
            if node in rooms:
                rooms[node].memory_left -= size
        # Its hugepages are already out of the free pools, so only memory is counted here.
        # (A dynamic one here is known by its resources only: its bounds shared out anew.)
        weights = {n: sum(1 for c in r.cpus if node_of(host, c) == n) for n in nodes}
        fixed, ceiling = split_bounds(spec, weights) if nodes else ((), ())
        kept[name] = placement_of(
            spec,
            host,
            list(r.cpus),
            r.memory_per_node,
            devices[name],
            (),
            fixed=fixed,
            ceiling=ceiling,
            unit=w.threads_per_core if smt_isolate else 1,
        )
    return kept, growing


def _dynamic(spec: PartitionSpec) -> bool:
    return spec.dynamic_cpus or spec.dynamic_memory or spec.hotplug_slots > 0


def _live(
    spec: PartitionSpec,
    old: Placement,
    devices: tuple[DeviceAssignment, ...],
    host: Host,
    w: Work,
) -> bool:
    """Whether a running partition placed as ``old`` can become ``spec`` where it is: the same
    page size, nodes and bounds (``live_bounds_refusal``), the vCPUs it keeps still its to
    keep, an explicit list that keeps the CPUs of the lower vCPUs and adds CPUs on the nodes
    of their slots, and devices that fit its spare slots, whole IOMMU groups."""
    if live_bounds_refusal(old.spec, spec) is not None:
        return False
    n = spec.cpu_count
    if n > old.max_vcpus:
        return False
    keep = old.cpus[: min(n, len(old.cpus))]
    usable = host.usable_cpus
    if any(c not in usable or c in w.cpu_owner for c in keep):
        return False
    if spec.cpu_list is not None:
        listed = set(spec.cpu_list)
        if not listed >= set(keep) or len(listed) != n:
            return False
        slots: dict[int, int] = {}
        for i in range(len(keep), n):
            slots[old.slot_node(i)] = slots.get(old.slot_node(i), 0) + 1
        added: dict[int, int] = {}
        for c in listed - set(keep):
            if c not in host.cpus:
                return False
            added[node_of(host, c)] = added.get(node_of(host, c), 0) + 1
        if added != slots:
            return False
    before = {d.address for d in old.devices}
    now = {d.address for d in devices}
    had = {d.iommu_group for d in old.devices}
    has = {d.iommu_group for d in devices}
    if any(d.iommu_group in had for d in devices if d.address not in before):
        return False
    if any(d.iommu_group in has for d in old.devices if d.address not in now):
        return False
    return len(hotplugged_after(old, devices)) <= spec.hotplug_slots


@dataclass
class _Growth:
    """A running partition kept where it is, and what it gains once the explicit lists are
    placed."""

    spec: PartitionSpec
    old: Placement
    devices: tuple[DeviceAssignment, ...]
    kept: tuple[int, ...]  # the CPUs of the vCPUs it keeps
    memory: tuple[tuple[int, int], ...]  # (node, bytes) it has after the change
    held: tuple[tuple[int, int], ...]  # (node, bytes) counted already: the lesser of before/after

    @property
    def pending(self) -> bool:
        return self.spec.cpu_count > len(self.kept) or self.memory != self.held

    def placement(self, cpus: Sequence[int], host: Host) -> Placement:
        spec, old = self.spec, self.old
        notes = []
        nodes = set(old.numa_nodes)
        had = {o.address for o in old.devices}
        for d in self.devices:
            node = dev_node(host, d.address)
            if d.address not in had and node is not None and node not in nodes:
                notes.append(
                    f"{d.address} attached while it runs is on node {node}, remote to its "
                    f"node{'s' if len(nodes) > 1 else ''} {', '.join(map(str, sorted(nodes)))} "
                    "(rule 6: a running partition does not move to its devices)"
                )
        return replace(
            old,
            spec=spec,
            cpus=tuple(cpus),
            cpu_nodes=tuple(node_of(host, c) for c in cpus),
            memory_per_node=self.memory,
            devices=self.devices,
            hotplugged=hotplugged_after(old, self.devices),
            notes=tuple(notes),
        )


def _keep_live(
    spec: PartitionSpec,
    old: Placement,
    devices: tuple[DeviceAssignment, ...],
    host: Host,
    rooms: dict[int, NodeRoom],
    smt_isolate: bool,
    w: Work,
) -> _Growth:
    """Keep what a running partition keeps through a live change: the CPUs of its lower
    vCPUs, and on each node the lesser of its memory before and after."""
    keep = old.cpus[: min(spec.cpu_count, len(old.cpus))]
    for c in keep:
        w.cpu_owner[c] = spec.name
    take_out(rooms, set(keep), smt_isolate)
    if spec.dynamic_memory:
        plugged = dict(
            split_plugged(
                spec.memory_bytes - spec.memory_min, old.dynamic_room_per_node, old.virtio_mem_block
            )
        )
        memory = tuple((n, b + plugged.get(n, 0)) for n, b in old.fixed_memory_per_node)
    else:
        memory = old.memory_per_node
    had = dict(old.memory_per_node)
    held = tuple((n, min(b, had.get(n, 0))) for n, b in memory)
    for node, size in held:
        if node in rooms:
            rooms[node].memory_left -= size
    return _Growth(spec, old, devices, keep, memory, held)


def _grow(
    growing: list[_Growth],
    host: Host,
    rooms: dict[int, NodeRoom],
    smt_isolate: bool,
    w: Work,
) -> dict[str, Placement]:
    """What running partitions gain live: CPUs on the nodes of their slots, memory on their
    nodes; none is moved (rule 8).  What does not fit is a problem at ``cpus`` or ``memory``
    naming what is there and who holds it."""
    out: dict[str, Placement] = {}
    for g in growing:
        cpus: list[int] = list(g.kept)
        if g.spec.cpu_count > len(g.kept):
            added = grow_cpus(g.spec, g.kept, g.old.slot_node, host, rooms, smt_isolate, w)
            cpus += added or []
        fit_growth(g.spec, g.held, g.memory, rooms, w)
        out[g.spec.name] = g.placement(cpus, host)
    return out
