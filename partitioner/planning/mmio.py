"""A guest's physical address space: the 64-bit PCI window its devices need, and whether it fits.

``settle(placements, manifest, host)`` is called once by the planner, after
every partition is placed; it is pure.  For each partition it

- sizes the 64-bit PCI window (``pci_hole64_bytes``) that holds its devices'
  64-bit prefetchable BARs (large-BAR GPUs: 64 to 256 GiB), and says in a note
  when that is larger than q35's and OVMF's default of 32 GiB;
- refuses a layout the guest cannot address: where the firmware puts the window
  must lie below 2**(the host CPU's physical address bits), because ``-cpu
  host`` gives the guest the host's address width;
- copies each device's ``rom`` and ``primary_display`` from the manifest, and
  refuses ``primary_display`` on anything but one display GPU under SeaBIOS;
- decides ``host-cache-info`` (the guest's topology mirrors whole host cores).

How the window is sized.  Every device (a slot's functions) sits behind a PCIe
root port of its own (``guest/argv.py``), whose prefetchable window holds its
BARs, largest first, and is aligned to its largest BAR; each port is given the
power of two that holds its BARs (the margin: a GPU's small BAR3 never makes
its 256 GiB BAR1 spill), and the whole window is the power of two that holds
every port.  Powers of two pack without a hole, largest first, so a firmware
that sorts by alignment (OVMF, SeaBIOS, Linux) always fits them.

Where each firmware puts it (measured with QEMU 7.2's firmware, see
docs/decisions.md "native"):

- OVMF takes the aperture size from ``opt/ovmf/X-PciMmio64Mb`` and aligns its
  base to that size, above RAM: it ends at ``align(top of RAM, W) + W``;
- SeaBIOS 1.16 ignores both QEMU's window and the CPU's address width: it puts
  the BARs right above RAM, aligned to the largest one, whatever the CPU can
  reach (a 64 GiB BAR lands at 64 GiB under ``phys-bits=36``, and the guest
  cannot use it).  That is the layout refused under ``firmware: bios``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from partitioner.errors import PlanProblem
from partitioner.inventory.bars import high_bytes
from partitioner.inventory.model import Host, PciFunction
from partitioner.manifest.model import DeviceSpec, Manifest
from partitioner.planning.model import DeviceAssignment, Placement
from partitioner.planning.work import located
from partitioner.units import GiB, MiB, human_size

DEFAULT_WINDOW = 32 * GiB  # q35-pcihost.pci-hole64-size and OVMF's PcdPciMmio64Size
FOUR_GIB = 4 * GiB
# q35 keeps all RAM below 4 GiB up to 2.75 GiB; above that, 2 GiB below and the rest from 4 GiB.
_Q35_LOWMEM_LIMIT = 0xB0000000
_Q35_LOWMEM = 2 * GiB


def _pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def bits_for(end: int) -> int:
    """Address bits needed to reach every byte below ``end``."""
    return max(1, (end - 1).bit_length())


def ram_top(memory_bytes: int) -> int:
    """The first guest-physical address above q35's RAM (4 GiB when all of it is below)."""
    if memory_bytes < _Q35_LOWMEM_LIMIT:
        return FOUR_GIB
    return FOUR_GIB + memory_bytes - _Q35_LOWMEM


@dataclass(frozen=True)
class Layout:
    """Where a guest's RAM and 64-bit PCI window go."""

    ram_top: int
    ports: tuple[tuple[int, ...], ...]  # per root port: its 64-bit BAR sizes, largest first
    window: int  # the 64-bit window QEMU and OVMF are told (a power of two, >= 32 GiB)

    @property
    def bar_bytes(self) -> int:
        return sum(sum(p) for p in self.ports)

    @property
    def needs_window(self) -> bool:
        """True when QEMU's and OVMF's default window is too small."""
        return self.window > DEFAULT_WINDOW

    def uefi_span(self) -> tuple[int, int]:
        base = _align(self.ram_top, self.window)
        return base, base + self.window

    def bios_span(self) -> tuple[int, int]:
        """SeaBIOS: each port's window is its BARs, aligned to its largest; ports go largest
        alignment first from the top of RAM aligned to the largest BAR (and 1 GiB)."""
        wins = sorted(((_align(sum(p), p[0]), p[0]) for p in self.ports if p), key=lambda w: -w[1])
        if not wins:
            return self.ram_top, self.ram_top
        base = _align(_align(self.ram_top, wins[0][1]), GiB)
        cursor = base
        for size, align in wins:
            cursor = _align(cursor, align) + size
        return base, cursor

    def end(self, firmware: str) -> int:
        if not self.ports:
            return self.ram_top
        return (self.uefi_span() if firmware == "uefi" else self.bios_span())[1]


def port_groups(devices: tuple[DeviceAssignment, ...]) -> list[list[DeviceAssignment]]:
    """The functions behind each guest root port, as ``guest/argv.py`` lays them out: a slot
    with function 0 stays together, any other function gets a port of its own."""
    slots: dict[tuple[int, int, int], list[DeviceAssignment]] = {}
    for d in sorted(devices, key=lambda d: d.address):
        slots.setdefault(d.address.slot_key, []).append(d)
    ports: list[list[DeviceAssignment]] = []
    for functions in slots.values():
        if functions[0].address.function == 0:
            ports.append(functions)
        else:
            ports.extend([d] for d in functions)
    return ports


def layout(memory_bytes: int, ports: list[tuple[int, ...]]) -> Layout:
    """The layout of a guest with ``memory_bytes`` of RAM and these ports' 64-bit BARs."""
    ports_t = tuple(tuple(sorted(p, reverse=True)) for p in ports if p)
    # Each port: the power of two holding its BARs, at least the 1 MiB bridge granule.
    slots = [_pow2(max(sum(p), MiB)) for p in ports_t]
    window = max(DEFAULT_WINDOW, _pow2(sum(slots))) if slots else DEFAULT_WINDOW
    return Layout(ram_top=ram_top(memory_bytes), ports=ports_t, window=window)


def placement_layout(p: Placement, host: Host) -> Layout:
    ports = []
    for group in port_groups(p.devices):
        sizes: list[int] = []
        for d in group:
            fn = host.pci.get(d.address)
            if fn is not None:
                sizes.extend(high_bytes(fn.bars))
        ports.append(tuple(sizes))
    lay = layout(p.fixed_memory_bytes if p.dynamic_memory else p.memory_bytes, ports)
    if not p.dynamic_memory:
        return lay
    # Dynamic memory (virtio-mem) lives in QEMU's device-memory region, above RAM aligned to
    # 1 GiB and sized to the ceiling less the fixed part, plus 1 GiB of alignment per memory
    # slot (taken as one per virtio-mem device); the 64-bit PCI window comes after it.
    devices = sum(1 for _, room in p.dynamic_room_per_node if room)
    top = _align(lay.ram_top, GiB) + p.max_memory_bytes - p.fixed_memory_bytes + devices * GiB
    return replace(lay, ram_top=top)


def _spec_of(d: DeviceAssignment, specs: tuple[DeviceSpec, ...], host: Host) -> DeviceSpec | None:
    """The manifest entry that named ``d`` (None for a function added with its slot)."""
    if d.added:
        return None
    for s in specs:
        if s.kind == "pci" and s.value == str(d.address):
            return s
        if s.kind == "id" and s.value == d.vendor_device:
            return s
        if s.kind == "netdev":
            iface = host.netdevs.get(s.value)
            if iface is not None and iface.pci == d.address:
                return s
    return None


def _mirrors_host_cores(p: Placement, host: Host) -> bool:
    """True when every vCPU core is one whole host core: the host's cache description (which
    counts threads per cache) then tells the guest the truth."""
    for c in p.cpus:
        cpu = host.cpus.get(c)
        if cpu is None:
            return False
        width = sum(1 for s in cpu.siblings if (o := host.cpus.get(s)) is not None and o.online)
        if max(width, 1) != p.threads:
            return False
    return True


def settle(
    placements: Mapping[str, Placement], manifest: Manifest, host: Host
) -> tuple[dict[str, Placement], list[PlanProblem], list[str]]:
    """(placements with their guest layout, problems, notes): see the module docstring."""
    out: dict[str, Placement] = {}
    problems: list[PlanProblem] = []
    notes: list[str] = []
    kvm = manifest.host.accel == "kvm"
    for name, p in placements.items():
        devices = []
        displays: list[str] = []
        changed = False
        for d in p.devices:
            spec = _spec_of(d, p.spec.devices, host)
            if spec is not None and (spec.rom is not None or spec.primary_display):
                d = replace(d, rom=spec.rom, primary_display=spec.primary_display)
                changed = True
            if d.primary_display:
                displays.append(str(d.address))
                field = f"devices[{p.spec.devices.index(spec)}]" if spec is not None else "devices"
                problems += [
                    located(p.spec, field, m)
                    for m in _display_problems(p, host.pci.get(d.address), d)
                ]
            devices.append(d)
        if len(displays) > 1:
            problems.append(
                located(
                    p.spec,
                    "devices",
                    f"{name}: primary_display is set on {', '.join(displays)}: a guest has one "
                    "primary display; keep it on one GPU",
                )
            )
        if changed:
            p = replace(p, devices=tuple(devices))
        lay = placement_layout(p, host)
        if lay.needs_window:
            notes.append(
                f"{name}: its devices' 64-bit BARs take {human_size(lay.bar_bytes)}: the guest "
                f"gets a {human_size(lay.window)} 64-bit PCI window (QEMU's default is "
                f"{human_size(DEFAULT_WINDOW)})"
            )
        problems += [located(p.spec, "firmware", m) for m in _address_problems(p, lay, host)]
        cache = kvm and _mirrors_host_cores(p, host)
        if kvm and not cache:
            notes.append(
                f"{name}: host-cache-info left out: its vCPUs are not whole host cores "
                f"({p.threads} thread(s) per guest core), so the host's cache description "
                "would tell the guest wrong sharing"
            )
        out[name] = replace(
            p, pci_hole64_bytes=lay.window if lay.needs_window else 0, host_cache_info=cache
        )
    return out, problems, notes


def _display_problems(p: Placement, fn: PciFunction | None, d: DeviceAssignment) -> list[str]:
    if fn is not None and not fn.class_code.startswith("0300"):
        what = (
            "a 3D controller (compute GPU)" if fn.class_code.startswith("0302") else "not a VGA GPU"
        )
        return [
            f"{p.name}: primary_display on {d.address}: it is class {fn.class_code[:4]}, {what}; "
            "only a display GPU (class 0300) can be the guest's VGA display: remove "
            "primary_display (a compute GPU needs no display)"
        ]
    if p.spec.firmware != "bios":
        return [
            f"{p.name}: primary_display on {d.address} needs firmware: bios (it routes the legacy "
            "VGA ranges for SeaBIOS); under firmware: uefi the GPU's own UEFI driver shows the "
            "display: remove primary_display"
        ]
    return []


def _address_problems(p: Placement, lay: Layout, host: Host) -> list[str]:
    bits = host.phys_bits
    if bits is None or not lay.ports:
        return []
    limit = 1 << bits
    uefi_base, uefi_end = lay.uefi_span()
    if p.spec.firmware == "uefi":
        if uefi_end <= limit:
            return []
        return [
            f"{p.name}: its devices' 64-bit BARs ({human_size(lay.bar_bytes)}) need a "
            f"{human_size(lay.window)} window, which OVMF places at {uefi_base:#x}-{uefi_end:#x} "
            f"above {human_size(p.memory_bytes)} of RAM: that needs {bits_for(uefi_end)} physical "
            f"address bits and this host's CPU has {bits} (/proc/cpuinfo): give the partition "
            "fewer large-BAR devices or less memory, or use a host with more address bits"
        ]
    base, end = lay.bios_span()
    if end <= limit:
        return []
    fix = (
        "use firmware: uefi (OVMF keeps the window inside the address width)"
        if uefi_end <= limit
        else "give the partition fewer large-BAR devices or less memory"
    )
    return [
        f"{p.name}: firmware: bios cannot place its devices' 64-bit BARs "
        f"({human_size(lay.bar_bytes)}): SeaBIOS puts them at {base:#x}-{end:#x}, which needs "
        f"{bits_for(end)} physical address bits, and this host's CPU has {bits} "
        f"(/proc/cpuinfo); SeaBIOS does not check, and the guest cannot reach them: {fix}"
    ]
