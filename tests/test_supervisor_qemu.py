"""Restart on crash (`on_crash`) with real QEMU under TCG on this machine: `partition host
supervise` watches a partition that `apply` started; its QEMU is killed (SIGKILL, as an OOM
kill or a crash would end it) and must come back pinned, or be left `failed`."""

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

from partitioner.cpuset import CpuSet
from partitioner.guest.launch import is_running, thread_affinities
from partitioner.kernel.root import HostRoot

pytestmark = pytest.mark.qemu

ROOT = HostRoot("/")
PROJECT = Path(__file__).resolve().parents[1]
WAIT = 120.0  # a deadline, not a measurement: TCG on two shared cores


@dataclass
class Site:
    dir: Path
    supervisor: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PARTITION_STATE_DIR": str(self.dir / "state"),
            "PARTITION_RUN_DIR": str(self.dir / "run"),
            "PARTITION_LOG_DIR": str(self.dir / "log"),
        }

    def manifest(self, on_crash: str, hugepages: str = "none") -> Path:
        # No boot and no disk: the guest sits in SeaBIOS, which is all a crash needs.
        path = self.dir / "site.yaml"
        path.write_text(
            "version: 1\n"
            'host: {reserve: {cpus: "0", memory: 1GiB}, accel: tcg, isolation: pinned}\n'
            "partitions:\n"
            f'  p0: {{cpus: "1", memory: 64MiB, hugepages: {hugepages}, on_crash: {on_crash}}}\n'
        )
        return path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "partitioner.cli.main", *args],
            env=self.env, capture_output=True, text=True, timeout=600, cwd=PROJECT,
        )  # fmt: skip

    def supervise(self) -> None:
        log = (self.dir / "supervisor.log").open("wb")
        self.supervisor = subprocess.Popen(
            [sys.executable, "-m", "partitioner.cli.main", "host", "supervise", "--poll", "0.2"],
            env=self.env, stdout=log, stderr=log, cwd=PROJECT,
        )  # fmt: skip

    def status(self) -> dict[str, Any]:
        cp = self.run("--json", "status")
        assert cp.returncode == 0, cp.stderr
        doc: dict[str, Any] = json.loads(cp.stdout)["partitions"].get("p0", {"state": "absent"})
        return doc

    def log(self) -> str:
        return (self.dir / "supervisor.log").read_text(errors="replace")


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
        if s.supervisor is not None:
            s.supervisor.send_signal(signal.SIGTERM)
            try:
                s.supervisor.wait(timeout=30)
            except subprocess.TimeoutExpired:
                s.supervisor.kill()
                s.supervisor.wait()
        s.run("destroy", "--all")


def kill_qemu(site: Site) -> int:
    st = site.status()
    assert st["state"] == "running", st
    pid = int(st["pid"])
    os.kill(pid, signal.SIGKILL)
    return pid


def wait_for(site: Site, pred: Any, what: str) -> tuple[dict[str, Any], float]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < WAIT:
        st = site.status()
        if pred(st):
            return st, time.monotonic() - t0
        time.sleep(0.2)
    pytest.fail(f"{what} not seen within {WAIT:g}s: {site.status()}\n{site.log()}")


def test_killed_partition_comes_back_pinned_and_six_kills_leave_it_failed(site: Site) -> None:
    cp = site.run("apply", str(site.manifest("restart")))
    assert cp.returncode == 0, cp.stderr
    site.supervise()
    for n in range(1, 6):
        old = kill_qemu(site)
        st, took = wait_for(
            site,
            lambda s, old=old: s["state"] == "running" and s["pid"] not in (None, old),  # type: ignore[misc]
            f"restart after kill {n}",
        )
        pid = int(st["pid"])
        assert is_running(ROOT, pid, "p0")
        assert st["restarts"] == n, st
        assert "SIGKILL" in st["last_exit"] or "ended without being asked" in st["last_exit"]
        # Pinned as before: each vCPU thread on its host CPU, the rest on the reserve.
        aff = thread_affinities(ROOT, pid)
        vcpus = {int(t) for t in st["vcpu_threads"].values()}
        assert vcpus and all(aff[t] == CpuSet([1]) for t in vcpus), aff
        assert all(a == CpuSet([0]) for t, a in aff.items() if t not in vcpus), aff
        print(f"kill {n}: back after {took:.1f}s")
    # The sixth crash within ten minutes is one too many.
    kill_qemu(site)
    # (status alone shows a dead QEMU as failed at once: wait for the supervisor's word)
    st, _ = wait_for(site, lambda s: s.get("failed_reason"), "failed after the sixth kill")
    assert st["state"] == "failed"
    assert st["restarts"] == 5
    assert "6 times within 10 minutes" in st["failed_reason"]
    time.sleep(1.0)  # and it stays failed: nobody starts it again
    assert site.status()["state"] == "failed"
    cp = site.run("status")
    assert "p0: failed: crashed 6 times" in cp.stdout


def test_on_crash_stop_leaves_it_failed_holding_its_resources(site: Site) -> None:
    cp = site.run("apply", str(site.manifest("stop", hugepages="2MiB")))
    assert cp.returncode == 0, cp.stderr
    held = site.status()["hugepages_added"]
    site.supervise()
    kill_qemu(site)
    st, _ = wait_for(site, lambda s: s.get("failed_reason"), "failed after one kill")
    assert st["state"] == "failed"
    assert st["restarts"] == 0
    assert st["failed_reason"].startswith("on_crash: stop")
    assert st["hugepages_added"] == held  # still its own, until destroy
    cp = site.run("destroy", "--all")
    assert cp.returncode == 0, cp.stderr


def test_host_boot_starts_autostart_partitions_and_supervises(site: Site) -> None:
    # autostart: false: the boot-time start leaves it alone.
    manifest = site.manifest("restart")
    manifest.write_text(manifest.read_text().replace("on_crash: restart", "autostart: false"))
    cp = site.run("--json", "host", "boot", str(manifest), "--no-supervise")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout) == {
        "ok": True,
        "exit": 0,
        "started": [],
        "skipped": ["p0"],
        "notes": [],
        "reconciled": [],
    }
    assert json.loads(site.run("--json", "status").stdout)["partitions"] == {}
    # autostart: true (the default): started, and `host boot` stays to restart it.
    manifest = site.manifest("restart")
    log = (site.dir / "supervisor.log").open("wb")
    site.supervisor = subprocess.Popen(
        [sys.executable, "-m", "partitioner.cli.main", "host", "boot", str(manifest)],
        env=site.env, stdout=log, stderr=log, cwd=PROJECT,
    )  # fmt: skip
    wait_for(site, lambda s: s["state"] == "running", "the boot-time start")
    old = kill_qemu(site)
    wait_for(
        site,
        lambda s: s["state"] == "running" and s["pid"] not in (None, old),
        "restart under host boot",
    )
