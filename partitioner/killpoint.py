"""Named points between the steps that change the host, for the crash tests (docs/decisions.md).

``point("qemu-spawned")`` does nothing unless the environment asks for it:

- ``PARTITION_TEST_KILL_LIST=FILE``: append the point's name to FILE, one a line (the
  test learns every point a verb passes, in order, from one full run);
- ``PARTITION_TEST_KILL_AT=NAME:N``: SIGKILL this process right after the Nth time
  it reaches point NAME (1-based), as a power cut or ``kill -9`` would.

The environment is read at each call, so the hook costs one dictionary lookup
when it is not set and has no state to leak between commands.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def point(name: str) -> None:
    listing = os.environ.get("PARTITION_TEST_KILL_LIST")
    at = os.environ.get("PARTITION_TEST_KILL_AT")
    if not listing and not at:
        return
    if listing:
        with open(listing, "a") as f:
            f.write(name + "\n")
    if at:
        want, _, nth = at.rpartition(":")
        if want == name:
            _counts[name] = _counts.get(name, 0) + 1
            if nth.isdigit() and _counts[name] == int(nth):
                os.kill(os.getpid(), signal.SIGKILL)
