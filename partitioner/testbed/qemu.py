"""Which QEMU boots the emulated server: the first candidate that has every device the topology uses.

The QEMUs named in ``PARTITION_TESTBED_QEMU`` (binaries separated by ``:``) come
first, then the system's, so without that variable a topology the system's
QEMU can build is booted with it (Debian 12's 7.2 builds every preset but
``sriov``).  A topology with a device it lacks (``igb``, the SR-IOV NIC of
QEMU 8.0 and later) takes the QEMU that ``scripts/setup`` unpacks beside the
system's one (:data:`SIDE_BY_SIDE`).  The choice is made by asking each binary
(``-device help``), never by its version.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from partitioner.errors import CommandFailed, PreconditionError
from partitioner.run import run

SYSTEM_QEMU = "qemu-system-x86_64"
# Where scripts/setup-qemu-igb unpacks bookworm-backports' QEMU (its own data, firmware
# and modules found through the qemu-bundle link beside the binary).
SIDE_BY_SIDE = ("/opt/partition-qemu/usr/bin/qemu-system-x86_64",)
ENV = "PARTITION_TESTBED_QEMU"
_DEVICE = re.compile(r'^name "([^"]+)"', re.MULTILINE)

_probed: dict[tuple[str, int, int], frozenset[str]] = {}


class QemuLacksDevices(PreconditionError):
    """No QEMU at hand has every device model a topology needs."""

    def __init__(self, topology: str, missing: Sequence[str], tried: Sequence[str]) -> None:
        self.topology = topology
        self.missing = list(missing)
        self.tried = list(tried)
        told = ", ".join(tried) if tried else "none found"
        super().__init__(
            f"testbed {topology}: no QEMU here has the device model(s) "
            f"{', '.join(missing)} this topology uses (QEMUs asked: {told}); "
            "igb, the SR-IOV NIC, is in QEMU 8.0 and later: run scripts/setup as root "
            f"(it unpacks bookworm-backports' QEMU under /opt/partition-qemu) or name a "
            f"QEMU that has it in {ENV}"
        )


@dataclass(frozen=True)
class Candidate:
    path: str
    devices: frozenset[str]


def device_models(binary: str) -> frozenset[str]:
    """The ``-device`` models ``binary`` lists, asked once per binary (and its mtime)."""
    st = os.stat(binary)
    key = (binary, st.st_ino, st.st_mtime_ns)
    if key not in _probed:
        cp = run(
            [binary, "-nodefaults", "-machine", "none", "-device", "help"],
            timeout=60,
            check=True,
        )
        _probed[key] = frozenset(_DEVICE.findall(cp.stdout))
    return _probed[key]


def candidate_paths() -> list[str]:
    """The QEMU binaries to ask, in order of preference (absolute paths, each once)."""
    named = [p for p in os.environ.get(ENV, "").split(":") if p]
    system = shutil.which(SYSTEM_QEMU)
    out: list[str] = []
    for p in [*named, *([system] if system else []), *SIDE_BY_SIDE]:
        full = shutil.which(p) if "/" not in p else p
        if full and os.access(full, os.X_OK) and Path(full).is_file():
            full = os.path.abspath(full)
            if full not in out:
                out.append(full)
    return out


def choose_qemu(
    topology: str, needed: Iterable[str], candidates: Sequence[str] | None = None
) -> str:
    """The first candidate whose ``-device help`` lists every model in ``needed``.

    Raises :class:`QemuLacksDevices` naming what is missing and every QEMU asked.
    """
    want = set(needed)
    paths = candidate_paths() if candidates is None else list(candidates)
    tried: list[str] = []
    missing_everywhere: set[str] = set(want)
    for path in paths:
        try:
            have = device_models(path)
        except (OSError, CommandFailed) as e:
            tried.append(f"{path} (did not answer: {str(e).splitlines()[0][:120]})")
            continue
        lacks = want - have
        if not lacks:
            return path
        tried.append(f"{path} (lacks {', '.join(sorted(lacks))})")
        missing_everywhere &= lacks
    if not paths:
        raise PreconditionError(f"{SYSTEM_QEMU} not found: install qemu-system-x86")
    raise QemuLacksDevices(topology, sorted(missing_everywhere or want), tried)
