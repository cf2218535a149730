"""``partition start NAME``, ``stop NAME [--timeout S]``, ``restart NAME``: one partition of the applied site."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from partitioner.cli.apply import add_lock_timeout, progress
from partitioner.cli.common import Context
from partitioner.engine.context import ApplyContext
from partitioner.engine.executor import execute
from partitioner.engine.guests import Start, Stop
from partitioner.errors import UsageError
from partitioner.inventory.model import Host
from partitioner.record.model import PartitionRecord, RunState, State, plan_of_state
from partitioner.record.reconcile import reconcile_store
from partitioner.record.store import StateStore


def register(sub: Any) -> None:
    for verb, text in (
        ("start", "start a stopped partition of the applied site"),
        ("stop", "power a partition down (ACPI), and end it after a timeout"),
        ("restart", "stop a partition and start it again"),
    ):
        p = sub.add_parser(verb, help=text)
        p.add_argument("name", metavar="NAME", help="the partition")
        if verb != "start":
            p.add_argument(
                "--timeout",
                metavar="S",
                type=float,
                default=60.0,
                help="seconds the guest gets to power down before QEMU is told to quit (default 60)",
            )
        add_lock_timeout(p)
        p.set_defaults(func=run, verb_name=verb)


def lifecycle_context(
    ctx: Context, store: StateStore, state: State, host: Host | None = None
) -> ApplyContext:
    """Actions outside apply act on the applied plan, as the record keeps it."""
    return ApplyContext(
        root=ctx.root(),
        plan=plan_of_state(state),
        state=state,
        run_dir=ctx.run_dir,
        log_dir=ctx.log_dir,
        state_dir=store.dir,
        host=host,
        on_progress=progress(ctx),
    )


def _record(state: State, name: str) -> PartitionRecord:
    rec = state.partitions.get(name)
    if rec is None:
        raise UsageError(
            f"no partition {name} has been applied here "
            f"(applied: {', '.join(state.partitions) or 'none'}); apply the manifest first"
        )
    return rec


def run(args: argparse.Namespace, ctx: Context) -> int:
    verb: str = args.verb_name
    ctx.require_live(verb)
    store = StateStore(ctx.state_dir)
    with store.lock(f"{verb} {args.name}", args.lock_timeout):
        found = reconcile_store(store, ctx.root())
        state = found.state
        ctx.reconciled(found.findings, done=True)
        rec = _record(state, args.name)
        if verb in ("stop", "restart"):
            if rec.state is RunState.RUNNING:
                actx = lifecycle_context(ctx, store, state)
                execute([Stop(args.name, timeout=args.timeout)], actx, store)
                state = actx.state
                ctx.say(f"{args.name} stopped")
            elif verb == "stop":
                if rec.state is RunState.FAILED:
                    # Its QEMU is gone already: say so in the record.
                    state = state.with_partition(replace(rec, state=RunState.STOPPED, pid=None))
                    store.save(state)
                ctx.say(f"{args.name} is not running")
        if verb in ("start", "restart"):
            rec = state.partitions[args.name]
            if rec.state is RunState.RUNNING:
                ctx.say(f"{args.name} is already running (pid {rec.pid})")
                return 0
            actx = lifecycle_context(ctx, store, state)
            # A restart whose start fails leaves the partition stopped, as it truly is.
            execute([Start(args.name)], actx, store)
            started = actx.state.partitions[args.name]
            ctx.say(f"{args.name} running (pid {started.pid})")
    return 0
