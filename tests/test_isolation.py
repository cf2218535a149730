"""Isolation's planning and runtime moves, against trees: the snapshot of the emulated server
for the layout, and a fake scheduler and interrupt core (``fakesched``) for the moves."""

from __future__ import annotations

import errno
import json
import textwrap
from pathlib import Path

import pytest
from fakesched import DEFAULT, MASKS, NIC, WQ, Killed, SchedKernel, small_host
from treebuilder import TreeBuilder

from partitioner.cpuset import CpuSet
from partitioner.engine.isolation import IsolateHost, ReleaseHost, apply_actions, destroy_actions
from partitioner.inventory import scan
from partitioner.isolation.layout import (
    Layout,
    PartitionCpus,
    layout_of,
    reserve_and_partition_cpus,
)
from partitioner.isolation.moves import plan_moves
from partitioner.isolation.runtime import (
    isolate,
    load_record,
    record_path,
    restore,
    steer_device_irqs,
)
from partitioner.isolation.view import read_host_work
from partitioner.kernel.root import HostRoot
from partitioner.manifest.loader import loads
from partitioner.planning.planner import plan
from partitioner.record.model import HugepageGrant, PartitionRecord, RunState, State

TESTBED_NUMA = Path(__file__).resolve().parent / "fixtures" / "hosts" / "testbed-numa"


def test_the_layout_of_a_plan_on_the_emulated_server() -> None:
    m = loads(
        textwrap.dedent(f"""\
            version: 1
            host: {{reserve: {{cpus: "0,4"}}, accel: tcg, smt: share}}
            partitions:
              fw0: {{cpus: 2, memory: 128MiB, devices: [{{pci: "{NIC}"}}]}}
              web: {{cpus: "2-3", memory: 128MiB}}
            """),
        file="site.yaml",
    )
    p = plan(m, scan(HostRoot(TESTBED_NUMA)))
    lay = layout_of(p)
    assert lay.reserve == CpuSet([0, 4])
    assert lay.partitions["fw0"].cpus == p.placements["fw0"].cpuset
    assert NIC in lay.partitions["fw0"].devices
    assert lay.partitions["web"].cpus == CpuSet([2, 3]) and lay.partitions["web"].devices == ()
    assert lay.owner_of_device(NIC) is lay.partitions["fw0"]
    reserve, fenced = reserve_and_partition_cpus(p)
    assert reserve == CpuSet([0, 4])
    assert fenced == CpuSet([2, 3]) | p.placements["fw0"].cpuset
    assert reserve.isdisjoint(fenced)


# -- a small host: CPUs 0-3, the reserve 0, partition fw0 on 2-3 with a NIC -----------

LAYOUT = Layout(
    reserve=CpuSet([0]),
    partitions={"fw0": PartitionCpus("fw0", CpuSet([2, 3]), (2, 3), (NIC,))},
)


@pytest.fixture
def k(tmp_path: Path) -> SchedKernel:
    return small_host(tmp_path / "host")


GUESTS = {500: "fw0"}


def _allowed(k: SchedKernel, pid: int, tid: int | None = None) -> CpuSet:
    text = k.read(f"/proc/{pid}/task/{tid or pid}/status") or ""
    return CpuSet.parse(text.split("Cpus_allowed_list:")[1].split()[0])


def _snapshot(k: SchedKernel) -> dict[str, str]:
    out = {}
    for p in sorted(Path(k.root).rglob("*")):
        if p.is_file() and "isolation" not in p.name:
            out[str(p.relative_to(k.root))] = p.read_text()
    return out


def test_moves_take_every_movable_thing_off_the_partition_cpus(k: SchedKernel) -> None:
    mv = plan_moves(LAYOUT, read_host_work(k), GUESTS)
    tasks = {t.tid: t.new for t in mv.tasks}
    # Whatever may run on 2-3 goes to the reserve; a task already only on the reserve stays.
    assert tasks == {
        1: CpuSet([0]),
        2: CpuSet([0]),
        30: CpuSet([0]),
        100: CpuSet([0]),
        101: CpuSet([0]),
        300: CpuSet([0]),
        400: CpuSet([0]),
    }
    assert [t.tid for t in mv.pinned_by_kernel] == [20]  # ksoftirqd/2: only boot can help
    irqs = {i.irq: i.new for i in mv.irqs}
    assert irqs[40] == CpuSet([2, 3])  # the partition's own NIC: onto its CPUs
    assert irqs[41] == CpuSet([0]) and irqs[25] == CpuSet([0]) and irqs[24] == CpuSet([0])
    assert 26 not in irqs  # already on the reserve
    assert {m.path: m.new for m in mv.masks} == {WQ: CpuSet([0]), DEFAULT: CpuSet([0])}
    # The partition's QEMU is not host work: its threads are placed already.
    assert not {500, 501, 502} & set(tasks)


def test_isolate_records_first_moves_and_restore_puts_everything_back(
    k: SchedKernel, tmp_path: Path
) -> None:
    before = _snapshot(k)
    doc = isolate(k, LAYOUT, GUESTS, tmp_path / "state")
    for tid, pid in ((1, 1), (2, 2), (30, 30), (100, 100), (101, 100), (300, 300), (400, 400)):
        assert _allowed(k, pid, tid) == CpuSet([0]), tid
    assert _allowed(k, 200) == CpuSet([0]) and _allowed(k, 20) == CpuSet([2])
    assert _allowed(k, 500, 501) == CpuSet([2])  # the vCPU is left alone
    assert k.read("/proc/irq/40/smp_affinity_list") == "2-3"
    assert k.read("/proc/irq/41/smp_affinity_list") == "0"
    assert k.read(WQ) == "1" and k.read(DEFAULT) == "1"
    # What the kernel refused is recorded, not an error.
    refused = {(r["kind"], r["id"]): r["errno"] for r in doc["refused"]}
    assert refused == {("irq", 0): "EIO", ("irq", 50): "EIO"}
    assert (
        plan_moves(LAYOUT, read_host_work(k), GUESTS, refused_irqs=frozenset({0, 50})).count() == 0
    )
    on_disk = json.loads(record_path(tmp_path / "state").read_text())
    assert on_disk["tasks"]["300:100"]["old"] == "3"
    assert on_disk["masks"][WQ] == "0-3"

    assert restore(k, tmp_path / "state") == []
    assert _snapshot(k) == before
    assert load_record(tmp_path / "state") is None


@pytest.mark.parametrize("killed_after", [0, 1, 3, 7, 12])
def test_a_killed_isolate_is_finished_by_the_next_and_undone_by_destroy(
    k: SchedKernel, tmp_path: Path, killed_after: int
) -> None:
    before = _snapshot(k)
    state = tmp_path / "state"
    k.die_after(killed_after)
    with pytest.raises(Killed):
        isolate(k, LAYOUT, GUESTS, state)
    # The record names every original before the first write: destroy alone puts all back.
    assert load_record(state) is not None
    restore(k, state)
    assert _snapshot(k) == before

    k.die_after(killed_after)
    with pytest.raises(Killed):
        isolate(k, LAYOUT, GUESTS, state)
    isolate(k, LAYOUT, GUESTS, state)  # the next apply finishes the job
    assert (
        plan_moves(LAYOUT, read_host_work(k), GUESTS, refused_irqs=frozenset({0, 50})).count() == 0
    )
    k.die_after(3)
    with pytest.raises(Killed):
        restore(k, state)  # a destroy killed midway ...
    restore(k, state)  # ... is finished by the next
    assert _snapshot(k) == before


def test_a_task_that_ended_is_not_restored_onto_a_new_one_with_its_number(
    k: SchedKernel, tmp_path: Path
) -> None:
    isolate(k, LAYOUT, GUESTS, tmp_path)
    k.task(300, "someone-else", "0", starttime=999)  # pid 300 reused after the original ended
    restore(k, tmp_path)
    assert _allowed(k, 300) == CpuSet([0])
    assert _allowed(k, 1) == CpuSet([0, 1, 2, 3])


def test_a_task_the_kernel_refuses_is_recorded_and_left(k: SchedKernel, tmp_path: Path) -> None:
    k.refuse("task", 400, errno.EPERM)
    doc = isolate(k, LAYOUT, GUESTS, tmp_path)
    assert {"kind": "task", "id": 400, "name": "half", "errno": "EPERM"} in doc["refused"]
    assert "400:100" not in doc["tasks"]
    assert _allowed(k, 400) == CpuSet([1, 2])


def test_the_partitions_vectors_asked_for_after_apply_are_steered_and_only_they(
    k: SchedKernel, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    assert steer_device_irqs(k, state) == []  # not isolated: nothing to keep
    isolate(k, LAYOUT, GUESTS, state)
    # The guest's driver enables MSI-X: a new vector, on default_smp_affinity (the reserve).
    k.irq(60, "0", f"vfio-msix[1]({NIC})")
    k.irq(61, "0", "vfio-msix[1](0000:42:00.0)")  # another device's: the host's, left
    k.write("/proc/irq/24/smp_affinity_list", "2")  # host work drifted back: audit's, not ours
    k.write("/proc/irq/40/smp_affinity_list", "0")  # the NIC's first vector moved away
    got = [(name, m.irq, str(m.old), str(m.new)) for name, m in steer_device_irqs(k, state)]
    assert got == [("fw0", 40, "0", "2-3"), ("fw0", 60, "0", "2-3")]
    assert k.read("/proc/irq/60/smp_affinity_list") == "2-3"
    assert k.read("/proc/irq/40/smp_affinity_list") == "2-3"
    assert k.read("/proc/irq/61/smp_affinity_list") == "0"
    assert k.read("/proc/irq/24/smp_affinity_list") == "2"
    assert steer_device_irqs(k, state) == []  # in place: nothing written again
    # Recorded first, with what it replaced; the first vector keeps its original from apply.
    doc = load_record(state)
    assert doc is not None
    assert doc["irqs"]["60"]["old"] == "0" and doc["irqs"]["40"]["old"] == "0-3"
    restore(k, state)
    assert k.read("/proc/irq/60/smp_affinity_list") == "0"
    assert k.read("/proc/irq/40/smp_affinity_list") == "0-3"


def test_the_supervisor_steers_on_each_look_and_says_so(k: SchedKernel, tmp_path: Path) -> None:
    from partitioner.boot.supervisor import Supervisor
    from partitioner.record.store import StateStore

    state = tmp_path / "state"
    isolate(k, LAYOUT, GUESTS, state)
    sup = Supervisor(k, StateStore(state), restart=lambda store, st, name: st)
    assert sup.step() == []
    k.irq(60, "0", f"vfio-msi[0]({NIC})")
    [e] = sup.step()
    assert (e.partition, e.kind) == ("fw0", "steered") and "interrupt 60" in e.detail
    assert k.read("/proc/irq/60/smp_affinity_list") == "2-3"
    # A pinned host's record (or none) is not acted on.
    doc = load_record(state)
    assert doc is not None
    doc["mode"] = "pinned"
    record_path(state).write_text(json.dumps(doc))
    k.irq(62, "0", f"vfio-msi[1]({NIC})")
    assert sup.step() == []
    assert k.read("/proc/irq/62/smp_affinity_list") == "0"


def test_apply_and_destroy_choose_isolation_by_the_sites_mode(tmp_path: Path) -> None:
    m = loads(
        'version: 1\nhost: {reserve: {cpus: "0,4"}, accel: tcg, smt: share, isolation: pinned}\n'
        "partitions:\n  a: {cpus: 2, memory: 128MiB}\n",
        file="site.yaml",
    )
    p = plan(m, scan(HostRoot(TESTBED_NUMA)))
    root = HostRoot(TESTBED_NUMA)
    assert apply_actions("pinned", p, State(), tmp_path, root) == []
    [act] = apply_actions("full", p, State(), tmp_path, root)
    assert isinstance(act, IsolateHost) and act.layout == layout_of(p)
    # Once isolated, a pinned (or empty) site puts the host back, and so does destroying the last.
    (tmp_path / "isolation.json").write_text(
        json.dumps(
            {
                "version": 1,
                "layout": layout_of(p).to_json(),
                "tasks": {},
                "irqs": {},
                "masks": {},
                "refused": [],
            }
        )
    )
    [rel] = apply_actions("pinned", p, State(), tmp_path, root)
    assert isinstance(rel, ReleaseHost) and rel.layout == layout_of(p)
    from partitioner.engine.diff import teardown

    state = State().with_partition(
        PartitionRecord(
            "a",
            RunState.RUNNING,
            p.placements["a"],
            pid=1,
            hugepages=(HugepageGrant(0, 2 << 20, 1),),
        )
    )
    down = teardown(state.partitions.values())
    got = [a.kind for a in destroy_actions(down, state, {"a"}, tmp_path)]
    # The host is put back as soon as the guests are stopped, before devices and pages go back.
    assert got == ["stop", "release-host", "release-hugepages", "forget"]
    two = state.with_partition(PartitionRecord("b", RunState.RUNNING, p.placements["a"], pid=2))
    assert destroy_actions(down, two, {"a"}, tmp_path) == down  # b still runs: CPUs stay fenced


def test_host_boot_isolates_as_apply_does_and_starts_only_autostart(tmp_path: Path) -> None:
    from partitioner.engine.prepare import prepare
    from partitioner.record.store import StateStore

    site = tmp_path / "site.yaml"
    site.write_text(
        'version: 1\nhost: {reserve: {cpus: "0,4"}, accel: tcg, smt: share}\n'
        "partitions:\n  a: {cpus: 2, memory: 128MiB}\n"
        "  spare: {cpus: 2, memory: 128MiB, autostart: false}\n"
    )
    store = StateStore(tmp_path / "state")
    applied = prepare(site, HostRoot(TESTBED_NUMA), store)
    booted = prepare(site, HostRoot(TESTBED_NUMA), store, boot=True)
    assert set(booted.plan.placements) == {"a"}
    assert [(a.kind, a.target) for a in booted.actions if a.kind == "start"] == [("start", "a")]
    # The same isolation as apply's, over the whole site: spare's CPUs fenced for later.
    [iso] = [a for a in booted.actions if isinstance(a, IsolateHost)]
    [iso_applied] = [a for a in applied.actions if isinstance(a, IsolateHost)]
    assert iso.layout == iso_applied.layout
    both = booted.plan.placements["a"].cpuset | applied.plan.placements["spare"].cpuset
    assert both.issubset(iso.layout.partition_cpus)


def test_masks_are_hex_as_the_kernel_prints_them() -> None:
    from partitioner.isolation.view import format_mask

    assert format_mask(CpuSet([0, 1])) == "3"
    assert format_mask(CpuSet([0, 35])) == "8,00000001"
    assert CpuSet.from_mask(format_mask(CpuSet([3, 40, 64]))) == CpuSet([3, 40, 64])
    assert MASKS


def test_systemd_is_told_by_its_own_interface_and_only_when_it_is_pid_1(tmp_path: Path) -> None:
    from partitioner.isolation.systemd import UNITS, has_systemd, set_property_argv, show_argv

    t = TreeBuilder(tmp_path / "t")
    root = HostRoot(t.build())
    assert not has_systemd(root)
    root.path("/proc/1").mkdir(parents=True, exist_ok=True)
    root.path("/proc/1/comm").write_text("init\n")
    root.path("/run/systemd/system").mkdir(parents=True)
    assert not has_systemd(root)  # the directory alone: systemd is not PID 1
    root.path("/proc/1/comm").write_text("systemd\n")
    assert has_systemd(root)
    assert set(UNITS) == {"init.scope", "system.slice", "user.slice"}
    # At run time only (gone at reboot), and put back to the value recorded ("" = every CPU).
    assert set_property_argv("system.slice", "0,4") == [
        "systemctl",
        "set-property",
        "--runtime",
        "system.slice",
        "AllowedCPUs=0,4",
    ]
    assert set_property_argv("user.slice", "") == [
        "systemctl",
        "set-property",
        "--runtime",
        "user.slice",
        "AllowedCPUs=",
    ]
    assert show_argv("init.scope") == [
        "systemctl",
        "show",
        "--property=AllowedCPUs",
        "--value",
        "init.scope",
    ]
