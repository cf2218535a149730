"""hwloc as an outside oracle: for every tree of its test corpus, scan() agrees with lstopo.

Each NAME.tar.bz2 in ../shared/hosts/hwloc holds a real machine's /sys and
/proc; NAME.console or NAME.xml is what hwloc's lstopo reported for it.  The
counts compared are those the partitioner acts on: usable PUs, cores,
packages, NUMA nodes and their memory, and PCI functions with their ids and
locality.  Where hwloc shows less than the kernel has on purpose, the test
asserts the relation and says why.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from corpus import HWLOC_DIR, Trees, names

from partitioner.cpuset import CpuSet
from partitioner.inventory import scan
from partitioner.inventory.model import Host
from partitioner.kernel.root import HostRoot
from partitioner.pci import PciAddress

NAMES = names()

_UNITS = {"KB": 1024, "KiB": 1024, "MB": 1024**2, "MiB": 1024**2, "GB": 1024**3, "GiB": 1024**3,
          "TB": 1024**4, "TiB": 1024**4}  # fmt: skip


@dataclass
class Oracle:
    """What lstopo said about one tree."""

    counts: dict[str, int] = field(default_factory=dict)  # Package, Core, PU, NUMANode
    # node os_index -> (memory in bytes, the unit it was printed in: the rounding allowed)
    node_memory: dict[int, tuple[int, int]] = field(default_factory=dict)
    pu_os_indexes: set[int] | None = None
    # PCI functions hwloc kept: address -> (class "0200", vendor, device, cpuset of its locality)
    pci: dict[str, tuple[str, str, str, CpuSet | None]] = field(default_factory=dict)
    machine_cpuset: CpuSet | None = None
    # CPU kinds (hybrid parts): efficiency rank -> cpuset; the highest rank is the fastest.
    cpu_kinds: dict[int, CpuSet] = field(default_factory=dict)
    # PCI functions hwloc shows as bridges (PCIBridge / type="Bridge"): it tells them by
    # their header type in config space, as the kernel does, so a host bridge is not one.
    bridges: set[str] = field(default_factory=set)


def parse_console(text: str) -> Oracle:
    o = Oracle()
    for line in text.splitlines():
        m = re.match(r"^\s*(?:Special )?depth -?\d+:\s+(\d+) (\w+) \(type", line)
        if m:
            o.counts[m.group(2)] = int(m.group(1))
            continue
        m = re.match(r"^\s*NUMANode(?:\(\w+\))? L#\d+ \(P#(\d+) local=(\d+)(\w+)", line)
        if m:
            unit = _UNITS[m.group(3)]
            o.node_memory[int(m.group(1))] = (int(m.group(2)) * unit, unit)
        m = re.match(r"^CPU kind #\d+ efficiency (\d+) cpuset (0x[0-9a-f,x]+)", line)
        if m:
            o.cpu_kinds[int(m.group(1))] = CpuSet.from_mask(m.group(2).replace("0x", ""))
        m = re.match(r"^\s*PCI(Bridge)? L#\d+ \(busid=(\S+) id=(\w{4}):(\w{4}) class=(\w{4})", line)
        if m:
            o.pci[m.group(2)] = (m.group(5), m.group(3), m.group(4), None)
            if m.group(1):
                o.bridges.add(m.group(2))
    return o


def _xml_cpuset(text: str | None) -> CpuSet | None:
    return CpuSet.from_mask(text.replace("0x", "")) if text else None


def parse_xml(text: str) -> Oracle:
    o = Oracle()
    root = ET.fromstring(text)
    pus: set[int] = set()

    def walk(el: ET.Element, locality: CpuSet | None) -> None:
        for child in el.findall("object"):
            t = child.get("type", "")
            o.counts[t] = o.counts.get(t, 0) + 1
            cpuset = _xml_cpuset(child.get("cpuset"))
            if t == "Machine":
                o.machine_cpuset = cpuset
            if t == "PU":
                pus.add(int(child.get("os_index", "-1")))
            if t == "NUMANode":
                o.node_memory[int(child.get("os_index", "-1"))] = (
                    int(child.get("local_memory", "0")),
                    1,
                )
            busid = child.get("pci_busid")
            if t in ("PCIDev", "Bridge") and busid:
                m = re.match(r"^(\w{4}) \[(\w{4}):(\w{4})\]", child.get("pci_type", ""))
                if m:
                    o.pci[busid] = (m.group(1), m.group(2), m.group(3), locality)
                    if t == "Bridge":
                        o.bridges.add(busid)
            walk(child, cpuset if cpuset is not None else locality)

    walk(root, None)
    o.pu_os_indexes = pus
    return o


def oracle(name: str) -> Oracle:
    console = HWLOC_DIR / f"{name}.console"
    if console.exists():
        return parse_console(console.read_text())
    return parse_xml((HWLOC_DIR / f"{name}.xml").read_text())


def _cores(h: Host) -> set[CpuSet]:
    """A core is a set of SMT siblings: core_id alone repeats inside a package on
    multi-die parts without die_id (AMD Magny-Cours: the 48amd64 and cgroup2 trees)."""
    return {c.siblings for c in h.cpus.values() if c.online and c.allowed}


# Where hwloc reports something the kernel's files do not say, and why.
# AMD Bulldozer: the kernel gives both cores of a compute unit as thread
# siblings; hwloc, knowing the CPU model, splits them into two cores under one
# compute unit (its L1i cache).  The partitioner keeps the kernel's pairs: two
# owners sharing a compute unit would share its front end and FPU.
CORES_ARE_COMPUTE_UNITS = {"64amd64-4s2n4ca2co"}
# hwloc's expected output for this tree shows package 3's CPUs inside package 2,
# though every physical_package_id, core_siblings list and /proc/cpuinfo
# "physical id" of the tree says 4 disjoint packages; the kernel's view is kept.
PACKAGES_AS_THE_KERNEL_SAYS = {"40intel64-4n10c+pci-conflicts": 4}
# These trees test hwloc's own locality overrides (its HWLOC_PCI_LOCALITY test
# setting), not the kernel's: their PCI objects sit where the test put them.
LOCALITY_FORCED_BY_HWLOC_TEST = {"40intel64-2g2n4c+pcilocality", "fakepcilocalities"}


def _packages(h: Host) -> set[int]:
    return {c.package for c in h.cpus.values() if c.online and c.allowed}


def _allowed_nodes(root: Path) -> set[int] | None:
    """The cgroup's cpuset.mems, read here independently of the code under test."""
    for f in ("cpuset.mems.effective", "mems"):
        for p in root.rglob(f):
            text = p.read_text().strip()
            if p.parent.name in ("sys", "cgroup", "unified", "cpuset") and f == "mems":
                continue  # the root cpuset, not the process's
            return set(CpuSet.parse(text))
    return None


def test_corpus_is_there() -> None:
    assert len(NAMES) >= 18, f"hwloc corpus missing from {HWLOC_DIR}"


@pytest.mark.parametrize("name", NAMES)
def test_topology_agrees_with_lstopo(name: str, hwloc_trees: Trees) -> None:
    root = hwloc_trees[name]
    h = scan(HostRoot(root))
    o = oracle(name)

    # PUs: hwloc shows the online CPUs the process may use (disallowed ones are
    # hidden by default), which is exactly Host.usable_cpus.
    assert len(h.usable_cpus) == o.counts["PU"], (h.usable_cpus, o.counts)
    if o.pu_os_indexes is not None:
        assert set(h.usable_cpus) == o.pu_os_indexes

    # Packages: those with a usable PU; hwloc also keeps a package whose NUMA
    # node the cgroup allows even when none of its PUs is allowed (it hangs the
    # node there), so those count too where a cgroup restricts memory.
    allowed_nodes = _allowed_nodes(root)
    packages = _packages(h)
    if allowed_nodes is not None:
        packages |= {c.package for c in h.cpus.values() if c.online and c.node in allowed_nodes}
    if name in PACKAGES_AS_THE_KERNEL_SAYS:
        assert len(packages) == PACKAGES_AS_THE_KERNEL_SAYS[name] == o.counts["Package"] + 1
    else:
        assert len(packages) == o.counts["Package"]

    # Cores: lstopo --merge hides the Core level when it adds nothing (every core
    # one PU); then the PU count stands for it.
    cores = o.counts.get("Core", o.counts["PU"])
    if name in CORES_ARE_COMPUTE_UNITS:
        assert len(_cores(h)) == o.counts["L1iCache"] == cores // 2
    else:
        assert len(_cores(h)) == cores

    # NUMA nodes: hwloc hides those outside the cgroup's cpuset.mems; the host
    # still has them and Host keeps them (with a note).  Everything else agrees.
    ours = {n for n in h.nodes if allowed_nodes is None or n in allowed_nodes}
    assert ours == set(o.node_memory), (sorted(h.nodes), o.node_memory)
    assert len(ours) == o.counts["NUMANode"]
    if allowed_nodes is not None and set(h.nodes) - allowed_nodes:
        assert any("allows memory on NUMA node" in n for n in h.notes)

    # Memory per node, to the rounding of the unit lstopo printed it in.
    for node, (theirs, unit) in o.node_memory.items():
        assert abs(h.nodes[node].memory_bytes - theirs) <= unit, (node, h.nodes[node], theirs)


@pytest.mark.parametrize("name", NAMES)
def test_pci_agrees_with_lstopo(name: str, hwloc_trees: Trees) -> None:
    h = scan(HostRoot(hwloc_trees[name]))
    o = oracle(name)
    # lstopo keeps only the "important" PCI functions (bridges leading somewhere,
    # devices of known classes): each one it shows is ours, with the same ids.
    for busid, (cls, vendor, device, locality) in o.pci.items():
        fn = h.pci.get(PciAddress.parse(busid))
        assert fn is not None, f"{busid} is in hwloc's view but not scanned"
        assert (fn.class_code[:4], fn.vendor, fn.device) == (cls, vendor, device)
        # Bridges by header type (1 or 2), as hwloc and the kernel tell them: not by
        # class 06xx (a host bridge 0600 is an endpoint with header type 0).
        assert fn.is_bridge == (busid in o.bridges), (busid, cls)
        # Locality: hwloc hangs a device under the object of its local CPUs; the
        # NUMA node the kernel gives the function must hold CPUs of that object.
        if (
            name not in LOCALITY_FORCED_BY_HWLOC_TEST
            and locality is not None
            and fn.numa_node is not None
            and locality != o.machine_cpuset
        ):
            node = h.nodes.get(fn.numa_node)
            assert node is not None
            assert node.cpus and set(node.cpus) <= set(locality), (busid, fn.numa_node, locality)
    if o.pci:
        assert len(h.pci) >= len(o.pci)
        # The upstream chain is made of bridges we scanned.
        for fn in h.pci.values():
            for up in fn.upstream:
                assert up in h.pci and h.pci[up].is_bridge, (fn.address, up)


def test_pci_counts_where_known(hwloc_trees: Trees) -> None:
    """The trees with PCI devices, counted by hand from their sysfs (lstopo filters some)."""
    for name in NAMES:
        root = hwloc_trees[name]
        devices = root / "sys/bus/pci/devices"
        expected = len(os.listdir(devices)) if devices.is_dir() else 0
        h = scan(HostRoot(root))
        assert len(h.pci) == expected, name
    conflicts = scan(HostRoot(hwloc_trees["40intel64-4n10c+pci-conflicts"]))
    raid = conflicts.pci[PciAddress.parse("0000:01:00.0")]
    assert raid.class_code == "010400" and raid.upstream == (PciAddress.parse("0000:00:03.0"),)


def test_offline_cpus_tree(hwloc_trees: Trees) -> None:
    h = scan(HostRoot(hwloc_trees["16em64t-4s2c2t-offlines"]))
    offline = {c.id for c in h.cpus.values() if not c.online}
    assert offline == {2, 5, 13, 14}
    assert len(h.cpus) == 16  # offline CPUs are kept, never handed out


def test_buggy_numa_tree(hwloc_trees: Trees) -> None:
    """Every node claims every CPU: like hwloc, keep the first node and say so."""
    h = scan(HostRoot(hwloc_trees["8em64t-2s2ca2c-buggynuma"]))
    assert list(h.nodes) == [0] and h.nodes[0].cpus == CpuSet(range(8))
    assert any("more than one NUMA node" in n for n in h.notes)


def test_memory_only_nodes_tree(hwloc_trees: Trees) -> None:
    h = scan(HostRoot(hwloc_trees["fakeheteromemtiers"]))
    cpuless = {n.id for n in h.nodes.values() if not n.cpus}
    assert cpuless == {4, 6, 8, 9}
    assert sum(len(n.cpus) for n in h.nodes.values()) == len(h.online_cpus)


def test_cgroup_trees(hwloc_trees: Trees) -> None:
    h = scan(HostRoot(hwloc_trees["32amd64-4s2n4c-cgroup2"]))
    assert len(h.cpus) == 32 and len(h.usable_cpus) == 6
    assert all(c.online for c in h.cpus.values())
    h1 = scan(HostRoot(hwloc_trees["16amd64-4n4c-cgroup-distance-merge"]))
    assert h1.usable_cpus == CpuSet(range(4))


def test_hybrid_tree_kinds(hwloc_trees: Trees) -> None:
    """No cpu_core/cpu_atom in this tree: kinds come from base frequencies, as hwloc's do."""
    name = "20em64t-hybrid-1p6c2t+2ca4co1t"
    h = scan(HostRoot(hwloc_trees[name]))
    o = oracle(name)
    performance = o.cpu_kinds[max(o.cpu_kinds)]
    assert CpuSet(c.id for c in h.cpus.values() if c.kind == "core") == performance
    assert {c.kind for c in h.cpus.values() if c.id not in performance} == {"atom"}
    assert len(performance) == 12  # 6 performance cores with 2 threads each


def test_uniform_trees_have_no_kinds(hwloc_trees: Trees) -> None:
    for name in NAMES:
        if "hybrid" not in name:
            h = scan(HostRoot(hwloc_trees[name]))
            assert {c.kind for c in h.cpus.values()} == {""}, name


def test_hugepage_sizes_tree(hwloc_trees: Trees) -> None:
    h = scan(HostRoot(hwloc_trees["2i386-2t-hugepagesizecount"]))
    assert h.hugepage_sizes == (2 * 1024**2, 16 * 1024**3)


@pytest.mark.parametrize("name", NAMES)
def test_snapshot_of_corpus_tree(name: str, hwloc_trees: Trees, tmp_path: Path) -> None:
    """A snapshot of a real machine's tree reads back as the same host."""
    from partitioner.inventory.snapshot import take_snapshot

    src = HostRoot(hwloc_trees[name])
    take_snapshot(src, tmp_path / "snap")
    assert scan(HostRoot(tmp_path / "snap")) == scan(src)
