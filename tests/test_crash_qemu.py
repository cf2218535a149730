"""``partition apply`` and ``destroy`` killed with SIGKILL at every step, then brought home.

The kill points are the steps themselves (``partitioner.killpoint``): one full
``apply`` and one full ``destroy`` run with ``PARTITION_TEST_KILL_LIST`` name, in
order, every point they pass (each action's ``did-KIND``, every durable save
``state-saved``, ``qemu-spawned`` before the pid is recorded, ``pool-raised``
before the grant is recorded, ...), so a point added later is covered without
touching this file.  Then, for each point in turn, the verb runs with
``PARTITION_TEST_KILL_AT=NAME:N`` and kills itself right there.

After every kill: ``status`` answers (exit 0, valid JSON); the next ``apply``
converges to the site running, its vCPU pinned (read from /proc), its QEMU the one
process that runs as a partition's user (rule 10's range, read from every
``/proc/PID/status``), with the uid the record holds; ``destroy`` leaves no QEMU of
the partition, no process of any partition's uid, no uid slot in the record, nothing
under the run directory, and the hugepage pool at the size it had before this test
raised it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from guestimage import build_guest_initramfs, guest_kernel
from procs import pids_whose_argv

from partitioner.cpuset import CpuSet
from partitioner.guest.launch import thread_affinities
from partitioner.guest.qmp import Qmp
from partitioner.kernel import sysfs
from partitioner.kernel.root import HostRoot
from partitioner.planning.confine import in_user_range
from partitioner.units import MiB

pytestmark = pytest.mark.qemu

ROOT = HostRoot("/")
POOL = sysfs.hugepage_pool(2 * MiB, 0)
REPO = Path(__file__).resolve().parent.parent


def _require() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CPU affinity, hugepage pools)")
    if subprocess.run(["which", "qemu-system-x86_64"], capture_output=True).returncode:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs: one for the host, one for the partition")
    if ROOT.read_int(f"{POOL}/nr_hugepages") is None:
        pytest.skip(f"no 2MiB hugepage pool on node 0 ({POOL})")


@dataclass
class Site:
    dir: Path
    manifest: Path
    pool: int  # the 2MiB pool's size before the module applied anything: what every test ends with
    # Processes of a partition's uid that ran before the module began (another site's
    # confined QEMU): not this site's, left out of what every check counts.
    users_before: frozenset[int]

    @property
    def run_dir(self) -> Path:
        return self.dir / "run"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARTITION_TEST_KILL")}
        env.update(
            PARTITION_STATE_DIR=str(self.dir / "state"),
            PARTITION_RUN_DIR=str(self.run_dir),
            PARTITION_LOG_DIR=str(self.dir / "log"),
        )
        env.update(extra)
        return env

    def run(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "partitioner.cli.main", *args],
            env=self.env(**extra),
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
        )

    def apply(self, **extra: str) -> subprocess.CompletedProcess[str]:
        # No supervisor: what a killed apply leaves is for the next apply to bring home.
        return self.run("apply", "--no-supervise", str(self.manifest), **extra)

    def destroy(self, **extra: str) -> subprocess.CompletedProcess[str]:
        # The test guest does not act on ACPI power-down: no time is given to it.
        return self.run("destroy", "--all", "--timeout", "0", **extra)

    def points(self, verb: str) -> list[str]:
        """Every kill point one full run of ``verb`` passes, in order."""
        listing = self.dir / f"{verb}.points"
        listing.unlink(missing_ok=True)
        cp = (self.apply if verb == "apply" else self.destroy)(
            PARTITION_TEST_KILL_LIST=str(listing)
        )
        assert cp.returncode == 0, cp.stderr
        return listing.read_text().split()


def _qemus(run_dir: Path) -> list[int]:
    """Live processes whose command line names a socket in ``run_dir``."""
    key = str(run_dir).encode()
    return pids_whose_argv(lambda argv: any(key in a for a in argv))


def _partition_users() -> dict[int, int]:
    """pid -> uid of every live process whose real, effective, saved or filesystem uid or gid
    lies in rule 10's range, read from ``/proc/PID/status`` (zombies left out: they hold
    nothing, only their parent's wait is due)."""
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            lines = Path(f"/proc/{entry}/status").read_text().splitlines()
        except OSError:
            continue  # ended while read
        fields = {ln.split(":", 1)[0]: ln.split()[1:] for ln in lines if ":" in ln}
        if fields.get("State", ["?"])[0] in ("Z", "X"):
            continue
        ids = [int(v) for v in fields.get("Uid", []) + fields.get("Gid", []) if v.isdigit()]
        if any(in_user_range(i) for i in ids):
            out[int(entry)] = int(fields["Uid"][0])
    return out


def _site_users(site: Site) -> dict[int, int]:
    """What :func:`_partition_users` finds, less what ran before the module began."""
    return {p: u for p, u in _partition_users().items() if p not in site.users_before}


def _pool_size() -> int:
    nr = ROOT.read_int(f"{POOL}/nr_hugepages")
    assert nr is not None
    return nr


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    _require()
    d = tmp_path_factory.mktemp("crash")
    kernel, initrd = guest_kernel(), build_guest_initramfs(d / "img")
    manifest = d / "site.yaml"
    manifest.write_text(
        "version: 1\n"
        "host:\n"
        '  reserve: {cpus: "0", memory: 1GiB}\n'
        "  accel: tcg\n"
        "  isolation: pinned\n"
        "partitions:\n"
        "  crashp:\n"
        '    cpus: "1"\n'
        "    memory: 64MiB\n"
        "    hugepages: 2MiB\n"
        f"    boot: {{kernel: {kernel}, initrd: {initrd}, cmdline: console=ttyS0 quiet panic=-1}}\n"
    )
    s = Site(d, manifest, _pool_size(), frozenset(_partition_users()))
    yield s
    if (d / "state" / "state.json").exists():
        s.destroy()
    for pid in _qemus(s.run_dir):
        os.kill(pid, signal.SIGKILL)


def _occurrences(points: list[str]) -> list[tuple[str, int]]:
    """(name, n): the nth time that point is passed, for every point of the run."""
    seen: Counter[str] = Counter()
    out = []
    for name in points:
        seen[name] += 1
        out.append((name, seen[name]))
    return out


def _check_running_pinned(site: Site) -> None:
    cp = site.run("--json", "status")
    assert cp.returncode == 0, cp.stderr
    st = json.loads(cp.stdout)["partitions"]["crashp"]
    assert st["state"] == "running", st
    pid = st["pid"]
    assert _qemus(site.run_dir) == [pid]
    aff = thread_affinities(ROOT, pid)
    vcpus = {int(i): t for i, t in st["vcpu_threads"].items()}
    assert list(vcpus) == [0]
    assert aff[vcpus[0]] == CpuSet([1]), f"vCPU thread may run on {aff[vcpus[0]]}"
    assert all(c == CpuSet([0]) for t, c in aff.items() if t != vcpus[0]), aff
    # Confined (the default): its QEMU runs as the uid the record holds, and no other
    # process runs as a partition's user (no QEMU a killed run left behind).
    uid = st["uid"]
    assert uid is not None and in_user_range(uid), st
    record = json.loads((site.dir / "state" / "state.json").read_text())
    assert record["partitions"]["crashp"]["uid"] == uid, record["partitions"]["crashp"]
    assert _site_users(site) == {pid: uid}, _describe(_site_users(site))


def _describe(users: dict[int, int]) -> str:
    out = []
    for pid, uid in sorted(users.items()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:200]
        except OSError:
            argv = b"?"
        out.append(f"pid {pid} uid {uid}: {argv.decode(errors='replace')}")
    return "processes of a partition's user: " + ("; ".join(out) or "none")


def _held_uids(doc: object) -> list[object]:
    """Every non-null ``uid`` anywhere in a JSON document."""
    if isinstance(doc, dict):
        own = [doc["uid"]] if doc.get("uid") is not None else []
        return own + [u for v in doc.values() for u in _held_uids(v)]
    if isinstance(doc, list):
        return [u for v in doc for u in _held_uids(v)]
    return []


def _check_clean(site: Site, pool_before: int) -> None:
    """No QEMU, no process of a partition's user, no run directory content, no partition
    recorded (so no grant, no intent, no uid slot left to give back), and the pool as it
    was before the module applied anything."""
    assert _qemus(site.run_dir) == []
    # Every uid slot given back means no process left with it: ``destroy`` ends them all.
    assert _site_users(site) == {}, _describe(_site_users(site))
    leftover = list(site.run_dir.rglob("*")) if site.run_dir.exists() else []
    assert leftover == [], leftover
    record = json.loads((site.dir / "state" / "state.json").read_text())
    assert record["partitions"] == {}, record
    assert _held_uids(record) == [], record  # no slot held anywhere in the record
    # A page leaked keeps the pool above where it was; one given back that was not this
    # site's, below.  Pages come back to the pool as QEMU's memory is torn down: a bounded
    # wait.  (The suite runs alone on the machine: no other site resizes this pool meanwhile.)
    deadline = time.monotonic() + 60
    while _pool_size() != pool_before and time.monotonic() < deadline:
        time.sleep(0.2)
    got = _pool_size()
    assert got == pool_before, f"the 2MiB pool has {got} pages, {pool_before} before the module"


def _status_answers(site: Site, label: str) -> None:
    st = site.run("--json", "status")
    assert st.returncode == 0, f"{label}: status after the kill: {st.stderr}"
    json.loads(st.stdout)


def test_apply_killed_at_every_step_converges_and_destroys_clean(site: Site) -> None:
    pool_before = site.pool
    points = site.points("apply")
    assert {
        "qemu-spawned", "guest-let-run", "did-start", "state-saved", "user-taken", "did-take-user"
    } <= set(points), points  # fmt: skip
    assert site.destroy().returncode == 0
    _check_clean(site, pool_before)
    for name, n in _occurrences(points):
        label = f"apply killed after {name} #{n}"
        cp = site.apply(PARTITION_TEST_KILL_AT=f"{name}:{n}")
        assert cp.returncode == -signal.SIGKILL, f"{label}: not killed: {cp.stderr}"
        _status_answers(site, label)
        again = site.apply()
        assert again.returncode == 0, f"{label}: apply after the kill: {again.stderr}"
        _check_running_pinned(site)
        done = site.destroy()
        assert done.returncode == 0, f"{label}: destroy: {done.stderr}"
        _check_clean(site, pool_before)


def test_destroy_killed_at_every_step_is_finished_by_the_next_run(site: Site) -> None:
    pool_before = site.pool
    assert site.apply().returncode == 0
    points = site.points("destroy")
    assert {
        "powerdown-sent", "qemu-gone", "did-stop", "did-forget", "user-processes-ended",
        "did-give-back-user",
    } <= set(points), points  # fmt: skip
    _check_clean(site, pool_before)
    assert site.apply().returncode == 0
    for name, n in _occurrences(points):
        label = f"destroy killed after {name} #{n}"
        cp = site.destroy(PARTITION_TEST_KILL_AT=f"{name}:{n}")
        assert cp.returncode == -signal.SIGKILL, f"{label}: not killed: {cp.stderr}"
        _status_answers(site, label)
        done = site.destroy()
        assert done.returncode == 0, f"{label}: destroy after the kill: {done.stderr}"
        _check_clean(site, pool_before)
        # ... and the site comes back, pinned, for the next kill.
        again = site.apply()
        assert again.returncode == 0, f"{label}: apply after the kill: {again.stderr}"
        _check_running_pinned(site)


def test_status_says_paused_and_plan_reconciles_the_way_apply_does(site: Site) -> None:
    pool_before = site.pool
    assert site.apply().returncode == 0
    st = json.loads(site.run("--json", "status").stdout)["partitions"]["crashp"]
    pid = st["pid"]
    qmp = site.run_dir / "crashp" / "qmp.sock"

    # Paused by someone over QMP: status says so (cli.md's states), and back.
    with Qmp(qmp, timeout=10) as q:
        q.execute("stop")
    assert json.loads(site.run("--json", "status").stdout)["partitions"]["crashp"]["state"] == (
        "paused"
    )
    with Qmp(qmp, timeout=10) as q:
        q.execute("cont")
    assert json.loads(site.run("--json", "status").stdout)["partitions"]["crashp"]["state"] == (
        "running"
    )

    # A change to the running partition is held, in plan as in apply.
    changed = site.dir / "changed.yaml"
    changed.write_text(site.manifest.read_text().replace("64MiB", "128MiB"))
    cp = site.run("--json", "plan", str(changed))
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)
    assert "crashp" in doc["held"] and doc["actions"] == []

    # Its QEMU dies: plan shows the restart apply will make, status the failure.
    os.kill(pid, signal.SIGKILL)
    while pid in _qemus(site.run_dir):
        time.sleep(0.05)
    cp = site.run("--json", "plan", str(site.manifest))
    doc = json.loads(cp.stdout)
    assert [(a["action"], a["target"]) for a in doc["actions"]] == [("start", "crashp")]
    assert any("no longer running" in f["found"] for f in doc["reconciled"])
    assert json.loads(site.run("--json", "status").stdout)["partitions"]["crashp"]["state"] == (
        "failed"
    )
    again = site.apply()
    assert again.returncode == 0, again.stderr
    _check_running_pinned(site)
    assert site.destroy().returncode == 0
    _check_clean(site, pool_before)
