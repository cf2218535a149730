"""The walls between partitions (rule 10), tried from inside the emulated VT-d server.

Two partitions, each with a passed-through NIC (the demo's site: ``fw0`` owns the
e1000e on node 1, ``lan0`` the two-function NIC on node 0), applied once with
``host.confine: true`` and once with ``host.confine: false``.  A process with
partition A's identity (``fw0``: the uid and gid its QEMU runs with, read from
``/proc/PID/status``; ``setpriv --reuid --regid --clear-groups``) tries to reach
partition B (``lan0``):

- open B's ``/dev/vfio/N``;
- open B's guest memory: QEMU keeps it in an anonymous hugetlb memfd
  (``memory-backend-memfd``), no file on any filesystem, so the one way to it by
  path is ``/proc/PID/fd/N`` of B's QEMU (a hugetlbfs file, if this QEMU had no
  memfd and used one, is tried by its own path as well);
- connect to B's QMP socket and read B's console log;
- open ``/proc/PID/mem`` of B's QEMU;
- write to ``/sys/bus/pci/drivers_probe`` (B's NIC's address: harmless, the
  function is bound already).

Confined, each is refused (EACCES or EPERM).  Unconfined, A's QEMU runs as root, so
"a process with A's identity" is root with every capability, and the same probe
gets through every permission check: each access succeeds, except that the kernel
keeps a VFIO group to one opener, so opening B's group answers EBUSY (the
permission was granted; the group is simply taken).  So every check here fails
when confinement is switched off.

Both nested guests still see their NICs, either way; ``destroy`` gives the NICs back
to e1000e and the device nodes to root, and leaves no process of a partition's uid.
Each setting boots the two nested guests once (minutes under TCG in TCG): the
module-scoped fixture applies the site once per setting and every check shares it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from guestimage import build_guest_initramfs, guest_kernel

from partitioner.kernel.root import HostRoot
from partitioner.planning.confine import in_user_range
from partitioner.record.store import StateStore
from partitioner.vfio.claim import current_driver

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or not os.path.isdir("/sys/kernel/iommu_groups/0"),
        reason="runs inside the emulated VT-d server (root, IOMMU groups)",
    ),
    pytest.mark.usefixtures("nic_drivers"),
]

ROOT = HostRoot("/")
PROJECT = Path(__file__).resolve().parents[2]
DEMO = PROJECT / "partitions" / "demo.yaml"
TIMEOUT = 700.0  # a TCG guest inside a TCG server on shared cores: minutes
A, B = "fw0", "lan0"
NICS = {A: ["0000:81:00.0"], B: ["0000:42:00.0", "0000:42:00.1"]}
CHIPSET = {"8086:29c0", "8086:2918", "8086:2922", "8086:2930", "1b36:000c"}  # q35, root ports
REFUSED = {"EACCES", "EPERM"}
# The probe's interpreter: one any user may run (the project's may live under root's 0700 home).
PROBE_PYTHON = "/usr/bin/python3"

# What the process with A's identity runs: each access of argv[1] (a JSON list of
# [name, how, path, payload]), answered as "ok" or the errno's name, with its own ids.
# Standard library only, isolated (-I -S): nothing of the project needs to be readable.
PROBE = r"""
import errno, json, os, socket, sys
out = {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
       "groups": os.getgroups(), "results": {}}
for name, how, path, payload in json.loads(sys.argv[1]):
    try:
        if how == "connect":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
            finally:
                s.close()
        else:
            flags = {"read": os.O_RDONLY, "rw": os.O_RDWR, "write": os.O_WRONLY}[how]
            fd = os.open(path, flags | os.O_CLOEXEC)
            try:
                if payload:
                    os.write(fd, payload.encode())
            finally:
                os.close(fd)
        out["results"][name] = "ok"
    except OSError as e:
        out["results"][name] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(out))
"""


def wait_console(log: Path, marker: str) -> str:
    deadline = time.monotonic() + TIMEOUT
    text = ""
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if marker in text:
            return text.replace("\r", "")
        time.sleep(1)
    raise AssertionError(f"{marker} not in {log} after {TIMEOUT:g}s:\n{text[-2000:]}")


def guest_devices(console: str) -> list[str]:
    """vendor:device of every PCI function the guest lists, less q35's own."""
    ids = [ln.split()[1] for ln in console.splitlines() if ln.startswith("GUEST-PCI ")]
    return sorted(i for i in ids if i not in CHIPSET)


def ids_of(pid: int) -> tuple[int, int]:
    """The real uid and gid of a process (every field of the line checked to agree)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    uids = next(ln.split()[1:] for ln in lines if ln.startswith("Uid:"))
    gids = next(ln.split()[1:] for ln in lines if ln.startswith("Gid:"))
    assert len(set(uids)) == 1 and len(set(gids)) == 1, (pid, uids, gids)
    return int(uids[0]), int(gids[0])


def range_processes() -> dict[int, int]:
    """pid -> uid of every live process whose real or effective uid or gid is a partition's."""
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            lines = Path(f"/proc/{entry}/status").read_text().splitlines()
        except OSError:
            continue
        if any(ln.startswith("State:") and ln.split()[1] in ("Z", "X") for ln in lines):
            continue
        for ln in lines:
            if ln.startswith(("Uid:", "Gid:")) and any(
                in_user_range(int(v)) for v in ln.split()[1:3]
            ):
                out[int(entry)] = int(ln.split()[1])
    return out


def hugetlbfs_mounts() -> list[str]:
    return [
        ln.split()[1]
        for ln in Path("/proc/mounts").read_text().splitlines()
        if ln.split()[2] == "hugetlbfs"
    ]


def memory_targets(pid: int) -> list[tuple[str, str]]:
    """(label, path) of every way to the guest memory of QEMU ``pid`` by a path: its memfds
    through ``/proc/PID/fd/N``, and hugetlbfs files by their own path."""
    mounts = hugetlbfs_mounts()
    out = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("/memfd:"):
            out.append((f"memfd {link}", f"/proc/{pid}/fd/{fd}"))
        elif any(link.startswith(m.rstrip("/") + "/") for m in mounts):
            out.append((f"hugetlbfs file {link}", f"/proc/{pid}/fd/{fd}"))
            path = link.removesuffix(" (deleted)")
            if os.path.exists(path):
                out.append((f"hugetlbfs path {path}", path))
    return out


@dataclass
class Walls:
    confine: bool
    tmp: Path
    env: dict[str, str]
    status: dict[str, Any]
    paths: dict[str, dict[str, str]]  # partition -> its record's paths (qmp, console_log, ...)
    identity: tuple[int, int]  # A's QEMU's uid and gid
    probe: dict[str, Any]  # what the process with A's identity got
    memory: list[str]  # labels of B's memory targets tried
    destroyed: bool = False

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "partitioner.cli.main", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            cwd=PROJECT,
        )

    def results(self, prefix: str) -> dict[str, str]:
        got = {k: v for k, v in self.probe["results"].items() if k.startswith(prefix)}
        assert got, f"no probe named {prefix}: {self.probe}"
        return got


def run_probe(uid: int, gid: int, targets: list[tuple[str, str, str, str]]) -> dict[str, Any]:
    assert os.access(PROBE_PYTHON, os.X_OK), f"no {PROBE_PYTHON} for the probe"
    argv = [
        "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--",
        PROBE_PYTHON, "-I", "-S", "-c", PROBE, json.dumps(targets),
    ]  # fmt: skip
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd="/")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    doc: dict[str, Any] = json.loads(cp.stdout)
    return doc


@pytest.fixture(scope="module", params=[True, False], ids=["confined", "unconfined"])
def walls(request: pytest.FixtureRequest, testbed_out: Path) -> Iterator[Walls]:
    confine: bool = request.param
    for a in (*NICS[A], *NICS[B]):
        assert current_driver(ROOT, a) == "e1000e", a
    # Not under pytest's temporary directory: it is root's alone (0700), and would refuse A
    # everything by itself.  Here only the partitioner's own modes stand in A's way.
    tmp = Path(tempfile.mkdtemp(prefix=f"partition-walls-{'on' if confine else 'off'}-"))
    os.chmod(tmp, 0o755)
    for d in (tmp, *tmp.parents):
        assert os.stat(d).st_mode & 0o001, f"{d} is not searchable by others"
    env = {
        **os.environ,
        "PARTITION_STATE_DIR": str(tmp / "state"),
        "PARTITION_RUN_DIR": str(tmp / "run"),
        "PARTITION_LOG_DIR": str(tmp / "log"),
    }
    kernel = guest_kernel()
    initrd = build_guest_initramfs(tmp / "img")
    text = DEMO.read_text().replace("/srv/partition/demo/guest-initramfs.cpio.gz", str(initrd))
    assert text.count("kernel: /vmlinuz") == 2, "the demo's two partitions boot /vmlinuz"
    text = text.replace("kernel: /vmlinuz", f"kernel: {kernel}")
    text = text.replace(
        "  accel: tcg", f"  accel: tcg\n  confine: {'true' if confine else 'false'}"
    )
    assert f"confine: {'true' if confine else 'false'}" in text
    manifest = tmp / "site.yaml"
    manifest.write_text(text)
    os.chmod(manifest, 0o644)
    w = Walls(confine, tmp, env, {}, {}, (-1, -1), {}, [])
    try:
        # No supervisor: nothing here crashes, and it is one process fewer under TCG.
        cp = w.cli("apply", "--no-supervise", str(manifest))
        assert cp.returncode == 0, cp.stdout + cp.stderr
        st = w.cli("--json", "status")
        assert st.returncode == 0, st.stderr
        w.status = json.loads(st.stdout)["partitions"]
        record = StateStore(tmp / "state").load()
        w.paths = {n: dict(record.partitions[n].paths) for n in (A, B)}
        w.identity = ids_of(w.status[A]["pid"])
        b_pid = w.status[B]["pid"]
        [b_group] = w.status[B]["iommu_groups"]
        memory = memory_targets(b_pid)
        w.memory = [label for label, _ in memory]
        targets = [
            ("vfio", "rw", f"/dev/vfio/{b_group}", ""),
            *[(f"memory {label}", "read", path, "") for label, path in memory],
            ("qmp", "connect", w.paths[B]["qmp"], ""),
            ("console-log", "read", w.paths[B]["console_log"], ""),
            ("proc-mem", "read", f"/proc/{b_pid}/mem", ""),
            ("sys-bus-pci", "write", "/sys/bus/pci/drivers_probe", NICS[B][0]),
            # The control: a file any user may read, beside the partitions' directories.
            ("control", "read", str(manifest), ""),
        ]
        w.probe = run_probe(*w.identity, targets)
        # What A got, kept for the record of the run (it comes out with the JUnit report).
        (testbed_out / f"walls-{'on' if confine else 'off'}.json").write_text(
            json.dumps({"targets": targets, "probe": w.probe}, indent=2) + "\n"
        )
        yield w
    finally:
        if (tmp / "state" / "state.json").exists() and not w.destroyed:
            w.cli("destroy", "--all", "--timeout", "5")
        shutil.rmtree(tmp, ignore_errors=True)


def check(w: Walls, prefix: str, allowed: set[str]) -> None:
    """Confined: refused (EACCES or EPERM).  Unconfined: one of ``allowed`` (past every
    permission check)."""
    got = w.results(prefix)
    for name, outcome in got.items():
        if w.confine:
            assert outcome in REFUSED, f"{name}: A reached B ({outcome}) while confined: {w.probe}"
        else:
            assert outcome in allowed, f"{name}: {outcome} unconfined, expected {allowed}"


def test_the_probe_runs_with_partition_as_identity(walls: Walls) -> None:
    uid, gid = walls.identity
    p = walls.probe
    assert (p["uid"], p["euid"], p["gid"], p["groups"]) == (uid, uid, gid, [])
    # It can read what any user may: what it is refused below is refused for what it is.
    assert p["results"]["control"] == "ok", p
    if walls.confine:
        assert in_user_range(uid) and uid == gid == walls.status[A]["uid"]
        assert walls.status[B]["uid"] not in (None, uid)
        assert ids_of(walls.status[B]["pid"]) == (walls.status[B]["uid"],) * 2
    else:
        assert (uid, gid) == (0, 0) and walls.status[A]["uid"] is None


def test_a_cannot_open_bs_vfio_group(walls: Walls) -> None:
    # Unconfined, root passes the permission check and meets VFIO's one-opener rule.
    check(walls, "vfio", {"ok", "EBUSY"})


def test_a_cannot_open_bs_memory(walls: Walls) -> None:
    # QEMU backs hugepages with an anonymous memfd: no file of it on any filesystem.
    assert walls.memory, "no memfd or hugetlbfs file among B's QEMU's descriptors"
    check(walls, "memory", {"ok"})


def test_a_cannot_connect_to_bs_qmp_socket(walls: Walls) -> None:
    check(walls, "qmp", {"ok"})


def test_a_cannot_read_bs_console_log(walls: Walls) -> None:
    check(walls, "console-log", {"ok"})


def test_a_cannot_open_bs_proc_mem(walls: Walls) -> None:
    check(walls, "proc-mem", {"ok"})


def test_a_cannot_write_to_sys_bus_pci(walls: Walls) -> None:
    check(walls, "sys-bus-pci", {"ok"})


def test_device_nodes_are_root_or_their_own_and_0600(walls: Walls) -> None:
    for name in (A, B):
        [group] = walls.status[name]["iommu_groups"]
        st = os.stat(f"/dev/vfio/{group}")
        assert st.st_uid in (0, walls.status[name]["uid"]), (name, st.st_uid)
        assert stat.S_IMODE(st.st_mode) == 0o600, (name, oct(st.st_mode))


def test_both_guests_still_see_their_nics(walls: Walls) -> None:
    a = wait_console(Path(walls.paths[A]["console_log"]), "GUEST-READY")
    b = wait_console(Path(walls.paths[B]["console_log"]), "GUEST-READY")
    assert guest_devices(a) == ["8086:10d3"], a
    assert guest_devices(b) == ["8086:10d3", "8086:10d3"], b


def test_destroy_gives_the_nics_and_nodes_back(walls: Walls) -> None:
    groups = {n: walls.status[n]["iommu_groups"][0] for n in (A, B)}
    gone = walls.cli("destroy", "--all", "--timeout", "5")
    walls.destroyed = True
    assert gone.returncode == 0, gone.stdout + gone.stderr
    for a in (*NICS[A], *NICS[B]):
        assert current_driver(ROOT, a) == "e1000e", a
    for name, group in groups.items():
        node = Path(f"/dev/vfio/{group}")
        if node.exists():
            st = node.stat()
            assert (st.st_uid, st.st_gid) == (0, 0), (name, st.st_uid, st.st_gid)
    assert range_processes() == {}
    record = json.loads((walls.tmp / "state" / "state.json").read_text())
    assert record["partitions"] == {}, record
