"""A running confined partition given a NIC and vCPUs by ``partition apply`` (rule 11),
inside the emulated VT-d server, and both taken back again; each change killed with SIGKILL
at a point it adds (``device-plugged``, ``device-unplugged``, ``cpu-plugged``,
``cpu-unplugged``, and ``live-changed`` of each of the four steps), then settled by
``status`` and the next ``apply``.  The points every step passes (``state-saved``,
``did-KIND``) are killed at for every kind of step by tests/test_live_qemu.py, with real
QEMU on the machine itself.
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
from partitioner.isolation.cgroup import cgroup_path, find_hierarchy
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
    """A NIC alone in its IOMMU group, on a NUMA node, free: (address, node); on the highest
    node that has one (the host keeps CPUs 0-1, on the lowest), for room to grow."""
    found = []
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
            found.append((f.numa_node, str(f.address)))
    assert found, "no e1000e alone in its IOMMU group on a NUMA node"
    node, address = max(found, key=lambda x: (x[0], [-ord(c) for c in x[1]]))
    return address, node


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
            'host:\n  accel: tcg\n  smt: share\n  isolation: full\n  reserve:\n    cpus: "0-1"\n'
            f"partitions:\n  {NAME}:\n"
            f"    cpus: {cpus}\n    min_cpus: 1\n    max_cpus: 3\n"
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
    log = Path(s.record()["paths"]["console_log"])
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


def vcpu_cgroup(tid: int) -> str:
    text = Path(f"/proc/{tid}/cgroup").read_text()
    return next((ln for ln in text.splitlines() if "/partition" in ln), text)


def check_matches_guest(s: Site, label: str, cpus: int, nic: bool) -> None:
    """The record says what QEMU says, and what the manifest asked; every vCPU present pinned
    and in its own cgroup; the NIC on vfio-pci while the guest has it, on e1000e after."""
    rec = s.record()
    assert rec["state"] == "running" and rec["live"] is None, (label, rec["state"], rec["live"])
    placement = rec["placement"]
    with Qmp(rec["paths"]["qmp"], timeout=60, partition=NAME) as qmp:
        view = observe(qmp)
    assert view.running, (label, "the guest is left paused")
    vcpus, functions = len(view.vcpus), set(view.vfio)
    assert len(placement["cpus"]) == vcpus == cpus, (label, placement["cpus"], vcpus)
    assert set(placement["devices"]) == functions == ({s.nic} if nic else set()), label
    aff = thread_affinities(ROOT, rec["pid"])
    threads = rec["vcpu_threads"]
    assert sorted(map(int, threads)) == list(range(cpus)), (label, threads)
    for i, tid in threads.items():
        assert aff[tid] == CpuSet([placement["cpus"][int(i)]]), (label, i, aff[tid])
        assert vcpu_cgroup(tid).endswith(f"/{NAME}/vcpu{i}"), (label, vcpu_cgroup(tid))
    h = find_hierarchy(ROOT)
    assert h is not None
    # No cgroup of a vCPU taken back is left behind, killed or not.
    children = sorted(n for n in os.listdir(cgroup_path(h, NAME)) if n.startswith("vcpu"))
    assert children == [f"vcpu{i}" for i in range(cpus)], (label, children)
    assert current_driver(ROOT, s.nic) == ("vfio-pci" if nic else "e1000e"), label
    chroot = Path(rec["paths"]["dir"]) / "root"
    assert bool(os.listdir(chroot)) == nic, (label, os.listdir(chroot))


def killed_then_settled(s: Site, to: Path, point: str, cpus: int, nic: bool) -> str:
    """``apply`` of ``to`` killed with SIGKILL at ``point`` (its first pass); ``status``
    answers; the next ``apply`` finishes the change, and the record matches the guest.
    Returns what the killed ``apply`` listed before it began (``plan``'s listing: each
    command here costs the nested server seconds)."""
    env = {**s.env, "PARTITION_TEST_KILL_AT": f"{point}:1"}
    cp = s.cli("apply", "--no-supervise", str(to), env=env)
    assert cp.returncode == -9, (point, cp.returncode, cp.stdout, cp.stderr)
    assert cp.stdout.startswith("applying:"), (point, cp.stdout)
    assert s.record()["live"] is not None, (point, "no intent in the record when killed")
    st = s.cli("--json", "status")
    assert st.returncode == 0, (point, st.stderr)
    shown = json.loads(st.stdout)["partitions"][NAME]["state"]
    # Killed with the guest paused for a new vCPU's pinning, status says so; apply lets it run.
    assert shown == ("paused" if point == "cpu-plugged" else "running"), (point, shown)
    s.apply(to)
    check_matches_guest(s, f"killed at {point}", cpus, nic)
    return " ".join(cp.stdout.split())


# One guest for the whole module, and an order QEMU 7.2 under TCG survives: every plug
# (device or vCPU) before the first vCPU unplug (docs/decisions.md).


def test_a_nic_is_attached_and_detached_live_and_killed_anywhere_settles(site: Site) -> None:
    one, one_nic = site.manifest(1, False), site.manifest(1, True)
    site.apply(one)
    pid = site.record()["pid"]
    guest_says(site, lambda c, p: c == 1 and NIC_ID not in p, "one vCPU, no NIC at start")

    said = site.apply(one_nic)
    assert f"attach-device lv {site.nic}" in said, said
    guest_says(site, lambda c, p: NIC_ID in p, "the NIC in the guest")
    check_matches_guest(site, "after attach-device", 1, True)

    # SIGKILL at each point a live attach or detach passes first, then settled.
    said = killed_then_settled(site, one, "device-unplugged", 1, False)
    assert f"detach-device lv {site.nic}" in said, said
    guest_says(site, lambda c, p: NIC_ID not in p, "the NIC gone from the guest")
    killed_then_settled(site, one_nic, "device-plugged", 1, True)
    killed_then_settled(site, one, "live-changed", 1, False)
    killed_then_settled(site, one_nic, "live-changed", 1, True)
    said = site.apply(one)
    guest_says(site, lambda c, p: NIC_ID not in p, "the NIC given back")
    check_matches_guest(site, "after detach-device", 1, False)
    assert site.record()["pid"] == pid  # one guest throughout: every change was live


def test_vcpus_are_added_and_taken_live_and_killed_anywhere_settle(site: Site) -> None:
    """1 -> 2 -> 3 vCPUs, then 3 -> 2 -> 1: every plug before the first unplug."""
    pid = site.record()["pid"]
    said = killed_then_settled(site, site.manifest(2, False), "cpu-plugged", 2, False)
    assert re.search(r"add-cpus lv 1 -> 2 \(CPUs \d+, pinned\)", said), said
    guest_says(site, lambda c, p: c == 2, "the added vCPU online")
    said = killed_then_settled(site, site.manifest(3, False), "live-changed", 3, False)
    assert re.search(r"add-cpus lv 2 -> 3 \(CPUs \d+, pinned\)", said), said
    guest_says(site, lambda c, p: c == 3, "the third vCPU online")
    cpus = site.record()["placement"]["cpus"]
    assert len(set(cpus)) == 3, cpus

    said = killed_then_settled(site, site.manifest(2, False), "cpu-unplugged", 2, False)
    assert f"remove-cpus lv 3 -> 2 (CPUs {cpus[2]} given back)" in said, said
    guest_says(site, lambda c, p: c == 2, "the third vCPU gone from the guest")
    said = killed_then_settled(site, site.manifest(1, False), "live-changed", 1, False)
    assert f"remove-cpus lv 2 -> 1 (CPUs {cpus[1]} given back)" in said, said
    guest_says(site, lambda c, p: c == 1, "one vCPU left in the guest")
    assert site.record()["placement"]["cpus"] == cpus[:1]
    assert site.record()["pid"] == pid  # one guest throughout
