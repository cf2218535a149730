"""The cyclic garbage collector held off while one phase builds many objects.

Loading a manifest, scanning a host and planning each build tens of thousands of small
objects that stay alive to the end of the phase (YAML nodes and their marks, the ``Host``, the
placements), and make no reference cycles.  With the collector running, every 70,000 or so
allocations it walks every object the program holds, so on a large site those phases spend
more time in the collector than in their own work, and more than linearly in partitions (it
walks more objects more often): bench/README.md has the figures.

Held off, reference counting still frees each object the moment it is dropped; only cycles
wait, for the collector's first round after the phase.  The collector is left as it was found
(a caller that disabled it keeps it disabled), and phases nest.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """Hold off the cyclic collector inside the ``with`` block (or the decorated function)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
