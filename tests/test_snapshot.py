"""partition snapshot: the copy reads back as the same Host, holds only what scan reads, links stay links."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from treebuilder import GiB, MiB, TreeBuilder

from partitioner.cli.main import main
from partitioner.errors import HostReadError, UsageError
from partitioner.host import Host
from partitioner.hostroot import HostRoot
from partitioner.inventory import scan
from partitioner.snapshot import take_snapshot, take_snapshot_with_host


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
    tree.disk("nvme0n1", "0000:00:1d.0", partitions=3)
    tree.virtual_block("dm-0", slaves=("nvme0n1p3",))
    tree.mount("nvme0n1p2", "/")
    tree.mount("dm-0", "/home")
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
    assert before.in_use and before.iommu_groups and before.has_kvm and before.vfio_pci_loaded
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
