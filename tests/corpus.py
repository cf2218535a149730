"""Real machines' trees from hwloc's test corpus (../shared/hosts/hwloc), unpacked on demand.

The ``hwloc_trees`` fixture (conftest.py) gives a :class:`Trees`: ``hwloc_trees[NAME]``
is the root (holding sys/ and proc/) of NAME.tar.bz2, unpacked the first time it is asked for.
"""

from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path

HWLOC_DIR = Path(__file__).resolve().parents[2] / "shared" / "hosts" / "hwloc"


def names() -> list[str]:
    return sorted(p.name.removesuffix(".tar.bz2") for p in HWLOC_DIR.glob("*.tar.bz2"))


class Trees:
    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self._roots: dict[str, Path] = {}

    def __getitem__(self, name: str) -> Path:
        root = self._roots.get(name)
        if root is None:
            with tarfile.open(HWLOC_DIR / f"{name}.tar.bz2") as tar:
                # The top directory is not always the file's name
                # (32amd64-4s2n4c-cgroup2.tar.bz2 holds 32amd64-4s2n4c-cgroup/).
                top = tar.getnames()[0].split("/")[0]
                tar.extractall(self.dest / name, filter="data")
            root = self._roots[name] = self.dest / name / top
        return root

    def make_removable(self) -> None:
        """Some trees are stored read-only: open their directories so they can be deleted."""
        for dirpath, dirnames, _ in os.walk(self.dest):
            for d in dirnames:
                p = os.path.join(dirpath, d)
                if not os.path.islink(p):
                    os.chmod(p, os.stat(p).st_mode | stat.S_IRWXU)
