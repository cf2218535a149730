"""A running guest changed live through QMP: vCPUs plugged and unplugged, virtio-mem devices
resized, PCI functions attached to spare root ports and detached (rule 11).

Each function is one QMP exchange, or one request and a wait for the guest to answer it:
every command is bounded by the session's own timeout (``Qmp.timeout``), every wait by the
``timeout`` given, and a failure is an error of the ``LiveChangeError`` tree
(``partitioner/errors.py``) that names the cause and what to do.  What QEMU reports is the
truth (``query-hotpluggable-cpus``, ``query-memory-devices``, the devices under
``/machine/peripheral``): a wait that runs out leaves the request with the guest, and the
next look says whether it was taken after all.

The ids are those ``guest/argv.py`` gives: a vCPU plugged here is ``vcpu{index}``, the
virtio-mem device of host node N is ``vmem{N}``, spare root ports are ``hp0``, ``hp1``...

A new vCPU's thread must be pinned before the guest runs it; the caller plugs it inside
:func:`paused`, pins the thread :func:`plug_cpu` returns, and lets the guest run again::

    with paused(qmp):
        tid = plug_cpu(qmp, 2)
        os.sched_setaffinity(tid, {13})
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from partitioner.errors import (
    CpuHotplugError,
    CpuUnplugTimeout,
    DeviceDetachTimeout,
    DeviceHotplugError,
    GuestError,
    MemoryResizeError,
    MemoryResizeTimeout,
)
from partitioner.guest.qmp import Qmp, QmpCommandError
from partitioner.pci import PciAddress
from partitioner.units import format_size

POLL_SECONDS = 0.1
# The order of a slot's topology properties: QEMU numbers the slots (cpu-index) in it.
_TOPOLOGY = ("socket-id", "die-id", "cluster-id", "core-id", "thread-id")
PERIPHERAL = "/machine/peripheral"


@dataclass(frozen=True)
class CpuSlot:
    """One vCPU slot of the guest, present or not.  ``index`` is its cpu-index (slot order);
    ``props`` are what ``device_add`` needs to fill it (topology, ``node-id``)."""

    index: int
    type: str  # the QOM type device_add takes: "host-x86_64-cpu", "max-x86_64-cpu"
    props: Mapping[str, int] = field(hash=False)
    present: bool
    qom_path: str | None  # None while empty
    thread_id: int | None  # the host thread running it, None while empty


def _who(qmp: Qmp) -> str:
    return f"partition {qmp.partition}" if qmp.partition else f"the guest at {qmp.socket_path}"


def _list(value: Any, command: str, qmp: Qmp) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise GuestError(
            f"QEMU of {_who(qmp)} answered {command} with {value!r}, not a list of objects",
            partition=qmp.partition,
        )
    return value


def cpu_slots(qmp: Qmp) -> list[CpuSlot]:
    """Every vCPU slot of the guest in cpu-index order, with the thread of each present one."""
    hot = _list(qmp.execute("query-hotpluggable-cpus"), "query-hotpluggable-cpus", qmp)
    fast = _list(qmp.execute("query-cpus-fast"), "query-cpus-fast", qmp)
    threads = {str(c["qom-path"]): int(c["thread-id"]) for c in fast}

    def order(slot: dict[str, Any]) -> tuple[int, ...]:
        props = slot.get("props", {})
        return tuple(int(props.get(k, 0)) for k in _TOPOLOGY)

    slots: list[CpuSlot] = []
    for index, s in enumerate(sorted(hot, key=order)):
        path = s.get("qom-path")
        slots.append(
            CpuSlot(
                index=index,
                type=str(s["type"]),
                props={str(k): int(v) for k, v in s.get("props", {}).items()},
                present=path is not None,
                qom_path=None if path is None else str(path),
                thread_id=None if path is None else threads.get(str(path)),
            )
        )
    return slots


def _slot(qmp: Qmp, index: int) -> CpuSlot:
    slots = cpu_slots(qmp)
    if not 0 <= index < len(slots):
        raise CpuHotplugError(
            f"{_who(qmp)} has vCPU slots 0-{len(slots) - 1}, no slot {index}: more vCPUs than "
            "max_cpus need --replace",
            partition=qmp.partition,
            index=index,
        )
    return slots[index]


@contextlib.contextmanager
def paused(qmp: Qmp) -> Iterator[None]:
    """The guest stopped for the block, and running again after it if it ran before (a
    guest found paused or not yet started is left so)."""
    if qmp.status() != "running":
        yield
        return
    qmp.execute("stop")
    try:
        yield
    except BaseException:
        with contextlib.suppress(GuestError):
            qmp.cont()
        raise
    qmp.cont()


def plug_cpu(qmp: Qmp, index: int) -> int:
    """Fill the empty vCPU slot ``index`` (``device_add`` of its type and properties, id
    ``vcpu{index}``) and return the host thread id of the new vCPU.  The guest still has to
    online it (a udev rule, or the test guest's init)."""
    slot = _slot(qmp, index)
    if slot.present:
        raise CpuHotplugError(
            f"vCPU slot {index} of {_who(qmp)} is already filled ({slot.qom_path}): "
            "look at cpu_slots() before plugging",
            partition=qmp.partition,
            index=index,
        )
    try:
        qmp.execute("device_add", {"driver": slot.type, "id": f"vcpu{index}", **slot.props})
    except QmpCommandError as e:
        raise CpuHotplugError(
            f"QEMU of {_who(qmp)} refused to plug vCPU {index}: {e}",
            partition=qmp.partition,
            index=index,
        ) from e
    tid = _slot(qmp, index).thread_id
    if tid is None:
        raise CpuHotplugError(
            f"QEMU of {_who(qmp)} plugged vCPU {index} but reports no thread for it: "
            "it cannot be pinned; unplug it (unplug_cpu) and look at QEMU's log",
            partition=qmp.partition,
            index=index,
        )
    return tid


def unplug_cpu(qmp: Qmp, index: int, timeout: float) -> None:
    """Ask the guest to give vCPU slot ``index`` back (``device_del``) and wait until the slot
    is empty.  An empty slot is left as it is."""
    slot = _slot(qmp, index)
    if not slot.present:
        return
    if index == 0:
        raise CpuHotplugError(
            f"vCPU 0 of {_who(qmp)} is the guest's boot CPU and cannot be unplugged",
            partition=qmp.partition,
            index=0,
        )
    try:
        qmp.execute("device_del", {"id": slot.qom_path})
    except QmpCommandError as e:
        raise CpuHotplugError(
            f"QEMU of {_who(qmp)} refused to unplug vCPU {index}: {e}",
            partition=qmp.partition,
            index=index,
        ) from e
    if not wait_until(lambda: not _slot(qmp, index).present, timeout):
        raise CpuUnplugTimeout(
            f"the guest of {_who(qmp)} did not give vCPU {index} back within {timeout:g} s: "
            "its kernel must support CPU hot-unplug (ACPI, CONFIG_HOTPLUG_CPU) and be able to "
            "take that CPU offline (no task bound to it alone); the request stays with the "
            "guest, and cpu_slots() tells whether it was taken later",
            partition=qmp.partition,
            index=index,
            timeout=timeout,
        )


@dataclass(frozen=True)
class MemoryDevice:
    """One virtio-mem device as QEMU reports it (``query-memory-devices``)."""

    id: str
    guest_node: int
    size: int  # plugged now
    requested: int
    max_size: int
    block: int


def memory_devices(qmp: Qmp) -> list[MemoryDevice]:
    """The guest's virtio-mem devices, in QEMU's order."""
    out: list[MemoryDevice] = []
    for d in _list(qmp.execute("query-memory-devices"), "query-memory-devices", qmp):
        if d.get("type") != "virtio-mem":
            continue
        data = d["data"]
        out.append(
            MemoryDevice(
                id=str(data.get("id") or ""),
                guest_node=int(data["node"]),
                size=int(data["size"]),
                requested=int(data["requested-size"]),
                max_size=int(data["max-size"]),
                block=int(data["block-size"]),
            )
        )
    return out


def memory_plugged(qmp: Qmp) -> dict[int, int]:
    """Guest NUMA node -> bytes its virtio-mem devices have plugged now (``guest_nodes()`` of
    ``guest/argv.py`` maps host nodes to guest nodes)."""
    out: dict[int, int] = {}
    for d in memory_devices(qmp):
        out[d.guest_node] = out.get(d.guest_node, 0) + d.size
    return out


def set_memory(qmp: Qmp, node: int, size: int, timeout: float) -> None:
    """Set the virtio-mem device of host node ``node`` (``vmem{node}``) to ``size`` bytes
    plugged, and wait until the guest has plugged or unplugged up to it."""
    ident = f"vmem{node}"

    def device() -> MemoryDevice | None:
        return next((d for d in memory_devices(qmp) if d.id == ident), None)

    d = device()
    if d is None:
        raise MemoryResizeError(
            f"{_who(qmp)} has no virtio-mem device {ident}: it was started without dynamic "
            f"memory on host node {node}; a change of bounds needs --replace",
            partition=qmp.partition,
            node=node,
            requested=size,
        )
    if not 0 <= size <= d.max_size or size % d.block:
        raise MemoryResizeError(
            f"{ident} of {_who(qmp)} holds whole blocks of {format_size(d.block)} up to "
            f"{format_size(d.max_size)}: {size} bytes is not such a size; plan it again",
            partition=qmp.partition,
            node=node,
            requested=size,
        )
    try:
        qmp.execute(
            "qom-set",
            {"path": f"{PERIPHERAL}/{ident}", "property": "requested-size", "value": size},
        )
    except QmpCommandError as e:
        raise MemoryResizeError(
            f"QEMU of {_who(qmp)} refused to set {ident} to {format_size(size)}: {e}",
            partition=qmp.partition,
            node=node,
            requested=size,
        ) from e
    last = d.size

    def reached() -> bool:
        nonlocal last
        now = device()
        last = now.size if now is not None else last
        return last == size

    if wait_until(reached, timeout):
        return
    was = f"(host node {node}: {format_size(last)} plugged, {format_size(size)} asked)"
    if size > d.size:
        cause = (
            f"the guest of {_who(qmp)} did not take the memory within {timeout:g} s {was}: it "
            "needs a kernel with virtio-mem (5.8+, the virtio_mem module loaded) and memory "
            "onlining (memhp_default_state=online_movable or a udev rule)"
        )
    else:
        cause = (
            f"the guest of {_who(qmp)} did not give the memory back within {timeout:g} s "
            f"{was}: it can unplug only memory it can empty, so online hot-plugged memory as "
            "online_movable (memhp_default_state=online_movable) and keep its use below the "
            "new size"
        )
    raise MemoryResizeTimeout(
        cause + "; the request stays with the guest, and memory_plugged() tells what it did",
        partition=qmp.partition,
        node=node,
        requested=size,
        reached=last,
        timeout=timeout,
    )


def devices_present(qmp: Qmp) -> set[str]:
    """The ids of every device the guest has that was given one (``-device id=`` or
    ``device_add``): root ports, PCI functions, disks, vCPUs and virtio-mem devices plugged."""
    entries = _list(qmp.execute("qom-list", {"path": PERIPHERAL}), "qom-list", qmp)
    return {str(e["name"]) for e in entries if str(e.get("type", "")).startswith("child<")}


def _pci_devices(qmp: Qmp) -> list[dict[str, Any]]:
    """Every PCI device QEMU shows (``query-pci``), those behind bridges included, each with
    ``parent``: the qdev id of the bridge it is behind ("" on a root bus)."""
    out: list[dict[str, Any]] = []

    def walk(devices: list[dict[str, Any]], parent: str) -> None:
        for dev in devices:
            out.append({**dev, "parent": parent})
            bridge = dev.get("pci_bridge")
            if isinstance(bridge, dict):
                walk(bridge.get("devices", []) or [], str(dev.get("qdev_id", "")))

    for bus in _list(qmp.execute("query-pci"), "query-pci", qmp):
        walk(bus.get("devices", []) or [], "")
    return out


def attach_vfio(qmp: Qmp, address: PciAddress | str, slot_id: str, dev_id: str) -> None:
    """Hot-plug host PCI function ``address`` (claimed: its group bound to vfio-pci) into the
    spare root port ``slot_id`` (``hp{k}``) as device ``dev_id``."""
    present = devices_present(qmp)
    if dev_id in present:
        raise DeviceHotplugError(
            f"{_who(qmp)} already has a device {dev_id}: look at devices_present() first",
            partition=qmp.partition,
            device_id=dev_id,
        )
    if slot_id not in present:
        raise DeviceHotplugError(
            f"{_who(qmp)} has no spare slot {slot_id} for {address}: it was started with fewer "
            "hotplug_slots; more slots need --replace",
            partition=qmp.partition,
            device_id=dev_id,
        )
    taken = [str(d.get("qdev_id") or "?") for d in _pci_devices(qmp) if d["parent"] == slot_id]
    if taken:
        raise DeviceHotplugError(
            f"slot {slot_id} of {_who(qmp)} already holds {', '.join(taken)}: attach {address} "
            "to a free one",
            partition=qmp.partition,
            device_id=dev_id,
        )
    try:
        qmp.execute(
            "device_add", {"driver": "vfio-pci", "host": str(address), "bus": slot_id, "id": dev_id}
        )
    except QmpCommandError as e:
        raise DeviceHotplugError(
            f"QEMU of {_who(qmp)} refused to attach {address} as {dev_id}: {e}; its whole IOMMU "
            "group must be bound to vfio-pci (claimed) and open to QEMU",
            partition=qmp.partition,
            device_id=dev_id,
        ) from e


def detach_device(qmp: Qmp, dev_id: str, timeout: float) -> None:
    """Ask the guest to release device ``dev_id`` (``device_del``) and wait until QEMU has
    deleted it (gone from ``/machine/peripheral`` and ``query-pci``).  A device already gone is
    left so.  PCIe hot-unplug goes through the guest's attention button, which Linux acts on
    after 5 s: give it more than that."""

    def gone() -> bool:
        return dev_id not in devices_present(qmp) and all(
            d.get("qdev_id") != dev_id for d in _pci_devices(qmp)
        )

    if gone():
        return
    try:
        qmp.execute("device_del", {"id": dev_id})
    except QmpCommandError as e:
        raise DeviceHotplugError(
            f"QEMU of {_who(qmp)} refused to detach {dev_id}: {e}",
            partition=qmp.partition,
            device_id=dev_id,
        ) from e
    if not wait_until(gone, timeout):
        raise DeviceDetachTimeout(
            f"the guest of {_who(qmp)} did not release {dev_id} within {timeout:g} s: it needs "
            "PCIe native hot-plug (pciehp, in every distribution's kernel) and a driver that "
            "lets the device go; the request stays with the guest, and devices_present() "
            "tells whether it was taken later",
            partition=qmp.partition,
            device_id=dev_id,
            timeout=timeout,
        )


def wait_until(done: Callable[[], bool], timeout: float) -> bool:
    """Whether ``done()`` came true within ``timeout`` seconds (asked at least once)."""
    deadline = time.monotonic() + timeout
    while True:
        if done():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
