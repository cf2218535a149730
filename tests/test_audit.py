"""``partition audit`` against trees: the fake scheduler's host after isolation, then drifted.

Each drift is made the way it happens on a host (a process pins itself, an
interrupt is moved back, a device is unbound, irqbalance runs) and the audit
must name it; what the kernel refuses to move is named but is not drift.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fakesched import NIC, WQ, SchedKernel, small_host
from test_isolation import GUESTS, LAYOUT

from partitioner.audit import BOOT, DRIFT, Audit, audit
from partitioner.cpuset import CpuSet
from partitioner.inventory import scan
from partitioner.isolation.runtime import isolate, load_record
from partitioner.kernel.root import HostRoot
from partitioner.manifest.loader import loads
from partitioner.pci import PciAddress
from partitioner.planning.model import DeviceAssignment
from partitioner.planning.planner import plan
from partitioner.record.model import PartitionRecord, RunState, State
from partitioner.record.store import StateStore

TESTBED_NUMA = Path(__file__).resolve().parent / "fixtures" / "hosts" / "testbed-numa"
PROJECT = Path(__file__).resolve().parents[1]


def _state(*, hugepages: bool = False) -> State:
    m = loads(
        textwrap.dedent(
            """\
            version: 1
            host: {reserve: {cpus: "0"}, accel: tcg, smt: share}
            partitions:
              fw0: {cpus: "2-3", memory: 128MiB, hugepages: %s}
            """
            % ("2MiB" if hugepages else "none")
        ),
        file="site.yaml",
    )
    p = plan(m, scan(HostRoot(TESTBED_NUMA))).placements["fw0"]
    nic = DeviceAssignment(PciAddress.parse(NIC), 7, "8086:10d3", "e1000e", False, "named")
    p = dataclasses.replace(p, devices=(nic,))
    rec = PartitionRecord("fw0", RunState.RUNNING, p, pid=500, vcpu_threads={0: 501, 1: 502})
    return State().with_partition(rec)


def _bind(k: SchedKernel, driver: str) -> None:
    dev = k.path(f"/sys/bus/pci/devices/{NIC}")
    dev.mkdir(parents=True, exist_ok=True)
    drv = k.path(f"/sys/bus/pci/drivers/{driver}")
    drv.mkdir(parents=True, exist_ok=True)
    link = dev / "driver"
    if link.is_symlink():
        link.unlink()
    link.symlink_to(os.path.relpath(drv, dev))


@pytest.fixture
def isolated(tmp_path: Path) -> tuple[SchedKernel, Path]:
    k = small_host(tmp_path / "host")
    _bind(k, "vfio-pci")
    isolate(k, LAYOUT, GUESTS, tmp_path / "state")
    return k, tmp_path / "state"


def _run(k: SchedKernel, state_dir: Path, state: State | None = None) -> Audit:
    return audit(k, state or _state(), load_record(state_dir))


def _drift(a: Audit) -> list[str]:
    return [f"{f.kind}: {f.resource}" for f in a.findings if f.status == DRIFT]


def test_an_isolated_host_is_clean_and_what_only_boot_can_fix_is_named(
    isolated: tuple[SchedKernel, Path],
) -> None:
    a = _run(*isolated)
    assert _drift(a) == []
    boot = {f.resource for f in a.findings if f.status == BOOT}
    assert "kernel thread 20 (ksoftirqd/2)" in boot
    assert "interrupt 50 (nvme0q2)" in boot
    assert "CPUs 2-3" in boot  # no isolcpus/nohz_full yet
    assert a.partitions["fw0"]["isolation"] == "full"


def test_a_stray_process_pinned_to_a_partition_cpu_is_drift_naming_it(
    isolated: tuple[SchedKernel, Path],
) -> None:
    k, d = isolated
    k.task(600, "stray", "3")
    a = _run(k, d)
    assert _drift(a) == ["task: task 600 (stray)"]
    [f] = [f for f in a.findings if f.status == DRIFT]
    assert f.ids["tid"] == 600 and f.ids["cpus"] == [3]


def test_each_kind_of_drift_is_named(isolated: tuple[SchedKernel, Path]) -> None:
    k, d = isolated
    k.sched_setaffinity(501, CpuSet([0, 2]))  # a vCPU allowed off its CPU
    k.sched_setaffinity(500, CpuSet([0, 3]))  # an emulator thread onto the partition
    k.write("/proc/irq/24/smp_affinity_list", "2")  # a host interrupt moved back
    k.write("/proc/irq/40/smp_affinity_list", "0")  # the partition's NIC interrupt moved away
    k.write(WQ, "f")
    _bind(k, "e1000e")
    assert sorted(_drift(_run(k, d))) == [
        "device: 0000:81:00.0",
        "emulator: emulator thread 500 (qemu-fw0)",
        "irq: interrupt 24 (ahci[0000:00:1f.2])",
        "irq: interrupt 40 (vfio-msix[0](0000:81:00.0))",
        "vcpu: vCPU 0 thread 501",
        "workqueue: unbound workqueue cpumask",
    ]


def test_an_interrupt_with_no_handler_is_not_drift(isolated: tuple[SchedKernel, Path]) -> None:
    k, d = isolated
    k.irq(40, "2", "")  # the NIC's vector between a guest reset's free and its request again
    k.irq(24, "2", "")  # a host line whose driver freed it
    assert _drift(_run(k, d)) == []
    k.irq(24, "2", "ahci[0000:00:1f.2]")  # requested again where it was left: drift again
    assert _drift(_run(k, d)) == ["irq: interrupt 24 (ahci[0000:00:1f.2])"]


def test_irqbalance_without_the_partition_cpus_banned_is_drift(
    isolated: tuple[SchedKernel, Path],
) -> None:
    k, d = isolated
    k.task(700, "irqbalance", "0")
    [f] = [f for f in _run(k, d).findings if f.status == DRIFT]
    assert f.kind == "irqbalance" and "IRQBALANCE_BANNED_CPULIST=2-3" in f.action
    k.path("/etc/default").mkdir(parents=True)
    k.path("/etc/default/irqbalance").write_text('IRQBALANCE_BANNED_CPULIST="2-3"\n')
    assert _drift(_run(k, d)) == []


def test_memory_off_its_node_or_page_size_is_drift(isolated: tuple[SchedKernel, Path]) -> None:
    k, d = isolated
    state = _state(hugepages=True)
    node = state.partitions["fw0"].placement.numa_nodes[0]
    maps = k.path("/proc/500/numa_maps")
    maps.write_text(
        f"7f00 bind:{node} file=/dev/hugepages/x huge dirty=64 N{node}=64 kernelpagesize_kB=2048\n"
    )
    assert _drift(_run(k, d, state)) == []
    maps.write_text(
        f"7f00 bind:{node} file=/dev/hugepages/x huge dirty=64 N{1 - node}=64 kernelpagesize_kB=2048\n"
    )
    assert _drift(_run(k, d, state)) == ["memory: guest memory"]
    maps.write_text(f"7f00 default anon=32768 dirty=32768 N{node}=32768 kernelpagesize_kB=4\n")
    [f] = [f for f in _run(k, d, state).findings if f.status == DRIFT]
    assert "2MiB pages" in f.detail


def test_a_pinned_site_does_not_call_host_work_drift(tmp_path: Path) -> None:
    k = small_host(tmp_path / "host")
    _bind(k, "vfio-pci")
    a = audit(k, _state(), None)
    assert a.partitions["fw0"]["isolation"] == "pinned"
    assert _drift(a) == []


def test_the_verb_exits_3_on_drift_with_one_json_document(
    isolated: tuple[SchedKernel, Path],
) -> None:
    k, d = isolated
    k.path("/proc/500/cmdline").write_bytes(b"qemu-system-x86_64\0-name\0fw0,debug-threads=on\0")
    StateStore(d).save(_state())
    argv = [
        sys.executable,
        "-m",
        "partitioner.cli.main",
        "--host-root",
        str(k.root),
        "--state-dir",
        str(d),
    ]
    cp = subprocess.run([*argv, "--json", "audit"], capture_output=True, text=True, cwd=PROJECT)
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)
    assert doc["clean"] is True and doc["partitions"]["fw0"]["cpus"] == [2, 3]
    k.task(600, "stray", "2-3")
    cp = subprocess.run([*argv, "audit", "fw0"], capture_output=True, text=True, cwd=PROJECT)
    assert cp.returncode == 3, cp.stderr
    assert "stray" in cp.stdout and "1 drifted" in cp.stdout
    cp = subprocess.run([*argv, "--json", "audit"], capture_output=True, text=True, cwd=PROJECT)
    assert cp.returncode == 3
    doc = json.loads(cp.stdout)
    assert doc["ok"] is False and doc["exit"] == 3 and doc["drift"] == 1
    [f] = [f for f in doc["findings"] if f["status"] == "drift"]
    assert f["tid"] == 600 and f["partition"] == "fw0"
    cp = subprocess.run([*argv, "audit", "nope"], capture_output=True, text=True, cwd=PROJECT)
    assert cp.returncode == 2 and "no partition nope" in cp.stderr
    assert errno.EIO  # the fixture's kernel refuses interrupts 0 and 50 with EIO
