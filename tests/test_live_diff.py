"""Live changes (rule 11) in the apply engine's list: which steps a running partition changed
within its bounds gets, in which order, each from one placement to the next; a change that
is not live is held for ``--replace``; a live change cut short is settled by what the guest
has (``record.reconcile.seen_placement``), and its intent survives the record's JSON.

Hosts are TreeBuilder trees read by the real inventory, manifests go through the real
loader, and the running partitions come from a state record, as ``apply`` sees them.
"""

from __future__ import annotations

import json

from test_dynamic_plan import db
from test_planner import HEAD, host_of, manifest, two_node_smt, with_nics
from treebuilder import GiB, MiB, TreeBuilder

from partitioner.engine.diff import diff, held_replacements
from partitioner.engine.live import (
    AddCpus,
    AttachDevice,
    DetachDevice,
    GrowMemory,
    LiveStep,
    RemoveCpus,
    ShrinkMemory,
)
from partitioner.guest.live import MemoryDevice
from partitioner.guest.view import GuestView
from partitioner.inventory.model import Host
from partitioner.planning.model import Plan
from partitioner.planning.planner import plan
from partitioner.record.codec import state_from_json, state_to_json
from partitioner.record.model import (
    LiveIntent,
    PartitionRecord,
    RunState,
    State,
    running_partitions,
)
from partitioner.record.reconcile import seen_placement


def applied(p: Plan) -> State:
    """The record ``apply`` leaves for ``p``: every partition running, through the JSON."""
    state = State(
        partitions={
            n: PartitionRecord(n, RunState.RUNNING, pl, pid=4242 + i)
            for i, (n, pl) in enumerate(sorted(p.placements.items()))
        }
    )
    return state_from_json(json.loads(json.dumps(state_to_json(state))))


def replan(text: str, h: Host, state: State) -> Plan:
    return plan(manifest(text), h, running_partitions(state))


def kinds(steps: list[object]) -> list[str]:
    return [f"{s.kind} {s.target}" for s in steps]  # type: ignore[attr-defined]


def test_growth_is_one_add_cpus_step_ending_at_the_plan(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    first = plan(manifest(HEAD + db(extra=", numa: 1")), h)
    state = applied(first)
    second = replan(HEAD + db(cpus=4, extra=", numa: 1"), h, state)
    steps = diff(second, state, h, replace=set())
    assert kinds(steps) == ["add-cpus db"]
    step = steps[0]
    assert isinstance(step, AddCpus)
    assert step.before == state.partitions["db"].placement
    assert step.after == second.placements["db"]
    assert step.added == ((2, 5), (3, 13))
    assert str(step) == "add-cpus db 2 -> 4 (CPUs 5,13, pinned)"
    assert held_replacements(second, state, replace=set()) == {}
    # with --replace the operator asks for a restart instead, and gets one
    steps = diff(second, state, h, replace={"db"})
    assert kinds(steps) == ["replace db"]


def test_give_backs_of_every_partition_come_before_any_take(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    other = "  x: {cpus: 2, min_cpus: 2, max_cpus: 6, memory: 1GiB, numa: 1}\n"
    first = plan(manifest(HEAD + db(cpus=6, extra=", numa: 1") + other), h)
    state = applied(first)
    # db shrinks to 2, x grows to 6: x takes CPUs db gives back in the same apply
    bigger = other.replace("cpus: 2, min", "cpus: 6, min")
    second = replan(HEAD + db(cpus=2, extra=", numa: 1") + bigger, h, state)
    freed = set(first.placements["db"].cpus) - set(second.placements["db"].cpus)
    assert freed & set(second.placements["x"].cpus)
    steps = diff(second, state, h, replace=set())
    assert kinds(steps) == ["remove-cpus db", "add-cpus x"]
    rm = steps[0]
    assert isinstance(rm, RemoveCpus)
    assert [i for i, _ in rm.removed] == [2, 3, 4, 5]  # the highest vCPUs go
    assert rm.after == second.placements["db"]


def test_memory_grows_after_its_pages_and_shrinks_before_giving_them_back(
    tree: TreeBuilder,
) -> None:
    h = host_of(two_node_smt(tree))
    text = HEAD + db(memory="2GiB", extra=", numa: 1")
    first = plan(manifest(text), h)
    state = applied(first)
    grown = replan(HEAD + db(memory="3GiB", extra=", numa: 1"), h, state)
    steps = diff(grown, state, h, replace=set())
    assert kinds(steps) == ["reserve-hugepages db", "grow-memory db"]
    grow = steps[1]
    assert isinstance(grow, GrowMemory)
    assert (grow.node, grow.after.memory_bytes) == (1, 3 * GiB)
    assert str(grow) == "grow-memory db 2GiB -> 3GiB (node 1, 512 x 2MiB pages)"
    assert steps[0].detail == "512 x 2MiB pages on node 1"
    shrunk = replan(HEAD + db(memory="1GiB", extra=", numa: 1"), h, state)
    steps = diff(shrunk, state, h, replace=set())
    assert kinds(steps) == ["shrink-memory db", "release-hugepages db"]
    assert isinstance(steps[0], ShrinkMemory)
    assert steps[0].after.memory_bytes == GiB


def test_a_device_is_claimed_before_it_is_attached_and_released_after_detach(
    tree: TreeBuilder,
) -> None:
    h = host_of(with_nics(two_node_smt(tree)))
    entry = "  a: {{cpus: 2, memory: 1GiB, hotplug_slots: 2, devices: [{devices}]}}\n"
    first = plan(manifest(HEAD + entry.format(devices='{pci: "81:00.0"}')), h)
    state = applied(first)
    two = '{pci: "81:00.0"}, {pci: "82:00.0"}'
    second = replan(HEAD + entry.format(devices=two), h, state)
    steps = diff(second, state, h, replace=set())
    assert kinds(steps) == ["claim-group a", "attach-device a"]
    attach = steps[1]
    assert isinstance(attach, AttachDevice)
    assert [str(d.address) for d in attach.devices] == ["0000:82:00.0", "0000:82:00.1"]
    assert attach.after == second.placements["a"]
    assert [attach.after.hotplug_slot(str(d.address)) for d in attach.devices] == [0, 1]
    # back to one device: the hot-plugged group leaves, unplugged before it is given back
    state = applied(second)
    third = replan(HEAD + entry.format(devices='{pci: "81:00.0"}'), h, state)
    steps = diff(third, state, h, replace=set())
    assert kinds(steps) == ["detach-device a"]  # the record of applied() holds no claim
    assert isinstance(steps[0], DetachDevice)


def test_a_change_beyond_the_bounds_is_held_and_says_why(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    first = plan(manifest(HEAD + db(extra=", numa: 1")), h)
    state = applied(first)
    beyond = replan(HEAD + db(extra=", numa: 1").replace("max_cpus: 8", "max_cpus: 10"), h, state)
    assert diff(beyond, state, h, replace=set()) == []
    held = held_replacements(beyond, state, replace=set())
    assert "needs --replace db" in held["db"]


def test_an_intent_survives_the_records_json_and_is_settled_by_the_guest(
    tree: TreeBuilder,
) -> None:
    h = host_of(two_node_smt(tree))
    first = plan(manifest(HEAD + db(memory="2GiB", extra=", numa: 1")), h)
    state = applied(first)
    second = replan(HEAD + db(cpus=4, memory="3GiB", extra=", numa: 1"), h, state)
    before, after = first.placements["db"], second.placements["db"]
    rec = state.partitions["db"]
    cut = state.with_partition(
        PartitionRecord(
            "db", RunState.RUNNING, before, pid=rec.pid, live=LiveIntent("add-cpus", after, True)
        )
    )
    back = state_from_json(json.loads(json.dumps(state_to_json(cut))))
    assert back.partitions["db"].live == LiveIntent("add-cpus", after, True)
    # the guest got one of the two vCPUs and 512MiB of the 1GiB: that is what is recorded
    plugged = before.memory_bytes - before.fixed_memory_bytes + 512 * MiB
    view = GuestView(
        running=False,
        vcpus={0: 11, 1: 12, 2: 13},
        memory={"vmem1": MemoryDevice("vmem1", 0, plugged, 2 * GiB, 4 * GiB, 2 * MiB)},
    )
    seen = seen_placement(before, after, view)
    assert seen.cpus == after.cpus[:3]
    assert seen.memory_bytes == 2 * GiB + 512 * MiB
    assert seen.devices == ()


def test_every_live_step_lists_as_kind_name_detail(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    first = plan(manifest(HEAD + db(cpus=4, extra=", numa: 1")), h)
    state = applied(first)
    second = replan(HEAD + db(cpus=2, extra=", numa: 1"), h, state)
    (step,) = diff(second, state, h, replace=set())
    assert isinstance(step, LiveStep)
    assert str(step) == "remove-cpus db 4 -> 2 (CPUs 5,13 given back)"
    assert step.to_json() == {
        "action": "remove-cpus",
        "target": "db",
        "detail": "4 -> 2 (CPUs 5,13 given back)",
    }


def test_a_dynamic_partitions_locked_memory_limit_counts_its_ceiling(tree: TreeBuilder) -> None:
    """Rule 10's limit is set once, before QEMU drops to its user: a partition that may grow
    or receive a device live is given room for its vCPU slots, its max_memory, and (with
    spare slots) VFIO's pinning of that memory."""
    from partitioner.planning.confine import (
        QEMU_OWN_BYTES,
        TCG_TB_BYTES,
        VCPU_STACK_BYTES,
        memlock_bytes,
    )

    h = host_of(two_node_smt(tree))
    static = plan(manifest(HEAD + "  db: {cpus: 2, memory: 2GiB, numa: 1}\n"), h)
    p = static.placements["db"]
    assert memlock_bytes(p, "kvm") == QEMU_OWN_BYTES + 2 * VCPU_STACK_BYTES
    dyn = plan(manifest(HEAD + db(extra=", numa: 1, hotplug_slots: 1")), h).placements["db"]
    assert dyn.max_vcpus == 8 and dyn.max_memory_bytes == 5 * GiB
    assert memlock_bytes(dyn, "tcg") == (
        QEMU_OWN_BYTES + 8 * VCPU_STACK_BYTES + 5 * GiB + TCG_TB_BYTES
    )


def test_a_claim_a_killed_live_change_left_behind_is_given_back(tree: TreeBuilder) -> None:
    """Killed between the claim and the plug (then the device is no longer wanted), or
    between the unplug and the release: the group is held for nothing, and goes back."""
    from partitioner.record.model import FunctionRecord, GroupClaim

    h = host_of(with_nics(two_node_smt(tree)))
    entry = "  a: {cpus: 2, memory: 1GiB, hotplug_slots: 2}\n"
    first = plan(manifest(HEAD + entry), h)
    state = applied(first)
    rec = state.partitions["a"]
    claim = GroupClaim(20, (FunctionRecord("0000:82:00.0", "e1000e", None),))
    state = state.with_partition(PartitionRecord(**{**rec.__dict__, "claims": (claim,)}))
    again = replan(HEAD + entry, h, state)
    steps = diff(again, state, h, replace=set())
    assert kinds(steps) == ["release-group a"]
    assert steps[0].detail == "IOMMU group 20: 0000:82:00.0 (vfio-pci -> e1000e)"
