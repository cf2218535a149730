"""With systemd as PID 1: the host's slices kept on the reserve the way systemd allows.

systemd owns the cgroup tree and would undo a cpuset written behind its back; it
offers ``AllowedCPUs=`` on slices and scopes, set at run time (``systemctl
set-property --runtime``: gone at reboot, as runtime isolation must be).  Every
process of the host lives in ``init.scope``, ``system.slice`` or ``user.slice``;
new services and logins land there too.  The value each had is recorded and put
back (an empty value: no restriction).
"""

from __future__ import annotations

from collections.abc import Mapping

from partitioner.cpuset import CpuSet
from partitioner.kernel import sysfs
from partitioner.kernel.root import HostRoot
from partitioner.run import run

UNITS = ("init.scope", "system.slice", "user.slice")


def has_systemd(root: HostRoot) -> bool:
    """systemd is PID 1 (sd_booted(3): /run/systemd/system exists)."""
    return root.is_dir(sysfs.SYSTEMD_RUNTIME) and root.read(sysfs.proc(1, "comm")) == "systemd"


def set_property_argv(unit: str, cpus: str) -> list[str]:
    return ["systemctl", "set-property", "--runtime", unit, f"AllowedCPUs={cpus}"]


def show_argv(unit: str) -> list[str]:
    return ["systemctl", "show", "--property=AllowedCPUs", "--value", unit]


def current(units: tuple[str, ...] = UNITS) -> dict[str, str]:
    """Each unit's AllowedCPUs= now ("" when unrestricted)."""
    return {u: run(show_argv(u), timeout=30).stdout.strip() for u in units}


def confine(reserve: CpuSet, units: tuple[str, ...] = UNITS) -> None:
    for u in units:
        run(set_property_argv(u, str(reserve)), timeout=30)


def put_back(old: Mapping[str, str]) -> None:
    for u, cpus in sorted(old.items()):
        run(set_property_argv(u, cpus), timeout=30)
