"""The placement of every partition on the host: a pure function of Manifest, Host and what runs.

``plan(manifest, host, running)`` returns a :class:`Plan` or raises
:class:`~partitioner.errors.PlanError` carrying every reason it cannot place.
It does no I/O and is deterministic: the same inputs give the same plan,
byte for byte in ``to_json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from partitioner.cpuset import CpuSet
from partitioner.jsonvalues import nat, obj, seq
from partitioner.manifest.model import PartitionSpec, VfSettings, spec_from_json, spec_to_json
from partitioner.pci import PciAddress
from partitioner.units import page_size_name


@dataclass(frozen=True)
class VfAssignment:
    """A device that is VF ``index`` of the PF ``pf``, with the settings the PF gives it."""

    pf: PciAddress
    index: int
    settings: VfSettings | None


@dataclass(frozen=True)
class PfPlan:
    """A PF whose VFs apply makes (``host.sriov``): ``vfs`` of them, through ``netdev`` if named."""

    address: PciAddress
    netdev: str | None
    vfs: int
    iommu_groups_known: bool


@dataclass(frozen=True)
class DeviceAssignment:
    address: PciAddress
    iommu_group: int
    vendor_device: str  # "8086:10d3"
    driver: str | None  # the host driver bound when planned (given back on destroy)
    added: bool  # True: not named by the user, taken because its slot or group goes along
    reason: str  # "named as pci: 0000:81:00.0", "same slot as 0000:81:00.0", ...
    reset_none_ok: bool = False
    rom: str | None = None  # "off" or a ROM file (manifest `rom:`); None: the device's own
    primary_display: bool = False  # x-vga=on (manifest `primary_display: true`)
    vf: VfAssignment | None = None  # a VF of a PF the plan's `sriov` makes


@dataclass(frozen=True)
class Placement:
    name: str
    cpus: tuple[int, ...]  # vCPU i runs on host CPU cpus[i]; siblings adjacent, core by core
    sockets: int  # guest topology: sockets x cores x threads == len(cpus)
    cores: int
    threads: int
    numa_nodes: tuple[int, ...]
    memory_per_node: tuple[tuple[int, int], ...]  # (node, bytes), node order
    hugepage_bytes: int | None
    devices: tuple[DeviceAssignment, ...]  # named first (in manifest order), then added ones
    spec: PartitionSpec
    notes: tuple[str, ...] = ()
    # NUMA node of each host CPU in ``cpus`` (same order), so the guest's NUMA nodes get the
    # vCPUs that really run there.  () is allowed when ``numa_nodes`` has a single node.
    cpu_nodes: tuple[int, ...] = ()
    # Set by partitioner/planning/mmio.py: the 64-bit PCI window its devices' BARs need (0: QEMU's
    # default holds them), and whether the guest's topology mirrors the host cores it got.
    pci_hole64_bytes: int = 0
    host_cache_info: bool = False

    @property
    def memory_bytes(self) -> int:
        return sum(b for _, b in self.memory_per_node)

    @property
    def cpuset(self) -> CpuSet:
        return CpuSet(self.cpus)

    @property
    def iommu_groups(self) -> tuple[int, ...]:
        return tuple(sorted({d.iommu_group for d in self.devices}))

    def same_resources(self, other: Placement) -> bool:
        """True when a running partition placed as ``other`` need not be replaced to become ``self``."""
        return (
            self.cpus == other.cpus
            and self.memory_per_node == other.memory_per_node
            and self.hugepage_bytes == other.hugepage_bytes
            # A device's ROM and display role, and the PCI window, are on QEMU's command line.
            and tuple((d.address, d.rom, d.primary_display) for d in self.devices)
            == tuple((d.address, d.rom, d.primary_display) for d in other.devices)
            and self.pci_hole64_bytes == other.pci_hole64_bytes
            and self.host_cache_info == other.host_cache_info
            and (self.sockets, self.cores, self.threads)
            == (other.sockets, other.cores, other.threads)
            and self.spec.boot == other.spec.boot
            and self.spec.disks == other.spec.disks
            and self.spec.firmware == other.spec.firmware
        )

    def to_json(self) -> dict[str, Any]:
        """The one JSON form of a placement: ``partition plan --json`` (docs/cli-reference.md) shows it, and
        the state record keeps it, so it carries every field ``from_json`` needs back."""
        return {
            "name": self.name,
            "cpus": list(self.cpus),
            "cpu_nodes": list(self.cpu_nodes),
            "numa_nodes": list(self.numa_nodes),
            "memory_bytes": self.memory_bytes,
            "memory_per_node": {str(n): b for n, b in self.memory_per_node},
            "hugepages": page_size_name(self.hugepage_bytes) if self.hugepage_bytes else "none",
            "hugepage_bytes": self.hugepage_bytes,
            "topology": {"sockets": self.sockets, "cores": self.cores, "threads": self.threads},
            "devices": [str(d.address) for d in self.devices if not d.added],
            "added_devices": [str(d.address) for d in self.devices if d.added],
            "iommu_groups": list(self.iommu_groups),
            "device_details": [
                {
                    "address": str(d.address),
                    "iommu_group": d.iommu_group,
                    "id": d.vendor_device,
                    "driver": d.driver,
                    "added": d.added,
                    "reason": d.reason,
                    "reset_none_ok": d.reset_none_ok,
                    "rom": d.rom,
                    "primary_display": d.primary_display,
                }
                for d in self.devices
            ],
            "pci_hole64_bytes": self.pci_hole64_bytes,
            "host_cache_info": self.host_cache_info,
            "notes": list(self.notes),
            "spec": spec_to_json(self.spec),
        }

    @classmethod
    def from_json(cls, v: Any) -> Placement:
        """A placement back from :meth:`to_json`, every value checked (``ValueError`` names it)."""
        d = obj(v, "placement")
        topo = obj(d["topology"], "topology")
        per_node = obj(d["memory_per_node"], "memory_per_node")
        hp = d.get("hugepage_bytes")
        return cls(
            name=str(d["name"]),
            cpus=tuple(nat(c, "a CPU") for c in seq(d["cpus"], "cpus")),
            sockets=nat(topo["sockets"], "sockets"),
            cores=nat(topo["cores"], "cores"),
            threads=nat(topo["threads"], "threads"),
            numa_nodes=tuple(nat(n, "a NUMA node") for n in seq(d["numa_nodes"], "numa_nodes")),
            memory_per_node=tuple(
                sorted((nat(int(n), "a NUMA node"), nat(b, "memory")) for n, b in per_node.items())
            ),
            hugepage_bytes=None if hp is None else nat(hp, "hugepage_bytes"),
            devices=tuple(
                DeviceAssignment(
                    address=PciAddress.parse(str(x["address"])),
                    iommu_group=nat(x["iommu_group"], "an IOMMU group"),
                    vendor_device=str(x["id"]),
                    driver=None if x.get("driver") is None else str(x["driver"]),
                    added=bool(x["added"]),
                    reason=str(x.get("reason", "")),
                    reset_none_ok=bool(x.get("reset_none_ok", False)),
                    rom=None if x.get("rom") is None else str(x["rom"]),
                    primary_display=bool(x.get("primary_display", False)),
                )
                for x in (obj(e, "a device") for e in seq(d["device_details"], "device_details"))
            ),
            spec=spec_from_json(d["spec"]),
            notes=tuple(str(n) for n in seq(d.get("notes", []), "notes")),
            cpu_nodes=tuple(
                nat(n, "a NUMA node") for n in seq(d.get("cpu_nodes", []), "cpu_nodes")
            ),
            pci_hole64_bytes=nat(d.get("pci_hole64_bytes", 0), "pci_hole64_bytes"),
            host_cache_info=bool(d.get("host_cache_info", False)),
        )


@dataclass(frozen=True)
class Plan:
    accel: str
    smt: str
    host_cpus: CpuSet  # the host reserve: emulator threads of every partition run here
    host_memory_bytes: int
    placements: Mapping[str, Placement]  # in name order
    notes: tuple[str, ...] = field(default=())
    confine: bool = True  # rule 10: each QEMU runs as a user of its own, unprivileged
    sriov: tuple[PfPlan, ...] = ()  # PFs whose VFs are made, in host.sriov's order

    def hugepages_needed(self) -> dict[tuple[int, int], int]:
        """(node, page size in bytes) -> pages the placed partitions need there."""
        need: dict[tuple[int, int], int] = {}
        for p in self.placements.values():
            if p.hugepage_bytes is None:
                continue
            for node, size in p.memory_per_node:
                key = (node, p.hugepage_bytes)
                need[key] = need.get(key, 0) + size // p.hugepage_bytes
        return need

    def start_order(self) -> list[Placement]:
        return sorted(self.placements.values(), key=lambda p: (p.spec.order, p.name))

    def to_json(self) -> dict[str, Any]:
        return {
            "partitions": {name: p.to_json() for name, p in sorted(self.placements.items())},
            "host": {"cpus": self.host_cpus.as_list(), "memory_bytes": self.host_memory_bytes},
            "accel": self.accel,
            "smt": self.smt,
            "confine": self.confine,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class RunningPartition:
    """What the state record says a running partition holds; the planner keeps it where it is (rule 8)."""

    name: str
    cpus: tuple[int, ...]
    memory_per_node: tuple[tuple[int, int], ...]
    hugepage_bytes: int | None
    devices: tuple[PciAddress, ...]
