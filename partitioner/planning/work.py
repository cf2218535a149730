"""The shared work state of one planning run: what each node has left, who holds what, and the mark
that gives back what a partition took when it cannot be placed."""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from partitioner.cpuset import CpuSet
from partitioner.errors import NO_HOST, HostResources, PlanProblem
from partitioner.inventory.model import Host, PciFunction
from partitioner.manifest.model import NOWHERE, Location, Manifest, PartitionSpec
from partitioner.pci import PciAddress
from partitioner.planning.model import DeviceAssignment
from partitioner.units import format_size, human_size, page_size_name
from partitioner.vfio.preview import ClaimPreview

# A core is the set of its usable SMT siblings, as a sorted tuple.
Core = tuple[int, ...]
K = TypeVar("K")


class NodeRoom:
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

    def took(self, left: list[Core], count: int) -> None:
        """``count`` CPUs were taken and ``left`` is what stays free: the count is kept without
        a walk of the node's cores, once per partition placed."""
        self._cores = left
        self.free_cpus -= count


@dataclass
class Work:
    """Mutable bookkeeping of one planning run."""

    problems: list[PlanProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cpu_owner: dict[int, str] = field(default_factory=dict)
    device_owner: dict[PciAddress, str] = field(default_factory=dict)
    group_owner: dict[int, str] = field(default_factory=dict)
    threads_per_core: int = 1
    by_id: dict[str, list[PciFunction]] = field(default_factory=dict)  # "8086:10d3" -> functions
    verdicts: dict[PciAddress, ClaimPreview] = field(default_factory=dict)  # claim_preview, cached
    id_cursor: dict[str, int] = field(default_factory=dict)  # by_id: first function maybe free
    # Each `vf:` device's VF (planning/sriov.py): partition -> its entry's index -> assignment.
    vf_devices: dict[str, dict[int, DeviceAssignment]] = field(default_factory=dict)

    def problem(
        self,
        spec: PartitionSpec | None,
        field: str,
        message: str,
        host: HostResources = NO_HOST,
        *,
        where: Location | None = None,
    ) -> None:
        """A problem about ``spec``'s ``field`` (or the site's, with ``spec`` None and ``where``)."""
        self.problems.append(located(spec, field, message, host, where=where))


def located(
    spec: PartitionSpec | None,
    field: str,
    message: str,
    host: HostResources = NO_HOST,
    *,
    where: Location | None = None,
) -> PlanProblem:
    """A plan problem at the place of ``spec``'s ``field`` in the manifest."""
    loc = where if where is not None else spec.field_where(field) if spec else NOWHERE
    return PlanProblem(
        message,
        file=loc.file if loc.line else "",
        line=loc.line,
        column=loc.column,
        partition=spec.name if spec else "",
        field=field,
        host=host,
    )


# A problem names at most this many items and counts the rest: a partition that finds no
# free function on a host of thousands should not get a line that lists them all.
HANDFUL = 5


def handful(items: Sequence[str], limit: int = HANDFUL, sep: str = ", ") -> str:
    """``a, b, c`` or ``a, b, c, d, e and 1,019 more``."""
    if len(items) <= limit:
        return sep.join(items)
    return f"{sep.join(items[:limit])} and {len(items) - limit:,} more"


def holders(cpus: Iterable[int], w: Work) -> tuple[str, HostResources]:
    """Who holds which of ``cpus`` (``CPUs 4-5 are fw's, CPU 0 is the host's``), and the same as
    the host resources of a problem: the held CPUs and their holders, most first."""
    by_owner: dict[str, list[int]] = {}
    for c in cpus:
        owner = w.cpu_owner.get(c)
        if owner is not None:
            by_owner.setdefault(owner, []).append(c)
    if not by_owner:
        return "", NO_HOST
    order = sorted(by_owner, key=lambda o: (-len(by_owner[o]), o))
    said = [
        f"CPU{'s' if len(by_owner[o]) > 1 else ''} {CpuSet(by_owner[o])} "
        f"{'are' if len(by_owner[o]) > 1 else 'is'} {o}'s"
        for o in order
    ]
    held = sorted(c for o in order for c in by_owner[o])
    return handful(said), HostResources(cpus=tuple(held), held_by=", ".join(order[:HANDFUL]))


class Mark:
    """What a planning run holds before one partition is placed, to give it back on failure.

    Linear in the run, not in what it placed so far: the owner maps are not copied but
    remembered by length.  While one partition is placed, owners are only added, never changed
    (rules 1 and 4: a CPU, function or group already owned is a problem, not a new owner), and
    dicts keep insertion order, so what the partition took is the tail past that length.  A
    node's ``cores`` list and ``pages_left`` dict are replaced, never changed in place, so the
    mark keeps them themselves.
    """

    def __init__(self, w: Work, rooms: Mapping[int, NodeRoom]) -> None:
        self.problems = len(w.problems)
        self.notes = len(w.notes)
        self.cpu_owner = (w.cpu_owner, len(w.cpu_owner))
        self.device_owner = (w.device_owner, len(w.device_owner))
        self.group_owner = (w.group_owner, len(w.group_owner))
        self.id_cursor = dict(w.id_cursor)
        self.rooms = {n: (r.cores, r.memory_left, r.pages_left) for n, r in rooms.items()}

    def restore(self, w: Work, rooms: Mapping[int, NodeRoom]) -> None:
        """Back to the mark; the problems found since stay (they are the partition's reasons)."""
        del w.notes[self.notes :]
        w.cpu_owner = _truncated(w.cpu_owner, *self.cpu_owner)
        w.device_owner = _truncated(w.device_owner, *self.device_owner)
        w.group_owner = _truncated(w.group_owner, *self.group_owner)
        w.id_cursor = self.id_cursor
        for n, (cores, memory_left, pages_left) in self.rooms.items():
            rooms[n].cores, rooms[n].memory_left, rooms[n].pages_left = (
                cores,
                memory_left,
                pages_left,
            )


def _truncated(now: dict[K, str], then: dict[K, str], length: int) -> dict[K, str]:
    """``now`` with the entries added since it was ``length`` long taken out.  A map replaced
    since the mark (``give_back_devices`` builds a new one) is rebuilt from its first entries."""
    if now is then:
        for key in list(now)[length:]:
            del now[key]
        return now
    return dict(list(then.items())[:length])


def take_out(rooms: dict[int, NodeRoom], cpus: Container[int], smt_isolate: bool) -> None:
    """``cpus`` are someone's now: under smt: isolate their whole cores leave the rooms, under
    share only they do (their siblings stay free for another owner)."""
    for room in rooms.values():
        if smt_isolate:
            room.cores = [core for core in room.cores if not any(c in cpus for c in core)]
        else:
            room.cores = [
                t for core in room.cores if (t := tuple(c for c in core if c not in cpus))
            ]


def give_back_devices(name: str, w: Work) -> None:
    w.device_owner = {a: o for a, o in w.device_owner.items() if o != name}
    w.group_owner = {g: o for g, o in w.group_owner.items() if o != name}
    w.id_cursor.clear()  # a cursor may have passed what was given back


def node_rooms(
    manifest: Manifest, host: Host, cores_by_node: dict[int, list[Core]], host_cpus: CpuSet
) -> dict[int, NodeRoom]:
    total_mem = sum(n.memory_bytes for n in host.nodes.values()) or 1
    reserve = manifest.host.reserve_memory_bytes
    rooms: dict[int, NodeRoom] = {}
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
        rooms[node_id] = NodeRoom(node_id, cores, node.memory_bytes - share, pages)
    return rooms


def _fit(spec: PartitionSpec, room: NodeRoom, smt_isolate: bool) -> tuple[bool, bool, bool]:
    """Whether ``spec``'s CPUs, memory and hugepages fit in ``room``."""
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
    return cpus_ok, mem_ok, pages_ok


def short_field(spec: PartitionSpec, room: NodeRoom | None, smt_isolate: bool) -> str:
    """The field a problem of ``spec`` not fitting on ``room`` is about: what falls short first."""
    if room is None:
        return "numa"
    cpus_ok, mem_ok, _ = _fit(spec, room, smt_isolate)
    return "cpus" if not cpus_ok else "memory" if not mem_ok else "hugepages"


def fits_on_all(spec: PartitionSpec, rooms: Mapping[int, NodeRoom], smt_isolate: bool) -> bool:
    """Whether ``spec`` would fit on all the host's free room together: if not, no `numa:` list
    can help, the host is too small for it as it is."""
    pages: dict[int, int] = {}
    for r in rooms.values():
        for size, n in r.pages_left.items():
            pages[size] = pages.get(size, 0) + n
    together = NodeRoom(
        -1,
        [core for r in rooms.values() for core in r.cores],
        sum(r.memory_left for r in rooms.values()),
        pages,
    )
    return all(_fit(spec, together, smt_isolate))


def fits(spec: PartitionSpec, room: NodeRoom, smt_isolate: bool) -> bool:
    """Whether ``spec`` fits on this node alone: :func:`fits_alone` without the sentence,
    which lists the node's free CPUs (asked of every node for every partition, most of
    them full on a full host)."""
    if room.free_cpus < spec.cpu_count or room.memory_left < spec.memory_bytes:
        return False  # what _fit would find, without walking the node's cores
    cpus_ok, mem_ok, pages_ok = _fit(spec, room, smt_isolate)
    return cpus_ok and mem_ok and pages_ok


def fits_alone(spec: PartitionSpec, room: NodeRoom | None, smt_isolate: bool) -> str | None:
    """None if ``spec`` fits on this node alone, else what it needs there and what is free."""
    if room is None:
        return f"{spec.cpu_count} CPUs on a node this host does not have"
    cpus_ok, mem_ok, pages_ok = _fit(spec, room, smt_isolate)
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


def free_cpus(room: NodeRoom) -> int:
    return room.free_cpus


def node_of(host: Host, cpu: int) -> int:
    node = host.cpus[cpu].node
    return node if node is not None else min(host.nodes, default=0)


def dev_node(host: Host, address: PciAddress) -> int | None:
    fn = host.pci.get(address)
    if fn is None or fn.numa_node is None or fn.numa_node not in host.nodes:
        return None
    return fn.numa_node
