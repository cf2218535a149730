"""Every verb that reconciles the record with the host says what it found in its ``--json``
document, as ``reconciled`` (docs/cli.md), on success and on failure alike.

Without QEMU: the situation is a start killed while its QEMU was half-started, the
QEMU stood for by a real process whose command line is the partition's QEMU's
(test_reconcile's stand-in), its pidfile written.  Each verb runs in-process
(``main``, as test_hostile_state does) on a fresh copy of it.  With real QEMU guests:
``test_destroy_start_and_stop_say_what_they_found_in_json`` below, a partition whose
QEMU is SIGKILLed, and a ``start`` killed right after it spawned QEMU.
"""

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
from guestimage import build_guest_initramfs, guest_kernel
from test_hostile_state import _partition, manifest  # noqa: F401  (a fixture)
from test_reconcile import _alive, _fake_qemu, _record, _state, procs  # noqa: F401

from partitioner.record.model import PartitionRecord, RunState
from partitioner.record.store import StateStore

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    args: list[str]  # "{manifest}" stands for the site manifest, "{big}" for one that cannot fit
    exit: int
    done: bool  # the verb acts on what it finds (holds the lock, changes the host)


# The verbs and ways to end that did not carry ``reconciled`` before: the ones that change
# the host, and every verb's failure after it has reconciled.
CASES: dict[str, Case] = {
    "stop": Case(["stop", "p1"], 0, True),
    "restart of another partition (fails)": Case(["restart", "nosuch"], 2, True),
    "start of another partition (fails)": Case(["start", "nosuch"], 2, True),
    "destroy --all": Case(["destroy", "--all"], 0, True),
    "destroy --all --dry-run": Case(["destroy", "--all", "--dry-run"], 0, False),
    "apply --replace of another partition (fails)": Case(
        ["apply", "--replace", "nosuch", "{manifest}"], 2, True
    ),
    "apply --dry-run of a site that does not fit (fails)": Case(
        ["apply", "--dry-run", "{big}"], 3, False
    ),
    "plan of a site that does not fit (fails)": Case(["plan", "{big}"], 3, False),
    "status of another partition (fails)": Case(["status", "nosuch"], 2, False),
    "audit": Case(["audit"], 0, False),
    "audit of another partition (fails)": Case(["audit", "nosuch"], 2, False),
    "host boot of a site that does not fit (fails)": Case(
        ["host", "boot", "--no-supervise", "{big}"], 3, True
    ),
}


def _half_started(
    tmp_path: Path, running: list[subprocess.Popen[bytes]]
) -> tuple[PartitionRecord, Path, int, StateStore]:
    """A record of p1 whose start was killed with its QEMU (the stand-in) half-started."""
    rec = _record(tmp_path)
    run_dir = Path(rec.paths["dir"])
    pid = _fake_qemu(running, "p1", run_dir / "qmp.sock")
    Path(rec.paths["pidfile"]).write_text(f"{pid}\n")
    store = StateStore(tmp_path / "state")
    store.save(_state(rec))
    return rec, run_dir, pid, store


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_verb_that_reconciled_says_so_in_its_json_document(
    case: str,
    tmp_path: Path,
    manifest: Path,  # noqa: F811
    procs: list[subprocess.Popen[bytes]],  # noqa: F811
) -> None:
    c = CASES[case]
    big = tmp_path / "big.yaml"
    big.write_text(manifest.read_text().replace("memory: 64MiB", "memory: 64TiB"))
    rec, run_dir, pid, store = _half_started(tmp_path, procs)

    args = [a.format(manifest=manifest, big=big) for a in c.args]
    cp = _partition(store.dir, manifest, "--json", *args)
    assert cp.returncode == c.exit, (cp.stdout, cp.stderr)
    doc = json.loads(cp.stdout)
    assert doc.get("ok", c.exit == 0) is (c.exit == 0), doc
    assert doc["reconciled"] == [
        {
            "partition": "p1",
            "found": f"a start was interrupted while its QEMU (pid {pid}) was half-started",
            "does": f"end QEMU pid {pid} and remove its run directory {run_dir}",
            "done": c.done,
        }
    ], doc
    # ... and it is true: done, the stand-in is ended and the record says so; else both
    # are as they were.
    assert _alive(pid) is not c.done
    assert run_dir.exists() is not c.done
    recorded = store.load().partitions.get("p1")
    if not c.done:
        assert recorded == rec
    elif recorded is not None:  # destroy --all forgets it
        assert (recorded.state, recorded.pid) == (RunState.STOPPED, None)


def test_destroy_of_a_manifest_that_is_not_valid_changes_nothing(
    tmp_path: Path,
    manifest: Path,  # noqa: F811
    procs: list[subprocess.Popen[bytes]],  # noqa: F811
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(manifest.read_text().replace('cpus: "1"', "cpus: 0"))
    _, run_dir, pid, store = _half_started(tmp_path, procs)
    before = store.path.read_bytes()
    cp = _partition(store.dir, manifest, "--json", "destroy", str(bad))
    assert cp.returncode == 2, (cp.stdout, cp.stderr)
    doc = json.loads(cp.stdout)
    assert doc["ok"] is False and str(bad) in json.dumps(doc["problems"]), doc
    # The manifest is read before the record: nothing was settled, so nothing is said.
    assert "reconciled" not in doc
    assert _alive(pid) and run_dir.exists()
    assert store.path.read_bytes() == before


def test_a_verb_that_finds_nothing_says_so_and_one_that_never_looked_does_not(
    tmp_path: Path,
    manifest: Path,  # noqa: F811
) -> None:
    store = StateStore(tmp_path / "state")
    rec = _record(tmp_path, state=RunState.STOPPED)
    Path(rec.paths["dir"]).rmdir()  # nothing left of a QEMU: nothing to find
    store.save(_state(rec))
    cp = _partition(store.dir, manifest, "--json", "stop", "p1")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout) == {"ok": True, "exit": 0, "reconciled": []}
    # A lock held by another command: the record was not looked at, so nothing is said of it.
    with store.lock("apply from the test"):
        cp = _partition(store.dir, manifest, "--json", "stop", "p1", "--lock-timeout", "0.1")
    assert cp.returncode == 6, cp.stderr
    assert "reconciled" not in json.loads(cp.stdout)


# -- with real QEMU guests ----------------------------------------------------------------


def _require_qemu() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CPU affinity)")
    if subprocess.run(["which", "qemu-system-x86_64"], capture_output=True).returncode:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs: one for the host, one for the partition")


@dataclass
class Site:
    dir: Path
    manifest: Path

    @property
    def run_dir(self) -> Path:
        return self.dir / "run"

    def run(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARTITION_TEST_KILL")}
        env.update(
            PARTITION_STATE_DIR=str(self.dir / "state"),
            PARTITION_RUN_DIR=str(self.run_dir),
            PARTITION_LOG_DIR=str(self.dir / "log"),
            **extra,
        )
        return subprocess.run(
            [sys.executable, "-m", "partitioner.cli.main", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
        )

    def json(self, *args: str) -> tuple[int, dict[str, Any]]:
        cp = self.run("--json", *args)
        assert cp.stdout, cp.stderr
        doc: dict[str, Any] = json.loads(cp.stdout)
        return cp.returncode, doc

    def qemus(self) -> list[int]:
        """Live processes whose command line names this site's run directory."""
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and _alive(int(entry)):
                try:
                    argv = Path(f"/proc/{entry}/cmdline").read_bytes()
                except OSError:
                    continue
                if str(self.run_dir).encode() in argv:
                    out.append(int(entry))
        return out

    def kill_qemu(self) -> int:
        [pid] = self.qemus()
        os.kill(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.05)
        return pid


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    _require_qemu()
    kernel, initrd = guest_kernel(), build_guest_initramfs(tmp_path / "img")
    m = tmp_path / "site.yaml"
    # isolation: pinned: this machine's other processes are its operator's, not ours.
    m.write_text(
        'version: 1\nhost:\n  reserve: {cpus: "0", memory: 1GiB}\n  accel: tcg\n'
        '  isolation: pinned\npartitions:\n  rj:\n    cpus: "1"\n    memory: 64MiB\n'
        f"    boot: {{kernel: {kernel}, initrd: {initrd}, cmdline: console=ttyS0 quiet panic=-1}}\n"
    )
    s = Site(tmp_path, m)
    yield s
    if (tmp_path / "state" / "state.json").exists():
        s.run("destroy", "--all", "--timeout", "0")
    for pid in s.qemus():
        os.kill(pid, signal.SIGKILL)


@pytest.mark.qemu
def test_destroy_start_and_stop_say_what_they_found_in_json(site: Site) -> None:
    gone = site.run_dir / "rj"

    def found(pid: int, what: str, does: str) -> list[dict[str, Any]]:
        return [{"partition": "rj", "found": what.format(pid=pid), "does": does, "done": True}]

    # No supervisor: the dead QEMUs are for the verbs below to find, not for it to restart.
    assert site.run("apply", "--no-supervise", str(site.manifest)).returncode == 0

    # Its QEMU dies: stop finds it gone, records it failed and clears its run directory.
    pid = site.kill_qemu()
    code, doc = site.json("stop", "rj", "--timeout", "0")
    assert (code, doc["ok"]) == (0, True), doc
    assert doc["reconciled"] == found(
        pid,
        "its QEMU (pid {pid}) is no longer running",
        f"record it as failed and remove its run directory {gone}",
    )
    assert not gone.exists()

    # A start killed right after it spawned QEMU: the next start ends that QEMU, then starts.
    cp = site.run("start", "rj", PARTITION_TEST_KILL_AT="qemu-spawned:1")
    assert cp.returncode == -signal.SIGKILL, cp.stderr
    [half] = site.qemus()
    code, doc = site.json("start", "rj")
    assert (code, doc["ok"]) == (0, True), doc
    assert doc["reconciled"] == found(
        half,
        "a start was interrupted while its QEMU (pid {pid}) was half-started",
        f"end QEMU pid {half} and remove its run directory {gone}",
    )
    assert not _alive(half)
    [running] = site.qemus()

    # Dead again: destroy says so, and gives everything back.
    assert site.kill_qemu() == running
    code, doc = site.json("destroy", "--all", "--timeout", "0")
    assert (code, doc["ok"]) == (0, True), doc
    assert doc["reconciled"] == found(
        running,
        "its QEMU (pid {pid}) is no longer running",
        f"record it as failed and remove its run directory {gone}",
    )
    assert site.qemus() == []
    assert json.loads((site.dir / "state" / "state.json").read_text())["partitions"] == {}
