"""How inventory scan and planning scale with the host and the manifest.

Generates host trees (1 to 8 NUMA nodes, 16 to 1024 CPUs with SMT, up to 512
PCI functions in realistic IOMMU groups: root ports, each with a two-function
NIC in one group) and manifests (10 to 250 partitions, half of them with a NIC
by ``id:``), then reports the median scan and plan times and the peak Python
memory of each size.  Goal (issue "Core"): the 1024-CPU, 8-node, 512-function
host with 250 partitions scans and plans in under 0.5 s, and time grows no
worse than about linearly in partitions.

    .venv/bin/python bench/plan_scale.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

from treebuilder import GiB, TreeBuilder  # noqa: E402

from partitioner.inventory import scan  # noqa: E402
from partitioner.kernel.root import HostRoot  # noqa: E402
from partitioner.manifest.loader import loads  # noqa: E402
from partitioner.planning.planner import plan  # noqa: E402

# (nodes, cpus, pci functions)
HOSTS = [(1, 16, 12), (2, 64, 48), (4, 256, 192), (8, 512, 384), (8, 1024, 512)]
PARTITIONS = [10, 50, 100, 250]


def build_host(root: Path, nodes: int, cpus: int, functions: int) -> Path:
    t = TreeBuilder(root)
    packages = nodes
    t.cpus(count=cpus, packages=packages, threads=2, nodes=nodes, memory_per_node=512 * GiB)
    for n in range(nodes):
        t.node(n, memory_bytes=512 * GiB, free_bytes=500 * GiB)
    t.kvm()
    ports = functions // 3
    group = 0
    for i in range(ports):
        node = i * nodes // ports
        bus = 1 + i
        port = (
            f"0000:00:{i // 8:02x}.{i % 8}" if i < 256 else f"0001:00:{(i - 256) // 8:02x}.{i % 8}"
        )
        dom = port[:4]
        t.pci(port, class_code="060400", driver="pcieport", iommu_group=group, numa_node=node)
        group += 1
        for f in range(2):
            t.pci(
                f"{dom}:{bus % 256:02x}:00.{f}",
                vendor="8086",
                device="1521",
                driver="igb",
                iommu_group=group,
                numa_node=node,
                parent=port,
            )
        group += 1
    return t.build()


def build_big_host(root: Path, nodes: int, cpus: int, ports: int) -> Path:
    """Like build_host, for thousands of functions: a PCI domain per 128 root ports."""
    t = TreeBuilder(root)
    t.cpus(count=cpus, packages=nodes, threads=2, nodes=nodes, memory_per_node=512 * GiB)
    for n in range(nodes):
        t.node(n, memory_bytes=512 * GiB, free_bytes=500 * GiB)
    t.kvm()
    group = 0
    for i in range(ports):
        dom, j = i // 128, i % 128
        port = f"{dom:04x}:00:{j // 8:02x}.{j % 8}"
        node = i * nodes // ports
        t.pci(port, class_code="060400", driver="pcieport", iommu_group=group, numa_node=node)
        group += 1
        for f in range(2):
            t.pci(
                f"{dom:04x}:{1 + j:02x}:00.{f}",
                vendor="8086",
                device="1521",
                driver="igb",
                iommu_group=group,
                numa_node=node,
                parent=port,
            )
        group += 1
    return t.build()


def measure_big(root: Path, text: str, repeat: int) -> tuple[float, float, float]:
    """Median load, scan and plan times (seconds) over ``repeat`` runs after one warm-up."""
    loads_, scans, plans = [], [], []
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        manifest = loads(text, file="bench.yaml")
        t1 = time.perf_counter()
        host = scan(HostRoot(root))
        t2 = time.perf_counter()
        plan(manifest, host)
        t3 = time.perf_counter()
        if i:
            loads_.append(t1 - t0)
            scans.append(t2 - t1)
            plans.append(t3 - t2)
    return statistics.median(loads_), statistics.median(scans), statistics.median(plans)


def big(repeat: int) -> None:
    """Issue 18's size: 4,096 CPUs, 16 nodes, 4,095 functions; 1,000 and 2,000 partitions.
    Goal: load, scan and plan of 1,000 partitions together under 0.5 s, each linear."""
    print(
        f"\n{'nodes':>5} {'cpus':>5} {'pci':>5} {'parts':>5} {'load ms':>8} {'scan ms':>8} {'plan ms':>8} {'total ms':>8}"
    )
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    got: dict[int, tuple[float, float, float]] = {}
    # A schema cache that cannot be written: every load checks the schema, as the first
    # `plan` of a manifest does (a later one skips that check, see bench/README.md).
    os.environ["PARTITION_CACHE_DIR"] = "/dev/null/partition-cache"
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        root = build_big_host(Path(tmp) / "big", 16, 4096, 1365)
        for parts in (1000, 2000):
            text = manifest_text(parts, parts // 2)
            ld, sc, pl = got[parts] = measure_big(root, text, repeat)
            print(
                f"{16:>5} {4096:>5} {1365 * 3:>5} {parts:>5} {ld * 1e3:>8.1f} {sc * 1e3:>8.1f} "
                f"{pl * 1e3:>8.1f} {(ld + sc + pl) * 1e3:>8.1f}"
            )
    (l1, s1, p1), (l2, s2, p2) = got[1000], got[2000]
    print(
        f"2,000 / 1,000 partitions: load {l2 / l1:.2f}x, scan {s2 / s1:.2f}x, plan {p2 / p1:.2f}x "
        "(linear: 2, 1, 2)"
    )


def manifest_text(partitions: int, with_devices: int) -> str:
    lines = ["version: 1", "host: {reserve: {cpus: 2, memory: 4GiB}}", "partitions:"]
    for i in range(partitions):
        dev = ', devices: [{id: "8086:1521"}]' if i < with_devices else ""
        lines.append(f"  p{i:03d}: {{cpus: 2, memory: 1GiB, hugepages: none{dev}}}")
    return "\n".join(lines) + "\n"


def measure(root: Path, text: str, repeat: int) -> tuple[float, float, int]:
    manifest = loads(text, file="bench.yaml")
    scans, plans = [], []
    peak = 0
    for i in range(repeat):
        if i == 0:
            tracemalloc.start()
        t0 = time.perf_counter()
        host = scan(HostRoot(root))
        t1 = time.perf_counter()
        plan(manifest, host)
        t2 = time.perf_counter()
        if i == 0:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        else:
            scans.append(t1 - t0)
            plans.append(t2 - t1)
    return statistics.median(scans), statistics.median(plans), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--repeat", type=int, default=5, help="timed runs per size (after one traced run)"
    )
    ap.add_argument(
        "--big-only", action="store_true", help="only issue 18's 4,096-CPU host (load too)"
    )
    args = ap.parse_args()
    if args.big_only:
        big(args.repeat)
        return
    print(
        f"{'nodes':>5} {'cpus':>5} {'pci':>4} {'parts':>5} {'scan ms':>8} {'plan ms':>8} {'total ms':>8} {'peak MiB':>8}"
    )
    results: dict[tuple[int, int], tuple[float, float]] = {}
    # Writing the trees is disk-bound; memory-backed when it can be.
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        for nodes, cpus, functions in HOSTS:
            root = build_host(Path(tmp) / f"h{cpus}", nodes, cpus, functions)
            max_parts = (cpus - 2) // 2
            nics = (functions // 3) * 2
            for parts in sorted({min(n, max_parts) for n in PARTITIONS}):
                s, p, peak = measure(
                    root, manifest_text(parts, min(parts // 2, nics)), args.repeat + 1
                )
                results[(cpus, parts)] = (s, p)
                print(
                    f"{nodes:>5} {cpus:>5} {functions:>4} {parts:>5} {s * 1e3:>8.1f} {p * 1e3:>8.1f} "
                    f"{(s + p) * 1e3:>8.1f} {peak / 2**20:>8.1f}"
                )
    largest = [results[(1024, n)] for n in PARTITIONS if (1024, n) in results]
    if len(largest) >= 2:
        print(
            f"\n1024 CPUs: scan and plan of {PARTITIONS[-1]} partitions take {largest[-1][0] + largest[-1][1]:.3f} s, "
            f"{(largest[-1][0] + largest[-1][1]) / (largest[0][0] + largest[0][1]):.2f}x the time of {PARTITIONS[0]}; "
            f"planning alone {largest[-1][1] / largest[0][1]:.2f}x, for {PARTITIONS[-1] / PARTITIONS[0]:.0f}x the partitions"
        )
    big(args.repeat)


if __name__ == "__main__":
    main()
