"""SR-IOV from the manifest to the host: the real loader and planner give the VFs, the diff
orders the steps, the executor runs them against a fake kernel that makes VFs as iov.c does
(tests/fakesriov.py); ``plan`` lists them in text and ``--json``.

The host: one NUMA node, 4 CPUs, an igb-like PF 0000:01:00.0 (eth0) that can have 8 VFs at
routing ID offset 128, stride 2 (VF 0 at 0000:01:10.0, VF 1 at 0000:01:10.2), igbvf loaded
(with autoprobe on it would take every new VF), vfio-pci loaded.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from fakesriov import FakeSriovKernel, vf_address_of
from test_hostile_hosts import cli
from treebuilder import GiB, TreeBuilder

from partitioner.engine.context import ApplyContext
from partitioner.engine.diff import diff, held_replacements, teardown
from partitioner.engine.executor import execute
from partitioner.engine.sriov import restore_all
from partitioner.engine.step import Action
from partitioner.inventory import scan
from partitioner.kernel import vflink
from partitioner.manifest.loader import loads
from partitioner.manifest.model import Manifest
from partitioner.planning.model import Plan
from partitioner.planning.planner import plan
from partitioner.record.model import RunState, State, running_partitions
from partitioner.record.store import StateStore

PF = "0000:01:00.0"
VF0, VF1 = vf_address_of(PF, 128, 2, 0), vf_address_of(PF, 128, 2, 1)
MAC = {"fw": "52:54:00:5f:00:01", "lan": "52:54:00:5f:00:02"}
VLAN = {"fw": 100, "lan": 200}


def tree_of(tmp_path: Path) -> TreeBuilder:
    t = TreeBuilder(tmp_path / "host")
    t.cpus(count=4, nodes=1, memory_per_node=4 * GiB)
    t.kvm()
    t.pci("0000:00:01.0", class_code="060400", driver="pcieport", iommu_group=1, numa_node=0)
    t.pci(
        PF,
        device="10c9",
        driver="igb",
        iommu_group=2,
        numa_node=0,
        parent="0000:00:01.0",
        netdevs=["eth0"],
    )
    t.driver("vfio-pci")
    t.driver("igbvf")
    return t


@pytest.fixture
def fk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSriovKernel:
    return fake_kernel(tmp_path, monkeypatch)


def fake_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSriovKernel:
    """The host above on the fake kernel, its iproute2 the fake's."""
    t = tree_of(tmp_path)
    t.build()
    k = FakeSriovKernel(t)
    k.add_pf(PF, "eth0", unsupported=["trust"])
    monkeypatch.setattr(vflink, "run", k.ip)
    monkeypatch.setattr("partitioner.engine.devices.check_group", lambda *a, **k: None)
    return k


def site(fw_mac: str = MAC["fw"], vfs: int = 4) -> Manifest:
    text = f"""\
    version: 1
    host:
      accel: tcg
      isolation: pinned
      smt: share
      reserve: {{cpus: 1, memory: 256MiB}}
      sriov:
        - {{pf: "{PF}", vfs: {vfs}}}
    partitions:
      fw:
        cpus: 1
        memory: 64MiB
        hugepages: none
        devices:
          - {{vf: "{PF}", mac: "{fw_mac}", vlan: {VLAN["fw"]}}}
      lan:
        cpus: 1
        memory: 64MiB
        hugepages: none
        devices:
          - {{vf: "{PF}", mac: "{MAC["lan"]}", vlan: {VLAN["lan"]}}}
    """
    return loads(textwrap.dedent(text), file="site.yaml")


def host_steps(actions: list[Action]) -> list[Action]:
    """The host side of apply; no guest is started here."""
    return [a for a in actions if a.kind not in ("start", "take-user")]


def applied(fk: FakeSriovKernel, tmp_path: Path, m: Manifest) -> tuple[ApplyContext, StateStore]:
    host = scan(fk)
    p = plan(m, host, {})
    d = tmp_path / "state"
    d.mkdir(exist_ok=True)
    store = StateStore(d)
    ctx = ApplyContext(
        root=fk,
        plan=p,
        state=State(),
        run_dir=tmp_path / "run",
        log_dir=tmp_path / "log",
        host=host,
    )
    execute(host_steps(diff(p, State(), host, replace=set())), ctx, store)
    return ctx, store


def test_the_planner_gives_each_partition_a_vf_not_made_yet(fk: FakeSriovKernel) -> None:
    p = plan(site(), scan(fk), {})
    assert [(str(pf.address), pf.vfs, pf.iommu_groups_known) for pf in p.sriov] == [(PF, 4, False)]
    for name, vf in (("fw", VF0), ("lan", VF1)):
        (d,) = p.placements[name].devices
        assert (str(d.address), d.iommu_group) == (vf, None)
        assert d.vf is not None and d.vf.settings is not None
        assert (d.vf.settings.mac, d.vf.settings.vlan) == (MAC[name], VLAN[name])


def test_the_diff_makes_the_vfs_then_configures_and_claims_each(fk: FakeSriovKernel) -> None:
    host = scan(fk)
    p = plan(site(), host, {})
    acts = host_steps(diff(p, State(), host, replace=set()))
    assert [(a.kind, a.target) for a in acts] == [
        ("create-vfs", PF),
        ("configure-vf", "fw"),
        ("claim-vf", "fw"),
        ("configure-vf", "lan"),
        ("claim-vf", "lan"),
    ]
    said = [str(a) for a in acts]
    assert said[0] == (
        f"create-vfs {PF}: sriov_numvfs 0 -> 4, with sriov_drivers_autoprobe 0 first "
        "(no host driver probes them)"
    )
    assert said[1] == f"configure-vf fw: VF 0 of {PF}: mac {MAC['fw']}, vlan 100"
    assert said[2] == f"claim-vf fw: VF 0 of {PF} ({VF0} -> vfio-pci)"
    js = [a.to_json() for a in acts]
    assert js[0] | {"detail": ""} == {
        "action": "create-vfs",
        "target": PF,
        "detail": "",
        "pf": PF,
        "vfs": 4,
        "numvfs_now": 0,
    }
    assert (js[1]["pf"], js[1]["index"]) == (PF, 0)
    assert js[1]["settings"]["mac"] == MAC["fw"] and js[1]["settings"]["vlan"] == 100
    assert js[1]["settings"]["spoofchk"] is True and js[1]["settings"]["trust"] is False
    assert (js[4]["index"], js[4]["address"]) == (1, VF1)


def test_apply_makes_sets_and_claims_and_records_the_groups_the_kernel_gave(
    fk: FakeSriovKernel, tmp_path: Path
) -> None:
    _, store = applied(fk, tmp_path, site())
    assert fk.numvfs(PF) == 4
    assert fk.read(f"/sys/bus/pci/devices/{PF}/sriov_drivers_autoprobe") == "0"
    links = vflink.read_vf_links("eth0")
    for i, name in enumerate(("fw", "lan")):
        assert (links[i].mac, links[i].vlan) == (MAC[name], VLAN[name])
    assert links[2].mac == "00:00:00:00:00:00"
    # VFs nobody asked for stay without a driver (autoprobe off): igbvf never took one.
    assert fk.readlink_name(f"/sys/bus/pci/devices/{vf_address_of(PF, 128, 2, 2)}/driver") is None
    state = store.load()
    for name, vf in (("fw", VF0), ("lan", VF1)):
        assert fk.readlink_name(f"/sys/bus/pci/devices/{vf}/driver") == "vfio-pci"
        group = int(fk.readlink_name(f"/sys/bus/pci/devices/{vf}/iommu_group") or "-1")
        rec = state.partitions[name]
        assert rec.claim_groups() == [group]
        # The record's placement carries the group the kernel gave the VF (the plan had none).
        (d,) = rec.placement.devices
        assert (str(d.address), d.iommu_group) == (vf, group)
        assert rec.placement.iommu_groups == (group,)


def test_an_applied_site_planned_again_changes_nothing(fk: FakeSriovKernel, tmp_path: Path) -> None:
    """Once made, the VFs carry their groups in the plan too; the record read back from its
    file compares equal, settings included: nothing to do, nothing held."""
    _, store = applied(fk, tmp_path, site())
    state = store.load()
    state = replace(
        state,
        partitions={
            n: replace(r, state=RunState.RUNNING, pid=1) for n, r in state.partitions.items()
        },
    )
    host = scan(fk)
    p = plan(site(), host, running_partitions(state))
    assert all(pf.iommu_groups_known for pf in p.sriov)
    assert diff(p, state, host, replace=set()) == []
    assert held_replacements(p, state, replace=set()) == {}
    # Another MAC for a running partition's VF is set before its guest gets the VF: held.
    p2 = plan(site(fw_mac="52:54:00:5f:00:09"), host, running_partitions(state))
    held = held_replacements(p2, state, replace=set())
    assert list(held) == ["fw"]
    assert "VF settings change" in held["fw"] and "52:54:00:5f:00:09" in held["fw"]
    assert "needs --replace fw" in held["fw"]
    # With --replace: its VF is given back, its settings put back, then set anew and claimed.
    (rep,) = [a for a in diff(p2, state, host, replace={"fw"}) if a.kind == "replace"]
    kinds = [s.kind for s in rep.steps]  # type: ignore[attr-defined]
    assert kinds[:4] == ["stop", "release-group", "clear-vf", "forget"]
    assert kinds.index("configure-vf") < kinds.index("claim-vf") < kinds.index("start")


def test_destroy_gives_back_the_vfs_their_settings_and_the_count(
    fk: FakeSriovKernel, tmp_path: Path
) -> None:
    ctx, store = applied(fk, tmp_path, site())
    down = teardown(ctx.state.partitions.values(), ctx.state) + restore_all(ctx.state)
    assert [a.kind for a in down] == [
        "release-group",
        "clear-vf",
        "forget",
        "release-group",
        "clear-vf",
        "forget",
        "restore-vfs",
    ]
    execute(down, ctx, store)
    assert fk.numvfs(PF) == 0
    assert fk.read(f"/sys/bus/pci/devices/{PF}/sriov_drivers_autoprobe") == "1"
    assert store.load() == State(site=None)


def test_plan_lists_the_vf_creation_and_each_vfs_settings(
    fk: FakeSriovKernel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = tmp_path / "site.yaml"
    m.write_text(
        textwrap.dedent(f"""\
        version: 1
        host:
          accel: tcg
          isolation: pinned
          smt: share
          reserve: {{cpus: 1, memory: 256MiB}}
          sriov:
            - {{pf: "{PF}", vfs: 4}}
        partitions:
          fw:
            cpus: 1
            memory: 64MiB
            hugepages: none
            devices:
              - {{vf: "{PF}", mac: "{MAC["fw"]}", vlan: 100, qos: 3, spoofchk: false}}
        """)
    )
    root = str(fk.tree.root)
    state = tmp_path / "st"
    rc, out, err = cli(capsys, "--host-root", root, "--state-dir", str(state), "plan", str(m))
    assert rc == 0, err
    lines = [ln.split(None, 2) for ln in out.splitlines() if ln.startswith("  ")]
    assert lines[0][:2] == ["create-vfs", PF] and "sriov_numvfs 0 -> 4" in lines[0][2]
    assert lines[1] == [
        "configure-vf",
        "fw",
        f"VF 0 of {PF}: mac {MAC['fw']}, vlan 100, qos 3, spoofchk off",
    ]
    assert lines[2] == ["claim-vf", "fw", f"VF 0 of {PF} ({VF0} -> vfio-pci)"]
    rc, out, err = cli(
        capsys, "--host-root", root, "--state-dir", str(state), "--json", "plan", str(m)
    )
    assert rc == 0, err
    doc = json.loads(out)
    acts = [a for a in doc["actions"] if a["action"] in ("create-vfs", "configure-vf", "claim-vf")]
    assert [a["action"] for a in acts] == ["create-vfs", "configure-vf", "claim-vf"]
    assert (acts[0]["pf"], acts[0]["vfs"], acts[0]["numvfs_now"]) == (PF, 4, 0)
    s = acts[1]["settings"]
    assert (s["mac"], s["vlan"], s["qos"], s["spoofchk"]) == (MAC["fw"], 100, 3, False)
    assert doc["sriov"] == [{"pf": PF, "netdev": "eth0", "vfs": 4, "iommu_groups_known": False}]
    dev = doc["partitions"]["fw"]["device_details"][0]
    assert dev["iommu_group"] is None and dev["vf"]["index"] == 0


def test_a_plan_against_vfs_made_at_boot_keeps_them(fk: FakeSriovKernel, tmp_path: Path) -> None:
    """VFs `host setup` made at boot (the count the site wants, autoprobe off): apply records
    the PF as it found it and keeps them; destroy leaves them."""
    fk.write(f"/sys/bus/pci/devices/{PF}/sriov_drivers_autoprobe", "0")
    fk.write(f"/sys/bus/pci/devices/{PF}/sriov_numvfs", "4")
    host = scan(fk)
    p: Plan = plan(site(), host, {})
    assert p.sriov[0].iommu_groups_known
    acts = host_steps(diff(p, State(), host, replace=set()))
    assert str(acts[0]) == (
        f"create-vfs {PF}: 4 VFs there already (sriov_numvfs 4): kept, and recorded so that "
        "their settings are set and put back"
    )
    ctx, store = applied(fk, tmp_path, site())
    assert fk.numvfs(PF) == 4 and fk.numvfs_writes == [(PF, "4")]
    execute(teardown(ctx.state.partitions.values(), ctx.state) + restore_all(ctx.state), ctx, store)
    assert fk.numvfs(PF) == 4
    assert vflink.read_vf_links("eth0")[0].mac == "00:00:00:00:00:00"


def test_status_shows_each_partitions_vfs_with_their_settings(
    fk: FakeSriovKernel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, store = applied(fk, tmp_path, site())
    base = ("--host-root", str(fk.tree.root), "--state-dir", str(store.dir))
    rc, out, err = cli(capsys, *base, "--json", "status")
    assert rc == 0, err
    doc = json.loads(out)
    for i, (name, vf) in enumerate((("fw", VF0), ("lan", VF1))):
        (v,) = doc["partitions"][name]["vfs"]
        group = int(fk.readlink_name(f"/sys/bus/pci/devices/{vf}/iommu_group") or "-1")
        assert (v["address"], v["pf"], v["index"], v["iommu_group"], v["set"]) == (
            vf,
            PF,
            i,
            group,
            True,
        )
        assert (v["settings"]["mac"], v["settings"]["vlan"]) == (MAC[name], VLAN[name])
    assert doc["sriov"] == [
        {"pf": PF, "vfs": 4, "numvfs_before": 0, "autoprobe_before": True, "pending": None}
    ]
    rc, out, err = cli(capsys, *base, "status")
    assert rc == 0, err
    assert f"fw: VF 0 of {PF} ({VF0}): mac {MAC['fw']}, vlan 100" in out.splitlines()
    assert f"lan: VF 1 of {PF} ({VF1}): mac {MAC['lan']}, vlan 200" in out.splitlines()
    assert (
        f"host: PF {PF}: 4 VFs for the site (the last destroy puts back sriov_numvfs 0 and "
        "sriov_drivers_autoprobe 1)" in out.splitlines()
    )


def test_audit_names_a_vf_whose_settings_changed_and_a_vf_gone(
    fk: FakeSriovKernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from partitioner import audit

    _, store = applied(fk, tmp_path, site())
    state = store.load()
    # The fake tree stands for the live host here: iproute2 (the fake's) is asked.
    monkeypatch.setattr(vflink, "links_of", lambda root, pf: ("eth0", vflink.read_vf_links("eth0")))
    for name in ("fw", "lan"):
        assert audit.vf_findings(fk, name, state.partitions[name], state) == []
    # Someone on the host gives fw's VF another MAC and takes its VLAN off.
    fk.ip(["ip", "link", "set", "dev", "eth0", "vf", "0", "mac", "52:54:00:00:00:66"])
    fk.ip(["ip", "link", "set", "dev", "eth0", "vf", "0", "vlan", "0"])
    (f,) = audit.vf_findings(fk, "fw", state.partitions["fw"], state)
    assert (f.kind, f.status, f.resource) == ("vf", audit.DRIFT, f"VF 0 of {PF} ({VF0})")
    assert f.detail == (
        f"its settings changed: mac is 52:54:00:00:00:66, the plan says {MAC['fw']}; "
        "vlan is 0, the plan says 100"
    )
    assert f.action.startswith(
        f"ip link set dev eth0 vf 0 mac {MAC['fw']}; ip link set dev eth0 vf 0 vlan 100"
    )
    assert f.ids["fields"] == ["mac", "vlan"]
    assert audit.vf_findings(fk, "lan", state.partitions["lan"], state) == []
    # The VFs gone (the count put to 0 behind the partitioner's back).
    fk.write(f"/sys/bus/pci/devices/{PF}/sriov_numvfs", "0")
    (f,) = audit.vf_findings(fk, "lan", state.partitions["lan"], state)
    assert f.detail == "the PF has no VF 1 now (sriov_numvfs 0)"


def test_audit_of_a_tree_judges_no_settings(fk: FakeSriovKernel, tmp_path: Path) -> None:
    """Under --host-root, iproute2 would read this machine's interfaces: not the tree's."""
    from partitioner import audit

    _, store = applied(fk, tmp_path, site())
    state = store.load()
    fk.ip(["ip", "link", "set", "dev", "eth0", "vf", "0", "mac", "52:54:00:00:00:66"])
    assert audit.vf_findings(fk, "fw", state.partitions["fw"], state) == []


def test_vfs_recorded_but_gone_after_a_reboot_are_made_again(
    fk: FakeSriovKernel, tmp_path: Path
) -> None:
    """The record says apply made the VFs; the host rebooted without `host setup` and the
    PF has none: the next apply makes them again and sets them up, and destroy still puts
    back what the PF had before the first apply."""
    _, store = applied(fk, tmp_path, site())
    state = store.load()
    for name in ("fw", "lan"):  # the guests and the claims went with the reboot
        state = state.without_partition(name)
    fk.write(f"/sys/bus/pci/devices/{PF}/sriov_numvfs", "0")
    fk.write(f"/sys/bus/pci/devices/{PF}/sriov_drivers_autoprobe", "1")
    host = scan(fk)
    p = plan(site(), host, {})
    acts = host_steps(diff(p, state, host, replace=set()))
    assert [a.kind for a in acts][:2] == ["create-vfs", "configure-vf"]
    ctx = ApplyContext(
        root=fk, plan=p, state=state, run_dir=tmp_path / "run", log_dir=tmp_path / "log", host=host
    )
    execute(acts, ctx, store)
    assert fk.numvfs(PF) == 4
    assert vflink.read_vf_links("eth0")[0].mac == MAC["fw"]
    rec = ctx.state.pf(PF)
    assert rec is not None and (rec.numvfs_before, rec.autoprobe_before) == (0, True)
