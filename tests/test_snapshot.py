"""partition snapshot: the copy reads back as the same Host, holds only what scan reads, links stay links."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
from treebuilder import GiB, MiB, TreeBuilder

from partitioner.cli.main import main
from partitioner.cpuset import CpuSet
from partitioner.errors import HostReadError, UsageError
from partitioner.inventory import scan
from partitioner.inventory.model import Host, PciFunction
from partitioner.inventory.snapshot import take_snapshot, take_snapshot_with_host
from partitioner.kernel.root import HostRoot
from partitioner.pci import PciAddress


def _busy(tree: TreeBuilder) -> Path:
    tree.cpus(count=8, packages=2, threads=2, nodes=2).offline(7).allowed("0-5")
    tree.node(1, memory_bytes=8 * GiB, hugepages={2 * MiB: (64, 60)})
    tree.pci("0000:80:01.0", class_code="060400", driver="pcieport", iommu_group=18, numa_node=1)
    tree.pci("0000:81:00.0", driver="e1000e", iommu_group=19, numa_node=1, parent="0000:80:01.0",
             netdevs=("enp129s0",), reset_methods=("flr", "bus"))  # fmt: skip
    tree.pci("0000:81:00.1", driver=None, iommu_group=19, numa_node=1, parent="0000:80:01.0",
             reset_methods=None)  # fmt: skip
    tree.pci("0000:00:1d.0", class_code="010802", driver="nvme", iommu_group=3)
    tree.pci("0000:00:02.0", class_code="030000", driver="i915", iommu_group=1, boot_vga=True)
    tree.disk("nvme0n1", "0000:00:1d.0", partitions=3, multipath=True)
    tree.virtual_block("dm-0", slaves=("nvme0n1p3",), dm_name="vg-home")
    tree.mount("nvme0n1p2", "/")
    tree.mount("dm-0", "/home", fstype="btrfs")
    tree.swap("nvme0n1p1")
    tree.netdev_up("enp129s0", default_route=True)
    tree.netdev("lo", up=True)
    tree.driver("vfio-pci").kvm()
    return tree.build()


def _links_stay_inside(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                target = os.readlink(p)
                assert not target.startswith("/"), f"{p} -> {target} is absolute"
                real = os.path.realpath(p)
                assert real.startswith(str(root.resolve())), f"{p} leaves the snapshot"


def test_builder_tree_round_trip(tree: TreeBuilder, tmp_path: Path) -> None:
    src = _busy(tree)
    before = scan(HostRoot(src))
    dest = tmp_path / "snap"
    n = take_snapshot(HostRoot(src), dest)
    assert n > 0
    after = scan(HostRoot(dest))
    assert after == before
    # Every field matters: the tree exercises them.
    assert before.iommu_groups and before.has_kvm and before.vfio_pci_loaded
    assert before.in_use[PciAddress.parse("0000:00:1d.0")] == (
        "controller of / (nvme0n1p2)",
        "controller of /home (nvme0n1p3 under vg-home)",
        "swap on nvme0n1p1",
    )
    assert not before.cpus[7].online and not before.cpus[6].allowed
    # And a snapshot of the snapshot is the same again.
    assert scan(HostRoot(dest)) == scan(HostRoot(_resnap(dest, tmp_path / "snap2")))


def _resnap(src: Path, dest: Path) -> Path:
    take_snapshot(HostRoot(src), dest)
    return dest


def test_links_are_links_and_relative(tree: TreeBuilder, tmp_path: Path) -> None:
    dest = tmp_path / "snap"
    take_snapshot(HostRoot(_busy(tree)), dest)
    dev = dest / "sys/bus/pci/devices/0000:81:00.0"
    assert dev.is_symlink()
    assert os.readlink(dev) == "../../../devices/pci0000:80/0000:80:01.0/0000:81:00.0"
    assert os.readlink(dev / "driver").endswith("bus/pci/drivers/e1000e")
    assert (dest / "sys/kernel/iommu_groups/19/devices/0000:81:00.1").is_symlink()
    _links_stay_inside(dest)


def test_only_what_scan_reads(tree: TreeBuilder, tmp_path: Path) -> None:
    src = _busy(tree)
    dest = tmp_path / "snap"
    n = take_snapshot(HostRoot(src), dest)
    src_files = sum(len(f) for _, _, f in os.walk(src))
    assert n < src_files
    # Attributes scan never reads are left out (driver bind files, remove, size of disks).
    assert not (dest / "sys/bus/pci/drivers/e1000e/bind").exists()
    assert not (dest / "sys/bus/pci/drivers_probe").exists()
    assert not any(dest.glob("sys/devices/**/remove"))
    # What it reads is there, with the content it had.
    nic = dest / "sys/devices/pci0000:80/0000:80:01.0/0000:81:00.0"
    assert (nic / "vendor").read_text() == "0x8086\n"
    assert (dest / "dev/kvm").is_file()


def test_refuses_non_empty_dir_unless_forced(tree: TreeBuilder, tmp_path: Path) -> None:
    src = _busy(tree)
    dest = tmp_path / "snap"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine\n")
    with pytest.raises(UsageError, match="not empty"):
        take_snapshot(HostRoot(src), dest)
    assert not (dest / "sys").exists()
    stale = dest / "sys/kernel/iommu_groups/99/devices"
    stale.mkdir(parents=True)
    take_snapshot(HostRoot(src), dest, force=True)
    assert not (dest / "sys/kernel/iommu_groups/99").exists()  # an old snapshot's leftovers go
    assert (dest / "keep.txt").read_text() == "mine\n"  # what is not a snapshot's stays
    assert scan(HostRoot(dest)) == scan(HostRoot(src))


def test_source_that_is_not_a_host(tmp_path: Path) -> None:
    dest = tmp_path / "snap"
    with pytest.raises(HostReadError):
        take_snapshot(HostRoot(tmp_path / "nothing"), dest)
    assert not dest.exists()


def test_live_machine_round_trip(tmp_path: Path) -> None:
    dest = tmp_path / "live"
    n, seen = take_snapshot_with_host(HostRoot("/"), dest)
    # Exactly what the recording scan saw.
    assert scan(HostRoot(dest)) == seen
    # And the same as a fresh scan of the machine, up to what changes by the second.
    assert _steady(scan(HostRoot(dest))) == _steady(scan(HostRoot("/")))
    assert n < 2000  # never a walk of all of /sys
    _links_stay_inside(dest)


def test_host_check_reads_a_snapshot_as_it_reads_the_machine(tmp_path: Path) -> None:
    from partitioner.boot.check import check_host
    from partitioner.boot.setup import read_facts

    dest = tmp_path / "live"
    take_snapshot(HostRoot("/"), dest)
    live, snap = HostRoot("/"), HostRoot(dest)
    on_machine = check_host(live, scan(live), read_facts(live))
    on_tree = check_host(snap, scan(snap), read_facts(snap))
    assert [(i.id, i.status, i.detail) for i in on_tree] == [
        (i.id, i.status, i.detail) for i in on_machine
    ]
    assert read_facts(snap) == read_facts(live)


def _steady(h: Host) -> Host:
    nodes = {
        i: dataclasses.replace(
            n,
            free_bytes=0,
            hugepages={s: dataclasses.replace(p, free=0) for s, p in n.hugepages.items()},
        )
        for i, n in h.nodes.items()
    }
    return dataclasses.replace(h, nodes=nodes)


def test_cli(tree: TreeBuilder, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _busy(tree)
    dest = tmp_path / "snap"
    assert main(["--host-root", str(src), "snapshot", str(dest)]) == 0
    out = capsys.readouterr().out
    assert f"{dest}:" in out and "8 CPUs, 2 NUMA nodes, 5 PCI functions" in out
    assert scan(HostRoot(dest)) == scan(HostRoot(src))
    assert main(["--host-root", str(src), "snapshot", str(dest)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["--host-root", str(src), "--json", "snapshot", "--force", str(dest)]) == 0
    assert '"pci_functions": 5' in capsys.readouterr().out
    assert main(["--host-root", str(tmp_path / "none"), "snapshot", str(tmp_path / "x")]) == 2
    assert "does not look like a host tree" in capsys.readouterr().err


# -- a real kernel: the emulated VT-d server's own /sys ------------------------------------


def _can_boot_testbed() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not shutil.which("qemu-system-x86_64"):
        return "needs qemu-system-x86_64"
    if not any(Path("/boot").glob("vmlinuz-*")):
        return "needs a kernel in /boot (linux-image-amd64)"
    return None


@pytest.fixture(scope="module")
def numa_server_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``numa`` preset booted once, its tree taken by ``partition snapshot`` inside it."""
    why = _can_boot_testbed()
    if why:
        pytest.skip(why)
    from partitioner.testbed.server import snapshot_testbed

    dest = tmp_path_factory.mktemp("numa-server") / "snap"
    snapshot_testbed("numa", dest, progress=None)
    return dest


@pytest.mark.testbed
@pytest.mark.qemu
def test_real_kernel_tree(numa_server_snapshot: Path, tmp_path: Path) -> None:
    """What the numa preset builds (2 sockets x 2 cores x 2 threads, 2 nodes, NICs, a switch,
    a bridge, a GPU with its audio function, NVMe), as a real kernel's sysfs shows it."""
    h = scan(HostRoot(numa_server_snapshot))
    assert len(h.usable_cpus) == 8 and h.threads_per_core() == 2
    assert {c.package for c in h.cpus.values()} == {0, 1}
    assert all(len(c.siblings) == 2 and c.id in c.siblings for c in h.cpus.values())
    assert sorted(h.nodes) == [0, 1]
    assert h.nodes[0].cpus | h.nodes[1].cpus == CpuSet(range(8))
    for n in h.nodes.values():
        assert len(n.cpus) == 4
        assert 768 * MiB < n.memory_bytes <= GiB
        assert n.hugepages[2 * MiB].total == 64
        assert sorted(n.distances) == [10, 20]
    # Every CPU's node agrees with its package: one node per socket.
    assert all(c.node == h.cpus[0].node for c in h.cpus.values() if c.package == 0)

    assert h.has_iommu and 2 * MiB in h.hugepage_sizes
    by_id: dict[str, list[PciFunction]] = {}
    for fn in h.pci.values():
        by_id.setdefault(fn.id, []).append(fn)
    assert len(by_id["8086:10d3"]) == 6  # e1000e
    assert len(by_id["8086:100e"]) == 2  # e1000 behind the bridge
    nvme = [f for f in h.pci.values() if f.class_code == "010802"]
    assert len(nvme) == 1 and nvme[0].numa_node == 1
    # Every function sits in a group, and a group's members name it back.
    for fn in h.pci.values():
        assert fn.iommu_group is not None and fn.address in h.iommu_groups[fn.iommu_group].members
        for up in fn.upstream:
            assert h.pci[up].is_bridge
    # The GPU and its audio function: one slot, one group, nothing else in it.
    (vga,) = by_id["1234:1111"]
    (audio,) = by_id["8086:293e"]
    assert vga.address.slot_key == audio.address.slot_key
    assert h.iommu_groups[vga.iommu_group or -1].members == (vga.address, audio.address)
    # The two-function NIC: one group of exactly its two functions.
    pairs = [g for g in h.iommu_groups.values() if len(g.members) == 2
             and all(h.pci[m].id == "8086:10d3" for m in g.members)]  # fmt: skip
    assert len(pairs) == 1 and pairs[0].members[0].slot_key == pairs[0].members[1].slot_key
    # The conventional bridge shares its group with the NICs behind it.
    e1000_group = h.iommu_groups[by_id["8086:100e"][0].iommu_group or -1]
    assert len(e1000_group.members) == 3
    assert sum(h.pci[m].is_bridge for m in e1000_group.members) == 1
    # Node-local devices through the expander bridges; the one on the main complex has none.
    e1000e_nodes = sorted((f.numa_node for f in by_id["8086:10d3"]), key=lambda n: (n is None, n))
    assert e1000e_nodes == [0, 0, 0, 1, 1, None]

    # A snapshot of the snapshot reads back the same.
    take_snapshot(HostRoot(numa_server_snapshot), tmp_path / "again")
    assert scan(HostRoot(tmp_path / "again")) == h


def test_reset_file_of_an_old_kernel_is_kept(tree: TreeBuilder, tmp_path: Path) -> None:
    """Before 5.15 there is no reset_method: the write-only `reset` file says the kernel can
    reset the function, and the snapshot keeps it (empty) so the tree says the same."""
    tree.cpus(count=2)
    tree.pci("0000:00:14.0", class_code="0c0330", iommu_group=3, reset_methods=None,
             reset_file=True)  # fmt: skip
    tree.pci("0000:00:16.0", class_code="078000", iommu_group=4, reset_methods=None)
    src = tree.build()
    reset = src / "sys/devices/pci0000:00/0000:00:14.0/reset"
    reset.chmod(0o200)  # as sysfs has it: write-only
    before = scan(HostRoot(src))
    assert before.pci[PciAddress.parse("00:14.0")].reset_unnamed
    assert not before.pci[PciAddress.parse("00:16.0")].own_reset
    dest = tmp_path / "snap"
    take_snapshot(HostRoot(src), dest)
    assert (dest / "sys/devices/pci0000:00/0000:00:14.0/reset").is_file()
    assert not (dest / "sys/devices/pci0000:00/0000:00:16.0/reset").exists()
    assert scan(HostRoot(dest)) == before
