"""What ``apply`` costs over starting QEMU by hand, a no-op re-apply, and preallocation threads.

Usage (root, on a machine with two CPUs or more)::

    .venv/bin/python bench/apply.py [--repeat 3] [--prealloc-size 4GiB]

1. ``partition apply`` of a one-partition site (CPU 1, 128 MiB, TCG), from the
   command to the partition running and pinned, against spawning the same QEMU
   argv (as recorded in the state file) by hand and letting it run (QMP ready,
   ``cont``): the ratio is the partitioner's overhead (CLI start, host scan,
   plan, pinning, the state record).
2. ``partition apply`` again, with nothing to do.
3. QEMU with one memory backend of ``--prealloc-size`` preallocated by one
   thread against as many threads as the partition has CPUs (2 here), timed to
   QMP ready: what ``prealloc-threads`` buys.

Prints a table of medians (seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(HERE), str(HERE / "tests")]

from guestimage import build_guest_initramfs, guest_kernel  # noqa: E402

from partitioner.errors import GuestError  # noqa: E402
from partitioner.guest.qmp import Qmp  # noqa: E402
from partitioner.run import run, spawn  # noqa: E402
from partitioner.units import format_size, parse_size  # noqa: E402


def _cli(env: dict[str, str], *args: str) -> float:
    t0 = time.monotonic()
    run([sys.executable, "-m", "partitioner.cli.main", *args], env=env, cwd=HERE, timeout=900)
    return time.monotonic() - t0


def _until_qmp(argv: Sequence[str], qmp: Path, *, cont: bool, timeout: float = 600) -> float:
    """Spawn ``argv``; seconds until its QMP answers (and, with ``cont``, the guest runs). Then end it."""
    t0 = time.monotonic()
    proc = spawn(argv)
    try:
        deadline = t0 + timeout
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"QEMU exited with {proc.returncode}: {' '.join(argv)}")
            if qmp.exists():
                try:
                    with Qmp(qmp, timeout=5) as q:
                        if cont:
                            q.cont()
                        q.status()
                        elapsed = time.monotonic() - t0
                        q.quit()
                    break
                except GuestError:
                    pass
            if time.monotonic() > deadline:
                raise SystemExit(f"QEMU did not answer QMP within {timeout}s")
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return elapsed


def bench_apply(tmp: Path, repeat: int, memory: str) -> dict[str, list[float]]:
    env = {
        # An installed partition runs from compiled bytecode; a session that forbids
        # writing it would time Python compiling the sources on every command instead.
        **{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
        "PARTITION_STATE_DIR": str(tmp / "state"),
        "PARTITION_RUN_DIR": str(tmp / "run"),
        "PARTITION_LOG_DIR": str(tmp / "log"),
    }
    initrd = build_guest_initramfs(tmp / "img")
    site = tmp / "site.yaml"
    site.write_text(
        "version: 1\n"
        'host:\n  reserve:\n    cpus: "0"\n    memory: 1GiB\n  accel: tcg\n  isolation: pinned\n'
        "partitions:\n  p1:\n"
        f'    cpus: "1"\n    memory: {memory}\n    hugepages: none\n'
        f"    boot:\n      kernel: {guest_kernel()}\n      initrd: {initrd}\n"
        "      cmdline: console=ttyS0 quiet panic=-1\n"
    )
    out: dict[str, list[float]] = {"apply": [], "noop": [], "hand": []}
    baseline = _mem_free()
    for _ in range(repeat):
        _settle(baseline)
        out["apply"].append(_cli(env, "apply", str(site)))
        out["noop"].append(_cli(env, "apply", str(site)))
        rec = json.loads((tmp / "state" / "state.json").read_text())["partitions"]["p1"]
        argv, qmp = rec["argv"], Path(rec["paths"]["qmp"])
        _cli(env, "destroy", "--all", "--timeout", "2")
        qmp.parent.mkdir(parents=True, exist_ok=True)
        qmp.unlink(missing_ok=True)
        _settle(baseline)
        out["hand"].append(_until_qmp(argv, qmp, cont=True))
    return out


def _mem_free() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemFree:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no MemFree in /proc/meminfo")


def _settle(baseline: int, timeout: float = 60.0) -> None:
    """Wait until the memory of the QEMU ended last is back with the kernel.

    The kernel frees an exited process's memory after the process is gone; a QEMU
    started meanwhile would be timed competing with that (seconds, for GiBs).
    """
    deadline = time.monotonic() + timeout
    while _mem_free() < baseline - 256 * 2**20 and time.monotonic() < deadline:
        time.sleep(0.1)


def bench_prealloc(
    tmp: Path, repeat: int, size: int, threads: Sequence[int]
) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {n: [] for n in threads}
    qmp = tmp / "prealloc.qmp"
    for _ in range(repeat):
        for n in threads:
            qmp.unlink(missing_ok=True)
            argv = [
                "qemu-system-x86_64",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-machine",
                "q35",
                "-accel",
                "tcg",
                "-m",
                str(size // (1024 * 1024)) + "M",
                "-object",
                f"memory-backend-ram,id=m0,size={size},prealloc=on,prealloc-threads={n}",
                "-numa",
                "node,nodeid=0,memdev=m0",
                "-chardev",
                f"socket,id=qmp0,path={qmp},server=on,wait=off",
                "-mon",
                "chardev=qmp0,mode=control",
                "-S",
            ]
            out[n].append(_until_qmp(argv, qmp, cont=False))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--memory", default="128MiB", help="the partition's memory")
    ap.add_argument("--prealloc-size", default="4GiB")
    ap.add_argument("--prealloc-threads", default="1,2", help="thread counts to compare")
    ap.add_argument("--skip-apply", action="store_true")
    ap.add_argument("--skip-prealloc", action="store_true")
    args = ap.parse_args(argv)
    rows: list[tuple[str, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-apply-") as d:
        tmp = Path(d)
        if not args.skip_apply:
            r = bench_apply(tmp, args.repeat, args.memory)
            med = {k: statistics.median(v) for k, v in r.items()}
            rows += [
                ("apply: to running and pinned", med["apply"], ""),
                ("same argv by hand: to QMP + cont", med["hand"], ""),
                ("ratio apply / by hand", med["apply"] / med["hand"], "x"),
                ("apply again (nothing to do)", med["noop"], ""),
            ]
        if not args.skip_prealloc:
            size = parse_size(args.prealloc_size)
            threads = [int(x) for x in args.prealloc_threads.split(",")]
            p = bench_prealloc(tmp, args.repeat, size, threads)
            for n in threads:
                rows.append(
                    (
                        f"prealloc {format_size(size)}, {n} thread(s): to QMP",
                        statistics.median(p[n]),
                        "",
                    )
                )
            if len(threads) == 2:
                a, b = (statistics.median(p[n]) for n in threads)
                rows.append((f"speedup {threads[0]} -> {threads[1]} threads", a / b, "x"))
    width = max(len(r[0]) for r in rows)
    print(f"{'measure (median of ' + str(args.repeat) + ')':<{width}}  value")
    for name, value, unit in rows:
        print(f"{name:<{width}}  {value:8.3f}{unit or ' s'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
