"""Load, scan and plan hold the cyclic garbage collector off while they build their objects,
and hand them to its oldest generation (partitioner/gcpause.py): on a large site its rounds
cost more than the work, and more than linearly in partitions (bench/README.md).  The
collector is left as it was found."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from treebuilder import GiB, TreeBuilder

from partitioner.gcpause import collector_paused
from partitioner.inventory import scan
from partitioner.kernel.root import HostRoot
from partitioner.manifest.loader import loads
from partitioner.planning.planner import plan

SITE = "version: 1\nhost: {reserve: {cpus: 2, memory: 1GiB}}\npartitions:\n" + "".join(
    f"  p{i:02d}: {{cpus: 2, memory: 1GiB, hugepages: none}}\n" for i in range(12)
)


@pytest.fixture
def rounds() -> Iterator[list[int]]:
    """The collector's rounds, with a threshold low enough that any real work starts some."""
    seen: list[int] = []

    def count(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    threshold = gc.get_threshold()
    gc.collect()
    gc.set_threshold(100, 10, 10)
    gc.callbacks.append(count)
    try:
        yield seen
    finally:
        gc.callbacks.remove(count)
        gc.set_threshold(*threshold)


def _rounds_during(seen: list[int], work: Callable[[], object]) -> list[int]:
    gc.collect()
    seen.clear()
    work()
    return list(seen)


class _Watching(HostRoot):
    """Notes whether the collector could run at each read the scan makes."""

    def __init__(self, root: object) -> None:
        super().__init__(str(root))
        self.enabled: set[bool] = set()

    def read(self, kernel_path: str, default: str | None = None) -> str | None:
        self.enabled.add(gc.isenabled())
        return super().read(kernel_path, default)


def test_load_scan_and_plan_start_no_collector_round(tree: TreeBuilder, rounds: list[int]) -> None:
    t = tree.cpus(count=32, packages=2, threads=2, nodes=2, memory_per_node=32 * GiB)
    t.node(0, memory_bytes=32 * GiB, free_bytes=30 * GiB)
    t.node(1, memory_bytes=32 * GiB, free_bytes=30 * GiB)
    root = _Watching(t.kvm().build())
    manifest = loads(SITE, file="site.yaml")
    host = scan(root)
    assert root.enabled == {False}
    # The same amount of work, unpaused, starts several rounds: the threshold tells.
    assert len(_rounds_during(rounds, lambda: [{"a": [i]} for i in range(1000)])) > 1
    # Paused, none starts; and none right after: what the phase built went to the oldest
    # generation without a walk, so no young round is due.
    assert _rounds_during(rounds, lambda: [loads(SITE, file="site.yaml"), [{}] * 10]) == []
    assert _rounds_during(rounds, lambda: [scan(root), [{}] * 10]) == []
    assert _rounds_during(rounds, lambda: [plan(manifest, host), [{}] * 10]) == []
    assert gc.isenabled()


def test_the_collector_is_left_as_it_was_found() -> None:
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # nested: the outer pause still holds
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # a caller that disabled it keeps it disabled
    finally:
        gc.enable()
    with pytest.raises(ValueError), collector_paused():
        raise ValueError
    assert gc.isenabled()


def test_a_programs_frozen_objects_stay_frozen() -> None:
    """A server that froze its objects before forking keeps them frozen (copy-on-write)."""
    kept = [{"frozen": i} for i in range(100)]
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with collector_paused():
            built = [{"built": i} for i in range(100)]
        assert gc.get_freeze_count() == frozen and built and kept
    finally:
        gc.unfreeze()
