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
from partitioner.manifest.model import (
    PartitionSpec,
    VfSettings,
    spec_from_json,
    spec_to_json,
    vf_settings_from_json,
    vf_settings_to_json,
)
from partitioner.pci import PciAddress
from partitioner.units import page_size_name, virtio_mem_block


@dataclass(frozen=True)
class VfAssignment:
    """A device that is a virtual function: VF ``index`` of the physical function ``pf``, with
    the settings the host gives it through the PF before the guest sees it."""

    pf: PciAddress
    index: int
    settings: VfSettings | None

    def to_json(self) -> dict[str, Any]:
        return {
            "pf": str(self.pf),
            "index": self.index,
            "settings": vf_settings_to_json(self.settings),
        }

    @classmethod
    def from_json(cls, v: Any) -> VfAssignment:
        d = obj(v, "vf")
        return cls(
            pf=PciAddress.parse(str(d["pf"])),
            index=nat(d["index"], "a VF index"),
            settings=vf_settings_from_json(d.get("settings")),
        )


@dataclass(frozen=True)
class PfPlan:
    """A physical function of ``host.sriov`` as planned: ``vfs`` virtual functions.

    ``iommu_groups_known``: its VFs exist with that count now, so the plan's VFs carry
    their IOMMU groups; False when apply has to make them (the count changes, the VFs are
    made anew): the plan's VFs of this PF then have ``iommu_group`` None, and apply claims
    each VF's group once the VF exists."""

    address: PciAddress
    netdev: str | None  # its interface on the host (the first), for the per-VF settings
    vfs: int
    iommu_groups_known: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "pf": str(self.address),
            "netdev": self.netdev,
            "vfs": self.vfs,
            "iommu_groups_known": self.iommu_groups_known,
        }

    @classmethod
    def from_json(cls, v: Any) -> PfPlan:
        d = obj(v, "a PF")
        netdev = d.get("netdev")
        return cls(
            address=PciAddress.parse(str(d["pf"])),
            netdev=None if netdev is None else str(netdev),
            vfs=nat(d["vfs"], "vfs"),
            iommu_groups_known=bool(d["iommu_groups_known"]),
        )


@dataclass(frozen=True)
class DeviceAssignment:
    address: PciAddress
    # None only for a VF that apply has yet to make (``vf`` set, its PfPlan's
    # ``iommu_groups_known`` False): its group is known once it exists.
    iommu_group: int | None
    vendor_device: str  # "8086:10d3"
    driver: str | None  # the host driver bound when planned (given back on destroy)
    added: bool  # True: not named by the user, taken because its slot or group goes along
    reason: str  # "named as pci: 0000:81:00.0", "same slot as 0000:81:00.0", ...
    reset_none_ok: bool = False
    rom: str | None = None  # "off" or a ROM file (manifest `rom:`); None: the device's own
    primary_display: bool = False  # x-vga=on (manifest `primary_display: true`)
    vf: VfAssignment | None = None  # a virtual function of a PF in host.sriov (`vf:`)


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
    # Dynamic partitioning (rule 11; docs/decisions.md "Dynamic partitions").  Every default
    # means static, and a static placement's JSON leaves them out.
    # vCPU slots the guest is started with (spec.cpus_max); 0: len(cpus), static.  The vCPUs
    # present are always slots 0..len(cpus)-1: growth appends, shrinking drops the highest.
    vcpu_slots: int = 0
    # Host NUMA node of every vCPU slot (length max_vcpus; () allowed with a single node): the
    # first len(cpus) agree with cpu_nodes, and a vCPU added later runs on a CPU of its slot's node.
    slot_nodes: tuple[int, ...] = ()
    # (node, bytes): the fixed part of the memory (min_memory shared out), and its ceiling
    # (max_memory shared out); () means static (== memory_per_node).  memory_per_node is what the
    # guest has now, fixed + plugged, and what is reserved from the host.
    fixed_per_node: tuple[tuple[int, int], ...] = ()
    max_per_node: tuple[tuple[int, int], ...] = ()
    # PCI functions attached live, by spare slot: hotplugged[k] sits in the guest's spare root
    # port hp{k}, "" for a slot a detach left free (never trailing).  Functions the partition
    # started with are not here: they have ports of their own.
    hotplugged: tuple[str, ...] = ()

    @property
    def memory_bytes(self) -> int:
        return sum(b for _, b in self.memory_per_node)

    @property
    def max_vcpus(self) -> int:
        """The guest's vCPU slots (QEMU's ``maxcpus``)."""
        return self.vcpu_slots or len(self.cpus)

    def slot_node(self, index: int) -> int:
        """The host NUMA node of vCPU slot ``index``."""
        if self.slot_nodes:
            return self.slot_nodes[index]
        if index < len(self.cpu_nodes):
            return self.cpu_nodes[index]
        return self.numa_nodes[0] if self.numa_nodes else 0

    @property
    def dynamic_memory(self) -> bool:
        """Whether part of its memory is plugged live (a virtio-mem device on a node)."""
        return any(room for _, room in self.dynamic_room_per_node)

    @property
    def fixed_memory_per_node(self) -> tuple[tuple[int, int], ...]:
        """(node, bytes) of the fixed part: preallocated and locked when it starts."""
        return self.fixed_per_node or self.memory_per_node

    @property
    def max_memory_per_node(self) -> tuple[tuple[int, int], ...]:
        """(node, bytes) of the ceiling on each node."""
        return self.max_per_node or self.memory_per_node

    @property
    def fixed_memory_bytes(self) -> int:
        return sum(b for _, b in self.fixed_memory_per_node)

    @property
    def max_memory_bytes(self) -> int:
        return sum(b for _, b in self.max_memory_per_node)

    @property
    def plugged_per_node(self) -> tuple[tuple[int, int], ...]:
        """(node, bytes plugged into its virtio-mem device now): memory less the fixed part."""
        fixed = dict(self.fixed_memory_per_node)
        return tuple((n, b - fixed.get(n, 0)) for n, b in self.memory_per_node)

    @property
    def dynamic_room_per_node(self) -> tuple[tuple[int, int], ...]:
        """(node, size of its virtio-mem device): the ceiling less the fixed part."""
        fixed = dict(self.fixed_memory_per_node)
        return tuple((n, b - fixed.get(n, 0)) for n, b in self.max_memory_per_node)

    @property
    def virtio_mem_block(self) -> int:
        """The block its dynamic memory is plugged in (units.virtio_mem_block)."""
        return virtio_mem_block(self.hugepage_bytes)

    @property
    def hotplug_slots(self) -> int:
        """Spare PCIe root ports (``hp0``..) the guest is started with."""
        return self.spec.hotplug_slots

    def hotplug_slot(self, address: str) -> int | None:
        """The spare slot a function attached live sits in (``hp{k}``), or None."""
        return self.hotplugged.index(address) if address in self.hotplugged else None

    @property
    def cpuset(self) -> CpuSet:
        return CpuSet(self.cpus)

    @property
    def iommu_groups(self) -> tuple[int, ...]:
        """The groups known now (a VF apply has yet to make is in none yet)."""
        return tuple(sorted({d.iommu_group for d in self.devices if d.iommu_group is not None}))

    def same_resources(self, other: Placement) -> bool:
        """True when a running partition placed as ``other`` need not be replaced to become ``self``."""
        return (
            self.cpus == other.cpus
            and self.memory_per_node == other.memory_per_node
            and self.hugepage_bytes == other.hugepage_bytes
            # A device's ROM and display role, and the PCI window, are on QEMU's command line;
            # a VF's settings are set before the guest gets it.
            and tuple((d.address, d.rom, d.primary_display, d.vf) for d in self.devices)
            == tuple((d.address, d.rom, d.primary_display, d.vf) for d in other.devices)
            and self.pci_hole64_bytes == other.pci_hole64_bytes
            and self.host_cache_info == other.host_cache_info
            and (self.sockets, self.cores, self.threads)
            == (other.sockets, other.cores, other.threads)
            and self.spec.boot == other.spec.boot
            and self.spec.disks == other.spec.disks
            and self.spec.firmware == other.spec.firmware
            # Slots and the memory's fixed part and ceiling are on the command line too.
            and self.max_vcpus == other.max_vcpus
            and self.all_slot_nodes() == other.all_slot_nodes()
            and self.fixed_memory_per_node == other.fixed_memory_per_node
            and self.max_memory_per_node == other.max_memory_per_node
            and self.hotplug_slots == other.hotplug_slots
            and self.hotplugged == other.hotplugged
        )

    def all_slot_nodes(self) -> tuple[int, ...]:
        """The host node of every vCPU slot, present or not."""
        return tuple(self.slot_node(i) for i in range(self.max_vcpus))

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
                    "vf": None if d.vf is None else d.vf.to_json(),
                }
                for d in self.devices
            ],
            "pci_hole64_bytes": self.pci_hole64_bytes,
            "host_cache_info": self.host_cache_info,
            "notes": list(self.notes),
            "spec": spec_to_json(self.spec),
        } | self._dynamic_json()

    def _dynamic_json(self) -> dict[str, Any]:
        """The dynamic fields, each only when it is not its static default (a static
        placement's JSON is what it was before they existed)."""
        out: dict[str, Any] = {}
        if self.vcpu_slots:
            out["vcpu_slots"] = self.vcpu_slots
        if self.slot_nodes:
            out["slot_nodes"] = list(self.slot_nodes)
        if self.fixed_per_node:
            out["fixed_per_node"] = {str(n): b for n, b in self.fixed_per_node}
        if self.max_per_node:
            out["max_per_node"] = {str(n): b for n, b in self.max_per_node}
        if self.hotplugged:
            out["hotplugged"] = list(self.hotplugged)
        return out

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
                    iommu_group=_group_from_json(x),
                    vendor_device=str(x["id"]),
                    driver=None if x.get("driver") is None else str(x["driver"]),
                    added=bool(x["added"]),
                    reason=str(x.get("reason", "")),
                    reset_none_ok=bool(x.get("reset_none_ok", False)),
                    rom=None if x.get("rom") is None else str(x["rom"]),
                    primary_display=bool(x.get("primary_display", False)),
                    vf=None if x.get("vf") is None else VfAssignment.from_json(x["vf"]),
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
            vcpu_slots=nat(d.get("vcpu_slots", 0), "vcpu_slots"),
            slot_nodes=tuple(
                nat(n, "a NUMA node") for n in seq(d.get("slot_nodes", []), "slot_nodes")
            ),
            fixed_per_node=_per_node(d.get("fixed_per_node", {}), "fixed_per_node"),
            max_per_node=_per_node(d.get("max_per_node", {}), "max_per_node"),
            hotplugged=tuple(_slot_address(a) for a in seq(d.get("hotplugged", []), "hotplugged")),
        )


def _per_node(v: Any, what: str) -> tuple[tuple[int, int], ...]:
    per = obj(v, what)
    return tuple(sorted((nat(int(n), "a NUMA node"), nat(b, what)) for n, b in per.items()))


def _slot_address(v: Any) -> str:
    """A spare slot's entry: a PCI address, or "" for a free slot."""
    text = str(v)
    return str(PciAddress.parse(text)) if text else ""


@dataclass(frozen=True)
class Plan:
    accel: str
    smt: str
    host_cpus: CpuSet  # the host reserve: emulator threads of every partition run here
    host_memory_bytes: int
    placements: Mapping[str, Placement]  # in name order
    notes: tuple[str, ...] = field(default=())
    confine: bool = True  # rule 10: each QEMU runs as a user of its own, unprivileged
    sriov: tuple[PfPlan, ...] = ()  # host.sriov's PFs, by address

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
            "sriov": [pf.to_json() for pf in self.sriov],
        }

    @classmethod
    def from_json(cls, v: Any) -> Plan:
        """A plan back from :meth:`to_json` (what ``plan --json`` shows), every value checked."""
        d = obj(v, "plan")
        host = obj(d["host"], "host")
        placements = obj(d["partitions"], "partitions")
        return cls(
            accel=str(d["accel"]),
            smt=str(d["smt"]),
            host_cpus=CpuSet(nat(c, "a CPU") for c in seq(host["cpus"], "host cpus")),
            host_memory_bytes=nat(host["memory_bytes"], "host memory_bytes"),
            placements={n: Placement.from_json(placements[n]) for n in sorted(placements)},
            notes=tuple(str(n) for n in seq(d.get("notes", []), "notes")),
            confine=bool(d.get("confine", True)),
            sriov=tuple(PfPlan.from_json(x) for x in seq(d.get("sriov", []), "sriov")),
        )


def _group_from_json(x: Any) -> int | None:
    """A device's IOMMU group; null only for a VF (one apply has yet to make)."""
    if x["iommu_group"] is None and x.get("vf") is not None:
        return None
    return nat(x["iommu_group"], "an IOMMU group")


@dataclass(frozen=True)
class RunningPartition:
    """What the state record says a running partition holds; the planner keeps it where it is (rule 8)."""

    name: str
    cpus: tuple[int, ...]
    memory_per_node: tuple[tuple[int, int], ...]
    hugepage_bytes: int | None
    devices: tuple[PciAddress, ...]
    # Its placement as the record keeps it: what a live change starts from (rule 11).  None
    # (a caller that knows only the resources): it is kept only when it still matches exactly.
    placement: Placement | None = field(default=None, compare=False)
