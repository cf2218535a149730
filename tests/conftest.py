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
