"""One answer to "can this function be given to a partition?": inspect, plan and apply agree.

For every PCI function of the emulated server's snapshot (tests/fixtures/hosts/
testbed-numa) and of every tree of hwloc's corpus, three verbs are asked:

- ``inspect``: the ``assignable`` / ``why_not`` of its JSON;
- ``plan``: a manifest with one small partition naming that function alone,
  with and without ``reset: none-ok``;
- ``apply``: the refusal check its ClaimGroup step makes before it writes
  anything (``partitioner.vfio.claim.refusals`` for each group the plan would claim, with
  the ``reset: none-ok`` addresses the plan passes it), and, where the plan
  refuses a function for a group, the same check refusing that group.

They must give the same verdict.  Before one verdict, ``plan`` accepted the GPU
of the test bed (0000:43:00.0) whose audio function has no reset method, which
``inspect`` and ``apply`` refused; now all three accept it, the audio function
being reset through its bus (docs/decisions.md, "Reset through the bus").
"""

from __future__ import annotations

from pathlib import Path

import pytest
from corpus import Trees, names
from fakekernel import FakeKernelRoot
from treebuilder import TreeBuilder

from partitioner.cli.inspect import to_json
from partitioner.errors import DeviceError, PlanError
from partitioner.inventory import scan
from partitioner.inventory.model import Host
from partitioner.kernel.root import HostRoot
from partitioner.manifest.loader import loads
from partitioner.pci import PciAddress
from partitioner.planning.planner import plan
from partitioner.vfio.claim import claim_group, refusals, release_group
from partitioner.vfio.preview import claim_preview

TESTBED_NUMA = Path(__file__).resolve().parent / "fixtures" / "hosts" / "testbed-numa"

# The smallest partition any host can hold, so that only the device decides.
HEAD = """\
version: 1
host: {reserve: {cpus: 1, memory: 0GiB}, smt: share, accel: tcg}
partitions:
  p:
    cpus: 1
    memory: 4MiB
    hugepages: none
"""


def _plan(host: Host, device: str = "") -> tuple[bool, str]:
    text = HEAD + (f"    devices: [{device}]\n" if device else "")
    try:
        result = plan(loads(text, "site.yaml"), host)
    except PlanError as e:
        return False, "\n".join(map(str, e.problems))
    return "p" in result.placements, ""


def _agree(host: Host, label: str) -> int:
    """Assert the three verdicts agree on every function of ``host``; the number compared."""
    ok, _ = _plan(host)
    if not ok and host.pci:
        # A host that cannot hold even a device-less partition says nothing about devices:
        # then every device plan must fail too, for the same reasons at least.
        for addr in host.pci:
            assert not _plan(host, f'{{pci: "{addr}"}}')[0], (label, addr)
        return 0
    inspected = {f["address"]: f for f in to_json(host)["pci"]}
    compared = 0
    for addr in sorted(host.pci):
        a = str(addr)
        shown = inspected[a]
        v = claim_preview(host, addr)
        assert (shown["assignable"], shown["why_not"]) == (v.assignable, v.why_not), (label, a)
        for none_ok in (False, True):
            entry = f'{{pci: "{a}"' + (", reset: none-ok}" if none_ok else "}")
            placed, problems = _plan(host, entry)
            # inspect: assignable with this entry, and nothing else of its groups must be named
            expected = not v.blockers(none_ok=none_ok) and not v.must_name
            if not none_ok:
                expected_from_json = shown["assignable"] and not v.must_name
                assert expected == expected_from_json, (label, a)
            assert placed == expected, (label, a, none_ok, shown["why_not"], problems)
            if not placed:
                # plan says the same reasons inspect gives
                for sentence in v.refusals:
                    if host.has_iommu:
                        assert sentence in problems, (label, a, sentence, problems)
                if v.no_reset and not none_ok and not v.refusals:
                    assert "has no reset method" in problems, (label, a, problems)
                for m in v.must_name if not v.refusals else ():
                    assert f"also holds {m}" in problems, (label, a, problems)
            # apply: the check before any write, for each group the plan would claim
            plan_none_ok = {a, *map(str, v.takes_with_it)} if none_ok else set()
            claim_refused = [g for g in v.groups if refusals(host, g, reset_none_ok=plan_none_ok)]
            if placed:
                assert not claim_refused, (label, a, none_ok)
            elif host.has_iommu and v.groups and not v.must_name:
                # refused for its groups' sake (not for being a bridge, or absent):
                # apply's claim refuses at least one of those groups too
                assert claim_refused, (label, a, none_ok, problems)
            compared += 1
    return compared


def test_testbed_snapshot_one_verdict() -> None:
    host = scan(HostRoot(TESTBED_NUMA))
    assert _agree(host, "testbed-numa") == 2 * len(host.pci)
    # The GPU of the test bed: its audio function (0000:43:00.1) has no reset of its own, but
    # the two are alone behind root port 0000:40:02.0, so VFIO resets the audio function
    # through that bus: no `reset: none-ok` needed, for plan and for apply's claim alike.
    gpu = claim_preview(host, PciAddress.parse("43:00.0"))
    assert gpu.added == (PciAddress.parse("43:00.1"),) and gpu.assignable
    assert not host.pci[PciAddress.parse("43:00.1")].own_reset
    assert gpu.bus_reset == (PciAddress.parse("43:00.1"),) and not gpu.no_reset
    assert _plan(host, '{pci: "43:00.0"}')[0]
    assert not refusals(host, 22, reset_none_ok=set())
    assert not refusals(host, 22, reset_none_ok=set(), partition={"0000:43:00.0"})


@pytest.mark.parametrize("name", names())
def test_hwloc_corpus_one_verdict(name: str, hwloc_trees: Trees) -> None:
    host = scan(HostRoot(hwloc_trees[name]))
    _agree(host, name)


def test_every_kind_of_function_with_the_fake_kernel(tree: TreeBuilder) -> None:
    """A host with one of each case, and apply's claim run for real on the fake kernel:
    where plan places a function, claim_group takes its groups (then gives them back);
    where plan refuses it for a group, claim_group refuses too, before any write."""
    t = tree
    t.cpus(count=4)
    t.node(0, memory_bytes=8 << 30, free_bytes=6 << 30)
    # the chipset: host bridge alone, an ISA bridge (bound) with SMBus, an ISA bridge
    # (unbound) with SATA and audio
    t.pci("0000:00:00.0", class_code="060000", iommu_group=0)
    t.pci("0000:00:1f.0", class_code="060100", driver="lpc_ich", iommu_group=1)
    t.pci("0000:00:1f.3", class_code="0c0500", driver="i801_smbus", iommu_group=1)
    t.pci("0000:00:1e.0", class_code="060100", iommu_group=2)
    t.pci("0000:00:1e.2", class_code="010601", driver="ahci", iommu_group=2)
    t.pci("0000:00:1e.3", class_code="040300", iommu_group=2, reset_methods=())
    # a root port with a free NIC; a PCI bridge on shpchp with two NICs; one on pcieport
    t.pci("0000:00:01.0", class_code="060400", driver="pcieport", iommu_group=3)
    t.pci("0000:01:00.0", driver="e1000e", iommu_group=4, parent="0000:00:01.0")
    t.pci("0000:00:02.0", class_code="060400", driver="shpchp", iommu_group=5)
    t.pci("0000:02:01.0", driver="e1000", iommu_group=5, parent="0000:00:02.0")
    t.pci("0000:02:02.0", driver="e1000", iommu_group=5, parent="0000:00:02.0")
    t.pci("0000:00:03.0", class_code="060400", driver="pcieport", iommu_group=6)
    t.pci("0000:03:01.0", driver="e1000", iommu_group=6, parent="0000:00:03.0")
    t.pci("0000:03:02.0", driver="e1000", iommu_group=6, parent="0000:00:03.0")
    # a GPU whose audio has no reset, the boot VGA with its audio, slot-mates in two groups
    t.pci("0000:04:00.0", vendor="10de", class_code="030000", iommu_group=7, boot_vga=False)
    t.pci("0000:04:00.1", vendor="10de", class_code="040300", iommu_group=7, reset_methods=())
    t.pci("0000:05:00.0", vendor="1234", class_code="030000", iommu_group=8, boot_vga=True)
    t.pci("0000:05:00.1", class_code="040300", iommu_group=8)
    t.pci("0000:06:00.0", driver="igb", iommu_group=9, netdevs=("enp6s0f0",))
    t.pci("0000:06:00.1", driver="igb", iommu_group=10, netdevs=("enp6s0f1",))
    t.pci("0000:06:00.2", driver="igb", iommu_group=11, netdevs=("enp6s0f2",), reset_methods=())
    t.netdev_up("enp6s0f1", default_route=True)
    # the root disk's controller
    t.pci("0000:07:00.0", class_code="010802", driver="nvme", iommu_group=12)
    t.disk("nvme0n1", "0000:07:00.0", partitions=2)
    t.mount("nvme0n1p2", "/")
    t.driver("vfio-pci")
    t.build()
    fk = FakeKernelRoot(t)
    host = scan(fk)
    assert _agree(host, "built") == 2 * len(host.pci)
    placed_some = refused_some = 0
    for addr in sorted(host.pci):
        v = claim_preview(host, addr)
        for none_ok in (False, True):
            entry = f'{{pci: "{addr}"' + (", reset: none-ok}" if none_ok else "}")
            text = HEAD + f"    devices: [{entry}]\n"
            try:
                result = plan(loads(text, "site.yaml"), host)
            except PlanError:
                result = None
            if result is not None:
                p = result.placements["p"]
                ok = {str(d.address) for d in p.devices if d.reset_none_ok}
                claims = [claim_group(fk, host, g, reset_none_ok=ok) for g in p.iommu_groups]
                for c in reversed(claims):
                    release_group(fk, c)
                placed_some += 1
            elif v.groups and not v.must_name:
                plan_ok = {str(addr), *map(str, v.takes_with_it)} if none_ok else set()
                refused = False
                for g in v.groups:
                    before = len(fk.writes)
                    try:
                        release_group(fk, claim_group(fk, host, g, reset_none_ok=plan_ok))
                    except DeviceError as e:
                        assert "cannot be claimed" in str(e)
                        assert len(fk.writes) == before  # refused before any write
                        refused = True
                assert refused, (addr, none_ok)
                refused_some += 1
    assert placed_some >= 5 and refused_some >= 5
    # The chipset stays: the unbound ISA bridge does not stop its group, the bound one does.
    assert claim_preview(host, PciAddress.parse("00:1e.2")).blockers(none_ok=True) == ()
    assert "lpc_ich" in (claim_preview(host, PciAddress.parse("00:1f.3")).why_not or "")
    assert not claim_preview(host, PciAddress.parse("00:00.0")).assignable


def test_bridges_are_told_by_header_type(tree: TreeBuilder) -> None:
    """Config space byte 0x0e (low 7 bits) says what is a bridge, as the kernel's
    pci_is_bridge; the class says it where a tree has no config file, and where it settles
    the question (an endpoint's class, a PCI bridge's: docs/decisions.md)."""
    tree.cpus(count=2)
    tree.pci("0000:00:00.0", class_code="060000", iommu_group=0)  # host bridge: header 0
    tree.pci("0000:00:1f.0", class_code="060100", iommu_group=1)  # ISA bridge: header 0
    tree.pci("0000:00:01.0", class_code="060400", iommu_group=2)  # PCI bridge: header 1
    tree.pci("0000:00:02.0", class_code="060700", iommu_group=3)  # CardBus: header 2
    # A multi-function bridge sets bit 7 of the header type: still type 1.
    tree.pci("0000:00:03.0", class_code="060900", iommu_group=4, header_type=0x81)
    # Header type says bridge whatever the class says (it is what the kernel reads).
    tree.pci("0000:00:04.0", class_code="068000", iommu_group=5, header_type=1)
    # Without a config file: the class decides (0604 / 0607 / 0609 have header type 1 or 2).
    tree.pci("0000:00:05.0", class_code="060400", iommu_group=6, header_type=None)
    tree.pci("0000:00:06.0", class_code="060000", iommu_group=7, header_type=None)
    # The class the kernel gives a function whose class contradicts its header type (a
    # CardBus header of another class), and "unassigned": the header type is asked.
    tree.pci("0000:00:07.0", class_code="000000", iommu_group=8, header_type=2)
    tree.pci("0000:00:08.0", class_code="ff0000", iommu_group=9, header_type=1)
    # A bridge's header under an endpoint's class, which host controllers' drivers and
    # quirks correct: the class is taken at its word, the header is not asked
    # (docs/decisions.md).
    tree.pci("0000:00:09.0", class_code="020000", iommu_group=10, header_type=1)
    # A PCI bridge's class on a header type 0, which the kernel never shows (it makes such
    # a class "not defined"): the class is taken at its word, the header is not asked.
    tree.pci("0000:00:0a.0", class_code="060400", iommu_group=11, header_type=0)
    host = scan(HostRoot(tree.build()))
    bridges = {str(a) for a, fn in host.pci.items() if fn.is_bridge}
    assert bridges == {
        "0000:00:01.0",
        "0000:00:02.0",
        "0000:00:03.0",
        "0000:00:04.0",
        "0000:00:05.0",
        "0000:00:07.0",
        "0000:00:08.0",
        "0000:00:0a.0",
    }
    # Neither kind is handed to a guest: bridges by rule 4, the chipset by rule 5.
    assert "bridges stay with the host (rule 4)" in (
        claim_preview(host, PciAddress.parse("00:01.0")).why_not or ""
    )
    assert "the chipset stays with the host (rule 5)" in (
        claim_preview(host, PciAddress.parse("00:00.0")).why_not or ""
    )


class _ConfigOpens(HostRoot):
    """Remembers whose config space the scan opens (``config`` is opened through ``local``)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.configs: list[str] = []

    def local(self, kernel_path: str) -> str:
        if kernel_path.endswith("/config"):
            self.configs.append(kernel_path.split("/")[-2])
        return super().local(kernel_path)


def test_only_a_class_a_bridge_can_have_is_asked_its_header_type(tree: TreeBuilder) -> None:
    """A host of thousands of endpoints and ports opens no config space for them (a PCI
    bridge's class is a header type 1's only); a header type 1 under class 06 that no class
    fallback names (0680, "other bridge") is a bridge still, and so is one of class 00."""
    tree.cpus(count=2)
    tree.pci("0000:00:01.0", class_code="068000", iommu_group=1, header_type=1)
    tree.pci("0000:00:02.0", class_code="020000", iommu_group=2)
    tree.pci("0000:00:03.0", class_code="010802", iommu_group=3)
    tree.pci("0000:00:04.0", class_code="060400", iommu_group=4)
    tree.pci("0000:00:05.0", class_code="000000", iommu_group=5, header_type=1)
    tree.pci("0000:00:06.0", class_code="060000", iommu_group=6)
    root = _ConfigOpens(tree.build())
    host = scan(root)
    assert root.configs == ["0000:00:01.0", "0000:00:05.0", "0000:00:06.0"]
    bridges = [str(a) for a, fn in host.pci.items() if fn.is_bridge]
    assert bridges == ["0000:00:01.0", "0000:00:04.0", "0000:00:05.0"]


def test_a_group_the_kernel_does_not_list_is_refused_not_planned_empty() -> None:
    """A function whose iommu_group link names a group missing from /sys/kernel/iommu_groups
    was planned as a claim with no members; the one verdict refuses it everywhere."""
    from dataclasses import replace

    host = scan(HostRoot(TESTBED_NUMA))
    nic = PciAddress.parse("81:00.0")
    groups = {g: ig for g, ig in host.iommu_groups.items() if nic not in ig.members}
    host = replace(host, iommu_groups=groups)
    v = claim_preview(host, nic)
    assert not v.assignable and "it is in no IOMMU group" in (v.why_not or "")
    placed, problems = _plan(host, '{pci: "81:00.0"}')
    assert not placed and "0000:81:00.0 (8086:10d3) cannot be assigned" in problems
    assert refusals(host, 12) == ["IOMMU group 12 does not exist on this host"]
