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
from partitioner.guest.launch import is_running, thread_affinities
from partitioner.host import Host
from partitioner.hostroot import HostRoot
from partitioner.run import run
from partitioner.state import State, StateStore
from vfio.claim import current_driver

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.isdir("/sys/kernel/iommu_groups/0"),
    reason="runs inside the emulated VT-d server (root, IOMMU groups)",
)

ROOT = HostRoot("/")
PROJECT = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 700.0  # a TCG guest inside a TCG server on shared cores: minutes


@pytest.fixture(scope="module", autouse=True)
def nic_drivers() -> Iterator[None]:
    # No udev in the server: load the NIC drivers so "given back to e1000e" can be seen.
    loaded = [m for m in ("e1000e",) if not ROOT.exists(f"/sys/module/{m}")]
    for module in loaded:
        run(["modprobe", module], timeout=120)
    yield
    for module in loaded:
        run(["modprobe", "-r", module], timeout=120, check=False)


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


def test_partition_owns_a_nic_and_gives_it_back(site: Site) -> None:
    host = scan()
    addr, group, node = lone_e1000e(host)
    before = pool(node)
    m = site.manifest("fw0", addr)

    cp = site.cli("apply", str(m))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "claim-group" in cp.stdout and f"IOMMU group {group}" in cp.stdout
    assert current_driver(ROOT, addr) == "vfio-pci"
    st = site.status()["fw0"]
    assert st["state"] == "running" and st["devices"] == [addr]
    assert st["numa_nodes"] == [node]  # auto: the node of its device
    pid = st["pid"]
    aff = thread_affinities(ROOT, pid)
    for i, tid in st["vcpu_threads"].items():
        assert aff[tid] == CpuSet([st["cpus"][int(i)]])
    # The guest sees the host's NIC on its PCI bus (the last thing it lists).
    console = wait_console(Path(st["console_log"]), "GUEST-PCI 8086:10d3")
    assert "GUEST-CPUS 1\n" in console

    again = site.cli("apply", str(m))
    assert again.returncode == 0 and again.stdout.strip() == "nothing to do", again.stderr

    gone = site.cli("destroy", "--all", "--timeout", "30")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert not is_running(ROOT, pid, "fw0")
    assert current_driver(ROOT, addr) == "e1000e"
    assert ROOT.listdir(f"/sys/bus/pci/devices/{addr}/net"), "e1000e made no interface again"
    assert pool(node) == before
    assert site.status() == {}


def test_failed_apply_gives_the_nic_and_pages_back(site: Site) -> None:
    host = scan()
    addr, _, node = lone_e1000e(host)
    before = pool(node)
    state = site.tmp / "state" / "state.json"
    StateStore(state.parent).save(State())
    record = state.read_bytes()
    missing = site.tmp / "missing.qcow2"
    m = site.manifest("bad", addr, extra=f"    disks:\n      - path: {missing}\n")

    cp = site.cli("-v", "apply", str(m))
    assert cp.returncode == 4, cp.stdout + cp.stderr
    assert "undoing: claim-group bad" in cp.stderr
    assert str(missing) in cp.stderr
    assert current_driver(ROOT, addr) == "e1000e"
    assert pool(node) == before
    assert state.read_bytes() == record
