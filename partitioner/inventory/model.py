"""The host as the partitioner sees it: a read-only picture, built by ``inventory.scan(HostRoot)``.

Everything here is a frozen value.  Nothing in this module reads the host.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from partitioner.cpuset import CpuSet
from partitioner.inventory.bars import Bar
from partitioner.kernel import sysfs
from partitioner.pci import PciAddress


@dataclass(frozen=True)
class Cpu:
    id: int
    online: bool
    allowed: bool  # in the cgroup/affinity set the partitioner may hand out
    package: int
    die: int
    core: int  # core_id as the kernel gives it (unique within a package only)
    node: int | None  # NUMA node, None if the kernel tells none
    siblings: CpuSet  # thread_siblings_list: this CPU and its SMT siblings
    kind: str = ""  # hybrid CPUs: "core" (performance) / "atom" (efficiency); "" when uniform


@dataclass(frozen=True)
class HugepagePool:
    size_bytes: int
    total: int
    free: int
    surplus: int = 0


@dataclass(frozen=True)
class NumaNode:
    id: int
    cpus: CpuSet  # online CPUs of this node (may be empty: memory-only nodes)
    memory_bytes: int  # MemTotal of the node
    free_bytes: int  # MemFree of the node
    distances: tuple[int, ...]  # to every node, in node order as the kernel lists them
    hugepages: Mapping[int, HugepagePool]  # page size in bytes -> pool


@dataclass(frozen=True)
class SriovCaps:
    """A physical function's SR-IOV capability, as sysfs shows it (``sriov_*``, ``virtfnN``)."""

    total_vfs: int  # sriov_totalvfs: the most VFs it can have
    num_vfs: int  # sriov_numvfs: the VFs it has now
    drivers_autoprobe: bool  # sriov_drivers_autoprobe: host drivers probe a VF when it is made
    # First VF Offset and VF Stride, in routing IDs (bus << 8 | devfn): where VF i is, relative
    # to the PF, for the VF count the PF has now.  0: not told (an offset is never 0).
    vf_offset: int
    vf_stride: int
    vf_device: str  # sriov_vf_device: the VFs' device id, 4 lowercase hex digits; "" unknown
    vfs: tuple[PciAddress, ...] = ()  # the VFs that exist, by index (virtfn0, virtfn1, ...)

    def vf_address(self, pf: PciAddress, index: int) -> PciAddress | None:
        """Where VF ``index`` of ``pf`` is (an existing one) or will be once made (the PF's
        routing ID plus offset plus index times stride); None when that cannot be told."""
        if index < len(self.vfs):
            return self.vfs[index]
        if self.vf_offset <= 0 or (index > 0 and self.vf_stride <= 0) or index < 0:
            return None
        rid = (pf.bus << 8 | pf.slot << 3 | pf.function) + self.vf_offset + index * self.vf_stride
        if rid > 0xFFFF:
            return None
        return PciAddress(pf.domain, rid >> 8, (rid >> 3) & 0x1F, rid & 0x7)


@dataclass(frozen=True)
class PciFunction:
    address: PciAddress
    vendor: str  # 4 lowercase hex digits, no 0x: "8086"
    device: str
    class_code: str  # 6 hex digits: "020000"
    subsystem_vendor: str
    subsystem_device: str
    driver: str | None
    driver_override: str | None
    iommu_group: int | None
    numa_node: int | None  # None where the kernel says -1
    reset_methods: tuple[str, ...]  # reset_method, e.g. ("flr", "bus"); () if none or not said
    boot_vga: bool
    is_bridge: bool  # PCI class 06xx: bridges, root ports, switch ports stay with the host
    upstream: tuple[PciAddress, ...]  # bridges/ports from the root down to this function's parent
    netdevs: tuple[str, ...]  # network interfaces of this function
    label: str = ""  # the class's name ("Ethernet controller") when one is known
    vendor_name: str = ""  # udev's hwdb: "Intel Corporation"; "" when unknown (show the id)
    device_name: str = ""  # udev's hwdb: "82574L Gigabit Network Connection"; "" when unknown
    # The group its iommu_group link names when the kernel does not list that group
    # (iommu_group is None then): a damaged tree, or a group removed while reading.
    iommu_group_absent: str | None = None
    bars: tuple[Bar, ...] = ()  # from sysfs `resource` (partitioner/inventory/bars.py)
    # No reset_method file (kernels before 5.15) but a `reset` file: the kernel can reset it
    # by a method it does not name (it shows `reset` only for a function it can reset).
    reset_unnamed: bool = False
    sriov: SriovCaps | None = None  # a physical function's SR-IOV capability (inventory/sriov.py)
    physfn: PciAddress | None = None  # a virtual function's physical function
    # Why a function with SR-IOV files has no ``sriov`` (numbers that are not numbers...).
    sriov_problem: str | None = None

    @property
    def own_reset(self) -> bool:
        """The kernel can reset this function by itself (FLR, PM, a bus it is alone on...)."""
        return bool(self.reset_methods) or self.reset_unnamed

    @property
    def id(self) -> str:
        return f"{self.vendor}:{self.device}"

    @property
    def group_problem(self) -> str | None:
        """Why this function's IOMMU group is unknown although it has a group link, or None."""
        if self.iommu_group_absent is None:
            return None
        return (
            f"its iommu_group link names group {self.iommu_group_absent!r}, which the kernel "
            f"does not list in {sysfs.IOMMU_GROUPS}: its group, and so what comes with it, "
            "is unknown"
        )


@dataclass(frozen=True)
class IommuGroup:
    id: int
    members: tuple[PciAddress, ...]


@dataclass(frozen=True)
class NetInterface:
    name: str
    pci: PciAddress | None
    up: bool
    has_address: bool
    default_route: bool


@dataclass(frozen=True)
class Host:
    cpus: Mapping[int, Cpu]  # every CPU the kernel lists (online or not)
    nodes: Mapping[int, NumaNode]
    pci: Mapping[PciAddress, PciFunction]
    iommu_groups: Mapping[int, IommuGroup]
    # Functions the host itself is using, with why: "controller of / (nvme0n1p2)",
    # "enp3s0 carries the default route", "boot VGA device".  Rule 5 of docs/manifest.md.
    in_use: Mapping[PciAddress, tuple[str, ...]]
    netdevs: Mapping[str, NetInterface]
    has_kvm: bool
    has_iommu: bool  # /sys/kernel/iommu_groups exists and is not empty
    hugepage_sizes: tuple[int, ...]  # page sizes the kernel offers (bytes), ascending
    page_size: int = 4096
    vfio_pci_loaded: bool = False
    phys_bits: int | None = None  # the CPU's physical address bits (/proc/cpuinfo), None: unknown
    # Interrupts delivered through interrupt remapping (an IR- irqchip in /proc/interrupts);
    # None: nothing tells.  Rule 10: without it a device must not be assigned unasked.
    interrupt_remapping: bool | None = None
    notes: tuple[str, ...] = field(
        default=()
    )  # quirks met while reading (contradictory NUMA data...)

    @property
    def online_cpus(self) -> CpuSet:
        return CpuSet(c.id for c in self.cpus.values() if c.online)

    @property
    def usable_cpus(self) -> CpuSet:
        """CPUs that may be handed out: online and allowed (rule 1)."""
        return CpuSet(c.id for c in self.cpus.values() if c.online and c.allowed)

    def threads_per_core(self) -> int:
        """The most common SMT width among usable CPUs (1 without SMT)."""
        widths: dict[int, int] = {}
        for c in self.cpus.values():
            if c.online and c.allowed:
                w = len(c.siblings) or 1
                widths[w] = widths.get(w, 0) + 1
        if not widths:
            return 1
        return max(widths.items(), key=lambda kv: (kv[1], kv[0]))[0]

    @cached_property
    def _slots(self) -> dict[tuple[int, int, int], tuple[PciFunction, ...]]:
        by_slot: dict[tuple[int, int, int], list[PciFunction]] = {}
        for fn in self.pci.values():
            by_slot.setdefault(fn.address.slot_key, []).append(fn)
        return {k: tuple(v) for k, v in by_slot.items()}

    @cached_property
    def _below(self) -> dict[PciAddress, tuple[PciFunction, ...]]:
        by_bridge: dict[PciAddress, list[PciFunction]] = {}
        for fn in self.pci.values():
            for bridge in fn.upstream:
                by_bridge.setdefault(bridge, []).append(fn)
        return {k: tuple(sorted(v, key=lambda f: f.address)) for k, v in by_bridge.items()}

    def functions_below(self, bridge: PciAddress) -> tuple[PciFunction, ...]:
        """Every function behind ``bridge`` (on its secondary bus and the buses below it):
        what a reset of that bus reaches.  Indexed once, as :meth:`functions_in_slot` is."""
        return self._below.get(bridge, ())

    def functions_in_slot(self, slot_key: tuple[int, int, int]) -> tuple[PciFunction, ...]:
        """The functions of one physical slot (a GPU and its audio function), found without
        a walk over every function: callers ask once per function, and hosts have thousands."""
        return self._slots.get(slot_key, ())

    def vfs_of(self, pf: PciAddress) -> tuple[PciAddress, ...]:
        """The virtual functions ``pf`` has now, by index."""
        fn = self.pci.get(pf)
        return fn.sriov.vfs if fn is not None and fn.sriov is not None else ()

    def vf_address(self, pf: PciAddress, index: int) -> PciAddress | None:
        """Where VF ``index`` of ``pf`` is, or will be once made (``SriovCaps.vf_address``)."""
        fn = self.pci.get(pf)
        if fn is None or fn.sriov is None:
            return None
        return fn.sriov.vf_address(pf, index)

    def vf_index(self, vf: PciAddress) -> int | None:
        """The index of an existing virtual function among its PF's VFs; None if not a VF."""
        fn = self.pci.get(vf)
        if fn is None or fn.physfn is None:
            return None
        vfs = self.vfs_of(fn.physfn)
        return vfs.index(vf) if vf in vfs else None

    def group_of(self, address: PciAddress) -> IommuGroup | None:
        fn = self.pci.get(address)
        if fn is None or fn.iommu_group is None:
            return None
        return self.iommu_groups.get(fn.iommu_group)
