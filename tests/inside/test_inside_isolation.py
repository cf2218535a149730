"""``isolation: full`` for real, INSIDE the emulated server, where every process is the project's.

One TCG partition on CPU 1 with CPU 0 reserved: after ``apply`` every movable task,
the unbound workqueue mask and every movable interrupt is off CPU 1, ``audit``
exits 0, a stray process that pins itself to CPU 1 makes it exit 3 naming it,
and ``destroy`` puts every affinity and mask back (a process started before
``apply`` on every CPU is on every CPU again).  An ``apply`` killed midway and
run again still ends clean.  A partition that owns a NIC has the NIC's vfio
interrupt on its own CPU and every other movable interrupt off it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from guestimage import build_guest_initramfs, guest_kernel

from partitioner.cpuset import CpuSet
from partitioner.isolation.cgroup import cgroup_path, find_hierarchy, members
from partitioner.isolation.view import read_host_work
from partitioner.kernel.root import HostRoot

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.isdir("/sys/kernel/iommu_groups/0"),
    reason="runs inside the emulated VT-d server (root, IOMMU groups)",
)

ROOT = HostRoot("/")
PROJECT = Path(__file__).resolve().parents[2]
PART = CpuSet([1])
NIC = "0000:81:00.0"  # the numa preset's e1000e alone in its group on node 1


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

    def manifest(self, cpus: str = "1", reserve: str = "0", device: str | None = None) -> Path:
        # 128MiB: with less, the guest kernel fails before its console and the guest resets
        # over and over, and each reset frees and requests its devices' interrupts again.
        path = self.tmp / "site.yaml"
        dev = f'    devices:\n      - pci: "{device}"\n' if device else ""
        path.write_text(
            "version: 1\n"
            f'host:\n  reserve:\n    cpus: "{reserve}"\n    memory: 256MiB\n'
            "  accel: tcg\n  smt: share\n  isolation: full\n"
            f'partitions:\n  iso:\n    cpus: "{cpus}"\n    memory: 128MiB\n    hugepages: none\n'
            + dev
            + f"    boot:\n      kernel: {self.kernel}\n      initrd: {self.initrd}\n"
            "      cmdline: console=ttyS0 quiet panic=-1\n"
        )
        return path

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "partitioner.cli.main", *args]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args), env=self.env, capture_output=True, text=True, timeout=900, cwd=PROJECT
        )


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    yield s
    if (tmp_path / "state" / "state.json").exists():
        s.cli("destroy", "--all", "--timeout", "5")


def host_settings(but_irqs: frozenset[int] = frozenset()) -> dict[str, str]:
    """Every affinity and mask isolation may change: movable tasks by (tid, start), interrupts
    (less ``but_irqs``), masks.  Tasks the kernel keeps (PF_NO_SETAFFINITY: a workqueue's
    rescuer binds itself to each CPU it rescues work on) are the kernel's to move, not ours."""
    w = read_host_work(ROOT)
    out = {f"task {t.tid}:{t.starttime} {t.comm}": str(t.allowed) for t in w.tasks if t.movable}
    out.update({f"irq {i.irq}": str(i.affinity) for i in w.irqs if i.irq not in but_irqs})
    out["workqueue"] = str(w.workqueue_mask)
    out["default_smp_affinity"] = str(w.default_irq_affinity)
    return out


def still_there(before: dict[str, str], after: dict[str, str]) -> dict[str, tuple[str, str]]:
    """What differs among the things present both times (tasks come and go meanwhile)."""
    return {k: (v, after[k]) for k, v in before.items() if k in after and after[k] != v}


def on_partition_cpus(site: Site, own: frozenset[int] = frozenset()) -> list[str]:
    """Movable host work still allowed on CPU 1: tasks (not the partition's QEMU), masks, and
    interrupts the kernel did not refuse to move, less the partition's own interrupts ``own``."""
    doc = json.loads((site.tmp / "state" / "isolation.json").read_text())
    refused = {int(r["id"]) for r in doc["refused"] if r["kind"] == "irq"}
    qemu = json.loads(site.cli("--json", "status").stdout)["partitions"]["iso"]["pid"]
    w = read_host_work(ROOT)
    bad = [
        f"task {t.tid} ({t.comm}) on {t.allowed}"
        for t in w.tasks
        if t.movable and t.pid != qemu and not t.allowed.isdisjoint(PART)
    ]
    bad += [
        f"irq {i.irq} ({i.owner}) on {i.affinity}"
        for i in w.irqs
        if i.irq not in refused | own
        and not i.affinity.isdisjoint(PART)
        and i.vfio_device() is None
    ]
    for name, m in (
        ("workqueue", w.workqueue_mask),
        ("default_smp_affinity", w.default_irq_affinity),
    ):
        if m is not None and not m.isdisjoint(PART):
            bad.append(f"{name} {m}")
    return bad


def test_full_isolation_audit_stray_destroy_and_a_killed_apply(site: Site) -> None:
    online = CpuSet.parse(ROOT.read("/sys/devices/system/cpu/online") or "")
    sleeper = subprocess.Popen(["sleep", "3600"])
    os.sched_setaffinity(sleeper.pid, online.as_list())
    try:
        before = host_settings()
        m = site.manifest()
        cp = site.cli("apply", str(m))
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert on_partition_cpus(site) == []
        assert CpuSet(os.sched_getaffinity(sleeper.pid)) == CpuSet([0])
        # Its QEMU in a cgroup of its own (v2 here, threaded): vCPU and emulator apart.
        h = find_hierarchy(ROOT)
        assert h is not None and h.v2 and h.cpuset
        st = json.loads(site.cli("--json", "status").stdout)["partitions"]["iso"]
        got = members(ROOT, cgroup_path(h, "iso"))
        threads = {int(t) for t in os.listdir(f"/proc/{st['pid']}/task")}
        assert got["vcpu0"] == {st["vcpu_threads"]["0"]}
        assert got["emulator"] == threads - got["vcpu0"]
        audit = site.cli("audit")
        assert audit.returncode == 0, audit.stdout + audit.stderr

        stray = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import ctypes, os, time\n"
                "ctypes.CDLL(None).prctl(15, b'stray-pinner')\n"  # PR_SET_NAME
                "os.sched_setaffinity(0, {1})\nprint('pinned', flush=True)\ntime.sleep(600)\n",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert stray.stdout is not None and stray.stdout.readline().strip() == "pinned"
            audit = site.cli("audit")
            assert audit.returncode == 3, audit.stdout + audit.stderr
            assert "stray-pinner" in audit.stdout
        finally:
            stray.kill()
            stray.wait()

        cp = site.cli("destroy", "--all", "--timeout", "5")
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert CpuSet(os.sched_getaffinity(sleeper.pid)) == online
        assert still_there(before, host_settings()) == {}
        assert not (site.tmp / "state" / "isolation.json").exists()
        assert not ROOT.exists(cgroup_path(h, "iso"))

        # An apply killed once its isolation record is written (moves half done), then again.
        p = subprocess.Popen(site.argv("apply", str(m)), env=site.env, cwd=PROJECT)
        record = site.tmp / "state" / "isolation.json"
        deadline = time.monotonic() + 600
        while not record.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
        p.wait()
        cp = site.cli("apply", str(m))
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert on_partition_cpus(site) == []
        assert site.cli("audit").returncode == 0
        cp = site.cli("destroy", "--all", "--timeout", "5")
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert CpuSet(os.sched_getaffinity(sleeper.pid)) == online
        assert still_there(before, host_settings()) == {}
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_partitions_nic_interrupt_goes_to_its_cpu_and_others_stay_off(site: Site) -> None:
    if not ROOT.exists(f"/sys/bus/pci/devices/{NIC}"):
        pytest.skip(f"no {NIC} in this topology")
    before = host_settings()
    # This test starts the supervisor itself, below, once it has seen the drift audit names.
    cp = site.cli("apply", "--no-supervise", str(site.manifest(device=NIC)))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    # QEMU enables the NIC's INTx when it realizes the device, and again after each reset of
    # the guest (a reset frees the handler for a moment: the line is then listed with none).
    deadline = time.monotonic() + 60
    vfio = [i for i in read_host_work(ROOT).irqs if i.vfio_device() == NIC]
    while not vfio and time.monotonic() < deadline:
        time.sleep(0.1)
        vfio = [i for i in read_host_work(ROOT).irqs if i.vfio_device() == NIC]
    assert vfio, "no vfio interrupt of the partition's NIC"
    # Requesting an interrupt sets its affinity up anew (the device's node): the kernel's change,
    # made before isolation recorded it, so those numbers are left out of the comparison below.
    nics = frozenset(i.irq for i in vfio)
    for i in vfio:
        assert i.affinity == PART, f"irq {i.irq} ({i.owner}) on {i.affinity}"
    # Every other interrupt off CPU 1; the NIC's own lines are judged above, handler or not.
    assert on_partition_cpus(site, own=nics) == []
    audit = site.cli("--json", "audit")
    assert audit.returncode == 0, audit.stdout + audit.stderr

    # A vector of the NIC off its CPU, as one asked for after apply lands (on
    # default_smp_affinity, the reserve) or as irqbalance would leave it: audit names it, and
    # the supervisor puts it back on its next look.
    [line] = sorted(nics)[:1]
    ROOT.write(f"/proc/irq/{line}/smp_affinity_list", "0")
    audit = site.cli("--json", "audit")
    assert audit.returncode == 3, audit.stdout + audit.stderr
    assert [f["irq"] for f in json.loads(audit.stdout)["findings"] if f["status"] == "drift"] == [
        line
    ]
    log = (site.tmp / "supervisor.log").open("wb")
    sup = subprocess.Popen(
        site.argv("host", "supervise", "--poll", "0.2", "-v"), env=site.env, cwd=PROJECT,
        stdout=log, stderr=log,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (
            ROOT.read(f"/proc/irq/{line}/smp_affinity_list") or ""
        ).strip() != str(PART):
            time.sleep(0.1)
        assert (ROOT.read(f"/proc/irq/{line}/smp_affinity_list") or "").strip() == str(PART), (
            site.tmp / "supervisor.log"
        ).read_text(errors="replace")
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(timeout=60)
    assert sup.returncode == 0, (site.tmp / "supervisor.log").read_text(errors="replace")
    assert "steered" in (site.tmp / "supervisor.log").read_text(errors="replace")
    audit = site.cli("--json", "audit")
    assert audit.returncode == 0, audit.stdout + audit.stderr

    cp = site.cli("destroy", "--all", "--timeout", "5")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert still_there(before, host_settings(nics)) == {}
