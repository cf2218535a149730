"""Real QEMU guests under TCG on this machine: launched paused, pinned, run, powered down.

The host keeps CPU 0; the partition gets CPU 1.  Needs root (affinity of
another process, mem-lock, hugepages), qemu-system-x86, a /boot/vmlinuz and
busybox-static: skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from guestimage import KERNEL_CMDLINE, build_guest_initramfs, guest_kernel

from partitioner.cpuset import CpuSet
from partitioner.errors import GuestError, VMLaunchFailure
from partitioner.guest.argv import GuestPaths, guest_paths
from partitioner.guest.caps import QemuCaps, probe_qemu
from partitioner.guest.launch import (
    RunningGuest,
    is_running,
    kill,
    launch,
    powerdown,
    thread_affinities,
    thread_names,
)
from partitioner.guest.qmp import Qmp, QmpCommandError
from partitioner.kernel.hugepages import ensure_pages, pool_counts, release_pages
from partitioner.kernel.root import HostRoot
from partitioner.manifest.model import Boot, Disk, PartitionSpec
from partitioner.planning.model import Placement, Plan
from partitioner.run import run, spawn
from partitioner.units import GiB, MiB

pytestmark = pytest.mark.qemu

ROOT = HostRoot("/")
HOST_CPUS = CpuSet([0])
GUEST_CPU = 1
HUGE = 2 * MiB


@dataclass(frozen=True)
class Image:
    kernel: Path
    initrd: Path


@pytest.fixture(scope="module")
def caps() -> QemuCaps:
    if os.geteuid() != 0:
        pytest.skip("needs root: pinning another process's threads, mem-lock, hugepages")
    if GUEST_CPU not in os.sched_getaffinity(0):
        pytest.skip(f"needs CPU {GUEST_CPU}")
    try:
        return probe_qemu()
    except GuestError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return Image(guest_kernel(), build_guest_initramfs(tmp_path_factory.mktemp("guestimage")))


@pytest.fixture
def paths(tmp_path: Path) -> Iterator[GuestPaths]:
    p = guest_paths(tmp_path / "run", tmp_path / "log", "t1", state_dir=tmp_path / "state")
    yield p
    # A failed assertion must not leave a QEMU spinning on the shared CPUs.
    pid = _pid_serving(p)
    if pid is not None:
        kill(pid, root=ROOT)


def _placement(
    image: Image,
    memory: int,
    hugepages: int | None,
    *,
    cpus: tuple[int, ...] = (GUEST_CPU,),
    threads: int = 1,
    disks: tuple[Disk, ...] = (),
) -> Placement:
    spec = PartitionSpec(
        name="t1",
        cpu_count=len(cpus),
        cpu_list=None,
        memory_bytes=memory,
        hugepage_bytes=hugepages,
        numa="auto",
        boot=Boot(str(image.kernel), str(image.initrd), KERNEL_CMDLINE),
        disks=disks,
    )
    return Placement(
        name="t1",
        cpus=cpus,
        sockets=1,
        cores=len(cpus) // threads,
        threads=threads,
        numa_nodes=(0,),
        memory_per_node=((0, memory),),
        hugepage_bytes=hugepages,
        devices=(),
        spec=spec,
    )


def _plan(p: Placement) -> Plan:
    return Plan(
        accel="tcg",
        smt="isolate",
        host_cpus=HOST_CPUS,
        host_memory_bytes=GiB,
        placements={p.name: p},
    )


def _wait_console(paths: GuestPaths, line: str, timeout: float = 150.0) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        try:
            text = paths.console_log.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        if re.search(rf"^{re.escape(line)}\r?$", text, re.MULTILINE):
            return text
        time.sleep(0.5)
    raise AssertionError(f"no {line!r} on the console within {timeout}s:\n{text[-2000:]}")


def _console_value(text: str, key: str) -> str:
    m = re.search(rf"^{key} (.+?)\r?$", text, re.MULTILINE)
    assert m, f"no {key} line on the console"
    return m.group(1)


def _status_field(pid: int, tid: int | None, field: str) -> str:
    where = f"/proc/{pid}/task/{tid}/status" if tid else f"/proc/{pid}/status"
    for line in (ROOT.read(where) or "").splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {field} in {where}")


def _last_cpu(pid: int, tid: int) -> int:
    stat = ROOT.read(f"/proc/{pid}/task/{tid}/stat") or ""
    # Field 39 (processor), counted after the ")" that ends the thread name.
    return int(stat.rsplit(")", 1)[1].split()[36])


def _pid_serving(paths: GuestPaths) -> int | None:
    """The pid of any process whose command line names this guest's QMP socket."""
    for entry in ROOT.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = ROOT.path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if str(paths.qmp).encode() in cmdline and b"qemu" in cmdline.split(b"\0")[0]:
            return int(entry)
    return None


def _assert_gone(g: RunningGuest) -> None:
    assert not is_running(ROOT, g.pid, g.name)
    assert not ROOT.exists(f"/proc/{g.pid}/cmdline") or _pid_serving(g.paths) is None
    assert not g.paths.dir.exists(), "the run directory must go with the guest"


def test_launch_pins_runs_and_powers_down(caps: QemuCaps, image: Image, paths: GuestPaths) -> None:
    p = _placement(image, 256 * MiB, None)
    steps: list[str] = []
    g = launch(p, _plan(p), paths, caps, root=ROOT, on_progress=steps.append)
    assert steps[0].startswith("t1: starting") and steps[-1].startswith("t1: running")
    assert is_running(ROOT, g.pid, "t1")
    assert not is_running(ROOT, g.pid, "t2"), "another partition's name must not match"
    assert is_running(ROOT, os.getpid(), "t1") is False, "a process that is not QEMU"
    assert oct(paths.dir.stat().st_mode & 0o777) == "0o700"

    # Pinned: the vCPU thread on the partition's CPU, everything else on the host's.
    affinity = thread_affinities(ROOT, g.pid)
    names = thread_names(ROOT, g.pid)
    assert list(g.vcpu_threads) == [0]
    vcpu_tid = g.vcpu_threads[0]
    assert names[vcpu_tid].startswith("CPU 0/"), names
    assert affinity[vcpu_tid] == CpuSet([GUEST_CPU])
    others = {tid: cpus for tid, cpus in affinity.items() if tid != vcpu_tid}
    assert others and all(cpus == HOST_CPUS for cpus in others.values()), (others, names)

    # A second launch of the same partition is refused and leaves the first one whole.
    with pytest.raises(GuestError, match="already running"):
        launch(p, _plan(p), paths, caps, root=ROOT)
    assert paths.qmp.exists() and is_running(ROOT, g.pid, "t1")

    # Preallocated and locked before the first guest instruction.
    locked_kb = int(_status_field(g.pid, None, "VmLck").split()[0])
    assert locked_kb >= 256 * 1024
    if caps.sandbox:
        assert _status_field(g.pid, None, "Seccomp") == "2", "QEMU runs under its sandbox"
    if caps.thread_context:
        assert any(n.startswith("TC tc0") for n in names.values()), names

    text = _wait_console(paths, "GUEST-READY")
    assert _console_value(text, "GUEST-CPUS") == "1"
    mem_kb = int(_console_value(text, "GUEST-MEM-KB"))
    assert 160 * 1024 < mem_kb <= 256 * 1024
    assert _last_cpu(g.pid, vcpu_tid) == GUEST_CPU
    with Qmp(paths.qmp, partition="t1") as q:
        assert q.status() == "running"

    t0 = time.monotonic()
    powerdown(paths, g.pid, root=ROOT, timeout=60)
    assert time.monotonic() - t0 < 60, "the guest should have obeyed the ACPI power button"
    assert "GUEST-POWERDOWN" in paths.console_log.read_text(errors="replace")
    _assert_gone(g)


def test_hugepage_backed_guest_draws_from_the_node_pool(
    caps: QemuCaps, image: Image, paths: GuestPaths
) -> None:
    memory = 128 * MiB
    pages = memory // HUGE
    nr0, _ = pool_counts(ROOT, 0, HUGE)
    added = ensure_pages(ROOT, 0, HUGE, pages)
    try:
        _, free_before = pool_counts(ROOT, 0, HUGE)
        assert free_before >= pages
        p = _placement(image, memory, HUGE)
        g = launch(p, _plan(p), paths, caps, root=ROOT)
        try:
            _, free_running = pool_counts(ROOT, 0, HUGE)
            assert free_before - free_running == pages
            assert _status_field(g.pid, None, "HugetlbPages") == f"{memory // 1024} kB"
        finally:
            # The guest may still be booting (no power button driver yet): quit comes soon.
            powerdown(paths, g.pid, root=ROOT, timeout=3)
        _assert_gone(g)
    finally:
        # release_pages waits for the exited QEMU's pages to come back to the pool.
        assert release_pages(ROOT, 0, HUGE, added) == added
    assert pool_counts(ROOT, 0, HUGE) == (nr0, free_before - added)


def test_powerdown_ends_a_guest_that_ignores_acpi(
    caps: QemuCaps, image: Image, paths: GuestPaths
) -> None:
    p = _placement(image, 128 * MiB, None)
    g = launch(p, _plan(p), paths, caps, root=ROOT)
    with Qmp(paths.qmp, partition="t1") as q:
        q.execute("stop")  # a paused guest cannot see the power button
        assert q.status() == "paused"
    t0 = time.monotonic()
    powerdown(paths, g.pid, root=ROOT, timeout=1)
    assert time.monotonic() - t0 < 15
    _assert_gone(g)
    assert "GUEST-POWERDOWN" not in paths.console_log.read_text(errors="replace")


def test_qemu_that_dies_at_start_is_a_launch_failure(
    caps: QemuCaps, image: Image, paths: GuestPaths, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-disk.img"
    p = _placement(image, 128 * MiB, None, disks=(Disk(str(missing)),))
    with pytest.raises(VMLaunchFailure) as e:
        launch(p, _plan(p), paths, caps, root=ROOT, timeout=30)
    assert e.value.partition == "t1"
    assert e.value.exitcode not in (None, 0)
    assert str(missing) in e.value.output
    assert e.value.command[0] == caps.binary and "-S" in e.value.command
    assert _pid_serving(paths) is None
    assert not paths.dir.exists()


def test_failure_after_start_ends_qemu(caps: QemuCaps, image: Image, paths: GuestPaths) -> None:
    # A CPU this machine does not have: QEMU starts (no thread-context to refuse it), and
    # pinning the vCPU fails.  The QEMU that was started must not outlive the error.
    absent = max(os.sched_getaffinity(0)) + 64
    p = _placement(image, 128 * MiB, None, cpus=(absent,))
    with pytest.raises(GuestError, match=f"cannot pin vCPU 0 .* to CPU {absent}"):
        launch(p, _plan(p), paths, replace(caps, thread_context=False), root=ROOT)
    assert _pid_serving(paths) is None
    assert not paths.dir.exists()


def test_each_vcpu_runs_on_its_own_host_cpu(
    caps: QemuCaps, image: Image, paths: GuestPaths
) -> None:
    # vCPU i runs on cpus[i], whatever the order: (1, 0) is not sorted on purpose.  On this
    # 2-CPU machine vCPU 1 shares CPU 0 with the host, which the test tolerates.
    p = _placement(image, 128 * MiB, None, cpus=(GUEST_CPU, 0), threads=2)
    g = launch(p, _plan(p), paths, caps, root=ROOT)
    try:
        affinity = thread_affinities(ROOT, g.pid)
        assert affinity[g.vcpu_threads[0]] == CpuSet([GUEST_CPU])
        assert affinity[g.vcpu_threads[1]] == CpuSet([0])
        names = thread_names(ROOT, g.pid)
        assert names[g.vcpu_threads[0]].startswith("CPU 0/")
        assert names[g.vcpu_threads[1]].startswith("CPU 1/")
        text = _wait_console(paths, "GUEST-READY")
        assert _console_value(text, "GUEST-CPUS") == "2"
        # One core with two threads, as placed: the guest sees the two as siblings.
        assert _console_value(text, "GUEST-SMT") == "0-1"
        assert _last_cpu(g.pid, g.vcpu_threads[0]) == GUEST_CPU
        assert _last_cpu(g.pid, g.vcpu_threads[1]) == 0
    finally:
        powerdown(paths, g.pid, root=ROOT, timeout=30)
    _assert_gone(g)


def test_probe_matches_what_qemu_says(caps: QemuCaps) -> None:
    out = run([caps.binary, "-version"]).stdout
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    assert m
    assert caps.version == tuple(int(x) for x in m.groups())
    assert caps.binary.startswith("/")
    assert caps.thread_context == (caps.version >= (7, 2, 0))
    assert probe_qemu(caps.binary) == caps


def test_probe_is_remembered_on_disk_per_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from partitioner.guest import caps as caps_mod

    monkeypatch.setenv("PARTITION_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(caps_mod, "_cache", {})
    first = probe_qemu()
    assert (tmp_path / "qemu-caps.json").is_file()

    def no_qemu_run(path: str) -> QemuCaps:
        raise AssertionError("QEMU was run again")

    # a later command (nothing in memory) reads the answer back instead of running QEMU
    monkeypatch.setattr(caps_mod, "_cache", {})
    monkeypatch.setattr(caps_mod, "_probe", no_qemu_run)
    assert probe_qemu() == first
    # a damaged cache is not trusted: QEMU is asked again
    (tmp_path / "qemu-caps.json").write_text("{not json")
    monkeypatch.setattr(caps_mod, "_cache", {})
    with pytest.raises(AssertionError, match="run again"):
        probe_qemu()


def test_probe_of_a_missing_qemu_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(GuestError, match="apt-get install qemu-system-x86"):
        probe_qemu(str(tmp_path / "qemu-system-x86_64"))
    with pytest.raises(GuestError, match="not installed"):
        probe_qemu("qemu-system-does-not-exist")


def test_qmp_session_and_its_errors(caps: QemuCaps, tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    with pytest.raises(GuestError, match="cannot connect") as e:
        Qmp(sock, timeout=2, partition="t9").connect()
    assert e.value.partition == "t9"
    argv = [caps.binary, "-machine", "none", "-nodefaults", "-display", "none", "-S"]
    proc = spawn([*argv, "-qmp", f"unix:{sock},server=on,wait=off"])
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        with Qmp(sock, timeout=10, partition="t9") as q:
            assert q.status() == "prelaunch"
            with pytest.raises(QmpCommandError) as ce:
                q.execute("no-such-command")
            assert ce.value.error_class == "CommandNotFound"
            assert ce.value.partition == "t9" and ce.value.command == "no-such-command"
            assert q.status() == "prelaunch", "the session survives a refused command"
            q.quit()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_zombie_is_not_running_and_kill_reaps_it() -> None:
    proc = spawn(["/bin/true"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stat = ROOT.read(f"/proc/{proc.pid}/stat") or ""
        if stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]:
            break
        time.sleep(0.02)
    assert ROOT.exists(f"/proc/{proc.pid}"), "still a zombie, waiting for its parent"
    assert not is_running(ROOT, proc.pid, "t1")
    kill(proc.pid, root=ROOT, timeout=5)
    assert not ROOT.exists(f"/proc/{proc.pid}")


def test_a_later_process_that_is_not_the_parent_stops_the_guest(
    caps: QemuCaps, image: Image, paths: GuestPaths
) -> None:
    # `partition apply` launches and exits; `partition stop` is another process.  Here a
    # child Python launches and exits, and this process (not QEMU's parent) finds and stops it.
    script = f"""
import json, sys
sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parent.parent)!r}]
from pathlib import Path
import test_guest_qemu as t
from partitioner.guest.argv import guest_paths
from partitioner.guest.caps import probe_qemu
from partitioner.guest.launch import launch
p = t._placement(t.Image(Path({str(image.kernel)!r}), Path({str(image.initrd)!r})), 128 << 20, None)
paths = guest_paths(Path({str(paths.dir.parent)!r}), Path({str(paths.console_log.parent)!r}), "t1",
                    state_dir=Path({str(paths.ovmf_vars.parent.parent)!r}))
print(json.dumps(launch(p, t._plan(p), paths, probe_qemu(), root=t.ROOT).to_json()))
"""
    out = run([sys.executable, "-c", script], timeout=180).stdout
    g = RunningGuest.from_json(json.loads(out.strip().splitlines()[-1]))
    assert g.paths == paths
    assert is_running(ROOT, g.pid, "t1")
    assert ROOT.read(f"/proc/{g.pid}/stat", "").rsplit(")", 1)[1].split()[1] != str(os.getpid())
    affinity = thread_affinities(ROOT, g.pid)
    assert affinity[g.vcpu_threads[0]] == CpuSet([GUEST_CPU])
    assert all(c == HOST_CPUS for t, c in affinity.items() if t != g.vcpu_threads[0])
    powerdown(paths, g.pid, root=ROOT, timeout=2)
    _assert_gone(g)
