"""``partition apply`` end to end INSIDE the emulated VT-d server: a partition that owns a NIC.

Run by tests/test_inside.py in the ``numa`` preset (as root, real IOMMU groups,
real hugepage pools per node).  The nested guest is TCG inside TCG, so one
guest is booted and everything is checked around it: the NIC is on vfio-pci
while it runs and the guest sees it; vCPUs are pinned; a second apply does
nothing; destroy gives the NIC back to e1000e and the pages back to the pool;
an apply whose last step fails leaves the NIC, the pool and the record as they were.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from guestimage import build_guest_initramfs, guest_kernel

from partitioner.cpuset import CpuSet
from partitioner.guest.launch import thread_affinities
from partitioner.inventory.model import Host
from partitioner.kernel.root import HostRoot
from partitioner.record.model import State
from partitioner.record.store import StateStore
from partitioner.vfio.claim import current_driver

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or not os.path.isdir("/sys/kernel/iommu_groups/0"),
        reason="runs inside the emulated VT-d server (root, IOMMU groups)",
    ),
    pytest.mark.usefixtures("nic_drivers"),
]

ROOT = HostRoot("/")
PROJECT = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 700.0  # a TCG guest inside a TCG server on shared cores: minutes


def scan() -> Host:
    from partitioner.inventory import scan as inventory_scan

    return inventory_scan(ROOT)


def lone_e1000e(host: Host) -> tuple[str, int, int]:
    """A NIC alone in its IOMMU group, on a NUMA node: (address, group, node)."""
    for g in sorted(host.iommu_groups):
        ends = [host.pci[a] for a in host.iommu_groups[g].members if not host.pci[a].is_bridge]
        if (
            len(ends) == 1
            and ends[0].id == "8086:10d3"
            and ends[0].driver == "e1000e"
            and ends[0].numa_node is not None
            and ends[0].address not in host.in_use
        ):
            return str(ends[0].address), g, ends[0].numa_node
    raise AssertionError("no e1000e alone in its IOMMU group on a NUMA node")


def pool(node: int) -> tuple[int, int]:
    d = f"/sys/devices/system/node/node{node}/hugepages/hugepages-2048kB"
    nr, free = ROOT.read_int(f"{d}/nr_hugepages"), ROOT.read_int(f"{d}/free_hugepages")
    assert nr is not None and free is not None
    return nr, free


class Site:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = {
            **os.environ,
            "PARTITION_STATE_DIR": str(tmp / "state"),
            "PARTITION_RUN_DIR": str(tmp / "run"),
            "PARTITION_LOG_DIR": str(tmp / "log"),
        }
        self.kernel = guest_kernel()
        self.initrd = build_guest_initramfs(tmp / "img")

    def manifest(self, name: str, address: str, extra: str = "") -> Path:
        path = self.tmp / f"{name}.yaml"
        path.write_text(
            "version: 1\n"
            # smt: share lets the partition have one vCPU: a TCG guest inside a TCG server
            # is slow enough with one.
            "host:\n  accel: tcg\n  smt: share\n"
            f"partitions:\n  {name}:\n"
            "    cpus: 1\n    memory: 128MiB\n    hugepages: 2MiB\n"
            f'    devices:\n      - pci: "{address}"\n'
            f"    boot:\n      kernel: {self.kernel}\n      initrd: {self.initrd}\n"
            "      cmdline: console=ttyS0 quiet panic=-1\n" + extra
        )
        return path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "partitioner.cli.main", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=BOOT_TIMEOUT,
            cwd=PROJECT,
        )

    def status(self) -> dict[str, Any]:
        cp = self.cli("--json", "status")
        assert cp.returncode == 0, cp.stderr
        doc: dict[str, Any] = json.loads(cp.stdout)["partitions"]
        return doc


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    yield s
    if (tmp_path / "state" / "state.json").exists():
        s.cli("destroy", "--all", "--timeout", "5")


def wait_console(log: Path, marker: str) -> str:
    deadline = time.monotonic() + BOOT_TIMEOUT
    text = ""
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if marker in text:
            return text.replace("\r", "")
        time.sleep(1)
    raise AssertionError(f"{marker} not in {log} after {BOOT_TIMEOUT}s:\n{text[-2000:]}")


DEMO = PROJECT / "partitions" / "demo.yaml"
CHIPSET = {
    "8086:29c0",
    "8086:2918",
    "8086:2922",
    "8086:2930",
    "1b36:000c",
}  # q35 and its root ports


def guest_devices(console: str) -> list[str]:
    """vendor:device of every PCI function the guest lists, less q35's own."""
    ids = [line.split()[1] for line in console.splitlines() if line.startswith("GUEST-PCI ")]
    return sorted(i for i in ids if i not in CHIPSET)


def hugepages_on_nodes(pid: int) -> dict[int, int]:
    """Pages of QEMU's hugetlb mappings per NUMA node, as the kernel counts them (numa_maps)."""
    out: dict[int, int] = {}
    for line in Path(f"/proc/{pid}/numa_maps").read_text().splitlines():
        if " huge " not in line:
            continue
        for word in line.split():
            if word[0] == "N" and "=" in word:
                node, count = word[1:].split("=")
                out[int(node)] = out.get(int(node), 0) + int(count)
    return out


def test_demo_site_partitions_own_their_nics_and_give_them_back(site: Site) -> None:
    """The demo's site: fw0 owns the e1000e on node 1, lan0 the two-function NIC on node 0."""
    fw_nic, lan_nics = "0000:81:00.0", ["0000:42:00.0", "0000:42:00.1"]
    for a in (fw_nic, *lan_nics):
        assert current_driver(ROOT, a) == "e1000e", a
    host = scan()
    before = {0: pool(0), 1: pool(1)}
    m = site.tmp / "demo.yaml"
    m.write_text(
        DEMO.read_text().replace("/srv/partition/demo/guest-initramfs.cpio.gz", str(site.initrd))
    )

    cp = site.cli("apply", str(m))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    for a in (fw_nic, *lan_nics):
        assert current_driver(ROOT, a) == "vfio-pci", a
    st = site.status()
    assert st["fw0"]["numa_nodes"] == [1] and st["lan0"]["numa_nodes"] == [0]
    assert st["fw0"]["devices"] == [fw_nic] and sorted(st["lan0"]["devices"]) == lan_nics
    for name, node in (("fw0", 1), ("lan0", 0)):
        pid = st[name]["pid"]
        aff = thread_affinities(ROOT, pid)
        for i, tid in st[name]["vcpu_threads"].items():
            assert aff[tid] == CpuSet([st[name]["cpus"][int(i)]])
            assert host.cpus[st[name]["cpus"][int(i)]].node == node
        for tid, cpus in aff.items():
            if tid not in st[name]["vcpu_threads"].values():
                assert cpus == CpuSet([0, 4]), (
                    f"{name}: thread {tid} on {cpus}, not the host's CPUs"
                )
        # 128 MiB of 2 MiB pages, every one of them on the partition's node
        assert hugepages_on_nodes(pid) == {node: 64}
        # status's figures (issue 12) say the same, and count its devices' VFIO vectors.
        stats = st[name]["stats"]
        assert stats["memory"]["hugepages_per_node_bytes"] == {str(node): 64 * 2 * 1024**2}
        assert set(stats["vcpus"]) == set(st[name]["vcpu_threads"])
        vectors = {v.rsplit("(", 1)[1].rstrip(")") for v in stats["interrupts"]}
        # QEMU enables INTx of each function that has an interrupt pin (not every one has)
        assert vectors and vectors <= set(st[name]["devices"]), stats["interrupts"]
        assert pool(node)[1] == before[node][1] - 64

    fw0 = wait_console(Path(st["fw0"]["console_log"]), "GUEST-READY")
    lan0 = wait_console(Path(st["lan0"]["console_log"]), "GUEST-READY")
    assert guest_devices(fw0) == ["8086:10d3"], fw0
    assert guest_devices(lan0) == ["8086:10d3", "8086:10d3"], lan0
    assert "GUEST-CPUS 1\n" in fw0 and "GUEST-CPUS 1\n" in lan0

    again = site.cli("apply", str(m))
    assert again.returncode == 0 and again.stdout.strip() == "nothing to do", again.stderr

    gone = site.cli("destroy", "--all", "--timeout", "30")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    for a in (fw_nic, *lan_nics):
        assert current_driver(ROOT, a) == "e1000e", a
    assert {0: pool(0), 1: pool(1)} == before
    assert site.status() == {}


def test_nic_behind_the_pci_bridge_is_refused_and_nothing_changes(site: Site) -> None:
    nics = ["0000:87:01.0", "0000:87:02.0"]
    drivers = {a: current_driver(ROOT, a) for a in nics}
    m = site.manifest("br0", nics[0])
    cp = site.cli("apply", str(m))
    assert cp.returncode == 3, cp.stdout + cp.stderr
    assert "0000:86:00.0" in cp.stderr  # the bridge that keeps the group from a guest
    assert {a: current_driver(ROOT, a) for a in nics} == drivers
    assert not (site.tmp / "state" / "state.json").exists()


def test_failed_apply_gives_the_nic_and_pages_back(site: Site) -> None:
    host = scan()
    addr, _, node = lone_e1000e(host)
    before = pool(node)
    state = site.tmp / "state" / "state.json"
    StateStore(state.parent).save(State())
    record = state.read_bytes()
    # A disk that is there (plan checks that) but is not the qcow2 its name says: only
    # QEMU finds out, after the NIC was claimed and the pages reserved.
    missing = site.tmp / "not-a-qcow2.qcow2"
    missing.write_bytes(b"not a qcow2 image\n" * 256)
    m = site.manifest("bad", addr, extra=f"    disks:\n      - path: {missing}\n")

    cp = site.cli("-v", "apply", str(m))
    assert cp.returncode == 4, cp.stdout + cp.stderr
    assert "undoing: claim-group bad" in cp.stderr
    assert str(missing) in cp.stderr
    assert current_driver(ROOT, addr) == "e1000e"
    assert pool(node) == before
    assert state.read_bytes() == record
