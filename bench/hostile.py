"""The worst host trees of issue 8's hostile classes: how long the read-only verbs take on them.

- ``inspect --json`` of a host with 10,000 and 20,000 PCI functions (two per slot, one
  IOMMU group per slot), and the ratio of the two: linear work doubles.
- A cycle of links: N device-mapper devices each listing every other as a ``slave``
  under the mounted root, and N bridges each built (``lower_*``) on every other; the
  number of directory listings shows each device is visited once.
- A huge cpulist: a node's ``cpulist`` of 64 KiB (the largest read as a list) and of
  16 MiB (refused by its length, with a note).

Trees are written once per size and read ``--repeat`` times; medians are printed as a
Markdown table for bench/README.md.

    .venv/bin/python bench/hostile.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

from test_hostile_hosts import add_functions  # noqa: E402
from treebuilder import TreeBuilder  # noqa: E402

from partitioner.cli.main import main  # noqa: E402
from partitioner.kernel.root import HostRoot  # noqa: E402


def inspect(root: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        rc = main(["--host-root", str(root), "--json", "inspect"])
    if rc != 0 or not out.getvalue():
        raise SystemExit(f"inspect of {root} failed: exit {rc}")


def median_time(fn: Callable[[], None], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def listings(fn: Callable[[], None]) -> int:
    """How many directories one run lists (HostRoot.listdir calls)."""
    calls = [0]
    real = HostRoot.listdir

    def counted(self: HostRoot, kernel_path: str) -> list[str]:
        calls[0] += 1
        return real(self, kernel_path)

    HostRoot.listdir = counted  # type: ignore[method-assign]
    try:
        fn()
    finally:
        HostRoot.listdir = real  # type: ignore[method-assign]
    return calls[0]


def dm_cycle(root: Path, n: int) -> Path:
    t = TreeBuilder(root).cpus(count=4)
    t.pci("0000:00:1f.2", class_code="010601", driver="ahci", iommu_group=7)
    t.disk("sda", pci="0000:00:1f.2", partitions=1)
    names = [f"dm-{i}" for i in range(n)]
    for name in names:
        t.virtual_block(name, [m for m in names if m != name] + ["sda1"], dm_name=name)
    t.mount("dm-0", "/")
    return t.build()


def lower_cycle(root: Path, n: int) -> Path:
    t = TreeBuilder(root).cpus(count=4)
    t.pci("0000:01:00.0", driver="e1000e", iommu_group=3, netdevs=("eth0",))
    names = [f"br{i}" for i in range(n)]
    for name in names:
        t.netdev(name)
    t.netdev_up("br0", default_route=True)
    t.build()
    eth0 = root / t.pci_path("0000:01:00.0").lstrip("/") / "net/eth0"
    for name in names:
        d = root / f"sys/devices/virtual/net/{name}"
        for m in names:
            if m != name:
                (d / f"lower_{m}").symlink_to(f"../{m}")
        (d / "lower_eth0").symlink_to(os.path.relpath(eth0, d))
    return root


def huge_cpulist(root: Path, size: int) -> Path:
    TreeBuilder(root).cpus(count=8, nodes=2).build()
    items = ",".join(str(i % 8192) for i in range(0, 10**7, 2))
    (root / "sys/devices/system/node/node1/cpulist").write_text(items[:size].rstrip(",") + "\n")
    return root


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        base = Path(tmp)
        per: dict[int, float] = {}
        for count in (10_000, 20_000):
            root = TreeBuilder(base / f"pci{count}").cpus(count=4).build()
            add_functions(root, count)
            per[count] = median_time(lambda root=root: inspect(root), args.repeat)
            rows.append((f"inspect, {count:,} PCI functions", f"{per[count]:.2f} s", ""))
        ratio = per[20_000] / per[10_000]
        rows.append(("ratio 20,000 / 10,000 (linear: 2)", f"{ratio:.2f}", ""))
        for n in (6, 24):
            root = dm_cycle(base / f"dm{n}", n)
            t = median_time(lambda root=root: inspect(root), args.repeat)
            lists = listings(lambda root=root: inspect(root))
            rows.append(
                (f"inspect, {n} dm devices all slaves of each other", f"{t:.3f} s", f"{lists}")
            )
        for n in (7, 28):
            root = lower_cycle(base / f"br{n}", n)
            t = median_time(lambda root=root: inspect(root), args.repeat)
            lists = listings(lambda root=root: inspect(root))
            rows.append(
                (f"inspect, {n} bridges all lower_ of each other", f"{t:.3f} s", f"{lists}")
            )
        for size in (65_000, 16 * 1024 * 1024):
            root = huge_cpulist(base / f"cpulist{size}", size)
            t = median_time(lambda root=root: inspect(root), args.repeat)
            rows.append((f"inspect, a node cpulist of {size:,} bytes", f"{t:.3f} s", ""))
    print("| case | median | directories listed |")
    print("|---|---|---|")
    for case, t, n in rows:
        print(f"| {case} | {t} | {n} |")


if __name__ == "__main__":
    main_()
