"""Reset as VFIO does it (rule 11 of docs/manifest.md; docs/decisions.md, "Reset through the bus").

A function without a reset of its own (a GPU's audio function) is reset by VFIO through
its bus when everything behind the same bridge goes to the same partition; a function
that neither way can reset still needs ``reset: none-ok``.  Kernels before 5.15 have no
``reset_method`` file: their ``reset`` file says whether the kernel can reset a function.
Every case on a tree TreeBuilder writes as the kernel lays it out, asked of ``inspect``,
``plan`` and ``apply``'s claim check alike.
"""

from __future__ import annotations

import pytest
from gpuhosts import RTX3090_AUDIO, display_gpu
from treebuilder import GiB, TreeBuilder

from partitioner.cli.inspect import to_json
from partitioner.errors import PlanError
from partitioner.inventory import scan
from partitioner.inventory.model import Host
from partitioner.kernel.root import HostRoot
from partitioner.manifest.loader import loads
from partitioner.pci import PciAddress
from partitioner.planning.model import Plan
from partitioner.planning.planner import plan
from partitioner.vfio import ioctl as vfio_ioctl
from partitioner.vfio.claim import refusals
from partitioner.vfio.preview import bus_reset_reach, claim_preview

HEAD = """\
version: 1
host: {reserve: {cpus: 1, memory: 0GiB}, smt: share, accel: tcg}
partitions:
"""


def _part(name: str, devices: str) -> str:
    return f"  {name}: {{cpus: 1, memory: 4MiB, hugepages: none, devices: [{devices}]}}\n"


def _plan(host: Host, *parts: str) -> Plan:
    return plan(loads(HEAD + "".join(parts), "site.yaml"), host)


def _problems(host: Host, *parts: str) -> str:
    with pytest.raises(PlanError) as e:
        _plan(host, *parts)
    return "\n".join(map(str, e.value.problems))


def _base(t: TreeBuilder) -> None:
    t.cpus(count=8)
    t.node(0, memory_bytes=16 * GiB, free_bytes=12 * GiB)
    t.kvm()
    t.driver("vfio-pci")


def _a(text: str) -> PciAddress:
    return PciAddress.parse(text)


def test_gpu_and_its_audio_behind_one_port_plan_without_none_ok(tree: TreeBuilder) -> None:
    _base(tree)
    gpu = display_gpu(tree, 0x30, 70)
    tree.build()
    host = scan(HostRoot(tree.root))
    audio = _a("0000:30:00.1")
    assert host.pci[audio].id == ":".join(RTX3090_AUDIO)
    assert not host.pci[audio].own_reset  # no reset_method, no reset file: as the card has it
    assert bus_reset_reach(host, host.pci[audio]) == (_a(gpu), audio)
    # inspect: assignable, the audio function reset through its bus
    shown = {f["address"]: f for f in to_json(host)["pci"]}
    for a in (gpu, str(audio)):
        assert shown[a]["assignable"], shown[a]["why_not"]
        assert shown[a]["claim"]["reset_through_bus"] == [str(audio)]
        assert not shown[a]["claim"]["needs_reset_none_ok"]
    # plan: no `reset: none-ok`, and the plan says how the audio function is reset
    p = _plan(host, _part("desk", f'{{pci: "{gpu}"}}'))
    devices = p.placements["desk"].devices
    assert [str(d.address) for d in devices] == [gpu, str(audio)]
    assert not any(d.reset_none_ok for d in devices)
    assert any("VFIO resets it through the bus below 0000:00:1c.0" in n for n in p.notes)
    # apply's check before it claims: the group, with the partition's devices
    group = host.pci[audio].iommu_group
    assert group is not None
    assert not refusals(host, group, reset_none_ok=set(), partition={gpu, str(audio)})


def test_a_lone_function_without_any_reset_still_needs_none_ok(tree: TreeBuilder) -> None:
    _base(tree)
    # An integrated audio function on the root bus: no bridge above it to reset its bus.
    tree.pci("0000:00:1b.0", vendor="8086", class_code="040300", iommu_group=5, reset_methods=None)
    # A dual-port NIC behind a root port: port 0 carries the host's default route, port 1
    # (in a group of its own) has no reset of its own; its bus cannot be reset for a guest.
    tree.pci("0000:00:1c.0", class_code="060400", driver="pcieport", iommu_group=6)
    tree.pci("0000:05:00.0", driver="igb", iommu_group=7, parent="0000:00:1c.0", netdevs=("eno1",))
    tree.pci("0000:05:00.1", driver="igb", iommu_group=8, parent="0000:00:1c.0", reset_methods=None)
    tree.netdev_up("eno1", default_route=True)
    tree.build()
    host = scan(HostRoot(tree.root))
    for addr, group in (("0000:00:1b.0", 5), ("0000:05:00.1", 8)):
        fn = host.pci[_a(addr)]
        assert bus_reset_reach(host, fn) is None
        v = claim_preview(host, fn.address)
        assert v.no_reset == (fn.address,) and not v.assignable
        assert "has no reset method" in (v.why_not or "")
        msg = _problems(host, _part("p", f'{{pci: "{addr}"}}'))
        assert f"{addr} ({fn.id}) has no reset method" in msg and "reset: none-ok" in msg
        assert refusals(host, group, reset_none_ok=set(), partition={addr})
        # with `reset: none-ok` it is accepted, for plan and apply alike
        p = _plan(host, _part("p", f'{{pci: "{addr}", reset: none-ok}}'))
        assert [d.reset_none_ok for d in p.placements["p"].devices] == [True]
        assert not refusals(host, group, reset_none_ok={addr}, partition={addr})


def test_bus_reset_needs_everything_on_the_bus_in_the_same_partition(tree: TreeBuilder) -> None:
    _base(tree)
    # Two slots behind one bridge, each function in a group of its own (ACS): the one without
    # a reset is reset through the bus only when one partition holds both.
    tree.pci("0000:00:1d.0", class_code="060400", driver="pcieport", iommu_group=10)
    tree.pci("0000:06:00.0", driver="e1000e", iommu_group=11, parent="0000:00:1d.0")
    tree.pci(
        "0000:06:01.0", driver="e1000e", iommu_group=12, parent="0000:00:1d.0", reset_methods=()
    )
    tree.build()
    host = scan(HostRoot(tree.root))
    v = claim_preview(host, _a("06:01.0"))
    assert v.no_reset == (_a("06:01.0"),)
    assert v.bus_reset_needs == ((_a("06:01.0"), (_a("06:00.0"),)),)
    assert not v.lacking_reset(held=[_a("06:00.0")])
    # alone: refused, saying what would let VFIO reset it
    msg = _problems(host, _part("a", '{pci: "06:01.0"}'))
    assert "0000:06:01.0 (8086:10d3) has no reset method" in msg
    assert "is reset through its bus if 0000:06:00.0 goes to the same partition" in (
        v.why_not or ""
    )
    assert refusals(host, 12, reset_none_ok=set(), partition={"0000:06:01.0"})
    # the other function in another partition: still refused
    msg = _problems(host, _part("a", '{pci: "06:01.0"}'), _part("b", '{pci: "06:00.0"}'))
    assert "0000:06:01.0 (8086:10d3) has no reset method" in msg
    # both in one partition: placed, no `reset: none-ok`, and apply's check agrees
    p = _plan(host, _part("a", '{pci: "06:00.0"}, {pci: "06:01.0"}'))
    assert [d.reset_none_ok for d in p.placements["a"].devices] == [False, False]
    both = {"0000:06:00.0", "0000:06:01.0"}
    assert not refusals(host, 12, reset_none_ok=set(), partition=both)


def test_a_bridge_behind_the_bus_keeps_vfio_from_resetting_it(tree: TreeBuilder) -> None:
    _base(tree)
    # A switch below the root port: its ports stay on pcieport, outside VFIO's device set.
    tree.pci("0000:00:1e.0", class_code="060400", driver="pcieport", iommu_group=20)
    tree.pci("0000:07:00.0", vendor="10de", class_code="030000", iommu_group=21,
             parent="0000:00:1e.0", boot_vga=False)  # fmt: skip
    tree.pci("0000:07:00.1", vendor="10de", class_code="040300", iommu_group=21,
             parent="0000:00:1e.0", reset_methods=None)  # fmt: skip
    tree.pci("0000:07:00.2", class_code="060400", driver="pcieport", iommu_group=22,
             parent="0000:00:1e.0")  # fmt: skip
    tree.build()
    host = scan(HostRoot(tree.root))
    assert bus_reset_reach(host, host.pci[_a("07:00.1")]) is None
    assert not claim_preview(host, _a("07:00.0")).assignable
    assert claim_preview(host, _a("07:00.0")).no_reset == (_a("07:00.1"),)


@pytest.mark.parametrize(
    ("reset_methods", "reset_file", "own"),
    [
        (None, True, True),  # before 5.15: no reset_method, the `reset` file says it can
        (None, False, False),  # no reset_method and no `reset`: nothing resets it by itself
        (("flr",), True, True),
        ((), False, False),  # reset_method emptied (every method turned off)
    ],
)
def test_reset_method_absent_asks_the_reset_file(
    tree: TreeBuilder, reset_methods: tuple[str, ...] | None, reset_file: bool, own: bool
) -> None:
    _base(tree)
    tree.pci(
        "0000:00:14.0",
        class_code="0c0330",
        iommu_group=3,
        reset_methods=reset_methods,
        reset_file=reset_file,
    )
    tree.build()
    host = scan(HostRoot(tree.root))
    fn = host.pci[_a("00:14.0")]
    assert fn.own_reset is own
    assert fn.reset_unnamed is (reset_methods is None and reset_file)
    v = claim_preview(host, fn.address)
    assert v.assignable is own
    placed = True
    try:
        _plan(host, _part("p", '{pci: "00:14.0"}'))
    except PlanError:
        placed = False
    assert placed is own
    assert bool(refusals(host, 3, reset_none_ok=set(), partition={"0000:00:14.0"})) is not own


def test_apply_check_accepts_a_bus_reset_the_kernel_offers() -> None:
    """check_group's reset rule, on the answers VFIO gives (the ioctl itself needs VFIO)."""
    info = vfio_ioctl.DeviceInfo
    pci = vfio_ioctl.VFIO_DEVICE_FLAGS_PCI
    gpu = info("0000:30:00.0", pci | vfio_ioctl.VFIO_DEVICE_FLAGS_RESET, 9, 5)
    audio = info("0000:30:00.1", pci, 9, 5, ("0000:30:00.0", "0000:30:00.1"))
    lone = info("0000:00:1b.0", pci, 9, 5, None)  # ENODEV: the kernel cannot reset its bus
    held = {"0000:30:00.0", "0000:30:00.1"}
    assert vfio_ioctl.unreset([gpu, audio], set(), held) == []
    assert vfio_ioctl.unreset([gpu, audio], set(), {"0000:30:00.1"}) == ["0000:30:00.1"]
    assert vfio_ioctl.unreset([lone], set(), {"0000:00:1b.0"}) == ["0000:00:1b.0"]
    assert vfio_ioctl.unreset([lone], {"0000:00:1b.0"}, set()) == []
    assert vfio_ioctl.dependent_address(0, 0x30, (0 << 3) | 1) == "0000:30:00.1"
    assert vfio_ioctl.dependent_address(0x10, 0x8F, (0x1F << 3) | 7) == "0010:8f:1f.7"
