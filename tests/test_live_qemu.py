"""A running partition's memory grown and shrunk by ``partition apply`` (rule 11), with real
QEMU under TCG on this machine, and the same changes killed with SIGKILL at every point
they pass.

The guest (``partitioner.testbed.guestimage``) onlines hot-plugged memory and says
``partition-guest: cpus=N memtotal_kb=M`` on its console whenever that changes; the
node's hugepage pool is read from sysfs; QEMU's own word on what is plugged comes from
``query-memory-devices``.  vCPUs need two host CPUs for the partition, which this
two-CPU machine cannot give besides the host's: they are changed inside the emulated
server (tests/inside/test_inside_live.py).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_apply_qemu import Site, _pool, site_in

from partitioner.guest.live import memory_devices
from partitioner.guest.qmp import Qmp
from partitioner.units import MiB

pytestmark = pytest.mark.qemu


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    yield from site_in(tmp_path)


MARK = re.compile(r"partition-guest: cpus=(\d+) memtotal_kb=(\d+)")


def _guest(site: Site, memory: str) -> dict[str, str]:
    extra = "min_memory: 128MiB\nmax_memory: 384MiB\n"
    return {"db": site.guest(memory=memory, hugepages="2MiB", extra=extra)}


def _memtotal(log: Path, want: int | None = None, timeout: float = 120.0) -> int:
    """The guest's last reported MemTotal (kB); with ``want``, wait until it says that."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        seen = MARK.findall(text)
        if seen:
            last = int(seen[-1][1])
            if want is None or last == want:
                return last
        time.sleep(0.5)
    raise AssertionError(f"the guest said memtotal_kb={last}, not {want}, within {timeout}s")


def _plugged(site: Site) -> int:
    """What QEMU says the partition's virtio-mem device has plugged, and the record agrees."""
    doc = json.loads(site.state_file.read_text())
    rec = doc["partitions"]["db"]
    with Qmp(rec["paths"]["qmp"], timeout=10.0, partition="db") as qmp:
        devices = memory_devices(qmp)
    assert [d.id for d in devices] == ["vmem0"]
    assert all(d.size == d.requested for d in devices), devices
    return devices[0].size


def _record_memory(site: Site) -> int:
    st = site.status()["db"]
    assert st["state"] == "running"
    return int(st["memory_bytes"])


def test_memory_grows_and_shrinks_live_in_the_guest_and_the_pool(site: Site) -> None:
    nr0, _ = _pool()
    base = site.manifest("base", _guest(site, "192MiB"))
    cp = site.run("apply", "--no-supervise", str(base))
    assert cp.returncode == 0, cp.stderr
    st = site.status()["db"]
    log = Path(st["console_log"])
    pid = st["pid"]
    kb0 = _memtotal(log)
    assert st["bounds"] == {
        "cpus": 1,
        "min_cpus": 1,
        "max_cpus": 1,
        "memory_bytes": 192 * MiB,
        "min_memory_bytes": 128 * MiB,
        "max_memory_bytes": 384 * MiB,
        "hotplug_slots": 0,
    }
    assert _plugged(site) == 64 * MiB
    nr1, _ = _pool()

    grown = site.manifest("grown", _guest(site, "320MiB"))
    plan = site.run("plan", str(grown))
    assert plan.returncode == 0, plan.stderr
    said = " ".join(plan.stdout.split())
    assert "grow-memory db 192MiB -> 320MiB (node 0, 64 x 2MiB pages)" in said
    doc = json.loads(site.run("--json", "plan", str(grown)).stdout)
    assert {
        "action": "grow-memory",
        "target": "db",
        "detail": "192MiB -> 320MiB (node 0, 64 x 2MiB pages)",
    } in doc["actions"]
    cp = site.run("apply", "--no-supervise", str(grown))
    assert cp.returncode == 0, cp.stderr
    assert site.status()["db"]["pid"] == pid  # changed live, not restarted
    _memtotal(log, kb0 + 128 * 1024)
    assert _plugged(site) == 192 * MiB
    assert _record_memory(site) == 320 * MiB
    nr2, _ = _pool()
    assert nr2 - nr1 <= 64  # pages for the growth, added only when the pool lacked them

    small = site.manifest("small", _guest(site, "128MiB"))
    cp = site.run("apply", "--no-supervise", str(small))
    assert cp.returncode == 0, cp.stderr
    assert "shrink-memory db 320MiB -> 128MiB" in " ".join(cp.stdout.split())
    _memtotal(log, kb0 - 64 * 1024)
    assert _plugged(site) == 0
    assert _record_memory(site) == 128 * MiB
    assert site.status()["db"]["pid"] == pid
    # a change beyond the bounds is refused live and says why
    beyond = site.manifest("beyond", _guest(site, "512MiB"))
    cp = site.run("apply", "--no-supervise", str(beyond))
    assert cp.returncode != 0
    assert "max_memory" in cp.stderr

    cp = site.run("destroy", "--all", "--timeout", "5")
    assert cp.returncode == 0, cp.stderr
    assert _pool()[0] == nr0


def _points(site: Site, manifest: Path) -> list[tuple[str, int]]:
    listing = site.dir / f"{manifest.stem}.points"
    listing.unlink(missing_ok=True)
    env = {**site.env, "PARTITION_TEST_KILL_LIST": str(listing)}
    cp = _run_env(site, env, "apply", "--no-supervise", str(manifest))
    assert cp.returncode == 0, cp.stderr
    names = listing.read_text().split()
    seen: Counter[str] = Counter()
    out = []
    for n in names:
        seen[n] += 1
        out.append((n, seen[n]))
    return out


def _run_env(site: Site, env: dict[str, str], *args: str) -> Any:
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "partitioner.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parent.parent,
    )


def test_a_live_memory_change_killed_anywhere_converges_to_what_the_guest_has(
    site: Site,
) -> None:
    nr0, _ = _pool()
    base = site.manifest("base", _guest(site, "192MiB"))
    grown = site.manifest("grown", _guest(site, "256MiB"))
    assert site.run("apply", "--no-supervise", str(base)).returncode == 0
    log = Path(site.status()["db"]["console_log"])
    kb0 = _memtotal(log)
    pid = site.status()["db"]["pid"]
    grow = _points(site, grown)
    _memtotal(log, kb0 + 64 * 1024)
    shrink = _points(site, base)
    _memtotal(log, kb0)
    assert {"live-changed", "pool-raised", "did-grow-memory"} <= {n for n, _ in grow}, grow
    assert {"live-changed", "did-shrink-memory"} <= {n for n, _ in shrink}, shrink
    for target, points, back in ((grown, grow, base), (base, shrink, grown)):
        for name, n in points:
            # from where the change starts
            assert site.run("apply", "--no-supervise", str(back)).returncode == 0, (name, n)
            env = {**site.env, "PARTITION_TEST_KILL_AT": f"{name}:{n}"}
            cp = _run_env(site, env, "apply", "--no-supervise", str(target))
            assert cp.returncode == -9, (name, n, cp.returncode, cp.stderr)
            # what it had begun was said before it was killed
            kind = "grow-memory" if target is grown else "shrink-memory"
            assert cp.stdout.startswith("applying:") and kind in cp.stdout, (name, cp.stdout)
            # status answers, and what the record says is what QEMU says the guest has
            st = site.status()["db"]
            assert st["state"] == "running" and st["pid"] == pid, (name, n)
            cp = site.run("apply", "--no-supervise", str(target))
            assert cp.returncode == 0, (name, n, cp.stderr)
            fixed = 128 * MiB
            assert _record_memory(site) == fixed + _plugged(site), (name, n)
            assert _record_memory(site) == (256 if target is grown else 192) * MiB
    cp = site.run("destroy", "--all", "--timeout", "5")
    assert cp.returncode == 0, cp.stderr
    assert _pool()[0] == nr0
