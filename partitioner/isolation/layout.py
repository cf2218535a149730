"""Who owns which host CPU while the site runs: one pure description, derived from the Plan.

Both halves of isolation use it (docs/decisions.md, "Isolation and audit"): ``apply``'s
runtime actions move the host's work to :attr:`Layout.reserve`, and the boot-time
``host setup`` writes kernel arguments for :attr:`Layout.partition_cpus`.  Never
computed anywhere else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from partitioner.cpuset import CpuSet
from partitioner.planning.model import Placement, Plan


@dataclass(frozen=True)
class PartitionCpus:
    name: str
    cpus: CpuSet  # its vCPUs' host CPUs
    vcpu_cpus: tuple[int, ...]  # vCPU i runs on vcpu_cpus[i]
    devices: tuple[str, ...]  # full PCI addresses it owns: their interrupts go to ``cpus``


@dataclass(frozen=True)
class Layout:
    reserve: CpuSet  # the host's CPUs: its processes, kernel threads, interrupts, emulators
    partitions: Mapping[str, PartitionCpus]  # in name order

    @property
    def partition_cpus(self) -> CpuSet:
        """Every CPU some partition owns (what boot-time isolation is for)."""
        out = CpuSet()
        for p in self.partitions.values():
            out = out | p.cpus
        return out

    def owner_of_device(self, address: str) -> PartitionCpus | None:
        for p in self.partitions.values():
            if address in p.devices:
                return p
        return None

    def to_json(self) -> dict[str, object]:
        return {
            "reserve": self.reserve.as_list(),
            "partition_cpus": self.partition_cpus.as_list(),
            "partitions": {
                n: {"cpus": p.cpus.as_list(), "devices": list(p.devices)}
                for n, p in self.partitions.items()
            },
        }


def layout_of_placements(reserve: CpuSet, placements: Iterable[Placement]) -> Layout:
    parts = {
        p.name: PartitionCpus(
            name=p.name,
            cpus=p.cpuset,
            vcpu_cpus=tuple(p.cpus),
            devices=tuple(str(d.address) for d in p.devices),
        )
        for p in sorted(placements, key=lambda p: p.name)
    }
    return Layout(reserve=reserve, partitions=parts)


def layout_of(plan: Plan) -> Layout:
    """The layout of a whole plan: every placed partition, whether or not it runs yet."""
    return layout_of_placements(plan.host_cpus, plan.placements.values())


def reserve_and_partition_cpus(plan: Plan) -> tuple[CpuSet, CpuSet]:
    """For ``host setup``: (the reserve CPUs, every partition's CPUs), from the one layout."""
    lay = layout_of(plan)
    return lay.reserve, lay.partition_cpus
