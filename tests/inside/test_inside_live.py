"""A running confined partition given a vCPU and a NIC by ``partition apply`` and relieved of
them again (rule 11), inside the emulated VT-d server; each change also killed with SIGKILL
at the points it passes, then settled by ``status`` and ``apply``.

Run by tests/test_inside.py.  One nested guest (TCG inside the TCG server) serves every
case: it says ``partition-guest: cpus=N memtotal_kb=M pci=...`` on its console whenever
its vCPUs, memory or PCI functions change (``partitioner.testbed.guestimage``).  What is
checked is read from the kernel (thread affinities, cgroup membership, drivers, the QEMU's
root) and from QEMU itself (``query-cpus-fast``, its vfio-pci devices).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from guestimage import build_guest_initramfs, guest_kernel

from partitioner.cpuset import CpuSet
from partitioner.guest.launch import thread_affinities
from partitioner.guest.qmp import Qmp
from partitioner.guest.view import observe
from partitioner.inventory import scan
from partitioner.inventory.model import Host
from partitioner.kernel.root import HostRoot
from partitioner.vfio.claim import current_driver

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or not os.path.isdir("/sys/kernel/iommu_groups/0"),
        reason="runs inside the emulated VT-d server (root, IOMMU groups)",
    ),
    pytest.mark.incremental,
]

ROOT = HostRoot("/")
PROJECT = Path(__file__).resolve().parents[2]
NAME = "lv"
NIC_ID = "8086:10d3"
TIMEOUT = 900.0  # a TCG guest inside a TCG server on two shared cores
MARK = re.compile(r"partition-guest: cpus=(\d+) memtotal_kb=(\d+) pci=(\S*)")


def lone_e1000e(host: Host) -> tuple[str, int]:
    """A NIC alone in its IOMMU group, on a NUMA node, free: (address, node)."""
    for g in sorted(host.iommu_groups):
        ends = [host.pci[a] for a in host.iommu_groups[g].members if not host.pci[a].is_bridge]
        f = ends[0] if len(ends) == 1 else None
        if (
            f is not None
            and f.id == NIC_ID
            and f.driver == "e1000e"
            and f.numa_node is not None
            and f.address not in host.in_use
        ):
            return str(f.address), f.numa_node
    raise AssertionError("no e1000e alone in its IOMMU group on a NUMA node")


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
        self.nic, self.node = lone_e1000e(scan(ROOT))

    def manifest(self, cpus: int, nic: bool) -> Path:
        path = self.tmp / f"lv-{cpus}-{int(nic)}.yaml"
        devices = f'    devices:\n      - pci: "{self.nic}"\n' if nic else ""
        path.write_text(
            "version: 1\n"
            "host:\n  accel: tcg\n  smt: share\n  isolation: full\n"
            f"partitions:\n  {NAME}:\n"
            f"    cpus: {cpus}\n    min_cpus: 1\n    max_cpus: 2\n"
            f"    memory: 128MiB\n    hugepages: 2MiB\n    numa: {self.node}\n"
            "    hotplug_slots: 1\n" + devices + f"    boot:\n      kernel: {self.kernel}\n"
            f"      initrd: {self.initrd}\n      cmdline: console=ttyS0 quiet panic=-1\n"
        )
        return path

    def cli(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "partitioner.cli.main", *args],
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            cwd=PROJECT,
        )

    def apply(self, m: Path) -> str:
        cp = self.cli("apply", "--no-supervise", str(m))
        assert cp.returncode == 0, (m.name, cp.stdout, cp.stderr)
        return " ".join(cp.stdout.split())

    def status(self) -> dict[str, Any]:
        cp = self.cli("--json", "status")
        assert cp.returncode == 0, cp.stderr
        doc: dict[str, Any] = json.loads(cp.stdout)["partitions"][NAME]
        return doc

    def record(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.tmp / "state" / "state.json").read_text())
        return doc["partitions"][NAME]


@pytest.fixture(scope="module")
def site(nic_drivers: None, testbed_out: Path) -> Iterator[Site]:
    # On the server's /tmp: a tmpfs without nodev, as a confined root receiving devices needs.
    tmp = Path(tempfile.mkdtemp(prefix="partition-live-"))
    s = Site(tmp)
    try:
        yield s
    finally:
        # What the guest said and what the record held, kept in the testbed's output.
        for src, name in ((tmp / "log", "live-log"), (tmp / "state", "live-state")):
            if src.is_dir():
                shutil.copytree(src, testbed_out / name, dirs_exist_ok=True)
        if (tmp / "state" / "state.json").exists():
            s.cli("destroy", "--all", "--timeout", "5")
        shutil.rmtree(tmp, ignore_errors=True)


def guest_says(s: Site, want: Any, what: str) -> tuple[int, str]:
    """Wait until the guest's last report satisfies ``want(cpus, pci)``."""
    log = Path(s.status()["console_log"])
    deadline = time.monotonic() + TIMEOUT
    last: tuple[int, str] | None = None
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        seen = MARK.findall(text)
        if seen:
            last = (int(seen[-1][0]), seen[-1][2])
            if want(*last):
                return last
        time.sleep(2)
    raise AssertionError(f"{what}: the guest last said {last}")


def truth(s: Site) -> tuple[int, set[str]]:
    """What QEMU says the guest has: vCPUs present, host functions of its vfio-pci devices."""
    with Qmp(s.record()["paths"]["qmp"], timeout=60, partition=NAME) as qmp:
        view = observe(qmp)
    return len(view.vcpus), set(view.vfio)


def vcpu_cgroup(tid: int) -> str:
    text = Path(f"/proc/{tid}/cgroup").read_text()
    return next((ln for ln in text.splitlines() if "/partition" in ln), text)


def check_matches_guest(s: Site, label: str) -> None:
    """The record says what QEMU says; every vCPU present pinned and in its own cgroup."""
    st = s.status()
    assert st["state"] == "running", label
    vcpus, functions = truth(s)
    assert len(st["cpus"]) == vcpus, (label, st["cpus"], vcpus)
    assert set(st["devices"]) == functions, (label, st["devices"], functions)
    aff = thread_affinities(ROOT, st["pid"])
    for i, tid in st["vcpu_threads"].items():
        assert aff[tid] == CpuSet([st["cpus"][int(i)]]), (label, i, aff[tid])
        assert vcpu_cgroup(tid).endswith(f"/{NAME}/vcpu{i}"), (label, vcpu_cgroup(tid))
    assert s.record()["live"] is None, label


def test_a_vcpu_and_a_nic_are_added_and_taken_live(site: Site) -> None:
    base, two, with_nic = site.manifest(1, False), site.manifest(2, False), site.manifest(2, True)
    site.apply(base)
    pid = site.status()["pid"]
    guest_says(site, lambda c, p: c == 1, "one vCPU at start")

    said = site.apply(two)
    assert re.search(r"add-cpus lv 1 -> 2 \(CPUs \d+, pinned\)", said), said
    st = site.status()
    assert st["pid"] == pid and len(st["cpus"]) == 2
    assert st["bounds"]["max_cpus"] == 2
    guest_says(site, lambda c, p: c == 2, "the added vCPU online")
    check_matches_guest(site, "after add-cpus")

    said = site.apply(with_nic)
    assert f"attach-device lv {site.nic}" in said, said
    assert current_driver(ROOT, site.nic) == "vfio-pci"
    guest_says(site, lambda c, p: NIC_ID in p, "the NIC in the guest")
    chroot = Path(site.record()["paths"]["dir"]) / "root"
    assert os.listdir(chroot), "the NIC's nodes were exposed in the confined root"
    check_matches_guest(site, "after attach-device")

    said = site.apply(two)
    assert f"detach-device lv {site.nic}" in said, said
    guest_says(site, lambda c, p: NIC_ID not in p, "the NIC gone from the guest")
    assert current_driver(ROOT, site.nic) == "e1000e"
    assert os.listdir(chroot) == []
    check_matches_guest(site, "after detach-device")

    assert site.status()["pid"] == pid  # one guest throughout: every change was live
    # A vCPU is taken back last (test_the_vcpu_is_taken_back...): QEMU 7.2 under TCG may
    # crash on a device plugged after a vCPU unplug (docs/decisions.md).


def points(site: Site, m: Path) -> list[tuple[str, int]]:
    """Every kill point one apply of ``m`` passes (the new ones of live changes), in order."""
    listing = site.tmp / "points"
    listing.unlink(missing_ok=True)
    env = {**site.env, "PARTITION_TEST_KILL_LIST": str(listing)}
    cp = site.cli("apply", "--no-supervise", str(m), env=env)
    assert cp.returncode == 0, cp.stderr
    seen: Counter[str] = Counter()
    out = []
    for n in listing.read_text().split():
        seen[n] += 1
        out.append((n, seen[n]))
    return out


@pytest.mark.parametrize(
    ("start", "change", "new"),
    [
        ((2, False), (2, True), {"device-plugged", "live-changed"}),
        ((2, True), (2, False), {"device-unplugged", "live-changed"}),
        ((2, False), (1, False), {"cpu-unplugged", "live-changed"}),
        ((1, False), (2, False), {"cpu-plugged", "live-changed"}),
    ],
    ids=["attach-device", "detach-device", "remove-cpus", "add-cpus"],
)
def test_a_live_change_killed_anywhere_is_settled_to_what_the_guest_has(
    site: Site, start: tuple[int, bool], change: tuple[int, bool], new: set[str]
) -> None:
    """Every point of the change, SIGKILL there; ``status`` answers; the next ``apply``
    makes it, and the record, the pinning and the cgroup match what QEMU says.  (Points
    every step passes, ``state-saved`` and ``did-KIND``, are covered for each kind of step
    by tests/test_crash_qemu.py and tests/test_live_qemu.py on the machine itself.)"""
    first, target = site.manifest(*start), site.manifest(*change)
    site.apply(first)
    listed = points(site, target)
    assert new <= {n for n, _ in listed}, listed
    for name, n in [(n, k) for n, k in listed if n in new]:
        site.apply(first)
        env = {**site.env, "PARTITION_TEST_KILL_AT": f"{name}:{n}"}
        cp = site.cli("apply", "--no-supervise", str(target), env=env)
        assert cp.returncode == -9, (name, n, cp.returncode, cp.stderr)
        st = site.cli("--json", "status")
        assert st.returncode == 0, (name, st.stderr)
        site.apply(target)
        check_matches_guest(site, f"killed at {name}:{n}")


def test_the_vcpu_is_taken_back_and_a_change_beyond_the_bounds_asks_for_replace(
    site: Site,
) -> None:
    site.apply(site.manifest(2, False))
    pid = site.status()["pid"]
    said = site.apply(site.manifest(1, False))
    assert re.search(r"remove-cpus lv 2 -> 1 \(CPUs \d+ given back\)", said), said
    guest_says(site, lambda c, p: c == 1, "the vCPU taken back")
    check_matches_guest(site, "after remove-cpus")
    assert site.status()["pid"] == pid
    over = site.manifest(2, False).read_text().replace("max_cpus: 2", "max_cpus: 3")
    (site.tmp / "over.yaml").write_text(over)
    cp = site.cli("plan", str(site.tmp / "over.yaml"))
    assert "needs --replace lv" in cp.stdout + cp.stderr, cp.stdout + cp.stderr
