"""Memory (rule 3): a partition's memory split over its nodes and fitted into what each has left."""

from __future__ import annotations

from collections.abc import Mapping

from partitioner.errors import HostResources
from partitioner.manifest.model import PartitionSpec
from partitioner.planning.work import NodeRoom, Work
from partitioner.units import format_size, human_size, kernel_page_size, page_size_name


def split_memory(
    spec: PartitionSpec, cpus_per_node: Mapping[int, int]
) -> tuple[tuple[int, int], ...]:
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
