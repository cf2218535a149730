"""Claim and release of IOMMU groups, against a fake kernel playing the PCI driver core."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from fakekernel import FakeKernelRoot, scan_pci
from treebuilder import TreeBuilder

from partitioner.errors import DeviceError
from partitioner.inventory.model import Host
from partitioner.kernel.root import HostRoot
from partitioner.pci import PciAddress
from partitioner.record.codec import claim_from_json, claim_to_json
from partitioner.run import CommandFailed
from partitioner.vfio.claim import (
    ClaimFailed,
    FunctionRecord,
    GroupClaim,
    claim_group,
    claimed_now,
    release_group,
)
from partitioner.vfio.preview import claim_preview

NIC = "0000:01:00.0"  # e1000e behind root port 00:01.0, alone in group 2
BR_A, BR_B = "0000:02:01.0", "0000:02:02.0"  # e1000s behind the PCI bridge 00:02.0, group 3
F0, F1 = "0000:03:00.0", "0000:03:00.1"  # a two-function NIC, group 4
VGA, AUDIO = "0000:00:05.0", "0000:00:05.1"  # boot VGA and its audio, group 5
NVME = "0000:04:00.0"  # holds the root filesystem, group 6
BARE = "0000:05:00.0"  # no driver, group 7
PRE = "0000:06:00.0"  # already on vfio-pci, group 8
NORESET = "0000:07:00.0"  # no reset method, group 9


def build(tree: TreeBuilder, *, vfio_loaded: bool = True) -> TreeBuilder:
    t = tree
    t.pci("0000:00:01.0", class_code="060400", driver="pcieport", iommu_group=1)
    t.pci(NIC, driver="e1000e", iommu_group=2, parent="0000:00:01.0")
    t.pci("0000:00:02.0", class_code="060400", driver="pcieport", iommu_group=3)
    t.pci(BR_A, device="100e", driver="e1000", iommu_group=3, parent="0000:00:02.0")
    t.pci(BR_B, device="100e", driver="e1000", iommu_group=3, parent="0000:00:02.0")
    t.pci(F0, driver="e1000e", iommu_group=4)
    t.pci(F1, device="10c9", driver="igb", iommu_group=4)
    t.pci(
        VGA,
        vendor="1234",
        device="1111",
        class_code="030000",
        driver="bochs-drm",
        iommu_group=5,
        boot_vga=True,
    )
    t.pci(AUDIO, device="293e", class_code="040300", driver="snd_hda_intel", iommu_group=5)
    t.pci(NVME, vendor="1b36", device="0010", class_code="010802", driver="nvme", iommu_group=6)
    t.pci(BARE, iommu_group=7)
    if vfio_loaded:
        t.pci(PRE, driver="vfio-pci", driver_override="vfio-pci", iommu_group=8)
    t.pci(NORESET, driver="e1000e", iommu_group=9, reset_methods=())
    if vfio_loaded:
        t.driver("vfio-pci")
    t.build()
    return t


@pytest.fixture
def fk(tree: TreeBuilder) -> FakeKernelRoot:
    return FakeKernelRoot(build(tree))


def host_of(fk: FakeKernelRoot, **in_use: tuple[str, ...]) -> Host:
    return scan_pci(fk, in_use={NVME: ("controller of / (nvme0n1p2)",), **in_use})


def driver(fk: FakeKernelRoot, a: str) -> str | None:
    return fk.readlink_name(f"/sys/bus/pci/devices/{a}/driver")


def override(fk: FakeKernelRoot, a: str) -> str | None:
    return fk.read(f"/sys/bus/pci/devices/{a}/driver_override")


def never_loads(name: str) -> None:
    raise AssertionError(f"modprobe {name} was not expected")


# -- claim and release ----------------------------------------------------------------


def test_claim_binds_to_vfio_and_records_the_original(fk: FakeKernelRoot) -> None:
    claim = claim_group(fk, host_of(fk), 2, load_module=never_loads)
    assert claim == GroupClaim(2, (FunctionRecord(NIC, "e1000e", None),), False)
    assert driver(fk, NIC) == "vfio-pci"
    assert override(fk, NIC) == "vfio-pci"
    assert fk.exists("/dev/vfio/2")
    assert driver(fk, "0000:00:01.0") == "pcieport"  # the root port of another group
    # The documented order: override, unbind, probe.
    assert [p for p, _ in fk.writes] == [
        f"/sys/bus/pci/devices/{NIC}/driver_override",
        f"/sys/bus/pci/devices/{NIC}/driver/unbind",
        "/sys/bus/pci/drivers_probe",
    ]


def test_release_restores_the_original_driver(fk: FakeKernelRoot) -> None:
    claim = claim_group(fk, host_of(fk), 2)
    release_group(fk, claim)
    assert driver(fk, NIC) == "e1000e"
    assert override(fk, NIC) == "(null)"
    assert not fk.exists("/dev/vfio/2")
    assert claimed_now(fk, claim) == [NIC]


def test_release_twice_changes_nothing(fk: FakeKernelRoot) -> None:
    claim = claim_group(fk, host_of(fk), 2)
    release_group(fk, claim)
    n = len(fk.writes)
    release_group(fk, claim)
    assert len(fk.writes) == n
    assert driver(fk, NIC) == "e1000e"


def test_release_restores_a_previous_override(tree: TreeBuilder) -> None:
    tree.pci("0000:09:00.0", driver="e1000e", driver_override="e1000e", iommu_group=12)
    tree.driver("vfio-pci")
    tree.build()
    fk = FakeKernelRoot(tree)
    claim = claim_group(fk, scan_pci(fk), 12)
    assert claim.functions[0].driver_override == "e1000e"
    assert driver(fk, "0000:09:00.0") == "vfio-pci"
    release_group(fk, claim)
    assert override(fk, "0000:09:00.0") == "e1000e"
    assert driver(fk, "0000:09:00.0") == "e1000e"


def test_release_by_probe_when_the_driver_has_no_bind_file(fk: FakeKernelRoot) -> None:
    claim = claim_group(fk, host_of(fk), 2)
    fk.path("/sys/bus/pci/drivers/e1000e/bind").unlink()
    release_group(fk, claim)
    assert driver(fk, NIC) == "e1000e"
    assert fk.writes[-1] == ("/sys/bus/pci/drivers_probe", NIC)


def test_function_with_no_driver_goes_back_to_none(fk: FakeKernelRoot) -> None:
    claim = claim_group(fk, host_of(fk), 7)
    assert claim.functions == (FunctionRecord(BARE, None, None),)
    assert driver(fk, BARE) == "vfio-pci"
    # No unbind was needed: it had no driver.
    assert not any(p.endswith("/unbind") for p, _ in fk.writes)
    release_group(fk, claim)
    assert driver(fk, BARE) is None
    assert override(fk, BARE) == "(null)"
    assert fk.writes[-1][0].endswith("/driver_override")  # not probed into some driver


def test_function_already_on_vfio_is_left_as_it_is(fk: FakeKernelRoot) -> None:
    claim = claim_group(fk, host_of(fk), 8)
    assert claim.functions == (FunctionRecord(PRE, "vfio-pci", "vfio-pci"),)
    assert fk.writes == []
    release_group(fk, claim)
    assert fk.writes == []
    assert driver(fk, PRE) == "vfio-pci"


def test_bridge_in_the_group_stays_with_the_host(fk: FakeKernelRoot) -> None:
    claim = claim_group(fk, host_of(fk), 3)
    assert claim.addresses == (BR_A, BR_B)
    assert driver(fk, BR_A) == driver(fk, BR_B) == "vfio-pci"
    assert driver(fk, "0000:00:02.0") == "pcieport"
    assert not any("0000:00:02.0" in p or v == "0000:00:02.0" for p, v in fk.writes)
    release_group(fk, claim)
    assert driver(fk, BR_A) == driver(fk, BR_B) == "e1000"


def test_whole_group_is_claimed(fk: FakeKernelRoot) -> None:
    claim = claim_group(fk, host_of(fk), 4)
    assert claim.addresses == (F0, F1)
    assert driver(fk, F0) == driver(fk, F1) == "vfio-pci"
    release_group(fk, claim)
    assert (driver(fk, F0), driver(fk, F1)) == ("e1000e", "igb")


def test_loads_vfio_pci_when_missing(tree: TreeBuilder) -> None:
    fk = FakeKernelRoot(build(tree, vfio_loaded=False))
    claim = claim_group(fk, scan_pci(fk), 2, load_module=fk.load_module)
    assert fk.modules_loaded == ["vfio-pci"]
    assert claim.loaded_vfio_pci
    assert driver(fk, NIC) == "vfio-pci"


def test_module_that_will_not_load_is_a_device_error(tree: TreeBuilder) -> None:
    fk = FakeKernelRoot(build(tree, vfio_loaded=False))

    def broken(name: str) -> None:
        raise CommandFailed(["modprobe", name], 1, f"modprobe: FATAL: Module {name} not found")

    with pytest.raises(
        DeviceError,
        match=r"could not load the vfio-pci module \(modprobe vfio-pci: modprobe: FATAL: Module vfio-pci not found\)",
    ):
        claim_group(fk, scan_pci(fk), 2, load_module=broken)
    assert fk.writes == []


def test_claim_json_round_trip(fk: FakeKernelRoot) -> None:
    claim = claim_group(fk, host_of(fk), 4)
    doc = json.loads(json.dumps(claim_to_json(claim)))
    assert doc["functions"][1] == {"address": F1, "driver": "igb", "driver_override": None}
    again = claim_from_json(doc)
    assert again == claim
    release_group(fk, again)
    assert driver(fk, F1) == "igb"


# -- refusals -----------------------------------------------------------------------


def test_host_used_device_is_refused(fk: FakeKernelRoot) -> None:
    with pytest.raises(
        DeviceError, match=r"0000:04:00.0 is in use by the host: controller of /"
    ) as e:
        claim_group(fk, host_of(fk), 6)
    assert e.value.address == NVME
    assert fk.writes == []
    assert driver(fk, NVME) == "nvme"


def test_group_with_a_foreign_endpoint_in_use_is_refused(fk: FakeKernelRoot) -> None:
    host = host_of(fk, **{F1: ("enp3s0f1 carries the default route",)})
    with pytest.raises(DeviceError, match=r"0000:03:00.1 is in use by the host: enp3s0f1 carries"):
        claim_group(fk, host, 4)
    assert fk.writes == []
    assert driver(fk, F0) == "e1000e"


def test_boot_vga_is_refused(fk: FakeKernelRoot) -> None:
    with pytest.raises(
        DeviceError, match=r"0000:00:05.0 is in use by the host: the boot VGA device"
    ):
        claim_group(fk, host_of(fk), 5)
    assert fk.writes == []


def test_bridge_whose_driver_blocks_viability_is_refused(tree: TreeBuilder) -> None:
    tree.pci("0000:86:00.0", vendor="1b36", device="000e", class_code="060400",
             driver="shpchp", iommu_group=16)  # fmt: skip
    tree.pci("0000:87:01.0", device="100e", driver="e1000", iommu_group=16, parent="0000:86:00.0")
    tree.driver("vfio-pci")
    tree.build()
    fk = FakeKernelRoot(tree)
    host = scan_pci(fk)
    msg = r"bridge 0000:86:00.0 in IOMMU group 16 is bound to shpchp.*drivers/shpchp/unbind"
    with pytest.raises(DeviceError, match=msg):
        claim_group(fk, host, 16)
    assert fk.writes == []
    p = claim_preview(host, PciAddress.parse("0000:87:01.0"))
    assert not p.assignable and "bound to shpchp" in (p.why_not or "")
    # Once the operator unbinds it, the group may go.
    fk.write("/sys/bus/pci/drivers/shpchp/unbind", "0000:86:00.0")
    claim = claim_group(fk, scan_pci(fk), 16)
    assert driver(fk, "0000:87:01.0") == "vfio-pci"
    assert driver(fk, "0000:86:00.0") is None
    release_group(fk, claim)


def test_group_of_bridges_only_is_refused(fk: FakeKernelRoot) -> None:
    with pytest.raises(DeviceError, match="holds only bridges"):
        claim_group(fk, host_of(fk), 1)


def test_unknown_group_without_iommu_names_the_fix(fk: FakeKernelRoot) -> None:
    host = scan_pci(fk, has_iommu=False)
    with pytest.raises(DeviceError, match="intel_iommu=on"):
        claim_group(fk, host, 99)


# -- failures halfway ---------------------------------------------------------------


def test_partial_failure_gives_back_what_was_taken(fk: FakeKernelRoot) -> None:
    fk.fail("unbind", F1, errno.EBUSY)
    with pytest.raises(ClaimFailed) as e:
        claim_group(fk, host_of(fk), 4)
    err = e.value
    assert err.errno == errno.EBUSY
    assert err.address == F1
    assert err.path == f"/sys/bus/pci/devices/{F1}/driver/unbind"
    assert "EBUSY" in str(err) and "busy" in str(err)
    # Newest first: F1 (whose override was set) then F0.
    assert err.restored == [f"{F1} (igb)", f"{F0} (e1000e)"]
    assert err.not_restored == []
    assert f"given back: {F1} (igb), {F0} (e1000e)" in str(err)
    assert (driver(fk, F0), driver(fk, F1)) == ("e1000e", "igb")
    assert override(fk, F0) == override(fk, F1) == "(null)"
    assert not fk.exists("/dev/vfio/4")


def test_rollback_that_fails_says_what_is_left(fk: FakeKernelRoot) -> None:
    fk.fail("probe", F1, errno.ENODEV)
    fk.fail("bind", F1, errno.EIO)
    fk.fail("bind", F0, errno.EIO)
    with pytest.raises(ClaimFailed) as e:
        claim_group(fk, host_of(fk), 4)
    assert "ENODEV" in str(e.value) and "gone" in str(e.value)
    # F0 came back through drivers_probe after its bind failed; F1 has neither way back.
    assert e.value.restored == [f"{F0} (e1000e)"]
    assert len(e.value.not_restored) == 1 and e.value.not_restored[0].startswith(F1)
    assert "NOT given back" in str(e.value)
    assert driver(fk, F0) == "e1000e"
    assert driver(fk, F1) is None


def test_bind_that_never_happens_times_out_and_is_undone(fk: FakeKernelRoot) -> None:
    fk.stall(F1, "vfio-pci")
    with pytest.raises(
        ClaimFailed, match=r"0000:03:00.1: binding to vfio-pci: after 0.2s it is bound to no driver"
    ) as e:
        claim_group(fk, host_of(fk), 4, timeout=0.2)
    assert e.value.restored == [f"{F1} (igb)", f"{F0} (e1000e)"]
    assert (driver(fk, F0), driver(fk, F1)) == ("e1000e", "igb")


def test_refused_override_write_names_file_device_and_cause(fk: FakeKernelRoot) -> None:
    fk.fail("override", NIC, errno.EACCES)
    with pytest.raises(ClaimFailed) as e:
        claim_group(fk, host_of(fk), 2)
    assert e.value.restored == []  # nothing had been taken yet
    assert "given back" not in str(e.value)
    msg = str(e.value)
    assert f"/sys/bus/pci/devices/{NIC}/driver_override" in msg
    assert NIC in msg and "needs root" in msg
    assert driver(fk, NIC) == "e1000e"


def test_release_goes_on_past_a_function_that_fails(fk: FakeKernelRoot) -> None:
    claim = claim_group(fk, host_of(fk), 4)
    fk.stall(F1, "igb")
    with pytest.raises(
        DeviceError, match=r"not fully given back: 0000:03:00.1: binding back to igb"
    ):
        release_group(fk, claim, timeout=0.2)
    assert driver(fk, F0) == "e1000e"


# -- preview ------------------------------------------------------------------------


def test_preview_of_a_free_nic(fk: FakeKernelRoot) -> None:
    p = claim_preview(host_of(fk), PciAddress.parse(NIC))
    assert p.assignable and p.why_not is None and p.takes_with_it == ()
    assert p.to_json()["assignable"] is True


def test_preview_takes_the_group_and_leaves_the_bridge(fk: FakeKernelRoot) -> None:
    p = claim_preview(host_of(fk), PciAddress.parse(BR_A))
    assert p.assignable
    assert p.takes_with_it == (PciAddress.parse(BR_B),)
    assert p.stays_with_host == (PciAddress.parse("0000:00:02.0"),)


def test_preview_takes_free_functions_of_the_slot_in_other_groups(tree: TreeBuilder) -> None:
    tree.pci("0000:0a:00.0", iommu_group=20, driver="e1000e")
    tree.pci("0000:0a:00.1", iommu_group=21, driver="e1000e")
    tree.pci("0000:0a:00.2", iommu_group=22, driver="e1000e")
    tree.build()
    host = scan_pci(HostRoot(tree.root), in_use={"0000:0a:00.2": ("eth2 is up",)})
    p = claim_preview(host, PciAddress.parse("0000:0a:00.0"))
    # .1 is free and comes along; .2 is in use and its own group: it stays.
    assert [str(a) for a in p.takes_with_it] == ["0000:0a:00.1"]
    assert p.groups == (20, 21)
    assert p.assignable


def test_preview_refusals(fk: FakeKernelRoot) -> None:
    host = host_of(fk, **{F1: ("enp3s0f1 is up with an address",)})
    p = claim_preview(host, PciAddress.parse(F0))
    assert not p.assignable
    assert p.takes_with_it == (PciAddress.parse(F1),)
    assert p.why_not is not None and "also holds 0000:03:00.1, which the host uses" in p.why_not
    assert "in use by the host: controller of /" in (
        claim_preview(host, PciAddress.parse(NVME)).why_not or ""
    )
    vga = claim_preview(host, PciAddress.parse(AUDIO))
    assert "0000:00:05.0" in (vga.why_not or "") and "boot VGA" in (vga.why_not or "")
    bridge = claim_preview(host, PciAddress.parse("0000:00:02.0"))
    assert "bridges stay with the host" in (bridge.why_not or "")
    nr = claim_preview(host, PciAddress.parse(NORESET))
    assert nr.needs_reset_none_ok and "reset: none-ok" in (nr.why_not or "")
    assert "not on this host" in (
        claim_preview(host, PciAddress.parse("0000:ff:00.0")).why_not or ""
    )


def test_preview_without_iommu(fk: FakeKernelRoot, tmp_path: Path) -> None:
    t = TreeBuilder(tmp_path / "noiommu")
    t.pci("0000:01:00.0", driver="e1000e")
    t.build()
    host = scan_pci(HostRoot(t.root))
    p = claim_preview(host, PciAddress.parse("0000:01:00.0"))
    assert not p.assignable and "intel_iommu=on" in (p.why_not or "")


# -- with the inventory's own Host ----------------------------------------------------


def test_in_use_rules_of_the_inventory_are_honoured(tree: TreeBuilder) -> None:
    from partitioner.inventory import scan

    tree.cpus(count=2)
    tree.pci("0000:81:00.0", driver="e1000e", iommu_group=19, netdevs=("enp129s0",))
    tree.pci("0000:82:00.0", driver="e1000e", iommu_group=20, netdevs=("enp130s0",))
    tree.pci("0000:83:00.0", vendor="1b36", device="0010", class_code="010802", driver="nvme",
             iommu_group=21)  # fmt: skip
    tree.disk("nvme0n1", "0000:83:00.0", partitions=2)
    tree.mount("nvme0n1p2", "/")
    tree.netdev_up("enp129s0", default_route=True)
    tree.driver("vfio-pci")
    tree.build()
    fk = FakeKernelRoot(tree)
    host = scan(fk)
    with pytest.raises(DeviceError, match=r"0000:81:00.0 is in use by the host: .*enp129s0"):
        claim_group(fk, host, 19)
    with pytest.raises(DeviceError, match=r"0000:83:00.0 is in use by the host"):
        claim_group(fk, host, 21)
    assert fk.writes == []
    assert not claim_preview(host, PciAddress.parse("0000:81:00.0")).assignable
    claim = claim_group(fk, host, 20)
    assert driver(fk, "0000:82:00.0") == "vfio-pci"
    release_group(fk, claim)
    assert driver(fk, "0000:82:00.0") == "e1000e"
