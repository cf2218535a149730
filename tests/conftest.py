"""Fixtures shared by every test module."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import corpus
import pytest
from treebuilder import TreeBuilder


@pytest.fixture
def tree(tmp_path: Path) -> TreeBuilder:
    """An empty host tree under tmp_path/host: describe a machine, then ``tree.build()``."""
    return TreeBuilder(tmp_path / "host")


@pytest.fixture(scope="session")
def hwloc_trees() -> Iterator[corpus.Trees]:
    """hwloc's corpus trees, unpacked on tmpfs where there is one: thousands of small
    files make a disk the slowest part of the suite."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    dest = Path(tempfile.mkdtemp(prefix="partition-hwloc-", dir=base))
    trees = corpus.Trees(dest)
    try:
        yield trees
    finally:
        trees.make_removable()
        shutil.rmtree(dest, ignore_errors=True)


# What belongs to this machine's operator, not to the tests (tests on this machine apply
# sites with `isolation: pinned`; moving the host's work is tested inside the emulated
# server).  Read before the session and after it: a test that moved any of it fails the run.
_OPERATOR_SETTINGS = (
    "/proc/1/status",
    "/proc/1/cgroup",
    "/proc/irq/default_smp_affinity",
    "/sys/devices/virtual/workqueue/cpumask",
)


def _operator_settings() -> dict[str, str]:
    seen = {}
    for path in _OPERATOR_SETTINGS:
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        if path.endswith("/status"):
            text = "".join(ln for ln in text.splitlines(True) if ln.startswith("Cpus_allowed"))
        seen[path] = text
    return seen


@pytest.fixture(scope="session", autouse=True)
def _the_operators_settings_are_left_alone() -> Iterator[None]:
    before = _operator_settings()
    yield
    after = _operator_settings()
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"a test changed what belongs to this machine's operator: {changed}"
