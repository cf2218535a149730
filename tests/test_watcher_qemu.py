"""`on_crash: restart` after a plain `partition apply`, with real QEMU under TCG: `apply` leaves a
supervisor watching the site (detached here, where systemd is not PID 1), adopts it rather than
doubling it, `status` says who watches, `destroy` of the last partition ends it.  And the rules of
its pid file: written whole, and a stale one (dead pid, a pid that is not our supervisor) trusted
by nobody."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from procs import pids_whose_argv

from partitioner.boot import watcher
from partitioner.cpuset import CpuSet
from partitioner.guest.launch import is_running, start_ticks, thread_affinities
from partitioner.kernel.root import HostRoot

ROOT = HostRoot("/")
PROJECT = Path(__file__).resolve().parents[1]
BACK_WITHIN = 30.0  # "within seconds": the supervisor looks every 0.5 s; TCG on shared cores


def _supervisors_of(state: Path) -> list[int]:
    """Every `host supervise` process of this state directory, whoever started it."""
    key = str(state).encode()
    return pids_whose_argv(lambda argv: b"supervise" in argv and key in argv)


@dataclass
class Site:
    dir: Path

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PARTITION_STATE_DIR": str(self.state),
            "PARTITION_RUN_DIR": str(self.dir / "run"),
            "PARTITION_LOG_DIR": str(self.dir / "log"),
        }

    def manifest(self) -> Path:
        path = self.dir / "site.yaml"
        path.write_text(
            "version: 1\n"
            'host: {reserve: {cpus: "0", memory: 1GiB}, accel: tcg, isolation: pinned}\n'
            "partitions:\n"
            '  p0: {cpus: "1", memory: 64MiB, hugepages: none}\n'  # on_crash: restart, the default
        )
        return path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "partitioner.cli.main", *args],
            env=self.env, capture_output=True, text=True, timeout=600, cwd=PROJECT,
        )  # fmt: skip

    def status(self) -> dict[str, Any]:
        cp = self.run("--json", "status")
        assert cp.returncode == 0, cp.stderr
        doc: dict[str, Any] = json.loads(cp.stdout)
        return doc


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    if os.geteuid() != 0:
        pytest.skip("needs root (CPU affinity)")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs: one for the host, one for the partition")
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.run("destroy", "--all", "--timeout", "5")
        # Whatever the test did, no supervisor of this site outlives it.
        for pid in _supervisors_of(s.state):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.qemu
def test_apply_alone_brings_a_killed_qemu_back_pinned(site: Site) -> None:
    # A stale pid file of an earlier supervisor whose pid now belongs to someone else.
    site.state.mkdir(parents=True)
    other = subprocess.Popen(["sleep", "300"])
    try:
        (site.state / watcher.PID_FILE).write_text(
            json.dumps(
                {"pid": other.pid, "start_ticks": start_ticks(ROOT, other.pid), "how": "detached"}
            )
        )
        cp = site.run("apply", str(site.manifest()))
        assert cp.returncode == 0, cp.stderr
        # The CLI has exited; the supervisor it started lives on, in a session of its own.
        doc = site.status()
        sup = doc["supervisor"]
        assert sup["watching"] is True and sup["how"] == "detached", sup
        pid = sup["pid"]
        assert pid not in (None, other.pid)
        assert _supervisors_of(site.state) == [pid]
        assert os.getsid(pid) == pid
        text = site.run("status").stdout
        assert f"supervisor: pid {pid} (started by apply)" in text

        # Applied again: the same supervisor, adopted, not a second one.
        again = site.run("--json", "apply", str(site.manifest()))
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["supervisor"]["pid"] == pid
        assert _supervisors_of(site.state) == [pid]

        # Its QEMU killed as an OOM kill would: back, pinned, within seconds.
        old = doc["partitions"]["p0"]["pid"]
        os.kill(old, signal.SIGKILL)
        t0 = time.monotonic()
        while True:
            st = site.status()["partitions"]["p0"]
            if st["state"] == "running" and st["pid"] not in (None, old):
                break
            assert time.monotonic() - t0 < BACK_WITHIN, f"not back within {BACK_WITHIN:g}s: {st}"
            time.sleep(0.2)
        assert st["restarts"] == 1
        new = int(st["pid"])
        assert is_running(ROOT, new, "p0")
        aff = thread_affinities(ROOT, new)
        vcpus = {int(t) for t in st["vcpu_threads"].values()}
        assert vcpus and all(aff[t] == CpuSet([1]) for t in vcpus), aff
        assert all(a == CpuSet([0]) for t, a in aff.items() if t not in vcpus), aff

        # destroy of the last partition ends it; the process the stale file named is untouched.
        cp = site.run("destroy", "--all", "--timeout", "5")
        assert cp.returncode == 0, cp.stderr
        assert _supervisors_of(site.state) == []
        assert site.status()["supervisor"] == {
            "watching": False, "pid": None, "how": None, "unit": None,
        }  # fmt: skip
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


@pytest.mark.qemu
def test_no_supervise_leaves_it_unwatched_and_status_says_so(site: Site) -> None:
    cp = site.run("apply", "--no-supervise", str(site.manifest()))
    assert cp.returncode == 0, cp.stderr
    assert _supervisors_of(site.state) == []
    assert site.status()["supervisor"]["watching"] is False
    assert "supervisor: none is watching" in site.run("status").stdout


# -- the pid file ------------------------------------------------------------------------


def test_pid_file_is_trusted_only_for_the_live_holder(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    pid_file = state / watcher.PID_FILE
    me = os.getpid()
    # Nobody holds the lock: whatever the file says, nobody watches, nobody is ended.
    pid_file.write_text(
        json.dumps({"pid": me, "start_ticks": start_ticks(ROOT, me), "how": "detached"})
    )
    assert watcher.watcher(ROOT, state) == watcher.Watcher(False)
    assert watcher.end(ROOT, state) is None

    with watcher.hold(ROOT, state, "detached", wait=None) as mine:
        assert mine
        # Written whole, by rename: nothing left aside, the holder's pid and start time.
        assert [p.name for p in state.iterdir() if p.name.endswith(".tmp")] == []
        doc = json.loads(pid_file.read_text())
        assert doc == {"pid": me, "start_ticks": start_ticks(ROOT, me), "how": "detached"}
        # A second one is refused (a detached one then leaves): adopted, not doubled.
        with watcher.hold(ROOT, state, "detached", wait=None) as second:
            assert second is False
        # The test process is no `host supervise`: watching, but its pid is not trusted.
        assert watcher.watcher(ROOT, state) == watcher.Watcher(True)
        # A dead pid, a reused pid (other start time), half a file: the same.
        dead = subprocess.Popen(["true"])
        dead.wait()
        for text in (
            json.dumps({"pid": dead.pid, "start_ticks": 1, "how": "detached"}),
            json.dumps(
                {"pid": me, "start_ticks": (start_ticks(ROOT, me) or 0) + 1, "how": "detached"}
            ),
            '{"pid": ' + str(me),
        ):
            pid_file.write_text(text)
            assert watcher.watcher(ROOT, state) == watcher.Watcher(True), text
            assert watcher.end(ROOT, state) is None
    assert not pid_file.exists()
    assert watcher.watcher(ROOT, state) == watcher.Watcher(False)


def test_systemd_unit_carries_the_state_directory(tmp_path: Path) -> None:
    argv = watcher.systemd_run_argv(tmp_path / "st", {"PARTITION_RUN_DIR": "/run/x"})
    assert argv[0] == "systemd-run"
    assert f"--unit={watcher.unit_name(tmp_path / 'st')}" in argv
    assert "--property=KillMode=process" in argv
    assert "--setenv=PARTITION_RUN_DIR=/run/x" in argv
    tail = argv[argv.index(sys.executable) :]
    assert tail[-6:] == [
        "--state-dir",
        str(tmp_path / "st"),
        "host",
        "supervise",
        "--as",
        "systemd",
    ]
    assert watcher.unit_name(tmp_path / "st") != watcher.unit_name(tmp_path / "other")
