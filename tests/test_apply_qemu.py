"""``partition apply`` end to end with real QEMU guests under TCG on this machine.

Each test drives the ``partition`` command as a separate process (as an operator
would: QEMU is then not the test's child) with its own state, run and log
directories, on a site that keeps CPU 0 for the host and gives CPU 1 to a
partition.  What is checked is read from the kernel: thread affinities from
/proc/PID/task/*/status, hugepage pools from sysfs, processes from /proc.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from guestimage import build_guest_initramfs, guest_kernel
from procs import qemus_naming

from partitioner.cpuset import CpuSet
from partitioner.guest.launch import is_running, thread_affinities
from partitioner.kernel.root import HostRoot
from partitioner.record.model import State
from partitioner.record.store import StateStore

pytestmark = pytest.mark.qemu

ROOT = HostRoot("/")
POOL_2M = "/sys/devices/system/node/node0/hugepages/hugepages-2048kB"
BOOT_TIMEOUT = 240.0  # TCG on two shared cores: a 128 MiB guest boots in 5-60 s


def _require() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CPU affinity, hugepage pools)")
    if subprocess.run(["which", "qemu-system-x86_64"], capture_output=True).returncode:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs: one for the host, one for the partition")


@dataclass
class Site:
    dir: Path
    kernel: Path
    initrd: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PARTITION_STATE_DIR": str(self.dir / "state"),
            "PARTITION_RUN_DIR": str(self.dir / "run"),
            "PARTITION_LOG_DIR": str(self.dir / "log"),
        }

    @property
    def state_file(self) -> Path:
        return self.dir / "state" / "state.json"

    def manifest(self, name: str, partitions: dict[str, str]) -> Path:
        """A site keeping CPU 0 for the host; each partition is YAML text for its fields."""
        # isolation: pinned: this machine's other processes are its operator's, not ours.
        text = (
            'version: 1\nhost:\n  reserve:\n    cpus: "0"\n    memory: 1GiB\n  accel: tcg\n'
            "  isolation: pinned\npartitions:\n"
        )
        for pname, body in partitions.items():
            text += f"  {pname}:\n" + "".join(f"    {line}\n" for line in body.strip().splitlines())
        path = self.dir / f"{name}.yaml"
        path.write_text(text)
        return path

    def guest(self, *, memory: str = "128MiB", hugepages: str = "none", extra: str = "") -> str:
        return (
            f'cpus: "1"\nmemory: {memory}\nhugepages: {hugepages}\n'
            f"boot:\n  kernel: {self.kernel}\n  initrd: {self.initrd}\n"
            "  cmdline: console=ttyS0 quiet panic=-1\n" + extra
        )

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "partitioner.cli.main", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=Path(__file__).resolve().parent.parent,
        )

    def spawn(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "partitioner.cli.main", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )

    def spawn_bytes(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "partitioner.cli.main", *args],
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=Path(__file__).resolve().parent.parent,
        )

    def status(self) -> dict[str, Any]:
        cp = self.run("--json", "status")
        assert cp.returncode == 0, cp.stderr
        doc: dict[str, Any] = json.loads(cp.stdout)["partitions"]
        return doc


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    yield from site_in(tmp_path)


def site_in(tmp_path: Path) -> Iterator[Site]:
    """A site under ``tmp_path`` (a fixture's body: other modules' fixtures yield from it)."""
    _require()
    s = Site(tmp_path, guest_kernel(), build_guest_initramfs(tmp_path / "img"))
    yield s
    # Leave nothing running or claimed behind, whatever the test did.
    if s.state_file.exists():
        s.run("destroy", "--all", "--timeout", "5")
    for pid in _qemus_of(s):
        os.kill(pid, signal.SIGKILL)


def _qemus_of(s: Site) -> list[int]:
    """QEMU processes whose sockets live in this site's run directory."""
    return qemus_naming(s.dir / "run")


def _pool() -> tuple[int, int]:
    nr = ROOT.read_int(f"{POOL_2M}/nr_hugepages")
    free = ROOT.read_int(f"{POOL_2M}/free_hugepages")
    assert nr is not None and free is not None
    return nr, free


def _wait_console(log: Path, marker: str, timeout: float = BOOT_TIMEOUT) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if marker in text:
            return text
        time.sleep(0.5)
    raise AssertionError(f"{marker} not seen in {log} within {timeout}s:\n{text[-2000:]}")


def _assert_pinned(pid: int, vcpu_threads: dict[str, int], cpus: list[int]) -> None:
    aff = thread_affinities(ROOT, pid)
    vcpus = {int(i): t for i, t in vcpu_threads.items()}
    assert sorted(vcpus) == list(range(len(cpus)))
    for i, tid in vcpus.items():
        assert aff[tid] == CpuSet([cpus[i]]), f"vCPU {i} thread {tid} allowed {aff[tid]}"
    others = {t: c for t, c in aff.items() if t not in vcpus.values()}
    assert others, "QEMU has threads besides its vCPUs"
    for tid, allowed in others.items():
        assert allowed == CpuSet([0]), f"QEMU thread {tid} allowed {allowed}, not the host CPU 0"


def test_apply_pins_boots_is_idempotent_and_restarts_a_killed_guest(site: Site) -> None:
    m = site.manifest("site", {"p1": site.guest()})

    # A change made while another command holds the state lock waits, then fails naming it.
    store = StateStore(site.dir / "state")
    with store.lock("apply from the test"):
        held = site.run("apply", "--no-supervise", "--lock-timeout", "1", str(m))
    assert held.returncode == 6, held.stderr  # busy (cli.md)
    assert f"locked by pid {os.getpid()} (apply from the test)" in held.stderr
    assert _qemus_of(site) == []

    # Two applies at once: one does the work, the other waits for it and finds nothing to do.
    # No supervisor in this test: the killed guest below is brought back by apply itself.
    nosup = "--no-supervise"
    first, second = site.spawn("apply", nosup, str(m)), site.spawn("apply", nosup, str(m))
    outs = [p.communicate(timeout=600) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outs
    said = sorted(o.strip().splitlines()[-1] for o, _ in outs)
    # Two actions: the partition's own user (rule 10), then its start.
    assert said == ["done: 2 actions", "nothing to do"], outs
    assert len(_qemus_of(site)) == 1

    st = site.status()["p1"]
    assert st["state"] == "running" and st["cpus"] == [1]
    pid = st["pid"]
    assert is_running(ROOT, pid, "p1")
    _assert_pinned(pid, st["vcpu_threads"], [1])
    console = _wait_console(Path(st["console_log"]), "GUEST-READY")
    assert "GUEST-CPUS 1\n" in console.replace("\r", "")
    mem_kb = int(console.split("GUEST-MEM-KB ")[1].split()[0])
    assert 40 * 1024 < mem_kb <= 128 * 1024  # the guest's MemTotal of 128 MiB

    # The console: what is typed reaches the guest's tty (which echoes it), Ctrl-] detaches,
    # and the log file goes on recording while someone is attached.
    con = site.spawn_bytes("console", "p1")
    assert con.stdin is not None
    time.sleep(1.5)  # QEMU takes the connection in its own time; input before that echoes late
    con.stdin.write(b"echo-me-please\n")
    con.stdin.flush()
    time.sleep(3)
    con.stdin.write(b"\x1d")
    con.stdin.flush()
    con_out, con_err = con.communicate(timeout=30)
    assert con.returncode == 0, con_err
    assert b"echo-me-please" in con_out
    assert b"detached" in con_err
    assert "echo-me-please" in Path(st["console_log"]).read_text(errors="replace")

    # Applying again changes nothing, not even the record's bytes.
    before = site.state_file.read_bytes()
    again = site.run("apply", "--no-supervise", str(m))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "nothing to do"
    assert site.state_file.read_bytes() == before
    assert site.status()["p1"]["pid"] == pid

    # A guest killed behind our back shows as failed, and apply brings it back, pinned.
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while is_running(ROOT, pid, "p1") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert site.status()["p1"]["state"] == "failed"
    text = site.run("status")
    assert "failed" in text.stdout and "no longer running" in text.stderr
    redo = site.run("apply", "--no-supervise", str(m))
    assert redo.returncode == 0, redo.stderr
    assert "start" in redo.stdout
    st = site.status()["p1"]
    assert st["state"] == "running" and st["pid"] != pid
    _assert_pinned(st["pid"], st["vcpu_threads"], [1])

    # stop, start, restart: one partition of the applied site, the record kept in step.
    pid = st["pid"]
    cp = site.run("stop", "--timeout", "5", "p1")
    assert cp.returncode == 0, cp.stderr
    assert not is_running(ROOT, pid, "p1")
    assert site.status()["p1"]["state"] == "stopped"
    assert site.run("stop", "p1").stdout.strip() == "p1 is not running"
    cp = site.run("start", "p1")
    assert cp.returncode == 0, cp.stderr
    st = site.status()["p1"]
    assert st["state"] == "running"
    _assert_pinned(st["pid"], st["vcpu_threads"], [1])
    cp = site.run("restart", "--timeout", "5", "p1")
    assert cp.returncode == 0, cp.stderr
    assert not is_running(ROOT, st["pid"], "p1")
    st = site.status()["p1"]
    assert st["state"] == "running" and is_running(ROOT, st["pid"], "p1")

    # destroy stops it and forgets it.
    gone = site.run("destroy", "--all", "--timeout", "10")
    assert gone.returncode == 0, gone.stderr
    assert not is_running(ROOT, st["pid"], "p1")
    assert site.status() == {}
    assert _qemus_of(site) == []


def test_hugepage_partition_draws_from_the_pool_and_destroy_returns_it(site: Site) -> None:
    nr0, free0 = _pool()
    m = site.manifest("site", {"hp": site.guest(hugepages="2MiB")})
    cp = site.run("apply", str(m))
    assert cp.returncode == 0, cp.stderr
    assert "reserve-hugepages" in cp.stdout or free0 >= 64
    st = site.status()["hp"]
    assert st["state"] == "running" and st["hugepages"] == "2MiB"
    nr1, _ = _pool()
    # 128 MiB of 2 MiB pages, preallocated: the guest's QEMU holds 64 hugepages.
    status = ROOT.read(f"/proc/{st['pid']}/status") or ""
    held_kb = [int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("HugetlbPages:")]
    assert held_kb == [128 * 1024]
    added = sum(g["pages"] for g in st["hugepages_added"])
    assert added == max(0, 64 - free0)
    assert nr1 >= nr0 + added

    cp = site.run("destroy", "--all", "--timeout", "10")
    assert cp.returncode == 0, cp.stderr
    # What apply added is given back (others may use the shared pool meanwhile).
    assert _pool()[0] <= nr1 - added


def test_apply_failing_on_its_last_action_leaves_the_host_as_it_was(site: Site) -> None:
    nr0, free0 = _pool()
    # A disk that is there (plan checks that) but is not the qcow2 its name says: only
    # QEMU finds out, at the last action.
    missing = site.dir / "not-a-qcow2.qcow2"
    missing.write_bytes(b"not a qcow2 image\n" * 256)
    # An applied, empty record first, so "unchanged" compares bytes of a real file.
    StateStore(site.state_file.parent).save(State())
    before = site.state_file.read_bytes()
    m = site.manifest(
        "bad",
        {
            "bad": site.guest(
                memory="256MiB", hugepages="2MiB", extra=f"disks:\n  - path: {missing}\n"
            )
        },
    )
    plan = site.run("--json", "apply", "--dry-run", str(m))
    assert plan.returncode == 0, plan.stderr
    kinds = [a["action"] for a in json.loads(plan.stdout)["actions"]]
    assert kinds[-1] == "start"

    cp = site.run("-v", "apply", str(m))
    assert cp.returncode == 4, (cp.stdout, cp.stderr)
    assert "start bad failed" in cp.stderr
    assert str(missing) in cp.stderr  # QEMU's own words name the disk
    assert "Traceback" not in cp.stderr
    if free0 < 128:
        assert "undoing: reserve-hugepages bad" in cp.stderr
    assert _qemus_of(site) == []
    # Other users of the shared 2 MiB pool may come and go meanwhile; ours must be gone.
    assert _pool()[0] <= nr0
    assert site.state_file.read_bytes() == before
    assert not (site.dir / "run" / "bad").exists()
