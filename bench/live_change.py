"""A live memory grow (rule 11) against the ``--replace`` it saves: time until the guest has it.

Usage (root, on a machine with two CPUs or more, real QEMU under TCG)::

    .venv/bin/python bench/live_change.py [--repeat 3]

One partition (TCG, ``isolation: pinned``, the host on CPU 0, the partition on CPU 1,
2 MiB pages, ``min_memory`` 128 MiB, ``max_memory`` 384 MiB) runs with ``memory`` 192 MiB.
Each round times, from the command to the guest's console saying it (the test guest prints
``partition-guest: cpus=N memtotal_kb=M`` whenever that changes, polling each second):

1. **live grow**: ``partition apply`` of the manifest with ``memory`` 320 MiB: virtio-mem
   plugs 128 MiB more and the guest onlines it; the time until the console reports
   MemTotal 128 MiB higher.  ``apply``'s own time (until QEMU says the device has the new
   size) is shown as well.
2. **live shrink** back to 192 MiB, the same way (the guest unplugs): shown, not compared.
3. **replace**: ``partition apply --replace`` of the same grown manifest, from 192 MiB:
   the partition is stopped and started again with 320 MiB; the time until the restarted
   guest's console reports the MemTotal the live grow reached.
4. a live shrink back to 192 MiB, for the next round (timed with 2.).

Prints the medians and the ratio replace / live grow.  Everything lives in a temporary
directory (its own state, run and log directories); ``destroy --all`` of that state ends
what it started, and it touches no process it did not start.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(HERE), str(HERE / "tests")]

from guestimage import build_guest_initramfs, guest_kernel  # noqa: E402

from partitioner.run import run  # noqa: E402

MARK = re.compile(rb"partition-guest: cpus=(\d+) memtotal_kb=(\d+)")
BASE_MIB, GROWN_MIB, MIN_MIB, MAX_MIB = 192, 320, 128, 384
POOL_2M = Path("/sys/devices/system/node/node0/hugepages/hugepages-2048kB")


class Site:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
            "PARTITION_STATE_DIR": str(tmp / "state"),
            "PARTITION_RUN_DIR": str(tmp / "run"),
            "PARTITION_LOG_DIR": str(tmp / "log"),
        }
        initrd = build_guest_initramfs(tmp / "img")
        self.log = tmp / "log" / "db.console.log"
        self.manifests = {m: self._manifest(m, initrd) for m in (BASE_MIB, GROWN_MIB)}

    def _manifest(self, memory_mib: int, initrd: Path) -> Path:
        path = self.tmp / f"site-{memory_mib}.yaml"
        path.write_text(
            "version: 1\n"
            'host:\n  reserve:\n    cpus: "0"\n    memory: 1GiB\n  accel: tcg\n'
            "  isolation: pinned\n"
            "partitions:\n  db:\n"
            f'    cpus: "1"\n    memory: {memory_mib}MiB\n    hugepages: 2MiB\n'
            f"    min_memory: {MIN_MIB}MiB\n    max_memory: {MAX_MIB}MiB\n"
            f"    boot:\n      kernel: {guest_kernel()}\n      initrd: {initrd}\n"
            "      cmdline: console=ttyS0 quiet panic=-1\n"
        )
        return path

    def cli(self, *args: str) -> float:
        """Run ``partition ARGS``; its wall time."""
        t0 = time.monotonic()
        run(
            [sys.executable, "-m", "partitioner.cli.main", *args],
            env=self.env,
            cwd=HERE,
            timeout=900,
        )
        return time.monotonic() - t0

    def apply(self, memory_mib: int, *extra: str) -> float:
        return self.cli("apply", "--no-supervise", *extra, str(self.manifests[memory_mib]))

    def offset(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def memtotal(self, since: int = 0) -> int | None:
        """The last MemTotal (kB) the guest said after byte ``since`` of its console log."""
        if not self.log.exists():
            return None
        with self.log.open("rb") as f:
            f.seek(since)
            seen = MARK.findall(f.read())
        return int(seen[-1][1]) if seen else None

    def until(self, t0: float, want: int, since: int, timeout: float = 300.0) -> float:
        """Seconds from ``t0`` until the console (after byte ``since``) says MemTotal ``want``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.memtotal(since) == want:
                return time.monotonic() - t0
            time.sleep(0.05)
        raise SystemExit(
            f"the guest said memtotal_kb={self.memtotal(since)}, not {want}, within {timeout}s "
            f"({self.log})"
        )

    def settled(self, quiet: float = 3.0, timeout: float = 300.0) -> int:
        """The guest's MemTotal once its console has said nothing new for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        size, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            now = self.offset()
            if now != size:
                size, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet and self.memtotal() is not None:
                return self.memtotal() or 0
            time.sleep(0.2)
        raise SystemExit(f"the guest's console {self.log} did not settle within {timeout}s")


def bench(tmp: Path, repeat: int) -> dict[str, list[float]]:
    site = Site(tmp)
    out: dict[str, list[float]] = {"grow": [], "grow_apply": [], "shrink": [], "replace": []}
    try:
        site.apply(BASE_MIB)
        base_kb = site.settled()
        grown_kb = base_kb + (GROWN_MIB - BASE_MIB) * 1024
        for _ in range(repeat):
            # 1. live grow
            since, t0 = site.offset(), time.monotonic()
            out["grow_apply"].append(site.apply(GROWN_MIB))
            out["grow"].append(site.until(t0, grown_kb, since))
            # 2. live shrink
            since, t0 = site.offset(), time.monotonic()
            site.apply(BASE_MIB)
            out["shrink"].append(site.until(t0, base_kb, since))
            site.settled()
            # 3. replace to the same size
            since, t0 = site.offset(), time.monotonic()
            site.apply(GROWN_MIB, "--replace", "db")
            out["replace"].append(site.until(t0, grown_kb, since))
            site.settled()
            # 4. back, live
            since, t0 = site.offset(), time.monotonic()
            site.apply(BASE_MIB)
            out["shrink"].append(site.until(t0, base_kb, since))
            site.settled()
    finally:
        site.cli("destroy", "--all", "--timeout", "5")
    return out


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench/live_change.py needs root (hugepage pools, CPU affinity)")
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("bench/live_change.py needs two CPUs: one for the host, one for the guest")
    pool = int((POOL_2M / "nr_hugepages").read_text())
    load0 = _load()
    with tempfile.TemporaryDirectory(prefix="bench-live-") as d:
        r = bench(Path(d), args.repeat)
    after = int((POOL_2M / "nr_hugepages").read_text())
    med = {k: statistics.median(v) for k, v in r.items()}
    rows = [
        (f"live grow {BASE_MIB} -> {GROWN_MIB} MiB: to the guest's new MemTotal", med["grow"], "s"),
        ("  of which apply (until QEMU has plugged it)", med["grow_apply"], "s"),
        (f"replace at {GROWN_MIB} MiB: to the restarted guest's MemTotal", med["replace"], "s"),
        ("ratio replace / live grow", med["replace"] / med["grow"], "x"),
        (f"live shrink {GROWN_MIB} -> {BASE_MIB} MiB: to the guest's MemTotal", med["shrink"], "s"),
    ]
    width = max(len(n) for n, _, _ in rows)
    print(f"{'measure (median of ' + str(args.repeat) + ' rounds)':<{width}}  value")
    for name, value, unit in rows:
        print(f"{name:<{width}}  {value:8.3f} {unit}")
    for k, v in r.items():
        print(f"  {k}: " + ", ".join(f"{x:.3f}" for x in v))
    print(f"load average: {load0} before, {_load()} after; 2 MiB pool on node 0: {pool} -> {after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
