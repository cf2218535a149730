"""The site manifest as values.  ``load(path)`` (in ``partitioner.manifest.loader``) builds these."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from partitioner.cpuset import CpuSet
from partitioner.jsonvalues import obj, seq


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
class VfSettings:
    """A VF's settings, set through its PF before the VF is claimed (manifest ``vf:``)."""

    mac: str | None
    vlan: int | None
    qos: int | None
    spoofchk: bool = True
    trust: bool = False
    link_state: str | None = None
    min_tx_rate: int | None = None
    max_tx_rate: int | None = None


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
    # Where each field's value stands, for plan problems about it (not compared; a field left
    # out stands where the partition's name does).
    cpus_where: Location = field(default=NOWHERE, compare=False)
    memory_where: Location = field(default=NOWHERE, compare=False)
    hugepages_where: Location = field(default=NOWHERE, compare=False)
    numa_where: Location = field(default=NOWHERE, compare=False)

    def field_where(self, name: str) -> Location:
        """Where the field ``name`` (``cpus``, ``memory``, ``devices[2]``) stands; the partition's
        own place for a field it leaves out or one not kept."""
        if name.startswith("devices[") and name.endswith("]"):
            i = int(name[len("devices[") : -1])
            found = self.devices[i].where if 0 <= i < len(self.devices) else NOWHERE
        else:
            found = {
                "cpus": self.cpus_where,
                "memory": self.memory_where,
                "hugepages": self.hugepages_where,
                "numa": self.numa_where,
                "firmware": self.firmware_where,
            }.get(name, NOWHERE)
        return found if found.line else self.where


@dataclass(frozen=True)
class HostSpec:
    reserve_cpu_count: int | None  # whole cores' worth of CPUs, lowest-numbered first per node
    reserve_cpu_list: CpuSet | None  # or explicit CPUs; both None: the default (one whole core)
    reserve_memory_bytes: int
    smt: Literal["isolate", "share"] = "isolate"
    accel: Literal["kvm", "tcg"] = "kvm"
    isolation: Literal["full", "pinned"] = "full"
    confine: bool = True  # rule 10: each QEMU unprivileged, a user of its own
    allow_unsafe_interrupts: bool = False  # devices without interrupt remapping
    reserve_memory_where: Location = field(default=NOWHERE, compare=False)
    reserve_cpus_where: Location = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Manifest:
    file: str
    host: HostSpec
    partitions: Mapping[str, PartitionSpec] = field(default_factory=dict)  # in name order

    def start_order(self) -> list[PartitionSpec]:
        """Lower ``order`` starts first; ties start in name order.  Stop order is the reverse."""
        return sorted(self.partitions.values(), key=lambda p: (p.order, p.name))


# -- a partition's spec as JSON: the state record keeps it to start the guest again later --


def _loc_to_json(loc: Location) -> list[Any]:
    return [loc.file, loc.line, loc.column]


def _loc_from_json(v: Any) -> Location:
    if not v:
        return NOWHERE
    return Location(str(v[0]), int(v[1]), int(v[2]))


def spec_to_json(s: PartitionSpec) -> dict[str, Any]:
    return {
        "name": s.name,
        "cpu_count": s.cpu_count,
        "cpu_list": None if s.cpu_list is None else str(s.cpu_list),
        "memory_bytes": s.memory_bytes,
        "hugepage_bytes": s.hugepage_bytes,
        "numa": s.numa if s.numa == "auto" else list(s.numa),
        "devices": [
            {
                "kind": d.kind,
                "value": d.value,
                "count": d.count,
                "required": d.required,
                "reset_none_ok": d.reset_none_ok,
                "rom": d.rom,
                "primary_display": d.primary_display,
                "where": _loc_to_json(d.where),
            }
            for d in s.devices
        ],
        "boot": None
        if s.boot is None
        else {"kernel": s.boot.kernel, "initrd": s.boot.initrd, "cmdline": s.boot.cmdline},
        "disks": [{"path": d.path, "readonly": d.readonly} for d in s.disks],
        "firmware": s.firmware,
        "autostart": s.autostart,
        "order": s.order,
        "on_crash": s.on_crash,
        "where": _loc_to_json(s.where),
    }


def spec_from_json(v: Any) -> PartitionSpec:
    d = obj(v, "spec")
    boot = d.get("boot")
    numa = d["numa"]
    return PartitionSpec(
        name=str(d["name"]),
        cpu_count=int(d["cpu_count"]),
        cpu_list=None if d.get("cpu_list") is None else CpuSet.parse(str(d["cpu_list"])),
        memory_bytes=int(d["memory_bytes"]),
        hugepage_bytes=None if d.get("hugepage_bytes") is None else int(d["hugepage_bytes"]),
        numa="auto" if numa == "auto" else tuple(int(n) for n in numa),
        devices=tuple(
            DeviceSpec(
                kind=x["kind"],
                value=str(x["value"]),
                count=int(x.get("count", 1)),
                required=bool(x.get("required", True)),
                reset_none_ok=bool(x.get("reset_none_ok", False)),
                rom=x.get("rom"),
                primary_display=bool(x.get("primary_display", False)),
                where=_loc_from_json(x.get("where")),
            )
            for x in seq(d.get("devices", []), "spec devices")
        ),
        boot=None
        if not boot
        else Boot(str(boot["kernel"]), boot.get("initrd"), boot.get("cmdline")),
        disks=tuple(
            Disk(str(x["path"]), bool(x.get("readonly", False)))
            for x in seq(d.get("disks", []), "spec disks")
        ),
        firmware="uefi" if d.get("firmware") == "uefi" else "bios",
        autostart=bool(d.get("autostart", True)),
        order=int(d.get("order", 0)),
        on_crash="stop" if d.get("on_crash") == "stop" else "restart",
        where=_loc_from_json(d.get("where")),
    )
