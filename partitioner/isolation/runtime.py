"""The runtime half of ``isolation: full``: apply's actions that move the host's work, and put it back.

Every value replaced is written to the isolation record (``STATE_DIR/isolation.json``,
next to the state record and under the same lock) *before* the first write that
replaces it, and the record is written atomically: an ``apply`` killed in the middle
of the moves leaves a record that names every original, so the next ``apply``
finishes the job and the next ``destroy`` puts everything back.  What the kernel
refuses (EINVAL for a per-CPU kernel thread, EIO for a managed or fixed interrupt,
EPERM) is recorded as refused, not an error: ``audit`` names it, and only the
boot-time settings can fix it.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from partitioner.cpuset import CpuSet
from partitioner.errors import ApplyFailed
from partitioner.isolation.layout import Layout, PartitionCpus
from partitioner.isolation.moves import IrqMove, Moves, own_irq_moves, plan_moves
from partitioner.isolation.systemd import confine as systemd_confine
from partitioner.isolation.systemd import current as systemd_current
from partitioner.isolation.systemd import has_systemd
from partitioner.isolation.systemd import put_back as systemd_put_back
from partitioner.isolation.view import format_mask, read_host_work, read_irqs, read_task
from partitioner.kernel import sysfs
from partitioner.kernel.root import HostRoot
from partitioner.record.model import RunState, State
from partitioner.run import CommandFailed

log = logging.getLogger("partitioner.isolation")

RECORD_FILE = "isolation.json"
RECORD_VERSION = 1
# What the kernel answers when it will not move a task, interrupt or mask.
REFUSED = {errno_mod.EINVAL: "EINVAL", errno_mod.EIO: "EIO", errno_mod.EPERM: "EPERM"}
# What it answers when the thing is gone (a task that exited, an interrupt freed).
GONE = (errno_mod.ESRCH, errno_mod.ENOENT, errno_mod.ENODEV)
PASSES = 3  # a process that forked while we moved its parent: looked at again


# -- the record ------------------------------------------------------------------


def record_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / RECORD_FILE


def load_record(state_dir: str | Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(record_path(state_dir).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ApplyFailed(
            f"the isolation record {record_path(state_dir)} cannot be read ({e}); it names the "
            "affinities and masks to put back: repair or remove it"
        ) from e
    if not isinstance(doc, dict) or doc.get("version") != RECORD_VERSION:
        raise ApplyFailed(f"the isolation record {record_path(state_dir)} has an unknown version")
    return doc


def save_record(state_dir: str | Path, doc: Mapping[str, Any]) -> None:
    """Write temp, fsync, rename, fsync the directory: the old record or the new, never half."""
    d = Path(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".isolation.", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write((json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, record_path(d))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def drop_record(state_dir: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(record_path(state_dir))


def new_record(layout: Layout, mode: str = "full") -> dict[str, Any]:
    return {
        "version": RECORD_VERSION,
        "mode": mode,
        "layout": layout.to_json(),
        "tasks": {},  # "TID:STARTTIME" -> {pid, comm, old}
        "irqs": {},  # "N" -> {owner, old}
        "masks": {},  # path -> old, as a cpulist
        "refused": [],  # {kind, id, name, errno}
    }


def layout_from_json(doc: Mapping[str, Any]) -> Layout:
    parts = {
        str(n): PartitionCpus(
            name=str(n),
            cpus=CpuSet(int(c) for c in p["cpus"]),
            vcpu_cpus=tuple(int(c) for c in p["cpus"]),
            devices=tuple(str(a) for a in p["devices"]),
        )
        for n, p in sorted(doc["partitions"].items())
    }
    return Layout(reserve=CpuSet(int(c) for c in doc["reserve"]), partitions=parts)


def refused_irqs(doc: Mapping[str, Any] | None) -> frozenset[int]:
    if doc is None:
        return frozenset()
    return frozenset(int(r["id"]) for r in doc.get("refused", []) if r.get("kind") == "irq")


# -- the kernel's part -----------------------------------------------------------


def set_affinity(root: HostRoot, tid: int, cpus: CpuSet) -> None:
    """sched_setaffinity(2) on the live host; a test's fake kernel (a HostRoot with its own
    ``sched_setaffinity``) plays it on a tree.  OSError carries the kernel's errno."""
    fake = getattr(root, "sched_setaffinity", None)
    if fake is not None:
        fake(tid, cpus)
        return
    if not root.live:
        raise ValueError(f"{root!r} is a tree: affinities are set on the live host only")
    os.sched_setaffinity(tid, cpus.as_list())


def guests_of(state: State) -> dict[int, str]:
    """The QEMU pid of every running partition -> its name: their threads are placed already."""
    return {
        r.pid: n
        for n, r in state.partitions.items()
        if r.state is RunState.RUNNING and r.pid is not None
    }


def _errname(e: OSError) -> str:
    return REFUSED.get(e.errno or 0, errno_mod.errorcode.get(e.errno or 0, str(e.errno)))


def isolate(
    root: HostRoot, layout: Layout, guests: Mapping[int, str], state_dir: str | Path
) -> dict[str, Any]:
    """Move the host's work off the partitions' CPUs, recording each original first.  Idempotent:
    a record left by a killed run keeps its originals and the moves are finished."""
    doc = load_record(state_dir) or new_record(layout)
    doc["layout"] = layout.to_json()
    if root.live and has_systemd(root):
        _confine_slices(doc, layout, state_dir)
    for _ in range(PASSES):
        moves = plan_moves(layout, read_host_work(root), guests, refused_irqs=refused_irqs(doc))
        if not moves:
            break
        _move(root, doc, state_dir, moves)
    return doc


def steer_device_irqs(root: HostRoot, state_dir: str | Path) -> list[tuple[str, IrqMove]]:
    """The partitions' own ``vfio`` interrupts onto their partition's CPUs, wherever they are now.

    ``apply`` places those that exist when it runs; the ones asked for later (a guest's driver
    enabling MSI or MSI-X, QEMU asking again after a reset) take ``default_smp_affinity``, the
    reserve.  The supervisor calls this on every look, under the state lock.  Only a ``full``
    host's record is acted on, and only the partitions' own interrupts: the host's work that
    drifted back is ``audit``'s to name and ``apply``'s to move, not fought over here.  Each
    value replaced is recorded first, as ``isolate`` does, so ``destroy`` puts it back.
    Returns each move with the partition it was made for."""
    doc = load_record(state_dir)
    if doc is None or doc.get("mode") != "full":
        return []
    steered = own_irq_moves(layout_from_json(doc["layout"]), read_irqs(root), refused_irqs(doc))
    if steered:
        _move(root, doc, state_dir, Moves((), tuple(m for _, m in steered), (), ()))
    return steered


def _move(root: HostRoot, doc: dict[str, Any], state_dir: str | Path, moves: Moves) -> None:
    """The moves, each original in the saved record before the first write that replaces it."""
    _intend(doc, moves)
    save_record(state_dir, doc)
    _perform(root, doc, moves)
    save_record(state_dir, doc)


def _confine_slices(doc: dict[str, Any], layout: Layout, state_dir: str | Path) -> None:
    """systemd's slices: AllowedCPUs= the reserve, each unit's old value recorded first.  A
    systemd that refuses (no unified cgroup hierarchy, an old version) is recorded as refused:
    the affinity moves still hold the host's tasks."""
    if "systemd" not in doc:
        try:
            doc["systemd"] = systemd_current()
        except CommandFailed as e:
            doc["refused"].append(
                {"kind": "systemd", "id": "AllowedCPUs", "name": str(e), "errno": "-"}
            )
            doc["systemd"] = {}
            return
        save_record(state_dir, doc)
    try:
        systemd_confine(layout.reserve, tuple(doc["systemd"]))
    except CommandFailed as e:
        doc["refused"].append(
            {"kind": "systemd", "id": "AllowedCPUs", "name": str(e), "errno": "-"}
        )


def _intend(doc: dict[str, Any], moves: Moves) -> None:
    for t in moves.tasks:
        doc["tasks"].setdefault(
            f"{t.tid}:{t.starttime}", {"pid": t.pid, "comm": t.comm, "old": str(t.old)}
        )
    for i in moves.irqs:
        doc["irqs"].setdefault(str(i.irq), {"owner": i.owner, "old": str(i.old)})
    for m in moves.masks:
        doc["masks"].setdefault(m.path, str(m.old))


def _refuse(doc: dict[str, Any], kind: str, ident: int | str, name: str, e: OSError) -> None:
    entry = {"kind": kind, "id": ident, "name": name, "errno": _errname(e)}
    if entry not in doc["refused"]:
        doc["refused"].append(entry)


def _perform(root: HostRoot, doc: dict[str, Any], moves: Moves) -> None:
    for m in moves.masks:
        try:
            root.write(m.path, format_mask(m.new))
        except OSError as e:
            if e.errno not in REFUSED:
                raise
            del doc["masks"][m.path]
            _refuse(doc, "mask", m.path, m.path, e)
    for i in moves.irqs:
        try:
            root.write(sysfs.proc_irq(i.irq, "smp_affinity_list"), str(i.new))
        except OSError as e:
            if e.errno not in REFUSED and e.errno not in GONE:
                raise
            doc["irqs"].pop(str(i.irq), None)
            if e.errno in REFUSED:
                _refuse(doc, "irq", i.irq, i.owner, e)
    for t in moves.tasks:
        try:
            set_affinity(root, t.tid, t.new)
        except OSError as e:
            if e.errno not in REFUSED and e.errno not in GONE:
                raise
            doc["tasks"].pop(f"{t.tid}:{t.starttime}", None)
            if e.errno in REFUSED:
                _refuse(doc, "task", t.tid, t.comm, e)


def restore(root: HostRoot, state_dir: str | Path) -> list[str]:
    """Put back every value the record holds, then drop the record.  Returns notes on what the
    kernel would not take back (it stays where it is; nothing else can be done at run time).

    Idempotent: a restore killed midway leaves the record, and the next one writes the rest."""
    doc = load_record(state_dir)
    if doc is None:
        return []
    notes: list[str] = []
    if doc.get("systemd"):
        systemd_put_back(doc["systemd"])
    for path, old in sorted(doc["masks"].items()):
        try:
            root.write(path, format_mask(CpuSet.parse(old)))
        except OSError as e:
            if e.errno not in REFUSED and e.errno not in GONE:
                raise
            notes.append(f"{path} could not be put back to {old}: {_errname(e)}")
    for n, d in sorted(doc["irqs"].items(), key=lambda kv: int(kv[0])):
        try:
            root.write(sysfs.proc_irq(n, "smp_affinity_list"), d["old"])
        except OSError as e:
            if e.errno in GONE:
                continue
            if e.errno not in REFUSED:
                raise
            notes.append(
                f"interrupt {n} ({d['owner']}) could not be put back to CPUs {d['old']}: {_errname(e)}"
            )
    for key, d in sorted(doc["tasks"].items()):
        tid, start = (int(x) for x in key.split(":"))
        task = read_task(root, int(d["pid"]), tid)
        if task is None or task.starttime != start:
            continue  # it ended; its number may be someone else's now
        try:
            set_affinity(root, tid, CpuSet.parse(d["old"]))
        except OSError as e:
            if e.errno in GONE:
                continue
            if e.errno not in REFUSED:
                raise
            notes.append(
                f"task {tid} ({d['comm']}) could not be put back to CPUs {d['old']}: {_errname(e)}"
            )
    drop_record(state_dir)
    return notes


def in_place(
    root: HostRoot, layout: Layout, guests: Mapping[int, str], state_dir: str | Path
) -> bool:
    doc = load_record(state_dir)
    if doc is None or doc.get("layout") != layout.to_json():
        return False
    return not plan_moves(layout, read_host_work(root), guests, refused_irqs=refused_irqs(doc))
