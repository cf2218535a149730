"""CPUs (rules 1, 2): usable cores per node, the host's reserve, CPUs named by a list, and the
guest topology a set of host CPUs gives."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from partitioner.cpuset import CpuSet
from partitioner.errors import HostResources
from partitioner.inventory.model import Host
from partitioner.manifest.model import Manifest, PartitionSpec
from partitioner.planning.work import Core, NodeRoom, Work, holders, node_of, take_out


def usable_cores(host: Host, smt_isolate: bool) -> dict[int, list[Core]]:
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


def host_reserve(
    manifest: Manifest,
    host: Host,
    cores_by_node: dict[int, list[Core]],
    smt_isolate: bool,
    w: Work,
) -> CpuSet:
    spec = manifest.host
    usable = host.usable_cpus
    if spec.reserve_cpu_list is not None:
        wanted = spec.reserve_cpu_list
        missing = wanted - host.online_cpus
        if missing:
            w.problem(
                None,
                "host.reserve.cpus",
                f"host.reserve.cpus names CPUs {missing} that are not online on this host "
                f"(online: {host.online_cpus})",
                HostResources(cpus=tuple(missing)),
                where=spec.reserve_cpus_where,
            )
        if smt_isolate:
            for cpu in wanted & host.online_cpus:
                sib = CpuSet(
                    s for s in host.cpus[cpu].siblings if host.cpus.get(s) and host.cpus[s].online
                )
                if not sib.issubset(wanted):
                    w.problem(
                        None,
                        "host.reserve.cpus",
                        f"host.reserve.cpus takes CPU {cpu} but not its SMT siblings {sib - wanted} "
                        f"(rule 2, smt: isolate): list the whole core ({sib}) or set `host.smt: share`",
                        HostResources(cpus=tuple(sib)),
                        where=spec.reserve_cpus_where,
                    )
                    break
        return wanted & host.online_cpus

    # A count (default: one whole core) takes whole cores, lowest-numbered first on
    # each node, going round the nodes so each node keeps a housekeeping core.
    order = _round_robin(cores_by_node)
    if not order:
        w.problem(None, "", "this host has no usable CPUs (none online and allowed)")
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
        w.problem(
            None,
            "host.reserve.cpus",
            f"host.reserve.cpus asks for {want} CPUs but this host has {len(usable)} usable ({usable})",
            where=spec.reserve_cpus_where,
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


def take_listed(
    spec: PartitionSpec, host: Host, smt_isolate: bool, rooms: dict[int, NodeRoom], w: Work
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
        w.problem(
            spec,
            "cpus",
            f"{spec.name}: its CPU list {spec.cpu_list} has CPUs {'; '.join(parts)} (rule 1)",
            HostResources(cpus=tuple(bad)),
        )
        ok = False
    held = CpuSet(c for c in spec.cpu_list & usable if c in w.cpu_owner)
    if held:
        said, resources = holders(held, w)
        first = min(held)
        w.problem(
            spec,
            "cpus",
            f"{spec.name}: CPU {first} of its list is already {w.cpu_owner[first]}'s (rule 1)"
            + (f" ({said})" if len(held) > 1 else ""),
            resources,
        )
        ok = False
    if ok and smt_isolate:
        for c in spec.cpu_list:
            sib = CpuSet(
                s for s in host.cpus[c].siblings if host.cpus.get(s) and host.cpus[s].online
            )
            if not sib.issubset(spec.cpu_list):
                w.problem(
                    spec,
                    "cpus",
                    f"{spec.name}: its CPU list {spec.cpu_list} takes CPU {c} but not its SMT siblings "
                    f"{sib - spec.cpu_list} (rule 2, smt: isolate): list whole cores or set `host.smt: share`",
                    HostResources(cpus=tuple(sib)),
                )
                ok = False
                break
    if not ok:
        return None
    cpus = core_order(host, spec.cpu_list)
    for c in cpus:
        w.cpu_owner[c] = spec.name
    take_out(rooms, spec.cpu_list, smt_isolate)
    return cpus


def core_order(host: Host, cpus: CpuSet) -> list[int]:
    """Node by node, core by core, siblings adjacent: the order vCPUs are numbered in."""
    out: list[int] = []
    seen: set[int] = set()
    for c in sorted(cpus, key=lambda c: (node_of(host, c), c)):
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


def guest_topology(host: Host, cpus: list[int], nodes_with_cpus: int) -> tuple[int, int, int]:
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


# -- dynamic partitions (rule 11): vCPU slots, and CPUs added to a running partition ------------


def smt_count_problems(spec: PartitionSpec, smt_isolate: bool, w: Work) -> bool:
    """Under ``smt: isolate`` a partition takes whole cores, so its CPU count and its bounds
    are multiples of the threads per core (rule 2): each one that is not is a problem at its
    field.  True when there is none."""
    tpc = w.threads_per_core
    if not smt_isolate or tpc == 1:
        return True
    ok = True
    n = spec.cpu_count
    if spec.cpu_list is None and n % tpc:
        w.problem(
            spec,
            "cpus",
            f"{spec.name} asks for {n} CPUs, but under smt: isolate a partition takes whole "
            f"cores, so its CPU count must be a multiple of {tpc} threads per core (rule 2); "
            f"ask for {n - n % tpc or tpc} or {n + tpc - n % tpc}, or set `host.smt: share`",
        )
        ok = False
    for field, value, written in (
        ("min_cpus", spec.cpus_min, spec.min_cpus),
        ("max_cpus", spec.cpus_max, spec.max_cpus),
    ):
        if written is not None and value % tpc:
            w.problem(
                spec,
                field,
                f"{spec.name}: {field} is {value}, but under smt: isolate vCPUs come and go a "
                f"whole core at a time, so it must be a multiple of {tpc} threads per core "
                f"(rule 2); use {value - value % tpc or tpc} or {value + tpc - value % tpc}, or "
                "set `host.smt: share`",
            )
            ok = False
    return ok


def slot_nodes_of(
    cpu_nodes: Sequence[int], slots: int, home: Sequence[int], unit: int
) -> tuple[int, ...]:
    """The host node of each of ``slots`` vCPU slots: the present vCPUs' nodes, then the spare
    slots ``unit`` at a time (a whole core under smt: isolate) to the node of ``home`` that has
    the fewest slots so far (ties: the lowest node), so a partition's slots are balanced over
    its nodes as its CPUs are."""
    out = list(cpu_nodes[:slots])
    nodes = sorted(set(home)) or sorted(set(out)) or [0]
    count = {n: out.count(n) for n in nodes}
    while len(out) < slots:
        node = min(nodes, key=lambda n: (count[n], n))
        k = min(unit, slots - len(out))
        out += [node] * k
        count[node] += k
    return tuple(out)


def slot_topology(threads: int, slots: int) -> tuple[int, int, int]:
    """The guest topology of a partition with ``slots`` vCPU slots: one socket of
    ``slots / threads`` cores (``threads`` as its present vCPUs show, 1 when it does not
    divide the slots).  One socket whatever its nodes: spare slots interleave the nodes, and
    the NUMA nodes the guest sees are per vCPU (``slot_nodes``)."""
    if threads < 1 or slots % threads:
        threads = 1
    return 1, slots // threads, threads


def grow_cpus(
    spec: PartitionSpec,
    kept: Sequence[int],
    slot_node: Callable[[int], int],
    host: Host,
    rooms: dict[int, NodeRoom],
    smt_isolate: bool,
    w: Work,
) -> list[int] | None:
    """Host CPUs for the vCPUs a running partition gains (slots ``len(kept)`` to
    ``spec.cpu_count - 1``), in vCPU order, each on its slot's node: the CPUs its new list
    names, or free CPUs of that node (whole cores under smt: isolate, lowest first).  Nothing
    running moves for them (rule 8).  None, with problems at ``cpus``, when they are not there."""
    slots = range(len(kept), spec.cpu_count)
    need: dict[int, int] = {}
    for i in slots:
        need[slot_node(i)] = need.get(slot_node(i), 0) + 1
    taken: dict[int, list[int]] = {}
    if spec.cpu_list is not None:
        found = _listed_growth(spec, kept, host, smt_isolate, w)
        if found is None:
            return None
        for c in found:
            taken.setdefault(node_of(host, c), []).append(c)
        if {n: len(cs) for n, cs in taken.items()} != need:
            w.problem(
                spec,
                "cpus",
                f"{spec.name}: its CPU list adds CPUs {CpuSet(found)}, but the slots of vCPUs "
                f"{slots.start}-{slots.stop - 1} are on node(s) "
                f"{', '.join(map(str, sorted(need)))}: a vCPU added live runs on its slot's node",
                HostResources(cpus=tuple(found)),
            )
            return None
    else:
        ok = True
        for node in sorted(need):
            got = _free_on(rooms.get(node), need[node], smt_isolate)
            if got is None:
                ok = False
                _no_room(
                    spec,
                    kept,
                    node,
                    need[node],
                    [i for i in slots if slot_node(i) == node],
                    host,
                    rooms,
                    w,
                )
            else:
                taken[node] = got
        if not ok:
            return None
    added = {c for cs in taken.values() for c in cs}
    take_out(rooms, added, smt_isolate)
    for c in sorted(added):
        w.cpu_owner[c] = spec.name
    queues = {n: iter(cs) for n, cs in taken.items()}
    return [next(queues[slot_node(i)]) for i in slots]


def _free_on(room: NodeRoom | None, need: int, smt_isolate: bool) -> list[int] | None:
    """``need`` free CPUs of ``room``, lowest first: whole cores under smt: isolate (a core
    larger than what is left is passed over), single CPUs under share; None when too few."""
    if room is None:
        return None
    out: list[int] = []
    for core in room.cores:
        if len(out) == need:
            break
        if not smt_isolate:
            out.extend(core[: need - len(out)])
        elif len(core) <= need - len(out):
            out.extend(core)
    return out if len(out) == need else None


def _no_room(
    spec: PartitionSpec,
    kept: Sequence[int],
    node: int,
    need: int,
    vcpus: list[int],
    host: Host,
    rooms: dict[int, NodeRoom],
    w: Work,
) -> None:
    room = rooms.get(node)
    free = CpuSet(c for core in room.cores for c in core) if room is not None else CpuSet()
    said, resources = holders(sorted(host.nodes[node].cpus) if node in host.nodes else (), w)
    shown = f"vCPU {vcpus[0]}" if len(vcpus) == 1 else f"vCPUs {vcpus[0]}-{vcpus[-1]}"
    w.problem(
        spec,
        "cpus",
        f"{spec.name} grows from {len(kept)} to {spec.cpu_count} CPUs: {shown} need "
        f"{need} free CPU{'s' if need > 1 else ''} on node {node}, the node of their slots, "
        f"and {len(free)} {'is' if len(free) == 1 else 'are'} free there"
        + (f" (CPUs {free})" if free else "")
        + (f"; {said}" if said else "")
        + " (rules 1, 2 and 8: no running partition is moved for it); free CPUs on node "
        f"{node}, or ask for fewer",
        replace(resources, node=node),
    )


def _listed_growth(
    spec: PartitionSpec, kept: Sequence[int], host: Host, smt_isolate: bool, w: Work
) -> list[int] | None:
    """The CPUs a running partition's new list names beyond the ones it keeps, in core
    order, when they are all usable, free and (under smt: isolate) whole cores."""
    assert spec.cpu_list is not None
    new = CpuSet(c for c in spec.cpu_list if c not in set(kept))
    bad = new - host.usable_cpus
    if bad:
        w.problem(
            spec,
            "cpus",
            f"{spec.name}: its CPU list {spec.cpu_list} adds CPUs {bad}, which are offline, "
            "not on this host or outside the CPUs this process may use (rule 1)",
            HostResources(cpus=tuple(bad)),
        )
        return None
    held = CpuSet(c for c in new if c in w.cpu_owner)
    if held:
        said, resources = holders(held, w)
        w.problem(
            spec,
            "cpus",
            f"{spec.name} grows to {spec.cpu_count} CPUs: its CPU list adds {held}, and {said} "
            "(rule 1; no running partition is moved for it)",
            resources,
        )
        return None
    if smt_isolate:
        for c in new:
            sib = CpuSet(
                s for s in host.cpus[c].siblings if host.cpus.get(s) and host.cpus[s].online
            )
            if not sib.issubset(new):
                w.problem(
                    spec,
                    "cpus",
                    f"{spec.name}: its CPU list adds CPU {c} but not its SMT siblings "
                    f"{sib - new} (rule 2, smt: isolate): add whole cores or set `host.smt: share`",
                    HostResources(cpus=tuple(sib)),
                )
                return None
    return core_order(host, new)
