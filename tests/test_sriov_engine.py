"""SR-IOV in the apply engine: VFs made, configured through the PF, claimed, all put back.

Against a fake kernel that behaves as the kernel's SR-IOV does (tests/fakesriov.py):
``sriov_numvfs`` makes and removes VF directories and ``virtfnN`` links, refuses a
nonzero count over another (EBUSY), and autoprobe binds new VFs to their driver;
its ``ip`` answers as iproute2 does on an igb (trust refused).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fakesriov import FakeSriovKernel, vf_address_of
from treebuilder import TreeBuilder

from partitioner.cpuset import CpuSet
from partitioner.engine.context import ApplyContext
from partitioner.engine.diff import diff, teardown
from partitioner.engine.executor import execute
from partitioner.engine.guests import Start
from partitioner.engine.sriov import (
    ClaimVf,
    ClearVf,
    ConfigureVf,
    CreateVfs,
    RestoreVfs,
    VfsInUse,
    restore_all,
)
from partitioner.engine.step import Action
from partitioner.errors import ApplyFailed, DeviceError
from partitioner.inventory import scan
from partitioner.kernel import vflink
from partitioner.kernel.vflink import VfLink, VfLinkError, parse_vfinfo, set_args
from partitioner.manifest.model import PartitionSpec, VfSettings
from partitioner.pci import PciAddress
from partitioner.planning.model import DeviceAssignment, PfPlan, Placement, Plan, VfAssignment
from partitioner.record.codec import decode, encode
from partitioner.record.model import (
    FunctionRecord,
    GroupClaim,
    PartitionRecord,
    RunState,
    SriovRecord,
    State,
    VfRecord,
)
from partitioner.record.reconcile import reconcile
from partitioner.record.store import StateStore
from partitioner.units import MiB

PF = "0000:01:00.0"
VF0, VF1 = vf_address_of(PF, 128, 2, 0), vf_address_of(PF, 128, 2, 1)
MAC_A, MAC_B = "52:54:00:aa:00:01", "52:54:00:aa:00:02"


def test_vf_addresses_follow_offset_and_stride() -> None:
    assert (VF0, VF1) == ("0000:01:10.0", "0000:01:10.2")  # as the emulated igb shows them


@pytest.fixture
def fk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSriovKernel:
    t = TreeBuilder(tmp_path / "host")
    t.cpus(2)
    t.pci("0000:00:01.0", class_code="060400", driver="pcieport", iommu_group=1)
    t.pci(PF, device="10c9", driver="igb", iommu_group=2, parent="0000:00:01.0", netdevs=["eth0"])
    t.driver("vfio-pci")
    t.driver("igbvf")  # loaded: with autoprobe on, new VFs would bind to it
    t.build()
    k = FakeSriovKernel(t)
    k.add_pf(PF, "eth0", unsupported=["trust"])
    monkeypatch.setattr(vflink, "run", k.ip)
    # The VFIO ioctls need a real VFIO (tried inside the emulated server).
    monkeypatch.setattr("partitioner.engine.devices.check_group", lambda *a, **k: None)
    return k


def ctx_of(
    fk: FakeSriovKernel, tmp_path: Path, state: State | None = None, plan: Plan | None = None
) -> ApplyContext:
    return ApplyContext(
        root=fk,
        plan=plan or make_plan(),
        state=state or State(),
        run_dir=tmp_path / "run",
        log_dir=tmp_path / "log",
        host=scan(fk),
    )


def store_of(tmp_path: Path) -> StateStore:
    d = tmp_path / "state"
    d.mkdir(exist_ok=True)
    return StateStore(d)


def driver(fk: FakeSriovKernel, a: str) -> str | None:
    return fk.readlink_name(f"/sys/bus/pci/devices/{a}/driver")


def autoprobe(fk: FakeSriovKernel) -> str | None:
    return fk.read(f"/sys/bus/pci/devices/{PF}/sriov_drivers_autoprobe")


def links(fk: FakeSriovKernel) -> dict[int, VfLink]:
    return vflink.read_vf_links("eth0")


# -- the fake kernel behaves like the kernel ---------------------------------------------


def test_the_fake_kernel_refuses_a_nonzero_count_over_another(fk: FakeSriovKernel) -> None:
    fk.write(f"/sys/bus/pci/devices/{PF}/sriov_numvfs", "2")
    assert driver(fk, VF0) == "igbvf"  # autoprobe on: the host driver took it
    assert fk.readlink_name(f"/sys/bus/pci/devices/{VF1}/physfn") == PF
    with pytest.raises(OSError, match="busy"):
        fk.write(f"/sys/bus/pci/devices/{PF}/sriov_numvfs", "3")
    fk.write(f"/sys/bus/pci/devices/{PF}/sriov_numvfs", "0")
    assert not fk.exists(f"/sys/bus/pci/devices/{VF0}")
    assert not fk.exists(f"/sys/bus/pci/devices/{PF}/virtfn0")
    with pytest.raises(OSError, match="range"):
        fk.write(f"/sys/bus/pci/devices/{PF}/sriov_numvfs", "9")


# -- making VFs -----------------------------------------------------------------------------


def test_create_vfs_turns_autoprobe_off_first_and_records_the_intent_before(
    fk: FakeSriovKernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_of(tmp_path)
    ctx = ctx_of(fk, tmp_path)
    ctx.store = store
    seen: list[tuple[str, str, tuple[SriovRecord, ...]]] = []
    real_write = fk.write

    def watching(path: str, value: str) -> None:
        if "sriov" in path:
            seen.append((path.rpartition("/")[2], value, store.load().sriov))
        real_write(path, value)

    monkeypatch.setattr(fk, "write", watching)
    CreateVfs(PF, 2).do(ctx)
    # autoprobe off before the VFs exist, each write with the intent already on disk
    assert [(leaf, v) for leaf, v, _ in seen] == [
        ("sriov_drivers_autoprobe", "0"),
        ("sriov_numvfs", "2"),
    ]
    for _, _, saved in seen:
        assert saved == (SriovRecord(PF, 0, True, 2, pending=True, op="create"),)
    assert ctx.state.sriov == (SriovRecord(PF, 0, True, 2, pending=False),)
    assert fk.vf_addresses(PF) == [VF0, VF1]
    assert driver(fk, VF0) is None and driver(fk, VF1) is None  # no host driver probed them
    assert CreateVfs(PF, 2).check(ctx)
    CreateVfs(PF, 2).undo(ctx)
    assert fk.numvfs(PF) == 0 and autoprobe(fk) == "1" and ctx.state.sriov == ()


def test_a_new_count_goes_through_zero_and_destroy_puts_the_old_one_back(
    fk: FakeSriovKernel, tmp_path: Path
) -> None:
    fk.write(f"/sys/bus/pci/devices/{PF}/sriov_drivers_autoprobe", "0")
    fk.write(f"/sys/bus/pci/devices/{PF}/sriov_numvfs", "2")  # the administrator's
    fk.numvfs_writes.clear()
    ctx = ctx_of(fk, tmp_path)
    CreateVfs(PF, 4).do(ctx)
    assert fk.numvfs_writes == [(PF, "0"), (PF, "4")]
    assert ctx.state.sriov[0].numvfs_before == 2 and fk.numvfs(PF) == 4
    RestoreVfs(PF, 4, 2, False).do(ctx)
    assert fk.numvfs_writes[-2:] == [(PF, "0"), (PF, "2")]
    assert fk.numvfs(PF) == 2 and autoprobe(fk) == "0" and ctx.state.sriov == ()


def test_more_vfs_than_the_pf_offers_are_refused_before_anything(
    fk: FakeSriovKernel, tmp_path: Path
) -> None:
    ctx = ctx_of(fk, tmp_path)
    with pytest.raises(DeviceError, match="at most 8 VFs"):
        CreateVfs(PF, 9).do(ctx)
    assert fk.writes == [] and ctx.state.sriov == ()


def test_the_count_is_not_changed_under_a_vf_the_host_uses(
    fk: FakeSriovKernel, tmp_path: Path
) -> None:
    fk.write(f"/sys/bus/pci/devices/{PF}/sriov_numvfs", "2")  # autoprobe on: igbvf binds both
    fk.writes.clear()
    ctx = ctx_of(fk, tmp_path)
    with pytest.raises(VfsInUse) as ei:
        CreateVfs(PF, 4).do(ctx)
    assert f"VF 0 ({VF0}) is bound to the host's driver igbvf" in str(ei.value)
    assert ei.value.exit_code == 3
    assert fk.writes == [] and ctx.state.sriov == () and fk.numvfs(PF) == 2


def test_the_count_is_not_put_back_under_a_vf_a_partition_holds(
    fk: FakeSriovKernel, tmp_path: Path
) -> None:
    ctx = ctx_of(fk, tmp_path)
    CreateVfs(PF, 2).do(ctx)
    claim = GroupClaim(9, (FunctionRecord(VF1, None, None),))
    p = make_placement("lan", ())
    ctx.state = ctx.state.with_partition(
        PartitionRecord("lan", RunState.RUNNING, p, pid=10, claims=(claim,))
    )
    with pytest.raises(VfsInUse, match=f"VF 1 \\({VF1}\\) is claimed by partition lan"):
        RestoreVfs(PF, 2, 0, True).do(ctx)
    assert fk.numvfs(PF) == 2 and ctx.state.pf(PF) is not None


# -- a VF's settings --------------------------------------------------------------------------


def test_configure_sets_what_differs_and_clear_puts_back_what_was(
    fk: FakeSriovKernel, tmp_path: Path
) -> None:
    ctx = ctx_of(fk, tmp_path)
    CreateVfs(PF, 2).do(ctx)
    fk.ip_calls.clear()
    settings = VfSettings(mac=MAC_A.upper(), vlan=100, qos=3, spoofchk=False)
    step = ConfigureVf("lan", PF, 1, settings)
    assert (
        str(step) == f"configure-vf lan: VF 1 of {PF}: mac {MAC_A}, vlan 100, qos 3, spoofchk off"
    )
    step.do(ctx)
    sets = [c[7:] for c in fk.ip_calls if c[1] == "link"]
    # One command per setting, and none for what the VF has already (trust off).
    assert sets == [["mac", MAC_A], ["vlan", "100", "qos", "3"], ["spoofchk", "off"]]
    got = links(fk)
    assert got[1] == VfLink(mac=MAC_A, vlan=100, qos=3, spoofchk=False)
    assert got[0] == VfLink()
    held = ctx.state.sriov[0].vf(1)
    assert held == VfRecord(1, "lan", VfLink(), got[1], pending=False)
    assert step.check(ctx)
    ClearVf("lan", PF, 1, got[1]).do(ctx)
    assert links(fk)[1] == VfLink() and ctx.state.sriov[0].vfs == ()


def test_a_setting_the_driver_refuses_is_named_and_what_was_set_goes_back(
    fk: FakeSriovKernel, tmp_path: Path
) -> None:
    ctx = ctx_of(fk, tmp_path)
    CreateVfs(PF, 2).do(ctx)
    with pytest.raises(VfLinkError, match=r"setting trust of VF 0 .* Operation not supported"):
        ConfigureVf("lan", PF, 0, VfSettings(mac=MAC_A, vlan=7, qos=None, trust=True)).do(ctx)
    assert links(fk)[0] == VfLink()  # the MAC and VLAN set before it are taken back
    assert ctx.state.sriov[0].vfs == ()


def test_a_vf_without_its_pf_netdev_is_a_clear_error(fk: FakeSriovKernel, tmp_path: Path) -> None:
    ctx = ctx_of(fk, tmp_path)
    CreateVfs(PF, 1).do(ctx)
    shutil.rmtree(fk.path(f"/sys/bus/pci/devices/{PF}/net/eth0"))
    with pytest.raises(VfLinkError, match=r"must have one network interface .*it has none"):
        ConfigureVf("lan", PF, 0, VfSettings(mac=MAC_A, vlan=None, qos=None)).do(ctx)


def test_configure_needs_the_vfs_made_by_apply(fk: FakeSriovKernel, tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match=r"declare the PF in host\.sriov"):
        ConfigureVf("lan", PF, 0, VfSettings(mac=MAC_A, vlan=None, qos=None)).do(
            ctx_of(fk, tmp_path)
        )


# -- the whole apply and destroy through diff -------------------------------------------------


def make_placement(name: str, vfs: tuple[tuple[int, str, VfSettings | None], ...]) -> Placement:
    spec = PartitionSpec(
        name=name,
        cpu_count=1,
        cpu_list=None,
        memory_bytes=128 * MiB,
        hugepage_bytes=None,
        numa="auto",
    )
    devs = tuple(
        DeviceAssignment(
            PciAddress.parse(addr),
            99,  # not known at plan time (the VF does not exist yet): not the group claimed
            "8086:10ca",
            None,
            False,
            f"vf of {PF}",
            vf=VfAssignment(PciAddress.parse(PF), index, settings),
        )
        for index, addr, settings in vfs
    )
    return Placement(
        name=name,
        cpus=(1,),
        sockets=1,
        cores=1,
        threads=1,
        numa_nodes=(0,),
        memory_per_node=((0, 128 * MiB),),
        hugepage_bytes=None,
        devices=devs,
        spec=spec,
    )


def make_plan(*placements: Placement, vfs: int = 0) -> Plan:
    return Plan(
        accel="tcg",
        smt="isolate",
        host_cpus=CpuSet([0]),
        host_memory_bytes=512 * MiB,
        placements={p.name: p for p in placements},
        confine=False,
        sriov=(PfPlan(PciAddress.parse(PF), "eth0", vfs, False),) if vfs else (),
    )


TWO = (
    make_placement("fw", ((0, VF0, VfSettings(mac=MAC_A, vlan=100, qos=None)),)),
    make_placement("lan", ((1, VF1, VfSettings(mac=MAC_B, vlan=200, qos=None)),)),
)


def without_starts(actions: list[Action]) -> list[Action]:
    return [a for a in actions if not isinstance(a, Start)]


def test_apply_makes_configures_then_claims_and_destroy_puts_everything_back(
    fk: FakeSriovKernel, tmp_path: Path
) -> None:
    plan = make_plan(*TWO, vfs=4)
    ctx = ctx_of(fk, tmp_path, plan=plan)
    store = store_of(tmp_path)
    acts = diff(plan, State(), scan(fk), replace=set())
    assert [(a.kind, a.target) for a in acts] == [
        ("create-vfs", PF),
        ("configure-vf", "fw"),
        ("claim-vf", "fw"),
        ("start", "fw"),
        ("configure-vf", "lan"),
        ("claim-vf", "lan"),
        ("start", "lan"),
    ]
    execute(without_starts(acts), ctx, store)
    assert driver(fk, VF0) == "vfio-pci" and driver(fk, VF1) == "vfio-pci"
    assert fk.exists(f"/dev/vfio/{fk.readlink_name(f'/sys/bus/pci/devices/{VF0}/iommu_group')}")
    got = links(fk)
    assert (got[0].mac, got[0].vlan, got[1].mac, got[1].vlan) == (MAC_A, 100, MAC_B, 200)
    assert store.load().sriov == ctx.state.sriov  # what is on disk is what was done
    # A second apply (the partitions are stopped: Start was left out here) finds it all done.
    again = without_starts(diff(plan, ctx.state, scan(fk), replace=set()))
    assert {a.kind for a in again} == {"configure-vf", "claim-vf"}
    assert all(a.check(ctx) for a in again)

    state = ctx.state
    down = teardown(state.partitions.values(), state) + restore_all(state)
    assert [(a.kind, a.target) for a in down] == [
        ("release-group", "lan"),
        ("clear-vf", "lan"),
        ("forget", "lan"),
        ("release-group", "fw"),
        ("clear-vf", "fw"),
        ("forget", "fw"),
        ("restore-vfs", PF),
    ]
    # The VFs' settings go back while they still exist, before the count does.
    execute(down, ctx, store)
    assert fk.numvfs(PF) == 0 and autoprobe(fk) == "1"
    assert ctx.state.sriov == () and ctx.state.partitions == {}


def test_a_failed_claim_unwinds_settings_and_vfs(fk: FakeSriovKernel, tmp_path: Path) -> None:
    plan = make_plan(*TWO, vfs=2)
    ctx = ctx_of(fk, tmp_path, plan=plan)
    fk.fail("override", VF1, 5)  # EIO when lan's VF is claimed
    acts = without_starts(diff(plan, State(), scan(fk), replace=set()))
    with pytest.raises(ApplyFailed, match="claim-vf lan failed"):
        execute(acts, ctx, store_of(tmp_path))
    assert fk.numvfs(PF) == 0 and autoprobe(fk) == "1" and ctx.state == State()


def test_a_vf_planned_at_another_address_is_refused(fk: FakeSriovKernel, tmp_path: Path) -> None:
    ctx = ctx_of(fk, tmp_path, plan=make_plan(*TWO, vfs=2))
    CreateVfs(PF, 2).do(ctx)
    with pytest.raises(DeviceError, match=f"VF 1 of {PF} is {VF1}, not 0000:01:10.4"):
        ClaimVf("lan", PF, 1, "0000:01:10.4").do(ctx)


def test_a_pf_leaving_the_plan_is_put_back_after_the_partitions_leave(
    fk: FakeSriovKernel, tmp_path: Path
) -> None:
    plan = make_plan(*TWO, vfs=2)
    ctx = ctx_of(fk, tmp_path, plan=plan)
    execute(without_starts(diff(plan, State(), scan(fk), replace=set())), ctx, store_of(tmp_path))
    acts = diff(make_plan(), ctx.state, scan(fk), replace=set())
    kinds = [a.kind for a in acts]
    assert kinds.index("restore-vfs") > max(i for i, k in enumerate(kinds) if k == "clear-vf")
    assert kinds[-1] == "restore-vfs"


# -- the record and a killed command -------------------------------------------------------


def test_the_record_keeps_pfs_and_vfs_and_refuses_nonsense() -> None:
    rec = SriovRecord(
        PF,
        2,
        False,
        4,
        pending=True,
        op="restore",
        vfs=(VfRecord(1, "lan", VfLink(), VfLink(mac=MAC_A, vlan=5, trust=None), pending=False),),
    )
    st = State(sriov=(rec,))
    assert decode(encode(st)) == st
    assert b"sriov" not in encode(State())  # a site without SR-IOV writes what it wrote before
    doc = json.loads(encode(st))
    for bad, match in [
        ({"op": "grow"}, "neither create nor restore"),
        ({"pf": "01:00.0x"}, "01:00.0x"),
        ({"autoprobe_before": 1}, "not true or false"),
        ({"vfs": [{**doc["sriov"][0]["vfs"][0], "want": {"mac": "ff:ff"}}]}, "not a MAC"),
        ({"vfs": [{**doc["sriov"][0]["vfs"][0], "partition": "../x"}]}, "not a partition name"),
    ]:
        d = json.loads(encode(st))
        d["sriov"][0].update(bad)
        with pytest.raises(ValueError, match=match):
            decode(json.dumps(d).encode())


class Killed(BaseException):
    """A SIGKILL stand-in, raised at a kill point."""


class Death:
    """After the kill nothing more reaches the host or the disk: the process is gone, whatever
    its handlers would have done (their writes and saves are dropped here)."""

    def __init__(self, fk: FakeSriovKernel, store: StateStore, mp: pytest.MonkeyPatch) -> None:
        self.dead = False
        self.at: tuple[str, str] = ("", "")  # (point or "write", sysfs leaf)
        real_write, real_save, real_ip = fk.write, store.save, fk.ip

        def write(path: str, value: str) -> None:
            if self.dead:
                raise Killed
            if self.at == ("write", path.rpartition("/")[2]):
                self.die()
            real_write(path, value)

        def save(state: State) -> None:
            if not self.dead:
                real_save(state)

        def ip(argv: Any, **kw: Any) -> Any:
            if self.dead:
                raise Killed
            return real_ip(argv, **kw)

        def point(name: str) -> None:
            if self.at == (name, ""):
                self.die()

        mp.setattr(fk, "write", write)
        mp.setattr(store, "save", save)
        mp.setattr(vflink, "run", ip)
        mp.setattr("partitioner.engine.sriov.point", point)

    def die(self) -> None:
        self.dead = True
        raise Killed


@pytest.mark.parametrize(
    ("at", "outcome"),
    [
        ("before-autoprobe", "back"),  # intent saved, nothing written yet
        ("before-numvfs", "back"),  # autoprobe off, no VFs yet
        ("vfs-created", "made"),  # VFs there, record not yet saying so
    ],
)
def test_a_create_killed_anywhere_is_settled_by_the_next_run(
    fk: FakeSriovKernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: str, outcome: str
) -> None:
    store = store_of(tmp_path)
    ctx = ctx_of(fk, tmp_path)
    ctx.store = store
    death = Death(fk, store, monkeypatch)
    death.at = {
        "before-autoprobe": ("write", "sriov_drivers_autoprobe"),
        "before-numvfs": ("write", "sriov_numvfs"),
    }.get(at, (at, ""))
    with pytest.raises(Killed):
        execute([CreateVfs(PF, 2)], ctx, store)
    death.dead = False
    death.at = ("", "")
    left = store.load()
    assert left.sriov[0].pending  # the intent was on disk before the change
    r = reconcile(left, fk)
    assert [f.subject for f in r.findings] == ["SR-IOV PF"]
    r.carry_out()
    if outcome == "made":
        assert r.state.sriov == (replace(left.sriov[0], pending=False),)
        assert fk.numvfs(PF) == 2 and autoprobe(fk) == "0"
        assert "record them as made" in r.findings[0].text(done=True)
    else:
        assert r.state.sriov == () and fk.numvfs(PF) == 0 and autoprobe(fk) == "1"
        assert "put back sriov_numvfs 0 and sriov_drivers_autoprobe 1" in r.findings[0].text(
            done=True
        )


@pytest.mark.parametrize("at", ["vf-configured", "vf-cleared", "vfs-restored"])
def test_settings_and_restores_killed_are_settled_by_the_next_run(
    fk: FakeSriovKernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: str
) -> None:
    store = store_of(tmp_path)
    ctx = ctx_of(fk, tmp_path)
    ctx.store = store
    settings = VfSettings(mac=MAC_A, vlan=100, qos=None)
    first: list[Action] = [CreateVfs(PF, 2)]
    if at != "vf-configured":
        first.append(ConfigureVf("lan", PF, 0, settings))
    execute(first, ctx, store)
    death = Death(fk, store, monkeypatch)
    death.at = (at, "")
    set_back = VfLink(mac=MAC_A, vlan=100)
    steps: list[Action] = {
        "vf-configured": [ConfigureVf("lan", PF, 0, settings)],
        "vf-cleared": [ClearVf("lan", PF, 0, set_back)],
        "vfs-restored": [ClearVf("lan", PF, 0, set_back), RestoreVfs(PF, 2, 0, True)],
    }[at]
    with pytest.raises(Killed):
        execute(steps, ctx, store)
    death.dead = False
    death.at = ("", "")
    r = reconcile(store.load(), fk)
    assert r.findings
    r.carry_out()
    if at == "vfs-restored":
        assert r.state.sriov == () and fk.numvfs(PF) == 0 and autoprobe(fk) == "1"
    else:
        # The VF's settings back as they were, the PF's VFs still made and recorded.
        assert links(fk)[0] == VfLink()
        assert r.state.sriov == (SriovRecord(PF, 0, True, 2, pending=False),)
        assert "put back what it had (defaults)" in r.findings[0].text(done=True)
        assert r.findings[0].partition == "lan"


# -- iproute2's JSON -------------------------------------------------------------------------

# `ip -j -d link show dev eth0` inside the emulated server (QEMU 10.0's igb, Debian 12's
# iproute2 6.1), after `vf 0 mac .. vlan 100 qos 3 spoofchk off` and `vf 1 ... rate 100`.
SEEN = (
    '[{"ifindex":2,"ifname":"eth0","parentbus":"pci","parentdev":"0000:01:00.0","vfinfo_list":['
    '{"vf":0,"link_type":"ether","address":"52:54:00:12:34:56","broadcast":"ff:ff:ff:ff:ff:ff",'
    '"vlan_list":[{"vlan":100,"qos":3}],"rate":{"max_tx":0,"min_tx":0},"spoofchk":false,'
    '"link_state":"auto","trust":false},{"vf":1,"link_type":"ether","address":"52:54:00:12:34:57",'
    '"broadcast":"ff:ff:ff:ff:ff:ff","vlan_list":[{"vlan":200}],"tx_rate":100,"rate":{"max_tx":100,'
    '"min_tx":0},"spoofchk":true,"link_state":"auto","trust":false},{"vf":2,"link_type":"ether",'
    '"address":"00:00:00:00:00:00","broadcast":"ff:ff:ff:ff:ff:ff","vlan_list":[{}],'
    '"rate":{"max_tx":0,"min_tx":0},"spoofchk":true,"link_state":"auto","trust":false}]}]'
)


def test_iproute2s_json_is_read_as_the_emulated_igb_shows_it() -> None:
    got = parse_vfinfo(json.loads(SEEN), "eth0")
    assert got == {
        0: VfLink(mac="52:54:00:12:34:56", vlan=100, qos=3, spoofchk=False),
        1: VfLink(mac="52:54:00:12:34:57", vlan=200, max_tx_rate=100),
        2: VfLink(),
    }
    # iproute2 before vlan_list (vlan and qos on the VF), and a driver without trust or state
    old = [
        {"vfinfo_list": [{"vf": 0, "mac": "52:54:00:AA:00:01", "vlan": 9, "qos": 1, "tx_rate": 5}]}
    ]
    assert parse_vfinfo(old, "eth9") == {
        0: VfLink(
            mac=MAC_A, vlan=9, qos=1, spoofchk=None, trust=None, link_state=None, max_tx_rate=5
        )
    }
    with pytest.raises(VfLinkError, match="not the one interface"):
        parse_vfinfo([], "eth0")


def test_only_what_differs_is_sent_and_clearing_a_vlan_drops_its_qos() -> None:
    now = VfLink(mac=MAC_A, vlan=100, qos=3, spoofchk=False)
    assert set_args(now, now) == []
    assert set_args(VfLink(), now) == [
        ["mac", "00:00:00:00:00:00"],
        ["vlan", "0"],
        ["spoofchk", "on"],
    ]
    want = now.with_settings(
        VfSettings(mac=None, vlan=None, qos=None, trust=True, link_state="disable", max_tx_rate=50)
    )
    assert set_args(want, now) == [
        ["spoofchk", "on"],  # the manifest's default
        ["trust", "on"],
        ["state", "disable"],
        ["min_tx_rate", "0", "max_tx_rate", "50"],
    ]
