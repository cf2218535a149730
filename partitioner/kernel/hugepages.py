"""Per-node hugepage pools: raised for a partition before it starts, given back after it stops.

The kernel's per-node pool is ``/sys/devices/system/node/nodeN/hugepages/
hugepages-SIZEkB/nr_hugepages``.  Writing a larger number asks the kernel to
allocate pages on that node *now*; it gives what it can find in free,
contiguous memory and the file reads back what it reached.  Memory that is
fragmented may give more after ``/proc/sys/vm/compact_memory``.  The numbers
this module changes are exactly the ones it added, recorded by the caller,
so that giving back never shrinks a pool the administrator sized at boot.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator

from partitioner.errors import HugepageError
from partitioner.kernel import sysfs
from partitioner.kernel.root import HostRoot
from partitioner.units import page_size_name

log = logging.getLogger("partitioner.kernel.hugepages")


def pool_dir(node: int, size_bytes: int) -> str:
    return sysfs.hugepage_pool(size_bytes, node)


def pool_counts(root: HostRoot, node: int, size_bytes: int) -> tuple[int, int]:
    """(nr_hugepages, free_hugepages) of the node's pool of that page size."""
    d = pool_dir(node, size_bytes)
    nr = root.read_int(f"{d}/nr_hugepages")
    free = root.read_int(f"{d}/free_hugepages")
    if nr is None or free is None:
        raise HugepageError(
            f"NUMA node {node} has no pool of {page_size_name(size_bytes)} hugepages "
            f"({d} is missing): the kernel does not offer that page size on this node",
            node=node,
            size_bytes=size_bytes,
            wanted=0,
            got=0,
            original=0,
        )
    return nr, free


def pool_size(root: HostRoot, node: int, size_bytes: int) -> int | None:
    """The pool's nr_hugepages now, or None where the node has no pool of that size."""
    return root.read_int(f"{pool_dir(node, size_bytes)}/nr_hugepages")


# A pool's size is written as an absolute number: two commands that read it, add and write at
# once (two sites' applies, an apply and the supervisor) would take back each other's pages.
# One lock for the whole host keeps each read-modify-write whole.
POOL_LOCK = "/run/partition-hugepages.lock"


@contextlib.contextmanager
def pool_lock(root: HostRoot) -> Iterator[None]:
    """Hold the host-wide hugepage pool lock (the live host only: a tree has no other writer)."""
    if not root.live:
        yield
        return
    fd = os.open(POOL_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock, as a killed process's exit does


def ensure_pages(root: HostRoot, node: int, size_bytes: int, needed_free: int) -> int:
    """Make at least ``needed_free`` pages of ``size_bytes`` free on ``node``; return how many
    pages were added to the pool (0 when enough were free already).

    On a shortfall the pool is put back to the size it had and HugepageError says by how much
    it fell short and how to reserve the pages at boot instead.
    """
    with pool_lock(root):
        return _ensure_pages(root, node, size_bytes, needed_free)


def _ensure_pages(root: HostRoot, node: int, size_bytes: int, needed_free: int) -> int:
    d = pool_dir(node, size_bytes)
    nr, free = pool_counts(root, node, size_bytes)
    shortfall = needed_free - free
    if shortfall <= 0:
        return 0
    target = nr + shortfall
    node_total = _node_mem_total(root, node)
    if node_total is not None and shortfall * size_bytes > node_total:
        # More than the node has at all: refuse before the kernel tries, because a big
        # write makes it grab every page it can find and squeeze the running system.
        raise HugepageError(
            f"NUMA node {node} needs {needed_free} free {page_size_name(size_bytes)} hugepages "
            f"({free} free now): {shortfall} more pages are {shortfall * size_bytes // 2**20} MiB, "
            f"more than the node's {node_total // 2**20} MiB of memory; the pool was left at {nr}",
            node=node,
            size_bytes=size_bytes,
            wanted=target,
            got=nr,
            original=nr,
        )
    got = _set_pool(root, d, target)
    if got < target:
        log.info(
            "node %d: %d of %d %s hugepages; compacting memory and trying again",
            node,
            got,
            target,
            page_size_name(size_bytes),
        )
        try:
            root.write(sysfs.COMPACT_MEMORY, "1")
        except OSError as e:
            log.debug("compact_memory: %s", e)
        got = _set_pool(root, d, target)
    if got < target:
        back = _set_pool(root, d, nr)
        raise _shortfall(node, size_bytes, needed_free, target, got, back, free)
    log.info("node %d: %s hugepage pool %d -> %d", node, page_size_name(size_bytes), nr, got)
    return got - nr


def release_pages(
    root: HostRoot, node: int, size_bytes: int, added: int, *, settle: float = 5.0
) -> int:
    """Shrink the pool by the ``added`` pages ``ensure_pages`` reported, never by pages in use.

    Returns how many pages were given back (fewer than ``added`` when some are still in use).
    Pages of a QEMU that has just exited can take a moment to come back to the pool (the
    kernel frees hugepages from a workqueue when it must restore their vmemmap), so up to
    ``settle`` seconds are spent waiting for ``added`` pages to be free.
    """
    if added <= 0:
        return 0
    d = pool_dir(node, size_bytes)
    deadline = time.monotonic() + settle
    nr, free = pool_counts(root, node, size_bytes)
    while free < added and time.monotonic() < deadline:
        time.sleep(0.05)
        nr, free = pool_counts(root, node, size_bytes)
    with pool_lock(root):
        nr, free = pool_counts(root, node, size_bytes)  # as it is now, under the lock
        give_back = min(added, free)
        if give_back <= 0:
            return 0
        got = _set_pool(root, d, nr - give_back)
    log.info("node %d: %s hugepage pool %d -> %d", node, page_size_name(size_bytes), nr, got)
    return nr - got


def _set_pool(root: HostRoot, pool: str, count: int) -> int:
    path = f"{pool}/nr_hugepages"
    try:
        root.write(path, str(count))
    except OSError as e:
        # The kernel refuses outright only for nonsense values or without privilege; a
        # partial allocation is a successful write that reads back short.
        log.debug("write %s=%d: %s", path, count, e)
    value = root.read_int(path)
    return value if value is not None else 0


def _node_mem_total(root: HostRoot, node: int) -> int | None:
    text = root.read(sysfs.node(node, "meminfo"))
    for line in (text or "").splitlines():
        # "Node 0 MemTotal:       5595716 kB"
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "MemTotal:" and parts[3].isdigit():
            return int(parts[3]) * 1024
    return None


def _shortfall(
    node: int, size_bytes: int, needed_free: int, target: int, got: int, back: int, free: int
) -> HugepageError:
    size = page_size_name(size_bytes)
    boot_size = "1G" if size_bytes == 1024**3 else "2M"
    return HugepageError(
        f"NUMA node {node} needs {needed_free} free {size} hugepages ({free} free now): the "
        f"pool was asked to grow to {target} pages and the kernel reached {got}, so it was put "
        f"back to {back}. Reserve them at boot with the kernel arguments "
        f"`hugepagesz={boot_size} hugepages={node}:{target}`, or earlier after boot with "
        f"`echo {target} > {pool_dir(node, size_bytes)}/nr_hugepages` before memory fragments",
        node=node,
        size_bytes=size_bytes,
        wanted=target,
        got=got,
        original=back,
    )
