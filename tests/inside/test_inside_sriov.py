"""SR-IOV against a real kernel: run INSIDE the emulated server of the ``sriov`` preset.

QEMU's igb (an 82576 PF, 8 VFs) under the emulated VT-d.  The engine's steps, as
``diff`` orders them for a plan whose two partitions each take a VF of that PF
with a MAC and a VLAN, run against the kernel (starting the guests aside): the
PF makes 4 VFs with autoprobe off, so igbvf (loaded first, as udev would) never
binds one; each VF gets its MAC and VLAN through the PF (``ip -d link show`` of
the PF shows them) and is claimed for vfio-pci with the IOMMU group the kernel
gave it (the VFIO ioctls confirm the group is viable).  A nested guest per
partition, given its VF, sees it with the MAC the host set.  The teardown that
``destroy`` runs puts the VFs' settings back, gives the VFs back, and the PF gets
``sriov_numvfs`` 0 and autoprobe 1 again.

tests/test_inside.py runs this module on its own boot of the ``sriov`` preset
(the other modules run on the suite's topology, booted with Debian 12's QEMU 7.2).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from guestimage import KERNEL_CMDLINE, build_guest_initramfs, guest_kernel

from partitioner.cpuset import CpuSet
from partitioner.engine.context import ApplyContext
from partitioner.engine.diff import diff, teardown
from partitioner.engine.executor import execute
from partitioner.engine.sriov import CreateVfs, RestoreVfs, VfsInUse, restore_all
from partitioner.engine.step import Action
from partitioner.inventory import scan
from partitioner.kernel.root import HostRoot
from partitioner.manifest.model import PartitionSpec, VfSettings
from partitioner.pci import PciAddress
from partitioner.planning.model import DeviceAssignment, PfPlan, Placement, Plan, VfAssignment
from partitioner.record.model import State
from partitioner.record.store import StateStore
from partitioner.run import run, spawn
from partitioner.units import MiB
from partitioner.vfio.claim import current_driver

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.isdir("/sys/kernel/iommu_groups/0"),
    reason="runs inside the emulated VT-d server (root, IOMMU groups)",
)

ROOT = HostRoot("/")
IGB = ("0x8086", "0x10c9")
VFS = 4
MAC = {"fw": "52:54:00:5f:00:01", "lan": "52:54:00:5f:00:02"}
VLAN = {"fw": 100, "lan": 200}
GUEST_TIMEOUT = 900.0  # two TCG guests inside a TCG server on 2 cores: minutes


def dev(addr: str, leaf: str) -> Path:
    return Path("/sys/bus/pci/devices") / addr / leaf


def read(addr: str, leaf: str) -> str:
    return dev(addr, leaf).read_text().strip()


@dataclass
class Pf:
    address: str
    netdev: str
    offset: int
    stride: int

    def vf(self, index: int) -> str:
        domain, bus, devfn = self.address.split(":")
        d, f = devfn.split(".")
        rid = (int(bus, 16) << 8 | int(d, 16) << 3 | int(f)) + self.offset + index * self.stride
        return f"{domain}:{rid >> 8:02x}:{(rid & 0xFF) >> 3:02x}.{rid & 7}"


@pytest.fixture(scope="module")
def pf() -> Iterator[Pf]:
    """The igb PF with its driver loaded (its interface is how VF settings are set), and
    igbvf loaded too: a VF made with autoprobe on would be bound to it at once."""
    found = [
        a
        for a in sorted(os.listdir("/sys/bus/pci/devices"))
        if (read(a, "vendor"), read(a, "device")) == IGB
    ]
    if not found:
        pytest.skip("this topology has no igb (boot the sriov preset)")
    addr = found[0]
    loaded = [m for m in ("igb", "igbvf") if not os.path.exists(f"/sys/module/{m}")]
    for m in loaded:
        run(["modprobe", m], timeout=120)
    deadline = time.monotonic() + 60
    while not dev(addr, "net").is_dir() or not os.listdir(dev(addr, "net")):
        assert time.monotonic() < deadline, f"igb did not make an interface for {addr}"
        time.sleep(0.2)
    netdev = os.listdir(dev(addr, "net"))[0]
    run(["ip", "link", "set", netdev, "up"], timeout=60)
    # 8 in the device's capability; the igb driver, bound, offers 7 (its own limit for an 82576).
    assert int(read(addr, "sriov_totalvfs")) >= VFS
    assert read(addr, "sriov_numvfs") == "0" and read(addr, "sriov_drivers_autoprobe") == "1"
    yield Pf(addr, netdev, int(read(addr, "sriov_offset")), int(read(addr, "sriov_stride")))
    # Whatever a failed test left: the PF as it was found.
    dev(addr, "sriov_numvfs").write_text("0")
    dev(addr, "sriov_drivers_autoprobe").write_text("1")
    for m in reversed(loaded):
        run(["modprobe", "-r", m], timeout=120, check=False)


def placement(name: str, pf: Pf, index: int) -> Placement:
    spec = PartitionSpec(
        name=name,
        cpu_count=1,
        cpu_list=None,
        memory_bytes=128 * MiB,
        hugepage_bytes=None,
        numa="auto",
    )
    vf = VfAssignment(
        PciAddress.parse(pf.address), index, VfSettings(mac=MAC[name], vlan=VLAN[name], qos=None)
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
        # The VF does not exist at plan time: its group is the kernel's word once it is made.
        devices=(
            DeviceAssignment(
                PciAddress.parse(pf.vf(index)), 4095, "8086:10ca", None, False, "vf", vf=vf
            ),
        ),
        spec=spec,
    )


@dataclass
class Applied:
    ctx: ApplyContext
    store: StateStore
    pf: Pf
    shown: str  # `ip -d link show` of the PF once applied
    drivers_after_create: dict[str, str | None]
    groups: dict[str, int]


def engine_steps(actions: list[Action]) -> list[Action]:
    """The host side of apply; the guests are not started here."""
    return [a for a in actions if a.kind not in ("start", "take-user")]


@pytest.fixture(scope="module")
def applied(pf: Pf) -> Iterator[Applied]:
    plan = Plan(
        accel="tcg",
        smt="share",
        host_cpus=CpuSet([0]),
        host_memory_bytes=256 * MiB,
        placements={"fw": placement("fw", pf, 0), "lan": placement("lan", pf, 1)},
        confine=False,
        sriov=(PfPlan(PciAddress.parse(pf.address), pf.netdev, VFS, False),),
    )
    tmp = Path(tempfile.mkdtemp(prefix="sriov-"))
    store = StateStore(tmp / "state")
    ctx = ApplyContext(
        root=ROOT, plan=plan, state=State(), run_dir=tmp / "run", log_dir=tmp / "log"
    )
    ctx.host = scan(ROOT)
    actions = engine_steps(diff(plan, State(), ctx.host, replace=set()))
    assert [a.kind for a in actions] == [
        "create-vfs",
        "configure-vf",
        "claim-vf",
        "configure-vf",
        "claim-vf",
    ]
    # The VFs right after they are made, before anything claims them.
    execute(actions[:1], ctx, store)
    after_create = {pf.vf(i): current_driver(ROOT, pf.vf(i)) for i in range(VFS)}
    execute(actions[1:], ctx, store)
    shown = run(["ip", "-d", "link", "show", "dev", pf.netdev], timeout=60).stdout
    groups = {
        name: int(os.path.basename(os.readlink(dev(pf.vf(i), "iommu_group"))))
        for i, name in enumerate(("fw", "lan"))
    }
    yield Applied(ctx, store, pf, shown, after_create, groups)
    # destroy, if a test did not
    if ctx.state.partitions or ctx.state.sriov:
        execute(
            teardown(ctx.state.partitions.values(), ctx.state) + restore_all(ctx.state), ctx, store
        )


def vf_lines(shown: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^\s*vf (\d+)\s+(.*)$", shown, re.M)}


def test_vfs_are_made_with_no_host_driver_probing_them(applied: Applied) -> None:
    pf = applied.pf
    assert read(pf.address, "sriov_numvfs") == str(VFS)
    assert read(pf.address, "sriov_drivers_autoprobe") == "0"
    assert os.path.isdir("/sys/bus/pci/drivers/igbvf")  # loaded, and yet:
    assert applied.drivers_after_create == {pf.vf(i): None for i in range(VFS)}
    for i in range(VFS):
        assert os.path.basename(os.readlink(dev(pf.address, f"virtfn{i}"))) == pf.vf(i)
        assert read(pf.vf(i), "device") == "0x10ca"
    rec = applied.store.load().pf(pf.address)
    assert rec is not None and (rec.numvfs_before, rec.autoprobe_before, rec.numvfs) == (
        0,
        True,
        VFS,
    )
    assert not rec.pending


def test_the_pf_shows_each_vfs_mac_and_vlan(applied: Applied) -> None:
    lines = vf_lines(applied.shown)
    assert sorted(lines) == list(range(VFS)), applied.shown
    for i, name in enumerate(("fw", "lan")):
        assert f"link/ether {MAC[name]}" in lines[i], lines[i]
        assert f"vlan {VLAN[name]}" in lines[i], lines[i]
    for i in range(2, VFS):
        assert "link/ether 00:00:00:00:00:00" in lines[i] and "vlan" not in lines[i]


def test_each_vf_is_claimed_for_vfio_in_its_own_group(applied: Applied) -> None:
    pf, st = applied.pf, applied.ctx.state
    for i, name in enumerate(("fw", "lan")):
        assert current_driver(ROOT, pf.vf(i)) == "vfio-pci"
        group = applied.groups[name]
        assert os.path.exists(f"/dev/vfio/{group}")
        assert st.partitions[name].claim_groups() == [group]
        assert st.partitions[name].claims[0].addresses == (pf.vf(i),)
    assert applied.groups["fw"] != applied.groups["lan"]
    assert current_driver(ROOT, pf.vf(2)) is None  # not taken: left alone


def test_the_count_is_not_changed_under_claimed_vfs(applied: Applied) -> None:
    pf = applied.pf
    with pytest.raises(VfsInUse, match=f"VF 0 \\({pf.vf(0)}\\) is claimed by partition fw"):
        CreateVfs(pf.address, 2).do(applied.ctx)
    assert read(pf.address, "sriov_numvfs") == str(VFS)


def test_each_nested_guest_sees_its_vf_with_the_mac_the_host_set(applied: Applied) -> None:
    """Both partitions' guests at once (Debian 12's QEMU 7.2, from the host's /usr/bin, each
    given its VF with vfio-pci): each guest's igbvf reads the MAC its PF set for the VF."""
    pf = applied.pf
    tmp = Path(tempfile.mkdtemp(prefix="sriov-guests-"))
    initrd = build_guest_initramfs(tmp / "img")
    guests: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    try:
        for i, name in enumerate(("fw", "lan")):
            log = tmp / f"{name}.log"
            argv = [
                "qemu-system-x86_64",
                "-accel",
                "tcg",
                "-m",
                "160",
                "-nodefaults",
                "-display",
                "none",
                "-no-reboot",
                "-kernel",
                str(guest_kernel()),
                "-initrd",
                str(initrd),
                "-append",
                KERNEL_CMDLINE,
                "-serial",
                f"file:{log}",
                "-device",
                f"vfio-pci,host={pf.vf(i)}",
            ]
            guests[name] = (spawn(argv, new_session=True, die_with_parent=True), log)
        seen: dict[str, str] = {}
        deadline = time.monotonic() + GUEST_TIMEOUT
        while len(seen) < len(guests) and time.monotonic() < deadline:
            for name, (proc, log) in guests.items():
                text = log.read_text(errors="replace") if log.exists() else ""
                if name not in seen and ("GUEST-READY" in text or proc.poll() is not None):
                    seen[name] = text.replace("\r", "")
            time.sleep(2)
        for name in guests:
            text = seen.get(name, "")
            assert "GUEST-READY" in text, f"{name}'s guest did not come up:\n{text[-1500:]}"
            assert re.search(r"^GUEST-PCI 8086:10ca ", text, re.M), text
            assert f"GUEST-NET eth0 {MAC[name]}" in text.splitlines(), text
    finally:
        for proc, _ in guests.values():
            proc.kill()
            proc.wait(timeout=30)


def test_destroy_clears_the_settings_and_puts_the_pf_back(applied: Applied) -> None:
    pf, ctx = applied.pf, applied.ctx
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
    # The settings go back while the VFs still exist: seen before the count goes.
    execute(down[:-1], ctx, applied.store)
    lines = vf_lines(run(["ip", "-d", "link", "show", "dev", pf.netdev], timeout=60).stdout)
    assert all("link/ether 00:00:00:00:00:00" in ln and "vlan" not in ln for ln in lines.values())
    assert current_driver(ROOT, pf.vf(0)) is None  # given back to no driver, as it was
    execute(down[-1:], ctx, applied.store)
    assert read(pf.address, "sriov_numvfs") == "0"
    assert read(pf.address, "sriov_drivers_autoprobe") == "1"
    assert not os.path.exists(dev(pf.address, "virtfn0"))
    assert applied.store.load().sriov == () and ctx.state.sriov == ()
    assert "vf 0" not in run(["ip", "-d", "link", "show", "dev", pf.netdev], timeout=60).stdout


def test_a_vf_the_host_uses_keeps_the_count(pf: Pf, applied: Applied) -> None:
    """After destroy: VFs made again, one taken by a host driver (pci-stub, as an
    administrator would bind one): the count is not put back from under it."""
    ctx = applied.ctx
    CreateVfs(pf.address, 2).do(ctx)
    addr = pf.vf(1)
    run(["modprobe", "pci-stub"], timeout=120, check=False)
    try:
        dev(addr, "driver_override").write_text("pci-stub")
        Path("/sys/bus/pci/drivers_probe").write_text(addr)
        assert current_driver(ROOT, addr) == "pci-stub"
        with pytest.raises(
            VfsInUse, match=f"VF 1 \\({addr}\\) is bound to the host's driver pci-stub"
        ):
            RestoreVfs(pf.address, 2, 0, True).do(ctx)
        assert read(pf.address, "sriov_numvfs") == "2"
        assert ctx.state.pf(pf.address) is not None
    finally:
        if current_driver(ROOT, addr) is not None:
            dev(addr, "driver/unbind").write_text(addr)
        dev(addr, "driver_override").write_text("\n")
    RestoreVfs(pf.address, 2, 0, True).do(ctx)
    assert read(pf.address, "sriov_numvfs") == "0"
    assert ctx.state.sriov == ()
