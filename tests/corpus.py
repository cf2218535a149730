"""Real machines' trees from hwloc's test corpus (../shared/hosts/hwloc), unpacked once per run."""

from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path

HWLOC_DIR = Path(__file__).resolve().parents[2] / "shared" / "hosts" / "hwloc"


def names() -> list[str]:
    return sorted(p.name.removesuffix(".tar.bz2") for p in HWLOC_DIR.glob("*.tar.bz2"))


def unpack(name: str, dest: Path) -> Path:
    """Unpack NAME.tar.bz2 under ``dest`` (once) and return the tree's root (holding sys/ and proc/).

    Some archives' top directory is not named like the archive (``+pcilocality``
    holds ``40intel64-2g2n4c+pci/``): the root is whatever single directory it holds.
    """
    box = dest / name
    if not (box / ".unpacked").exists():
        box.mkdir(parents=True, exist_ok=True)
        with tarfile.open(HWLOC_DIR / f"{name}.tar.bz2") as tar:
            tar.extractall(box, filter="data")
        # Some trees are stored read-only; make them removable by pytest's tmp cleanup.
        for dirpath, dirnames, _ in os.walk(box):
            for d in dirnames:
                p = os.path.join(dirpath, d)
                os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR | stat.S_IXUSR | stat.S_IRUSR)
        (box / ".unpacked").touch()
    (root,) = [p for p in box.iterdir() if p.is_dir()]
    return root
