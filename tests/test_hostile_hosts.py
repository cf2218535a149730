"""Hostile host trees (issue 8, section 2): every read-only verb gives a right answer or exit 2
naming the file, never a traceback, a hang, or work that grows faster than the tree.

Trees are the real snapshot ``testbed-numa`` (copied, then damaged) or built with
TreeBuilder.  The verbs run in-process through ``main``.  Where the danger is time
(link cycles, 10,000 functions), the test counts the work instead of timing it: a
budget on directory listings, or on visits of the host's PCI functions, that linear
work stays far below and the old quadratic or exponential walks blow at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from treebuilder import TreeBuilder

import partitioner.cli.inspect as inspect_cli
from partitioner.cli.main import main
from partitioner.kernel.root import HostRoot

FIXTURE = Path(__file__).parent / "fixtures" / "hosts" / "testbed-numa"


class Budget(Exception):
    """The work counted went over what a linear walk needs."""


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    assert rc in (0, 2, 3), f"exit {rc}: {err}"
    return rc, out, err


def inspect_json(capsys: pytest.CaptureFixture[str], root: Path) -> dict[str, Any]:
    rc, out, err = cli(capsys, "--host-root", str(root), "--json", "inspect")
    assert rc == 0, err
    doc: dict[str, Any] = json.loads(out)
    return doc


def refused(capsys: pytest.CaptureFixture[str], root: Path, *verb: str) -> str:
    """The verb (inspect by default) exits 2 with one message; the message is returned."""
    rc, out, err = cli(capsys, "--host-root", str(root), *(verb or ("inspect",)))
    assert rc == 2, f"exit {rc}, expected 2: {out}{err}"
    return err


@pytest.fixture
def snap(tmp_path: Path) -> Path:
    """A private copy of the real snapshot, to damage."""
    dest = tmp_path / "host"
    shutil.copytree(FIXTURE, dest, symlinks=True)
    return dest


@pytest.fixture
def listing_budget(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Count directory listings (the scan's unit of walking); stop past 2,000."""
    calls = [0]
    real = HostRoot.listdir

    def counted(self: HostRoot, kernel_path: str) -> list[str]:
        calls[0] += 1
        if calls[0] > 2000:
            raise Budget(f"more than 2000 directory listings (at {kernel_path})")
        return real(self, kernel_path)

    monkeypatch.setattr(HostRoot, "listdir", counted)
    yield calls


def site(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "site.yaml"
    p.write_text(text)
    return p


# -- digits that are not ASCII ----------------------------------------------------------


def test_cpulist_with_superscript_digit_reads_the_mask(
    capsys: pytest.CaptureFixture[str], tree: TreeBuilder
) -> None:
    root = tree.cpus(count=8, nodes=2).build()
    (root / "sys/devices/system/node/node0/cpulist").write_text("0-3²\n")
    doc = inspect_json(capsys, root)
    # The kernel's other spelling of the same fact (cpumap) gives the right answer.
    assert doc["numa_nodes"][0]["cpus"] == [0, 1, 2, 3]
    assert any("node0/cpulist" in n and "not a CPU list" in n for n in doc["notes"])


def test_cpulist_with_superscript_digit_in_the_snapshot(
    capsys: pytest.CaptureFixture[str], snap: Path
) -> None:
    (snap / "sys/devices/system/node/node0/cpulist").write_text("0-7²\n")
    # The snapshot holds the mask twin (hwloc reads it): without it, as older snapshots are,
    (snap / "sys/devices/system/node/node0/cpumap").unlink()
    doc = inspect_json(capsys, snap)
    # no cpumap: node 0's CPUs are unknown, and said so; never 0-7.
    assert doc["numa_nodes"][0]["cpus"] == []
    assert any("node0/cpulist" in n for n in doc["notes"])


def test_online_list_with_arabic_indic_digit_is_not_cpu_5(
    capsys: pytest.CaptureFixture[str], snap: Path
) -> None:
    # int("\\u0665") == 5: read as a number, CPUs 4, 6 and 7 would be offline.
    (snap / "sys/devices/system/cpu/online").write_text("0-3,\u0665\n")
    doc = inspect_json(capsys, snap)
    assert [c["cpu"] for c in doc["cpus"] if c["online"]] == list(range(8))
    assert any("cpu/online" in n for n in doc["notes"])


def test_iommu_group_directory_named_superscript_two(
    capsys: pytest.CaptureFixture[str], snap: Path
) -> None:
    groups = snap / "sys/kernel/iommu_groups"
    (groups / "20").rename(groups / "²")
    doc = inspect_json(capsys, snap)
    assert any("iommu_groups/²" in n for n in doc["notes"])
    nic = next(f for f in doc["pci"] if f["address"] == "0000:41:00.0")
    # Its link still names group 20, which is no longer listed: not assignable.
    assert nic["iommu_group"] is None and nic["assignable"] is False
    assert "does not list" in nic["why_not"]


def test_group_link_with_arabic_indic_digit_is_not_group_3(
    capsys: pytest.CaptureFixture[str], snap: Path
) -> None:
    groups = snap / "sys/kernel/iommu_groups"
    (groups / "20").rename(groups / "\u0663")  # "٣": int() reads 3, an existing group
    link = snap / "sys/devices/pci0000:40/0000:40:00.0/0000:41:00.0/iommu_group"
    link.unlink()
    link.symlink_to("../../../../kernel/iommu_groups/\u0663")
    doc = inspect_json(capsys, snap)
    nic = next(f for f in doc["pci"] if f["address"] == "0000:41:00.0")
    assert nic["iommu_group"] is None and nic["assignable"] is False
    assert "does not list" in nic["why_not"]


# -- NUL bytes in /proc ------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, damage",
    [
        ("proc/meminfo", lambda b: b.replace(b"MemTotal:", b"MemT\0tal:")),
        ("proc/self/mountinfo", lambda b: b.replace(b" / / ", b" / /\0 ", 1)),
        ("proc/swaps", lambda b: b + b"/dev/vd\0a partition 1048572 0 -2\n"),
        ("proc/self/cgroup", lambda b: b"0::/\0partition\n"),
    ],
    ids=["meminfo", "mountinfo", "swaps", "cgroup"],
)
def test_nul_bytes_in_proc_are_exit_2_naming_the_file(
    capsys: pytest.CaptureFixture[str], snap: Path, path: str, damage: Any
) -> None:
    p = snap / path
    p.write_bytes(damage(p.read_bytes()))
    err = refused(capsys, snap)
    assert str(p) in err and "NUL" in err


# -- symlink loops where a directory is expected ----------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "sys/devices/system/node",
        "sys/bus/pci/devices",
        "sys/kernel/iommu_groups",
        "sys/devices/system/cpu/online",
        "proc/self/mountinfo",
    ],
)
def test_symlink_loop_is_exit_2_naming_it(
    capsys: pytest.CaptureFixture[str], snap: Path, path: str
) -> None:
    p = snap / path
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()
    p.symlink_to(p.name)  # itself
    err = refused(capsys, snap)
    assert str(p) in err and "loop" in err


# -- numbers with thousands of digits ----------------------------------------------------


def test_meminfo_number_of_5000_digits(capsys: pytest.CaptureFixture[str], snap: Path) -> None:
    p = snap / "proc/meminfo"
    p.write_text(p.read_text().replace("MemTotal:", "MemTotal: " + "9" * 5000 + " kB\nOld:"))
    doc = inspect_json(capsys, snap)
    assert any("proc/meminfo" in n and "MemTotal" in n for n in doc["notes"])


def test_node_memory_of_4299_digits_is_not_printed(
    capsys: pytest.CaptureFixture[str], snap: Path
) -> None:
    # Below int()'s 4300-digit limit, so it parses; times 1024 it no longer prints.
    p = snap / "sys/devices/system/node/node1/meminfo"
    p.write_text(p.read_text().replace("MemTotal:", "MemTotal: " + "9" * 4299 + " kB\nX:"))
    doc = inspect_json(capsys, snap)
    assert doc["numa_nodes"][1]["memory_bytes"] == 0
    assert any("node1/meminfo" in n for n in doc["notes"])


def test_hugepage_count_of_4000_digits(capsys: pytest.CaptureFixture[str], snap: Path) -> None:
    p = snap / "sys/devices/system/node/node0/hugepages/hugepages-2048kB/free_hugepages"
    p.write_text("7" * 4000 + "\n")
    doc = inspect_json(capsys, snap)
    assert doc["numa_nodes"][0]["hugepages"]["2MiB"]["free"] == 0
    assert any("free_hugepages" in n and "not a number" in n for n in doc["notes"])


# -- a hugepage directory of size 0 -------------------------------------------------------


def test_hugepages_0kB_is_ignored_and_plan_works(
    capsys: pytest.CaptureFixture[str], snap: Path, tmp_path: Path
) -> None:
    pools = snap / "sys/devices/system/node/node0/hugepages"
    shutil.copytree(pools / "hugepages-2048kB", pools / "hugepages-0kB")
    doc = inspect_json(capsys, snap)
    assert set(doc["numa_nodes"][0]["hugepages"]) == {"2MiB"}
    assert any("hugepages-0kB" in n for n in doc["notes"])
    manifest = site(
        tmp_path,
        "version: 1\nhost: {accel: tcg, reserve: {cpus: 2, memory: 256MiB}}\n"
        "partitions:\n  p0: {cpus: 2, memory: 64MiB}\n",
    )
    rc, out, err = cli(
        capsys,
        "--host-root",
        str(snap),
        "--state-dir",
        str(tmp_path / "state"),
        "--json",
        "plan",
        str(manifest),
    )
    assert rc == 0, err
    assert json.loads(out)["partitions"]["p0"]["hugepages"] == "2MiB"


# -- links that point back at themselves: each node walked once ---------------------------


def _disk_host(tree: TreeBuilder) -> TreeBuilder:
    tree.cpus(count=4)
    tree.pci("0000:00:1f.2", class_code="010601", driver="ahci", iommu_group=7)
    tree.pci("0000:00:1f.3", class_code="0c0500", iommu_group=8)
    tree.disk("sda", pci="0000:00:1f.2", partitions=1)
    return tree


def test_device_mapper_slaves_in_a_cycle(
    capsys: pytest.CaptureFixture[str], tree: TreeBuilder, listing_budget: list[int]
) -> None:
    # Six dm devices, each a "slave" of every other and of sda1: a walk that does not
    # remember where it has been lists 5^16 directories below dm-0.
    names = [f"dm-{i}" for i in range(6)]
    for n in names:
        tree.virtual_block(n, [m for m in names if m != n] + ["sda1"], dm_name=f"vg-{n}")
    _disk_host(tree).mount("dm-0", "/")
    root = tree.build()
    doc = inspect_json(capsys, root)
    ahci = next(f for f in doc["pci"] if f["address"] == "0000:00:1f.2")
    assert ahci["in_use"] == ["controller of / (sda1 under vg-dm-0)"]
    assert ahci["assignable"] is False
    assert listing_budget[0] < 2000


def test_interface_lower_links_in_a_cycle(
    capsys: pytest.CaptureFixture[str], tree: TreeBuilder, listing_budget: list[int]
) -> None:
    tree.cpus(count=4)
    tree.pci("0000:01:00.0", driver="e1000e", iommu_group=3, netdevs=("eth0",))
    tree.pci("0000:02:00.0", driver="e1000e", iommu_group=4, netdevs=("eth1",))
    names = [f"br{i}" for i in range(7)]
    for n in names:
        tree.netdev(n)
    tree.netdev_up("br0", default_route=True)
    root = tree.build()
    # Every bridge is built on every other bridge and on eth0: 6^9 paths for a depth-8 walk.
    eth0 = root / tree.pci_path("0000:01:00.0").lstrip("/") / "net/eth0"
    for n in names:
        d = root / f"sys/devices/virtual/net/{n}"
        for m in names:
            if m != n:
                (d / f"lower_{m}").symlink_to(f"../{m}")
        (d / "lower_eth0").symlink_to(os.path.relpath(eth0, d))
    doc = inspect_json(capsys, root)
    nic = next(f for f in doc["pci"] if f["address"] == "0000:01:00.0")
    assert nic["in_use"] == [
        "eth0 carries the default route (through br0)",
        "eth0 is up with an address (through br0)",
    ]
    other = next(f for f in doc["pci"] if f["address"] == "0000:02:00.0")
    assert other["in_use"] == [] and other["assignable"] is True
    assert listing_budget[0] < 2000


# -- 10,000 PCI functions: inspect's work grows with the count, not its square -------------


class CountingFunctions(Mapping[Any, Any]):
    """The host's PCI functions, counting every function handed out by a walk over all of
    them.  Lookups by address are free; a walk per function is what makes inspect quadratic."""

    def __init__(self, inner: Mapping[Any, Any], budget: int) -> None:
        self.inner = inner
        self.visits = 0
        self.budget = budget

    def _count(self, n: int = 1) -> None:
        self.visits += n
        if self.visits > self.budget:
            raise Budget(f"more than {self.budget} visits of PCI functions")

    def __getitem__(self, key: Any) -> Any:
        return self.inner[key]

    def __iter__(self) -> Iterator[Any]:
        for k in self.inner:
            self._count()
            yield k

    def __len__(self) -> int:
        return len(self.inner)

    def __contains__(self, key: object) -> bool:
        return key in self.inner

    def values(self) -> Any:
        for v in self.inner.values():
            self._count()
            yield v

    def items(self) -> Any:
        for kv in self.inner.items():
            self._count()
            yield kv


def add_functions(root: Path, count: int) -> None:
    """``count`` Ethernet functions, two per slot, each slot its own IOMMU group, in the
    kernel's layout (a device directory, the bus link, the group and its member link).
    Written directly: TreeBuilder's full attribute set for 10,000 functions takes minutes."""
    sys_ = root / "sys"
    for i in range(count):
        domain, rest = divmod(i, 256 * 64)
        bus, rest = divmod(rest, 64)
        slot, fn = divmod(rest, 2)
        addr = f"{domain + 1:04x}:{bus:02x}:{slot:02x}.{fn}"
        top = f"pci{domain + 1:04x}:{bus:02x}"
        dev = sys_ / "devices" / top / addr
        dev.mkdir(parents=True)
        for name, value in (("vendor", "0x8086"), ("device", "0x10d3"), ("class", "0x020000")):
            (dev / name).write_text(value + "\n")
        (dev / "reset_method").write_text("flr\n")
        group = 1000 + i // 2
        gdir = sys_ / "kernel/iommu_groups" / str(group) / "devices"
        gdir.mkdir(parents=True, exist_ok=True)
        (dev / "iommu_group").symlink_to(f"../../../kernel/iommu_groups/{group}")
        (gdir / addr).symlink_to(f"../../../../devices/{top}/{addr}")
        (sys_ / "bus/pci/devices" / addr).symlink_to(f"../../../devices/{top}/{addr}")


def test_inspect_of_10000_functions_is_linear(
    capsys: pytest.CaptureFixture[str], tree: TreeBuilder, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = 10_000
    root = tree.cpus(count=4).build()
    add_functions(root, count)
    real_scan = inspect_cli.scan
    counted: list[CountingFunctions] = []

    def scan(root: HostRoot) -> Any:
        host = real_scan(root)
        # Linear work visits each function a few times; a walk per function visits count².
        counted.append(CountingFunctions(host.pci, budget=20 * count))
        return dataclasses.replace(host, pci=counted[0])

    monkeypatch.setattr(inspect_cli, "scan", scan)
    doc = inspect_json(capsys, root)
    assert len(doc["pci"]) == count
    first = doc["pci"][0]
    assert first["assignable"] is True and first["takes_with_it"] == [doc["pci"][1]["address"]]
    assert counted[0].visits <= 20 * count


# -- a group link to a group the kernel does not list -------------------------------------


def test_link_to_an_unlisted_group_is_not_assignable(
    capsys: pytest.CaptureFixture[str], snap: Path, tmp_path: Path
) -> None:
    link = snap / "sys/devices/pci0000:40/0000:40:00.0/0000:41:00.0/iommu_group"
    link.unlink()
    link.symlink_to("../../../../kernel/iommu_groups/99")
    shutil.rmtree(snap / "sys/kernel/iommu_groups/20")
    doc = inspect_json(capsys, snap)
    nic = next(f for f in doc["pci"] if f["address"] == "0000:41:00.0")
    assert nic["iommu_group"] is None and nic["assignable"] is False
    assert "'99'" in nic["why_not"] and "does not list" in nic["why_not"]
    manifest = site(
        tmp_path,
        "version: 1\nhost: {accel: tcg, reserve: {cpus: 2, memory: 256MiB}}\n"
        "partitions:\n  p0:\n    cpus: 2\n    memory: 64MiB\n"
        '    devices: [{pci: "0000:41:00.0"}]\n',
    )
    rc, _, err = cli(
        capsys, "--host-root", str(snap), "--state-dir", str(tmp_path / "s"), "plan", str(manifest)
    )
    assert rc == 3
    assert "0000:41:00.0" in err and "does not list" in err


# -- snapshot never writes into the tree it reads ------------------------------------------


@pytest.mark.parametrize("where", ["itself", "inside", "holding"])
def test_snapshot_refuses_to_overwrite_its_source(
    capsys: pytest.CaptureFixture[str], snap: Path, where: str
) -> None:
    dest = {"itself": snap, "inside": snap / "copy", "holding": snap.parent}[where]
    before = sorted(str(p.relative_to(snap)) for p in snap.rglob("*"))
    err = refused(capsys, snap, "snapshot", str(dest), "--force")
    assert "tree being copied" in err
    assert sorted(str(p.relative_to(snap)) for p in snap.rglob("*")) == before


def test_snapshot_through_a_symlink_to_its_source(
    capsys: pytest.CaptureFixture[str], snap: Path, tmp_path: Path
) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(snap)
    refused(capsys, snap, "snapshot", str(alias), "--force")
    assert (snap / "sys/devices/system/cpu/online").is_file()


def test_snapshot_elsewhere_still_works(
    capsys: pytest.CaptureFixture[str], snap: Path, tmp_path: Path
) -> None:
    rc, _, err = cli(capsys, "--host-root", str(snap), "snapshot", str(tmp_path / "out"))
    assert rc == 0, err
    assert (tmp_path / "out/sys/devices/system/cpu/online").is_file()


def test_a_proc_file_larger_than_any_kernel_writes(
    capsys: pytest.CaptureFixture[str], snap: Path
) -> None:
    p = snap / "proc/swaps"
    with p.open("a") as f:
        line = "/dev/zram0 partition 1048572 0 -2\n" * 1024
        for _ in range(65 * 1024 * 1024 // len(line) + 1):
            f.write(line)
    err = refused(capsys, snap)
    assert str(p) in err and "larger than 64 MiB" in err


# -- issue 18: mount points, page sizes and snapshot places no kernel or user means --------


@pytest.mark.parametrize(
    "mount",
    [
        b" / /sys/fs/cgroup rw,relatime - cgroup2",  # where the cgroup's cpuset is read
        b" / / ro,relatime - 9p",  # the host's root
    ],
    ids=["cgroup2", "root"],
)
def test_relative_mount_point_is_exit_2_naming_mountinfo(
    capsys: pytest.CaptureFixture[str], snap: Path, tmp_path: Path, mount: bytes
) -> None:
    p = snap / "proc/self/mountinfo"
    before = p.read_bytes()
    assert mount in before
    relative = mount.replace(b" / /", b" / ", 1).replace(b" / ", b" / relative/", 1)
    p.write_bytes(before.replace(mount, relative, 1))
    manifest = site(
        tmp_path,
        "version: 1\nhost: {accel: tcg, smt: share, reserve: {cpus: 1}}\n"
        "partitions:\n  p0: {cpus: 1, memory: 64MiB}\n",
    )
    for verb in (("inspect",), ("plan", str(manifest))):
        err = refused(capsys, snap, *verb)
        assert str(p) in err and "'relative/" in err and "absolute" in err, err


@pytest.mark.parametrize("kb", ["549755813888", "33554432", "9" * 40])
def test_hugepage_size_no_machine_has_is_exit_2_naming_the_pool(
    capsys: pytest.CaptureFixture[str], snap: Path, tmp_path: Path, kb: str
) -> None:
    pools = snap / "sys/devices/system/node/node0/hugepages"
    shutil.copytree(pools / "hugepages-2048kB", pools / f"hugepages-{kb}kB")
    manifest = site(
        tmp_path,
        "version: 1\nhost: {accel: tcg, smt: share, reserve: {cpus: 1}}\n"
        "partitions:\n  p0: {cpus: 1, memory: 64MiB}\n",
    )
    for verb in (("inspect",), ("plan", str(manifest))):
        err = refused(capsys, snap, *verb)
        assert f"{pools}/hugepages-{kb}kB" in err and "larger than any page" in err, err


def test_hugepage_size_of_16GiB_is_a_page_size(
    capsys: pytest.CaptureFixture[str], snap: Path
) -> None:
    # ppc64's gigantic pages: the largest Linux has, still read.
    pools = snap / "sys/devices/system/node/node0/hugepages"
    shutil.copytree(pools / "hugepages-2048kB", pools / "hugepages-16777216kB")
    doc = inspect_json(capsys, snap)
    assert set(doc["numa_nodes"][0]["hugepages"]) == {"2MiB", "16GiB"}


@pytest.mark.parametrize(
    "where", ["under a file", "deeper under a file", "dangling link", "under a dangling link"]
)
def test_snapshot_where_no_directory_can_be_made_is_exit_2(
    capsys: pytest.CaptureFixture[str], snap: Path, tmp_path: Path, where: str
) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere" / "x")
    dest = {
        "under a file": tmp_path / "file" / "snap",
        "deeper under a file": tmp_path / "file" / "a" / "snap",
        "dangling link": tmp_path / "link",
        "under a dangling link": tmp_path / "link" / "snap",
    }[where]
    err = refused(capsys, snap, "snapshot", str(dest))
    assert str(dest) in err, err
    blocker = tmp_path / ("file" if "file" in where else "link")
    assert str(blocker) in err and ("not a directory" in err or "does not exist" in err), err
    assert (tmp_path / "file").read_text() == "x" and not (tmp_path / "nowhere").exists()
