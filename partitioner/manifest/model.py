"""The site manifest as values.  ``load(path)`` (in ``partitioner.manifest.loader``) builds these."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from partitioner.cpuset import CpuSet


@dataclass(frozen=True)
class Location:
    """Where a node stands in the YAML file (1-based)."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


NOWHERE = Location("<manifest>", 0, 0)


@dataclass(frozen=True)
class DeviceSpec:
    """One entry of a partition's ``devices`` list."""

    kind: Literal["pci", "id", "netdev"]
    value: str  # full PCI address ("0000:81:00.0"), "8086:10d3" (lowercase), or an interface name
    count: int = 1  # for kind "id" only
    required: bool = True
    reset_none_ok: bool = False  # `reset: none-ok`: accept a function with no reset method
    rom: str | None = None  # `rom: off` or an absolute ROM file path; None: the device's own ROM
    primary_display: bool = False  # `primary_display: true`: x-vga=on (display GPUs, SeaBIOS)
    where: Location = NOWHERE

    def __str__(self) -> str:
        return f"{self.kind}: {self.value}" + (f" x{self.count}" if self.kind == "id" else "")


@dataclass(frozen=True)
class Boot:
    kernel: str
    initrd: str | None = None
    cmdline: str | None = None
    # Where the kernel and initrd values stand, for plan's file checks (not compared).
    kernel_where: Location = field(default=NOWHERE, compare=False)
    initrd_where: Location = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Disk:
    path: str
    readonly: bool = False
    where: Location = field(default=NOWHERE, compare=False)  # where the path value stands


@dataclass(frozen=True)
class PartitionSpec:
    name: str
    cpu_count: int  # always set: len(cpu_list) when a list was given
    cpu_list: CpuSet | None  # explicit host CPUs, or None for "any cpu_count CPUs"
    memory_bytes: int
    hugepage_bytes: int | None  # 2MiB / 1GiB in bytes; None for `hugepages: none`
    numa: Literal["auto"] | tuple[int, ...]
    devices: tuple[DeviceSpec, ...] = ()
    boot: Boot | None = None
    disks: tuple[Disk, ...] = ()
    firmware: Literal["bios", "uefi"] = "bios"
    autostart: bool = True
    order: int = 0
    on_crash: Literal["restart", "stop"] = "restart"
    where: Location = NOWHERE
    firmware_where: Location = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class HostSpec:
    reserve_cpu_count: int | None  # whole cores' worth of CPUs, lowest-numbered first per node
    reserve_cpu_list: CpuSet | None  # or explicit CPUs; both None: the default (one whole core)
    reserve_memory_bytes: int
    smt: Literal["isolate", "share"] = "isolate"
    accel: Literal["kvm", "tcg"] = "kvm"
    isolation: Literal["full", "pinned"] = "full"
    reserve_memory_where: Location = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Manifest:
    file: str
    host: HostSpec
    partitions: Mapping[str, PartitionSpec] = field(default_factory=dict)  # in name order

    def start_order(self) -> list[PartitionSpec]:
        """Lower ``order`` starts first; ties start in name order.  Stop order is the reverse."""
        return sorted(self.partitions.values(), key=lambda p: (p.order, p.name))
