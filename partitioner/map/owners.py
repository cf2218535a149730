"""Who owns what on the host: the partitions, the host reserve, and what is left free.

Built from plain data, the documents ``partition plan --json`` and ``partition
status --json`` give (a partition's ``cpus``, ``numa_nodes``, ``memory_bytes``,
``memory_per_node``, ``hugepages``, ``devices`` and ``added_devices``; the host's
reserve ``cpus`` and ``memory_bytes``), so the picture depends on those shapes only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from partitioner.cpuset import CpuSet
from partitioner.errors import StateError
from partitioner.pci import PciAddress

# Colours told apart by most readers, colour-blind ones included (Paul Tol's "bright" and
# "muted" schemes), each with the text colour that reads on it.  A site with more
# partitions than colours reuses them in order; the legend names each.
PALETTE: tuple[tuple[str, str], ...] = (
    ("#4477aa", "#ffffff"),
    ("#ee6677", "#000000"),
    ("#228833", "#ffffff"),
    ("#ccbb44", "#000000"),
    ("#66ccee", "#000000"),
    ("#aa3377", "#ffffff"),
    ("#332288", "#ffffff"),
    ("#117733", "#ffffff"),
    ("#882255", "#ffffff"),
    ("#999933", "#000000"),
)
# The host reserve: dark grey with white text, apart from every partition and from the
# white (PUs) and lstopo's own light colours that free resources keep.
RESERVE_COLOUR = ("#555555", "#ffffff")
RESERVE = "host"  # the owner name of the reserve, in the text form and the legend


@dataclass(frozen=True)
class Share:
    """One partition's part of the host, and its colour."""

    name: str
    colour: str  # "#rrggbb"
    text_colour: str
    cpus: CpuSet
    numa_nodes: tuple[int, ...]
    memory_bytes: int
    memory_per_node: Mapping[int, int]  # node -> bytes ({} when the document has no split)
    hugepages: str  # "2MiB", "1GiB" or "none"
    devices: tuple[PciAddress, ...]  # named in the manifest
    added_devices: tuple[PciAddress, ...]  # come along (same slot or IOMMU group)

    @property
    def all_devices(self) -> tuple[PciAddress, ...]:
        return self.devices + self.added_devices


@dataclass(frozen=True)
class Owners:
    """The whole layout: the partitions in name order and the host reserve."""

    shares: tuple[Share, ...]
    reserve_cpus: CpuSet
    reserve_memory_bytes: int | None  # None: not known (a record without a site)
    source: str  # "plan of FILE" or "running now": said in the legend

    def owner_of_cpu(self, cpu: int) -> str | None:
        """The partition holding ``cpu``, ``RESERVE`` for the host reserve, None when free."""
        for s in self.shares:
            if cpu in s.cpus:
                return s.name
        return RESERVE if cpu in self.reserve_cpus else None

    def owner_of_device(self, address: PciAddress) -> str | None:
        for s in self.shares:
            if address in s.all_devices:
                return s.name
        return None

    def share(self, name: str) -> Share:
        return next(s for s in self.shares if s.name == name)

    def to_json(self) -> dict[str, Any]:
        """What ``partition map --json`` reports besides the file: the colour of each owner."""
        return {
            "source": self.source,
            "partitions": {
                s.name: {
                    "colour": s.colour,
                    "cpus": s.cpus.as_list(),
                    "numa_nodes": list(s.numa_nodes),
                    "memory_bytes": s.memory_bytes,
                    "devices": [str(a) for a in s.all_devices],
                }
                for s in self.shares
            },
            "host": {"colour": RESERVE_COLOUR[0], "cpus": self.reserve_cpus.as_list()},
        }


def _addresses(values: Any) -> tuple[PciAddress, ...]:
    return tuple(PciAddress.parse(str(v)) for v in values or ())


def _share(i: int, name: str, doc: Mapping[str, Any]) -> Share:
    colour, text = PALETTE[i % len(PALETTE)]
    per_node = doc.get("memory_per_node") or {}
    return Share(
        name=name,
        colour=colour,
        text_colour=text,
        cpus=CpuSet(int(c) for c in doc.get("cpus", ())),
        numa_nodes=tuple(int(n) for n in doc.get("numa_nodes", ())),
        memory_bytes=int(doc.get("memory_bytes", 0)),
        memory_per_node={int(n): int(b) for n, b in per_node.items()},
        hugepages=str(doc.get("hugepages", "none")),
        devices=_addresses(doc.get("devices")),
        added_devices=_addresses(doc.get("added_devices")),
    )


def from_plan(doc: Mapping[str, Any], source: str) -> Owners:
    """From the document of ``partition plan --json``."""
    parts = doc["partitions"]
    host = doc.get("host", {})
    return Owners(
        shares=tuple(_share(i, n, parts[n]) for i, n in enumerate(sorted(parts))),
        reserve_cpus=CpuSet(int(c) for c in host.get("cpus", ())),
        reserve_memory_bytes=host.get("memory_bytes"),
        source=source,
    )


def from_status(
    doc: Mapping[str, Any], reserve_cpus: CpuSet | None, reserve_memory_bytes: int | None
) -> Owners:
    """From the document of ``partition status --json``, with the reserve the record's site
    keeps (status lists partitions only).  Every recorded partition is drawn: a ``stopped``
    or ``failed`` one still holds its CPUs, pages and devices until it is destroyed (the
    planner keeps them from others too)."""
    parts = dict(doc["partitions"])
    try:
        shares = tuple(_share(i, n, parts[n]) for i, n in enumerate(sorted(parts)))
    except (ValueError, TypeError, KeyError) as e:
        raise StateError(f"the state record cannot be drawn: {e}") from None
    return Owners(
        shares=shares,
        reserve_cpus=reserve_cpus or CpuSet(),
        reserve_memory_bytes=reserve_memory_bytes,
        source="running now",
    )
