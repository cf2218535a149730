"""Inside the emulated server: the inventory sees what the topology built.

The topology file is the single source of what to expect (``expected_functions``
says where each function sits and which IOMMU group it must share); sysfs is
walked by that path, so bus numbers the guest chose do not matter.
"""

from __future__ import annotations

import re
from collections import defaultdict

import pytest

from partitioner.cpuset import CpuSet
from partitioner.inventory.model import Host
from partitioner.kernel.root import HostRoot
from partitioner.pci import PciAddress
from partitioner.testbed.topology import ExpectedFunction, Topology, expected_functions
from partitioner.units import MiB


def locate(root: HostRoot, e: ExpectedFunction) -> PciAddress:
    """Walk /sys/devices from the root bus down the (slot, function) path."""
    here = f"/sys/devices/pci0000:{e.root_bus:02x}"
    for slot, fn in e.path:
        pattern = re.compile(rf"^0000:[0-9a-f]{{2}}:{slot:02x}\.{fn}$")
        found = [n for n in root.listdir(here) if pattern.match(n)]
        assert len(found) == 1, f"no single {slot:02x}.{fn} under {here}: {root.listdir(here)}"
        here = f"{here}/{found[0]}"
    return PciAddress.parse(here.rsplit("/", 1)[1])


@pytest.fixture(scope="module")
def placed(live_root: HostRoot, topology: Topology) -> list[tuple[ExpectedFunction, PciAddress]]:
    return [(e, locate(live_root, e)) for e in expected_functions(topology)]


def test_every_function_of_the_topology_is_there(
    placed: list[tuple[ExpectedFunction, PciAddress]], live_host: Host
) -> None:
    for e, addr in placed:
        fn = live_host.pci.get(addr)
        assert fn is not None, f"{addr} ({e.model}) is not in the inventory"
        assert fn.id == e.id, f"{addr}: expected {e.model} ({e.id}), found {fn.id}"
        assert not fn.is_bridge


def test_iommu_groups_are_the_ones_the_topology_implies(
    placed: list[tuple[ExpectedFunction, PciAddress]], live_host: Host
) -> None:
    assert live_host.has_iommu
    wanted: dict[str, set[PciAddress]] = defaultdict(set)
    for e, addr in placed:
        wanted[e.group_key].add(addr)
    seen_groups: dict[int, str] = {}
    for key, addrs in sorted(wanted.items()):
        groups = {live_host.pci[a].iommu_group for a in addrs}
        assert len(groups) == 1 and None not in groups, (
            f"{key}: {sorted(map(str, addrs))} in {groups}"
        )
        gid = groups.pop()
        assert gid is not None
        assert gid not in seen_groups, f"{key} and {seen_groups.get(gid)} share group {gid}"
        seen_groups[gid] = key
        members = live_host.iommu_groups[gid].members
        endpoints = {a for a in members if not live_host.pci[a].is_bridge}
        assert endpoints == addrs, (
            f"{key}: group {gid} holds endpoints {sorted(map(str, endpoints))}, "
            f"expected {sorted(map(str, addrs))}"
        )
        bridges = [a for a in members if live_host.pci[a].is_bridge]
        if key.startswith("bridge"):
            # Conventional PCI cannot isolate: the PCIe-to-PCI bridge shares the group.
            assert len(bridges) == 1, f"{key}: bridges in group {gid}: {bridges}"
            assert all(live_host.pci[a].upstream[-1] == bridges[0] for a in addrs)
        elif key.startswith("port"):
            # A root port does ACS: its slot's functions are alone, the port elsewhere.
            assert bridges == [], f"{key}: group {gid} also holds {bridges}"


def test_multifunction_and_gpu_slots_share_one_group(
    placed: list[tuple[ExpectedFunction, PciAddress]], live_host: Host, topology: Topology
) -> None:
    slots: dict[tuple[int, int, int], set[int | None]] = defaultdict(set)
    for _e, addr in placed:
        slots[addr.slot_key].add(live_host.pci[addr].iommu_group)
    multi = [p for p in topology.ports if p.slot is not None and p.slot.multifunction]
    assert multi, "the topology has no multi-function slot to check"
    for key, groups in slots.items():
        assert len(groups) == 1, f"slot {key}: functions in groups {groups}"


def test_devices_are_on_their_pxb_node(
    placed: list[tuple[ExpectedFunction, PciAddress]], live_host: Host
) -> None:
    for e, addr in placed:
        # Off an expander bridge the kernel has no _PXM for the device: node -1 (None).
        assert live_host.pci[addr].numa_node == e.node, f"{addr} ({e.model})"


def test_cpus_nodes_and_smt_siblings(live_host: Host, topology: Topology) -> None:
    t = topology.cpu.threads
    assert sorted(live_host.cpus) == list(range(topology.cpu.vcpus))
    for cpu in live_host.cpus.values():
        first = cpu.id - cpu.id % t
        assert cpu.siblings == CpuSet(range(first, first + t)), f"cpu{cpu.id}"
        assert cpu.online
    assert sorted(live_host.nodes) == [n.id for n in topology.nodes]
    for n in topology.nodes:
        assert live_host.nodes[n.id].cpus == n.cpus
        assert {live_host.cpus[c].node for c in n.cpus} == {n.id}


def test_memory_and_hugepages_per_node(live_host: Host, topology: Topology) -> None:
    two_mb = 2 * MiB
    assert two_mb in live_host.hugepage_sizes
    for n in topology.nodes:
        node = live_host.nodes[n.id]
        # The kernel keeps some of each node for itself; most of it must be there.
        assert 0.8 * n.memory_bytes < node.memory_bytes <= n.memory_bytes
        pool = node.hugepages[two_mb]
        assert pool.total == n.hugepages_2m, f"node {n.id}: {pool}"
        assert pool.free == n.hugepages_2m
