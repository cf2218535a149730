"""The guest runtime: QEMU's command line, QMP, launching paused and pinned, powering down.

``caps.probe_qemu`` asks QEMU what it supports, ``argv.qemu_argv`` is the pure
command line, ``launch.launch`` starts a partition pinned and running, and
``launch.powerdown`` stops it.  ``qmp.Qmp`` is the one place that talks to QEMU.
"""

from partitioner.guest.argv import GuestPaths, guest_paths, qemu_argv
from partitioner.guest.caps import QemuCaps, probe_qemu
from partitioner.guest.launch import (
    RunningGuest,
    is_running,
    kill,
    launch,
    powerdown,
    thread_affinities,
)
from partitioner.guest.qmp import Qmp

__all__ = [
    "GuestPaths",
    "QemuCaps",
    "Qmp",
    "RunningGuest",
    "guest_paths",
    "is_running",
    "kill",
    "launch",
    "powerdown",
    "probe_qemu",
    "qemu_argv",
    "thread_affinities",
]
