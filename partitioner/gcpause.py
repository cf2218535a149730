"""The cyclic garbage collector held off while one phase builds many objects.

Loading a manifest, scanning a host and planning each build tens of thousands of small
objects that stay alive to the end of the phase (YAML nodes and their marks, the ``Host``, the
placements), and make no reference cycles.  With the collector running, every 70,000 or so
allocations it walks every object the program holds, so on a large site those phases spend
more time in the collector than in their own work, and more than linearly in partitions (it
walks more objects more often): bench/README.md has the figures.

Held off, reference counting still frees each object the moment it is dropped; only cycles
wait.  At the end of the phase, what it built is what its caller keeps (the Manifest, the
Host, the Plan): the objects the collector tracks are moved to its oldest generation at once
(``gc.freeze`` then ``gc.unfreeze``, no walk), instead of being walked by the next young
rounds only to be found alive and moved there.  Cycles made meanwhile by anyone are collected
by the next full round, as those that outlive the young rounds are.  Where the program froze
objects of its own (a server before it forks), they are left frozen and this step is skipped.

The collector is left as it was found (a caller that disabled it keeps it disabled), and
phases nest.
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
        if gc.get_freeze_count() == 0:
            gc.freeze()
            gc.unfreeze()
        gc.enable()
