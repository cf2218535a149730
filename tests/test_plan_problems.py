"""Issue 18, points 3, 6 and 7: devices taken where the partition runs fastest (rule 6),
every problem of a broken site in one run, and every plan problem located at its field with
the host resources involved.

Hosts are the shipped snapshot of the emulated server (tests/fixtures/hosts/testbed-numa) and
trees written by TreeBuilder; manifests go through the real loader, plans through the real
planner and, for the JSON, the real command line.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from treebuilder import GiB, MiB, TreeBuilder

from partitioner.cli.main import main
from partitioner.errors import ManifestError, PlanError, PlanProblem
from partitioner.inventory import scan
from partitioner.inventory.model import Host
from partitioner.kernel.root import HostRoot
from partitioner.manifest.loader import loads
from partitioner.manifest.model import Manifest
from partitioner.planning.files import checked_plan
from partitioner.planning.planner import plan

FIXTURE = Path(__file__).parent / "fixtures" / "hosts" / "testbed-numa"

# The demo's host section (partitions/demo.yaml): CPUs 0 and 4 kept, 2MiB pages, TCG.
DEMO_HEAD = """\
version: 1
host:
  reserve:
    cpus: "0,4"
    memory: 256MiB
  smt: share
  accel: tcg
partitions:
"""


def manifest(text: str, head: str = DEMO_HEAD) -> Manifest:
    return loads(head + textwrap.indent(textwrap.dedent(text), "  "), file="site.yaml")


def numa_host() -> Host:
    return scan(HostRoot(FIXTURE))


def refused(m: Manifest, h: Host) -> list[PlanProblem]:
    with pytest.raises(PlanError) as e:
        plan(m, h)
    return e.value.problems


# -- point 3: a device asked by id: goes where the partition runs fastest --------------------


ROUTER = """\
  router:
    cpus: 1
    memory: 128MiB
    hugepages: 2MiB
    devices:
      - id: "8086:10d3"{count}
"""


def test_router_asking_any_e1000e_lands_on_node_0_with_its_local_nic() -> None:
    # 0000:01:00.0 is the lowest address but has no NUMA node; node 0 has free CPUs and a
    # free e1000e of its own, 0000:41:00.0: that is where the router runs fastest.
    p = plan(manifest(ROUTER.format(count="")), numa_host())
    router = p.placements["router"]
    assert [str(d.address) for d in router.devices] == ["0000:41:00.0"]
    assert router.numa_nodes == (0,)
    assert all(c in (1, 2, 3) for c in router.cpus)
    assert not any("no NUMA node" in n for n in p.notes)


def test_count_of_two_comes_from_one_node() -> None:
    p = plan(manifest(ROUTER.format(count="\n        count: 2")), numa_host())
    router = p.placements["router"]
    named = [str(d.address) for d in router.devices if not d.added]
    assert named == ["0000:41:00.0", "0000:42:00.0"]
    assert router.numa_nodes == (0,)


def test_a_function_of_no_node_only_when_no_local_one_is_free_and_the_plan_says_so() -> None:
    others = "".join(
        f'  own{i}:\n    cpus: 1\n    memory: 128MiB\n    hugepages: none\n    devices: [{{pci: "{a}"}}]\n'
        for i, a in enumerate(["0000:41:00.0", "0000:42:00.0", "0000:81:00.0", "0000:84:00.0"])
    )
    p = plan(manifest(others + ROUTER.format(count="")), numa_host())
    assert [str(d.address) for d in p.placements["router"].devices] == ["0000:01:00.0"]
    assert any(
        "router: 0000:01:00.0 (8086:10d3) has no NUMA node" in n and "no free 8086:10d3" in n
        for n in p.notes
    ), p.notes


def two_nodes_two_nics(tree: TreeBuilder) -> Host:
    """2 nodes of 4 cores x 2 threads; one e1000e on each node, the lower address on node 0."""
    tree.cpus(count=16, packages=2, threads=2, nodes=2, memory_per_node=8 * GiB)
    tree.node(0, memory_bytes=8 * GiB, free_bytes=6 * GiB, hugepages={2 * MiB: (0, 0)})
    tree.node(1, memory_bytes=8 * GiB, free_bytes=6 * GiB, hugepages={2 * MiB: (0, 0)})
    tree.kvm()
    tree.pci("0000:00:01.0", class_code="060400", driver="pcieport", iommu_group=1, numa_node=0)
    tree.pci("0000:01:00.0", iommu_group=2, numa_node=0, parent="0000:00:01.0")
    tree.pci("0000:80:01.0", class_code="060400", driver="pcieport", iommu_group=10, numa_node=1)
    tree.pci("0000:81:00.0", iommu_group=11, numa_node=1, parent="0000:80:01.0")
    return scan(HostRoot(tree.build()))


HEAD = """\
version: 1
host:
  reserve: {memory: 1GiB}
partitions:
"""


def test_lowest_address_on_a_full_node_does_not_refuse_a_site_that_fits_elsewhere(
    tree: TreeBuilder,
) -> None:
    # full takes every free CPU of node 0; router's lowest-address NIC is on node 0, yet it
    # fits on node 1 with node 1's own NIC.
    m = manifest(
        """\
        full: {cpus: 6, memory: 1GiB, numa: 0}
        router: {cpus: 2, memory: 1GiB, devices: [{id: "8086:10d3"}]}
        """,
        head=HEAD,
    )
    p = plan(m, two_nodes_two_nics(tree))
    router = p.placements["router"]
    assert [str(d.address) for d in router.devices] == ["0000:81:00.0"]
    assert router.numa_nodes == (1,)


# -- point 6: every problem at once -------------------------------------------------------


def test_validate_checks_the_cross_references_of_what_passed_the_schema() -> None:
    # a lacks `memory` and Web's name is wrong: their CPUs and devices are still checked
    # against the others (before, the two schema problems came alone and the other two
    # needed a second run).
    text = """\
    version: 1
    partitions:
      a:
        cpus: "1-2"
      Web:
        cpus: "2"
        memory: 1GiB
        devices:
          - pci: "0000:41:00.0"
      c:
        cpus: 1
        memory: 1GiB
        devices:
          - pci: "41:00.0"
    """
    with pytest.raises(ManifestError) as e:
        loads(textwrap.dedent(text), "site.yaml")
    got = [(p.line, p.path, p.message) for p in e.value.problems]
    assert [(line, path) for line, path, _ in got] == [
        (3, "partitions.a"),
        (5, "partitions.Web"),
        (6, "partitions.Web.cpus"),
        (14, "partitions.c.devices[0]"),
    ], got
    assert "needs `memory`" in got[0][2]
    assert "both take CPU 2" in got[2][2]
    assert "already named by partition Web" in got[3][2]


def test_plan_reports_device_fit_memory_and_file_problems_of_every_partition_at_once(
    tree: TreeBuilder, tmp_path: Path
) -> None:
    tree.cpus(count=16, packages=2, threads=2, nodes=2, memory_per_node=8 * GiB)
    tree.node(0, memory_bytes=8 * GiB, free_bytes=6 * GiB, hugepages={2 * MiB: (0, 0)})
    tree.node(1, memory_bytes=8 * GiB, free_bytes=6 * GiB, hugepages={2 * MiB: (0, 0)})
    tree.pci("0000:00:1e.0", class_code="060401", iommu_group=20, numa_node=0)
    tree.pci("0000:05:01.0", device="100e", iommu_group=20, numa_node=0, parent="0000:00:1e.0")
    tree.pci("0000:05:02.0", device="100e", iommu_group=20, numa_node=0, parent="0000:00:1e.0")
    h = scan(HostRoot(tree.build()))
    missing = tmp_path / "no-such-disk.img"
    m = manifest(
        f"""\
        listed: {{cpus: "0-3", memory: 9GiB, hugepages: none}}
        spread: {{cpus: 12, memory: 9GiB, hugepages: none, numa: [1]}}
        nic: {{cpus: 2, memory: 1GiB, hugepages: none, devices: [{{pci: "05:01.0"}}]}}
        disk: {{cpus: 2, memory: 1GiB, hugepages: none, disks: [{{path: {missing}}}]}}
        """,
        head=HEAD.replace("reserve: {memory: 1GiB}", "reserve: {memory: 1GiB}\n  accel: tcg"),
    )
    with pytest.raises(PlanError) as e:
        checked_plan(m, h)
    got = {(p.partition, p.field) for p in e.value.problems}
    # A CPU list that takes the host's CPU 0, and its memory too large: both, in one run.
    assert ("listed", "cpus") in got and ("listed", "memory") in got, e.value
    # Too few CPUs on its node, and too much memory there: both.
    assert ("spread", "cpus") in got and ("spread", "memory") in got, e.value
    assert ("nic", "devices[0]") in got and ("disk", "disks[0].path") in got, e.value


# -- point 7: every plan problem located, with the host's part ---------------------------


def test_a_fit_problem_points_at_cpus_and_says_who_holds_them() -> None:
    m = manifest(
        """\
        fw:
          cpus: "1-2"
          memory: 128MiB
        db:
          cpus: 3
          memory: 128MiB
          numa: [0]
        """
    )
    [problem] = refused(m, numa_host())
    assert (problem.file, problem.line, problem.column) == ("site.yaml", 13, 11)
    assert (problem.partition, problem.field) == ("db", "cpus")
    assert str(problem).startswith("site.yaml:13:11: db needs 3 CPUs on node 0")
    assert "CPUs 1-2 are fw's" in problem.message and "CPU 0 is the host's" in problem.message
    assert problem.host.cpus == (0, 1, 2) and problem.host.held_by == "fw, the host"
    assert problem.host.node == 0


def test_no_numa_list_is_suggested_when_the_host_is_too_small_for_it() -> None:
    # Six CPUs are free on the whole host: no list of nodes can give seven.
    [problem] = refused(manifest("  big: {cpus: 7, memory: 128MiB}\n"), numa_host())
    assert problem.field == "cpus" and "no node has room" in problem.message
    assert "set `numa:`" not in problem.message
    assert "no `numa:` list can help" in problem.message
    # Five fit across both nodes together: then the list is the way, and it is said.
    [problem] = refused(manifest("  big: {cpus: 5, memory: 128MiB}\n"), numa_host())
    assert "set `numa:` to a list of nodes" in problem.message


def test_a_device_problem_names_a_handful_and_counts_the_rest(tree: TreeBuilder) -> None:
    tree.cpus(count=4, packages=1, threads=1, nodes=1, memory_per_node=8 * GiB)
    tree.node(0, memory_bytes=8 * GiB, free_bytes=6 * GiB, hugepages={2 * MiB: (0, 0)})
    tree.kvm()
    for i in range(40):
        tree.pci(f"0000:{0x10 + i:02x}:00.0", iommu_group=100 + i, numa_node=0)
    h = scan(HostRoot(tree.build()))
    m = manifest(
        '  a: {cpus: 1, memory: 1GiB, devices: [{id: "8086:10d3", count: 41}]}\n', head=HEAD
    )
    [problem] = refused(m, h)
    assert problem.field == "devices[0]" and problem.line == 5
    assert "this host has 40 8086:10d3 functions" in problem.message
    assert "0000:14:00.0 is free and 35 more" in problem.message
    assert "0000:15:00.0" not in problem.message


def test_plan_json_carries_each_problem_as_an_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(
        DEMO_HEAD + '  fw:\n    cpus: "1-2"\n    memory: 128MiB\n'
        "  db:\n    cpus: 3\n    memory: 128MiB\n    numa: [0]\n"
    )
    rc = main(["--host-root", str(FIXTURE), "plan", "--json", str(site)])
    out, err = capsys.readouterr()
    assert rc == 3
    doc = json.loads(out)
    assert doc["ok"] is False and doc["exit"] == 3
    [problem] = doc["problems"]
    assert problem["file"] == str(site) and (problem["line"], problem["column"]) == (13, 11)
    assert problem["partition"] == "db" and problem["field"] == "cpus"
    assert problem["host"] == {"cpus": [0, 1, 2], "held_by": "fw, the host", "node": 0}
    assert problem["message"].startswith("db needs 3 CPUs on node 0")
    # On stderr the same problem reads FILE:LINE:COL first.
    assert f"{site}:13:11: db needs 3 CPUs on node 0" in err
