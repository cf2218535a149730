"""Placing one partition: the node(s) it goes on, its CPUs, memory and devices, as a Placement."""

from __future__ import annotations

from dataclasses import replace

from partitioner.cpuset import CpuSet
from partitioner.errors import HostResources
from partitioner.inventory.model import Host
from partitioner.manifest.model import PartitionSpec
from partitioner.planning.cpus import (
    core_order,
    guest_topology,
    slot_nodes_of,
    slot_topology,
    smt_count_problems,
    take_listed,
)
from partitioner.planning.memory import fit_memory, split_bounds, split_memory
from partitioner.planning.model import DeviceAssignment, Placement
from partitioner.planning.work import (
    Core,
    NodeRoom,
    Work,
    dev_node,
    fits,
    fits_alone,
    fits_on_all,
    free_cpus,
    handful,
    holders,
    node_of,
    short_field,
)
from partitioner.units import format_size


def home_nodes(
    spec: PartitionSpec, host: Host, rooms: dict[int, NodeRoom], smt_isolate: bool
) -> tuple[int, ...]:
    """The nodes ``spec`` can go on, where a device it asks for by ``id:`` is best taken (rule
    6): the nodes of its CPU list, its numa list, or under ``numa: auto`` each node where its
    CPUs and memory fit as the host is now.  Asked only of a partition with such a device."""
    if not any(d.kind == "id" for d in spec.devices):
        return ()
    if spec.cpu_list is not None:
        return tuple(sorted({node_of(host, c) for c in spec.cpu_list if c in host.cpus}))
    if spec.numa != "auto":
        return tuple(sorted(spec.numa))
    return tuple(r.id for r in rooms.values() if fits(spec, r, smt_isolate))


def place(
    spec: PartitionSpec,
    host: Host,
    devices: tuple[DeviceAssignment, ...],
    rooms: dict[int, NodeRoom],
    smt_isolate: bool,
    w: Work,
) -> Placement | None:
    notes: list[str] = []
    if not smt_count_problems(spec, smt_isolate, w):
        return None
    unit = w.threads_per_core if smt_isolate else 1
    if spec.cpu_list is not None:
        cpus = take_listed(spec, host, smt_isolate, rooms, w)
        if cpus is None:
            # Its memory is judged too, where its listed CPUs are (every problem at once).
            listed: dict[int, int] = {}
            for c in spec.cpu_list:
                if c in host.cpus:
                    listed[node_of(host, c)] = listed.get(node_of(host, c), 0) + 1
            if spec.numa != "auto":
                listed = {n: listed.get(n, 0) for n in spec.numa}
            if listed and all(n in rooms for n in listed):
                fit_memory(spec, split_memory(spec, listed), rooms, w)
            return None
        by_node: dict[int, int] = {}
        for c in cpus:
            node = node_of(host, c)
            by_node[node] = by_node.get(node, 0) + 1
        weights: dict[int, int] = by_node
        if spec.numa != "auto":
            outside = sorted(set(by_node) - set(spec.numa))
            if outside:
                w.problem(
                    spec,
                    "numa",
                    f"{spec.name}: its CPU list {spec.cpu_list} has CPUs on node(s) "
                    f"{', '.join(map(str, outside))}, outside its numa {', '.join(map(str, spec.numa))}",
                )
                return None
            nodes = tuple(sorted(spec.numa))
            weights = {n: by_node.get(n, 0) for n in nodes}
            mem = split_memory(spec, weights)
        else:
            nodes = tuple(sorted(by_node))
            if len(nodes) > 1:
                notes.append(f"spans NUMA nodes {', '.join(map(str, nodes))}, as its CPU list says")
            mem = split_memory(spec, by_node)
        if not fit_memory(spec, mem, rooms, w):
            return None  # plan() gives back its CPUs
        fixed, ceiling = split_bounds(spec, weights)
        return placement_of(
            spec, host, cpus, mem, devices, tuple(notes), fixed=fixed, ceiling=ceiling, unit=unit
        )

    if spec.numa != "auto":
        return _place_on_nodes(spec, host, devices, tuple(sorted(spec.numa)), rooms, smt_isolate, w)

    # numa: auto (rule 6): one node, the devices' node when they agree.
    # A VF is on its PF's node, made or not (rule 6).
    dev_nodes = sorted(
        {n for a in devices if (n := dev_node(host, a.vf.pf if a.vf else a.address)) is not None}
    )
    if len(dev_nodes) == 1:
        node = dev_nodes[0]
        room = rooms.get(node)
        why = (
            None
            if room is not None and fits(spec, room, smt_isolate)
            else fits_alone(spec, room, smt_isolate)
        )
        if why is not None:
            others = [
                f"node {r.id} has {free_cpus(r)} free"
                for r in rooms.values()
                if r.id != node and fits(spec, r, smt_isolate)
            ]
            named = [str(a.address) for a in devices if not a.added]
            said, resources = _held_on(host, (node,), w)
            field = short_field(spec, rooms.get(node), smt_isolate)
            w.problem(
                spec,
                field,
                f"{spec.name} needs {why}"
                + (f" ({said})" if said and field == "cpus" else "")
                + (f"; {handful(others)}" if others else "")
                + f" but {spec.name}'s device{'s' if len(named) > 1 else ''} {handful(named)} "
                f"{'are' if len(named) > 1 else 'is'} on node {node} (rule 6); free room on node {node}"
                + (
                    ", or set `numa:` to a list of nodes to let it span them"
                    if fits_on_all(spec, rooms, smt_isolate)
                    else ""
                ),
                replace(resources, node=node, address=named[0] if len(named) == 1 else ""),
            )
            return None
        return _place_on_nodes(spec, host, devices, (node,), rooms, smt_isolate, w)
    if len(dev_nodes) > 1:
        notes.append(
            f"its devices are on nodes {', '.join(map(str, dev_nodes))}: placed on one node, "
            "remote to some of them"
        )

    fitting = [r for r in rooms.values() if fits(spec, r, smt_isolate)]
    if not fitting:
        with_cpus = [r for r in rooms.values() if host.nodes[r.id].cpus]
        fields = sorted({short_field(spec, r, smt_isolate) for r in with_cpus})
        said, resources = _held_on(host, tuple(r.id for r in with_cpus), w)
        held = f" ({said})" if said and "cpus" in fields else ""
        if len(with_cpus) == 1:
            w.problem(
                spec,
                short_field(spec, with_cpus[0], smt_isolate),
                f"{spec.name} needs {fits_alone(spec, with_cpus[0], smt_isolate)}{held} (rules 1 and 3)",
                replace(resources, node=with_cpus[0].id),
            )
            return None
        detail = handful([f"{fits_alone(spec, r, smt_isolate)}" for r in with_cpus], sep="; ")
        field = fields[0]
        if fits_on_all(spec, rooms, smt_isolate):
            fix = "set `numa:` to a list of nodes to let it span them, or make it smaller"
        else:
            fix = (
                "the host has not that much free on all its nodes together, so no `numa:` list "
                "can help: make it smaller, or free room"
            )
        w.problem(
            spec,
            field,
            f"{spec.name} needs {spec.cpu_count} CPUs and {format_size(spec.memory_bytes)} on one NUMA "
            f"node (rule 6, numa: auto) and no node has room: it would need {detail}{held}; {fix}",
            resources,
        )
        return None
    # Best fit: the node with the fewest free CPUs that still fits keeps large
    # holes for large partitions; ties go to the lowest node.
    best = min(fitting, key=lambda r: (free_cpus(r), r.memory_left, r.id))
    placement = _place_on_nodes(spec, host, devices, (best.id,), rooms, smt_isolate, w)
    if placement is not None and notes:
        placement = _with_notes(placement, notes)
    return placement


def _place_on_nodes(
    spec: PartitionSpec,
    host: Host,
    devices: tuple[DeviceAssignment, ...],
    nodes: tuple[int, ...],
    rooms: dict[int, NodeRoom],
    smt_isolate: bool,
    w: Work,
) -> Placement | None:
    """CPUs and memory from exactly ``nodes``: spread as evenly as whole cores allow."""
    unknown = [n for n in nodes if n not in rooms]
    if unknown:
        w.problem(
            spec,
            "numa",
            f"{spec.name}: numa names node(s) {', '.join(map(str, unknown))}, which this host does not have "
            f"(nodes: {', '.join(map(str, sorted(rooms)))})",
        )
        return None
    with_cpus = [n for n in nodes if host.nodes[n].cpus]
    if not with_cpus:
        w.problem(
            spec, "numa", f"{spec.name}: none of its nodes {', '.join(map(str, nodes))} has CPUs"
        )
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
        free = {n: free_cpus(rooms[n]) for n in with_cpus}
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
        said, resources = _held_on(host, tuple(with_cpus), w)
        w.problem(
            spec,
            "cpus",
            f"{spec.name} needs {spec.cpu_count} CPUs on node{'s' if len(with_cpus) > 1 else ''} "
            f"{', '.join(map(str, with_cpus))}: {where}{extra}" + (f"; {said}" if said else ""),
            replace(resources, node=with_cpus[0]) if len(with_cpus) == 1 else resources,
        )
        # Its memory is judged too, on its own (every problem at once); plan() gives back
        # whatever this takes.
        fit_memory(spec, split_memory(spec, {n: 1 for n in nodes}), rooms, w)
        return None
    cpus: list[int] = []
    per_node_cpus: dict[int, int] = {}
    for n in with_cpus:
        taken = picked[n]
        count = sum(len(c) for c in taken)
        if smt_isolate:
            rooms[n].took([c for c in rooms[n].cores if c not in taken], count)
        else:
            used = {c for core in taken for c in core}
            rooms[n].took(
                [t for core in rooms[n].cores if (t := tuple(c for c in core if c not in used))],
                count,
            )
        for core in taken:
            cpus.extend(core)
        per_node_cpus[n] = count
    for n in nodes:
        per_node_cpus.setdefault(n, 0)
    for c in cpus:
        w.cpu_owner[c] = spec.name
    # A numa list binds memory to every node it names: shared out evenly, even to
    # a node that got no CPUs (it becomes a memory-only node of the guest).
    weights = {n: 1 for n in nodes}
    mem = split_memory(spec, weights)
    if not fit_memory(spec, mem, rooms, w):
        return None
    notes: tuple[str, ...] = ()
    if len(nodes) > 1:
        notes = (f"spans NUMA nodes {', '.join(map(str, nodes))}, as its numa list says",)
    fixed, ceiling = split_bounds(spec, weights)
    slot_unit = w.threads_per_core if smt_isolate else 1
    return placement_of(
        spec, host, cpus, mem, devices, notes, fixed=fixed, ceiling=ceiling, unit=slot_unit
    )


def _held_on(host: Host, nodes: tuple[int, ...], w: Work) -> tuple[str, HostResources]:
    """Who holds the CPUs of ``nodes`` that are not free: what a partition that does not fit
    there would have needed."""
    return holders((c for n in nodes for c in sorted(host.nodes[n].cpus)), w)


def placement_of(
    spec: PartitionSpec,
    host: Host,
    cpus: list[int],
    mem: tuple[tuple[int, int], ...],
    devices: tuple[DeviceAssignment, ...],
    notes: tuple[str, ...],
    *,
    fixed: tuple[tuple[int, int], ...] = (),
    ceiling: tuple[tuple[int, int], ...] = (),
    unit: int = 1,
) -> Placement:
    """The placement of ``spec`` on ``cpus`` (numbered core by core) and ``mem``.  With dynamic
    memory, ``fixed`` and ``ceiling`` are its fixed part and ceiling per node; with dynamic
    CPUs it gets ``spec.cpus_max`` slots, the spare ones ``unit`` CPUs at a time (a whole core
    under smt: isolate) on its nodes (:func:`slot_nodes_of`)."""
    ordered = core_order(host, CpuSet(cpus))
    nodes_with_cpus = len({node_of(host, c) for c in ordered})
    sockets, cores, threads = guest_topology(host, ordered, nodes_with_cpus)
    cpu_nodes = tuple(node_of(host, c) for c in ordered)
    slots: tuple[int, ...] = ()
    if spec.dynamic_cpus:
        home = [n for n, _ in mem if n in host.nodes and host.nodes[n].cpus] or sorted(
            set(cpu_nodes)
        )
        slots = slot_nodes_of(cpu_nodes, spec.cpus_max, home, unit)
        sockets, cores, threads = slot_topology(threads, spec.cpus_max)
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
        cpu_nodes=cpu_nodes,
        vcpu_slots=spec.cpus_max if spec.dynamic_cpus else 0,
        slot_nodes=slots,
        fixed_per_node=fixed,
        max_per_node=ceiling,
    )


def _with_notes(p: Placement, notes: list[str]) -> Placement:
    return replace(p, notes=(*p.notes, *notes))
