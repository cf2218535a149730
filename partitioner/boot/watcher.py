"""Who watches a site for crashes: the one supervisor of a state directory.

``on_crash: restart`` needs a supervisor (:mod:`partitioner.boot.supervisor`) running
beside the guests.  ``apply`` makes sure one watches (docs/decisions.md, "A
supervisor after apply"):

- at most one supervisor watches a state directory: it holds an exclusive
  ``flock`` on ``supervisor.lock`` there for as long as it runs, so the kernel,
  not a file's text, says whether one is watching (a killed supervisor's lock
  goes with it);
- the holder writes ``supervisor.pid`` beside it (pid, start time, how it was
  started), written aside and renamed.  The file is only trusted while the lock
  is held, and only for a pid that is alive, started when the file says and
  runs ``host supervise`` for this directory: a stale file (dead pid, a pid
  reused by another process) names nobody, and nobody is signalled because of it;
- where systemd is PID 1, ``apply`` starts it as a transient unit
  (``systemd-run``); elsewhere as a detached process, in a session of its own
  and re-parented to init (util-linux's ``setsid --fork``), so that it outlives
  the command that started it.  One that is already watching is adopted, never
  doubled;
- ``destroy`` of the last partition ends the one ``apply`` started (SIGTERM, or
  ``systemctl stop``); one started by hand (``host supervise``, ``host boot``)
  is left to whoever started it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from partitioner.kernel.root import HostRoot
from partitioner.record.store import flock_held

LOCK_FILE = "supervisor.lock"
PID_FILE = "supervisor.pid"
LOG_FILE = "supervisor.log"
START_WAIT_S = 20.0  # a deadline for a new supervisor to take its lock (TCG, shared cores)
END_WAIT_S = 10.0

How = Literal["detached", "systemd", "foreground"]


@dataclass(frozen=True)
class Watcher:
    """What ``status`` says of the supervisor of a state directory."""

    watching: bool  # a supervisor holds the lock
    pid: int | None = None  # its pid, when its pid file is trusted
    how: How | None = None
    unit: str | None = None  # the transient systemd unit, for ``how == "systemd"``

    def to_json(self) -> dict[str, Any]:
        return {"watching": self.watching, "pid": self.pid, "how": self.how, "unit": self.unit}

    def describe(self) -> str:
        if not self.watching:
            return (
                "none is watching: crashed partitions are not restarted (on_crash); "
                "`partition apply` starts one"
            )
        who = f"pid {self.pid}" if self.pid is not None else "a process"
        how = {
            "detached": "started by apply",
            "systemd": f"systemd unit {self.unit}",
            "foreground": "host supervise or host boot",
            None: "",
        }[self.how]
        return f"{who}{f' ({how})' if how else ''} restarts crashed partitions (on_crash)"


def unit_name(state_dir: Path) -> str:
    """The transient unit of a state directory: one per directory, stable across commands."""
    digest = hashlib.sha256(str(Path(state_dir).absolute()).encode()).hexdigest()[:12]
    return f"partition-supervise-{digest}.service"


def _lock_held(state_dir: Path) -> bool:
    """True while some process holds the supervisor lock."""
    return flock_held(state_dir / LOCK_FILE)


def _read_pid_file(state_dir: Path) -> Mapping[str, Any] | None:
    try:
        doc = json.loads((state_dir / PID_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _start_ticks(root: HostRoot, pid: int) -> int | None:
    from partitioner.guest.launch import start_ticks

    return start_ticks(root, pid)


def _cmdline(root: HostRoot, pid: int) -> list[str]:
    try:
        raw = root.path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_our_supervisor(root: HostRoot, pid: int, state_dir: Path, ticks: int | None) -> bool:
    """``pid`` is alive, started at ``ticks`` and runs ``host supervise`` for ``state_dir``."""
    if pid <= 0 or ticks is None or _start_ticks(root, pid) != ticks:
        return False
    argv = _cmdline(root, pid)
    if "supervise" not in argv:
        return False
    want = str(Path(state_dir).absolute())
    return any(a == want or a == f"--state-dir={want}" for a in argv)


def watcher(root: HostRoot, state_dir: Path) -> Watcher:
    """Who watches ``state_dir`` now."""
    if not _lock_held(state_dir):
        return Watcher(False)
    doc = _read_pid_file(state_dir)
    if doc is None:
        return Watcher(True)
    pid, ticks = doc.get("pid"), doc.get("start_ticks")
    how = doc.get("how")
    if (
        not isinstance(pid, int)
        or not isinstance(ticks, int)
        or how not in ("detached", "systemd", "foreground")
        or not is_our_supervisor(root, pid, state_dir, ticks)
    ):
        return Watcher(True)
    unit = doc.get("unit") if isinstance(doc.get("unit"), str) else None
    return Watcher(True, pid, how, unit)


def _write_pid_file(state_dir: Path, doc: Mapping[str, Any]) -> None:
    """Written aside, synced and renamed: a reader sees the old file or the new, never half."""
    path = state_dir / PID_FILE
    tmp = state_dir / f".{PID_FILE}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (json.dumps(dict(doc), sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@contextlib.contextmanager
def hold(
    root: HostRoot,
    state_dir: Path,
    how: How,
    *,
    wait: Callable[[], bool] | None,
    poll: float = 0.5,
) -> Iterator[bool]:
    """Be the supervisor of ``state_dir`` for the body: yields True once the lock is ours.

    With ``wait`` None, a lock held by another supervisor yields False at once (a detached
    supervisor then leaves: the site is watched already).  Otherwise it waits, looking every
    ``poll`` seconds, until the lock is free or ``wait()`` says stop (False then)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    # Not inherited (PEP 446): a QEMU this supervisor restarts must not keep the lock alive.
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if wait is None or not wait():
                    yield False
                    return
                time.sleep(poll)
        pid = os.getpid()
        doc: dict[str, Any] = {"pid": pid, "start_ticks": _start_ticks(root, pid), "how": how}
        if how == "systemd":
            doc["unit"] = unit_name(state_dir)
        _write_pid_file(state_dir, doc)
        try:
            yield True
        finally:
            # Ours to remove only while we hold the lock: nobody else can have replaced it.
            with contextlib.suppress(OSError):
                (state_dir / PID_FILE).unlink()
    finally:
        os.close(fd)  # lets go of the lock


# -- starting one, ending one ----------------------------------------------------------


def supervise_argv(state_dir: Path, how: How) -> list[str]:
    """The supervisor as this same installation runs it (the package now imported)."""
    return [
        sys.executable,
        "-m",
        "partitioner.cli.main",
        "--state-dir",
        str(Path(state_dir).absolute()),
        "host",
        "supervise",
        "--as",
        how,
    ]


def systemd_run_argv(state_dir: Path, env: Mapping[str, str]) -> list[str]:
    """A transient unit that runs the supervisor, restarted by systemd if it fails; the
    guests are not its processes to kill when it stops (KillMode=process)."""
    argv = [
        "systemd-run",
        f"--unit={unit_name(state_dir)}",
        f"--description=Restart crashed partitions of {Path(state_dir).absolute()}",
        "--property=KillMode=process",
        "--property=Restart=on-failure",
        "--collect",
        "--quiet",
    ]
    argv.extend(f"--setenv={k}={v}" for k, v in sorted(env.items()))
    return [*argv, *supervise_argv(state_dir, "systemd")]


def _wait_until(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def ensure(root: HostRoot, state_dir: Path, log_dir: Path, env: Mapping[str, str]) -> Watcher:
    """A supervisor watches ``state_dir`` when this returns (the one already there, adopted,
    or a new one); :class:`~partitioner.errors.GuestError` when a new one did not come up."""
    from partitioner.boot.check import init_system
    from partitioner.errors import GuestError
    from partitioner.run import CommandFailed, run, spawn

    found = watcher(root, state_dir)
    if found.watching:
        return found
    if init_system(root) == "systemd" and root.live:
        try:
            ours = {k: v for k, v in env.items() if k.startswith("PARTITION_")}
            run(systemd_run_argv(state_dir, ours), timeout=60)
        except CommandFailed as e:
            raise GuestError(f"could not start the supervisor as a systemd unit: {e}") from e
    else:
        log_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(log_dir / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            # setsid --fork: its first process exits at once (waited here), the second starts
            # a session of its own and becomes the supervisor, a child of init.
            proc = spawn(
                ["setsid", "--fork", *supervise_argv(state_dir, "detached")],
                stdout=fd,
                env=env,
                cwd="/",
            )
            rc = proc.wait(timeout=60)
        except CommandFailed as e:
            raise GuestError(f"could not start the supervisor: {e}") from e
        finally:
            os.close(fd)
        if rc != 0:
            raise GuestError(f"could not start the supervisor: setsid --fork exited with {rc}")
    if not _wait_until(lambda: watcher(root, state_dir).pid is not None, START_WAIT_S):
        raise GuestError(
            f"the supervisor did not start within {START_WAIT_S:g}s: see {log_dir / LOG_FILE}; "
            "`partition host supervise` runs it in the foreground"
        )
    return watcher(root, state_dir)


def end(root: HostRoot, state_dir: Path) -> Watcher | None:
    """End the supervisor ``apply`` started for ``state_dir``; the one ended, or None (none
    watches, or it was started by hand, or its pid file is not trusted)."""
    from partitioner.run import CommandFailed, run

    found = watcher(root, state_dir)
    if not found.watching or found.pid is None or found.how == "foreground":
        return None
    if found.how == "systemd" and found.unit is not None:
        with contextlib.suppress(CommandFailed):
            run(["systemctl", "stop", found.unit], timeout=60)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(found.pid, signal.SIGTERM)
    _wait_until(lambda: not _lock_held(state_dir), END_WAIT_S)
    return found
