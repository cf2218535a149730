"""The placement of every partition on the host: a pure function of Manifest, Host and what runs.

``plan(manifest, host, running)`` returns a :class:`Plan` or raises
:class:`~partitioner.errors.PlanError` carrying every reason it cannot place.
It does no I/O and is deterministic: the same inputs give the same plan,
byte for byte in ``to_json``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

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
from partitioner.units import format_size, human_size, page_size_name, virtio_mem_block


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
            # Slots and the memory's fixed part and ceiling are on the command line too.
            and self.max_vcpus == other.max_vcpus
            and self._slot_nodes() == other._slot_nodes()
            and self.fixed_memory_per_node == other.fixed_memory_per_node
            and self.max_memory_per_node == other.max_memory_per_node
            and self.hotplug_slots == other.hotplug_slots
            and self.hotplugged == other.hotplugged
        )

    def _slot_nodes(self) -> tuple[int, ...]:
        return tuple(self.slot_node(i) for i in range(self.max_vcpus))

    def live_change_from(self, old: Placement) -> LiveChange | str:
        """What turns a running partition placed as ``old`` into ``self`` while it runs (rule
        11), or why it cannot be done live: a sentence that ends by asking for ``--replace``.

        Live: vCPUs added into free slots (each on a CPU of its slot's node) or the highest
        ones removed, the vCPUs that stay on their CPUs; memory plugged or unplugged per node
        within the ceiling, in whole virtio-mem blocks, the fixed part unchanged; PCI functions
        attached into spare slots (whole IOMMU groups) or detached (whole groups).  Everything
        else (bounds, page size, NUMA nodes, topology, boot, disks, firmware, a device's ROM
        or display role, the PCI window) is the same or it is not live.  ``LiveChange`` with
        nothing in it: nothing to do."""
        why = _spec_refusal(old.spec, self.spec) or self._placement_refusal(old)
        if why is None:
            return self._live(old)
        if why.endswith("needs --replace"):
            return f"{why} {self.name}"
        return f"{why}; needs --replace {self.name}"

    def _placement_refusal(self, old: Placement) -> str | None:
        if self.name != old.name:
            return f"partition {old.name} is not {self.name}"
        topo, was = (self.sockets, self.cores, self.threads), (old.sockets, old.cores, old.threads)
        if topo != was:
            return (
                "the guest's CPU topology changes ({}x{}x{} -> {}x{}x{}): it is fixed while it "
                "runs".format(*was, *topo)
            )
        if self.max_vcpus != old.max_vcpus:
            return f"its vCPU slots change {old.max_vcpus} -> {self.max_vcpus}"
        if self._slot_nodes() != old._slot_nodes():
            return "the NUMA nodes of its vCPU slots change: they are fixed while it runs"
        if self.numa_nodes != old.numa_nodes:
            return (
                f"its NUMA nodes change {_nodes(old.numa_nodes)} -> {_nodes(self.numa_nodes)}: "
                "they are fixed while it runs"
            )
        if len(self.cpus) > self.max_vcpus:
            return f"{len(self.cpus)} vCPUs is more than its {self.max_vcpus} vCPU slots (max_cpus)"
        for i, (a, b) in enumerate(zip(old.cpus, self.cpus, strict=False)):
            if a != b:
                return (
                    f"vCPU {i} would move from CPU {a} to CPU {b}: a running vCPU keeps its "
                    "CPU (rule 8)"
                )
        for i in range(len(old.cpus), len(self.cpus)):
            node = self.cpu_nodes[i] if i < len(self.cpu_nodes) else None
            if node is not None and node != self.slot_node(i):
                return (
                    f"vCPU {i} would run on CPU {self.cpus[i]} of node {node}, but its slot is on "
                    f"node {self.slot_node(i)}"
                )
        if self.memory_per_node != old.memory_per_node and not old.dynamic_memory:
            return (
                f"memory changes {format_size(old.memory_bytes)} -> "
                f"{format_size(self.memory_bytes)} but it was started with all of its memory "
                "fixed (min_memory = max_memory)"
            )
        if self.fixed_memory_per_node != old.fixed_memory_per_node:
            return "the fixed part of its memory (min_memory) changes on its nodes"
        if self.max_memory_per_node != old.max_memory_per_node:
            return "the ceiling of its memory (max_memory) changes on its nodes"
        if [n for n, _ in self.memory_per_node] != [n for n, _ in old.memory_per_node]:
            return "the nodes its memory is on change"
        block = self.virtio_mem_block
        room = dict(self.dynamic_room_per_node)
        for node, plugged in self.plugged_per_node:
            if plugged < 0 or plugged > room.get(node, 0) or plugged % block:
                return (
                    f"{format_size(max(plugged, 0))} plugged on node {node} is not a whole "
                    f"number of {format_size(block)} blocks within its "
                    f"{format_size(room.get(node, 0))} of dynamic memory there"
                )
        return self._device_refusal(old) or self._window_refusal(old)

    def _device_refusal(self, old: Placement) -> str | None:
        before = {d.address: d for d in old.devices}
        now = {d.address: d for d in self.devices}
        for a, d in now.items():
            o = before.get(a)
            if o is not None and (d.rom, d.primary_display, d.iommu_group) != (
                o.rom,
                o.primary_display,
                o.iommu_group,
            ):
                return f"device {a}'s rom or primary_display changes: it is on QEMU's command line"
        attached = [d for a, d in now.items() if a not in before]
        detached = [d for a, d in before.items() if a not in now]
        for d in attached:
            if d.primary_display:
                return (
                    f"{d.address} is to be the primary display: a display's legacy VGA "
                    "ranges cannot be attached while the guest runs"
                )
            stays = sorted(str(o.address) for o in old.devices if o.iommu_group == d.iommu_group)
            if stays:
                return (
                    f"{d.address} is in IOMMU group {d.iommu_group}, which it already holds "
                    f"({', '.join(stays)}): a group is taken whole, at once (rule 4)"
                )
        for d in detached:
            stays = sorted(str(o.address) for o in self.devices if o.iommu_group == d.iommu_group)
            if stays:
                return (
                    f"{d.address} would leave but {', '.join(stays)} of its IOMMU group "
                    f"{d.iommu_group} would stay: a group is given back whole (rule 4)"
                )
        if attached:
            slots = hotplugged_after(old, self.devices)
            if len(slots) > self.hotplug_slots:
                used = sum(1 for a in old.hotplugged if a and a in {str(x) for x in now})
                return (
                    f"{_count(len(attached), 'function')} would be attached "
                    f"({', '.join(str(d.address) for d in attached)}) but it has "
                    f"hotplug_slots: {old.hotplug_slots}"
                    + (f", {used} of them in use" if used else "")
                    + ": each function attached while it runs takes a spare slot, and more "
                    "slots need a larger hotplug_slots"
                )
        if self.hotplugged != hotplugged_after(old, self.devices):
            return "its spare slots are not as a live change leaves them"
        return None

    def _window_refusal(self, old: Placement) -> str | None:
        if self.pci_hole64_bytes != old.pci_hole64_bytes:
            return (
                f"its devices' 64-bit PCI window changes {human_size(old.pci_hole64_bytes)} -> "
                f"{human_size(self.pci_hole64_bytes)}: it is on QEMU's command line"
            )
        if self.host_cache_info != old.host_cache_info:
            return "whether the guest gets the host's cache description changes"
        return None

    def _live(self, old: Placement) -> LiveChange:
        mem_before = dict(old.memory_per_node)
        before = {d.address for d in old.devices}
        now = {d.address for d in self.devices}
        return LiveChange(
            name=self.name,
            added_cpus=tuple((i, self.cpus[i]) for i in range(len(old.cpus), len(self.cpus))),
            removed_vcpus=tuple(
                (i, old.cpus[i]) for i in reversed(range(len(self.cpus), len(old.cpus)))
            ),
            memory=tuple(
                (n, mem_before[n], b) for n, b in self.memory_per_node if mem_before[n] != b
            ),
            attached=tuple(d for d in self.devices if d.address not in before),
            detached=tuple(d for d in old.devices if d.address not in now),
            vcpus_before=len(old.cpus),
            memory_before=old.memory_bytes,
            hugepage_bytes=self.hugepage_bytes,
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


def _nodes(nodes: tuple[int, ...]) -> str:
    return ",".join(map(str, nodes)) or "none"


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _spec_refusal(old: PartitionSpec, new: PartitionSpec) -> str | None:
    """Why the manifest change from ``old`` to ``new`` is not one rule 11 makes live, or None."""
    why = live_bounds_refusal(old, new)
    if why is None and (old.boot, old.disks, old.firmware) != (new.boot, new.disks, new.firmware):
        why = "boot, disks or firmware changed: they are on QEMU's command line"
    return why


def live_bounds_refusal(old: PartitionSpec, new: PartitionSpec) -> str | None:
    """Why a running partition of spec ``old`` cannot be changed to ``new`` where it is: a
    different page size, bounds, spare slots or ``numa``; None when only ``cpus``, ``memory``
    and ``devices`` (or what is not a resource) changed.  The planner keeps such a partition
    where it is (rule 8) and changes it within its bounds."""
    if old.hugepage_bytes != new.hugepage_bytes:
        return (
            f"hugepages changed {_pages(old.hugepage_bytes)} -> {_pages(new.hugepage_bytes)}: "
            "the page size its memory is backed by is fixed while it runs"
        )
    # The bounds the guest is started with (its vCPU slots, its memory's fixed part and
    # ceiling); min_cpus is not one of them: it only bounds what `cpus` may be changed to.
    bounds: tuple[tuple[str, int, int, bool, str], ...] = (
        ("max_cpus", old.cpus_max, new.cpus_max, new.max_cpus is None, "cpus"),
        ("min_memory", old.memory_min, new.memory_min, new.min_memory_bytes is None, "memory"),
        ("max_memory", old.memory_max, new.memory_max, new.max_memory_bytes is None, "memory"),
    )
    for label, a, b, follows, of in bounds:
        if a != b:
            shown = (str(a), str(b)) if of == "cpus" else (format_size(a), format_size(b))
            why = (
                f" (left out, it follows {of}; write `{label}: {shown[0]}` to keep it)"
                if follows
                else ""
            )
            return (
                f"{label} changed {shown[0]} -> {shown[1]}{why}: a change of bounds needs --replace"
            )
    if old.hotplug_slots != new.hotplug_slots:
        return (
            f"hotplug_slots changed {old.hotplug_slots} -> {new.hotplug_slots}: a change of "
            "bounds needs --replace"
        )
    if old.numa != new.numa:
        return f"numa changed {_numa(old.numa)} -> {_numa(new.numa)}"
    return None


def _pages(size: int | None) -> str:
    return page_size_name(size) if size else "none"


def _numa(numa: Literal["auto"] | tuple[int, ...]) -> str:
    return "auto" if numa == "auto" else f"[{', '.join(map(str, numa))}]"


def hotplugged_after(old: Placement, devices: Iterable[DeviceAssignment]) -> tuple[str, ...]:
    """The spare slots of a partition placed as ``old`` once its devices are ``devices``: a
    function kept stays in its slot, one detached frees it, and one attached (in ``devices``
    order) takes the lowest free slot; no free slot is left at the end."""
    devices = tuple(devices)
    now = {str(d.address) for d in devices}
    before = {str(d.address) for d in old.devices}
    slots = [a if a in now else "" for a in old.hotplugged]
    for d in devices:
        a = str(d.address)
        if a in before:
            continue
        if "" in slots:
            slots[slots.index("")] = a
        else:
            slots.append(a)
    while slots and not slots[-1]:
        slots.pop()
    return tuple(slots)


@dataclass(frozen=True)
class LiveChange:
    """What a live change of a running partition does (rule 11), from
    :meth:`Placement.live_change_from`.  Empty: nothing to do."""

    name: str
    added_cpus: tuple[tuple[int, int], ...] = ()  # (vCPU index, host CPU), lowest first
    removed_vcpus: tuple[tuple[int, int], ...] = ()  # (vCPU index, its host CPU), highest first
    memory: tuple[tuple[int, int, int], ...] = ()  # (node, bytes before, bytes after), node order
    attached: tuple[DeviceAssignment, ...] = ()
    detached: tuple[DeviceAssignment, ...] = ()
    vcpus_before: int = 0
    memory_before: int = 0
    hugepage_bytes: int | None = None

    @property
    def empty(self) -> bool:
        return not (
            self.added_cpus or self.removed_vcpus or self.memory or self.attached or self.detached
        )

    @property
    def vcpus_after(self) -> int:
        return self.vcpus_before + len(self.added_cpus) - len(self.removed_vcpus)

    @property
    def memory_after(self) -> int:
        return self.memory_before + sum(new - old for _, old, new in self.memory)

    def actions(self) -> tuple[tuple[str, str, str], ...]:
        """The plan's lines, as (action, target, detail), in the order they are best made:
        what is given back first (devices, vCPUs, memory), then what is taken (vCPUs, memory,
        devices).  ``add-cpus db0 4 -> 6 (CPUs 12-13, pinned)``, ``grow-memory db0 8GiB ->
        12GiB (node 1, 2048 x 2MiB pages)``, ``attach-device db0 0000:82:00.0``."""
        out: list[tuple[str, str, str]] = []
        out += [("detach-device", self.name, str(d.address)) for d in self.detached]
        vcpus = self.vcpus_before
        if self.removed_vcpus:
            after = vcpus - len(self.removed_vcpus)
            gone = CpuSet(c for _, c in self.removed_vcpus)
            out.append(("remove-cpus", self.name, f"{vcpus} -> {after} (CPUs {gone})"))
            vcpus = after
        total = self.memory_before
        for node, old, new in self.memory:
            if new < old:
                out.append(("shrink-memory", self.name, self._memory_line(total, node, old, new)))
                total += new - old
        if self.added_cpus:
            after = vcpus + len(self.added_cpus)
            came = CpuSet(c for _, c in self.added_cpus)
            out.append(("add-cpus", self.name, f"{vcpus} -> {after} (CPUs {came}, pinned)"))
        for node, old, new in self.memory:
            if new > old:
                out.append(("grow-memory", self.name, self._memory_line(total, node, old, new)))
                total += new - old
        out += [("attach-device", self.name, str(d.address)) for d in self.attached]
        return tuple(out)

    def _memory_line(self, total: int, node: int, old: int, new: int) -> str:
        delta = abs(new - old)
        if self.hugepage_bytes:
            what = f"{delta // self.hugepage_bytes} x {page_size_name(self.hugepage_bytes)} pages"
        else:
            what = format_size(delta)
        return f"{format_size(total)} -> {format_size(total + new - old)} (node {node}, {what})"


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
