"""The site manifest as values.  ``load(path)`` (in ``partitioner.manifest.loader``) builds these."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from partitioner.cpuset import CpuSet
from partitioner.jsonvalues import nat, obj, seq


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
    """What the host sets on a virtual function through its PF before the guest sees it (a
    device's ``mac``, ``vlan``, ``qos``, ``spoofchk``, ``trust``, ``link_state``,
    ``min_tx_rate``, ``max_tx_rate``); None: left as the VF has it."""

    mac: str | None = None  # lowercase "52:54:00:12:34:56": unicast, not zero
    vlan: int | None = None  # 1-4094
    qos: int | None = None  # 0-7, only with vlan
    spoofchk: bool = True
    trust: bool = False
    link_state: str | None = None  # "auto" | "enable" | "disable"
    min_tx_rate: int | None = None  # Mbit/s
    max_tx_rate: int | None = None  # Mbit/s


@dataclass(frozen=True)
class SriovSpec:
    """One entry of ``host.sriov``: a physical function, by address or by interface, and how
    many virtual functions it gets."""

    pf: str | None  # full PCI address ("0000:82:00.0"); None when named by netdev
    netdev: str | None  # interface name; None when named by pf
    vfs: int
    where: Location = NOWHERE

    @property
    def name(self) -> str:
        """As the manifest names it: what a device's ``vf:`` says to take a VF of it."""
        return self.pf if self.pf is not None else str(self.netdev)

    def __str__(self) -> str:
        return f"pf: {self.pf}" if self.pf is not None else f"netdev: {self.netdev}"


@dataclass(frozen=True)
class DeviceSpec:
    """One entry of a partition's ``devices`` list."""

    kind: Literal["pci", "id", "netdev", "vf"]
    # full PCI address ("0000:81:00.0"), "8086:10d3" (lowercase), or an interface name; for
    # "vf", the PF as host.sriov names it (its full PCI address, or its interface name)
    value: str
    count: int = 1  # for kind "id" only
    required: bool = True
    reset_none_ok: bool = False  # `reset: none-ok`: accept a function with no reset method
    rom: str | None = None  # `rom: off` or an absolute ROM file path; None: the device's own ROM
    primary_display: bool = False  # `primary_display: true`: x-vga=on (display GPUs, SeaBIOS)
    where: Location = NOWHERE
    vf_index: int | None = None  # kind "vf": `index:`, the VF asked for; None: the lowest free
    vf_settings: VfSettings | None = None  # kind "vf": its settings; None: none given

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
    # Dynamic bounds (rule 11), as written: None means "as `cpus`" / "as `memory`" (static).
    # The effective values are the properties cpus_min, cpus_max, memory_min and memory_max.
    min_cpus: int | None = None
    max_cpus: int | None = None
    min_memory_bytes: int | None = None
    max_memory_bytes: int | None = None
    hotplug_slots: int = 0  # spare PCIe slots for devices attached while it runs
    # Where each field's value stands, for plan problems about it (not compared; a field left
    # out stands where the partition's name does).
    cpus_where: Location = field(default=NOWHERE, compare=False)
    memory_where: Location = field(default=NOWHERE, compare=False)
    hugepages_where: Location = field(default=NOWHERE, compare=False)
    numa_where: Location = field(default=NOWHERE, compare=False)
    min_cpus_where: Location = field(default=NOWHERE, compare=False)
    max_cpus_where: Location = field(default=NOWHERE, compare=False)
    min_memory_where: Location = field(default=NOWHERE, compare=False)
    max_memory_where: Location = field(default=NOWHERE, compare=False)
    hotplug_slots_where: Location = field(default=NOWHERE, compare=False)

    @property
    def cpus_min(self) -> int:
        """The fewest vCPUs it may be brought down to while it runs (default: ``cpus``)."""
        return self.cpu_count if self.min_cpus is None else self.min_cpus

    @property
    def cpus_max(self) -> int:
        """Its vCPU slots: the most vCPUs it may be given while it runs (default: ``cpus``)."""
        return self.cpu_count if self.max_cpus is None else self.max_cpus

    @property
    def memory_min(self) -> int:
        """Its fixed memory: what it never goes below (default: ``memory``)."""
        return self.memory_bytes if self.min_memory_bytes is None else self.min_memory_bytes

    @property
    def memory_max(self) -> int:
        """The ceiling of its memory while it runs (default: ``memory``); not a reservation."""
        return self.memory_bytes if self.max_memory_bytes is None else self.max_memory_bytes

    @property
    def dynamic_cpus(self) -> bool:
        """Whether its vCPU count may change while it runs (a bound differs from ``cpus``)."""
        return self.cpus_min != self.cpu_count or self.cpus_max != self.cpu_count

    @property
    def dynamic_memory(self) -> bool:
        """Whether its memory may change while it runs: part of it is plugged (virtio-mem)."""
        return self.memory_max != self.memory_min

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
                # A bound left out stands for the value it follows.
                "min_cpus": self.min_cpus_where if self.min_cpus_where.line else self.cpus_where,
                "max_cpus": self.max_cpus_where if self.max_cpus_where.line else self.cpus_where,
                "min_memory": self.min_memory_where
                if self.min_memory_where.line
                else self.memory_where,
                "max_memory": self.max_memory_where
                if self.max_memory_where.line
                else self.memory_where,
                "hotplug_slots": self.hotplug_slots_where,
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
    sriov: tuple[SriovSpec, ...] = ()  # host.sriov, in file order


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
    """A spec as JSON; the dynamic bounds only when written, so that a static partition's
    JSON is what it was before they existed (``spec_from_json`` takes their absence as static)."""
    out: dict[str, Any] = {
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
                **_vf_to_json(d),
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
    for key, value in (
        ("min_cpus", s.min_cpus),
        ("max_cpus", s.max_cpus),
        ("min_memory_bytes", s.min_memory_bytes),
        ("max_memory_bytes", s.max_memory_bytes),
    ):
        if value is not None:
            out[key] = value
    if s.hotplug_slots:
        out["hotplug_slots"] = s.hotplug_slots
    return out


def _opt_nat(v: Any, what: str) -> int | None:
    return None if v is None else nat(v, what)


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
                **_vf_from_json(x),
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
        min_cpus=_opt_nat(d.get("min_cpus"), "min_cpus"),
        max_cpus=_opt_nat(d.get("max_cpus"), "max_cpus"),
        min_memory_bytes=_opt_nat(d.get("min_memory_bytes"), "min_memory_bytes"),
        max_memory_bytes=_opt_nat(d.get("max_memory_bytes"), "max_memory_bytes"),
        hotplug_slots=nat(d.get("hotplug_slots", 0), "hotplug_slots"),
    )


# A device's VF fields in the spec's JSON: written only for `vf:` devices, so that a spec of
# another kind keeps the JSON it had.


def _vf_to_json(d: DeviceSpec) -> dict[str, Any]:
    if d.kind != "vf":
        return {}
    return {"vf_index": d.vf_index, "vf_settings": vf_settings_to_json(d.vf_settings)}


def vf_settings_to_json(s: VfSettings | None) -> dict[str, Any] | None:
    """A VF's settings as JSON (the state record, ``plan --json``); None: none given."""
    if s is None:
        return None
    return {
        "mac": s.mac,
        "vlan": s.vlan,
        "qos": s.qos,
        "spoofchk": s.spoofchk,
        "trust": s.trust,
        "link_state": s.link_state,
        "min_tx_rate": s.min_tx_rate,
        "max_tx_rate": s.max_tx_rate,
    }


def _opt_int(v: Any, what: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{what} is {v!r}, not a whole number")
    return v


def vf_settings_from_json(v: Any) -> VfSettings | None:
    """:func:`vf_settings_to_json` read back, every value checked (``ValueError`` names it)."""
    if v is None:
        return None
    s = obj(v, "vf_settings")
    mac, link = s.get("mac"), s.get("link_state")
    if mac is not None and not (isinstance(mac, str) and _MAC.fullmatch(mac)):
        raise ValueError(f"vf_settings mac is {mac!r}, not a MAC address")
    if link not in (None, "auto", "enable", "disable"):
        raise ValueError(f"vf_settings link_state is {link!r}, not auto, enable or disable")
    return VfSettings(
        mac=mac,
        vlan=_opt_int(s.get("vlan"), "vf_settings vlan"),
        qos=_opt_int(s.get("qos"), "vf_settings qos"),
        spoofchk=bool(s.get("spoofchk", True)),
        trust=bool(s.get("trust", False)),
        link_state=link,
        min_tx_rate=_opt_int(s.get("min_tx_rate"), "vf_settings min_tx_rate"),
        max_tx_rate=_opt_int(s.get("max_tx_rate"), "vf_settings max_tx_rate"),
    )


_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def _vf_from_json(x: Mapping[str, Any]) -> dict[str, Any]:
    if x.get("kind") != "vf":
        return {}
    return {
        "vf_index": _opt_int(x.get("vf_index"), "vf_index"),
        "vf_settings": vf_settings_from_json(x.get("vf_settings")),
    }
