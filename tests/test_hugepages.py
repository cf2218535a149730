"""Hugepage pools: real pages on this machine's node 0, and a kernel-like pool for the paths a
live kernel will not take on demand (a partial allocation that compaction completes)."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from partitioner.errors import HugepageError
from partitioner.kernel.hugepages import ensure_pages, pool_counts, pool_dir, release_pages
from partitioner.kernel.root import HostRoot
from partitioner.units import MiB

SIZE = 2 * MiB
LIVE = HostRoot("/")
MAP_HUGETLB = getattr(mmap, "MAP_HUGETLB", 0x40000)  # Linux x86 value; mmap exports it on 3.12+

needs_live_pool = pytest.mark.skipif(
    os.geteuid() != 0 or not LIVE.exists(pool_dir(0, SIZE) + "/nr_hugepages"),
    reason="needs root and node 0's 2 MiB hugepage pool",
)


@pytest.fixture
def live_pool() -> Iterator[tuple[int, int]]:
    """Node 0's 2 MiB pool as it was; put back to that size whatever the test did."""
    before = pool_counts(LIVE, 0, SIZE)
    yield before
    LIVE.write(pool_dir(0, SIZE) + "/nr_hugepages", str(before[0]))


@needs_live_pool
def test_raise_and_release_real_pages(live_pool: tuple[int, int]) -> None:
    nr0, free0 = live_pool
    added = ensure_pages(LIVE, 0, SIZE, free0 + 5)
    assert added == 5
    assert pool_counts(LIVE, 0, SIZE) == (nr0 + 5, free0 + 5)
    # Enough free already: nothing is added.
    assert ensure_pages(LIVE, 0, SIZE, free0 + 5) == 0
    assert ensure_pages(LIVE, 0, SIZE, 1) == 0
    assert pool_counts(LIVE, 0, SIZE)[0] == nr0 + 5
    assert release_pages(LIVE, 0, SIZE, added) == 5
    assert pool_counts(LIVE, 0, SIZE) == (nr0, free0)


@needs_live_pool
def test_impossible_request_fails_and_leaves_the_pool(live_pool: tuple[int, int]) -> None:
    with pytest.raises(HugepageError) as e:
        ensure_pages(LIVE, 0, SIZE, 10**7)
    assert pool_counts(LIVE, 0, SIZE) == live_pool
    assert e.value.node == 0 and e.value.size_bytes == SIZE
    assert e.value.original == live_pool[0]
    assert "node 0" in str(e.value) and "10000000" in str(e.value)


@needs_live_pool
def test_release_never_takes_pages_in_use(live_pool: tuple[int, int]) -> None:
    nr0, _ = live_pool
    added = ensure_pages(LIVE, 0, SIZE, pool_counts(LIVE, 0, SIZE)[1] + 4)
    assert added == 4
    m = mmap.mmap(-1, 2 * SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_HUGETLB)
    try:
        m[0] = 1  # fault both pages in: now they are in use, not free
        m[SIZE] = 1
        nr, free = pool_counts(LIVE, 0, SIZE)
        in_use = nr - free
        assert in_use >= 2
        released = release_pages(LIVE, 0, SIZE, added, settle=0)
        assert released == min(added, free)
        nr2, free2 = pool_counts(LIVE, 0, SIZE)
        assert nr2 - free2 == in_use, "pages in use were taken from under their owner"
        assert m[0] == 1 and m[SIZE] == 1
    finally:
        m.close()
    # Once unmapped, the rest can be given back.
    release_pages(LIVE, 0, SIZE, added - released)
    assert pool_counts(LIVE, 0, SIZE)[0] == nr0


def test_a_page_size_the_kernel_does_not_offer() -> None:
    with pytest.raises(HugepageError, match="no pool of 4MiB"):
        ensure_pages(LIVE, 0, 4 * MiB, 1)


# -- a pool that behaves like the kernel's, for partial allocations ------------------


class PoolKernel(HostRoot):
    """One node, one 2 MiB pool.  Growing allocates at most ``contiguous`` pages (what free,
    unfragmented memory holds); compaction makes ``compaction_gain`` more contiguous; shrinking
    frees only free pages (mm/hugetlb.c set_max_huge_pages)."""

    def __init__(self, root: Path, *, nr: int, free: int, contiguous: int, gain: int) -> None:
        super().__init__(root)
        self.contiguous = contiguous
        self.gain = gain
        self.compactions = 0
        self.writes: list[int] = []
        d = root / pool_dir(0, SIZE).lstrip("/")
        d.mkdir(parents=True)
        (root / "proc/sys/vm").mkdir(parents=True)
        (root / "proc/sys/vm/compact_memory").write_text("")
        (root / "sys/devices/system/node/node0/meminfo").write_text(
            "Node 0 MemTotal:        8388608 kB\nNode 0 MemFree:         6291456 kB\n"
        )
        self._set(nr, free)

    def _set(self, nr: int, free: int) -> None:
        d = self.path(pool_dir(0, SIZE))
        (d / "nr_hugepages").write_text(f"{nr}\n")
        (d / "free_hugepages").write_text(f"{free}\n")

    def write(self, kernel_path: str, value: str) -> None:
        if kernel_path == "/proc/sys/vm/compact_memory":
            self.compactions += 1
            self.contiguous += self.gain
            return
        assert kernel_path == pool_dir(0, SIZE) + "/nr_hugepages", kernel_path
        want = int(value)
        self.writes.append(want)
        nr, free = pool_counts(self, 0, SIZE)
        if want > nr:
            got = min(want - nr, self.contiguous)
            self.contiguous -= got
            self._set(nr + got, free + got)
        else:
            drop = min(nr - want, free)
            self.contiguous += drop
            self._set(nr - drop, free - drop)


def test_compaction_completes_a_partial_allocation(tmp_path: Path) -> None:
    k = PoolKernel(tmp_path, nr=8, free=2, contiguous=5, gain=10)
    assert ensure_pages(k, 0, SIZE, 12) == 10
    assert k.compactions == 1
    assert pool_counts(k, 0, SIZE) == (18, 12)


def test_a_shortfall_puts_the_pool_back_and_says_how_to_reserve(tmp_path: Path) -> None:
    k = PoolKernel(tmp_path, nr=8, free=2, contiguous=3, gain=2)
    with pytest.raises(HugepageError) as e:
        ensure_pages(k, 0, SIZE, 12)
    assert k.compactions == 1
    assert pool_counts(k, 0, SIZE) == (8, 2), "the pool must be back at its original size"
    assert (e.value.wanted, e.value.got, e.value.original) == (18, 13, 8)
    assert "hugepagesz=2M hugepages=0:18" in str(e.value)


def test_release_gives_back_only_what_was_added(tmp_path: Path) -> None:
    # The administrator reserved 8 at boot; apply added 10; all 18 are free again.
    k = PoolKernel(tmp_path, nr=18, free=18, contiguous=0, gain=0)
    assert release_pages(k, 0, SIZE, 10) == 10
    assert pool_counts(k, 0, SIZE) == (8, 8)
    assert release_pages(k, 0, SIZE, 0) == 0
    assert k.writes == [8]


@needs_live_pool
def test_pool_changes_wait_for_the_host_wide_lock(live_pool: tuple[int, int]) -> None:
    """Two commands resizing one pool at once would write over each other's absolute sizes:
    while another holds the pool lock, a raise waits, and then adds to what is there."""
    import threading

    from partitioner.kernel.hugepages import pool_lock

    nr0, free0 = live_pool
    added: list[int] = []
    with pool_lock(LIVE):
        t = threading.Thread(target=lambda: added.append(ensure_pages(LIVE, 0, SIZE, free0 + 2)))
        t.start()
        t.join(timeout=1.0)
        assert t.is_alive() and pool_counts(LIVE, 0, SIZE)[0] == nr0  # waiting, nothing written
        # What the lock's holder does meanwhile is kept: one page of its own.
        LIVE.write(pool_dir(0, SIZE) + "/nr_hugepages", str(nr0 + 1))
    t.join(timeout=30)
    assert added == [1]  # it found one free page more, and added only the other
    assert pool_counts(LIVE, 0, SIZE)[0] == nr0 + 2
