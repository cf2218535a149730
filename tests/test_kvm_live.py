"""The KVM command line, accepted by this machine's real QEMU and KVM, paused and pinned.

Where /dev/kvm exists, a partition's KVM command line (every dedicated-CPU
setting this QEMU and KVM offer, a 64-bit PCI window for large BARs) is started
paused (``-S``), its vCPU thread pinned, and QMP asked what QEMU made of it; then
QEMU is told to quit.  No guest runs: the nested KVM of this test machine
cannot run a stock guest kernel.

That KVM also refuses the IA32_ARCH_CAPABILITIES value it reports itself, and
QEMU's ``-cpu host`` aborts on it ("failed to set MSR 0x10a").  The KVM probe
(``guest/kvm.py``) detects exactly that; where it does, and only then, this test
adds ``arch-capabilities=off`` to ``-cpu`` (the one CPU feature such a KVM
cannot set), and a second test shows that QEMU aborts without it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from partitioner.cpuset import CpuSet
from partitioner.errors import GuestError
from partitioner.guest.argv import guest_paths, qemu_argv
from partitioner.guest.caps import QemuCaps, probe_qemu
from partitioner.guest.launch import kill, thread_affinities
from partitioner.guest.qmp import Qmp
from partitioner.kernel.root import HostRoot
from partitioner.manifest.model import PartitionSpec
from partitioner.planning.model import Placement, Plan
from partitioner.run import run, spawn
from partitioner.units import GiB, MiB

pytestmark = pytest.mark.qemu

ROOT = HostRoot("/")
GUEST_CPU = 1


@pytest.fixture(scope="module")
def caps() -> QemuCaps:
    if not Path("/dev/kvm").exists():
        pytest.skip("no /dev/kvm on this machine")
    if os.geteuid() != 0:
        pytest.skip("needs root: /dev/kvm, mem-lock, pinning")
    if GUEST_CPU not in os.sched_getaffinity(0):
        pytest.skip(f"needs CPU {GUEST_CPU}")
    try:
        c = probe_qemu()
    except GuestError as e:
        pytest.skip(str(e))
    assert c.kvm is not None and c.kvm.available, c.kvm
    return c


def _placement() -> Placement:
    spec = PartitionSpec(
        name="k1",
        cpu_count=1,
        cpu_list=None,
        memory_bytes=128 * MiB,
        hugepage_bytes=None,
        numa="auto",
    )
    return Placement(
        name="k1",
        cpus=(GUEST_CPU,),
        sockets=1,
        cores=1,
        threads=1,
        numa_nodes=(0,),
        memory_per_node=((0, 128 * MiB),),
        hugepage_bytes=None,
        devices=(),
        spec=spec,
        pci_hole64_bytes=512 * GiB,
        host_cache_info=True,
    )


def _kvm_argv(caps: QemuCaps, tmp_path: Path) -> tuple[list[str], Path]:
    p = _placement()
    plan = Plan("kvm", "isolate", CpuSet([0]), GiB, {"k1": p})
    paths = guest_paths(tmp_path / "run", tmp_path / "log", "k1", state_dir=tmp_path / "state")
    paths.dir.mkdir(mode=0o700, parents=True)
    paths.console_log.parent.mkdir(parents=True)
    return qemu_argv(p, plan, paths, caps), paths.qmp


def _qmp(socket: Path, proc_pid: int) -> Qmp:
    deadline = time.monotonic() + 60
    while not socket.exists():
        if time.monotonic() > deadline or not Path(f"/proc/{proc_pid}").exists():
            raise AssertionError("QEMU did not open its QMP socket")
        time.sleep(0.05)
    q = Qmp(socket, timeout=30, partition="k1")
    q.connect()
    return q


def test_kvm_command_line_is_accepted_paused_and_pinned(caps: QemuCaps, tmp_path: Path) -> None:
    argv, socket = _kvm_argv(caps, tmp_path)
    i = argv.index("-cpu") + 1
    assert argv[i].startswith("host,")
    assert caps.kvm is not None
    if caps.kvm.arch_capabilities_settable is False:
        # This KVM cannot set IA32_ARCH_CAPABILITIES (see the module docstring).
        argv[i] += ",arch-capabilities=off"
    assert argv[-1] == "-S"
    out = os.open(tmp_path / "qemu.out", os.O_WRONLY | os.O_CREAT, 0o600)
    proc = spawn(argv, stdout=out)
    os.close(out)
    try:
        with _qmp(socket, proc.pid) as q:
            assert q.status() == "prelaunch"  # -S: nothing has run
            assert q.execute("query-kvm") == {"enabled": True, "present": True}
            vcpus = q.vcpu_threads()
            assert list(vcpus) == [0]
            os.sched_setaffinity(vcpus[0], {GUEST_CPU})
            assert thread_affinities(ROOT, proc.pid)[vcpus[0]] == CpuSet([GUEST_CPU])
            path = q.execute("query-cpus-fast")[0]["qom-path"]
            got = {
                prop: q.execute("qom-get", {"path": path, "property": prop})
                for prop in (
                    "migratable",
                    "host-phys-bits",
                    "kvm-hint-dedicated",
                    "host-cache-info",
                )
                if prop in caps.cpu_props
            }
            want = {
                "migratable": False,
                "host-phys-bits": True,
                "kvm-hint-dedicated": True,
                "host-cache-info": True,
            }
            assert got == {k: want[k] for k in got}
            hole = q.execute("qom-get", {"path": "/machine/q35", "property": "pci-hole64-size"})
            assert hole == 512 * GiB
            over = [a for a in argv if a.startswith("mem-lock=on")]
            assert over == (
                ["mem-lock=on,cpu-pm=on"]
                if caps.kvm.can_keep_hlt and caps.cpu_pm
                else ["mem-lock=on"]
            )
            q.quit()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            kill(proc.pid, root=ROOT)


def test_the_probe_agrees_with_qemu_about_arch_capabilities(caps: QemuCaps) -> None:
    """QEMU's plain ``-cpu host`` aborts exactly where the probe says the MSR cannot be set."""
    assert caps.kvm is not None
    if caps.kvm.arch_capabilities_settable is None:
        pytest.skip("this KVM does not report IA32_ARCH_CAPABILITIES")
    argv = [caps.binary, "-machine", "q35", "-accel", "kvm", "-cpu", "host", "-m", "64M"]
    argv += ["-display", "none", "-nodefaults", "-S", "-qmp", "stdio"]
    cp = run(
        argv,
        input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
        timeout=60,
        check=False,
    )
    aborted = "failed to set MSR 0x10a" in cp.stdout
    assert aborted == (not caps.kvm.arch_capabilities_settable), cp.stdout[-500:]
