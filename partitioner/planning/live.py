"""Live changes (rule 11): what turns a running partition's placement into another while it
runs, or why that cannot be done live and needs ``--replace``.

:func:`live_change` compares two placements (the one the partition runs with and the one
the plan gives it): vCPUs added into free slots or the highest removed, memory plugged or
unplugged per node within its ceiling, PCI functions attached into spare slots or
detached, each whole IOMMU group at once; everything else the same.  Pure, as the rest of
the planning.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from partitioner.cpuset import CpuSet
from partitioner.manifest.model import PartitionSpec
from partitioner.planning.model import DeviceAssignment, Placement
from partitioner.units import format_size, human_size, page_size_name


def live_change(new: Placement, old: Placement) -> LiveChange | str:
    """What turns a running partition placed as ``old`` into ``new`` while it runs (rule
    11), or why it cannot be done live: a sentence that ends by asking for ``--replace``.

    Live: vCPUs added into free slots (each on a CPU of its slot's node) or the highest
    ones removed, the vCPUs that stay on their CPUs; memory plugged or unplugged per node
    within the ceiling, in whole virtio-mem blocks, the fixed part unchanged; PCI functions
    attached into spare slots (whole IOMMU groups) or detached (whole groups).  Everything
    else (bounds, page size, NUMA nodes, topology, boot, disks, firmware, a device's ROM
    or display role, the PCI window) is the same or it is not live.  ``LiveChange`` with
    nothing in it: nothing to do."""
    why = _spec_refusal(old.spec, new.spec) or _placement_refusal(new, old)
    if why is None:
        return _live(new, old)
    if why.endswith("needs --replace"):
        return f"{why} {new.name}"
    return f"{why}; needs --replace {new.name}"


def _placement_refusal(new: Placement, old: Placement) -> str | None:
    if new.name != old.name:
        return f"partition {old.name} is not {new.name}"
    topo, was = (new.sockets, new.cores, new.threads), (old.sockets, old.cores, old.threads)
    if topo != was:
        return (
            "the guest's CPU topology changes ({}x{}x{} -> {}x{}x{}): it is fixed while it "
            "runs".format(*was, *topo)
        )
    if new.max_vcpus != old.max_vcpus:
        return f"its vCPU slots change {old.max_vcpus} -> {new.max_vcpus}"
    if new.all_slot_nodes() != old.all_slot_nodes():
        return "the NUMA nodes of its vCPU slots change: they are fixed while it runs"
    if new.numa_nodes != old.numa_nodes:
        return (
            f"its NUMA nodes change {_nodes(old.numa_nodes)} -> {_nodes(new.numa_nodes)}: "
            "they are fixed while it runs"
        )
    if len(new.cpus) > new.max_vcpus:
        return f"{len(new.cpus)} vCPUs is more than its {new.max_vcpus} vCPU slots (max_cpus)"
    for i, (a, b) in enumerate(zip(old.cpus, new.cpus, strict=False)):
        if a != b:
            return (
                f"vCPU {i} would move from CPU {a} to CPU {b}: a running vCPU keeps its "
                "CPU (rule 8)"
            )
    for i in range(len(old.cpus), len(new.cpus)):
        node = new.cpu_nodes[i] if i < len(new.cpu_nodes) else None
        if node is not None and node != new.slot_node(i):
            return (
                f"vCPU {i} would run on CPU {new.cpus[i]} of node {node}, but its slot is on "
                f"node {new.slot_node(i)}"
            )
    if new.memory_per_node != old.memory_per_node and not old.dynamic_memory:
        return (
            f"memory changes {format_size(old.memory_bytes)} -> "
            f"{format_size(new.memory_bytes)} but it was started with all of its memory "
            "fixed (min_memory = max_memory)"
        )
    if new.fixed_memory_per_node != old.fixed_memory_per_node:
        return "the fixed part of its memory (min_memory) changes on its nodes"
    if new.max_memory_per_node != old.max_memory_per_node:
        return "the ceiling of its memory (max_memory) changes on its nodes"
    if [n for n, _ in new.memory_per_node] != [n for n, _ in old.memory_per_node]:
        return "the nodes its memory is on change"
    block = new.virtio_mem_block
    room = dict(new.dynamic_room_per_node)
    for node, plugged in new.plugged_per_node:
        if plugged < 0 or plugged > room.get(node, 0) or plugged % block:
            return (
                f"{format_size(max(plugged, 0))} plugged on node {node} is not a whole "
                f"number of {format_size(block)} blocks within its "
                f"{format_size(room.get(node, 0))} of dynamic memory there"
            )
    return _device_refusal(new, old) or _window_refusal(new, old)


def _device_refusal(new: Placement, old: Placement) -> str | None:
    before = {d.address: d for d in old.devices}
    now = {d.address: d for d in new.devices}
    for a, d in now.items():
        o = before.get(a)
        if o is not None and d.vf != o.vf:
            return (
                f"device {a} is another VF, or its VF settings change ({_vf_said(o)} -> "
                f"{_vf_said(d)}): the host sets a VF up before its guest gets it"
            )
        if o is None:
            continue
        # A VF apply made has its group known only once made: None and a number are one group.
        groups_differ = d.iommu_group != o.iommu_group and not (
            d.vf is not None and None in (d.iommu_group, o.iommu_group)
        )
        if (d.rom, d.primary_display) != (o.rom, o.primary_display) or groups_differ:
            return f"device {a}'s rom or primary_display changes: it is on QEMU's command line"
    attached = [d for a, d in now.items() if a not in before]
    detached = [d for a, d in before.items() if a not in now]
    for d in (*attached, *detached):
        if d.vf is not None:
            return (
                f"{d.address} is VF {d.vf.index} of {d.vf.pf}: a VF is given to a guest when it "
                "starts (its settings set and it claimed first), and taken back when it stops"
            )
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
        stays = sorted(str(o.address) for o in new.devices if o.iommu_group == d.iommu_group)
        if stays:
            return (
                f"{d.address} would leave but {', '.join(stays)} of its IOMMU group "
                f"{d.iommu_group} would stay: a group is given back whole (rule 4)"
            )
    if attached:
        slots = hotplugged_after(old, new.devices)
        if len(slots) > new.hotplug_slots:
            used = sum(1 for a in old.hotplugged if a and a in {str(x) for x in now})
            return (
                f"{_count(len(attached), 'function')} would be attached "
                f"({', '.join(str(d.address) for d in attached)}) but it has "
                f"hotplug_slots: {old.hotplug_slots}"
                + (f", {used} of them in use" if used else "")
                + ": each function attached while it runs takes a spare slot, and more "
                "slots need a larger hotplug_slots"
            )
    if new.hotplugged != hotplugged_after(old, new.devices):
        return "its spare slots are not as a live change leaves them"
    return None


def _vf_said(d: DeviceAssignment) -> str:
    if d.vf is None:
        return "not a VF"
    s = d.vf.settings
    said = [f"VF {d.vf.index} of {d.vf.pf}"]
    if s is not None:
        said += [f"{k} {v}" for k, v in (("mac", s.mac), ("vlan", s.vlan), ("qos", s.qos)) if v]
        said += [f"spoofchk {'on' if s.spoofchk else 'off'}", f"trust {'on' if s.trust else 'off'}"]
        said += [
            f"{k} {v}"
            for k, v in (
                ("link_state", s.link_state),
                ("min_tx_rate", s.min_tx_rate),
                ("max_tx_rate", s.max_tx_rate),
            )
            if v is not None
        ]
    return ", ".join(said)


def _window_refusal(new: Placement, old: Placement) -> str | None:
    if new.pci_hole64_bytes != old.pci_hole64_bytes:
        return (
            f"its devices' 64-bit PCI window changes {human_size(old.pci_hole64_bytes)} -> "
            f"{human_size(new.pci_hole64_bytes)}: it is on QEMU's command line"
        )
    if new.host_cache_info != old.host_cache_info:
        return "whether the guest gets the host's cache description changes"
    return None


def _live(new: Placement, old: Placement) -> LiveChange:
    mem_before = dict(old.memory_per_node)
    before = {d.address for d in old.devices}
    now = {d.address for d in new.devices}
    return LiveChange(
        name=new.name,
        added_cpus=tuple((i, new.cpus[i]) for i in range(len(old.cpus), len(new.cpus))),
        removed_vcpus=tuple(
            (i, old.cpus[i]) for i in reversed(range(len(new.cpus), len(old.cpus)))
        ),
        memory=tuple((n, mem_before[n], b) for n, b in new.memory_per_node if mem_before[n] != b),
        attached=tuple(d for d in new.devices if d.address not in before),
        detached=tuple(d for d in old.devices if d.address not in now),
        vcpus_before=len(old.cpus),
        memory_before=old.memory_bytes,
        hugepage_bytes=new.hugepage_bytes,
    )


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
    :func:`live_change`.  Empty: nothing to do."""

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
