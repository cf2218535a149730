"""The state record on disk: one JSON file, written atomically after every action, and its lock.

Writes go ``write temp -> fsync -> rename -> fsync dir``, so a crash at any
point leaves either the old record or the new one, never half of one.  One
``flock`` on ``STATE_DIR/lock`` keeps two changing commands apart; the holder
writes its pid and verb there so a waiting command can say who it waits for.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from partitioner.errors import BusyError, StateError
from partitioner.killpoint import point
from partitioner.record.codec import decode, encode, why
from partitioner.record.model import State

STATE_FILE = "state.json"
LOCK_FILE = "lock"


def flock_held(path: Path) -> bool:
    """True while some process holds an exclusive flock on ``path`` (a shared one cannot be
    taken); False for a file nobody locks, or none at all."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing lets go of the shared lock, if it was taken
    return False


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / STATE_FILE
        self.lock_path = self.dir / LOCK_FILE
        self._held: int | None = None

    def load(self) -> State:
        """The record as it is on disk, its whole shape checked here (the one place it is read).

        A record that is not what this version writes (garbage, a list for an object,
        missing keys, wrong types, negative numbers, nesting too deep to parse) is a
        StateError (exit 2) naming the file and what to do: never half-read.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError as e:
            if not self.path.is_symlink():
                return State()
            # A link to nothing (the state on a filesystem that is not mounted) is not "no
            # partitions": read as one, apply would claim again what runs.
            raise StateError(
                f"cannot read the state record {self.path}: it is a symbolic link to "
                f"{os.readlink(self.path)}, which does not exist; check that it is a readable "
                "file (or move it aside if nothing runs)",
                path=str(self.path),
            ) from e
        except OSError as e:
            raise StateError(
                f"cannot read the state record {self.path}: {e.strerror}; "
                f"check that it is a readable file (or move it aside if nothing runs)",
                path=str(self.path),
            ) from e
        try:
            return decode(data)
        except (
            ValueError,
            KeyError,
            TypeError,
            IndexError,
            AttributeError,
            RecursionError,
            OverflowError,
        ) as e:
            raise StateError(
                f"the state record {self.path} is damaged ({why(e)}); it is not changed. "
                "Check which guests run (ps -C qemu-system-x86_64), "
                f"stop them by hand if needed, then move {self.path} aside and apply again",
                path=str(self.path),
            ) from e

    def save(self, state: State) -> None:
        """Replace the record atomically: after a crash the old or the new file is there, whole."""
        self._mkdir()
        data = encode(state)
        tmp = self.dir / f".{STATE_FILE}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StateError(
                f"cannot write the state record {self.path}: {e.strerror}", path=str(self.path)
            ) from e
        # The rename is durable only once the directory entry is on disk.
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._sweep()
        point("state-saved")

    def _mkdir(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise StateError(
                f"cannot use the state directory {self.dir}: {e.strerror}; "
                "give --state-dir (or PARTITION_STATE_DIR) a directory this user can write",
                path=str(self.dir),
            ) from e
        if not self.dir.is_dir():
            raise StateError(
                f"the state directory {self.dir} is not a directory; "
                "give --state-dir (or PARTITION_STATE_DIR) a directory",
                path=str(self.dir),
            )

    def _sweep(self) -> None:
        """Remove temp files of saves that died before their rename (their process is gone)."""
        for p in self.dir.glob(f".{STATE_FILE}.*.tmp"):
            pid_text = p.name[len(STATE_FILE) + 2 : -4]
            if not pid_text.isdigit() or int(pid_text) == os.getpid():
                continue
            try:
                os.kill(int(pid_text), 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    p.unlink()
            except PermissionError:
                pass

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it (``pid 4242 (apply)``), or "" if unknown."""
        try:
            return self.lock_path.read_text().strip()
        except OSError:
            return ""

    def busy(self) -> bool:
        """True while another command holds the lock (its flock, not the text it left:
        a killed holder's text stays, its flock does not)."""
        return flock_held(self.lock_path)

    @contextlib.contextmanager
    def lock(self, verb: str, timeout: float = 60.0) -> Iterator[None]:
        """Hold the state lock for ``verb``; wait up to ``timeout`` s for another holder, then fail naming it."""
        self._mkdir()
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StateError(
                f"cannot open the lock {self.lock_path} of the state directory: {e.strerror}; "
                "check that it is a writable file",
                path=str(self.lock_path),
            ) from e
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno_mod.EWOULDBLOCK, errno_mod.EAGAIN):
                        raise
                if time.monotonic() >= deadline:
                    who = self.holder() or "another partition command"
                    raise BusyError(
                        f"the state in {self.dir} is locked by {who}; waited {timeout:g}s. "
                        "Wait for it to finish, then run this again",
                        path=str(self.lock_path),
                        holder=who,
                    )
                time.sleep(0.1)
            os.ftruncate(fd, 0)
            since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            os.pwrite(fd, f"pid {os.getpid()} ({verb}) since {since}\n".encode(), 0)
            self._held = fd
            try:
                yield
            finally:
                self._held = None
                # Clear our name before letting go so a waiter never names a finished holder.
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
