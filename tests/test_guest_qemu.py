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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from guestimage import KERNEL_CMDLINE, build_guest_initramfs, guest_kernel

from partitioner.cpuset import CpuSet
from partitioner.errors import (
    CpuHotplugError,
    DeviceHotplugError,
    GuestError,
    MemoryResizeError,
    VMLaunchFailure,
)
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
from partitioner.guest.live import (
    attach_vfio,
    cpu_slots,
    detach_device,
    devices_present,
    memory_plugged,
    paused,
    plug_cpu,
    set_memory,
    unplug_cpu,
    wait_until,
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
    # virtio-mem and its prealloc property, as QEMU lists the device's properties.
    help_text = run([caps.binary, "-device", "virtio-mem-pci,help"], check=False).stdout
    assert caps.virtio_mem == ("requested-size=" in help_text)
    assert caps.virtio_mem_prealloc == ("prealloc=" in help_text)
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


def _guest_lines(paths: GuestPaths) -> list[tuple[int, int]]:
    """Every ``partition-guest: cpus=N memtotal_kb=M ...`` line of the console so far, in order."""
    try:
        text = paths.console_log.read_text(errors="replace")
    except FileNotFoundError:
        return []
    found = re.findall(
        r"^partition-guest: cpus=(\d+) memtotal_kb=(\d+)(?: pci=\S*)?\r?$", text, re.MULTILINE
    )
    return [(int(c), int(m)) for c, m in found]


def _wait_guest_line(
    paths: GuestPaths, after: int, want: Callable[[int, int], bool], what: str, timeout: float = 60
) -> tuple[int, int]:
    """The first report after the ``after`` first ones for which ``want(cpus, memtotal_kb)``."""
    deadline = time.monotonic() + timeout
    while True:
        for cpus, kb in _guest_lines(paths)[after:]:
            if want(cpus, kb):
                return cpus, kb
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the guest did not report {what} within {timeout}s: {_guest_lines(paths)}"
            )
        time.sleep(0.5)


def test_dynamic_guest_takes_and_gives_back_a_vcpu_and_memory(
    caps: QemuCaps, image: Image, paths: GuestPaths
) -> None:
    # 1 of 2 vCPU slots present; 128 MiB fixed and 256 MiB of virtio-mem room on node 0 in
    # 2 MiB pages, 64 MiB of it plugged at start.  The guest's init onlines what comes.
    if not caps.virtio_mem:
        pytest.skip(f"QEMU {caps.version_text} has no virtio-mem-pci")
    fixed, room, plugged = 128 * MiB, 256 * MiB, 64 * MiB
    p = replace(
        _placement(image, fixed + plugged, HUGE),
        sockets=1,
        cores=2,
        vcpu_slots=2,
        fixed_per_node=((0, fixed),),
        max_per_node=((0, fixed + room),),
    )
    p = replace(p, spec=replace(p.spec, hotplug_slots=1))
    pages = (fixed + room) // HUGE
    added = ensure_pages(ROOT, 0, HUGE, pages)
    try:
        g = launch(p, _plan(p), paths, caps, root=ROOT)
        try:
            with Qmp(paths.qmp, partition="t1", timeout=20) as q:
                _dynamic_changes(q, g, paths, plugged)
        finally:
            powerdown(paths, g.pid, root=ROOT, timeout=20)
        _assert_gone(g)
    finally:
        assert release_pages(ROOT, 0, HUGE, added) == added


def _dynamic_changes(q: Qmp, g: RunningGuest, paths: GuestPaths, plugged: int) -> None:
    def hugetlb_kb() -> int:
        return int(_status_field(g.pid, None, "HugetlbPages").split()[0])

    slots = cpu_slots(q)
    assert [(s.index, s.present) for s in slots] == [(0, True), (1, False)]
    assert slots[0].thread_id == g.vcpu_threads[0] and slots[1].thread_id is None

    # At start the guest plugs what requested-size says, and reports it.
    _wait_console(paths, "GUEST-READY")
    assert wait_until(lambda: memory_plugged(q) == {0: plugged}, 60), memory_plugged(q)
    time.sleep(2)  # the guest's next report has the plugged memory in it
    cpus0, kb0 = _guest_lines(paths)[-1]
    assert cpus0 == 1
    assert hugetlb_kb() == (128 * MiB + plugged) // 1024, "only what is plugged is taken"
    _, free0 = pool_counts(ROOT, 0, HUGE)

    # A vCPU plugged while the guest is paused: its thread is pinned before it ever runs.
    with paused(q):
        assert q.status() == "paused"
        tid = plug_cpu(q, 1)
        os.sched_setaffinity(tid, {0})
    assert q.status() == "running", "paused() lets a running guest run again"
    assert thread_names(ROOT, g.pid)[tid].startswith("CPU 1/")
    assert thread_affinities(ROOT, g.pid)[tid] == CpuSet([0])
    assert cpu_slots(q)[1].present and cpu_slots(q)[1].thread_id == tid
    assert "vcpu1" in devices_present(q)
    n = len(_guest_lines(paths))
    _wait_guest_line(paths, n, lambda c, _: c == 2, "cpus=2")
    with pytest.raises(CpuHotplugError, match="already filled"):
        plug_cpu(q, 1)
    with pytest.raises(CpuHotplugError, match="no slot 2"):
        plug_cpu(q, 2)

    # Memory grown by 128 MiB: plugged, preallocated from the pool, onlined by the guest.
    n = len(_guest_lines(paths))
    set_memory(q, 0, plugged + 128 * MiB, timeout=60)
    assert memory_plugged(q) == {0: plugged + 128 * MiB}
    assert hugetlb_kb() == (128 * MiB + plugged + 128 * MiB) // 1024
    assert pool_counts(ROOT, 0, HUGE)[1] == free0 - 128 * MiB // HUGE
    want = kb0 + 128 * MiB // 1024
    _, kb1 = _wait_guest_line(paths, n, lambda _, kb: kb == want, f"memtotal_kb={want}")
    # ...and shrunk to nothing, what was plugged at start too: unplugged, the pages back in
    # the pool, gone from the guest.
    n = len(_guest_lines(paths))
    set_memory(q, 0, 0, timeout=60)
    assert memory_plugged(q) == {0: 0}
    assert hugetlb_kb() == 128 * MiB // 1024
    assert pool_counts(ROOT, 0, HUGE)[1] == free0 + plugged // HUGE, "pages back in the pool"
    want = kb1 - (128 * MiB + plugged) // 1024
    _wait_guest_line(paths, n, lambda _, kb: kb == want, f"memtotal_kb={want}")
    with pytest.raises(MemoryResizeError, match="whole blocks of 2MiB"):
        set_memory(q, 0, plugged + MiB, timeout=5)
    with pytest.raises(MemoryResizeError, match="no virtio-mem device vmem3"):
        set_memory(q, 3, plugged, timeout=5)

    # The spare root port: a PCI device plugged there and asked back; the guest's PCIe
    # hot-plug driver lets it go (after the 5 s of its attention button).
    assert "hp0" in devices_present(q) and "hp1" not in devices_present(q)
    with pytest.raises(DeviceHotplugError, match=r"refused to attach 0000:ff:1f\.7"):
        attach_vfio(q, "0000:ff:1f.7", "hp0", "hostdev9")
    with pytest.raises(DeviceHotplugError, match="no spare slot hp1"):
        attach_vfio(q, "0000:ff:1f.7", "hp1", "hostdev9")
    q.execute("device_add", {"driver": "pci-testdev", "bus": "hp0", "id": "probe0"})
    with pytest.raises(DeviceHotplugError, match=r"slot hp0 .* already holds probe0"):
        attach_vfio(q, "0000:ff:1f.7", "hp0", "hostdev9")
    with pytest.raises(DeviceHotplugError, match="already has a device probe0"):
        attach_vfio(q, "0000:ff:1f.7", "hp0", "probe0")
    time.sleep(2)  # the guest sees the device arrive before it is asked back
    detach_device(q, "probe0", timeout=30)
    assert "probe0" not in devices_present(q)
    detach_device(q, "probe0", timeout=1)  # already gone: nothing to ask

    # The vCPU asked back: the guest offlines it and QEMU empties the slot.  Last: QEMU 7.2
    # under TCG keeps the memory listener of an unplugged vCPU, and a later change of the
    # guest's memory map (a device plugged) can crash it; KVM has no such listener.
    n = len(_guest_lines(paths))
    unplug_cpu(q, 1, timeout=60)
    assert not cpu_slots(q)[1].present and "vcpu1" not in devices_present(q)
    _wait_guest_line(paths, n, lambda c, _: c == 1, "cpus=1")
    with pytest.raises(CpuHotplugError, match="boot CPU"):
        unplug_cpu(q, 0, timeout=5)
