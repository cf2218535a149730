"""vfio against a real kernel: run INSIDE the emulated VT-d server, as root.

The server's topology (the `numa` or `small` preset) gives: e1000e NICs alone
in their IOMMU groups, a two-function e1000e slot (one group), and conventional
e1000s behind a PCI bridge (one group with the bridge).  The NIC drivers are
modules nobody loads there (no udev), so the module fixture loads them first:
that is what makes "given back to e1000e" observable.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from partitioner.errors import DeviceError
from partitioner.inventory.model import Host, PciFunction
from partitioner.kernel.root import HostRoot
from partitioner.pci import PciAddress
from partitioner.vfio.claim import GroupClaim, claim_group, current_driver, release_group
from partitioner.vfio.ioctl import check_group, group_status
from partitioner.vfio.preview import claim_preview, stays_with_host

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or not os.path.isdir("/sys/kernel/iommu_groups/0"),
        reason="runs inside the emulated VT-d server (root, IOMMU groups)",
    ),
    pytest.mark.usefixtures("nic_drivers"),
]

ROOT = HostRoot("/")


def scan() -> Host:
    # Scanned again by each test: the drivers change as the tests claim and release.
    from partitioner.inventory import scan as inventory_scan

    return inventory_scan(ROOT)


def endpoints(host: Host, group: int) -> list[PciFunction]:
    """What a claim takes: the members that do not stay with the host (bridges, the chipset)."""
    return [
        host.pci[a] for a in host.iommu_groups[group].members if not stays_with_host(host.pci[a])
    ]


def groups_where(host: Host, pred: object) -> list[int]:
    assert callable(pred)
    return [g for g in sorted(host.iommu_groups) if pred(host, g)]


def drivers(addresses: list[str]) -> list[str | None]:
    return [current_driver(ROOT, a) for a in addresses]


@pytest.fixture
def released() -> Iterator[list[GroupClaim]]:
    """Claims a test makes; given back even when the test fails."""
    claims: list[GroupClaim] = []
    yield claims
    for c in reversed(claims):
        release_group(ROOT, c)


def test_claim_check_release_a_lone_nic(released: list[GroupClaim]) -> None:
    host = scan()
    alone = groups_where(
        host,
        lambda h, g: [(f.id, f.driver) for f in endpoints(h, g)] == [("8086:10d3", "e1000e")],
    )
    assert alone, "no e1000e alone in its IOMMU group"
    group = alone[0]
    addr = str(endpoints(host, group)[0].address)
    assert claim_preview(host, PciAddress.parse(addr)).assignable

    claim = claim_group(ROOT, host, group)
    released.append(claim)
    assert [f.driver for f in claim.functions] == ["e1000e"]
    assert current_driver(ROOT, addr) == "vfio-pci"
    assert os.path.exists(f"/dev/vfio/{group}")

    infos = check_group(ROOT, host, group, reset_none_ok=set())
    assert [i.address for i in infos] == [addr]
    assert infos[0].is_pci and infos[0].num_regions >= 7 and infos[0].num_irqs >= 1
    # check_group closed everything: the group is free for QEMU.
    st = group_status(ROOT, group)
    assert st.viable and not st.container_set

    released.remove(claim)
    release_group(ROOT, claim)
    assert current_driver(ROOT, addr) == "e1000e"
    assert ROOT.read(f"/sys/bus/pci/devices/{addr}/driver_override") == "(null)"
    assert ROOT.listdir(f"/sys/bus/pci/devices/{addr}/net"), "e1000e made no interface again"
    assert not os.path.exists(f"/dev/vfio/{group}")
    release_group(ROOT, claim)  # again: nothing to do
    assert current_driver(ROOT, addr) == "e1000e"


def test_two_function_slot_goes_together(released: list[GroupClaim]) -> None:
    host = scan()
    pairs = groups_where(
        host,
        lambda h, g: (
            len(endpoints(h, g)) == 2
            and len({f.address.slot_key for f in endpoints(h, g)}) == 1
            and all(f.id == "8086:10d3" for f in endpoints(h, g))
        ),
    )
    assert pairs, "no two-function e1000e slot"
    group = pairs[0]
    f0, f1 = (str(f.address) for f in endpoints(host, group))
    preview = claim_preview(host, PciAddress.parse(f0))
    assert [str(a) for a in preview.takes_with_it] == [f1]
    assert preview.groups == (group,)

    claim = claim_group(ROOT, host, group)
    released.append(claim)
    assert claim.addresses == (f0, f1)
    assert drivers([f0, f1]) == ["vfio-pci", "vfio-pci"]
    infos = check_group(ROOT, host, group, reset_none_ok={f0, f1})
    assert sorted(i.address for i in infos) == [f0, f1]

    released.remove(claim)
    release_group(ROOT, claim)
    assert drivers([f0, f1]) == ["e1000e", "e1000e"]


def to_vfio_by_hand(a: str) -> None:
    """What a careless tool does: one function to vfio-pci, whatever its group holds."""
    ROOT.write(f"/sys/bus/pci/devices/{a}/driver_override", "vfio-pci")
    if current_driver(ROOT, a):
        ROOT.write(f"/sys/bus/pci/devices/{a}/driver/unbind", a)
    ROOT.write("/sys/bus/pci/drivers_probe", a)
    assert current_driver(ROOT, a) == "vfio-pci"


def back_by_hand(a: str, drv: str | None) -> None:
    if current_driver(ROOT, a):
        ROOT.write(f"/sys/bus/pci/devices/{a}/driver/unbind", a)
    ROOT.write(f"/sys/bus/pci/devices/{a}/driver_override", "\n")
    if drv:
        ROOT.write(f"/sys/bus/pci/drivers/{drv}/bind", a)
    assert current_driver(ROOT, a) == drv


def test_group_behind_the_bridge(released: list[GroupClaim]) -> None:
    host = scan()
    bridged = groups_where(
        host,
        lambda h, g: (
            any(h.pci[a].is_bridge for a in h.iommu_groups[g].members)
            and len(endpoints(h, g)) >= 2
            and all(f.id == "8086:100e" for f in endpoints(h, g))
        ),
    )
    assert bridged, "no group of a PCI bridge with e1000s behind it"
    group = bridged[0]
    eps = [str(f.address) for f in endpoints(host, group)]
    bridges = [str(a) for a in host.iommu_groups[group].members if host.pci[a].is_bridge]
    bridge_drivers = drivers(bridges)
    assert drivers(eps) == ["e1000"] * len(eps)
    # A conventional bridge may be bound to shpchp (it is on the `numa` preset's
    # expander bus, not on `small`'s root bus): a driver that holds the group.
    blocking = [
        (b, d)
        for b, d in zip(bridges, bridge_drivers, strict=True)
        if d not in (None, "pcieport", "pci-stub")
    ]

    # Rule 4: assigning one of them takes the others; the preview says so.
    preview = claim_preview(host, PciAddress.parse(eps[0]))
    assert [str(a) for a in preview.takes_with_it] == eps[1:]
    assert [str(a) for a in preview.stays_with_host] == bridges
    assert preview.assignable == (not blocking and not preview.needs_reset_none_ok)

    try:
        # One endpoint on vfio-pci: the kernel says the group is not viable, and
        # the message names the endpoint left on e1000.
        to_vfio_by_hand(eps[0])
        with pytest.raises(DeviceError) as e:
            check_group(ROOT, host, group, reset_none_ok=set(eps))
        assert f"IOMMU group {group} is not viable: " in str(e.value)
        assert f"{eps[1]} (8086:100e) is still bound to e1000" in str(e.value)
        back_by_hand(eps[0], "e1000")

        if blocking:
            b, d = blocking[0]
            with pytest.raises(
                DeviceError, match=f"bridge {b} in IOMMU group {group} is bound to {d}"
            ):
                claim_group(ROOT, host, group)
            assert drivers(eps) == ["e1000"] * len(eps)
            # The kernel agrees: every endpoint on vfio-pci, the bridge on its driver,
            # and the group is still not viable.
            for a in eps:
                to_vfio_by_hand(a)
            with pytest.raises(DeviceError, match=f"not viable: {b} .* is still bound to {d}"):
                check_group(ROOT, host, group, reset_none_ok=set(eps))
            for a in eps:
                back_by_hand(a, "e1000")
            # The operator's call: without the bridge's driver the group can go.
            for b, _ in blocking:
                ROOT.write(f"/sys/bus/pci/devices/{b}/driver/unbind", b)
            host = scan()

        # The whole group: every endpoint, never the bridge.
        claim = claim_group(ROOT, host, group)
        released.append(claim)
        assert claim.addresses == tuple(eps)
        assert drivers(eps) == ["vfio-pci"] * len(eps)
        assert [current_driver(ROOT, b) for b in bridges] == [
            None if (b, d) in blocking else d for b, d in zip(bridges, bridge_drivers, strict=True)
        ]

        # A function the kernel cannot reset is refused unless the manifest accepts it.
        # The kernel's answer (VFIO_DEVICE_FLAGS_RESET, probed when vfio-pci binds) is
        # what counts: sysfs reset_method is computed when a function is enumerated,
        # and a bus reset it offered then may be gone once a sibling shares the bus.
        infos = check_group(ROOT, host, group, reset_none_ok=set(eps))
        assert sorted(i.address for i in infos) == eps
        no_reset = sorted(i.address for i in infos if not i.can_reset)
        sysfs_none = [a for a in eps if not ROOT.read(f"/sys/bus/pci/devices/{a}/reset_method")]
        assert set(sysfs_none) <= set(no_reset)
        # A function without a reset of its own is reset through its bus when the kernel can
        # reset that bus and the reset reaches only what the partition holds (rule 11):
        # VFIO_DEVICE_PCI_HOT_RESET.  Otherwise it is refused unless the manifest accepts it.
        members = {str(a) for a in host.iommu_groups[group].members}
        by_bus = [
            i for i in infos
            if not i.can_reset
            and i.bus_reset_reaches is not None
            and set(i.bus_reset_reaches) <= members
        ]  # fmt: skip
        alone = sorted(i.address for i in infos if not i.can_reset and i not in by_bus)
        if by_bus:
            # Behind the bridge every function is the group's: the kernel resets their bus.
            check_group(ROOT, host, group, reset_none_ok=set(alone))
        if alone:
            with pytest.raises(DeviceError, match="reset: none-ok") as e:
                check_group(ROOT, host, group, reset_none_ok=set())
            assert e.value.address == alone[0]
            assert all(a in str(e.value) for a in alone)
            with pytest.raises(
                DeviceError, match=f"{alone[-1]} in IOMMU group {group} cannot be reset"
            ):
                check_group(ROOT, host, group, reset_none_ok=set(alone[:-1]))

        released.remove(claim)
        release_group(ROOT, claim)
        assert drivers(eps) == ["e1000"] * len(eps)
    finally:
        for b, d in blocking:
            if current_driver(ROOT, b) is None:
                ROOT.write(f"/sys/bus/pci/drivers/{d}/bind", b)
    assert drivers(bridges) == bridge_drivers


def test_group_not_claimed_has_no_vfio_node() -> None:
    host = scan()
    free = groups_where(host, lambda h, g: [f.driver for f in endpoints(h, g)] == ["e1000e"])
    with pytest.raises(DeviceError, match="claim it first"):
        group_status(ROOT, free[0])


def test_bridges_are_what_the_kernel_calls_bridges() -> None:
    """The inventory reads the header type from config space; the kernel shows
    secondary_bus_number on exactly the functions pci_is_bridge() calls bridges."""
    host = scan()
    assert host.pci
    for a, fn in host.pci.items():
        kernel_says = os.path.exists(f"/sys/bus/pci/devices/{a}/secondary_bus_number")
        assert fn.is_bridge == kernel_says, (str(a), fn.class_code)
    # The server has host bridges (class 0600, header type 0): not bridges, and never assigned.
    hosts = [fn for fn in host.pci.values() if fn.class_code.startswith("0600")]
    assert hosts and not any(fn.is_bridge for fn in hosts)
    assert not any(claim_preview(host, fn.address).assignable for fn in hosts)
