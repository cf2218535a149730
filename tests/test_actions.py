"""diff (what apply would do against the record) and execute (in order, saved after each, unwound on failure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from partitioner.cpuset import CpuSet
from partitioner.engine.context import ApplyContext
from partitioner.engine.devices import ClaimGroup, ReleaseGroup
from partitioner.engine.diff import diff, held_replacements, teardown
from partitioner.engine.executor import execute
from partitioner.engine.guests import Forget, Start, Stop
from partitioner.engine.hugepages import ReleaseHugepages, ReserveHugepages
from partitioner.engine.step import Action, Replace
from partitioner.errors import ApplyFailed, DeviceError, RollbackIncomplete
from partitioner.inventory.model import Cpu, Host, HugepagePool, IommuGroup, NumaNode, PciFunction
from partitioner.kernel.root import HostRoot
from partitioner.manifest.model import PartitionSpec
from partitioner.pci import PciAddress
from partitioner.planning.model import DeviceAssignment, Placement, Plan
from partitioner.record.codec import claim_from_json
from partitioner.record.model import HugepageGrant, PartitionRecord, RunState, State
from partitioner.record.store import StateStore
from partitioner.units import MiB

NIC = PciAddress.parse("0000:81:00.0")


def make_host(free_2m: int = 0) -> Host:
    cpus = {
        i: Cpu(i, True, True, 0, 0, i, 0, CpuSet([i])) for i in range(4)
    }  # 4 single-thread cores
    node = NumaNode(
        0,
        CpuSet(range(4)),
        8192 * MiB,
        6000 * MiB,
        (10,),
        {2 * MiB: HugepagePool(2 * MiB, free_2m, free_2m)},
    )
    nic = PciFunction(
        NIC,
        "8086",
        "10d3",
        "020000",
        "8086",
        "0000",
        "e1000e",
        None,
        19,
        0,
        ("flr",),
        False,
        False,
        (),
        ("eth1",),
    )
    return Host(
        cpus=cpus,
        nodes={0: node},
        pci={NIC: nic},
        iommu_groups={19: IommuGroup(19, (NIC,))},
        in_use={},
        netdevs={},
        has_kvm=True,
        has_iommu=True,
        hugepage_sizes=(2 * MiB,),
    )


def make_placement(
    name: str,
    cpus: tuple[int, ...],
    *,
    order: int = 0,
    mem_mib: int = 128,
    pages: bool = True,
    nic: bool = False,
) -> Placement:
    spec = PartitionSpec(
        name=name,
        cpu_count=len(cpus),
        cpu_list=None,
        memory_bytes=mem_mib * MiB,
        hugepage_bytes=2 * MiB if pages else None,
        numa="auto",
        order=order,
    )
    devs = (DeviceAssignment(NIC, 19, "8086:10d3", "e1000e", False, "named"),) if nic else ()
    return Placement(
        name=name,
        cpus=cpus,
        sockets=1,
        cores=len(cpus),
        threads=1,
        numa_nodes=(0,),
        memory_per_node=((0, mem_mib * MiB),),
        hugepage_bytes=2 * MiB if pages else None,
        devices=devs,
        spec=spec,
    )


def make_plan(*placements: Placement, confine: bool = False) -> Plan:
    """A plan of ``placements``; unconfined unless asked, so the order of the other steps
    is what a test sees (test_a_confined_partition_takes_a_user_before_it_starts)."""
    return Plan(
        accel="tcg",
        smt="isolate",
        host_cpus=CpuSet([0]),
        host_memory_bytes=1024 * MiB,
        placements={p.name: p for p in sorted(placements, key=lambda p: p.name)},
        confine=confine,
    )


def running(p: Placement, **kw: Any) -> PartitionRecord:
    rec = PartitionRecord(name=p.name, state=RunState.RUNNING, placement=p, pid=1000)
    return PartitionRecord(**{**rec.__dict__, **kw})


def state_of(*recs: PartitionRecord) -> State:
    st = State()
    for r in recs:
        st = st.with_partition(r)
    return st


def kinds(actions: list[Action]) -> list[tuple[str, str]]:
    return [(a.kind, a.target) for a in actions]


# -- diff -------------------------------------------------------------------------------


def test_fresh_site_reserves_claims_and_starts_in_start_order() -> None:
    a = make_placement("a", (1,), order=2, nic=True)
    b = make_placement("b", (2,), order=1, pages=False)
    acts = diff(make_plan(a, b), State(), make_host(free_2m=0), replace=set())
    assert kinds(acts) == [
        ("start", "b"),
        ("reserve-hugepages", "a"),
        ("claim-group", "a"),
        ("start", "a"),
    ]
    reserve = acts[1]
    assert isinstance(reserve, ReserveHugepages)
    assert (reserve.node, reserve.size_bytes, reserve.pages) == (0, 2 * MiB, 64)
    assert acts[2].to_json() == {
        "action": "claim-group",
        "target": "a",
        "detail": "IOMMU group 19: 0000:81:00.0 (e1000e -> vfio-pci)",
    }


def test_hugepage_shortfall_counts_earlier_partitions_of_the_same_apply() -> None:
    a = make_placement("a", (1,), order=1)  # 64 pages
    b = make_placement("b", (2,), order=2)  # 64 more
    acts = diff(make_plan(a, b), State(), make_host(free_2m=100), replace=set())
    # 100 free pages cover a; b's 64 would leave the pool 28 short.
    assert kinds(acts) == [("start", "a"), ("reserve-hugepages", "b"), ("start", "b")]


def test_adding_a_partition_does_not_touch_running_ones() -> None:
    a = make_placement("a", (1,), nic=True)
    b = make_placement("b", (2,))
    st = state_of(running(a, claims=(claim_from_json({"group": 19, "functions": []}),)))
    acts = diff(make_plan(a, b), st, make_host(free_2m=500), replace=set())
    assert kinds(acts) == [("start", "b")]
    assert all(x.target == "b" for x in acts)


def test_nothing_changed_is_no_action() -> None:
    a = make_placement("a", (1,))
    assert diff(make_plan(a), state_of(running(a)), make_host(), replace=set()) == []


def test_changed_running_partition_is_held_unless_replace_is_asked() -> None:
    old = make_placement("a", (1,))
    new = make_placement("a", (1,), mem_mib=256)
    st = state_of(running(old, hugepages=(HugepageGrant(0, 2 * MiB, 64),)))
    plan = make_plan(new)
    assert diff(plan, st, make_host(), replace=set()) == []
    held = held_replacements(plan, st, replace=set())
    assert list(held) == ["a"]
    # what changed, then why it cannot be done live (rule 11), asking for --replace
    assert held["a"].startswith("memory 128MiB -> 256MiB; "), held
    assert held["a"].endswith("needs --replace a"), held

    acts = diff(plan, st, make_host(free_2m=0), replace={"a"})
    assert held_replacements(plan, st, replace={"a"}) == {}
    assert kinds(acts) == [("replace", "a")]
    rep = acts[0]
    assert isinstance(rep, Replace)
    assert kinds(list(rep.steps)) == [
        ("stop", "a"),
        ("release-hugepages", "a"),
        ("forget", "a"),
        ("reserve-hugepages", "a"),
        ("start", "a"),
    ]
    assert rep.to_json()["steps"][0] == {
        "action": "stop",
        "target": "a",
        "detail": rep.steps[0].detail,
    }


def test_stopped_partition_with_a_new_placement_is_rebuilt_without_asking() -> None:
    old = make_placement("a", (1,), pages=False)
    new = make_placement("a", (2,), pages=False)
    st = state_of(running(old, state=RunState.STOPPED, pid=None))
    acts = diff(make_plan(new), st, make_host(), replace=set())
    assert kinds(acts) == [("forget", "a"), ("start", "a")]


def test_failed_partition_in_the_plan_is_restarted() -> None:
    a = make_placement("a", (1,))
    st = state_of(running(a, state=RunState.FAILED))
    # Its dead QEMU's 64 pages are free in the pool again: it just starts.
    assert kinds(diff(make_plan(a), st, make_host(free_2m=64), replace=set())) == [("start", "a")]
    # Someone took them meanwhile (or a killed apply never raised the pool): reserve first.
    assert kinds(diff(make_plan(a), st, make_host(free_2m=10), replace=set())) == [
        ("reserve-hugepages", "a"),
        ("start", "a"),
    ]


def test_stopped_partition_missing_a_claim_gets_it_before_starting() -> None:
    a = make_placement("a", (1,), nic=True)
    claim = {"group": 19, "functions": [{"address": str(NIC), "driver": "e1000e"}]}
    held = state_of(running(a, state=RunState.STOPPED, claims=(claim_from_json(claim),)))
    host = make_host(free_2m=64)
    assert kinds(diff(make_plan(a), held, host, replace=set())) == [("start", "a")]
    lost = state_of(running(a, state=RunState.STOPPED))
    assert kinds(diff(make_plan(a), lost, host, replace=set())) == [
        ("claim-group", "a"),
        ("start", "a"),
    ]


def test_removal_stops_in_reverse_start_order_then_gives_back() -> None:
    a = make_placement("a", (1,), order=1, nic=True)
    b = make_placement("b", (2,), order=2)
    c = make_placement("c", (3,), order=3, pages=False)
    claim = {"group": 19, "functions": [{"address": str(NIC), "driver": "e1000e"}]}
    st = state_of(
        running(a, claims=(claim_from_json(claim),), hugepages=(HugepageGrant(0, 2 * MiB, 64),)),
        running(b, hugepages=(HugepageGrant(0, 2 * MiB, 64),)),
        running(c, state=RunState.FAILED),
    )
    acts = diff(make_plan(), st, make_host(), replace=set())
    assert kinds(acts) == [
        ("stop", "b"),  # c's QEMU is gone already: nothing to stop
        ("stop", "a"),
        ("forget", "c"),
        ("release-hugepages", "b"),
        ("forget", "b"),
        ("release-group", "a"),
        ("release-hugepages", "a"),
        ("forget", "a"),
    ]
    rg = acts[5]
    assert isinstance(rg, ReleaseGroup)
    assert rg.detail == "IOMMU group 19: 0000:81:00.0 (vfio-pci -> e1000e)"
    assert teardown(st.partitions.values()) == acts


# -- execute ------------------------------------------------------------------------------


@dataclass
class Ctx(ApplyContext):
    """The engine's own context, with a log of the steps' calls."""

    log: list[str] = field(default_factory=list)


def ctx_of(state: State) -> Ctx:
    nowhere = Path("/nonexistent")
    return Ctx(
        root=HostRoot(nowhere), plan=make_plan(), state=state, run_dir=nowhere, log_dir=nowhere
    )


@dataclass(frozen=True)
class Fake:
    """An action that records a partition in the state, as the real ones do, and logs its calls."""

    target: str
    store: StateStore
    fail_do: bool = False
    fail_undo: bool = False
    already: bool = False
    error: type[BaseException] = DeviceError
    check_saved: bool = True
    kind: str = "fake"
    detail: str = "a fake step"

    def do(self, ctx: Ctx) -> None:
        # Everything done before this step is on disk already.
        if self.check_saved:
            assert set(self.store.load().partitions) == set(ctx.state.partitions)
        ctx.log.append(f"do {self.target}")
        if self.fail_do:
            raise self.error("the kernel said no")
        ctx.state = ctx.state.with_partition(
            PartitionRecord(self.target, RunState.RUNNING, make_placement(self.target, (1,)))
        )

    def undo(self, ctx: Ctx) -> None:
        ctx.log.append(f"undo {self.target}")
        if self.fail_undo:
            raise DeviceError("still busy", address=str(NIC))
        ctx.state = ctx.state.without_partition(self.target)

    def check(self, ctx: Ctx) -> bool:
        return self.already

    def to_json(self) -> dict[str, Any]:
        return {"action": self.kind, "target": self.target, "detail": self.detail}


def _store(tmp_path: Path) -> tuple[StateStore, State, bytes]:
    store = StateStore(tmp_path)
    initial = state_of(running(make_placement("old", (3,))))
    store.save(initial)
    return store, initial, store.path.read_bytes()


def test_execute_runs_in_order_and_saves_after_each(tmp_path: Path) -> None:
    store, _, _ = _store(tmp_path)
    ctx = ctx_of(store.load())
    execute([Fake("a", store), Fake("b", store), Fake("c", store)], ctx, store)
    assert ctx.log == ["do a", "do b", "do c"]
    assert set(store.load().partitions) == {"old", "a", "b", "c"}


def test_failure_undoes_newest_first_and_restores_the_record(tmp_path: Path) -> None:
    store, _, before = _store(tmp_path)
    ctx = ctx_of(store.load())
    acts = [Fake("a", store), Fake("b", store), Fake("c", store, fail_do=True)]
    with pytest.raises(ApplyFailed) as ei:
        execute(acts, ctx, store)
    assert type(ei.value) is ApplyFailed
    assert ei.value.exit_code == 4
    assert isinstance(ei.value.cause, DeviceError)
    assert "fake c failed: the kernel said no" in str(ei.value)
    assert ctx.log == ["do a", "do b", "do c", "undo b", "undo a"]
    assert store.path.read_bytes() == before


def test_rollback_puts_back_the_record_it_was_told_to(tmp_path: Path) -> None:
    store, initial, before = _store(tmp_path)
    # apply adds the new site's line to the record before its first step...
    ctx = ctx_of(state_of(*initial.partitions.values(), running(make_placement("new", (2,)))))
    with pytest.raises(ApplyFailed):
        execute(
            [Fake("a", store, check_saved=False), Fake("b", store, fail_do=True)],
            ctx,
            store,
            restore=initial,
        )
    # ...and a rolled-back apply leaves the file exactly as it found it.
    assert store.path.read_bytes() == before
    assert ctx.state == initial


def test_first_action_failing_changes_nothing(tmp_path: Path) -> None:
    store, _, before = _store(tmp_path)
    ctx = ctx_of(store.load())
    with pytest.raises(ApplyFailed, match="nothing had been changed"):
        execute([Fake("a", store, fail_do=True), Fake("b", store)], ctx, store)
    assert ctx.log == ["do a"]
    assert store.path.read_bytes() == before


def test_failed_undo_is_rollback_incomplete_listing_what_is_left(tmp_path: Path) -> None:
    store, _, _ = _store(tmp_path)
    ctx = ctx_of(store.load())
    acts = [
        Fake("a", store),
        Fake("b", store, fail_undo=True),
        Fake("c", store),
        Fake("d", store, fail_do=True),
    ]
    with pytest.raises(RollbackIncomplete) as ei:
        execute(acts, ctx, store)
    assert ei.value.exit_code == 5
    # The other undos still ran, newest first.
    assert ctx.log == ["do a", "do b", "do c", "do d", "undo c", "undo b", "undo a"]
    assert len(ei.value.leftover) == 1
    assert "fake b" in ei.value.leftover[0] and "still busy" in ei.value.leftover[0]
    # The record says what is left: b, which could not be undone.
    assert set(store.load().partitions) == {"old", "b"}


def test_already_done_actions_are_skipped_and_not_undone(tmp_path: Path) -> None:
    store, _, _ = _store(tmp_path)
    ctx = ctx_of(store.load())
    acts = [Fake("a", store, already=True), Fake("b", store), Fake("c", store, fail_do=True)]
    with pytest.raises(ApplyFailed):
        execute(acts, ctx, store)
    assert ctx.log == ["do b", "do c", "undo b"]


def test_a_bug_is_unwound_and_then_reported_as_itself(tmp_path: Path) -> None:
    store, _, before = _store(tmp_path)
    ctx = ctx_of(store.load())
    with pytest.raises(ZeroDivisionError):
        execute(
            [Fake("a", store), Fake("b", store, fail_do=True, error=ZeroDivisionError)], ctx, store
        )
    assert ctx.log == ["do a", "do b", "undo a"]
    assert store.path.read_bytes() == before


def test_replace_runs_as_its_steps_saved_after_each_and_unwound(tmp_path: Path) -> None:
    store, _, before = _store(tmp_path)
    ctx = ctx_of(store.load())
    rep = Replace(
        "a", (Fake("x", store), Fake("y", store), Fake("z", store, fail_do=True)), "changed"
    )
    with pytest.raises(ApplyFailed):
        execute([Fake("w", store), rep], ctx, store)
    assert ctx.log == ["do w", "do x", "do y", "do z", "undo y", "undo x", "undo w"]
    assert store.path.read_bytes() == before


def test_real_actions_describe_themselves_for_the_plan_json() -> None:
    p = make_placement("a", (1,))
    for a in (
        ReserveHugepages("a", 0, 2 * MiB, 64),
        ReleaseHugepages("a", 0, 2 * MiB, 64),
        ClaimGroup("a", 19, ((str(NIC), "e1000e"),)),
        Start("a", "QEMU"),
        Stop("a"),
        Forget("a", running(p)),
    ):
        assert isinstance(a, Action)
        j = a.to_json()
        assert set(j) == {"action", "target", "detail"}
        assert j["target"] == "a" and j["detail"]
    assert ReserveHugepages("a", 1, 2 * MiB, 64).detail == "64 x 2MiB pages on node 1"


def test_forget_undo_puts_back_a_record_holding_nothing(tmp_path: Path) -> None:
    p = make_placement("a", (1,))
    rec = running(p, hugepages=(HugepageGrant(0, 2 * MiB, 64),))
    ctx = ApplyContext(HostRoot(tmp_path), make_plan(), state_of(rec), tmp_path, tmp_path)
    f = Forget("a", rec)
    assert not f.check(ctx)
    f.do(ctx)
    assert "a" not in ctx.state.partitions and f.check(ctx)
    f.undo(ctx)
    back = ctx.state.partitions["a"]
    assert back.state is RunState.STOPPED and back.hugepages == () and back.placement == p


def test_a_confined_partition_takes_a_user_before_it_starts_and_gives_it_back_last() -> None:
    a = make_placement("a", (1,), nic=True)
    acts = diff(make_plan(a, confine=True), state_of(), make_host(free_2m=500), replace=set())
    got = kinds(acts)
    assert ("take-user", "a") in got
    assert got.index(("take-user", "a")) < got.index(("start", "a"))
    unconfined = kinds(diff(make_plan(a), state_of(), make_host(free_2m=500), replace=set()))
    assert ("take-user", "a") not in unconfined
    held = state_of(running(a, uid=1879048192))
    down = kinds(diff(make_plan(confine=True), held, make_host(), replace=set()))
    assert down[-1] == ("forget", "a")
    assert down.index(("give-back-user", "a")) > down.index(("stop", "a"))
