"""Reconciliation against real processes and a real (built) hugepage tree.

A QEMU is stood for by a real process: ``sleep`` (a process that is not ours,
whatever pid a pidfile names) or a Python process whose command line is a QEMU's
for the partition (``-name NAME,...`` and the run directory's QMP socket).  What
reconciliation may end is only the latter, and only with the start time recorded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from fakekernel import FakeKernelRoot
from test_state import placement
from test_vfio import NIC, build, host_of
from treebuilder import TreeBuilder

from partitioner.cpuset import CpuSet
from partitioner.engine.context import ApplyContext
from partitioner.engine.devices import _claim_intent
from partitioner.guest.argv import guest_paths
from partitioner.guest.launch import identify, start_ticks
from partitioner.kernel import sysfs
from partitioner.kernel.root import HostRoot
from partitioner.record.codec import claim_from_json
from partitioner.record.model import (
    HugepageGrant,
    PartitionRecord,
    PoolIntent,
    RunState,
    SiteRecord,
    State,
    plan_of_state,
)
from partitioner.record.reconcile import find_qemu, reconcile
from partitioner.record.store import StateStore
from partitioner.units import MiB
from partitioner.vfio.claim import claim_group

ROOT = HostRoot("/")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def _fake_qemu(procs: list[subprocess.Popen[bytes]], name: str, qmp: Path) -> int:
    """A process whose command line is a QEMU's for ``name`` (argv[0] says qemu)."""
    p = subprocess.Popen(
        [
            "qemu-system-x86_64",
            "-c",
            "import time; time.sleep(600)",
            "-name",
            f"{name},debug-threads=on",
            "-qmp",
            f"unix:{qmp},server=on,wait=off",
        ],
        executable=sys.executable,
    )
    procs.append(p)
    deadline = time.monotonic() + 10
    while b"-name" not in Path(f"/proc/{p.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, "the stand-in never exec'd"
        time.sleep(0.01)
    return p.pid


def _record(tmp_path: Path, name: str = "p1", **kw: object) -> PartitionRecord:
    paths = guest_paths(tmp_path / "run", tmp_path / "log", name)
    paths.dir.mkdir(parents=True, exist_ok=True)
    base = PartitionRecord(
        name=name,
        state=RunState.STARTING,
        placement=replace(placement(name), hugepage_bytes=None),
        paths=paths.to_json(),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def _state(rec: PartitionRecord) -> State:
    site = SiteRecord("/s.yaml", "tcg", "isolate", CpuSet([0]), 1024 * MiB)
    return State(site=site).with_partition(rec)


def test_a_pidfile_naming_a_process_that_is_not_ours_never_gets_it_killed(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    sleeper = subprocess.Popen(["sleep", "600"])
    procs.append(sleeper)  # type: ignore[arg-type]
    rec = _record(tmp_path)
    Path(rec.paths["pidfile"]).write_text(f"{sleeper.pid}\n")
    for state in (RunState.STARTING, RunState.RUNNING, RunState.STOPPED):
        r = reconcile(_state(replace(rec, state=state, pid=sleeper.pid)), ROOT)
        assert find_qemu(ROOT, replace(rec, pid=sleeper.pid)) is None
        r.carry_out()
        assert _alive(sleeper.pid), state
        if state is not RunState.STOPPED:
            assert r.state.partitions["p1"].pid is None
    # The half-start is recorded as stopped and its run directory is gone.
    assert r.state.partitions["p1"].state is RunState.STOPPED
    assert not Path(rec.paths["dir"]).exists()


def test_a_qemu_of_this_partition_is_ours_only_with_its_start_time(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    rec = _record(tmp_path)
    paths = guest_paths(tmp_path / "run", tmp_path / "log", "p1")
    pid = _fake_qemu(procs, "p1", paths.qmp)
    ticks = start_ticks(ROOT, pid)
    assert ticks is not None
    assert identify(ROOT, pid, "p1", paths, ticks)
    assert not identify(ROOT, pid, "p1", paths, ticks + 1)  # the pid reused by another process
    assert not identify(ROOT, pid, "p2", paths, ticks)  # another partition's name
    other = guest_paths(tmp_path / "elsewhere", tmp_path / "log", "p1")
    assert not identify(ROOT, pid, "p1", other, ticks)  # another run directory

    # Recorded with another start time, and no pidfile: not ours, left alone.
    wrong = replace(rec, state=RunState.STOPPED, pid=pid, start_ticks=ticks + 1)
    r = reconcile(_state(wrong), ROOT)
    r.carry_out()
    assert _alive(pid)

    # Recorded as stopped with its own start time: a QEMU that should not be there, ended.
    right = replace(rec, state=RunState.STOPPED, pid=pid, start_ticks=ticks)
    r = reconcile(_state(right), ROOT)
    assert [f.found for f in r.findings] == [
        f"it is recorded as stopped but its QEMU (pid {pid}) runs"
    ]
    r.carry_out()
    assert not _alive(pid)
    assert not paths.dir.exists()
    assert r.state.partitions["p1"].pid is None


def test_a_start_killed_before_the_pid_was_recorded_is_found_by_its_pidfile_and_ended(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    rec = _record(tmp_path)
    paths = guest_paths(tmp_path / "run", tmp_path / "log", "p1")
    pid = _fake_qemu(procs, "p1", paths.qmp)
    paths.pidfile.write_text(f"{pid}\n")
    r = reconcile(_state(rec), ROOT)
    # Not adoptable: it answers no QMP, so it never reached the pinned, running state.
    assert r.state.partitions["p1"].state is RunState.STOPPED
    assert "half-started" in r.findings[0].found
    assert _alive(pid), "reconcile alone changes nothing"
    r.carry_out()
    assert not _alive(pid)


def test_a_start_killed_before_the_pidfile_was_written_is_found_by_its_socket(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    rec = _record(tmp_path)
    paths = guest_paths(tmp_path / "run", tmp_path / "log", "p1")
    pid = _fake_qemu(procs, "p1", paths.qmp)
    assert find_qemu(ROOT, rec) == pid
    # Once it is recorded stopped (nothing is starting), no process is searched for.
    assert find_qemu(ROOT, replace(rec, state=RunState.STOPPED)) is None


def _pool_tree(tmp_path: Path, nr: int) -> HostRoot:
    d = tmp_path / "host" / sysfs.hugepage_pool(2 * MiB, 0).lstrip("/")
    d.mkdir(parents=True)
    (d / "nr_hugepages").write_text(f"{nr}\n")
    (d / "free_hugepages").write_text(f"{nr}\n")
    return HostRoot(tmp_path / "host")


@pytest.mark.parametrize(
    ("op", "before", "target", "now", "grant_before", "grant_after"),
    [
        ("raise", 10, 42, 42, 0, 32),  # raised, killed before the grant was recorded
        ("raise", 10, 42, 10, 0, 0),  # killed before the pool moved (or it was put back)
        ("raise", 10, 42, 30, 0, 20),  # the kernel gave only part of it
        ("raise", 10, 42, 50, 0, 32),  # someone else grew it too: never more than asked
        ("release", 42, 10, 10, 32, 0),  # given back, killed before the record said so
        ("release", 42, 10, 42, 32, 32),  # killed before the pool moved
        ("release", 42, 10, 0, 32, 0),  # someone else shrank it further: never below 0
    ],
)
def test_an_interrupted_pool_change_becomes_the_grant_it_was(
    tmp_path: Path,
    op: str,
    before: int,
    target: int,
    now: int,
    grant_before: int,
    grant_after: int,
) -> None:
    root = _pool_tree(tmp_path, now)
    grants = (HugepageGrant(0, 2 * MiB, grant_before),) if grant_before else ()
    rec = PartitionRecord(
        name="p1",
        state=RunState.STOPPED,
        placement=placement("p1"),
        hugepages=grants,
        pool_intents=(PoolIntent(0, 2 * MiB, op, before, target),),
    )
    r = reconcile(_state(rec), root)
    settled = r.state.partitions["p1"]
    assert settled.pool_intents == ()
    assert sum(g.pages for g in settled.hugepages) == grant_after
    assert len(r.findings) == 1 and "interrupted" in r.findings[0].found
    # Settling is a record change only: saved, it is not settled a second time.
    store = StateStore(tmp_path / "state")
    store.save(r.state)
    again = reconcile(store.load(), root)
    assert again.state == r.state and again.findings == []


def test_an_interrupted_claim_is_given_back(tmp_path: Path) -> None:
    pending = {
        "group": 19,
        "functions": [{"address": "0000:81:00.0", "driver": "e1000e", "driver_override": None}],
        "loaded_vfio_pci": False,
        "pending": True,
    }
    done = {**pending, "group": 20, "pending": False}
    rec = PartitionRecord(
        name="p1",
        state=RunState.STOPPED,
        placement=placement("p1"),
        claims=(claim_from_json(done), claim_from_json(pending)),
    )
    r = reconcile(_state(rec), HostRoot(tmp_path))
    assert r.state.partitions["p1"].claim_groups() == [20]
    given = [f for f in r.findings if "claiming IOMMU group 19" in f.found]
    assert len(given) == 1 and given[0].fix is not None
    assert "e1000e" in given[0].does


def test_status_sees_what_reconciliation_would_do_and_does_not_do_it(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    rec = _record(tmp_path)
    paths = guest_paths(tmp_path / "run", tmp_path / "log", "p1")
    pid = _fake_qemu(procs, "p1", paths.qmp)
    paths.pidfile.write_text(f"{pid}\n")
    store = StateStore(tmp_path / "state")
    store.save(_state(rec))
    env = {**os.environ, "PARTITION_STATE_DIR": str(tmp_path / "state")}
    cp = subprocess.run(
        [sys.executable, "-m", "partitioner.cli.main", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert cp.returncode == 0, cp.stderr
    assert "stopped" in cp.stdout
    assert f"half-started; the next apply, destroy, start or stop will end QEMU pid {pid}" in (
        cp.stderr
    )
    assert _alive(pid)
    assert store.load() == _state(rec)


def test_a_claim_killed_after_the_unbind_is_given_back_once(tree: TreeBuilder) -> None:
    """The intent is saved before the first unbind; the claim is then made but never recorded
    (the command is killed): the next run gives the function back to its driver, once."""
    fk = FakeKernelRoot(build(tree))
    host = host_of(fk)
    store = StateStore(Path(tree.root) / "state")
    site = SiteRecord("/s.yaml", "tcg", "pinned", CpuSet([0]), 1024 * MiB)
    plan = plan_of_state(_state(PartitionRecord("p1", RunState.STOPPED, placement("p1"))))
    ctx = ApplyContext(
        root=fk,
        plan=plan,
        state=State(site=site),
        run_dir=Path(tree.root) / "run",
        log_dir=Path(tree.root) / "log",
        host=host,
        store=store,
    )
    _claim_intent(ctx, "p1", 2)
    claim_group(fk, host, 2, load_module=lambda _name: None)  # ... and killed right here
    assert fk.readlink_name(sysfs.pci_device(NIC, "driver")) == "vfio-pci"
    r = reconcile(store.load(), fk)
    assert r.state.partitions["p1"].claims == ()
    r.carry_out()
    assert fk.readlink_name(sysfs.pci_device(NIC, "driver")) == "e1000e"
    assert fk.read(sysfs.pci_device(NIC, "driver_override")) in (None, "", "(null)")
    store.save(r.state)
    assert reconcile(store.load(), fk).findings == []


def test_while_another_command_holds_the_lock_a_start_is_under_way_not_interrupted(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    rec = _record(tmp_path)
    paths = guest_paths(tmp_path / "run", tmp_path / "log", "p1")
    pid = _fake_qemu(procs, "p1", paths.qmp)
    paths.pidfile.write_text(f"{pid}\n")
    store = StateStore(tmp_path / "state")
    store.save(_state(rec))
    assert not store.busy()
    with store.lock("apply from the test"):
        assert store.busy()
        r = reconcile(store.load(), ROOT, busy=store.busy())
        assert r.state.partitions["p1"].state is RunState.STARTING and r.findings == []
    # Once it lets go, a start left "starting" is one a killed command left.
    assert not store.busy()
    assert reconcile(store.load(), ROOT, busy=store.busy()).findings != []
