"""Fixtures shared by every test module."""

from __future__ import annotations

from pathlib import Path

import pytest
from treebuilder import TreeBuilder


@pytest.fixture
def tree(tmp_path: Path) -> TreeBuilder:
    """An empty host tree under tmp_path/host: describe a machine, then ``tree.build()``."""
    return TreeBuilder(tmp_path / "host")
