"""Starting, pinning, watching and stopping one partition's QEMU.

``launch`` starts QEMU paused, waits for QMP (QEMU answers only once it has
preallocated the guest's memory), pins vCPU ``i`` to host CPU ``cpus[i]``,
puts every other QEMU thread on the host's reserved CPUs, checks the kernel
agrees, and only then lets the guest run.  Whatever fails after QEMU was
started ends that QEMU and removes its run directory before the error goes up.

A later command that stops a partition is not QEMU's parent: waiting for an
exit polls ``/proc/PID`` (and reaps the child when it is ours).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from partitioner.cpuset import CpuSet
from partitioner.errors import GuestError, PartitionError, VMLaunchFailure
from partitioner.guest.argv import GuestPaths, Jail, qemu_argv
from partitioner.guest.caps import QemuCaps
from partitioner.guest.jail import give_root_a_mount, remove_run_dir, withdraw_all
from partitioner.kernel import sysfs
from partitioner.kernel.root import HostRoot
from partitioner.killpoint import point
from partitioner.planning.model import Placement, Plan
from partitioner.run import CommandFailed, spawn
from partitioner.units import MiB

if TYPE_CHECKING:
    from partitioner.guest.qmp import Qmp


def _qmp(socket: Path, *, timeout: float, partition: str = "") -> Qmp:
    # Imported here: QEMU's QMP library brings asyncio, which costs a quick verb
    # (a no-op apply, status) about 50 ms it has no use for.
    from partitioner.guest.qmp import Qmp

    return Qmp(socket, timeout=timeout, partition=partition)


log = logging.getLogger("partitioner.guest")

Progress = Callable[[str], None]

# QEMU processes started by this process, kept so they can be reaped (and so that
# subprocess does not warn about a Popen dropped while its process runs).
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class RunningGuest:
    name: str
    pid: int
    vcpu_threads: dict[int, int] = field(hash=False)  # vCPU index -> host thread id
    paths: GuestPaths
    started_at: float  # time.time() when the guest was let run

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "vcpu_threads": {str(i): t for i, t in sorted(self.vcpu_threads.items())},
            "paths": self.paths.to_json(),
            "started_at": self.started_at,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RunningGuest:
        return cls(
            name=str(doc["name"]),
            pid=int(doc["pid"]),
            vcpu_threads={int(i): int(t) for i, t in doc["vcpu_threads"].items()},
            paths=GuestPaths.from_json(doc["paths"]),
            started_at=float(doc["started_at"]),
        )


def launch(
    p: Placement,
    plan: Plan,
    paths: GuestPaths,
    caps: QemuCaps,
    *,
    root: HostRoot,
    timeout: float = 60.0,
    on_progress: Progress | None = None,
    on_spawned: Callable[[int], None] | None = None,
    jail: Jail | None = None,
) -> RunningGuest:
    """Start partition ``p``, pinned, and running.  Raises VMLaunchFailure when QEMU exits while
    starting, GuestError for anything else; either way no QEMU and no run directory is left.

    ``on_spawned(pid)`` is called as soon as QEMU exists, before anything waits on it:
    the caller records the pid there (the record named the run directory before).
    With a ``jail`` (rule 10), QEMU drops to its user and chroots once it is set up.
    """
    say = on_progress or (lambda _msg: None)
    argv = qemu_argv(p, plan, paths, caps, jail)
    previous = _pid_in(paths.pidfile)
    if previous is not None and _ours(root, previous, paths):
        # Its sockets are about to be replaced: refuse rather than orphan a running guest.
        raise GuestError(
            f"partition {p.name} is already running (QEMU pid {previous})", partition=p.name
        )
    _prepare_dirs(p, paths, caps, jail, root)
    deadline = time.monotonic() + timeout
    say(f"{p.name}: starting QEMU")
    out_fd = os.open(paths.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with _own_affinity(plan.host_cpus):
            proc = spawn(argv, stdout=out_fd, stderr=subprocess.STDOUT)
    except CommandFailed as e:
        remove_run_dir(paths.dir)
        raise VMLaunchFailure(partition=p.name, exitcode=None, command=argv, output=e.output) from e
    finally:
        os.close(out_fd)
    _children[proc.pid] = proc
    try:
        point("qemu-spawned")
        if on_spawned is not None:
            on_spawned(proc.pid)
        say(f"{p.name}: preallocating {p.memory_bytes // MiB} MiB and waiting for QEMU")
        with _connect(proc, argv, p.name, paths, deadline) as qmp:
            point("qemu-answered")
            say(f"{p.name}: pinning {len(p.cpus)} vCPUs to CPUs {CpuSet(p.cpus)}")
            vcpus = qmp.vcpu_threads()
            if sorted(vcpus) != list(range(len(p.cpus))):
                raise GuestError(
                    f"QEMU of partition {p.name} reports vCPUs {sorted(vcpus)}, "
                    f"expected 0-{len(p.cpus) - 1}",
                    partition=p.name,
                )
            _pin(root, proc.pid, p, plan.host_cpus, vcpus)
            _verify(root, proc.pid, p, plan.host_cpus, vcpus)
            point("vcpus-pinned")
            qmp.cont()
            status = qmp.status()
            if status != "running":
                raise GuestError(
                    f"QEMU of partition {p.name} is {status!r} after cont, not running",
                    partition=p.name,
                )
            point("guest-let-run")
        say(f"{p.name}: running (pid {proc.pid})")
        return RunningGuest(
            name=p.name, pid=proc.pid, vcpu_threads=vcpus, paths=paths, started_at=time.time()
        )
    except BaseException as e:
        _end(proc)
        remove_run_dir(paths.dir)
        if isinstance(e, PartitionError) or not isinstance(e, Exception):
            raise
        raise GuestError(f"starting partition {p.name} failed: {e}", partition=p.name) from e


def thread_affinities(root: HostRoot, pid: int) -> dict[int, CpuSet]:
    """Thread id -> the CPUs the kernel lets it run on, for every thread of ``pid``."""
    out: dict[int, CpuSet] = {}
    for tid in root.listdir(sysfs.task(pid)):
        status = root.read(sysfs.task(pid, tid, "status"))
        for line in (status or "").splitlines():
            if line.startswith("Cpus_allowed_list:"):
                out[int(tid)] = CpuSet.parse(line.split(":", 1)[1])
    return out


def thread_names(root: HostRoot, pid: int) -> dict[int, str]:
    """Thread id -> name (``CPU 0/KVM``, ``IO iothread0``... with ``debug-threads=on``)."""
    return {
        int(tid): root.read(sysfs.task(pid, tid, "comm"), "") or ""
        for tid in root.listdir(sysfs.task(pid))
    }


def is_running(root: HostRoot, pid: int, name: str) -> bool:
    """True when ``pid`` is alive and is a QEMU started for partition ``name``.

    The command line is checked because a pid recorded long ago may belong to
    another process now.
    """
    if not _alive(root, pid):
        return False
    argv = _cmdline(root, pid)
    if not argv or "qemu" not in os.path.basename(argv[0]):
        return False
    for flag, value in itertools.pairwise(argv):
        if flag == "-name" and value.split(",", 1)[0] == name:
            return True
    return False


def powerdown(
    paths: GuestPaths, pid: int, *, timeout: float = 60.0, root: HostRoot, qmp_timeout: float = 5.0
) -> None:
    """Ask the guest to power off (ACPI), wait up to ``timeout`` s, then ``quit``, then SIGKILL.

    Returns once the process is gone; its run directory is removed.
    """
    if _ours(root, pid, paths):
        sent = False
        try:
            with _qmp(paths.qmp, timeout=qmp_timeout) as qmp:
                qmp.system_powerdown()
            sent = True
            point("powerdown-sent")
        except GuestError as e:
            log.info("ACPI power-down of pid %d not sent: %s", pid, e)
        # Without the request sent there is nothing to wait for: go on to quit at once.
        if not _wait_gone(root, pid, timeout if sent else 0.0) and _ours(root, pid, paths):
            log.info("pid %d did not power down within %g s: quitting it", pid, timeout)
            try:
                with _qmp(paths.qmp, timeout=qmp_timeout) as qmp:
                    qmp.quit()
            except GuestError as e:
                log.info("QMP quit of pid %d failed: %s", pid, e)
            if not _wait_gone(root, pid, 10.0) and _ours(root, pid, paths):
                kill(pid, root=root)
    else:
        _reap(pid)
    point("qemu-gone")
    remove_run_dir(paths.dir)


def kill(pid: int, *, root: HostRoot | None = None, timeout: float = 10.0) -> None:
    """SIGKILL ``pid`` and wait until it is gone (reaping it when it is our child)."""
    r = root or HostRoot("/")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not _wait_gone(r, pid, timeout):
        raise GuestError(f"process {pid} is still there {timeout:g} s after SIGKILL")


def memlock_ceiling(root: HostRoot) -> int | None:
    """The highest RLIMIT_MEMLOCK this process can give a child: None when it can give any
    (it has CAP_SYS_RESOURCE), else its own hard limit (a container may withhold the
    capability; a limit can always be lowered, never raised past it)."""
    import resource

    status = root.read(sysfs.SELF_STATUS) or ""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            try:
                if int(line.split()[1], 16) & (1 << CAP_SYS_RESOURCE):
                    return None
            except (IndexError, ValueError):
                break
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    return None if hard == resource.RLIM_INFINITY else hard


CAP_SYS_RESOURCE = 24


# -- finding a QEMU again (reconciliation after a killed command) -----------------


def start_ticks(root: HostRoot, pid: int) -> int | None:
    """When ``pid`` started, in clock ticks after boot (/proc/PID/stat field 22), or None.

    With the pid it names one process for the whole uptime: a pid reused by another
    process has another start time.
    """
    stat = root.read(sysfs.proc(pid, "stat")) if pid > 0 else None
    if not stat:
        return None
    # Fields after "(comm)" start at field 3; comm may hold spaces and parentheses.
    rest = stat.rsplit(")", 1)[-1].split()
    return int(rest[19]) if len(rest) > 19 and rest[19].isdigit() else None


def identify(
    root: HostRoot, pid: int, name: str, paths: GuestPaths, ticks: int | None = None
) -> bool:
    """True when ``pid`` is alive and is the QEMU of partition ``name`` serving ``paths``.

    Its command line must name the partition (``-name NAME,...``) and this run
    directory's QMP socket (unique to one partition on one host); when ``ticks`` is
    known (recorded when it was spawned) its start time must match too.
    """
    if not _alive(root, pid):
        return False
    argv = _cmdline(root, pid)
    if not argv or "qemu" not in os.path.basename(argv[0]):
        return False
    named = any(
        flag == "-name" and value.split(",", 1)[0] == name
        for flag, value in itertools.pairwise(argv)
    )
    if not named or not any(str(paths.qmp) in a.replace(",,", ",") for a in argv):
        return False
    return ticks is None or start_ticks(root, pid) == ticks


def qmp_status(socket: str | Path, name: str, *, timeout: float = 2.0) -> str:
    """QEMU's run state (``running``, ``paused``, ``prelaunch``...) as QMP reports it."""
    with _qmp(Path(socket), timeout=timeout, partition=name) as qmp:
        return qmp.status()


def pid_in(pidfile: Path) -> int | None:
    """The pid QEMU wrote to its ``-pidfile``, or None."""
    return _pid_in(pidfile)


def find_by_socket(root: HostRoot, name: str, paths: GuestPaths) -> int | None:
    """A QEMU of ``name`` serving ``paths`` found among all processes: for a QEMU killed
    (with its spawner) before it wrote its pidfile."""
    for entry in root.listdir(sysfs.PROC):
        if entry.isdigit() and identify(root, int(entry), name, paths):
            return int(entry)
    return None


def adoptable(
    root: HostRoot, pid: int, p: Placement, host_cpus: CpuSet, paths: GuestPaths
) -> dict[int, int] | None:
    """The vCPU threads of a QEMU found after a killed start, if it got as far as ``launch``
    takes a guest: every vCPU pinned as planned and the guest let run.  None otherwise."""
    try:
        with _qmp(paths.qmp, timeout=5.0, partition=p.name) as qmp:
            if qmp.status() != "running":
                return None
            vcpus = qmp.vcpu_threads()
        if sorted(vcpus) != list(range(len(p.cpus))):
            return None
        _verify(root, pid, p, host_cpus, vcpus)
    except (GuestError, OSError, ValueError, KeyError, TypeError) as e:
        log.info("QEMU pid %d of partition %s is not adopted: %s", pid, p.name, e)
        return None
    return vcpus


# -- helpers -------------------------------------------------------------------


def _prepare_dirs(
    p: Placement, paths: GuestPaths, caps: QemuCaps, jail: Jail | None, root: HostRoot
) -> None:
    try:
        paths.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chown(paths.dir, 0, 0)
        os.chmod(paths.dir, 0o700)  # the umask may have cut it; sockets in here are root's
        # Leftovers of a QEMU that died without cleaning up would make QMP answer stale.
        for stale in (paths.qmp, paths.console, paths.pidfile):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        if jail is not None:
            # The confined QEMU's root: empty and root's, so that after its chroot it can
            # open no path at all (rule 10); whatever it needs it opened before.
            paths.chroot.mkdir(mode=0o555, exist_ok=True)
            os.chown(paths.chroot, 0, 0)
            os.chmod(paths.chroot, 0o555)
            # A device hot-plugged into a QEMU that died was left exposed in its root: the
            # new QEMU opens the devices it starts with before its chroot (guest/jail.py).
            withdraw_all(root, paths.chroot)
            if p.hotplug_slots:
                # Device nodes made in it later must open (guest/jail.py).
                give_root_a_mount(paths.chroot)
            for leftover in os.listdir(paths.chroot):
                raise GuestError(
                    f"the root directory {paths.chroot} of partition {p.name} is not empty "
                    f"({leftover}): remove what is in it",
                    partition=p.name,
                )
        paths.console_log.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        # The console log is root's alone (rule 10: another partition's user cannot read it).
        fd = os.open(paths.console_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.fchown(fd, 0, 0)
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        if p.spec.firmware == "uefi" and caps.ovmf_vars and not paths.ovmf_vars.exists():
            paths.ovmf_vars.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            shutil.copyfile(caps.ovmf_vars, paths.ovmf_vars)
    except OSError as e:
        raise GuestError(
            f"cannot prepare the files of partition {p.name}: {e}", partition=p.name
        ) from e


@contextlib.contextmanager
def _own_affinity(cpus: CpuSet) -> Iterator[None]:
    """Run the body on ``cpus``, so that QEMU (forked in it) starts on the host's CPUs.

    QEMU inherits this affinity at fork: its main loop and every thread it creates before
    we pin them stay off the partitions' CPUs from the first instruction.
    """
    before = os.sched_getaffinity(0)
    wanted = set(cpus)
    if not wanted or not wanted <= before:
        yield
        return
    os.sched_setaffinity(0, wanted)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextlib.contextmanager
def _connect(
    proc: subprocess.Popen[bytes], argv: list[str], name: str, paths: GuestPaths, deadline: float
) -> Iterator[Qmp]:
    last: GuestError | None = None
    while True:
        code = proc.poll()
        if code is not None:
            raise VMLaunchFailure(
                partition=name, exitcode=code, command=argv, output=_read_output(paths)
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise GuestError(
                f"QEMU of partition {name} did not answer on QMP in time"
                + (f" ({last})" if last else ""),
                partition=name,
            )
        if paths.qmp.exists():
            # QEMU greets only after preallocation: the wait is in this connect.
            qmp = _qmp(paths.qmp, timeout=remaining, partition=name)
            try:
                qmp.connect()
            except GuestError as e:
                last = e
            else:
                try:
                    yield qmp
                finally:
                    qmp.close()
                return
        time.sleep(0.01)  # QEMU is up in a fraction of a second: look often


def _pin(root: HostRoot, pid: int, p: Placement, host_cpus: CpuSet, vcpus: dict[int, int]) -> None:
    for index, tid in sorted(vcpus.items()):
        try:
            os.sched_setaffinity(tid, {p.cpus[index]})
        except OSError as e:
            raise GuestError(
                f"cannot pin vCPU {index} (thread {tid}) of partition {p.name} to CPU "
                f"{p.cpus[index]}: {e.strerror}",
                partition=p.name,
            ) from e
    if not host_cpus:
        return
    vcpu_tids = set(vcpus.values())
    for tid_text in root.listdir(sysfs.task(pid)):
        tid = int(tid_text)
        if tid in vcpu_tids:
            continue
        try:
            os.sched_setaffinity(tid, set(host_cpus))
        except ProcessLookupError:
            continue  # a short-lived worker thread that ended meanwhile
        except OSError as e:
            raise GuestError(
                f"cannot move thread {tid} of partition {p.name}'s QEMU to the host CPUs "
                f"{host_cpus}: {e.strerror}",
                partition=p.name,
            ) from e


def _verify(
    root: HostRoot, pid: int, p: Placement, host_cpus: CpuSet, vcpus: dict[int, int]
) -> None:
    actual = thread_affinities(root, pid)
    wrong: list[str] = []
    for index, tid in sorted(vcpus.items()):
        want = CpuSet([p.cpus[index]])
        if actual.get(tid) != want:
            wrong.append(f"vCPU {index} (thread {tid}) may run on {actual.get(tid)}, not {want}")
    if host_cpus:
        for tid, cpus in sorted(actual.items()):
            if tid not in vcpus.values() and cpus != host_cpus:
                wrong.append(f"thread {tid} may run on {cpus}, not the host CPUs {host_cpus}")
    if wrong:
        raise GuestError(
            f"QEMU of partition {p.name} is not pinned as planned: " + "; ".join(wrong),
            partition=p.name,
        )


def _pid_in(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _read_output(paths: GuestPaths) -> str:
    try:
        return paths.output.read_text(errors="replace")
    except OSError:
        return ""


def _end(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    _children.pop(proc.pid, None)


def _cmdline(root: HostRoot, pid: int) -> list[str]:
    try:
        raw = root.path(sysfs.proc(pid, "cmdline")).read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _alive(root: HostRoot, pid: int) -> bool:
    """The process exists and is not a zombie (a zombie has exited; only its parent's wait is due)."""
    if pid <= 0:
        return False
    stat = root.read(sysfs.proc(pid, "stat"))
    if stat is None:
        return False
    # "PID (comm) STATE ...": comm may hold spaces and parentheses, so split at the last ")".
    state = stat.rsplit(")", 1)[-1].split()[:1]
    return state != ["Z"] and state != ["X"]


def _ours(root: HostRoot, pid: int, paths: GuestPaths) -> bool:
    """Alive and still the QEMU that serves ``paths``: its QMP socket path is unique to it."""
    if not _alive(root, pid):
        return False
    return any(str(paths.qmp) in arg.replace(",,", ",") for arg in _cmdline(root, pid))


def _reap(pid: int) -> bool:
    """Collect ``pid`` if it is our exited child; True when it is known to be gone."""
    proc = _children.get(pid)
    if proc is not None:
        if proc.poll() is None:
            return False
        del _children[pid]
        return True
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False  # not our child: /proc tells
    return done == pid


def _wait_gone(root: HostRoot, pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if _reap(pid) or not _alive(root, pid):
            _reap(pid)
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
