"""The steps ``apply`` takes, each knowing how to undo itself, and the executor that unwinds them.

``diff(plan, state, host)`` compares the plan with the state record and gives
the ordered actions that converge the host; ``--dry-run`` prints them;
``execute(actions, ctx, store)`` runs them, saving the record after each one,
and on a failure undoes those done, newest first (design.md, principle 6).

Every action changes the host and the record together: ``ctx.state`` is the
record as it stands after the last step, and it is what gets saved.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, runtime_checkable

from partitioner.errors import ApplyFailed, PartitionError, RollbackIncomplete
from partitioner.inventory.model import Host
from partitioner.isolation.cgroup import fence, unfence
from partitioner.kernel import sysfs
from partitioner.kernel.root import HostRoot
from partitioner.killpoint import point
from partitioner.planning.model import Placement, Plan
from partitioner.record.state import (
    HugepageGrant,
    PartitionRecord,
    PoolIntent,
    RunState,
    State,
    StateStore,
    plan_of_state,
)
from partitioner.run import CommandFailed
from partitioner.units import format_size, page_size_name

if TYPE_CHECKING:
    from partitioner.guest.caps import QemuCaps

log = logging.getLogger("partitioner.engine.actions")


@dataclass
class ApplyContext:
    """What actions act with: the host door, the plan being applied, and the record as it stands."""

    root: HostRoot
    plan: Plan
    state: State
    run_dir: Path
    log_dir: Path
    state_dir: Path | None = None  # where UEFI variable stores persist
    host: Host | None = None  # the scanned host: claiming a group needs it
    qemu_binary: str = "qemu-system-x86_64"
    stop_timeout: float = 60.0  # ACPI power-down before QEMU is told to quit
    undo_stop_timeout: float = 5.0  # a guest started by this very apply need not shut down politely
    launch_timeout: float = 120.0
    release_wait: float = 10.0  # for an exited QEMU's hugepages to be free again
    on_progress: Callable[[str], None] | None = None
    store: StateStore | None = None  # set by execute: an intent is saved before its change
    _caps: QemuCaps | None = field(default=None, repr=False)

    def commit(self) -> None:
        """Save the record as it stands now, mid-action: an intent must be on disk before
        the host change it announces (execute saves after each action anyway)."""
        if self.store is not None:
            self.store.save(self.state)

    def caps(self) -> QemuCaps:
        if self._caps is None:
            from partitioner.guest.caps import probe_qemu

            self._caps = probe_qemu(self.qemu_binary)
        return self._caps

    def progress(self, text: str) -> None:
        if self.on_progress is not None:
            self.on_progress(text)

    def record(self, name: str) -> PartitionRecord:
        """The partition's record, created (stopped, holding nothing) from the plan if it has none."""
        rec = self.state.partitions.get(name)
        if rec is None:
            rec = PartitionRecord(name=name, state=RunState.STOPPED, placement=self.placement(name))
            self.state = self.state.with_partition(rec)
        return rec

    def update(self, rec: PartitionRecord) -> None:
        self.state = self.state.with_partition(rec)

    def placement(self, name: str) -> Placement:
        """The placement to act on: the plan's, or for a partition leaving the plan, the recorded one."""
        if name in self.plan.placements:
            return self.plan.placements[name]
        return self.state.partitions[name].placement

    def plan_for(self, name: str) -> Plan:
        return self.plan if name in self.plan.placements else plan_of_state(self.state)


@runtime_checkable
class Action(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def detail(self) -> str: ...

    def do(self, ctx: Any) -> None: ...
    def undo(self, ctx: Any) -> None: ...
    def check(self, ctx: Any) -> bool:
        """True when the host and the record already show this done (a resumed apply skips it)."""
        ...

    def to_json(self) -> dict[str, Any]: ...


class _Base:
    kind: str
    target: str

    @property
    def detail(self) -> str:
        return ""

    def to_json(self) -> dict[str, Any]:
        return {"action": self.kind, "target": self.target, "detail": self.detail}

    def __str__(self) -> str:
        d = self.detail
        return f"{self.kind} {self.target}" + (f": {d}" if d else "")


# -- hugepages ------------------------------------------------------------------


def free_pages(root: HostRoot, node: int, size_bytes: int) -> int:
    return root.read_int(sysfs.hugepage_pool(size_bytes, node) + "/free_hugepages", 0) or 0


def give_back(ctx: ApplyContext, node: int, size_bytes: int, pages: int) -> int:
    """Shrink the pool by the ``pages`` added for a partition, once its QEMU has let go of them.

    A QEMU that has just exited still holds its pages for a moment, so ``release_pages``
    waits up to ``ctx.release_wait`` for them.  Returns the pages given back.
    """
    from partitioner.kernel.hugepages import release_pages

    return release_pages(ctx.root, node, size_bytes, pages, settle=ctx.release_wait)


def _still_held(ctx: ApplyContext, node: int, size_bytes: int, pages: int, given: int) -> NoReturn:
    from partitioner.errors import HugepageError
    from partitioner.kernel.hugepages import pool_counts

    nr, free = pool_counts(ctx.root, node, size_bytes)
    raise HugepageError(
        f"only {given} of the {pages} {page_size_name(size_bytes)} hugepages added on node "
        f"{node} could be given back: {nr - free} of the pool's {nr} are still in use "
        f"after {ctx.release_wait:g}s (does another process hold them?)",
        node=node,
        size_bytes=size_bytes,
        wanted=nr - (pages - given),
        got=nr,
        original=nr + given,
    )


def _idle_need(state: State, node: int, size_bytes: int, but: str) -> int:
    """Pages on ``node`` that recorded, not running partitions will want back when they start.

    Their pages sit free in the pool; a new partition must not count them as its own.
    """
    need = 0
    for name, rec in state.partitions.items():
        p = rec.placement
        if name == but or rec.state is RunState.RUNNING or p.hugepage_bytes != size_bytes:
            continue
        need += sum(b for n, b in p.memory_per_node if n == node) // size_bytes
    return need


def _raise_pool(ctx: ApplyContext, name: str, node: int, size_bytes: int, want_free: int) -> None:
    """Make ``want_free`` pages free in the pool, recording the pages added as ``name``'s grant.

    The intent (pool size before, size asked for) is saved before the pool is raised, so a
    kill between raising it and recording the grant leaves what the next run needs to
    record the grant after all (partitioner.record.reconcile).
    """
    from partitioner.kernel.hugepages import ensure_pages, pool_counts

    nr, free = pool_counts(ctx.root, node, size_bytes)
    if free >= want_free:
        return
    intent = PoolIntent(node, size_bytes, "raise", nr, nr + want_free - free)
    rec = ctx.record(name)
    ctx.update(replace(rec, pool_intents=(*rec.pool_intents, intent)))
    ctx.commit()
    try:
        added = ensure_pages(ctx.root, node, size_bytes, want_free)
    except BaseException:
        # ensure_pages put the pool back; whatever it reached is recorded all the same.
        _settle_intent(ctx, name, intent)
        raise
    point("pool-raised")
    rec = _drop_intent(ctx.state.partitions[name], intent)
    ctx.update(_add_grant(rec, HugepageGrant(node, size_bytes, added)) if added else rec)


def _shrink_pool(ctx: ApplyContext, name: str, node: int, size_bytes: int, pages: int) -> int:
    """Give back up to ``pages`` of ``name``'s grant; returns the pages given back.

    The intent is saved before the pool shrinks, so a kill in between never makes the
    next run give the same pages back twice.
    """
    from partitioner.kernel.hugepages import pool_counts

    nr, _free = pool_counts(ctx.root, node, size_bytes)
    intent = PoolIntent(node, size_bytes, "release", nr, max(0, nr - pages))
    rec = ctx.state.partitions[name]
    ctx.update(replace(rec, pool_intents=(*rec.pool_intents, intent)))
    ctx.commit()
    try:
        given = give_back(ctx, node, size_bytes, pages)
    except BaseException:
        _settle_intent(ctx, name, intent)
        raise
    point("pool-shrunk")
    rec = _drop_intent(ctx.state.partitions[name], intent)
    ctx.update(_add_grant(rec, HugepageGrant(node, size_bytes, -given)))
    return given


def _settle_intent(ctx: ApplyContext, name: str, intent: PoolIntent) -> None:
    """Record what an interrupted pool change did, from the pool's size now."""
    from partitioner.errors import HugepageError
    from partitioner.kernel.hugepages import pool_counts

    try:
        now, _free = pool_counts(ctx.root, intent.node, intent.size_bytes)
    except HugepageError:
        now = intent.before
    moved = intent.settle(now)
    rec = _drop_intent(ctx.state.partitions[name], intent)
    if intent.op == "raise":
        rec = _add_grant(rec, HugepageGrant(intent.node, intent.size_bytes, moved))
    else:
        rec = _add_grant(rec, HugepageGrant(intent.node, intent.size_bytes, -moved))
    ctx.update(rec)
    ctx.commit()


def _drop_intent(rec: PartitionRecord, intent: PoolIntent) -> PartitionRecord:
    left = list(rec.pool_intents)
    if intent in left:
        left.remove(intent)
    return replace(rec, pool_intents=tuple(left))


@dataclass(frozen=True)
class ReserveHugepages(_Base):
    target: str
    node: int
    size_bytes: int
    pages: int
    kind: str = "reserve-hugepages"

    @property
    def detail(self) -> str:
        return f"{self.pages} x {page_size_name(self.size_bytes)} pages on node {self.node}"

    def do(self, ctx: ApplyContext) -> None:
        ctx.record(self.target)
        want = self.pages + _idle_need(ctx.state, self.node, self.size_bytes, self.target)
        _raise_pool(ctx, self.target, self.node, self.size_bytes, want)

    def undo(self, ctx: ApplyContext) -> None:
        rec = ctx.state.partitions.get(self.target)
        if rec is None:
            return
        for g in rec.hugepages:
            if (g.node, g.size_bytes) == (self.node, self.size_bytes):
                given = _shrink_pool(ctx, self.target, g.node, g.size_bytes, g.pages)
                if given < g.pages:
                    _still_held(ctx, g.node, g.size_bytes, g.pages, given)
                return

    def check(self, ctx: ApplyContext) -> bool:
        rec = ctx.state.partitions.get(self.target)
        if rec is not None and rec.state is RunState.RUNNING:
            return True
        want = self.pages + _idle_need(ctx.state, self.node, self.size_bytes, self.target)
        return free_pages(ctx.root, self.node, self.size_bytes) >= want


@dataclass(frozen=True)
class ReleaseHugepages(_Base):
    target: str
    node: int
    size_bytes: int
    pages: int  # what the record says was added for this partition
    kind: str = "release-hugepages"

    @property
    def detail(self) -> str:
        return f"{self.pages} x {page_size_name(self.size_bytes)} pages on node {self.node}"

    def do(self, ctx: ApplyContext) -> None:
        rec = ctx.state.partitions[self.target]
        # The record's grant now, not diff's copy: a resumed destroy gives back only what is left.
        pages = next(
            (
                g.pages
                for g in rec.hugepages
                if (g.node, g.size_bytes) == (self.node, self.size_bytes)
            ),
            0,
        )
        given = _shrink_pool(ctx, self.target, self.node, self.size_bytes, pages)
        if given < pages:
            # The record keeps what is still added, so a later destroy can finish the job.
            _still_held(ctx, self.node, self.size_bytes, pages, given)

    def undo(self, ctx: ApplyContext) -> None:
        have = free_pages(ctx.root, self.node, self.size_bytes)
        _raise_pool(ctx, self.target, self.node, self.size_bytes, have + self.pages)

    def check(self, ctx: ApplyContext) -> bool:
        rec = ctx.state.partitions.get(self.target)
        return rec is None or not any(
            (g.node, g.size_bytes) == (self.node, self.size_bytes) for g in rec.hugepages
        )


def _add_grant(rec: PartitionRecord, grant: HugepageGrant) -> PartitionRecord:
    """``grant`` added to (or, with negative pages, taken from) the record's grants."""
    merged: dict[tuple[int, int], int] = {}
    for g in (*rec.hugepages, grant):
        merged[(g.node, g.size_bytes)] = merged.get((g.node, g.size_bytes), 0) + g.pages
    return replace(
        rec,
        hugepages=tuple(HugepageGrant(n, s, c) for (n, s), c in sorted(merged.items()) if c > 0),
    )


def _drop_grant(rec: PartitionRecord, grant: HugepageGrant) -> PartitionRecord:
    return replace(
        rec,
        hugepages=tuple(
            g for g in rec.hugepages if (g.node, g.size_bytes) != (grant.node, grant.size_bytes)
        ),
    )


# -- devices --------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimGroup(_Base):
    target: str
    group: int
    functions: tuple[tuple[str, str | None], ...]  # (address, driver now) for the listing
    kind: str = "claim-group"

    @property
    def detail(self) -> str:
        fns = ", ".join(f"{a} ({d or 'no driver'} -> vfio-pci)" for a, d in self.functions)
        return f"IOMMU group {self.group}: {fns}"

    def do(self, ctx: ApplyContext) -> None:
        from partitioner.vfio.claim import claim_group, release_group
        from partitioner.vfio.ioctl import check_group

        if ctx.host is None:
            raise ApplyFailed(f"claiming IOMMU group {self.group} needs the scanned host")
        placement = ctx.placement(self.target)
        none_ok = {str(d.address) for d in placement.devices if d.reset_none_ok}
        _claim_intent(ctx, self.target, self.group)
        try:
            # The plan's verdict asked again on the host as scanned now, reset methods
            # included, before anything is claimed (partitioner.vfio.preview).
            claim = claim_group(ctx.root, ctx.host, self.group, reset_none_ok=none_ok)
        except BaseException:
            # claim_group gave back what it took: the intent is void.
            ctx.update(_drop_claim(ctx.state.partitions[self.target], self.group))
            ctx.commit()
            raise
        point("group-claimed")
        rec = _drop_claim(ctx.state.partitions[self.target], self.group)
        ctx.update(replace(rec, claims=(*rec.claims, claim.to_json())))
        try:
            # Ask the kernel itself before QEMU is started: a group that is not viable is
            # named here, not reported by QEMU later (design.md, Devices).
            check_group(ctx.root, ctx.host, self.group, reset_none_ok=none_ok)
        except BaseException:
            release_group(ctx.root, claim)
            ctx.update(_drop_claim(ctx.state.partitions[self.target], self.group))
            raise

    def undo(self, ctx: ApplyContext) -> None:
        from partitioner.vfio.claim import GroupClaim, release_group

        rec = ctx.state.partitions.get(self.target)
        if rec is None:
            return
        for c in rec.claims:
            if int(c["group"]) == self.group:
                release_group(ctx.root, GroupClaim.from_json(dict(c)))
                ctx.update(_drop_claim(rec, self.group))
                return

    def check(self, ctx: ApplyContext) -> bool:
        rec = ctx.state.partitions.get(self.target)
        if rec is None or self.group not in rec.claim_groups():
            return False
        return _claim_in_place(ctx.root, rec, self.group)


@dataclass(frozen=True)
class ReleaseGroup(_Base):
    target: str
    group: int
    functions: tuple[tuple[str, str | None], ...]  # (address, driver it goes back to)
    kind: str = "release-group"

    @property
    def detail(self) -> str:
        fns = ", ".join(f"{a} (vfio-pci -> {d or 'no driver'})" for a, d in self.functions)
        return f"IOMMU group {self.group}: {fns}"

    def do(self, ctx: ApplyContext) -> None:
        from partitioner.vfio.claim import GroupClaim, release_group

        rec = ctx.state.partitions[self.target]
        for c in rec.claims:
            if int(c["group"]) == self.group:
                release_group(ctx.root, GroupClaim.from_json(dict(c)))
                ctx.update(_drop_claim(rec, self.group))
                return

    def undo(self, ctx: ApplyContext) -> None:
        from partitioner.vfio.claim import claim_group

        if ctx.host is None:
            raise ApplyFailed(f"claiming IOMMU group {self.group} again needs the scanned host")
        _claim_intent(ctx, self.target, self.group)
        claim = claim_group(ctx.root, ctx.host, self.group)
        rec = _drop_claim(ctx.state.partitions[self.target], self.group)
        ctx.update(replace(rec, claims=(*rec.claims, claim.to_json())))

    def check(self, ctx: ApplyContext) -> bool:
        rec = ctx.state.partitions.get(self.target)
        return rec is None or self.group not in rec.claim_groups()


def _claim_intent(ctx: ApplyContext, name: str, group: int) -> None:
    """Save, before any function is unbound, the drivers the group's functions have now.

    A kill during the claim leaves this ``pending`` claim; the next run gives the functions
    back to these drivers (partitioner.record.reconcile), exactly once.
    """
    from partitioner.vfio.claim import group_endpoints, record_function

    assert ctx.host is not None
    fns = [record_function(ctx.root, str(fn.address)) for fn in group_endpoints(ctx.host, group)]
    rec = ctx.record(name)
    pending = {
        "group": group,
        "functions": [f.to_json() for f in fns],
        "loaded_vfio_pci": False,
        "pending": True,
    }
    ctx.update(replace(rec, claims=(*rec.claims, pending)))
    ctx.commit()


def _drop_claim(rec: PartitionRecord, group: int) -> PartitionRecord:
    return replace(rec, claims=tuple(c for c in rec.claims if int(c["group"]) != group))


def _claim_in_place(root: HostRoot, rec: PartitionRecord, group: int) -> bool:
    for c in rec.claims:
        if int(c["group"]) == group and not c.get("pending"):
            return all(
                root.readlink_name(sysfs.pci_device(str(f["address"]), "driver")) == "vfio-pci"
                for f in c.get("functions", [])
            )
    return False


# -- guests ---------------------------------------------------------------------


def _placement_summary(p: Placement) -> str:
    pages = page_size_name(p.hugepage_bytes) if p.hugepage_bytes else "normal"
    nodes = ",".join(str(n) for n in p.numa_nodes)
    devs = f", {len(p.devices)} PCI function(s)" if p.devices else ""
    return (
        f"QEMU on host CPUs {p.cpuset}, {format_size(p.memory_bytes)} ({pages} pages) "
        f"on node {nodes}{devs}"
    )


def _launch(ctx: ApplyContext, name: str, placement: Placement, plan: Plan) -> PartitionRecord:
    from partitioner.guest.argv import guest_paths, qemu_argv
    from partitioner.guest.launch import launch, start_ticks

    before = ctx.record(name)
    paths = guest_paths(ctx.run_dir, ctx.log_dir, name, state_dir=ctx.state_dir)
    caps = ctx.caps()
    argv = qemu_argv(placement, plan, paths, caps)
    # The intent first: the record names the run directory (and so the pidfile and the QMP
    # socket) before a QEMU can exist that outlives this command.
    ctx.update(
        replace(
            before,
            state=RunState.STARTING,
            placement=placement,
            argv=tuple(argv),
            pid=None,
            start_ticks=None,
            vcpu_threads={},
            paths=paths.to_json(),
            started_at=None,
        )
    )
    ctx.commit()

    def spawned(pid: int) -> None:
        rec = ctx.state.partitions[name]
        ctx.update(replace(rec, pid=pid, start_ticks=start_ticks(ctx.root, pid)))
        ctx.commit()

    try:
        guest = launch(
            placement,
            plan,
            paths,
            caps,
            root=ctx.root,
            timeout=ctx.launch_timeout,
            on_progress=ctx.on_progress,
            on_spawned=spawned,
        )
    except BaseException:
        # launch ended its QEMU and removed its run directory: the partition is as it was.
        rec = ctx.state.partitions[name]
        ctx.update(replace(rec, state=before.state, pid=None, start_ticks=None))
        ctx.commit()
        raise
    rec = replace(
        ctx.state.partitions[name],
        state=RunState.RUNNING,
        vcpu_threads=dict(guest.vcpu_threads),
        started_at=guest.started_at,
    )
    ctx.update(rec)
    try:
        fence(ctx.root, rec, plan.host_cpus)  # its cgroup, vCPUs and emulator apart
    except BaseException:
        _stop(ctx, rec, ctx.undo_stop_timeout)
        raise
    return rec


def _stop(ctx: ApplyContext, rec: PartitionRecord, timeout: float) -> None:
    from partitioner.guest.argv import GuestPaths, guest_paths
    from partitioner.guest.launch import is_running, powerdown

    if rec.pid is not None and is_running(ctx.root, rec.pid, rec.name):
        ctx.progress(f"stopping {rec.name}")
        paths = (
            GuestPaths.from_json(dict(rec.paths))
            if rec.paths
            else guest_paths(ctx.run_dir, ctx.log_dir, rec.name, state_dir=ctx.state_dir)
        )
        powerdown(paths, rec.pid, timeout=timeout, root=ctx.root)
    elif rec.paths:
        shutil.rmtree(GuestPaths.from_json(dict(rec.paths)).dir, ignore_errors=True)
    unfence(ctx.root, rec.name)
    ctx.update(
        replace(
            rec,
            state=RunState.STOPPED,
            pid=None,
            start_ticks=None,
            vcpu_threads={},
            started_at=None,
        )
    )


@dataclass(frozen=True)
class Start(_Base):
    target: str
    summary: str = ""
    kind: str = "start"

    @property
    def detail(self) -> str:
        return self.summary

    def do(self, ctx: ApplyContext) -> None:
        _launch(ctx, self.target, ctx.placement(self.target), ctx.plan_for(self.target))

    def undo(self, ctx: ApplyContext) -> None:
        rec = ctx.state.partitions.get(self.target)
        if rec is not None:
            _stop(ctx, rec, ctx.undo_stop_timeout)

    def check(self, ctx: ApplyContext) -> bool:
        from partitioner.guest.launch import is_running

        rec = ctx.state.partitions.get(self.target)
        return (
            rec is not None
            and rec.state is RunState.RUNNING
            and rec.pid is not None
            and is_running(ctx.root, rec.pid, self.target)
        )


@dataclass(frozen=True)
class Stop(_Base):
    target: str
    timeout: float | None = None  # None: the context's stop timeout
    kind: str = "stop"

    @property
    def detail(self) -> str:
        return "ACPI power-down, then quit"

    def do(self, ctx: ApplyContext) -> None:
        rec = ctx.state.partitions[self.target]
        _stop(ctx, rec, self.timeout if self.timeout is not None else ctx.stop_timeout)

    def undo(self, ctx: ApplyContext) -> None:
        rec = ctx.state.partitions[self.target]
        _launch(ctx, self.target, rec.placement, plan_of_state(ctx.state))

    def check(self, ctx: ApplyContext) -> bool:
        rec = ctx.state.partitions.get(self.target)
        return rec is None or rec.state is RunState.STOPPED


@dataclass(frozen=True)
class Forget(_Base):
    """Drop a partition that holds nothing any more from the record."""

    target: str
    kept: PartitionRecord  # the record as diff saw it, to put back on undo
    kind: str = "forget"

    @property
    def detail(self) -> str:
        return "remove from the state record"

    def do(self, ctx: ApplyContext) -> None:
        ctx.state = ctx.state.without_partition(self.target)

    def undo(self, ctx: ApplyContext) -> None:
        ctx.update(
            replace(
                self.kept,
                state=RunState.STOPPED,
                pid=None,
                vcpu_threads={},
                started_at=None,
                claims=(),
                hugepages=(),
            )
        )

    def check(self, ctx: ApplyContext) -> bool:
        return self.target not in ctx.state.partitions


@dataclass(frozen=True)
class Replace(_Base):
    """A running partition whose placement changed: taken down and brought up again, as one step."""

    target: str
    steps: tuple[Action, ...]
    why: str
    kind: str = "replace"

    @property
    def detail(self) -> str:
        return self.why

    def do(self, ctx: ApplyContext) -> None:
        done: list[Action] = []
        try:
            for step in self.steps:
                step.do(ctx)
                done.append(step)
        except BaseException:
            # Half a replacement is worse than none: put the old partition back before reporting.
            for step in reversed(done):
                step.undo(ctx)
            raise

    def undo(self, ctx: ApplyContext) -> None:
        for step in reversed(self.steps):
            step.undo(ctx)

    def check(self, ctx: ApplyContext) -> bool:
        return False

    def to_json(self) -> dict[str, Any]:
        d = super().to_json()
        d["steps"] = [s.to_json() for s in self.steps]
        return d


# -- diff -------------------------------------------------------------------------


def _stop_key(rec: PartitionRecord) -> tuple[int, str]:
    return (rec.placement.spec.order, rec.name)


def teardown(records: Iterable[PartitionRecord]) -> list[Action]:
    """Take partitions down and give back what they hold: stops first (reverse start order), then
    devices and pages, so nothing is released from under a guest that still runs."""
    recs = sorted(records, key=_stop_key, reverse=True)
    out: list[Action] = [Stop(r.name) for r in recs if r.state is RunState.RUNNING]
    for r in recs:
        out.extend(_release(r))
        out.append(Forget(r.name, r))
    return out


def _release(r: PartitionRecord) -> list[Action]:
    out: list[Action] = []
    for c in reversed(r.claims):
        fns = tuple((str(f["address"]), f.get("driver")) for f in c.get("functions", []))
        out.append(ReleaseGroup(r.name, int(c["group"]), fns))
    out.extend(ReleaseHugepages(r.name, g.node, g.size_bytes, g.pages) for g in r.hugepages)
    return out


def _bring_up(
    p: Placement,
    host: Host,
    shortfall: dict[tuple[int, int], int],
    state: State,
    held: Iterable[int] = (),
) -> list[Action]:
    out: list[Action] = []
    if p.hugepage_bytes is not None:
        size = p.hugepage_bytes
        for node, nbytes in p.memory_per_node:
            pages = nbytes // size
            key = (node, size)
            if key not in shortfall:
                pool = host.nodes[node].hugepages.get(size) if node in host.nodes else None
                shortfall[key] = _idle_need(state, node, size, p.name) - (pool.free if pool else 0)
            # Partitions started earlier in this apply take their pages before this one asks.
            shortfall[key] += pages
            if shortfall[key] > 0:
                out.append(ReserveHugepages(p.name, node, size, pages))
    out.extend(_claims(p, host, held))
    out.append(Start(p.name, _placement_summary(p)))
    return out


def _claims(p: Placement, host: Host, held: Iterable[int]) -> list[Action]:
    out: list[Action] = []
    have = set(held)
    for g in p.iommu_groups:
        if g in have:
            continue
        from partitioner.vfio.preview import (
            group_endpoints,  # what claim_group takes, listed as it will
        )

        fns = tuple((str(fn.address), fn.driver) for fn in group_endpoints(host, g))
        out.append(ClaimGroup(p.name, g, fns))
    return out


def _changes(new: Placement, old: Placement) -> str:
    said: list[str] = []
    if new.cpus != old.cpus:
        said.append(f"CPUs {old.cpuset} -> {new.cpuset}")
    if new.memory_per_node != old.memory_per_node:
        said.append(f"memory {format_size(old.memory_bytes)} -> {format_size(new.memory_bytes)}")
    if new.hugepage_bytes != old.hugepage_bytes:
        said.append("page size changed")
    if tuple(d.address for d in new.devices) != tuple(d.address for d in old.devices):
        said.append("devices changed")
    if (new.sockets, new.cores, new.threads) != (old.sockets, old.cores, old.threads):
        said.append("CPU topology changed")
    if (new.spec.boot, new.spec.disks, new.spec.firmware) != (
        old.spec.boot,
        old.spec.disks,
        old.spec.firmware,
    ):
        said.append("boot, disks or firmware changed")
    return ", ".join(said) or "placement changed"


def held_replacements(plan: Plan, state: State, *, replace: set[str]) -> dict[str, str]:
    """Running partitions the manifest changed but that are left running: name -> what changed.

    A running partition is never restarted behind its operator's back; ``--replace NAME``
    or ``--replace-all`` says to.
    """
    out: dict[str, str] = {}
    for name, p in plan.placements.items():
        rec = state.partitions.get(name)
        if (
            rec is not None
            and rec.state is RunState.RUNNING
            and name not in replace
            and not p.same_resources(rec.placement)
        ):
            out[name] = _changes(p, rec.placement)
    return out


def diff(plan: Plan, state: State, host: Host, *, replace: set[str]) -> list[Action]:
    """The ordered actions that take the host from ``state`` to ``plan``; [] when nothing changed."""
    out: list[Action] = []
    gone = [r for n, r in state.partitions.items() if n not in plan.placements]
    out.extend(teardown(gone))
    shortfall: dict[tuple[int, int], int] = {}
    for p in plan.start_order():
        rec = state.partitions.get(p.name)
        if rec is None:
            out.extend(_bring_up(p, host, shortfall, state))
        elif not p.same_resources(rec.placement):
            if rec.state is RunState.RUNNING:
                if p.name not in replace:
                    continue  # held_replacements() reports it
                steps = [Stop(p.name), *_release(rec), Forget(p.name, rec)]
                steps += _bring_up(p, host, shortfall, state)
                out.append(Replace(p.name, tuple(steps), _changes(p, rec.placement)))
            else:
                out.extend([*_release(rec), Forget(p.name, rec)])
                out.extend(_bring_up(p, host, shortfall, state))
        elif rec.state is not RunState.RUNNING:
            # What is missing (pages or a claim an apply killed half-way never made, pages a
            # stopped partition gave back) is taken before it starts.
            out.extend(_bring_up(p, host, shortfall, state, rec.claim_groups()))
    return out


# -- execute ------------------------------------------------------------------------


# What an action may fail with that is the host's or the user's doing, not a bug.
_EXPECTED = (PartitionError, CommandFailed, OSError)


def execute(
    actions: Sequence[Action], ctx: Any, store: StateStore, *, restore: State | None = None
) -> None:
    """Run ``actions`` in order, saving ``ctx.state`` after each.

    On a failure the actions done are undone newest first and the record is
    put back as it was: ``ApplyFailed`` (exit 4).  If an undo fails too, the
    rest are still undone and ``RollbackIncomplete`` (exit 5) lists what is left.
    A failure that is a bug (not one of the project's errors) is unwound the
    same way and then re-raised as it is, so it is reported as a bug.

    ``restore`` is the record to put back after a complete rollback when it is
    not ``ctx.state`` as given (apply adds the new site to it before the first step).
    """
    initial: State = ctx.state if restore is None else restore
    if getattr(ctx, "store", None) is None:
        ctx.store = store
    done: list[Action] = []
    for action in _flatten(actions):
        if action.check(ctx):
            log.info("already done: %s", action)
            continue
        log.info("doing: %s", action)
        try:
            action.do(ctx)
        except (Exception, KeyboardInterrupt) as e:
            leftover = _unwind(done, ctx, store)
            if leftover:
                store.save(ctx.state)
                raise RollbackIncomplete(
                    f"{action.kind} {action.target} failed: {e}; undoing the actions before it "
                    f"failed too, {len(leftover)} thing(s) are left in place",
                    cause=e,
                    leftover=leftover,
                ) from e
            if done:
                # Every step is undone, so the record the apply started from is true again.
                ctx.state = initial
                store.save(initial)
            if not isinstance(e, _EXPECTED):
                raise
            raise ApplyFailed(
                f"{action.kind} {action.target} failed: {e}\n"
                + (
                    f"the {len(done)} action(s) done before it were undone; the host is as it was"
                    if done
                    else "nothing had been changed"
                ),
                cause=e,
            ) from e
        point(f"did-{action.kind}")
        done.append(action)
        store.save(ctx.state)


def _flatten(actions: Sequence[Action]) -> list[Action]:
    """A replacement runs as its steps, so the record is saved after each of them too."""
    out: list[Action] = []
    for a in actions:
        out.extend(_flatten(a.steps) if isinstance(a, Replace) else [a])
    return out


def _unwind(done: Sequence[Action], ctx: Any, store: StateStore) -> list[str]:
    leftover: list[str] = []
    for action in reversed(done):
        log.info("undoing: %s", action)
        try:
            action.undo(ctx)
        except Exception as e:
            leftover.append(f"{action.kind} {action.target} ({action.detail}): undo failed: {e}")
            continue
        store.save(ctx.state)
    return leftover


def actions_json(actions: Sequence[Action]) -> list[dict[str, Any]]:
    return [a.to_json() for a in actions]


def describe(actions: Sequence[Action]) -> list[str]:
    return [str(a) for a in actions]


__all__ = [
    "Action",
    "ApplyContext",
    "ClaimGroup",
    "Forget",
    "ReleaseGroup",
    "ReleaseHugepages",
    "Replace",
    "ReserveHugepages",
    "Start",
    "Stop",
    "actions_json",
    "describe",
    "diff",
    "execute",
    "held_replacements",
    "teardown",
]
