"""The user steps of rule 10: a partition's own uid and gid, taken before its QEMU first starts
and given back when it is destroyed.

The user is a slot in a fixed range (``record.model.USER_BASE``, docs/decisions.md "A user
of its own per partition"): nothing is written to ``/etc/passwd`` or ``/etc/group``, so the
only host change is the record itself, saved before a QEMU runs with that uid.  A slot is
taken only when no account entry and no process uses its id, and no other partition of the
record holds it.  Giving it back ends every process still running with that uid (by the
range's definition, only this partition's QEMU can be one) and drops it from the record.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, replace

from partitioner.engine.context import ApplyContext
from partitioner.engine.step import Step
from partitioner.errors import StateError
from partitioner.kernel import sysfs
from partitioner.kernel.root import HostRoot
from partitioner.killpoint import point
from partitioner.planning.confine import USER_BASE, USER_SLOTS, in_user_range
from partitioner.record.model import State


def account_ids(root: HostRoot) -> set[int]:
    """The uids of ``/etc/passwd`` and gids of ``/etc/group`` that fall in the partitions' range."""
    ids: set[int] = set()
    for path in (sysfs.ETC_PASSWD, sysfs.ETC_GROUP):
        for line in (root.read(path) or "").splitlines():
            fields = line.split(":")
            if len(fields) > 2 and fields[2].isdigit() and in_user_range(int(fields[2])):
                ids.add(int(fields[2]))
    return ids


def process_ids(root: HostRoot) -> dict[int, set[int]]:
    """uid or gid in the partitions' range -> the processes that run with it (real or effective).

    A zombie is left out: it has exited and holds nothing; only its parent's wait is due."""
    out: dict[int, set[int]] = {}
    for entry in root.listdir(sysfs.PROC):
        if not entry.isdigit():
            continue
        status = root.read(sysfs.proc(entry, "status")) or ""
        if any(
            ln.startswith("State:") and ln.split()[1:2] in (["Z"], ["X"])
            for ln in status.splitlines()
        ):
            continue
        for line in status.splitlines():
            if line.startswith(("Uid:", "Gid:")):
                for v in line.split()[1:3]:
                    if v.isdigit() and in_user_range(int(v)):
                        out.setdefault(int(v), set()).add(int(entry))
    return out


def free_user(state: State, root: HostRoot, name: str) -> int:
    """The lowest uid of the range that no partition of ``state``, account or process uses."""
    held = {r.uid for n, r in state.partitions.items() if r.uid is not None and n != name}
    taken = held | account_ids(root) | set(process_ids(root))
    for uid in range(USER_BASE, USER_BASE + USER_SLOTS):
        if uid not in taken:
            return uid
    raise StateError(
        f"no free user for partition {name}: every id of {USER_BASE}-{USER_BASE + USER_SLOTS - 1} "
        "is held by a partition, an account or a process"
    )


def ensure_user(ctx: ApplyContext, name: str) -> int:
    """The partition's uid, taken and saved in the record first if it has none."""
    rec = ctx.record(name)
    if rec.uid is not None:
        return rec.uid
    uid = free_user(ctx.state, ctx.root, name)
    ctx.update(replace(rec, uid=uid))
    ctx.commit()  # saved before any process runs with it
    point("user-taken")
    return uid


def end_processes(root: HostRoot, uid: int, *, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process that runs with ``uid`` (a partition's), and wait until none is left."""
    ended: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        pids = sorted(process_ids(root).get(uid, set()))
        if not pids:
            return ended
        if time.monotonic() >= deadline:
            raise StateError(
                f"processes {', '.join(map(str, pids))} still run as the partition user {uid} "
                f"{timeout:g} s after SIGKILL"
            )
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if pid not in ended:
                ended.append(pid)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)


def _give_back(ctx: ApplyContext, name: str) -> None:
    rec = ctx.state.partitions.get(name)
    if rec is None or rec.uid is None:
        return
    end_processes(ctx.root, rec.uid)
    point("user-processes-ended")
    ctx.update(replace(rec, uid=None))


@dataclass(frozen=True)
class TakeUser(Step):
    """A uid and gid of its own for a partition about to start confined (rule 10)."""

    target: str
    kind: str = "take-user"

    @property
    def detail(self) -> str:
        return f"a uid and gid of its own (from {USER_BASE}) for its QEMU"

    def do(self, ctx: ApplyContext) -> None:
        ensure_user(ctx, self.target)

    def undo(self, ctx: ApplyContext) -> None:
        _give_back(ctx, self.target)

    def check(self, ctx: ApplyContext) -> bool:
        rec = ctx.state.partitions.get(self.target)
        return rec is not None and rec.uid is not None


@dataclass(frozen=True)
class GiveBackUser(Step):
    """The partition's uid given back: no process of it left, no longer in the record."""

    target: str
    uid: int
    kind: str = "give-back-user"

    @property
    def detail(self) -> str:
        return f"uid {self.uid}: no process left with it"

    def do(self, ctx: ApplyContext) -> None:
        _give_back(ctx, self.target)

    def undo(self, ctx: ApplyContext) -> None:
        rec = ctx.state.partitions.get(self.target)
        if rec is not None and rec.uid is None:
            ctx.update(replace(rec, uid=self.uid))

    def check(self, ctx: ApplyContext) -> bool:
        rec = ctx.state.partitions.get(self.target)
        return rec is None or rec.uid is None
