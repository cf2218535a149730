"""The command line's worst arguments: how long ``partition`` takes to refuse them.

    .venv/bin/python bench/cli_args.py [--repeat 7]

Each case runs ``partition`` as a process (Python start-up included) with its own
empty state directory; the figure is the median wall time.  Results: bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cases(tmp: Path) -> dict[str, list[str]]:
    fifo = tmp / "fifo.yaml"
    os.mkfifo(fifo)
    return {
        "status --json, nothing applied": ["status", "--json"],
        "the same, global options after the verb": ["status", "--json", "-v", "-q"],
        "validate /dev/zero (reads 1 MiB + 1 byte)": ["--json", "validate", "/dev/zero"],
        "validate /dev/urandom": ["--json", "validate", "/dev/urandom"],
        "validate a FIFO nothing writes to": ["--json", "validate", str(fifo)],
        "validate a path of 100,000 characters": ["--json", "validate", "a" * 100_000],
        "an unknown verb (every verb module is imported)": ["--json", "frob"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        env = {**os.environ, "PARTITION_STATE_DIR": str(tmp / "state")}
        print(f"load average {os.getloadavg()[0]:.1f}; median of {args.repeat} runs")
        for name, argv in cases(tmp).items():
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "partitioner.cli.main", *argv],
                    env=env,
                    capture_output=True,
                    stdin=subprocess.DEVNULL,
                    timeout=120,
                )
                times.append(time.perf_counter() - t)
            print(f"{statistics.median(times):7.3f} s  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
