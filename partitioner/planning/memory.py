"""Memory (rule 3): a partition's memory split over its nodes and fitted into what each has left."""

from __future__ import annotations

from collections.abc import Mapping

from partitioner.errors import HostResources
from partitioner.manifest.model import PartitionSpec
from partitioner.planning.work import NodeRoom, Work
from partitioner.units import (
    format_size,
    human_size,
    kernel_page_size,
    page_size_name,
    virtio_mem_block,
)


def _shares(units: int, cpus_per_node: Mapping[int, int]) -> dict[int, int]:
    """``units`` shared out in proportion to the weights (evenly when all are 0); the
    remainder goes to the first node."""
    nodes = sorted(cpus_per_node)
    weights = {n: cpus_per_node[n] for n in nodes}
    if not any(weights.values()):
        weights = {n: 1 for n in nodes}
    total_w = sum(weights.values())
    share = {n: units * weights[n] // total_w for n in nodes}
    share[nodes[0]] += units - sum(share.values())
    return share


def split_memory(
    spec: PartitionSpec, cpus_per_node: Mapping[int, int]
) -> tuple[tuple[int, int], ...]:
    """Memory per node in proportion to the CPUs taken there (evenly where none are),
    in whole pages of the partition's page size; the remainder goes to the first node.
    With dynamic memory: what the guest has at start, fixed part and plugged part
    (:func:`split_dynamic`)."""
    if spec.dynamic_memory:
        return split_dynamic(spec, cpus_per_node)[1]
    nodes = sorted(cpus_per_node)
    if len(nodes) == 1:
        return ((nodes[0], spec.memory_bytes),)
    unit = spec.hugepage_bytes or 4096
    share = _shares(spec.memory_bytes // unit, cpus_per_node)
    return tuple((n, share[n] * unit) for n in nodes if share[n])


def split_bounds(
    spec: PartitionSpec, cpus_per_node: Mapping[int, int]
) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
    """(fixed part per node, ceiling per node) of a partition with dynamic memory, shared
    out as :func:`split_memory` shares its memory; ((), ()) for static memory."""
    if not spec.dynamic_memory:
        return (), ()
    fixed, _, ceiling = split_dynamic(spec, cpus_per_node)
    return fixed, ceiling


Split = tuple[tuple[int, int], ...]


def split_dynamic(
    spec: PartitionSpec, cpus_per_node: Mapping[int, int]
) -> tuple[Split, Split, Split]:
    """(fixed, now, ceiling) per node of a partition with dynamic memory.

    The fixed part (``min_memory``) is shared out like static memory, in whole pages; the
    nodes it lands on are the partition's memory nodes.  The dynamic room (``max_memory -
    min_memory``) is shared out between those nodes with the same weights, in whole
    virtio-mem blocks (:func:`units.virtio_mem_block`), and what is plugged at start
    (``memory - min_memory``) is shared out over the rooms (:func:`split_plugged`)."""
    nodes = sorted(cpus_per_node)
    page = spec.hugepage_bytes or 4096
    block = virtio_mem_block(spec.hugepage_bytes)
    fixed_share = _shares(spec.memory_min // page, cpus_per_node)
    kept = [n for n in nodes if fixed_share[n]] or nodes[:1]
    fixed = tuple((n, fixed_share[n] * page) for n in kept)
    room_share = _shares(
        (spec.memory_max - spec.memory_min) // block, {n: cpus_per_node[n] for n in kept}
    )
    room = tuple((n, room_share[n] * block) for n in kept)
    plugged = dict(split_plugged(spec.memory_bytes - spec.memory_min, room, block))
    now = tuple((n, b + plugged[n]) for n, b in fixed)
    ceiling = tuple((n, b + dict(room)[n]) for n, b in fixed)
    return fixed, now, ceiling


def split_plugged(total: int, room: Split, block: int) -> Split:
    """``total`` bytes of plugged memory shared out over the nodes' dynamic ``room`` (node,
    bytes): in proportion to each node's room, in whole ``block``s, the remainder to the first
    nodes that still have room.  The same total always gives the same split, whether a
    partition starts with it or is changed to it live."""
    units = total // block
    rooms = {n: r // block for n, r in room}
    whole = sum(rooms.values())
    if not whole:
        return tuple((n, 0) for n, _ in room)
    share = {n: units * r // whole for n, r in rooms.items()}
    left = units - sum(share.values())
    for n, r in rooms.items():
        more = min(left, r - share[n])
        share[n] += more
        left -= more
    return tuple((n, share[n] * block) for n, _ in room)


def fit_growth(
    spec: PartitionSpec,
    before: Split,
    after: Split,
    rooms: dict[int, NodeRoom],
    w: Work,
) -> bool:
    """A running partition's memory grown live from ``before`` to ``after`` (node, bytes):
    what it takes more on each node fits there (rule 3), hugepages counted as for a new
    partition; problems at its ``memory``.  Its memory up to ``before`` is already counted."""
    had = dict(before)
    grow = [(n, b - had.get(n, 0)) for n, b in after if b > had.get(n, 0)]
    total = format_size(sum(b for _, b in after))
    ok = True
    for node, more in grow:
        room = rooms[node]
        if more > room.memory_left:
            w.problem(
                spec,
                "memory",
                f"{spec.name} grows to {total}: it needs {format_size(more)} more on node "
                f"{node}, {human_size(max(room.memory_left, 0))} is left there after the host's "
                "reserve and the other partitions (rule 3); a running partition's memory grows "
                "on its own nodes only",
                HostResources(node=node),
            )
            ok = False
        if spec.hugepage_bytes is not None:
            pages = more // spec.hugepage_bytes
            have = room.pages_left.get(spec.hugepage_bytes, 0)
            if pages > have:
                size = page_size_name(spec.hugepage_bytes)
                w.problem(
                    spec,
                    "memory",
                    f"{spec.name} grows to {total}: it needs {pages} more {size} pages on node "
                    f"{node}, {have} are free or reservable there (rule 3); reserve them at boot "
                    f"with hugepagesz={kernel_page_size(spec.hugepage_bytes)} "
                    f"hugepages={node}:{dict(after)[node] // spec.hugepage_bytes}",
                    HostResources(node=node),
                )
                ok = False
    if ok:
        for node, more in grow:
            rooms[node].memory_left -= more
            if spec.hugepage_bytes is not None:
                rooms[node].pages_left[spec.hugepage_bytes] -= more // spec.hugepage_bytes
    return ok


def fit_memory(
    spec: PartitionSpec, mem: tuple[tuple[int, int], ...], rooms: dict[int, NodeRoom], w: Work
) -> bool:
    ok = True
    for node, size in mem:
        room = rooms[node]
        if size > room.memory_left:
            w.problem(
                spec,
                "memory",
                f"{spec.name} needs {format_size(size)} of memory on node {node}, "
                f"{human_size(max(room.memory_left, 0))} is left there after the host's reserve "
                "and the other partitions (rule 3)",
                HostResources(node=node),
            )
            ok = False
        if spec.hugepage_bytes is not None:
            pages = size // spec.hugepage_bytes
            have = room.pages_left.get(spec.hugepage_bytes, 0)
            if pages > have:
                w.problem(
                    spec,
                    "hugepages",
                    f"{spec.name} needs {pages} {page_size_name(spec.hugepage_bytes)} pages on node {node}, "
                    f"{have} are free or reservable there (rule 3); reserve them at boot with "
                    f"hugepagesz={kernel_page_size(spec.hugepage_bytes)} hugepages={node}:{pages}",
                    HostResources(node=node),
                )
                ok = False
    if ok:
        for node, size in mem:
            rooms[node].memory_left -= size
            if spec.hugepage_bytes is not None:
                # Replaced, not changed in place: a planning Mark keeps the dict it saw.
                left = rooms[node].pages_left
                rooms[node].pages_left = {
                    **left,
                    spec.hugepage_bytes: left[spec.hugepage_bytes] - size // spec.hugepage_bytes,
                }
    return ok
