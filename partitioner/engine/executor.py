"""The executor: steps run in order, the record saved after each, and on a failure undone newest first.

This is principle 6 of the design: apply is a list of steps with ``do``, ``undo``
and ``check``; a resumed command skips what ``check`` finds done; a failure
unwinds what was done and says whether the host is as it was (exit 4) or what
is left (exit 5).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from partitioner.engine.context import ApplyContext
from partitioner.engine.step import Action, Replace
from partitioner.errors import ApplyFailed, PartitionError, RollbackIncomplete
from partitioner.killpoint import point
from partitioner.record.model import State
from partitioner.record.store import StateStore

log = logging.getLogger("partitioner.engine")


# What an action may fail with that is the host's or the user's doing, not a bug.
_EXPECTED = (PartitionError, OSError)


def execute(
    actions: Sequence[Action], ctx: ApplyContext, store: StateStore, *, restore: State | None = None
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
    if ctx.store is None:
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


def _unwind(done: Sequence[Action], ctx: ApplyContext, store: StateStore) -> list[str]:
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
