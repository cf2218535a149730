"""What a running guest has, as its QEMU says over QMP: the truth a live change is settled by.

A live change (rule 11) is recorded as an intent before QEMU is asked; a command
killed in between leaves the record unsure whether the vCPU, the memory or the
device got there.  QEMU knows: ``query-cpus-fast`` lists the vCPUs present with
their threads, ``query-memory-devices`` each virtio-mem device's plugged size,
and the ``vfio-pci`` devices under ``/machine/peripheral`` name their host
functions.  :func:`observe` reads all of it in one session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from partitioner.guest.live import MemoryDevice, memory_devices

if TYPE_CHECKING:
    from partitioner.guest.qmp import Qmp


@dataclass(frozen=True)
class GuestView:
    running: bool  # QEMU's run state is "running" (not paused)
    vcpus: dict[int, int] = field(default_factory=dict)  # vCPU index present -> host thread id
    memory: dict[str, MemoryDevice] = field(default_factory=dict)  # virtio-mem devices by id
    vfio: dict[str, str] = field(default_factory=dict)  # host PCI address -> device id


def _vcpus(qmp: Qmp) -> dict[int, int]:
    out: dict[int, int] = {}
    for c in qmp.execute("query-cpus-fast") or []:
        out[int(c["cpu-index"])] = int(c["thread-id"])
    return out


def vfio_devices(qmp: Qmp) -> dict[str, str]:
    """Host PCI address -> QEMU device id of every ``vfio-pci`` device the guest has."""
    out: dict[str, str] = {}
    for child in qmp.execute("qom-list", {"path": "/machine/peripheral"}) or []:
        if child.get("type") != "child<vfio-pci>":
            continue
        name = str(child["name"])
        host = qmp.execute("qom-get", {"path": f"/machine/peripheral/{name}", "property": "host"})
        if host:
            out[_full(str(host))] = name
    return out


def _full(address: str) -> str:
    # QEMU prints the host address as the user gave it; ours are always full.
    return address if address.count(":") == 2 else f"0000:{address}"


def observe(qmp: Qmp) -> GuestView:
    status = qmp.execute("query-status") or {}
    return GuestView(
        running=status.get("status") == "running",
        vcpus=_vcpus(qmp),
        memory={m.id: m for m in memory_devices(qmp)},
        vfio=vfio_devices(qmp),
    )
