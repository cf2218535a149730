"""Rule 10 on this machine: a confined partition's QEMU under TCG, read back from the kernel.

The site is applied by the ``partition`` command as an operator would (tests/test_apply_qemu.py's
``Site``).  What is checked comes from /proc and the file system: the QEMU's uid and gid,
capabilities, NoNewPrivs, seccomp mode, root directory and locked-memory limit; its files'
owners and modes; what a process with the partition's uid can open (``setpriv``, as the
cross-partition tests inside the emulated server do with two partitions); and ``audit``,
which must name a QEMU that runs as root.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from test_apply_qemu import ROOT, Site, _assert_pinned, _qemus_of, _wait_console, site

from partitioner.guest.launch import memlock_ceiling
from partitioner.planning.confine import USER_BASE, in_user_range, memlock_bytes
from partitioner.record.store import StateStore

pytestmark = pytest.mark.qemu

__all__ = ["site"]  # the fixture, shared with test_apply_qemu


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in (ROOT.read(f"/proc/{pid}/status") or "").splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _as(uid: int, *argv: str) -> subprocess.CompletedProcess[str]:
    """``argv`` run by a process with ``uid`` and gid ``uid``, no supplementary groups."""
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def _processes_of(uid: int) -> list[int]:
    """Live processes (not zombies, which hold nothing) running as ``uid``."""
    pids = []
    for entry in ROOT.listdir("/proc"):
        s = _status(int(entry)) if entry.isdigit() else {}
        if s.get("Uid", "").split()[:1] == [str(uid)] and s.get("State", "")[:1] not in "ZX":
            pids.append(int(entry))
    return pids


def _wait_running(site: Site, name: str, not_pid: int, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = site.status()[name]
        if st["state"] == "running" and st["pid"] not in (None, not_pid):
            return st
        time.sleep(0.5)
    raise AssertionError(f"{name} was not restarted within {timeout}s: {site.status()[name]}")


def test_a_confined_partition_runs_walled_off_and_leaves_nothing_behind(site: Site) -> None:
    m = site.manifest("site", {"cf": site.guest(hugepages="2MiB", extra="on_crash: restart\n")})
    cp = site.run("apply", str(m))
    assert cp.returncode == 0, cp.stderr
    st = site.status()["cf"]
    pid, uid = st["pid"], st["uid"]
    assert st["state"] == "running"
    assert isinstance(uid, int) and in_user_range(uid) and uid >= USER_BASE

    # Its own user, no privilege, a seccomp filter, an empty root.
    s = _status(pid)
    assert s["Uid"].split() == [str(uid)] * 4 and s["Gid"].split() == [str(uid)] * 4
    assert s["Groups"] in ("", str(uid))
    assert int(s["CapEff"], 16) == 0 and int(s["CapPrm"], 16) == 0
    assert s["NoNewPrivs"] == "1"
    assert s["Seccomp"] == "2"
    run_dir = site.dir / "run" / "cf"
    assert os.readlink(f"/proc/{pid}/root") == str(run_dir / "root")
    assert os.listdir(run_dir / "root") == []

    # Pinned from outside, hugepage-backed, booted.
    _assert_pinned(pid, st["vcpu_threads"], st["cpus"])
    assert s["HugetlbPages"].split()[0] == str(128 * 1024)
    console = Path(st["console_log"])
    _wait_console(console, "GUEST-READY")

    # Its locked-memory limit is what the plan computed (or this process's own ceiling).
    doc = json.loads(site.run("--json", "plan", str(m)).stdout)
    need = doc["partitions"]["cf"]["memlock_bytes"]
    ceiling = memlock_ceiling(ROOT)
    want = need if ceiling is None else min(need, ceiling)
    limits = (ROOT.read(f"/proc/{pid}/limits") or "").splitlines()
    locked = next(ln for ln in limits if ln.startswith("Max locked memory")).split()
    assert locked[3:5] == [str(want), str(want)]

    # Its files are root's alone: a process with its uid can open none of them, nor its memory.
    for path, mode in ((run_dir, 0o700), (console, 0o600)):
        info = path.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, mode), path
    for target in (console, run_dir / "qmp.sock", f"/proc/{pid}/mem", f"/proc/{pid}/environ"):
        denied = _as(uid + 1, "cat", str(target))
        assert denied.returncode != 0 and "denied" in denied.stderr, (target, denied)
    fds = os.listdir(f"/proc/{pid}/fd")
    assert fds and _as(uid + 1, "ls", f"/proc/{pid}/fd").returncode != 0

    # audit reads every wall back and finds none down.
    audit = json.loads(site.run("--json", "audit").stdout)
    assert [f for f in audit["findings"] if f["kind"] == "walls"] == []
    assert audit["partitions"]["cf"]["uid"] == uid

    # Killed, it is restarted (by the supervisor apply left), confined, as the same user.
    os.kill(pid, signal.SIGKILL)
    again = _wait_running(site, "cf", pid)
    assert again["uid"] == uid
    s = _status(again["pid"])
    assert s["Uid"].split()[0] == str(uid) and int(s["CapEff"], 16) == 0
    _assert_pinned(again["pid"], again["vcpu_threads"], again["cpus"])

    cp = site.run("destroy", "--all", "--timeout", "10")
    assert cp.returncode == 0, cp.stderr
    assert _qemus_of(site) == [] and _processes_of(uid) == []
    assert not run_dir.exists()
    assert StateStore(site.dir / "state").load().partitions == {}


def _wait_exited(pid: int) -> None:
    """Until `pid` is gone, or a zombie with no other thread left: its memory and its files
    (the pid file's lock) are given back by then.

    A dying process's cmdline reads empty as soon as its memory map is detached, which is
    before its pages (hugepages included) are back in the pool; its leader is a zombie while
    its other threads still exit, holding its files."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stat_line = ROOT.read(f"/proc/{pid}/stat")
        if not stat_line:
            return
        state = stat_line.rpartition(")")[2].split()[0]
        threads = ROOT.listdir(f"/proc/{pid}/task")
        if state in ("Z", "X") and len(threads) <= 1:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not end within 30 s of SIGKILL")


def test_audit_names_a_qemu_that_runs_as_root(site: Site) -> None:
    m = site.manifest("site", {"rt": site.guest()})
    cp = site.run("apply", "--no-supervise", str(m))
    assert cp.returncode == 0, cp.stderr
    store = StateStore(site.dir / "state")
    rec = store.load().partitions["rt"]
    assert rec.pid is not None and rec.uid is not None
    # Its QEMU replaced by hand with the same command line, as root: no wrapper, no drop.
    argv = list(rec.argv)
    argv = argv[argv.index("--", argv.index("setpriv")) + 1 :]
    for option in ("-chroot", "-runas"):
        i = argv.index(option)
        del argv[i : i + 2]
    os.kill(rec.pid, signal.SIGKILL)
    _wait_exited(rec.pid)  # its hugepages are free only once its exit is complete
    (site.dir / "run" / "rt").mkdir(mode=0o700, exist_ok=True)
    qmp = site.dir / "run" / "rt" / "qmp.sock"
    qmp.unlink(missing_ok=True)  # the killed QEMU's: wait for the new one's
    errors = site.dir / "by-hand.err"
    with errors.open("wb") as err:
        by_hand = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while not qmp.exists() and time.monotonic() < deadline:
            assert by_hand.poll() is None, f"QEMU by hand ended: {errors.read_text()}"
            time.sleep(0.1)
        doc = json.loads(store.path.read_text())
        doc["partitions"]["rt"]["pid"] = by_hand.pid
        doc["partitions"]["rt"]["start_ticks"] = None
        store.path.write_text(json.dumps(doc))
        cp = site.run("--json", "audit")
        assert cp.returncode == 3, cp.stdout + cp.stderr
        walls = [f for f in json.loads(cp.stdout)["findings"] if f["kind"] == "walls"]
        said = " ".join(f["detail"] for f in walls)
        assert "runs as root" in said and "capabilities" in said, cp.stdout
    finally:
        by_hand.kill()
        by_hand.wait()


def test_unconfined_runs_as_root_and_is_reported(site: Site) -> None:
    m = site.manifest("site", {"dbg": site.guest()})
    m.write_text(
        m.read_text().replace("  isolation: pinned\n", "  isolation: pinned\n  confine: false\n")
    )
    plan = site.run("plan", str(m))
    assert plan.returncode == 0 and "host.confine is false" in plan.stderr
    cp = site.run("apply", "--no-supervise", str(m))
    assert cp.returncode == 0, cp.stderr
    st = site.status()["dbg"]
    assert st["uid"] is None
    assert _status(st["pid"])["Uid"].split()[0] == "0"
    cp = site.run("--json", "audit")
    assert cp.returncode == 3
    walls = [f for f in json.loads(cp.stdout)["findings"] if f["kind"] == "walls"]
    assert len(walls) == 1 and "unconfined" in walls[0]["detail"]


def test_plan_shows_the_locked_memory_limit(site: Site) -> None:
    m = site.manifest("site", {"pl": site.guest(hugepages="2MiB")})
    cp = site.run("--json", "plan", str(m))
    assert cp.returncode == 0, cp.stderr
    p = json.loads(cp.stdout)["partitions"]["pl"]
    assert p["memlock_bytes"] > 0
    text = site.run("plan", str(m)).stdout
    assert "LOCKED" in text
    from partitioner.units import MiB

    # Hugepages are not counted by mlock, the TCG cache is; no device, nothing pinned twice.
    assert p["memlock_bytes"] == 512 * MiB + 16 * MiB + 256 * MiB
    assert memlock_bytes  # the one formula (planning.confine), tested in test_confine.py
