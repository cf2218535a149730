"""The planner against the rules of manifest.md, one group of tests per rule.

Hosts are trees written by TreeBuilder (read back through the real inventory)
and, at the end, real kernels' trees from the hwloc corpus.  Manifests are
written as YAML and go through the real loader.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import replace
from pathlib import Path

import corpus
import pytest
from treebuilder import GiB, MiB, TreeBuilder

from partitioner.cpuset import CpuSet
from partitioner.errors import PlanError
from partitioner.inventory import scan
from partitioner.inventory.model import Host
from partitioner.kernel.root import HostRoot
from partitioner.manifest.loader import loads
from partitioner.manifest.model import Manifest
from partitioner.pci import PciAddress
from partitioner.planning.model import Plan, RunningPartition
from partitioner.planning.planner import plan


def manifest(text: str) -> Manifest:
    return loads(textwrap.dedent(text), file="site.yaml")


def host_of(t: TreeBuilder) -> Host:
    return scan(HostRoot(t.build()))


def problems(m: Manifest, h: Host, running: dict[str, RunningPartition] | None = None) -> str:
    with pytest.raises(PlanError) as e:
        plan(m, h, running)
    return "\n".join(map(str, e.value.problems))


def two_node_smt(t: TreeBuilder) -> TreeBuilder:
    """2 packages x 4 cores x 2 threads, one node per package, 8 GiB per node."""
    t.cpus(count=16, packages=2, threads=2, nodes=2, memory_per_node=8 * GiB)
    t.node(0, memory_bytes=8 * GiB, free_bytes=6 * GiB, hugepages={2 * MiB: (0, 0)})
    t.node(1, memory_bytes=8 * GiB, free_bytes=6 * GiB, hugepages={2 * MiB: (0, 0)})
    t.kvm()
    return t


def with_nics(t: TreeBuilder) -> TreeBuilder:
    """Root ports with a NIC each on node 0 and 1; a two-function NIC; a bridge with two NICs."""
    t.pci("0000:00:01.0", class_code="060400", driver="pcieport", iommu_group=1, numa_node=0)
    t.pci(
        "0000:01:00.0",
        driver="e1000e",
        iommu_group=2,
        numa_node=0,
        parent="0000:00:01.0",
        netdevs=("enp1s0",),
    )
    t.pci("0000:80:01.0", class_code="060400", driver="pcieport", iommu_group=10, numa_node=1)
    t.pci(
        "0000:81:00.0",
        driver="e1000e",
        iommu_group=11,
        numa_node=1,
        parent="0000:80:01.0",
        netdevs=("enp129s0",),
    )
    t.pci("0000:80:02.0", class_code="060400", driver="pcieport", iommu_group=12, numa_node=1)
    t.pci(
        "0000:82:00.0",
        device="105e",
        driver="e1000e",
        iommu_group=13,
        numa_node=1,
        parent="0000:80:02.0",
    )
    t.pci(
        "0000:82:00.1",
        device="105e",
        driver="e1000e",
        iommu_group=13,
        numa_node=1,
        parent="0000:80:02.0",
    )
    # a conventional PCI bridge: it and everything behind it form one group
    t.pci("0000:00:1e.0", class_code="060401", iommu_group=20, numa_node=0)
    t.pci(
        "0000:05:01.0",
        device="100e",
        driver="e1000",
        iommu_group=20,
        numa_node=0,
        parent="0000:00:1e.0",
    )
    t.pci(
        "0000:05:02.0",
        device="100e",
        driver="e1000",
        iommu_group=20,
        numa_node=0,
        parent="0000:00:1e.0",
    )
    return t


HEAD = """\
version: 1
host:
  reserve: {cpus: 2, memory: 2GiB}
partitions:
"""


# -- rule 1: CPUs are exclusive ---------------------------------------------------


def test_rule1_cpus_are_exclusive_and_never_the_hosts(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    m = manifest(
        HEAD
        + "  a: {cpus: 4, memory: 1GiB}\n  b: {cpus: 4, memory: 1GiB}\n  c: {cpus: 6, memory: 1GiB}\n"
    )
    p = plan(m, h)
    owned = [set(pl.cpus) for pl in p.placements.values()] + [set(p.host_cpus)]
    for i, a in enumerate(owned):
        for b in owned[i + 1 :]:
            assert not a & b
    assert sum(len(s) for s in owned) == 16


def test_rule1_offline_and_disallowed_cpus_are_never_handed_out(tree: TreeBuilder) -> None:
    tree.cpus(count=8, packages=1, threads=1, nodes=1, memory_per_node=8 * GiB)
    tree.offline(5)
    tree.allowed("0-3,5-6")  # 4 and 7 belong to another cgroup
    tree.kvm()
    h = host_of(tree)
    p = plan(manifest(HEAD.replace("cpus: 2", "cpus: 1") + "  a: {cpus: 4, memory: 1GiB}\n"), h)
    assert set(p.placements["a"].cpus) == {1, 2, 3, 6}
    msg = problems(
        manifest(HEAD.replace("cpus: 2", "cpus: 1") + "  a: {cpus: 5, memory: 1GiB}\n"), h
    )
    assert "a needs 5 CPUs on node 0, 4 are free there (CPUs 1-3,6)" in msg
    msg = problems(
        manifest(HEAD.replace("cpus: 2", 'cpus: "0"') + '  a: {cpus: "4-5", memory: 1GiB}\n'), h
    )
    assert "5 offline" in msg and "4 outside the CPUs this process may use" in msg


def test_rule1_explicit_list_may_not_take_the_reserve(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    msg = problems(manifest(HEAD + '  a: {cpus: "0,8", memory: 1GiB}\n'), h)
    assert "CPU 0 of its list is already the host's" in msg


# -- rule 2: SMT siblings are not split ------------------------------------------


def test_rule2_whole_cores_under_isolate(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    p = plan(manifest(HEAD + "  a: {cpus: 4, memory: 1GiB}\n"), h)
    a = p.placements["a"]
    for cpu in a.cpus:
        assert set(h.cpus[cpu].siblings) <= set(a.cpus)
    assert (a.sockets, a.cores, a.threads) == (1, 2, 2)
    # vCPUs 2k and 2k+1 are one host core, as QEMU numbers threads
    assert h.cpus[a.cpus[0]].siblings == h.cpus[a.cpus[1]].siblings
    # the default reserve is one whole core, and the count form takes whole cores
    assert set(p.host_cpus) == set(h.cpus[0].siblings)


def test_rule2_odd_count_is_refused_under_isolate_and_allowed_under_share(
    tree: TreeBuilder,
) -> None:
    h = host_of(two_node_smt(tree))
    msg = problems(manifest(HEAD + "  a: {cpus: 3, memory: 1GiB}\n"), h)
    assert "multiple of 2 threads per core" in msg
    shared = HEAD.replace("partitions:", "  smt: share\npartitions:")
    p = plan(manifest(shared + "  a: {cpus: 3, memory: 1GiB}\n"), h)
    assert len(p.placements["a"].cpus) == 3
    assert p.placements["a"].threads == 1


def test_rule2_reserve_list_splitting_a_core_is_refused(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    msg = problems(
        manifest(HEAD.replace("cpus: 2", 'cpus: "0"') + "  a: {cpus: 2, memory: 1GiB}\n"), h
    )
    assert "takes CPU 0 but not its SMT siblings 8" in msg
    msg = problems(manifest(HEAD + '  a: {cpus: "2", memory: 1GiB}\n'), h)
    assert "takes CPU 2 but not its SMT siblings 10" in msg


# -- rule 3: memory fits per node ------------------------------------------------


def test_rule3_memory_per_node(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    # 7 GiB fits on a node (8 GiB less 1 GiB of the reserve); two of them need both nodes
    p = plan(
        manifest(
            HEAD
            + "  a: {cpus: 2, memory: 7GiB, hugepages: none}\n  b: {cpus: 2, memory: 7GiB, hugepages: none}\n"
        ),
        h,
    )
    assert {p.placements["a"].numa_nodes, p.placements["b"].numa_nodes} == {(0,), (1,)}
    msg = problems(manifest(HEAD + "  a: {cpus: 2, memory: 8GiB, hugepages: none, numa: 0}\n"), h)
    assert "a needs 8GiB of memory on node 0, 7GiB is left there" in msg


def test_rule3_hugepages_must_be_free_or_reservable(tree: TreeBuilder) -> None:
    two_node_smt(tree)
    tree.node(0, memory_bytes=8 * GiB, free_bytes=512 * MiB, hugepages={2 * MiB: (100, 100)})
    h = host_of(tree)
    # 100 free + 256 reservable from 512 MiB free = 356 pages of 2 MiB
    plan(manifest(HEAD + "  a: {cpus: 2, memory: 712MiB, numa: 0}\n"), h)
    msg = problems(manifest(HEAD + "  a: {cpus: 2, memory: 714MiB, numa: 0}\n"), h)
    assert "a needs 357 2MiB pages on node 0, 356 are free or reservable there" in msg
    assert "hugepagesz=2M hugepages=0:357" in msg


def test_rule3_plan_counts_pages_needed_per_node(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    p = plan(manifest(HEAD + "  a: {cpus: 2, memory: 1GiB, numa: [0, 1]}\n"), h)
    assert p.hugepages_needed() == {(0, 2 * MiB): 256, (1, 2 * MiB): 256}


# -- rule 4: devices are exclusive and whole ---------------------------------------


def test_rule4_same_slot_function_is_added(tree: TreeBuilder) -> None:
    h = host_of(with_nics(two_node_smt(tree)))
    p = plan(manifest(HEAD + '  a: {cpus: 2, memory: 1GiB, devices: [{pci: "82:00.0"}]}\n'), h)
    devs = p.placements["a"].devices
    assert [str(d.address) for d in devs] == ["0000:82:00.0", "0000:82:00.1"]
    assert devs[1].added and not devs[0].added
    assert any("0000:82:00.1" in n and "added" in n for n in p.notes)
    assert p.to_json()["partitions"]["a"]["added_devices"] == ["0000:82:00.1"]


def test_rule4_foreign_endpoint_in_group_fails_naming_it(tree: TreeBuilder) -> None:
    h = host_of(with_nics(two_node_smt(tree)))
    msg = problems(
        manifest(HEAD + '  a: {cpus: 2, memory: 1GiB, devices: [{pci: "05:01.0"}]}\n'), h
    )
    assert "IOMMU group 20 of 0000:05:01.0 also holds 0000:05:02.0" in msg
    # naming both endpoints is fine, and the bridge stays with the host
    p = plan(
        manifest(
            HEAD + '  a: {cpus: 2, memory: 1GiB, devices: [{pci: "05:01.0"}, {pci: "05:02.0"}]}\n'
        ),
        h,
    )
    assert [str(d.address) for d in p.placements["a"].devices] == ["0000:05:01.0", "0000:05:02.0"]


def test_rule4_a_function_has_one_owner(tree: TreeBuilder) -> None:
    h = host_of(with_nics(two_node_smt(tree)))
    msg = problems(
        manifest(
            HEAD
            + '  a: {cpus: 2, memory: 1GiB, devices: [{pci: "81:00.0"}]}\n'
            + "  b: {cpus: 2, memory: 1GiB, devices: [{netdev: enp129s0}]}\n"
        ),
        h,
    )
    assert "b and a both want 0000:81:00.0" in msg


def test_rule4_id_takes_free_functions_and_bridges_are_refused(tree: TreeBuilder) -> None:
    h = host_of(with_nics(two_node_smt(tree)))
    p = plan(
        manifest(HEAD + '  a: {cpus: 2, memory: 1GiB, devices: [{id: "8086:10d3", count: 2}]}\n'), h
    )
    assert [str(d.address) for d in p.placements["a"].devices] == ["0000:01:00.0", "0000:81:00.0"]
    msg = problems(
        manifest(HEAD + '  a: {cpus: 2, memory: 1GiB, devices: [{id: "8086:10d3", count: 3}]}\n'), h
    )
    assert "wants 3 free 8086:10d3 functions, found 2" in msg
    msg = problems(
        manifest(HEAD + '  a: {cpus: 2, memory: 1GiB, devices: [{pci: "00:01.0"}]}\n'), h
    )
    assert "0000:00:01.0" in msg and "bridges stay with the host" in msg


def test_rule4_optional_missing_device_is_left_out_and_said(tree: TreeBuilder) -> None:
    h = host_of(with_nics(two_node_smt(tree)))
    p = plan(
        manifest(
            HEAD + '  a: {cpus: 2, memory: 1GiB, devices: [{pci: "99:00.0", required: false}]}\n'
        ),
        h,
    )
    assert p.placements["a"].devices == ()
    assert any("optional device left out" in n and "0000:99:00.0" in n for n in p.notes)
    msg = problems(
        manifest(HEAD + '  a: {cpus: 2, memory: 1GiB, devices: [{pci: "99:00.0"}]}\n'), h
    )
    assert "a: PCI function 0000:99:00.0 is not on this host" in msg


# -- rule 5: the host keeps what it runs on ------------------------------------------


def test_rule5_default_route_nic_root_disk_and_boot_vga_are_refused(tree: TreeBuilder) -> None:
    with_nics(two_node_smt(tree))
    tree.netdev_up("enp1s0", default_route=True)
    tree.pci(
        "0000:00:02.0",
        vendor="1234",
        device="1111",
        class_code="030000",
        iommu_group=30,
        numa_node=0,
        boot_vga=True,
    )
    tree.pci(
        "0000:00:03.0",
        vendor="8086",
        device="5845",
        class_code="010802",
        driver="nvme",
        iommu_group=31,
        numa_node=0,
    )
    tree.disk("nvme0n1", "0000:00:03.0", partitions=2)
    tree.mount("nvme0n1p2", "/")
    h = host_of(tree)
    for dev, words in [
        ('{pci: "01:00.0"}', "default route"),
        ("{netdev: enp1s0}", "default route"),
        ('{pci: "00:02.0"}', "boot VGA"),
        ('{pci: "00:03.0"}', "nvme0n1p2"),
    ]:
        msg = problems(manifest(HEAD + f"  a: {{cpus: 2, memory: 1GiB, devices: [{dev}]}}\n"), h)
        assert "rule 5" in msg and words in msg, msg
    # an `id:` match skips the used NIC and takes the free one
    p = plan(manifest(HEAD + '  a: {cpus: 2, memory: 1GiB, devices: [{id: "8086:10d3"}]}\n'), h)
    assert [str(d.address) for d in p.placements["a"].devices] == ["0000:81:00.0"]


# -- rule 6: locality --------------------------------------------------------------


def test_rule6_partition_goes_to_its_devices_node(tree: TreeBuilder) -> None:
    h = host_of(with_nics(two_node_smt(tree)))
    p = plan(manifest(HEAD + '  a: {cpus: 2, memory: 1GiB, devices: [{pci: "81:00.0"}]}\n'), h)
    a = p.placements["a"]
    assert a.numa_nodes == (1,)
    assert all(h.cpus[c].node == 1 for c in a.cpus)


def test_rule6_full_device_node_fails_with_the_numbers(tree: TreeBuilder) -> None:
    h = host_of(with_nics(two_node_smt(tree)))
    msg = problems(
        manifest(
            HEAD
            + '  big: {cpus: "5-7,13-15", memory: 1GiB}\n'
            + '  fw0: {cpus: 4, memory: 1GiB, devices: [{pci: "81:00.0"}]}\n'
        ),
        h,
    )
    assert "fw0 needs 4 CPUs on node 1, 2 are free there (CPUs 4,12)" in msg
    assert "node 0 has 6 free" in msg
    assert "0000:81:00.0 is on node 1" in msg


def test_rule6_no_single_node_fits_is_said_not_spread(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    msg = problems(manifest(HEAD + "  a: {cpus: 10, memory: 1GiB}\n"), h)
    assert "needs 10 CPUs and 1GiB on one NUMA node" in msg and "numa:" in msg
    p = plan(manifest(HEAD + "  a: {cpus: 10, memory: 2GiB, numa: [0, 1]}\n"), h)
    a = p.placements["a"]
    assert a.numa_nodes == (0, 1) and len(a.cpus) == 10
    # CPUs go round the nodes a core at a time; memory is shared out evenly
    assert [h.cpus[c].node for c in a.cpus] == [0] * 6 + [1] * 4
    assert dict(a.memory_per_node) == {0: GiB, 1: GiB}
    assert any("spans NUMA nodes 0, 1" in n for n in a.notes)
    assert (a.sockets, a.cores, a.threads) == (
        1,
        5,
        2,
    )  # 3 cores + 2 cores: not one socket per node
    even = plan(manifest(HEAD + "  a: {cpus: 8, memory: 2GiB, numa: [0, 1]}\n"), h).placements["a"]
    assert (even.sockets, even.cores, even.threads) == (2, 2, 2)
    assert even.cpu_nodes == (0, 0, 0, 0, 1, 1, 1, 1)


# -- rule 7: preconditions are named --------------------------------------------------


def test_rule7_preconditions(tree: TreeBuilder) -> None:
    tree.cpus(count=4, packages=1, threads=1, nodes=1)
    tree.hugepage_sizes(2 * MiB)
    tree.pci("0000:01:00.0", driver="e1000e")  # no IOMMU group: IOMMU off
    h = host_of(tree)
    assert not h.has_kvm and not h.has_iommu
    msg = problems(
        manifest(
            "version: 1\npartitions:\n"
            '  a: {cpus: 1, memory: 1GiB, hugepages: 1GiB, devices: [{pci: "01:00.0"}]}\n'
        ),
        h,
    )
    assert "no /dev/kvm" in msg
    assert "intel_iommu=on" in msg and "amd_iommu=on" in msg
    assert "wants 1GiB hugepages but the kernel offers 2MiB" in msg


# -- rule 8: determinism and stability --------------------------------------------------


def as_running(p: Plan) -> dict[str, RunningPartition]:
    return {
        n: RunningPartition(
            n, pl.cpus, pl.memory_per_node, pl.hugepage_bytes, tuple(d.address for d in pl.devices)
        )
        for n, pl in p.placements.items()
    }


def test_rule8_same_inputs_same_bytes(tree: TreeBuilder) -> None:
    h = host_of(with_nics(two_node_smt(tree)))
    text = (
        HEAD
        + '  b: {cpus: 2, memory: 1GiB}\n  a: {cpus: 4, memory: 2GiB, devices: [{id: "8086:105e"}]}\n'
    )
    one = json.dumps(plan(manifest(text), h).to_json(), sort_keys=True)
    two = json.dumps(plan(manifest(text), scan(HostRoot(tree.root))).to_json(), sort_keys=True)
    assert one == two


def test_a_plan_that_places_everything_builds_no_refusal(
    tree: TreeBuilder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Placing asks every node whether each partition fits there; the sentence of why one does
    not (it lists the node's free CPUs) is for refusals only.  Built for every full node and
    every partition, it made the plan of a filling host grow faster than its partitions."""
    from partitioner.planning import place

    def refusal(*args: object) -> None:
        raise AssertionError("a refusal's sentence was built for a plan that places everything")

    monkeypatch.setattr(place, "fits_alone", refusal)
    h = host_of(with_nics(two_node_smt(tree)))
    text = (
        HEAD
        + "".join(f"  p{i}: {{cpus: 2, memory: 1GiB}}\n" for i in range(6))
        + '  d: {cpus: 2, memory: 1GiB, devices: [{id: "8086:105e"}]}\n'
    )
    p = plan(manifest(text), h)
    assert len(p.placements) == 7 and len({c for x in p.placements.values() for c in x.cpus}) == 14


def test_rule8_adding_a_partition_never_moves_a_running_one(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    first = plan(manifest(HEAD + "  small: {cpus: 2, memory: 1GiB}\n"), h)
    text = HEAD + "  small: {cpus: 2, memory: 1GiB}\n  big: {cpus: 6, memory: 1GiB}\n"
    # Planned from scratch, the bigger partition goes first and takes the node small is on ...
    fresh = plan(manifest(text), h)
    assert fresh.placements["small"].cpus != first.placements["small"].cpus
    # ... but with small running, small stays exactly where it is.
    stable = plan(manifest(text), h, as_running(first))
    assert stable.placements["small"].cpus == first.placements["small"].cpus
    assert stable.placements["small"].memory_per_node == first.placements["small"].memory_per_node
    assert not set(stable.placements["big"].cpus) & set(first.placements["small"].cpus)


def test_rule8_changed_running_partition_is_placed_anew(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    first = plan(manifest(HEAD + "  a: {cpus: 2, memory: 1GiB}\n"), h)
    second = plan(manifest(HEAD + "  a: {cpus: 4, memory: 1GiB}\n"), h, as_running(first))
    assert len(second.placements["a"].cpus) == 4
    assert not second.placements["a"].same_resources(first.placements["a"])


def test_what_reaches_qemus_command_line_is_a_change_too(tree: TreeBuilder) -> None:
    import dataclasses

    h = host_of(two_node_smt(tree))
    p = plan(manifest(HEAD + "  a: {cpus: 2, memory: 1GiB}\n"), h).placements["a"]
    assert p.same_resources(p)
    window = dataclasses.replace(p, pci_hole64_bytes=64 << 30)
    assert not window.same_resources(p)
    caches = dataclasses.replace(p, host_cache_info=not p.host_cache_info)
    assert not caches.same_resources(p)


# -- real kernels' trees -------------------------------------------------------------


def test_real_tree_smt_reserve_and_partitions(hwloc_trees: corpus.Trees) -> None:
    root = hwloc_trees["16em64t-4s2c2t"]
    h = scan(HostRoot(root))
    m = manifest(
        "version: 1\nhost: {reserve: {cpus: 4}, accel: tcg}\npartitions:\n"
        "  a: {cpus: 4, memory: 1GiB, hugepages: none}\n  b: {cpus: 4, memory: 1GiB, hugepages: none}\n"
    )
    p = plan(m, h)
    # the reserve: whole cores; the partitions: whole cores, disjoint, no host CPU
    for owner in [CpuSet(p.host_cpus), *(pl.cpuset for pl in p.placements.values())]:
        for c in owner:
            assert h.cpus[c].siblings.issubset(owner)
    all_cpus = [c for pl in p.placements.values() for c in pl.cpus] + list(p.host_cpus)
    assert len(all_cpus) == len(set(all_cpus)) == 12


def test_real_tree_offline_cpus_are_not_placed(hwloc_trees: corpus.Trees) -> None:
    root = hwloc_trees["16em64t-4s2c2t-offlines"]
    h = scan(HostRoot(root))
    offline = {c.id for c in h.cpus.values() if not c.online}
    assert offline
    head = "version: 1\nhost: {reserve: {cpus: 1}, accel: tcg, smt: share}\npartitions:\n"
    reserve = plan(
        manifest(head + "  a: {cpus: 1, memory: 256MiB, hugepages: none}\n"), h
    ).host_cpus
    free = len(h.usable_cpus) - len(reserve)
    nodes = list(h.nodes)
    p = plan(
        manifest(head + f"  a: {{cpus: {free}, memory: 256MiB, hugepages: none, numa: {nodes}}}\n"),
        h,
    )
    assert not set(p.placements["a"].cpus) & offline
    assert set(p.placements["a"].cpus) == set(h.usable_cpus) - set(reserve)
    msg = problems(
        manifest(
            head + f"  a: {{cpus: {free + 1}, memory: 256MiB, hugepages: none, numa: {nodes}}}\n"
        ),
        h,
    )
    assert f"a needs {free + 1} CPUs" in msg


# -- the emulated two-socket server: a real kernel's IOMMU groups -------------------

TESTBED_NUMA = Path(__file__).resolve().parent / "fixtures" / "hosts" / "testbed-numa"
TB_HEAD = """\
version: 1
host: {reserve: {cpus: "0,4"}, accel: tcg, smt: share}
partitions:
"""


@pytest.fixture(scope="module")
def testbed_numa() -> Host:
    return scan(HostRoot(TESTBED_NUMA))


def test_testbed_tree_nic_goes_to_its_node(testbed_numa: Host) -> None:
    p = plan(
        manifest(TB_HEAD + '  fw0: {cpus: 2, memory: 128MiB, devices: [{pci: "81:00.0"}]}\n'),
        testbed_numa,
    )
    fw0 = p.placements["fw0"]
    assert fw0.numa_nodes == (1,) and all(testbed_numa.cpus[c].node == 1 for c in fw0.cpus)
    assert not set(fw0.cpus) & {0, 4}


def test_testbed_tree_multifunction_and_gpu_audio_come_along(testbed_numa: Host) -> None:
    # The GPU's audio function (43:00.1) has no reset of its own on this kernel, but it and
    # the GPU are alone behind root port 40:02.0: VFIO resets it through that bus, so the
    # GPU plans without `reset: none-ok`, and the plan says how the audio function is reset.
    lan0 = '  lan0: {cpus: 1, memory: 128MiB, devices: [{pci: "42:00.0"}]}\n'
    p = plan(
        manifest(
            TB_HEAD + lan0 + '  desk: {cpus: 1, memory: 128MiB, devices: [{pci: "43:00.0"}]}\n'
        ),
        testbed_numa,
    )
    assert not any(d.reset_none_ok for d in p.placements["desk"].devices)
    assert (
        "desk: 0000:43:00.1 (8086:293e) has no reset of its own: VFIO resets it through the "
        "bus below 0000:40:02.0, all of which desk holds" in p.notes
    )
    assert [str(d.address) for d in p.placements["lan0"].devices] == [
        "0000:42:00.0",
        "0000:42:00.1",
    ]
    assert [(str(d.address), d.added) for d in p.placements["desk"].devices] == [
        ("0000:43:00.0", False),
        ("0000:43:00.1", True),
    ]


def test_testbed_tree_device_behind_the_pci_bridge_needs_its_whole_group(
    testbed_numa: Host,
) -> None:
    # (87:02.0 has no reset method on this kernel: `reset: none-ok` accepts it)
    both = (
        '  a: {cpus: 1, memory: 128MiB, devices: [{pci: "87:01.0"}, '
        '{pci: "87:02.0", reset: none-ok}]}\n'
    )
    # In this server the conventional bridge is bound to shpchp, which the kernel never
    # counts as viable for VFIO: the group is refused, naming the bridge and the way out.
    msg = problems(manifest(TB_HEAD + both), testbed_numa)
    assert "bridge 0000:86:00.0" in msg and "shpchp" in msg and "rule 4" in msg
    # Once the operator has unbound shpchp, one endpoint alone is refused naming the other,
    # and both together are placed, the bridge staying with the host.
    bridge = PciAddress.parse("86:00.0")
    unbound = replace(
        testbed_numa,
        pci={**testbed_numa.pci, bridge: replace(testbed_numa.pci[bridge], driver=None)},
    )
    msg = problems(
        manifest(TB_HEAD + '  a: {cpus: 1, memory: 128MiB, devices: [{pci: "87:01.0"}]}\n'), unbound
    )
    group = testbed_numa.pci[PciAddress.parse("87:01.0")].iommu_group
    assert f"IOMMU group {group} of 0000:87:01.0 also holds 0000:87:02.0" in msg
    p = plan(manifest(TB_HEAD + both), unbound)
    assert [str(d.address) for d in p.placements["a"].devices] == ["0000:87:01.0", "0000:87:02.0"]


def test_testbed_tree_switch_downstream_devices_are_separate(testbed_numa: Host) -> None:
    p = plan(
        manifest(
            TB_HEAD
            + '  a: {cpus: 1, memory: 128MiB, devices: [{pci: "84:00.0"}]}\n'
            + '  b: {cpus: 1, memory: 128MiB, devices: [{pci: "85:00.0"}]}\n'
        ),
        testbed_numa,
    )
    ga, gb = p.placements["a"].iommu_groups, p.placements["b"].iommu_groups
    assert ga != gb and len(ga) == len(gb) == 1
    # the switch's ports share the endpoint's group but stay with the host
    assert [str(d.address) for d in p.placements["a"].devices] == ["0000:84:00.0"]


def test_testbed_tree_hugepages_per_node(testbed_numa: Host) -> None:
    # 64 free 2MiB pages per node in the preset, plus what node 1's free memory could become
    node1 = testbed_numa.nodes[1]
    have = node1.hugepages[2 * MiB].free + node1.free_bytes // (2 * MiB)
    head = TB_HEAD.replace('cpus: "0,4"}', 'cpus: "0,4", memory: 0GiB}')
    p = plan(manifest(head + f"  a: {{cpus: 1, memory: {have * 2}MiB, numa: 1}}\n"), testbed_numa)
    assert p.hugepages_needed() == {(1, 2 * MiB): have}
    msg = problems(
        manifest(head + f"  a: {{cpus: 1, memory: {have * 2 + 2}MiB, numa: 1}}\n"), testbed_numa
    )
    assert f"{have + 1} 2MiB pages on node 1, {have} are free or reservable" in msg


def test_rule2_share_hands_out_the_sibling_of_a_host_cpu(tree: TreeBuilder) -> None:
    h = host_of(two_node_smt(tree))
    text = 'version: 1\nhost: {reserve: {cpus: "0", memory: 2GiB}, smt: share}\npartitions:\n'
    p = plan(manifest(text + "  a: {cpus: 7, memory: 1GiB, numa: 0}\n"), h)
    assert 8 in p.placements["a"].cpus and 0 not in p.placements["a"].cpus
    # under isolate the same reserve list is refused: it splits core 0,8 with the host
    assert "not its SMT siblings 8" in problems(
        manifest(text.replace("smt: share", "smt: isolate") + "  a: {cpus: 2, memory: 1GiB}\n"), h
    )


# -- an unplaced partition gives back what it took -----------------------------------


def test_unplaced_partition_gives_back_cpus_memory_and_devices(tree: TreeBuilder) -> None:
    h = host_of(with_nics(two_node_smt(tree)))
    # big takes node 0's six free CPUs, then finds its memory does not fit there: small,
    # placed after it, gets those CPUs, and only big is refused, for its own reason.
    msg = problems(
        manifest(
            HEAD
            + "  big: {cpus: 6, memory: 8GiB, numa: 0}\n"
            + "  small: {cpus: 6, memory: 1GiB, numa: 0}\n"
        ),
        h,
    )
    assert (
        msg.startswith("site.yaml:5:26: big needs 8GiB of memory on node 0") and "small" not in msg
    ), msg
    # The same with an explicit CPU list, and with devices: a takes 81:00.0 and cannot
    # be placed; b's `id:` match then finds both NICs free.
    msg = problems(
        manifest(
            HEAD
            + '  a: {cpus: 20, memory: 1GiB, devices: [{pci: "81:00.0"}]}\n'
            + '  b: {cpus: 2, memory: 1GiB, devices: [{id: "8086:10d3", count: 2}]}\n'
            + '  c: {cpus: "1-3,9-11", memory: 9GiB}\n'
            + "  d: {cpus: 6, memory: 1GiB, numa: 0}\n"
        ),
        h,
    )
    lines = msg.splitlines()
    assert {x.split(": ", 1)[1].split()[0] for x in lines} == {"c", "a"}, msg
    assert "c needs 9GiB of memory on node 0" in msg and "a needs 20 CPUs" in msg
    # Without the unplaceable ones, the others are placed exactly as they were tried.
    p = plan(
        manifest(
            HEAD
            + '  b: {cpus: 2, memory: 1GiB, devices: [{id: "8086:10d3", count: 2}]}\n'
            + "  d: {cpus: 6, memory: 1GiB, numa: 0}\n"
        ),
        h,
    )
    assert [str(d.address) for d in p.placements["b"].devices] == ["0000:01:00.0", "0000:81:00.0"]
    assert len(p.placements["d"].cpus) == 6
