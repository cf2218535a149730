"""How much of a partition CPU's time the host's work takes, under ``isolation: pinned`` and ``full``.

Run INSIDE the emulated server (every process there is the project's)::

    partition testbed run --topology small -- python3 bench/interference.py [--repeat 5] [--seconds 2]

A probe (a C loop reading CLOCK_MONOTONIC, compiled here) is placed on the
partition's CPU 1, in that partition's cgroup, while its guest idles.  It
counts every gap between two readings above ``--gap-us`` microseconds as time
taken from it: the stolen fraction is their sum over the wall time; the largest
gap and the 99th percentile of gaps are printed too.  Under TCG on a shared
machine those gaps also hold every moment the emulated CPU itself was not run by
the real one; so the probe also reports ``runqueue``: the time the guest kernel
counted it runnable but waiting (``/proc/thread-self/schedstat``), i.e. what the
server's own tasks took from it, whatever happens outside.  It runs

1. on the idle server (no partition, no load): the baseline;
2. with a one-partition site applied (CPU 0 reserved, CPU 1 the partition's)
   under ``isolation: pinned`` and then ``full``, once its guest has booted and idles, each while the host runs a load
   started after ``apply`` (as the host's own work would be): one unpinned busy
   process per online CPU, loopback TCP traffic, and file writes with fsync.

Prints medians of ``--repeat`` probe runs, the ratio of each mode to the baseline,
and the load average inside the server; ``--json`` prints them as one document.
The goal (issue 10): under ``full`` the stolen fraction stays within 2 percentage
points of the idle baseline; the same load steals 30% or more under ``pinned``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(HERE), str(HERE / "tests")]

from guestimage import build_guest_initramfs, guest_kernel  # noqa: E402

from partitioner.isolation.cgroup import cgroup_path, find_hierarchy  # noqa: E402
from partitioner.kernel.root import HostRoot  # noqa: E402

PROBE_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static long long now(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}
static int cmp(const void *a, const void *b) {
    long long x = *(const long long *)a, y = *(const long long *)b;
    return (x > y) - (x < y);
}
/* Time this thread waited on a runqueue while runnable (ns): the guest kernel's own count of
   what other tasks took from it, blind to the emulated CPU itself being preempted outside. */
static long long run_delay(void) {
    long long a = 0, b = -1; FILE *f = fopen("/proc/thread-self/schedstat", "r");
    if (!f) return -1;
    if (fscanf(f, "%lld %lld", &a, &b) != 2) b = -1;
    fclose(f); return b;
}
int main(int argc, char **argv) {
    double seconds = atof(argv[1]); long long gap_ns = atoll(argv[2]);
    char go[8]; if (!fgets(go, sizeof go, stdin)) return 1;  /* placed: start */
    static long long gaps[4000000]; long n = 0;
    long long d0 = run_delay();
    long long start = now(), prev = start, end = start + (long long)(seconds * 1e9), stolen = 0;
    for (;;) {
        long long t = now(), d = t - prev;
        if (d > gap_ns) { stolen += d; if (n < 4000000) gaps[n++] = d; }
        prev = t;
        if (t >= end) break;
    }
    long long waited = run_delay() - d0;
    qsort(gaps, n, sizeof gaps[0], cmp);
    printf("{\"wall_ns\": %lld, \"stolen_ns\": %lld, \"gaps\": %ld, \"max_ns\": %lld, \"p99_ns\": %lld, "
           "\"run_delay_ns\": %lld}\n",
           prev - start, stolen, n, n ? gaps[n - 1] : 0, n ? gaps[(long)(n * 0.99)] : 0, waited);
    return 0;
}
"""

BUSY = "while True: pass"
NET = r"""
import socket, threading
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
def sink():
    c, _ = srv.accept()
    while c.recv(1 << 16): pass
threading.Thread(target=sink, daemon=True).start()
out = socket.create_connection(srv.getsockname()); block = b"x" * (1 << 16)
while True: out.sendall(block)
"""
DISK = r"""
import os, sys
path = sys.argv[1]; block = os.urandom(1 << 20)
while True:
    with open(path, "wb") as f:
        for _ in range(4): f.write(block)
        f.flush(); os.fsync(f.fileno())
    os.unlink(path)
"""


def _env(tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PARTITION_STATE_DIR": str(tmp / "state"),
        "PARTITION_RUN_DIR": str(tmp / "run"),
        "PARTITION_LOG_DIR": str(tmp / "log"),
    }


def _cli(tmp: Path, *args: str) -> None:
    cp = subprocess.run(
        [sys.executable, "-m", "partitioner.cli.main", *args],
        env=_env(tmp),
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if cp.returncode != 0:
        raise SystemExit(f"partition {' '.join(args)} exited {cp.returncode}:\n{cp.stderr}")


def _wait_idle(tmp: Path, timeout: float = 900.0) -> None:
    """Until the partition's guest has booted (its console says GUEST-READY) and idles: a
    booting TCG guest keeps its vCPU thread busy on the very CPU the probe measures."""
    cp = subprocess.run(
        [sys.executable, "-m", "partitioner.cli.main", "--json", "status"],
        env=_env(tmp),
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = Path(json.loads(cp.stdout)["partitions"]["probe"]["console_log"])
    deadline = time.monotonic() + timeout
    while "GUEST-READY" not in (log.read_text(errors="replace") if log.exists() else ""):
        if time.monotonic() > deadline:
            raise SystemExit(f"the guest did not boot within {timeout:g}s (see {log})")
        time.sleep(1)
    time.sleep(2)


def _probe(
    binary: Path, cpu: int, seconds: float, gap_us: float, cgroup: str | None
) -> dict[str, Any]:
    p = subprocess.Popen(
        [str(binary), str(seconds), str(int(gap_us * 1000))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdin is not None and p.stdout is not None
    if cgroup is not None:
        # Joining a cpuset cgroup resets the affinity to the cgroup's CPUs: pin after.
        Path(cgroup, "cgroup.procs").write_text(str(p.pid))
    os.sched_setaffinity(p.pid, {cpu})
    p.stdin.write("go\n")
    p.stdin.flush()
    out = p.stdout.readline()
    p.wait()
    doc: dict[str, Any] = json.loads(out)
    return doc


def _load(tmp: Path) -> list[subprocess.Popen[bytes]]:
    n = os.cpu_count() or 2
    procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n)]
    procs.append(subprocess.Popen([sys.executable, "-c", NET]))
    procs.append(subprocess.Popen([sys.executable, "-c", DISK, str(tmp / "disk-load")]))
    time.sleep(1.0)  # let them spread
    return procs


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()


def _manifest(tmp: Path, mode: str, initrd: Path) -> Path:
    m = tmp / f"{mode}.yaml"
    m.write_text(
        "version: 1\n"
        f'host:\n  reserve:\n    cpus: "0"\n    memory: 256MiB\n  accel: tcg\n  isolation: {mode}\n'
        'partitions:\n  probe:\n    cpus: "1"\n    memory: 128MiB\n    hugepages: none\n'
        f"    boot:\n      kernel: {guest_kernel()}\n      initrd: {initrd}\n"
        "      cmdline: console=ttyS0 quiet panic=-1\n"
    )
    return m


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {
        "stolen_pct": statistics.median(100.0 * r["stolen_ns"] / r["wall_ns"] for r in runs),
        "runqueue_pct": statistics.median(100.0 * r["run_delay_ns"] / r["wall_ns"] for r in runs),
        "max_gap_us": statistics.median(r["max_ns"] / 1000 for r in runs),
        "p99_gap_us": statistics.median(r["p99_ns"] / 1000 for r in runs),
        "gaps": statistics.median(r["gaps"] for r in runs),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--gap-us", type=float, default=10.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if os.cpu_count() is None or (os.cpu_count() or 0) < 2:
        raise SystemExit("needs two CPUs: run it in the emulated server (partition testbed run)")
    tmp = Path("/tmp/interference")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    probe = tmp / "probe"
    (tmp / "probe.c").write_text(PROBE_C)
    subprocess.run(["cc", "-O2", "-o", str(probe), str(tmp / "probe.c")], check=True)
    initrd = build_guest_initramfs(tmp / "img")
    # The server's init leaves the loopback interface down; the load's traffic needs it.
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)

    results: dict[str, dict[str, float]] = {}
    loadavg: dict[str, str] = {}
    runs = [_probe(probe, 1, args.seconds, args.gap_us, None) for _ in range(args.repeat)]
    results["idle"] = _summary(runs)
    loadavg["idle"] = _loadavg()
    h = find_hierarchy(HostRoot("/"))
    for mode in ("pinned", "full"):
        _cli(tmp, "apply", str(_manifest(tmp, mode, initrd)))
        try:
            cg = cgroup_path(h, "probe") if h is not None else None
            _wait_idle(tmp)
            # The partition's own idle guest, no load: what its vCPU thread itself takes (under
            # nested TCG an idle guest's timer ticks are not free), to tell from the host's work.
            quiet = [_probe(probe, 1, args.seconds, args.gap_us, cg) for _ in range(args.repeat)]
            results[f"{mode}-quiet"] = _summary(quiet)
            loadavg[f"{mode}-quiet"] = _loadavg()
            load = _load(tmp)
            try:
                runs = [_probe(probe, 1, args.seconds, args.gap_us, cg) for _ in range(args.repeat)]
                loadavg[mode] = _loadavg()
            finally:
                _stop(load)
        finally:
            _cli(tmp, "destroy", "--all", "--timeout", "5")
        results[mode] = _summary(runs)
    base = results["idle"]["stolen_pct"]
    doc = {
        "repeat": args.repeat,
        "seconds": args.seconds,
        "gap_us": args.gap_us,
        "results": results,
        "pinned_minus_idle_pp": results["pinned"]["stolen_pct"] - base,
        "full_minus_idle_pp": results["full"]["stolen_pct"] - base,
        "runqueue_pinned_minus_idle_pp": results["pinned"]["runqueue_pct"]
        - results["idle"]["runqueue_pct"],
        "runqueue_full_minus_idle_pp": results["full"]["runqueue_pct"]
        - results["idle"]["runqueue_pct"],
        "runqueue_load_pinned_pp": results["pinned"]["runqueue_pct"]
        - results["pinned-quiet"]["runqueue_pct"],
        "runqueue_load_full_pp": results["full"]["runqueue_pct"]
        - results["full-quiet"]["runqueue_pct"],
        "pinned_over_full": results["pinned"]["stolen_pct"]
        / max(results["full"]["stolen_pct"], 1e-9),
        "loadavg": loadavg,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(
        f"probe on CPU 1, {args.repeat} x {args.seconds:g} s, gaps above {args.gap_us:g} us; medians"
    )
    print(
        f"{'mode':12} {'stolen %':>9} {'runqueue %':>11} {'max gap us':>11} {'p99 gap us':>11} "
        f"{'gaps':>8}  load average"
    )
    for mode, r in results.items():
        print(
            f"{mode:12} {r['stolen_pct']:9.2f} {r['runqueue_pct']:11.2f} {r['max_gap_us']:11.0f} "
            f"{r['p99_gap_us']:11.0f} {r['gaps']:8.0f}  {loadavg.get(mode, '')}"
        )
    print(
        f"stolen: full - idle {doc['full_minus_idle_pp']:+.2f} pp, pinned - idle "
        f"{doc['pinned_minus_idle_pp']:+.2f} pp, pinned / full {doc['pinned_over_full']:.2f}x"
    )
    print(
        f"runqueue: full - idle {doc['runqueue_full_minus_idle_pp']:+.2f} pp, pinned - idle "
        f"{doc['runqueue_pinned_minus_idle_pp']:+.2f} pp; what the load adds over the quiet "
        f"partition: full {doc['runqueue_load_full_pp']:+.2f} pp, pinned "
        f"{doc['runqueue_load_pinned_pp']:+.2f} pp"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
