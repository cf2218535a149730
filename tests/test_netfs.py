"""The host keeps what it runs on, network and virtual filesystems too (rule 5).

A 9p or virtiofs mount holds its virtio transport's PCI function (the virtio
device's parent in sysfs); an NFS, CIFS, Ceph or iSCSI mount holds the interface
its server is routed through.  Trees as the kernel lays them out (TreeBuilder, and
the snapshot of the emulated server, whose ``/`` is 9p over 0000:00:18.0).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from treebuilder import GiB, TreeBuilder

from partitioner.cli.inspect import to_json
from partitioner.errors import PlanError
from partitioner.inventory import scan
from partitioner.inventory.model import Host
from partitioner.kernel.root import HostRoot
from partitioner.manifest.loader import loads
from partitioner.pci import PciAddress
from partitioner.planning.planner import plan

TESTBED_NUMA = Path(__file__).resolve().parent / "fixtures" / "hosts" / "testbed-numa"

BASE_MOUNTS = (
    "22 1 0:21 / /proc rw,relatime - proc proc rw\n23 1 0:22 / /sys rw,relatime - sysfs sysfs rw\n"
)


def _site(device: str) -> str:
    return (
        "version: 1\nhost: {reserve: {cpus: 1, memory: 0GiB}, smt: share, accel: tcg}\n"
        "partitions:\n"
        f'  p: {{cpus: 1, memory: 4MiB, hugepages: none, devices: [{{pci: "{device}"}}]}}\n'
    )


def _problems(host: Host, device: str) -> str:
    with pytest.raises(PlanError) as e:
        plan(loads(_site(device), "site.yaml"), host)
    return "\n".join(map(str, e.value.problems))


def _a(text: str) -> PciAddress:
    return PciAddress.parse(text)


def _base(t: TreeBuilder) -> None:
    t.cpus(count=4)
    t.node(0, memory_bytes=8 * GiB, free_bytes=6 * GiB)
    t.driver("vfio-pci")


def _virtio(t: TreeBuilder, pci: str, n: int, kind: int, tag: str | None = None) -> None:
    """virtioN under ``pci``, as virtio-pci registers it: /sys/bus/virtio/devices/virtioN
    links to it; 9p's device shows its ``mount_tag`` (NUL-terminated, as the kernel has it)."""
    d = f"{t.device_path(pci)}/virtio{n}"
    t.file(f"{d}/device", f"0x{kind:04x}\n")
    if tag is not None:
        t.file(f"{d}/mount_tag", tag + "\0")
    t.link(f"/sys/bus/virtio/devices/virtio{n}", d)


def test_testbed_root_over_9p_is_kept_and_plan_refuses_it() -> None:
    host = scan(HostRoot(TESTBED_NUMA))
    assert host.in_use[_a("00:18.0")] == (
        "virtio transport of the root filesystem / (9p hostroot)",
    )
    assert host.in_use[_a("00:19.0")] == ("virtio transport of /run/testbed (9p tbctl)",)
    msg = _problems(host, "0000:00:18.0")
    assert "0000:00:18.0 is in use by the host" in msg
    assert "the root filesystem / (9p hostroot)" in msg and "rule 5" in msg
    shown = {f["address"]: f for f in to_json(host)["pci"]}
    assert not shown["0000:00:18.0"]["assignable"]


def test_9p_over_virtio(tree: TreeBuilder) -> None:
    _base(tree)
    tree.pci("0000:00:05.0", vendor="1af4", device="1009", class_code="000200", iommu_group=5)
    tree.pci("0000:00:06.0", vendor="1af4", device="1009", class_code="000200", iommu_group=6)
    tree.pci("0000:00:07.0", vendor="1af4", device="1009", class_code="000200", iommu_group=7)
    tree.build()
    _virtio(tree, "0000:00:05.0", 0, 9, "rootfs")
    _virtio(tree, "0000:00:06.0", 1, 9, "data")
    _virtio(tree, "0000:00:07.0", 2, 9, "spare")
    tree.file(
        "/proc/self/mountinfo",
        BASE_MOUNTS
        + "24 1 0:30 / / rw - 9p rootfs rw,access=client,msize=512000,trans=virtio\n"
        + "25 24 0:31 / /srv/my\\040data rw - 9p data rw,trans=virtio\n"
        # 9p over TCP has no virtio device: its tag is a server's name
        + "26 24 0:32 / /mnt rw - 9p spare rw,trans=tcp,port=564\n",
    )
    host = scan(HostRoot(tree.root))
    assert host.in_use[_a("00:05.0")] == ("virtio transport of the root filesystem / (9p rootfs)",)
    assert host.in_use[_a("00:06.0")] == ("virtio transport of /srv/my data (9p data)",)
    assert _a("00:07.0") not in host.in_use
    assert "the root filesystem / (9p rootfs)" in _problems(host, "00:05.0")
    plan(loads(_site("00:07.0"), "site.yaml"), host)


def test_virtiofs_by_its_tag_and_without_tags_in_sysfs(tree: TreeBuilder) -> None:
    _base(tree)
    for slot, group in (("08", 8), ("09", 9)):
        tree.pci(f"0000:00:{slot}.0", vendor="1af4", device="105a", class_code="018000",
                 iommu_group=group)  # fmt: skip
    tree.build()
    _virtio(tree, "0000:00:08.0", 0, 0x1A)
    _virtio(tree, "0000:00:09.0", 1, 0x1A)
    tree.file("/proc/self/mountinfo", BASE_MOUNTS + "24 1 0:30 / /srv rw - virtiofs shared rw\n")
    # A kernel older than 6.10 does not say which device carries which tag: both are kept.
    host = scan(HostRoot(tree.root))
    assert set(host.in_use) == {_a("00:08.0"), _a("00:09.0")}
    assert "which may carry /srv (virtiofs shared" in host.in_use[_a("00:08.0")][0]
    # Later kernels do (/sys/fs/virtiofs/N/tag and its device link): only that one is kept.
    for n, pci, tag in ((0, "0000:00:08.0", "other"), (1, "0000:00:09.0", "shared")):
        tree.file(f"/sys/fs/virtiofs/{n}/tag", tag + "\n")
        tree.link(f"/sys/fs/virtiofs/{n}/device", f"{tree.device_path(pci)}/virtio{n}")
    host = scan(HostRoot(tree.root))
    assert host.in_use == {_a("00:09.0"): ("virtio transport of /srv (virtiofs shared)",)}
    assert "virtio transport of /srv (virtiofs shared)" in _problems(host, "00:09.0")


def test_network_filesystems_keep_the_interface_that_reaches_the_server(
    tree: TreeBuilder,
) -> None:
    _base(tree)
    tree.pci("0000:00:1c.0", class_code="060400", driver="pcieport", iommu_group=10)
    tree.pci("0000:01:00.0", driver="e1000e", iommu_group=11, parent="0000:00:1c.0",
             netdevs=("enp1s0",))  # fmt: skip
    tree.pci("0000:00:1c.1", class_code="060400", driver="pcieport", iommu_group=12)
    tree.pci("0000:02:00.0", driver="igb", iommu_group=13, parent="0000:00:1c.1",
             netdevs=("enp2s0",))  # fmt: skip
    tree.pci("0000:00:1c.2", class_code="060400", driver="pcieport", iommu_group=14)
    tree.pci("0000:03:00.0", driver="igb", iommu_group=15, parent="0000:00:1c.2",
             netdevs=("enp3s0",))  # fmt: skip
    tree.netdev("br0")
    tree.build()
    tree.link("/sys/class/net/br0/lower_enp3s0", tree.device_path("0000:03:00.0") + "/net/enp3s0")
    # enp1s0 reaches 10.0.0.0/24, br0 (over enp3s0) 10.0.0.128/25 and fd00::/64, enp2s0
    # carries 192.168.1.0/24 and the default route.
    tree.file(
        "/proc/net/route",
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "enp2s0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
        "enp2s0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n"
        "enp1s0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "br0\t8000000A\t00000000\t0001\t0\t0\t0\t80FFFFFF\t0\t0\t0\n",
    )
    tree.file(
        "/proc/net/ipv6_route",
        "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 "
        "00000000000000000000000000000000 00000100 00000001 00000000 00000001     br0\n",
    )
    tree.file(
        "/proc/self/mountinfo",
        BASE_MOUNTS + "24 1 0:30 / / rw - nfs4 10.0.0.5:/export/root "
        "rw,vers=4.2,proto=tcp,clientaddr=192.168.1.7,addr=10.0.0.5\n"
        + "25 24 0:31 / /home rw - cifs //files/home rw,vers=3.1.1,addr=203.0.113.9\n"
        + "26 24 0:32 / /ceph rw - ceph [fd00::5]:6789:/ rw,name=admin\n"
        + "27 24 0:33 / /backup rw - nfs 10.0.0.200:/b rw,addr=10.0.0.200\n",
    )
    host = scan(HostRoot(tree.root))
    assert (
        "enp1s0 reaches the server of the root filesystem / (nfs4 10.0.0.5)"
        in (host.in_use[_a("01:00.0")])
    )
    assert "enp2s0 reaches the server of /home (cifs 203.0.113.9)" in host.in_use[_a("02:00.0")]
    nic3 = host.in_use[_a("03:00.0")]
    assert "enp3s0 reaches the server of /ceph (ceph fd00::5) (through br0)" in nic3
    assert "enp3s0 reaches the server of /backup (nfs 10.0.0.200) (through br0)" in nic3
    msg = _problems(host, "01:00.0")
    assert "enp1s0 reaches the server of the root filesystem / (nfs4 10.0.0.5)" in msg


def test_iscsi_disk_keeps_the_interface_to_its_target(tree: TreeBuilder) -> None:
    _base(tree)
    tree.pci("0000:00:1c.0", class_code="060400", driver="pcieport", iommu_group=10)
    tree.pci("0000:01:00.0", driver="e1000e", iommu_group=11, parent="0000:00:1c.0",
             netdevs=("enp1s0",))  # fmt: skip
    tree.build()
    # An iSCSI disk hangs off its session, not off a PCI function.
    disk = "/sys/devices/platform/host3/session1/target3:0:0/3:0:0:0/block/sdb"
    tree.file(f"{disk}/dev", "8:16\n")
    tree.link("/sys/dev/block/8:16", disk)
    tree.link("/sys/class/block/sdb", disk)
    tree.file("/sys/devices/platform/host3/session1/connection1:0/iscsi_connection/"
              "connection1:0/address", "10.0.0.9\n")  # fmt: skip
    tree.link(
        "/sys/class/iscsi_connection/connection1:0",
        "/sys/devices/platform/host3/session1/connection1:0/iscsi_connection/connection1:0",
    )
    tree.file(
        "/proc/net/route",
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "enp1s0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n",
    )
    tree.file("/proc/self/mountinfo", BASE_MOUNTS + "24 1 8:16 / /data rw - xfs /dev/sdb rw\n")
    host = scan(HostRoot(tree.root))
    assert "enp1s0 reaches the server of /data (iscsi 10.0.0.9)" in host.in_use[_a("01:00.0")]


def test_snapshot_keeps_what_shows_a_virtual_filesystem(tree: TreeBuilder, tmp_path: Path) -> None:
    """The snapshot copies what the scan reads: mountinfo, /sys/bus/virtio and each virtio
    device's link to its PCI parent, so the copy keeps the root's transport too."""
    from partitioner.inventory.snapshot import take_snapshot

    _base(tree)
    tree.pci("0000:00:05.0", vendor="1af4", device="1009", class_code="000200", iommu_group=5)
    tree.build()
    _virtio(tree, "0000:00:05.0", 0, 9, "rootfs")
    tree.file(
        "/proc/self/mountinfo", BASE_MOUNTS + "24 1 0:30 / / rw - 9p rootfs rw,trans=virtio\n"
    )
    before = scan(HostRoot(tree.root))
    assert _a("00:05.0") in before.in_use
    dest = tmp_path / "snap"
    take_snapshot(HostRoot(tree.root), dest)
    assert (dest / "sys/bus/virtio/devices/virtio0").is_symlink()
    assert scan(HostRoot(dest)).in_use == before.in_use
