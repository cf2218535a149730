"""Dynamic partitions (issue 20, rule 11), the manifest and planning half: bounds in the
manifest, how a dynamic partition is placed, how a running one is changed within its bounds,
and what a live change is (``planning.live.live_change``) or why it needs ``--replace``.

Hosts are trees written by TreeBuilder and read back through the real inventory; manifests
go through the real loader; running partitions come from a state record through
``record.model.running_partitions``, JSON and all.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_planner import HEAD, host_of, manifest, problems, two_node_smt, with_nics
from treebuilder import GiB, MiB, TreeBuilder

from partitioner.errors import ManifestError
from partitioner.inventory.model import Host
from partitioner.manifest.loader import loads
from partitioner.manifest.model import spec_from_json, spec_to_json
from partitioner.pci import PciAddress
from partitioner.planning.live import LiveChange, hotplugged_after, live_change
from partitioner.planning.model import (
    Placement,
    Plan,
    RunningPartition,
)
from partitioner.planning.planner import kvm_vcpu_problems, plan
from partitioner.record.codec import state_from_json, state_to_json
from partitioner.record.model import PartitionRecord, RunState, State, running_partitions
from partitioner.units import virtio_mem_block

# two_node_smt: node 0 has CPUs 0-3 and 8-11, node 1 has 4-7 and 12-15; core k is (k, k+8).
# With `reserve: {cpus: 2}` the host keeps core (0, 8).


def running(p: Plan) -> dict[str, RunningPartition]:
    """The running partitions of ``p`` as `apply` leaves them: through the record's JSON."""
    state = State(
        partitions={n: PartitionRecord(n, RunState.RUNNING, pl) for n, pl in p.placements.items()}
    )
    return running_partitions(state_from_json(json.loads(json.dumps(state_to_json(state)))))


def manifest_errors(text: str) -> list[str]:
    with pytest.raises(ManifestError) as e:
        loads(text, file="site.yaml")
    return [str(p) for p in e.value.problems]


# -- the manifest ----------------------------------------------------------------------------


def test_units_virtio_mem_block_is_the_page_size_or_2mib() -> None:
    assert virtio_mem_block(None) == 2 * MiB
    assert virtio_mem_block(4096) == 2 * MiB
    assert virtio_mem_block(2 * MiB) == 2 * MiB
    assert virtio_mem_block(GiB) == GiB


def test_bounds_default_to_the_values_and_a_static_spec_keeps_its_json() -> None:
    spec = manifest(HEAD + "  a: {cpus: 4, memory: 2GiB}\n").partitions["a"]
    assert (spec.cpus_min, spec.cpus_max) == (4, 4)
    assert (spec.memory_min, spec.memory_max) == (2 * GiB, 2 * GiB)
    assert spec.hotplug_slots == 0
    assert not spec.dynamic_cpus and not spec.dynamic_memory
    doc = spec_to_json(spec)
    assert not {"min_cpus", "max_cpus", "min_memory_bytes", "max_memory_bytes"} & set(doc)
    assert "hotplug_slots" not in doc
    assert spec_from_json(doc) == spec


def test_bounds_are_read_kept_in_json_and_located() -> None:
    text = (
        HEAD + "  db:\n    cpus: 4\n    min_cpus: 2\n    max_cpus: 8\n    memory: 4GiB\n"
        "    min_memory: 2GiB\n    max_memory: 16GiB\n    hotplug_slots: 2\n"
    )
    spec = loads(text, file="site.yaml").partitions["db"]
    assert (spec.min_cpus, spec.max_cpus, spec.cpus_min, spec.cpus_max) == (2, 8, 2, 8)
    assert (spec.memory_min, spec.memory_max) == (2 * GiB, 16 * GiB)
    assert spec.hotplug_slots == 2 and spec.dynamic_cpus and spec.dynamic_memory
    assert str(spec.field_where("min_cpus")) == "site.yaml:7:15"
    assert str(spec.field_where("max_memory")) == "site.yaml:11:17"
    assert str(spec.field_where("hotplug_slots")) == "site.yaml:12:20"
    back = spec_from_json(json.loads(json.dumps(spec_to_json(spec))))
    assert back == spec
    # A bound left out stands where the value it follows does.
    bare = loads(HEAD + "  a: {cpus: 4, memory: 2GiB}\n", file="site.yaml").partitions["a"]
    assert bare.field_where("max_cpus") == bare.field_where("cpus")
    assert bare.field_where("min_memory") == bare.field_where("memory")


def test_every_bound_out_of_order_is_reported_at_once_each_at_its_field() -> None:
    errors = manifest_errors(
        "version: 1\npartitions:\n"
        "  a:\n    cpus: 4\n    min_cpus: 6\n    max_cpus: 2\n"
        "    memory: 4GiB\n    min_memory: 5GiB\n    max_memory: 3GiB\n"
        '  b:\n    cpus: "4-7"\n    max_cpus: 3\n    memory: 1GiB\n    hotplug_slots: 33\n'
    )
    assert len(errors) == 6, errors
    assert errors[0].startswith("site.yaml:5:15: partitions.a.min_cpus: 6 is more than cpus (4)")
    assert errors[1].startswith("site.yaml:6:15: partitions.a.max_cpus: 2 is less than cpus (4)")
    assert errors[2].startswith(
        "site.yaml:8:17: partitions.a.min_memory: 5GiB is more than memory (4GiB)"
    )
    assert errors[3].startswith(
        "site.yaml:9:17: partitions.a.max_memory: 3GiB is less than memory (4GiB)"
    )
    # An explicit list counts its CPUs.
    assert errors[4].startswith(
        "site.yaml:12:15: partitions.b.max_cpus: 3 is less than cpus (4: 4-7)"
    )
    assert errors[5] == "site.yaml:14:20: partitions.b.hotplug_slots: expected at most 32, not `33`"


def test_an_explicit_list_may_have_bounds() -> None:
    spec = loads(
        HEAD + '  a: {cpus: "4-7", min_cpus: 2, max_cpus: 8, memory: 1GiB}\n', file="site.yaml"
    ).partitions["a"]
    assert (spec.cpu_count, spec.cpus_min, spec.cpus_max) == (4, 2, 8)


def test_dynamic_memory_comes_in_whole_virtio_mem_blocks() -> None:
    errors = manifest_errors(
        "version: 1\npartitions:\n"
        "  a:\n    cpus: 2\n    memory: 4GiB\n    hugepages: none\n"
        "    min_memory: 3071MiB\n    max_memory: 6145MiB\n"
        "  b:\n    cpus: 2\n    memory: 4GiB\n    min_memory: 3MiB\n"
    )
    assert len(errors) == 3, errors
    assert errors[0].startswith("site.yaml:7:17: partitions.a.min_memory: memory 4GiB is 1025MiB")
    assert "not a whole number of 2MiB blocks" in errors[0]
    assert "use min_memory 3070MiB or 3GiB" in errors[0]
    assert errors[1].startswith("site.yaml:8:17: partitions.a.max_memory: max_memory 6145MiB")
    assert "use max_memory 6GiB or 6146MiB" in errors[1]
    # the bounds are sizes like memory: whole pages
    assert errors[2].startswith("site.yaml:12:17: partitions.b.min_memory: 3MiB is not a whole")
    # 1GiB pages: blocks of 1GiB, which whole pages already are
    loads(
        "version: 1\npartitions:\n  c: {cpus: 2, memory: 4GiB, hugepages: 1GiB, "
        "min_memory: 1GiB, max_memory: 8GiB}\n",
        file="site.yaml",
    )


# -- placing a dynamic partition ---------------------------------------------------------------


def test_static_bounds_written_out_plan_as_static(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    bare = plan(manifest(HEAD + "  a: {cpus: 4, memory: 2GiB, numa: [0, 1]}\n"), h)
    same = plan(
        manifest(
            HEAD + "  a: {cpus: 4, max_cpus: 4, min_cpus: 4, memory: 2GiB, max_memory: 2GiB, "
            "min_memory: 2GiB, numa: [0, 1]}\n"
        ),
        h,
    )
    a, b = bare.placements["a"], same.placements["a"]
    assert b.same_resources(a) and live_change(a, b) == LiveChange(
        "a", vcpus_before=4, memory_before=2 * GiB, hugepage_bytes=2 * MiB
    )
    doc = a.to_json()
    assert not {"vcpu_slots", "slot_nodes", "fixed_per_node", "max_per_node", "hotplugged"} & set(
        doc
    )
    assert (a.vcpu_slots, a.slot_nodes, a.fixed_per_node, a.max_per_node) == (0, (), (), ())
    assert a.max_vcpus == 4 and a.fixed_memory_per_node == a.memory_per_node


def test_a_dynamic_partition_starts_with_cpus_of_max_cpus_slots_and_only_them_held(
    tree: TreeBuilder,
) -> None:
    h = host_of(two_node_smt(tree))
    p = plan(
        manifest(
            HEAD + "  db: {cpus: 2, max_cpus: 6, memory: 2GiB, min_memory: 1GiB, "
            "max_memory: 4GiB, numa: [0, 1]}\n"
        ),
        h,
    )
    db = p.placements["db"]
    assert len(db.cpus) == 2 and db.vcpu_slots == 6 and db.max_vcpus == 6
    # the spare slots spread over its nodes a whole core at a time, fewest first
    assert db.slot_nodes == (0, 0, 1, 1, 0, 0)
    assert db.slot_nodes[:2] == db.cpu_nodes
    # one socket of 3 two-thread cores: the guest's slots
    assert (db.sockets, db.cores, db.threads) == (1, 3, 2)
    # memory: the fixed part and the ceiling shared out like memory, the plugged part in blocks
    assert db.fixed_per_node == ((0, 512 * MiB), (1, 512 * MiB))
    assert db.max_per_node == ((0, 2 * GiB), (1, 2 * GiB))
    assert db.memory_per_node == ((0, GiB), (1, GiB))
    assert db.plugged_per_node == ((0, 512 * MiB), (1, 512 * MiB))
    assert db.dynamic_room_per_node == ((0, 1536 * MiB), (1, 1536 * MiB))
    # only what is plugged is reserved from the host
    assert p.hugepages_needed() == {(0, 2 * MiB): 512, (1, 2 * MiB): 512}


def test_placement_json_round_trip_keeps_the_dynamic_fields(tree: TreeBuilder) -> None:
    h = host_of(with_nics(two_node_smt(tree)))
    p = plan(
        manifest(
            HEAD + "  db: {cpus: 2, min_cpus: 2, max_cpus: 4, memory: 1GiB, min_memory: 512MiB, "
            'max_memory: 2GiB, hotplug_slots: 2, devices: [{pci: "81:00.0"}]}\n'
        ),
        h,
    )
    db = dataclasses.replace(p.placements["db"], hotplugged=("", "0000:82:00.0"))
    doc = json.loads(json.dumps(db.to_json()))
    assert doc["vcpu_slots"] == 4 and doc["hotplugged"] == ["", "0000:82:00.0"]
    assert doc["fixed_per_node"] == {"1": 512 * MiB} and doc["max_per_node"] == {"1": 2 * GiB}
    back = Placement.from_json(doc)
    assert back == db and back.same_resources(db)
    assert back.hotplug_slots == 2 and back.hotplug_slot("0000:82:00.0") == 1
    # an older record, without the fields, reads back static
    for key in ("vcpu_slots", "slot_nodes", "fixed_per_node", "max_per_node", "hotplugged"):
        del doc[key]
    old = Placement.from_json(doc)
    assert (old.vcpu_slots, old.max_vcpus, old.fixed_per_node) == (0, 2, ())


def test_bounds_under_smt_isolate_are_whole_cores_and_slots_within_kvm(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    m = manifest(HEAD + "  a: {cpus: 2, min_cpus: 1, max_cpus: 5, memory: 1GiB}\n")
    msg = problems(m, h)
    assert "site.yaml:5:26: a: min_cpus is 1, but under smt: isolate" in msg
    assert "site.yaml:5:39: a: max_cpus is 5, but under smt: isolate" in msg
    shared = HEAD.replace("partitions:", "  smt: share\npartitions:")
    a = plan(manifest(shared + "  a: {cpus: 2, max_cpus: 5, memory: 1GiB}\n"), h).placements["a"]
    assert a.vcpu_slots == 5 and (a.sockets, a.cores, a.threads) == (1, 5, 1)
    big = manifest(HEAD + "  a: {cpus: 2, max_cpus: 300, memory: 1GiB}\n")
    (problem,) = kvm_vcpu_problems(big, 288)
    assert problem.field == "max_cpus" and "max_cpus 300" in problem.message


# -- a running partition changed within its bounds ------------------------------------------


DB = (
    "  db: {{cpus: {cpus}, min_cpus: 2, max_cpus: 8, memory: {memory}, min_memory: 1GiB, "
    "max_memory: 5GiB{extra}}}\n"
)


def db(cpus: int = 2, memory: str = "2GiB", extra: str = "") -> str:
    return DB.format(cpus=cpus, memory=memory, extra=extra)


def test_growth_takes_free_whole_cores_of_its_node_and_moves_nobody(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    first = plan(manifest(HEAD + db(extra=", numa: 1") + "  x: {cpus: 2, memory: 1GiB}\n"), h)
    before = first.placements
    assert before["db"].cpus == (4, 12) and before["db"].slot_nodes == (1,) * 8
    # x went to node 1 too (best fit); db grows on node 1, its slots' node, around x
    assert before["x"].cpus == (5, 13)
    second = plan(
        manifest(HEAD + db(cpus=6, extra=", numa: 1") + "  x: {cpus: 2, memory: 1GiB}\n"),
        h,
        running(first),
    )
    after = second.placements
    assert after["x"].cpus == before["x"].cpus
    assert after["db"].cpus[:2] == before["db"].cpus
    assert after["db"].cpus == (4, 12, 6, 14, 7, 15)  # appended, whole cores, lowest first
    assert all(h.cpus[c].node == 1 for c in after["db"].cpus)
    change = live_change(after["db"], before["db"])
    assert isinstance(change, LiveChange)
    assert change.added_cpus == ((2, 6), (3, 14), (4, 7), (5, 15))
    assert change.actions() == (("add-cpus", "db", "2 -> 6 (CPUs 6-7,14-15, pinned)"),)


def test_growth_with_no_room_names_the_cpus_and_who_holds_them(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    text = HEAD + db(extra=", numa: 1") + "  x: {cpus: 4, memory: 1GiB, numa: 1}\n"
    first = plan(manifest(text), h)
    assert set(first.placements["x"].cpus) == {4, 5, 12, 13}  # the larger goes first
    assert first.placements["db"].cpus == (6, 14)
    grown = HEAD + db(cpus=6, extra=", numa: 1") + "  x: {cpus: 4, memory: 1GiB, numa: 1}\n"
    msg = problems(manifest(grown), h, running(first))
    assert msg.startswith("site.yaml:5:14: db grows from 2 to 6 CPUs: vCPUs 2-5 need 4 free CPUs")
    assert "on node 1, the node of their slots, and 2 are free there (CPUs 7,15)" in msg
    assert "CPUs 4-5,12-13 are x's" in msg
    # with room, the same change is made: x on node 0 leaves node 1 to db
    x0 = "  x: {cpus: 4, memory: 1GiB, numa: 0}\n"
    first = plan(manifest(HEAD + db(extra=", numa: 1") + x0), h)
    second = plan(manifest(HEAD + db(cpus=6, extra=", numa: 1") + x0), h, running(first))
    assert len(second.placements["db"].cpus) == 6


def test_under_smt_share_a_running_partition_leaves_its_siblings_free(tree: TreeBuilder) -> None:
    # smt: share lets a core's threads go to two owners: a running partition, grown live or
    # kept as it is, holds its CPUs and not their siblings.
    h = host_of(two_node_smt(tree))
    share = HEAD.replace("host:\n", "host:\n  smt: share\n")
    one = "  lv: {cpus: 1, min_cpus: 1, max_cpus: 3, memory: 1GiB, numa: 1}\n"
    first = plan(manifest(share + one), h)
    assert first.placements["lv"].cpus == (4,)
    second = plan(manifest(share + one.replace("cpus: 1,", "cpus: 2,")), h, running(first))
    assert second.placements["lv"].cpus == (4, 12)  # its own core's sibling, lowest first
    third = plan(manifest(share + one.replace("cpus: 1,", "cpus: 3,")), h, running(second))
    assert third.placements["lv"].cpus == (4, 12, 5)
    # kept unchanged, its core's other thread goes to a newcomer pinned there
    pin = '  pin: {cpus: "12", memory: 1GiB}\n'
    kept = plan(manifest(share + one + pin), h, running(first))
    assert kept.placements["lv"].cpus == (4,) and kept.placements["pin"].cpus == (12,)


def test_a_new_explicit_list_is_placed_before_running_partitions_grow(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    first = plan(manifest(HEAD + db(extra=", numa: 1")), h)
    text = HEAD + db(cpus=4, extra=", numa: 1") + '  pin: {cpus: "5,13", memory: 1GiB}\n'
    second = plan(manifest(text), h, running(first))
    assert second.placements["pin"].cpus == (5, 13)
    assert second.placements["db"].cpus == (4, 12, 6, 14)


def test_shrinking_drops_the_highest_vcpus_and_frees_their_cpus(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    first = plan(manifest(HEAD + db(cpus=6, extra=", numa: 1")), h)
    assert first.placements["db"].cpus == (4, 12, 5, 13, 6, 14)
    text = HEAD + db(cpus=2, extra=", numa: 1") + '  pin: {cpus: "6,14", memory: 1GiB}\n'
    second = plan(manifest(text), h, running(first))
    assert second.placements["db"].cpus == (4, 12)
    assert second.placements["pin"].cpus == (6, 14)
    change = live_change(second.placements["db"], first.placements["db"])
    assert isinstance(change, LiveChange)
    assert change.removed_vcpus == ((5, 14), (4, 6), (3, 13), (2, 5))
    assert change.actions() == (("remove-cpus", "db", "6 -> 2 (CPUs 5-6,13-14)"),)


def test_growth_spreads_over_the_nodes_of_its_slots(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    spans = ", numa: [0, 1]"
    first = plan(manifest(HEAD + db(extra=spans)), h)
    before = first.placements["db"]
    assert before.slot_nodes == (0, 0, 1, 1, 0, 0, 1, 1)
    second = plan(manifest(HEAD + db(cpus=8, extra=spans)), h, running(first))
    after = second.placements["db"]
    assert [h.cpus[c].node for c in after.cpus] == list(before.slot_nodes)
    assert after.cpus[:2] == before.cpus


def test_an_explicit_list_grows_by_the_cpus_it_adds(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    pinned = '  db: {{cpus: "{cpus}", max_cpus: 6, memory: 1GiB, numa: 1}}\n'
    first = plan(manifest(HEAD + pinned.format(cpus="5,13")), h)
    assert first.placements["db"].cpus == (5, 13)
    second = plan(manifest(HEAD + pinned.format(cpus="4-5,12-13")), h, running(first))
    assert second.placements["db"].cpus == (5, 13, 4, 12)  # the new ones after the present
    change = live_change(second.placements["db"], first.placements["db"])
    assert isinstance(change, LiveChange) and change.added_cpus == ((2, 4), (3, 12))
    # dropping CPUs of the lower vCPUs cannot be done live: placed anew, and plan says why
    third = plan(manifest(HEAD + pinned.format(cpus="4,12")), h, running(second))
    assert third.placements["db"].cpus == (4, 12)
    why = live_change(third.placements["db"], second.placements["db"])
    assert why == (
        "vCPU 0 would move from CPU 5 to CPU 4: a running vCPU keeps its CPU (rule 8); "
        "needs --replace db"
    )
    # a list that keeps the CPUs of the lower vCPUs shrinks live
    fourth = plan(manifest(HEAD + pinned.format(cpus="5,13")), h, running(second))
    change = live_change(fourth.placements["db"], second.placements["db"])
    assert isinstance(change, LiveChange) and change.removed_vcpus == ((3, 12), (2, 4))


def test_an_explicit_list_adding_a_held_cpu_names_its_holder(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    text = '  db: {{cpus: "{cpus}", max_cpus: 6, memory: 1GiB, numa: 1}}\n'
    x = "  x: {cpus: 2, memory: 1GiB, numa: 1}\n"
    first = plan(manifest(HEAD + text.format(cpus="5,13") + x), h)
    assert first.placements["x"].cpus == (4, 12)
    msg = problems(manifest(HEAD + text.format(cpus="4-5,12-13") + x), h, running(first))
    assert msg.startswith(
        "site.yaml:5:14: db grows to 4 CPUs: its CPU list adds 4,12, and CPUs 4,12 are x's"
    )


def test_memory_grows_and_shrinks_on_its_nodes_in_whole_blocks(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    spans = ", numa: [0, 1]"
    first = plan(manifest(HEAD + db(memory="2GiB", extra=spans)), h)
    before = first.placements["db"]
    assert before.memory_per_node == ((0, GiB), (1, GiB))
    second = plan(manifest(HEAD + db(memory="4GiB", extra=spans)), h, running(first))
    after = second.placements["db"]
    assert after.cpus == before.cpus
    assert after.memory_per_node == ((0, 2 * GiB), (1, 2 * GiB))
    assert after.fixed_per_node == before.fixed_per_node
    change = live_change(after, before)
    assert isinstance(change, LiveChange)
    assert change.memory == ((0, GiB, 2 * GiB), (1, GiB, 2 * GiB))
    assert change.actions() == (
        ("grow-memory", "db", "2GiB -> 3GiB (node 0, 512 x 2MiB pages)"),
        ("grow-memory", "db", "3GiB -> 4GiB (node 1, 512 x 2MiB pages)"),
    )
    # the same size started afresh is split the same way
    fresh = plan(manifest(HEAD + db(memory="4GiB", extra=spans)), h).placements["db"]
    assert fresh.memory_per_node == after.memory_per_node
    back = live_change(after, after)
    assert isinstance(back, LiveChange) and back.empty
    shrunk = plan(manifest(HEAD + db(memory="1GiB", extra=spans)), h, running(second))
    change = live_change(shrunk.placements["db"], after)
    assert isinstance(change, LiveChange)
    assert change.actions() == (
        ("shrink-memory", "db", "4GiB -> 2560MiB (node 0, 768 x 2MiB pages)"),
        ("shrink-memory", "db", "2560MiB -> 1GiB (node 1, 768 x 2MiB pages)"),
    )


def test_memory_growth_must_fit_on_its_node(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    big = "  db: {{cpus: 2, memory: {memory}, min_memory: 1GiB, max_memory: 7GiB, numa: 1}}\n"
    other = "  x: {cpus: 2, memory: 3GiB, hugepages: none, numa: 1}\n"
    first = plan(manifest(HEAD + big.format(memory="2GiB") + other), h)
    msg = problems(manifest(HEAD + big.format(memory="6GiB") + other), h, running(first))
    # node 1: 8GiB less 1GiB of the reserve, less x's 3GiB, less db's 2GiB: 2GiB left
    assert msg.startswith(
        "site.yaml:5:25: db grows to 6GiB: it needs 4GiB more on node 1, 2GiB is left there"
    )
    # hugepages counted as today: 6GiB free on the node is 3072 pages, less what x and db hold
    tree.node(1, memory_bytes=16 * GiB, free_bytes=3 * GiB, hugepages={2 * MiB: (0, 0)})
    h2 = host_of(tree)
    msg = problems(manifest(HEAD + big.format(memory="6GiB") + other), h2, running(first))
    assert "db grows to 6GiB: it needs 2048 more 2MiB pages on node 1, 1536 are free" in msg


def test_a_static_partition_unchanged_is_kept_as_before(tree: TreeBuilder) -> None:
    h = host_of(with_nics(two_node_smt(tree)))
    text = (
        HEAD
        + '  a: {cpus: 4, memory: 2GiB, devices: [{pci: "81:00.0"}]}\n  b: {cpus: 2, memory: 1GiB}\n'
    )
    first = plan(manifest(text), h)
    with_record = plan(manifest(text), h, running(first))
    bare = {n: dataclasses.replace(r, placement=None) for n, r in running(first).items()}
    without = plan(manifest(text), h, bare)
    assert json.dumps(with_record.to_json(), sort_keys=True) == json.dumps(
        without.to_json(), sort_keys=True
    )
    # a static partition changed in cpus is placed anew, as before
    changed = plan(manifest(text.replace("cpus: 2,", "cpus: 4,")), h, running(first))
    why = live_change(changed.placements["b"], first.placements["b"])
    assert why == (
        "max_cpus changed 2 -> 4 (left out, it follows cpus; write `max_cpus: 2` to keep it): "
        "a change of bounds needs --replace b"
    )


def test_devices_attach_into_spare_slots_and_detach_whole_groups(tree: TreeBuilder) -> None:
    h = host_of(with_nics(two_node_smt(tree)))
    entry = "  a: {{cpus: 2, memory: 1GiB, hotplug_slots: {slots}, devices: [{devices}]}}\n"
    first = plan(manifest(HEAD + entry.format(slots=2, devices='{pci: "81:00.0"}')), h)
    two = '{pci: "81:00.0"}, {pci: "82:00.0"}'
    second = plan(manifest(HEAD + entry.format(slots=2, devices=two)), h, running(first))
    a1, a2 = first.placements["a"], second.placements["a"]
    assert a2.cpus == a1.cpus
    # the group goes whole: 82:00.1 with 82:00.0, each function in a spare slot
    assert a2.hotplugged == ("0000:82:00.0", "0000:82:00.1")
    change = live_change(a2, a1)
    assert isinstance(change, LiveChange)
    assert [str(d.address) for d in change.attached] == ["0000:82:00.0", "0000:82:00.1"]
    assert change.actions() == (
        ("attach-device", "a", "0000:82:00.0"),
        ("attach-device", "a", "0000:82:00.1"),
    )
    # detached: the device it started with leaves; the hot-plugged ones keep their slots
    third = plan(
        manifest(HEAD + entry.format(slots=2, devices='{pci: "82:00.0"}')), h, running(second)
    )
    a3 = third.placements["a"]
    change = live_change(a3, a2)
    assert isinstance(change, LiveChange)
    assert change.actions() == (("detach-device", "a", "0000:81:00.0"),)
    assert a3.hotplugged == a2.hotplugged
    # the slots of a group detached are free again for the next one
    fourth = plan(
        manifest(HEAD + entry.format(slots=2, devices='{pci: "81:00.0"}')), h, running(third)
    )
    a4 = fourth.placements["a"]
    assert a4.hotplugged == ("0000:81:00.0",)
    assert isinstance(live_change(a4, a3), LiveChange)


def test_a_device_beyond_the_spare_slots_is_placed_anew_and_needs_replace(
    tree: TreeBuilder,
) -> None:
    h = host_of(with_nics(two_node_smt(tree)))
    entry = "  a: {{cpus: 2, memory: 1GiB, hotplug_slots: 1, devices: [{devices}]}}\n"
    first = plan(manifest(HEAD + entry.format(devices='{pci: "81:00.0"}')), h)
    two = '{pci: "81:00.0"}, {pci: "82:00.0"}'
    second = plan(manifest(HEAD + entry.format(devices=two)), h, running(first))
    why = live_change(second.placements["a"], first.placements["a"])
    assert isinstance(why, str)
    assert why == (
        "2 functions would be attached (0000:82:00.0, 0000:82:00.1) but it has hotplug_slots: "
        "1: each function attached while it runs takes a spare slot, and more slots need a "
        "larger hotplug_slots; needs --replace a"
    )
    assert second.placements["a"].hotplugged == ()  # placed anew: nothing hot-plugged
    # A static partition (no spare slots) attaching a device: as before, placed anew.
    static = "  b: {{cpus: 2, memory: 1GiB, devices: [{devices}]}}\n"
    one = plan(manifest(HEAD + static.format(devices='{pci: "81:00.0"}')), h)
    two_devs = plan(manifest(HEAD + static.format(devices=two)), h, running(one))
    assert isinstance(live_change(two_devs.placements["b"], one.placements["b"]), str)


def test_hotplugged_after_fills_the_lowest_free_slot(tree: TreeBuilder) -> None:
    h = host_of(with_nics(two_node_smt(tree)))
    p = plan(
        manifest(
            HEAD + '  a: {cpus: 2, memory: 1GiB, hotplug_slots: 3, devices: [{pci: "81:00.0"}, '
            '{pci: "01:00.0"}]}\n'
        ),
        h,
    ).placements["a"]
    nic1, nic0 = p.devices
    old = dataclasses.replace(p, devices=(nic1,), hotplugged=("", "0000:81:00.0"))
    # 81:00.0 keeps slot 1, 01:00.0 takes the free slot 0
    assert hotplugged_after(old, (nic1, nic0)) == ("0000:01:00.0", "0000:81:00.0")
    assert hotplugged_after(old, ()) == ()


# -- live_change: each refusal ---------------------------------------------------------


@pytest.fixture
def dyn(tree: TreeBuilder) -> tuple[Placement, Host]:
    h = host_of(with_nics(two_node_smt(tree)))
    p = plan(
        manifest(
            HEAD + "  db: {cpus: 2, min_cpus: 2, max_cpus: 6, memory: 2GiB, min_memory: 1GiB, "
            'max_memory: 4GiB, hotplug_slots: 1, numa: 1, devices: [{pci: "82:00.0"}]}\n'
        ),
        h,
    )
    return p.placements["db"], h


def test_each_change_that_is_not_live_says_why_and_asks_for_replace(
    dyn: tuple[Placement, Host],
) -> None:
    p, _ = dyn
    spec = p.spec
    r = dataclasses.replace

    def why(new: Placement) -> str:
        out = live_change(new, p)
        assert isinstance(out, str), out
        assert out.endswith("needs --replace db"), out
        return out

    assert why(r(p, spec=r(spec, max_cpus=8))).startswith(
        "max_cpus changed 6 -> 8: a change of bounds needs --replace db"
    )
    assert why(r(p, spec=r(spec, min_memory_bytes=2 * GiB))).startswith(
        "min_memory changed 1GiB -> 2GiB"
    )
    assert why(r(p, spec=r(spec, max_memory_bytes=8 * GiB))).startswith(
        "max_memory changed 4GiB -> 8GiB"
    )
    assert why(r(p, spec=r(spec, hotplug_slots=2))).startswith("hotplug_slots changed 1 -> 2")
    assert why(r(p, spec=r(spec, hugepage_bytes=GiB))).startswith("hugepages changed 2MiB -> 1GiB")
    assert why(r(p, spec=r(spec, numa=(0, 1)))).startswith("numa changed [1] -> [0, 1]")
    assert why(r(p, spec=r(spec, firmware="uefi"))).startswith("boot, disks or firmware changed")
    assert why(r(p, cpus=(5, 13))).startswith("vCPU 0 would move from CPU 4 to CPU 5")
    assert why(r(p, cpus=(*p.cpus, 0, 8), cpu_nodes=(1, 1, 0, 0))).startswith(
        "vCPU 2 would run on CPU 0 of node 0, but its slot is on node 1"
    )
    assert why(r(p, cpus=(*p.cpus, 5, 13, 6, 14, 7, 15))).startswith(
        "8 vCPUs is more than its 6 vCPU slots"
    )
    assert why(r(p, sockets=2, cores=1)).startswith("the guest's CPU topology changes")
    assert why(r(p, memory_per_node=((1, 2 * GiB + MiB),))).startswith(
        "1025MiB plugged on node 1 is not a whole number of 2MiB blocks"
    )
    assert "within its 3GiB of dynamic memory" in why(r(p, memory_per_node=((1, 5 * GiB),)))
    assert why(r(p, fixed_per_node=((1, 2 * GiB),))).startswith("the fixed part of its memory")
    assert why(r(p, pci_hole64_bytes=64 * GiB)).startswith("its devices' 64-bit PCI window changes")
    assert why(r(p, host_cache_info=not p.host_cache_info)).startswith(
        "whether the guest gets the host's cache description changes"
    )
    # devices: a whole group, no display, a spare slot each
    nic, sibling = p.devices
    assert why(r(p, devices=(nic,))).startswith(
        "0000:82:00.1 would leave but 0000:82:00.0 of its IOMMU group 13 would stay"
    )
    assert why(r(p, devices=(r(nic, rom="off"), sibling))).startswith(
        "device 0000:82:00.0's rom or primary_display changes"
    )
    other = r(nic, address=PciAddress.parse("0000:81:00.0"), iommu_group=11)
    assert why(r(p, devices=(*p.devices, r(other, primary_display=True)))).startswith(
        "0000:81:00.0 is to be the primary display"
    )
    joined = r(other, iommu_group=13)
    assert "which it already holds" in why(r(p, devices=(*p.devices, joined)))
    assert why(r(p, devices=(*p.devices, other))).startswith(
        "its spare slots are not as a live change leaves them"
    )
    assert isinstance(
        live_change(r(p, devices=(*p.devices, other), hotplugged=("0000:81:00.0",)), p),
        LiveChange,
    )
    slots = why(
        r(
            p,
            devices=(
                *p.devices,
                other,
                r(other, address=PciAddress.parse("0000:01:00.0"), iommu_group=2),
            ),
        )
    )
    assert slots.startswith(
        "2 functions would be attached (0000:81:00.0, 0000:01:00.0) but it has hotplug_slots: 1"
    )
    static = r(p, fixed_per_node=(), max_per_node=())
    grown = live_change(r(static, memory_per_node=((1, 3 * GiB),)), static)
    assert grown == (
        "memory changes 2GiB -> 3GiB but it was started with all of its memory fixed "
        "(min_memory = max_memory); needs --replace db"
    )


def test_a_live_change_of_every_kind_at_once_lists_its_actions_in_order(
    dyn: tuple[Placement, Host],
) -> None:
    p, h = dyn
    nic = p.devices[0]
    other = dataclasses.replace(nic, address=PciAddress.parse("0000:81:00.0"), iommu_group=11)
    new = dataclasses.replace(
        p,
        cpus=(*p.cpus, 5, 13),
        cpu_nodes=(1, 1, 1, 1),
        memory_per_node=((1, 3 * GiB),),
        devices=(other,),
        hotplugged=("0000:81:00.0",),
    )
    change = live_change(new, p)
    assert isinstance(change, LiveChange)
    assert (change.vcpus_after, change.memory_after) == (4, 3 * GiB)
    assert change.actions() == (
        ("detach-device", "db", "0000:82:00.0"),
        ("detach-device", "db", "0000:82:00.1"),
        ("add-cpus", "db", "2 -> 4 (CPUs 5,13, pinned)"),
        ("grow-memory", "db", "2GiB -> 3GiB (node 1, 512 x 2MiB pages)"),
        ("attach-device", "db", "0000:81:00.0"),
    )
    assert all(h.cpus[c].node == 1 for _, c in change.added_cpus)


def test_a_running_dynamic_partition_unchanged_stays_exactly_as_it_runs(
    tree: TreeBuilder,
) -> None:
    h = host_of(two_node_smt(tree))
    spans = ", numa: [0, 1]"
    first = plan(manifest(HEAD + db(extra=spans)), h)
    grown = plan(manifest(HEAD + db(cpus=6, memory="3GiB", extra=spans)), h, running(first))
    # grown vCPUs are in the order they came, not renumbered core by core
    again = plan(manifest(HEAD + db(cpus=6, memory="3GiB", extra=spans)), h, running(grown))
    a, b = grown.placements["db"], again.placements["db"]
    assert b.same_resources(a) and b.cpus == a.cpus
    change = live_change(b, a)
    assert isinstance(change, LiveChange) and change.empty and change.actions() == ()
    # the same inputs give the same bytes (rule 8)
    twice = plan(manifest(HEAD + db(cpus=6, memory="3GiB", extra=spans)), h, running(grown))
    assert json.dumps(twice.to_json(), sort_keys=True) == json.dumps(
        again.to_json(), sort_keys=True
    )


def test_a_running_partition_whose_bounds_change_is_placed_anew(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    first = plan(manifest(HEAD + db(extra=", numa: 1")), h)
    wider = HEAD + db(extra=", numa: 1").replace("max_cpus: 8", "max_cpus: 6")
    second = plan(manifest(wider), h, running(first))
    assert second.placements["db"].vcpu_slots == 6
    assert live_change(second.placements["db"], first.placements["db"]) == (
        "max_cpus changed 8 -> 6: a change of bounds needs --replace db"
    )
    # memory left to follow `memory` is a bound that changes with it
    follows = "  db: {{cpus: 2, max_cpus: 4, memory: {m}, max_memory: 4GiB, numa: 1}}\n"
    one = plan(manifest(HEAD + follows.format(m="2GiB")), h)
    two = plan(manifest(HEAD + follows.format(m="3GiB")), h, running(one))
    assert live_change(two.placements["db"], one.placements["db"]) == (
        "min_memory changed 2GiB -> 3GiB (left out, it follows memory; write `min_memory: "
        "2GiB` to keep it): a change of bounds needs --replace db"
    )
