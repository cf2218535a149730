"""The state record: round trips, atomic writes that survive a crash, the lock, reconciling with the host."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from partitioner.cpuset import CpuSet
from partitioner.errors import StateError
from partitioner.kernel.root import HostRoot
from partitioner.manifest.model import Boot, DeviceSpec, Disk, Location, PartitionSpec
from partitioner.pci import PciAddress
from partitioner.planning.model import DeviceAssignment, Placement
from partitioner.record.codec import claim_from_json, encode
from partitioner.record.model import (
    HugepageGrant,
    PartitionRecord,
    RunState,
    SiteRecord,
    State,
    plan_of_state,
    running_partitions,
)
from partitioner.record.reconcile import reconcile
from partitioner.record.store import StateStore
from partitioner.run import spawn
from partitioner.units import MiB

FORK = multiprocessing.get_context("fork")


def placement(name: str = "fw0", cpus: tuple[int, ...] = (1,), devices: bool = False) -> Placement:
    devs = (
        (
            DeviceAssignment(
                PciAddress.parse("0000:81:00.0"), 19, "8086:10d3", "e1000e", False, "named"
            ),
            DeviceAssignment(
                PciAddress.parse("0000:81:00.1"), 19, "8086:10d3", None, True, "same slot", True
            ),
        )
        if devices
        else ()
    )
    spec = PartitionSpec(
        name=name,
        cpu_count=len(cpus),
        cpu_list=CpuSet(cpus) if devices else None,
        memory_bytes=256 * MiB,
        hugepage_bytes=2 * MiB,
        numa=(0,) if devices else "auto",
        devices=(DeviceSpec("pci", "0000:81:00.0", where=Location("s.yaml", 9, 11)),)
        if devices
        else (),
        boot=Boot("/k", "/i", "console=ttyS0"),
        disks=(Disk("/d.qcow2", readonly=True),),
        firmware="uefi" if devices else "bios",
        autostart=False,
        order=3,
        where=Location("s.yaml", 5, 3),
    )
    return Placement(
        name=name,
        cpus=cpus,
        sockets=1,
        cores=len(cpus),
        threads=1,
        numa_nodes=(0,),
        memory_per_node=((0, 256 * MiB),),
        hugepage_bytes=2 * MiB,
        devices=devs,
        spec=spec,
        notes=("a note",),
        cpu_nodes=tuple(0 for _ in cpus),
    )


def record(name: str = "fw0", **kw: object) -> PartitionRecord:
    base = PartitionRecord(
        name=name,
        state=RunState.RUNNING,
        placement=placement(name, devices=True),
        argv=("qemu-system-x86_64", "-name", f"{name},debug-threads=on"),
        pid=4242,
        vcpu_threads={0: 4250},
        paths={"console_log": f"/var/log/partition/{name}.console.log"},
        started_at=1000.5,
        claims=(
            claim_from_json(
                {
                    "group": 19,
                    "functions": [{"address": "0000:81:00.0", "driver": "e1000e"}],
                    "loaded_vfio_pci": False,
                }
            ),
        ),
        hugepages=(HugepageGrant(0, 2 * MiB, 128),),
    )
    return PartitionRecord(**{**base.__dict__, **kw})  # type: ignore[arg-type]


def a_state() -> State:
    site = SiteRecord("/etc/site.yaml", "tcg", "isolate", CpuSet([0]), 1024 * MiB)
    return State(site=site).with_partition(record("fw0")).with_partition(record("db"))


def test_placement_round_trip_keeps_every_field() -> None:
    for p in (placement(devices=True), placement(devices=False)):
        back = Placement.from_json(json.loads(json.dumps(p.to_json())))
        assert back == p
        assert back.same_resources(p)


def test_state_round_trip_and_deterministic_bytes(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    st = a_state()
    store.save(st)
    loaded = store.load()
    assert loaded == st
    assert encode(loaded) == store.path.read_bytes()
    assert list(loaded.partitions) == ["db", "fw0"]
    store.save(loaded)
    assert store.path.read_bytes() == encode(st)


def test_missing_file_is_empty_state(tmp_path: Path) -> None:
    st = StateStore(tmp_path / "nowhere").load()
    assert st == State()
    assert not st.partitions


@pytest.mark.parametrize(
    "content", [b"{not json", b'{"version": 99}', b'{"version": 1, "partitions": {"a": {}}}', b""]
)
def test_corrupt_file_is_a_state_error_naming_it(tmp_path: Path, content: bytes) -> None:
    store = StateStore(tmp_path)
    store.path.write_bytes(content)
    with pytest.raises(StateError) as ei:
        store.load()
    assert ei.value.path == str(store.path)
    assert str(store.path) in str(ei.value)
    assert "move" in str(ei.value)  # says what to do
    assert store.path.read_bytes() == content  # and does not touch it


def _save_and_die_before_rename(state_dir: str) -> None:
    import partitioner.record.store as st

    def crash(*_: object) -> None:
        os._exit(9)  # the process dies between write+fsync and rename

    st.os.replace = crash  # type: ignore[assignment]
    StateStore(Path(state_dir)).save(State())


def test_crash_between_write_and_rename_leaves_the_old_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    old = a_state()
    store.save(old)
    before = store.path.read_bytes()
    child = FORK.Process(target=_save_and_die_before_rename, args=(str(tmp_path),))
    child.start()
    child.join(30)
    assert child.exitcode == 9
    # The new content reached a temp file, but the record is the old one, whole.
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert store.path.read_bytes() == before
    assert store.load() == old
    # And the next save replaces it normally, sweeping the dead save's temp file away.
    store.save(State())
    assert store.load() == State()
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_failed_rename_is_a_state_error_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import partitioner.record.store as st

    store = StateStore(tmp_path)
    store.save(a_state())
    before = store.path.read_bytes()

    def refuse(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st.os, "replace", refuse)
    with pytest.raises(StateError, match="No space left"):
        store.save(State())
    assert store.path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def _hold_lock(state_dir: str, ready: object, release: object) -> None:
    store = StateStore(Path(state_dir))
    with store.lock("apply site.yaml"):
        ready.set()  # type: ignore[attr-defined]
        release.wait(30)  # type: ignore[attr-defined]


def test_lock_contention_names_the_holder_then_waits(tmp_path: Path) -> None:
    ready, release = FORK.Event(), FORK.Event()
    child = FORK.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    child.start()
    try:
        assert ready.wait(30)
        store = StateStore(tmp_path)
        t0 = time.monotonic()
        with pytest.raises(StateError) as ei, store.lock("destroy", timeout=0.5):
            pass
        assert time.monotonic() - t0 >= 0.5
        assert f"pid {child.pid} (apply site.yaml)" in str(ei.value)
        assert ei.value.path == str(store.lock_path)

        # A patient second holder gets the lock as soon as the first lets go.
        FORK.Process(target=lambda: (time.sleep(0.5), release.set())).start()
        with store.lock("destroy", timeout=20):
            assert store.holder().startswith(f"pid {os.getpid()} (destroy) since 20")
        assert store.holder() == ""
    finally:
        release.set()
        child.join(30)


def test_lock_is_reentrant_for_nobody_else_in_process(tmp_path: Path) -> None:
    # flock locks belong to the open file: a second open in this process contends too,
    # which is what keeps two verbs of one process (tests) apart.
    store = StateStore(tmp_path)
    with store.lock("apply"), pytest.raises(StateError), StateStore(tmp_path).lock("x", 0.2):
        pass


def test_running_partitions_for_the_planner() -> None:
    rp = running_partitions(a_state())
    assert sorted(rp) == ["db", "fw0"]
    fw0 = rp["fw0"]
    assert fw0.cpus == (1,)
    assert fw0.memory_per_node == ((0, 256 * MiB),)
    assert fw0.hugepage_bytes == 2 * MiB
    assert fw0.devices == (PciAddress.parse("0000:81:00.0"), PciAddress.parse("0000:81:00.1"))


def test_plan_of_state() -> None:
    plan = plan_of_state(a_state())
    assert plan.accel == "tcg"
    assert plan.host_cpus == CpuSet([0])
    assert set(plan.placements) == {"db", "fw0"}
    with pytest.raises(StateError):
        plan_of_state(State())


def _pci_tree(root: Path, drivers: dict[str, str | None]) -> HostRoot:
    for addr, drv in drivers.items():
        dev = root / "sys/devices/pci0000:80" / addr
        dev.mkdir(parents=True)
        link = root / "sys/bus/pci/devices" / addr
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(dev, link.parent))
        if drv:
            d = root / "sys/bus/pci/drivers" / drv
            d.mkdir(parents=True, exist_ok=True)
            (dev / "driver").symlink_to(os.path.relpath(d, dev))
    # Processes are the real ones: the record's pids are checked against this machine's /proc.
    (root / "proc").symlink_to("/proc")
    return HostRoot(root)


def test_reconcile_marks_a_dead_qemu_failed_and_reports_lost_claims(tmp_path: Path) -> None:
    proc = spawn(["sleep", "0"])
    proc.wait()  # a pid that existed and is gone
    root = _pci_tree(tmp_path, {"0000:81:00.0": "e1000e"})
    st = State().with_partition(record("fw0", pid=proc.pid))
    r = reconcile(st, root)
    fixed, notes = r.state, [f.text(done=False) for f in r.findings]
    assert fixed.partitions["fw0"].state is RunState.FAILED
    assert any("no longer running" in n for n in notes)
    assert any("0000:81:00.0" in n and "e1000e" in n for n in notes)


def test_reconcile_keeps_a_live_guest_and_a_claim_in_place(tmp_path: Path) -> None:
    root = _pci_tree(tmp_path, {"0000:81:00.0": "vfio-pci"})
    # Not a QEMU of partition fw0: a live pid alone is not enough (pid reuse).
    proc = spawn(["sleep", "30"])
    try:
        st = State().with_partition(record("fw0", pid=proc.pid))
        fixed = reconcile(st, root).state
        assert fixed.partitions["fw0"].state is RunState.FAILED
        # A stopped partition is not expected to run; its claim on vfio-pci is in place.
        st2 = State().with_partition(record("fw0", pid=proc.pid, state=RunState.STOPPED))
        r2 = reconcile(st2, root)
        fixed2, notes2 = r2.state, r2.findings
        assert fixed2 == st2
        assert notes2 == []
    finally:
        proc.kill()
        proc.wait()
