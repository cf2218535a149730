"""The hugepage steps: a node's pool raised for a partition before it starts, given back after.

The pages a step adds are the partition's grant in the record; destroy gives back
exactly those, never pages the administrator put in the pool.  Each change is
an intent in the record before the pool is touched (a killed command's intent
is settled by the next run, :mod:`partitioner.record.reconcile`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NoReturn

from partitioner.engine.context import ApplyContext
from partitioner.engine.step import Step
from partitioner.errors import HugepageError
from partitioner.kernel import sysfs
from partitioner.kernel.hugepages import ensure_pages, pool_counts, pool_size, release_pages
from partitioner.kernel.root import HostRoot
from partitioner.killpoint import point
from partitioner.record.model import (
    HugepageGrant,
    PoolIntent,
    RunState,
    State,
    add_grant,
    drop_intent,
    settle_pool_intent,
)
from partitioner.units import page_size_name


def free_pages(root: HostRoot, node: int, size_bytes: int) -> int:
    return root.read_int(sysfs.hugepage_pool(size_bytes, node) + "/free_hugepages", 0) or 0


def give_back(ctx: ApplyContext, node: int, size_bytes: int, pages: int) -> int:
    """Shrink the pool by the ``pages`` added for a partition, once its QEMU has let go of them.

    A QEMU that has just exited still holds its pages for a moment, so ``release_pages``
    waits up to ``ctx.release_wait`` for them.  Returns the pages given back.
    """
    return release_pages(ctx.root, node, size_bytes, pages, settle=ctx.release_wait)


def _still_held(ctx: ApplyContext, node: int, size_bytes: int, pages: int, given: int) -> NoReturn:
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
    rec = drop_intent(ctx.state.partitions[name], intent)
    ctx.update(add_grant(rec, HugepageGrant(node, size_bytes, added)) if added else rec)


def _shrink_pool(ctx: ApplyContext, name: str, node: int, size_bytes: int, pages: int) -> int:
    """Give back up to ``pages`` of ``name``'s grant; returns the pages given back.

    The intent is saved before the pool shrinks, so a kill in between never makes the
    next run give the same pages back twice.
    """
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
    rec = drop_intent(ctx.state.partitions[name], intent)
    ctx.update(add_grant(rec, HugepageGrant(node, size_bytes, -given)))
    return given


def _settle_intent(ctx: ApplyContext, name: str, intent: PoolIntent) -> None:
    """Record what an interrupted pool change did, from the pool's size now (the one rule,
    :func:`~partitioner.record.model.settle_pool_intent`, that reconciliation follows too)."""
    now = pool_size(ctx.root, intent.node, intent.size_bytes)
    rec = ctx.state.partitions[name]
    ctx.update(settle_pool_intent(rec, intent, intent.before if now is None else now))
    ctx.commit()


@dataclass(frozen=True)
class _PagesStep(Step):
    """A change of a node's pool of one page size for a partition."""

    target: str
    node: int
    size_bytes: int
    pages: int

    @property
    def detail(self) -> str:
        return f"{self.pages} x {page_size_name(self.size_bytes)} pages on node {self.node}"


@dataclass(frozen=True)
class ReserveHugepages(_PagesStep):
    kind: str = "reserve-hugepages"

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
class ReleaseHugepages(_PagesStep):
    # pages: what the record says was added for this partition
    kind: str = "release-hugepages"

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


@dataclass(frozen=True)
class ReservePagesLive(_PagesStep):
    """Pages for memory a running partition is about to grow by, made free on its node first."""

    kind: str = "reserve-hugepages"

    def do(self, ctx: ApplyContext) -> None:
        want = self.pages + _idle_need(ctx.state, self.node, self.size_bytes, self.target)
        _raise_pool(ctx, self.target, self.node, self.size_bytes, want)

    def undo(self, ctx: ApplyContext) -> None:
        _give_back_grant(ctx, self.target, self.node, self.size_bytes, self.pages)

    def check(self, ctx: ApplyContext) -> bool:
        want = self.pages + _idle_need(ctx.state, self.node, self.size_bytes, self.target)
        return free_pages(ctx.root, self.node, self.size_bytes) >= want


def _give_back_grant(ctx: ApplyContext, name: str, node: int, size_bytes: int, pages: int) -> int:
    """Give back up to ``pages`` of what was added to the pool for ``name`` (never more than its
    grant: pages the administrator put in the pool stay)."""
    rec = ctx.state.partitions.get(name)
    if rec is None:
        return 0
    granted = sum(g.pages for g in rec.hugepages if (g.node, g.size_bytes) == (node, size_bytes))
    n = min(pages, granted)
    return _shrink_pool(ctx, name, node, size_bytes, n) if n > 0 else 0


@dataclass(frozen=True)
class ReleasePagesLive(_PagesStep):
    """Pages a running partition's guest has just given up (a shrink), taken out of the pool
    again when they were added for it."""

    kind: str = "release-hugepages"

    @property
    def detail(self) -> str:
        return f"up to {self.pages} x {page_size_name(self.size_bytes)} pages on node {self.node}"

    def do(self, ctx: ApplyContext) -> None:
        _give_back_grant(ctx, self.target, self.node, self.size_bytes, self.pages)

    def undo(self, ctx: ApplyContext) -> None:
        want = self.pages + _idle_need(ctx.state, self.node, self.size_bytes, self.target)
        _raise_pool(ctx, self.target, self.node, self.size_bytes, want)

    def check(self, ctx: ApplyContext) -> bool:
        return False
