"""Finding the test's own processes on this machine by their command line (QEMUs, supervisors)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def pids_whose_argv(match: Callable[[list[bytes]], bool]) -> list[int]:
    """Live processes whose command line (split at NUL) ``match`` accepts; a process that
    ends while it is read is left out."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and match(argv):
            out.append(int(entry))
    return out


def qemus_naming(path: Path | str) -> list[int]:
    """QEMU processes whose command line names ``path`` (a run directory, a socket in it)."""
    key = str(path).encode()
    return pids_whose_argv(lambda argv: b"qemu" in argv[0] and any(key in a for a in argv))
