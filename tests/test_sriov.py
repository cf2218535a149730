"""SR-IOV (issue 21), the values side: physical functions and their virtual functions read
from the host, hostile trees refused, ``host.sriov`` and ``vf:`` in the manifest, VFs planned,
the plan's JSON, and the libvirt and KubeVirt exports of a VF.

Hosts are TreeBuilder trees read through the real inventory; manifests go through the real
loader; the verbs run in-process through ``main``.  The host: two NUMA nodes, an igb-like
PF 0000:82:00.0 (enp130s0, node 1) that can have 8 VFs at routing ID offset 0x80, stride 2
(VF 0 at 0000:82:10.0, VF 1 at 0000:82:10.2 ...), its second port 0000:82:00.1 without
SR-IOV, and on node 0 a function 0000:01:00.0 with the VFs' id (8086:10ca) and no PF.
"""

from __future__ import annotations

import json
import os
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_export import _check_golden, _kubevirt_valid, _xmllint
from test_hostile_hosts import cli, inspect_json, refused
from treebuilder import GiB, TreeBuilder

from partitioner.errors import ManifestError, PlanError
from partitioner.export import kubevirt, libvirt
from partitioner.inventory import scan
from partitioner.inventory.model import Host, SriovCaps
from partitioner.inventory.snapshot import take_snapshot
from partitioner.kernel.root import HostRoot
from partitioner.manifest.loader import loads
from partitioner.manifest.model import Manifest, VfSettings, spec_from_json, spec_to_json
from partitioner.pci import PciAddress
from partitioner.planning.model import Placement, Plan, RunningPartition
from partitioner.planning.planner import plan

PF = "0000:82:00.0"
VF = ["0000:82:10.0", "0000:82:10.2", "0000:82:10.4", "0000:82:10.6", "0000:82:11.0"]
A = PciAddress.parse


def sriov_host(
    tree: TreeBuilder,
    num_vfs: int = 0,
    *,
    total: int = 8,
    offset: int = 0x80,
    vf_netdevs: bool = False,
    same_group: bool = False,
) -> TreeBuilder:
    tree.cpus(count=8, nodes=2, memory_per_node=8 * GiB)
    tree.kvm()
    tree.pci("0000:00:01.0", class_code="060400", driver="pcieport", iommu_group=1, numa_node=0)
    tree.pci(
        "0000:01:00.0", device="10ca", iommu_group=2, numa_node=0, parent="0000:00:01.0"
    )  # the VFs' id, of no PF
    tree.pci("0000:80:01.0", class_code="060400", driver="pcieport", iommu_group=20, numa_node=1)
    for fn, iface in ((PF, "enp130s0"), ("0000:82:00.1", "enp130s1")):
        group = 21 if fn == PF else 22
        tree.pci(
            fn,
            driver="igb",
            iommu_group=group,
            numa_node=1,
            parent="0000:80:01.0",
            netdevs=(iface,),
        )
    tree.sriov(
        PF,
        total,
        num_vfs,
        offset=offset,
        vf_group=40,
        vf_netdevs=vf_netdevs,
        same_group=same_group,
    )
    return tree


def host_of(tree: TreeBuilder) -> Host:
    return scan(HostRoot(tree.build()))


HOST = """\
version: 1
host:
  accel: tcg
  isolation: pinned
  smt: share
  reserve: {cpus: 1, memory: 256MiB}
  sriov:
"""


def site(sriov: str, partitions: str) -> Manifest:
    text = HOST + textwrap.indent(textwrap.dedent(sriov), "    ")
    text += "partitions:\n" + textwrap.indent(textwrap.dedent(partitions), "  ")
    return loads(text, file="site.yaml")


def part(name: str, *devices: str, extra: str = "") -> str:
    """A small partition with these device entries (YAML flow mappings)."""
    out = f"{name}:\n  cpus: 1\n  memory: 64MiB\n  hugepages: none\n{extra}"
    return out + "  devices:\n" + "".join(f"    - {d}\n" for d in devices)


def problems(m: Manifest, h: Host, running: dict[str, RunningPartition] | None = None) -> str:
    with pytest.raises(PlanError) as e:
        plan(m, h, running)
    return "\n".join(map(str, e.value.problems))


def vfs_of(p: Plan) -> dict[str, list[tuple[str, int, int | None]]]:
    """Partition -> (VF address, index, IOMMU group) of each of its VFs."""
    return {
        n: [(str(d.address), d.vf.index, d.iommu_group) for d in pl.devices if d.vf is not None]
        for n, pl in p.placements.items()
    }


# -- inventory ----------------------------------------------------------------------------


def test_the_scan_reads_a_pf_its_vfs_and_each_vfs_pf(tree: TreeBuilder) -> None:
    h = host_of(sriov_host(tree, num_vfs=2))
    caps = h.pci[A(PF)].sriov
    assert caps == SriovCaps(
        total_vfs=8,
        num_vfs=2,
        drivers_autoprobe=True,
        vf_offset=0x80,
        vf_stride=2,
        vf_device="10ca",
        vfs=(A(VF[0]), A(VF[1])),
    )
    assert h.pci[A(PF)].physfn is None and h.pci[A("0000:82:00.1")].sriov is None
    for i in (0, 1):
        vf = h.pci[A(VF[i])]
        assert (vf.physfn, vf.sriov, vf.id, vf.numa_node) == (A(PF), None, "8086:10ca", 1)
        assert h.vf_index(vf.address) == i
    assert h.vfs_of(A(PF)) == (A(VF[0]), A(VF[1]))
    # VF 1 is made (its link), VF 4 is not: where offset and stride put it.
    assert h.vf_address(A(PF), 1) == A(VF[1]) and h.vf_address(A(PF), 4) == A(VF[4])
    assert h.vf_address(A("0000:82:00.1"), 0) is None and h.notes == ()


def test_a_vf_address_crosses_a_bus_and_is_unknown_without_an_offset() -> None:
    caps = SriovCaps(8, 0, True, vf_offset=0x180, vf_stride=1, vf_device="10ca")
    assert caps.vf_address(A("0000:82:00.0"), 0) == A("0000:83:10.0")
    assert caps.vf_address(A("0000:82:00.0"), 9) == A("0000:83:11.1")
    unknown = SriovCaps(8, 0, True, vf_offset=0, vf_stride=1, vf_device="")
    assert unknown.vf_address(A(PF), 0) is None
    no_stride = SriovCaps(8, 0, True, vf_offset=0x80, vf_stride=0, vf_device="")
    assert no_stride.vf_address(A(PF), 0) == A(VF[0]) and no_stride.vf_address(A(PF), 1) is None
    assert caps.vf_address(A("0000:ff:1f.7"), 0) is None  # past the last routing ID


def test_a_snapshot_keeps_what_sriov_needs(tree: TreeBuilder, tmp_path: Path) -> None:
    root = sriov_host(tree, num_vfs=2).build()
    take_snapshot(HostRoot(root), tmp_path / "snap")
    again = scan(HostRoot(tmp_path / "snap"))
    live = scan(HostRoot(root))
    for a in (PF, VF[0], VF[1]):
        assert (again.pci[A(a)].sriov, again.pci[A(a)].physfn) == (
            live.pci[A(a)].sriov,
            live.pci[A(a)].physfn,
        )
    assert again.pci[A(PF)].sriov is not None


def test_inspect_shows_vfs_under_their_pf(
    capsys: pytest.CaptureFixture[str], tree: TreeBuilder
) -> None:
    root = sriov_host(tree, num_vfs=2).build()
    doc = inspect_json(capsys, root)
    by = {f["address"]: f for f in doc["pci"]}
    assert by[PF]["sriov"] == {
        "total_vfs": 8,
        "num_vfs": 2,
        "drivers_autoprobe": True,
        "vf_offset": 128,
        "vf_stride": 2,
        "vf_device": "10ca",
        "vfs": VF[:2],
    }
    assert by[PF]["physfn"] is None and by["0000:82:00.1"]["sriov"] is None
    assert by[VF[0]]["physfn"] == PF and by[VF[0]]["sriov"] is None
    # A VF's slot-mate (another VF) does not come with it.
    assert by[VF[0]]["takes_with_it"] == [] and by[VF[0]]["verdict"] == "yes"
    rc, out, _ = cli(capsys, "--host-root", str(root), "inspect")
    assert rc == 0
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(PF))
    assert lines[at + 1].startswith("  " + VF[0]) and lines[at + 2].startswith("  " + VF[1])
    assert lines[at + 3].startswith("0000:82:00.1")
    assert f"SR-IOV {PF} (enp130s0): 2 of 8 VFs made (listed under it)" in out


# -- hostile trees --------------------------------------------------------------------------


def _relink(root: Path, tree: TreeBuilder, address: str, leaf: str, target: str) -> Path:
    link = root / tree.device_path(address).lstrip("/") / leaf
    if link.is_symlink():
        link.unlink()
    link.symlink_to(target)
    return link


@pytest.mark.parametrize(
    "target, said",
    [
        ("../0000:82:10.0", "its own physical function: a physfn loop"),
        ("../0000:82:10.2", "itself a virtual function of 0000:82:00.0: a physfn loop"),
        ("physfn", "is a link to 'physfn', not to a PCI function"),
        ("../0000:82:00.7", "a virtual function without its physical function"),
    ],
    ids=["self", "chain", "link-loop", "missing-pf"],
)
def test_a_physfn_the_kernel_never_writes_is_exit_2_naming_it(
    capsys: pytest.CaptureFixture[str], tree: TreeBuilder, tmp_path: Path, target: str, said: str
) -> None:
    root = sriov_host(tree, num_vfs=2).build()
    _relink(root, tree, VF[0], "physfn", target)
    link = f"{VF[0]}/physfn"  # named by its device's directory or by the bus
    site_file = tmp_path / "site.yaml"
    site_file.write_text("version: 1\nhost: {accel: tcg}\n")
    for verb in (("inspect",), ("plan", str(site_file))):
        err = refused(capsys, root, *verb)
        assert f"{root}/sys/" in err and link in err, err
        assert said in err and "take a new one" in err, err


def test_a_virtfn_whose_vf_does_not_name_the_pf_back_is_exit_2(
    capsys: pytest.CaptureFixture[str], tree: TreeBuilder
) -> None:
    root = sriov_host(tree, num_vfs=2).build()
    (root / tree.device_path(VF[1]).lstrip("/") / "physfn").unlink()
    err = refused(capsys, root)
    assert f"{PF}/virtfn1 leads to {VF[1]}, which has no physfn link back" in err


class _Links(HostRoot):
    """Remembers the links the scan reads."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.links: list[str] = []

    def readlink(self, kernel_path: str) -> str | None:
        self.links.append(kernel_path)
        return super().readlink(kernel_path)


def test_only_the_functions_a_pf_names_are_asked_for_physfn(tree: TreeBuilder) -> None:
    """The kernel makes virtfnN and physfn together: a host of thousands of functions and a
    few PFs is not asked a physfn per function.  A physfn no PF names (which the kernel
    never writes) is not read, so it makes no VF (docs/decisions.md)."""
    root = sriov_host(tree, num_vfs=2).build()
    lone = root / tree.device_path("0000:01:00.0").lstrip("/") / "physfn"
    lone.symlink_to(os.path.relpath(tree.device_path(PF), tree.device_path("0000:01:00.0")))
    links = _Links(root)
    h = scan(links)
    asked = sorted(p.split("/")[-2] for p in links.links if p.endswith("/physfn"))
    assert asked == VF[:2]
    assert [h.pci[A(v)].physfn for v in VF[:2]] == [A(PF), A(PF)]
    assert h.pci[A("0000:01:00.0")].physfn is None and h.pci[A(PF)].physfn is None


@pytest.mark.parametrize("damage", ["virtfn-missing", "numvfs-over-total"])
def test_where_a_pfs_links_do_not_name_all_its_vfs_every_function_is_asked(
    tree: TreeBuilder, damage: str
) -> None:
    """A PF with a virtfnN missing, or whose numbers make no sense (its links are not read):
    its VFs are VFs still, each by its own physfn, as the kernel made them."""
    root = sriov_host(tree, num_vfs=3).build()
    pf_dir = root / tree.device_path(PF).lstrip("/")
    if damage == "virtfn-missing":
        (pf_dir / "virtfn1").unlink()
    else:
        (pf_dir / "sriov_numvfs").write_text("9\n")
    links = _Links(root)
    h = scan(links)
    assert [h.pci[A(v)].physfn for v in VF[:3]] == [A(PF)] * 3
    asked = {p.split("/")[-2] for p in links.links if p.endswith("/physfn")}
    assert asked == {str(a) for a in h.pci}
    said = "no virtfn1 link" if damage == "virtfn-missing" else "more than its sriov_totalvfs"
    assert any(said in n for n in h.notes), h.notes


def _plan_cli(
    capsys: pytest.CaptureFixture[str], root: Path, tmp_path: Path, text: str
) -> tuple[int, str, str]:
    (tmp_path / "site.yaml").write_text(text)
    return cli(
        capsys,
        "--host-root",
        str(root),
        "--state-dir",
        str(tmp_path / "state"),
        "plan",
        str(tmp_path / "site.yaml"),
    )


SITE_ONE_VF = (
    HOST
    + "    - pf: 82:00.0\n      vfs: 2\npartitions:\n"
    + textwrap.indent(part("a", "{vf: 82:00.0}"), "  ")
)


@pytest.mark.parametrize(
    "leaf, text, said",
    [
        ("sriov_numvfs", "9", "sriov_numvfs says 9 VFs, more than its sriov_totalvfs of 8"),
        ("sriov_totalvfs", "8²", "sriov_totalvfs: '8²' is not a number of VFs"),
        ("sriov_totalvfs", "9" * 5000, "is not a number of VFs (0 to 65535)"),
        ("sriov_numvfs", "-1", "sriov_numvfs: '-1' is not a number of VFs"),
    ],
    ids=["numvfs-over-total", "superscript", "5000-digits", "negative"],
)
def test_sriov_numbers_that_are_no_numbers_leave_the_pf_unusable_and_said(
    capsys: pytest.CaptureFixture[str],
    tree: TreeBuilder,
    tmp_path: Path,
    leaf: str,
    text: str,
    said: str,
) -> None:
    root = sriov_host(tree).build()
    (root / tree.device_path(PF).lstrip("/") / leaf).write_text(text + "\n")
    doc = inspect_json(capsys, root)
    pf = next(f for f in doc["pci"] if f["address"] == PF)
    assert pf["sriov"] is None and said in pf["sriov_problem"]
    assert any(said in n for n in doc["notes"])
    rc, _, err = _plan_cli(capsys, root, tmp_path, SITE_ONE_VF)
    assert rc == 3 and "site.yaml:8:7: host.sriov[0]" in err and said in err, err


def test_an_offset_that_is_no_number_leaves_future_vfs_unplaceable(
    capsys: pytest.CaptureFixture[str], tree: TreeBuilder, tmp_path: Path
) -> None:
    root = sriov_host(tree).build()
    (root / tree.device_path(PF).lstrip("/") / "sriov_offset").write_text("0x80\n")
    doc = inspect_json(capsys, root)
    assert next(f for f in doc["pci"] if f["address"] == PF)["sriov"]["vf_offset"] == 0
    assert any("sriov_offset" in n for n in doc["notes"])
    rc, _, err = _plan_cli(capsys, root, tmp_path, SITE_ONE_VF)
    assert rc == 3 and "where VF 0 of 0000:82:00.0 will be cannot be told" in err, err


# -- the manifest -----------------------------------------------------------------------------


def test_a_valid_manifest_gives_the_values(tree: TreeBuilder) -> None:
    m = site(
        "- pf: 82:00.0\n  vfs: 4\n- netdev: enp5s0\n  vfs: 2\n",
        part(
            "a",
            '{vf: 82:00.0, index: 3, mac: "52:54:00:AB:CD:EF", vlan: 100, qos: 5, '
            "spoofchk: false, trust: true, link_state: enable, min_tx_rate: 10, max_tx_rate: 100}",
            "{vf: enp5s0, required: false}",
        ),
    )
    (pf, net) = m.host.sriov
    assert (pf.pf, pf.netdev, pf.vfs, pf.name, net.pf, net.netdev, net.name) == (
        PF,
        None,
        4,
        PF,
        None,
        "enp5s0",
        "enp5s0",
    )
    assert (pf.where.line, net.where.line) == (8, 10)
    a, b = m.partitions["a"].devices
    assert (a.kind, a.value, a.vf_index) == ("vf", PF, 3)
    assert a.vf_settings == VfSettings(
        mac="52:54:00:ab:cd:ef",
        vlan=100,
        qos=5,
        spoofchk=False,
        trust=True,
        link_state="enable",
        min_tx_rate=10,
        max_tx_rate=100,
    )
    assert (b.kind, b.value, b.vf_index, b.vf_settings, b.required) == (
        "vf",
        "enp5s0",
        None,
        None,
        False,
    )
    spec = m.partitions["a"]
    assert spec_from_json(json.loads(json.dumps(spec_to_json(spec)))) == spec
    # Devices of other kinds keep the JSON they had.
    other = site("- pf: 82:00.0\n  vfs: 1\n", part("a", "{pci: 01:00.0}")).partitions["a"]
    assert "vf_index" not in spec_to_json(other)["devices"][0]


BAD = """\
version: 1
host:
  sriov:
    - pf: 82:00.0
      vfs: 2
    - netdev: enp5s0
      vfs: 1
    - netdev: enp5s0
      vfs: 3
    - pf: 83:00.0
      netdev: enp6s0
      vfs: 1
partitions:
  a:
    cpus: 1
    memory: 64MiB
    devices:
      - vf: 82:00.0
        mac: "01:00:5e:00:00:01"
        vlan: 4095
      - vf: "0000:82:00.0"
        index: 1
        mac: "00:00:00:00:00:00"
        qos: 3
      - vf: enp9s0
      - vf: enp5s0
        index: 1
        mac: "52:54:00:12:34"
        min_tx_rate: 200
        max_tx_rate: 100
      - pci: 82:00.0
      - pci: 01:00.0
        trust: true
  b:
    cpus: 1
    memory: 64MiB
    devices:
      - vf: 82:00.0
        index: 1
        mac: "52:54:00:00:00:01"
        vlan: 0
      - vf: 82:00.0
        mac: "52:54:00:00:00:01"
        link_state: up
"""


def test_every_manifest_problem_at_once_each_located() -> None:
    with pytest.raises(ManifestError) as e:
        loads(BAD, file="bad.yaml")
    got = [str(p) for p in e.value.problems]
    want = [
        "bad.yaml:8:7: host.sriov[2]: the PF enp5s0 is listed again (line 6)",
        "bad.yaml:10:7: host.sriov[3]: expected exactly one of `pf:` or `netdev:`",
        "bad.yaml:19:14: partitions.a.devices[0].mac: 01:00:5e:00:00:01 is a multicast address",
        "bad.yaml:20:15: partitions.a.devices[0].vlan: expected at most 4094, not `4095`",
        "bad.yaml:23:14: partitions.a.devices[1].mac: 00:00:00:00:00:00 is all zeros",
        "bad.yaml:24:9: partitions.a.devices[1].qos: a priority of the VLAN tag, but this VF "
        "has no `vlan:`",
        "bad.yaml:25:13: partitions.a.devices[2]: vf enp9s0 names no PF of host.sriov (it "
        "lists: 0000:82:00.0, enp5s0)",
        "bad.yaml:27:16: partitions.a.devices[3].index: VF 1 of enp5s0, but host.sriov gives "
        "it 1 VF (line 6), numbered 0 to 0",
        "bad.yaml:28:14: partitions.a.devices[3].mac: expected a MAC address of six hex bytes",
        "bad.yaml:29:22: partitions.a.devices[3].min_tx_rate: 200 Mbit/s guaranteed is more "
        "than the max_tx_rate of 100 Mbit/s (line 30)",
        "bad.yaml:31:14: partitions.a.devices[4]: 0000:82:00.0 is a PF of host.sriov (line 4), "
        "which stays with the host: take a virtual function of it with `vf: 0000:82:00.0`",
        "bad.yaml:32:9: partitions.a.devices[5]: expected `trust` only with `vf:`",
        "bad.yaml:38:9: partitions.b.devices[0]: 4 devices ask for a VF of 0000:82:00.0 "
        "(partitions a, b) but host.sriov gives it 2 (line 4)",
        "bad.yaml:39:16: partitions.b.devices[0].index: VF 1 of 0000:82:00.0 is already asked "
        "for by partitions.a.devices[1] (line 22)",
        "bad.yaml:41:15: partitions.b.devices[0].vlan: expected at least 1, not `0`",
        "bad.yaml:43:14: partitions.b.devices[1].mac: 52:54:00:00:00:01 is already the MAC of "
        "partitions.b.devices[0].mac (line 40)",
        "bad.yaml:44:21: partitions.b.devices[1].link_state: expected one of auto, enable, "
        "disable, not `up`",
    ]
    for w in want:
        assert any(g.startswith(w) for g in got), f"missing: {w}\ngot:\n" + "\n".join(got)
    assert len(got) == len(want), "\n".join(got)


# -- planning ---------------------------------------------------------------------------------

FOUR = "- netdev: enp130s0\n  vfs: 4\n"


def test_each_vf_device_gets_the_lowest_free_vf_fixed_ones_first(tree: TreeBuilder) -> None:
    h = host_of(sriov_host(tree))
    m = site(
        FOUR,
        part("a", "{vf: enp130s0}", "{vf: enp130s0}")
        + part("b", "{vf: enp130s0, index: 1, mac: '52:54:00:00:00:0b', vlan: 7}")
        + part("c", "{vf: enp130s0}"),
    )
    p = plan(m, h)
    assert vfs_of(p) == {
        "a": [(VF[0], 0, None), (VF[2], 2, None)],
        "b": [(VF[1], 1, None)],
        "c": [(VF[3], 3, None)],
    }
    b = p.placements["b"].devices[0]
    assert b.vf is not None and b.vf.pf == A(PF)
    assert b.vf.settings == VfSettings(mac="52:54:00:00:00:0b", vlan=7)
    assert (b.vendor_device, b.driver, b.added) == ("8086:10ca", None, False)
    # Deterministic: the same inputs give the same plan, byte for byte.
    again = plan(m, host_of(tree))
    assert json.dumps(again.to_json()) == json.dumps(p.to_json())


def test_devices_stay_in_manifest_order_around_a_vf(tree: TreeBuilder) -> None:
    h = host_of(sriov_host(tree))
    m = site(FOUR, part("a", "{vf: enp130s0}", "{pci: 01:00.0}", extra="  numa: [0, 1]\n"))
    assert [str(d.address) for d in plan(m, h).placements["a"].devices] == [
        VF[0],
        "0000:01:00.0",
    ]


def test_a_vf_not_made_yet_has_no_group_and_the_plan_says_so(tree: TreeBuilder) -> None:
    p = plan(site(FOUR, part("a", "{vf: enp130s0}")), host_of(sriov_host(tree)))
    (pf,) = p.sriov
    assert (str(pf.address), pf.netdev, pf.vfs, pf.iommu_groups_known) == (PF, "enp130s0", 4, False)
    assert p.placements["a"].iommu_groups == ()
    assert any(
        "apply makes its 4 VFs (sriov_numvfs 0 -> 4" in n and "iommu_group null" in n
        for n in p.notes
    )


def test_vfs_that_exist_with_the_planned_count_carry_their_groups(tree: TreeBuilder) -> None:
    p = plan(
        site(FOUR, part("a", "{vf: enp130s0}", "{vf: enp130s0}")), host_of(sriov_host(tree, 4))
    )
    assert vfs_of(p) == {"a": [(VF[0], 0, 40), (VF[1], 1, 41)]}
    assert p.sriov[0].iommu_groups_known is True and p.placements["a"].iommu_groups == (40, 41)
    assert not any("apply makes" in n for n in p.notes)


def test_a_count_change_makes_every_vf_anew_so_groups_are_unknown(tree: TreeBuilder) -> None:
    p = plan(site(FOUR, part("a", "{vf: enp130s0}")), host_of(sriov_host(tree, 2)))
    assert vfs_of(p) == {"a": [(VF[0], 0, None)]}
    assert p.sriov[0].iommu_groups_known is False


def test_a_running_partition_keeps_its_vf(tree: TreeBuilder) -> None:
    h = host_of(sriov_host(tree, 4))
    m = site(FOUR, part("a", "{vf: enp130s0}") + part("c", "{vf: enp130s0}"))
    assert vfs_of(plan(m, h))["c"] == [(VF[1], 1, 41)]
    running = {"c": RunningPartition("c", (5,), ((1, 64 << 20),), None, (A(VF[2]),))}
    p = plan(m, h, running)
    assert vfs_of(p) == {"a": [(VF[0], 0, 40)], "c": [(VF[2], 2, 42)]}


def test_a_vf_brings_its_partition_to_its_pfs_node(tree: TreeBuilder) -> None:
    for num_vfs in (0, 4):
        t = TreeBuilder(tree.root.parent / f"host{num_vfs}")
        p = plan(site(FOUR, part("a", "{vf: enp130s0}")), host_of(sriov_host(t, num_vfs)))
        assert p.placements["a"].numa_nodes == (1,), num_vfs
        assert all(c >= 4 for c in p.placements["a"].cpus)


def test_id_never_takes_a_vf_of_a_pf_in_host_sriov(tree: TreeBuilder) -> None:
    h = host_of(sriov_host(tree, 4))
    p = plan(site(FOUR, part("a", "{id: '8086:10ca'}")), h)
    assert [str(d.address) for d in p.placements["a"].devices] == ["0000:01:00.0"]
    said = problems(site(FOUR, part("a", "{id: '8086:10ca', count: 2}")), h)
    assert "wants 2 free 8086:10ca functions, found 1" in said


@pytest.mark.parametrize(
    "sriov, num_vfs, said",
    [
        (
            "- pf: 82:00.1\n  vfs: 1\n",
            0,
            "site.yaml:8:7: host.sriov[0]: 0000:82:00.1 (8086:10d3) cannot make virtual "
            "functions: it has no sriov_totalvfs",
        ),
        (
            "- netdev: enp130s0\n  vfs: 9\n",
            0,
            "host.sriov[0]: vfs is 9 but enp130s0 can have 8 VFs (sriov_totalvfs)",
        ),
        ("- pf: 0000:83:00.0\n  vfs: 1\n", 0, "host.sriov[0]: the PF 0000:83:00.0 is not on"),
        ("- netdev: enp9s0\n  vfs: 1\n", 0, "network interface enp9s0 is not on this host"),
        (
            "- pf: 82:10.2\n  vfs: 1\n",
            2,
            "0000:82:10.2 is a virtual function (of 0000:82:00.0), not a physical function",
        ),
        (
            "- pf: 82:00.0\n  vfs: 1\n- netdev: enp130s0\n  vfs: 1\n",
            0,
            "site.yaml:10:7: host.sriov[1]: enp130s0 is the PF 0000:82:00.0, which host.sriov "
            "already lists as 0000:82:00.0",
        ),
    ],
    ids=["no-sriov", "too-many", "no-pf", "no-netdev", "a-vf", "twice"],
)
def test_a_pf_that_cannot_serve_is_refused_at_its_entry(
    tree: TreeBuilder, sriov: str, num_vfs: int, said: str
) -> None:
    name = sriov.split(": ", 1)[1].split("\n")[0]
    m = site(sriov, part("a", f"{{vf: '{name}'}}"))
    assert said in problems(m, host_of(sriov_host(tree, num_vfs)))


def test_a_pf_or_its_vf_named_as_a_device_is_refused(tree: TreeBuilder) -> None:
    h = host_of(sriov_host(tree, 4))
    said = problems(site(FOUR, part("a", "{pci: 82:00.0}") + part("b", f"{{pci: '{VF[2]}'}}")), h)
    assert (
        "a: pci: 0000:82:00.0 is the PF enp130s0 (0000:82:00.0) of host.sriov, which stays "
        "with the host: take a virtual function of it with `vf: enp130s0`"
    ) in said
    assert (
        "b: pci: 0000:82:10.4 is VF 2 of enp130s0 (0000:82:00.0) in host.sriov: ask for it "
        "with `vf: enp130s0` and `index: 2`"
    ) in said


def test_changing_the_count_under_vfs_in_use_is_refused_naming_the_users(
    tree: TreeBuilder,
) -> None:
    sriov_host(tree, 2, vf_netdevs=True).netdev_up("enp130s0v1")  # the host runs on VF 1
    h = host_of(tree)
    m = site(FOUR, part("a", "{vf: enp130s0}"))
    running = {"old": RunningPartition("old", (5,), ((1, 64 << 20),), None, (A(VF[0]),))}
    said = problems(m, h, running)
    assert (
        "site.yaml:8:7: host.sriov[0]: enp130s0 (0000:82:00.0) has 2 VFs and vfs asks 4: "
        "changing the count removes every VF of it, and VF 0 (0000:82:10.0) is held by "
        "partition old; VF 1 (0000:82:10.2) is used by the host: enp130s0v1 is up with an "
        "address"
    ) in said
    # The same count changes nothing: the VF the host uses stays its own (rule 5).
    two = "- netdev: enp130s0\n  vfs: 2\n"
    assert vfs_of(plan(site(two, part("a", "{vf: enp130s0}")), h))["a"] == [(VF[0], 0, 40)]
    said = problems(site(two, part("a", "{vf: enp130s0}", "{vf: enp130s0}")), h)
    assert (
        "a: no free VF of enp130s0 (0000:82:00.0), which has 2: VF 0 is a's, VF 1 is used by "
        "the host"
    ) in said
    said = problems(site(two, part("a", "{vf: enp130s0, index: 1}")), h)
    assert "0000:82:10.2 is in use by the host: enp130s0v1 is up with an address (rule 5)" in said


def test_a_pf_the_host_uses_changes_count_with_a_warning(tree: TreeBuilder) -> None:
    sriov_host(tree).netdev_up("enp130s0", default_route=True)
    p = plan(site(FOUR, part("a", "{vf: enp130s0}")), host_of(tree))
    assert any(
        n.startswith("warning: enp130s0 (0000:82:00.0) of host.sriov is used by the host")
        and "resets the PF on some drivers" in n
        for n in p.notes
    )
    assert vfs_of(p)["a"] == [(VF[0], 0, None)]


def test_vfs_that_share_a_group_are_refused(tree: TreeBuilder) -> None:
    h = host_of(sriov_host(tree, 4, same_group=True))
    said = problems(site(FOUR, part("a", "{vf: enp130s0}")), h)
    assert "IOMMU group 40 of 0000:82:10.0 also holds 0000:82:10.2: the PF's VFs are not " in said


def test_an_optional_vf_of_a_pf_that_cannot_serve_is_left_out(tree: TreeBuilder) -> None:
    m = site(
        "- pf: 82:00.1\n  vfs: 1\n- netdev: enp130s0\n  vfs: 1\n",
        part("a", "{vf: enp130s0}"),
    )
    assert "host.sriov[0]" in problems(m, host_of(sriov_host(tree)))


# -- the plan's JSON ---------------------------------------------------------------------------


def test_plan_json_carries_the_pfs_and_each_devices_vf(
    capsys: pytest.CaptureFixture[str], tree: TreeBuilder, tmp_path: Path
) -> None:
    root = sriov_host(tree).build()
    text = HOST + textwrap.indent(FOUR, "    ") + "partitions:\n"
    text += textwrap.indent(part("a", "{vf: enp130s0, index: 2, mac: '52:54:00:00:00:0a'}"), "  ")
    (tmp_path / "site.yaml").write_text(text)
    rc, out, err = cli(
        capsys,
        "--host-root",
        str(root),
        "--state-dir",
        str(tmp_path / "state"),
        "--json",
        "plan",
        str(tmp_path / "site.yaml"),
    )
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["sriov"] == [{"pf": PF, "netdev": "enp130s0", "vfs": 4, "iommu_groups_known": False}]
    (d,) = doc["partitions"]["a"]["device_details"]
    assert (d["address"], d["iommu_group"]) == (VF[2], None)
    assert d["vf"]["pf"] == PF and d["vf"]["index"] == 2
    assert d["vf"]["settings"]["mac"] == "52:54:00:00:00:0a"
    assert d["vf"]["settings"]["spoofchk"] is True
    assert doc["partitions"]["a"]["iommu_groups"] == []


def test_the_plan_and_its_placements_round_trip_through_json(tree: TreeBuilder) -> None:
    h = host_of(sriov_host(tree, 4))
    m = site(
        FOUR,
        part("a", "{vf: enp130s0, mac: '52:54:00:00:00:0a', vlan: 5, qos: 1, trust: true}")
        + part("b", "{vf: enp130s0, index: 3}"),
    )
    for hosted in (h, host_of(sriov_host(TreeBuilder(tree.root.parent / "h0"), 0))):
        p = plan(m, hosted)
        back = Plan.from_json(json.loads(json.dumps(p.to_json())))
        assert back == p
        for pl in p.placements.values():
            assert Placement.from_json(json.loads(json.dumps(pl.to_json()))) == pl


def test_a_null_group_is_read_back_for_a_vf_only(tree: TreeBuilder) -> None:
    p = plan(site(FOUR, part("a", "{vf: enp130s0}")), host_of(sriov_host(tree)))
    doc = p.placements["a"].to_json()
    assert Placement.from_json(doc).devices[0].iommu_group is None
    doc["device_details"][0]["vf"] = None
    with pytest.raises(ValueError, match="an IOMMU group is None"):
        Placement.from_json(doc)
    doc = p.placements["a"].to_json()
    doc["device_details"][0]["vf"]["settings"] = {"mac": "01:02"}
    with pytest.raises(ValueError, match="not a MAC address"):
        Placement.from_json(doc)


# -- exports -----------------------------------------------------------------------------------

EXPORTED = """\
a:
  cpus: 1
  memory: 64MiB
  hugepages: none
  disks: [{path: /srv/a.img}]
  devices:
    - {vf: enp130s0, mac: "52:54:00:00:00:0a", vlan: 100, qos: 3, trust: true, max_tx_rate: 1000}
    - {vf: enp130s0, vlan: 200}
b:
  cpus: 1
  memory: 64MiB
  hugepages: none
  disks: [{path: /srv/b.img}]
  devices:
    - {vf: enp130s0}
"""


def _exported(tree: TreeBuilder) -> Plan:
    return plan(site(FOUR, EXPORTED), host_of(sriov_host(tree, 4)))


def test_libvirt_gives_a_network_vf_as_a_hostdev_interface(
    tree: TreeBuilder, tmp_path: Path
) -> None:
    p = _exported(tree)
    docs = {f"sriov-{k}": v for k, v in libvirt.documents(p).items()}
    for name, text in docs.items():
        _check_golden(name, text)
    _xmllint(docs, tmp_path)
    a = ET.fromstring(docs["sriov-a.xml"])
    first, second = a.findall("devices/interface")
    assert first.get("type") == "hostdev" and first.get("managed") == "no"
    assert first.find("mac").get("address") == "52:54:00:00:00:0a"  # type: ignore[union-attr]
    assert first.find("vlan/tag").get("id") == "100"  # type: ignore[union-attr]
    assert dict(first.find("source/address").attrib) == {  # type: ignore[union-attr]
        "type": "pci",
        "domain": "0x0000",
        "bus": "0x82",
        "slot": "0x10",
        "function": "0x0",
    }
    assert second.find("mac") is None and second.find("vlan/tag").get("id") == "200"  # type: ignore[union-attr]
    assert a.findall("devices/hostdev") == []
    # A VF without settings is a hostdev like any function.
    b = ET.fromstring(docs["sriov-b.xml"])
    assert b.findall("devices/interface") == [] and len(b.findall("devices/hostdev")) == 1
    notes = libvirt.notes(p)
    assert notes["a"] == [
        "0000:82:10.0 (VF 0 of 0000:82:00.0): libvirt sets only a VF's MAC address and VLAN; "
        "set qos 3, trust on, max_tx_rate 1000 on the PF before the domain starts "
        "(ip link set PF vf 0 ...)",
        "0000:82:10.2 (VF 1 of 0000:82:00.0): libvirt gives it a MAC address of its own (the "
        "manifest names none)",
    ]
    assert "b" not in notes


def test_kubevirt_gives_a_network_vf_as_an_sriov_interface(tree: TreeBuilder) -> None:
    p = _exported(tree)
    kv = kubevirt.export(p, "node1")
    for name, text in kv.documents.items():
        _check_golden(f"sriov-{name.removesuffix('.yaml')}.kubevirt.yaml", text)
        _kubevirt_valid(yaml.safe_load(text))
    a: dict[str, Any] = yaml.safe_load(kv.documents["a.yaml"])["spec"]["template"]["spec"]
    assert a["domain"]["devices"]["interfaces"] == [
        {"name": "vf0", "sriov": {}, "macAddress": "52:54:00:00:00:0a"},
        {"name": "vf1", "sriov": {}},
    ]
    assert a["networks"] == [
        {"name": "vf0", "multus": {"networkName": "a-vf0"}},
        {"name": "vf1", "multus": {"networkName": "a-vf1"}},
    ]
    assert "hostDevices" not in a["domain"]["devices"]
    assert kubevirt.sriov_resource_name(A(PF)) == "partition.local/sriov_0000_82_00_0"
    (vf0, vf1) = [n for n in kv.notes["a"] if "sriov interface" in n]
    assert "resource partition.local/sriov_0000_82_00_0" in vf0 and "network a-vf0" in vf0
    assert "vlan 100, qos 3, spoofchk on, trust on, max_tx_rate 1000 belong to that network" in vf0
    assert "not VF 0" in vf0 and "vlan 200" in vf1
    # The VF without settings is a host device of its model, permitted as any.
    b = yaml.safe_load(kv.documents["b.yaml"])["spec"]["template"]["spec"]
    assert b["domain"]["devices"]["hostDevices"] == [
        {"name": "hostdev0", "deviceName": "partition.local/pci-8086-10ca"}
    ]
    assert "networks" not in b
    permitted = yaml.safe_load(kv.documents["kubevirt-permitted-host-devices.yaml"])
    assert [d["pciVendorSelector"] for d in _devices(permitted)] == ["8086:10CA"]


def _devices(kv: dict[str, Any]) -> list[dict[str, Any]]:
    devices: list[dict[str, Any]] = kv["spec"]["configuration"]["permittedHostDevices"][
        "pciHostDevices"
    ]
    return devices


def test_a_vf_of_a_pf_entry_already_wrong_is_not_said_twice() -> None:
    text = HOST + "    - pf: 82:00.0\n      netdev: enp130s0\n      vfs: 2\npartitions:\n"
    text += textwrap.indent(part("a", "{vf: 82:00.0}", "{vf: enp130s0}"), "  ")
    with pytest.raises(ManifestError) as e:
        loads(text, file="site.yaml")
    assert [str(p) for p in e.value.problems] == [
        "site.yaml:8:7: host.sriov[0]: expected exactly one of `pf:` or `netdev:` in each "
        "entry of host.sriov"
    ]
