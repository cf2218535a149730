"""``partition destroy [FILE | --all]``: stop partitions and give back everything they hold."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from partitioner.cli.apply import add_lock_timeout, print_actions
from partitioner.cli.common import Context
from partitioner.cli.lifecycle import lifecycle_context
from partitioner.engine.diff import teardown
from partitioner.engine.executor import execute
from partitioner.engine.isolation import destroy_actions
from partitioner.engine.sriov import restore_all
from partitioner.errors import UsageError
from partitioner.record.reconcile import reconcile, reconcile_store
from partitioner.record.store import StateStore


def register(sub: Any) -> None:
    p = sub.add_parser("destroy", help="stop partitions and give their devices and hugepages back")
    p.add_argument(
        "file",
        metavar="FILE",
        nargs="?",
        help="destroy the partitions of this manifest (- reads standard input)",
    )
    p.add_argument("--all", action="store_true", help="destroy every applied partition")
    p.add_argument("--dry-run", action="store_true", help="print the actions and do nothing")
    p.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        default=60.0,
        help="seconds each guest gets to power down before QEMU is told to quit (default 60)",
    )
    add_lock_timeout(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    if (args.file is None) == (not args.all):
        raise UsageError("destroy needs a manifest FILE or --all (not both)")
    ctx.require_live("destroy")
    wanted: set[str] | None = None
    if args.file is not None:
        from partitioner.manifest.loader import load

        # Read first: a manifest that cannot be read changes nothing, not even a settled record.
        wanted = set(load(args.file).partitions)
    store = StateStore(ctx.state_dir)
    with store.lock("destroy", args.lock_timeout):
        root = ctx.root()
        found = reconcile(store.load(), root) if args.dry_run else reconcile_store(store, root)
        state = found.state
        ctx.reconciled(found.findings, done=not args.dry_run)
        names = set(state.partitions) if wanted is None else wanted & set(state.partitions)
        actions = teardown((r for n, r in state.partitions.items() if n in names), state)
        actions = destroy_actions(actions, state, names, store.dir)  # host back with the last
        if not set(state.partitions) - names:
            # The PFs' VF counts back with the last partition, after every claim is released.
            actions += restore_all(state)
        if not actions:
            ctx.say("nothing to do")
            return 0
        print_actions(ctx, actions, "destroy would:" if args.dry_run else "destroying:")
        if args.dry_run:
            return 0
        host = None
        if any(state.partitions[n].claims for n in names):
            from partitioner.inventory import scan

            # Only a failed give-back needs the host: to claim the group again on undo.
            host = scan(root)
        actx = lifecycle_context(ctx, store, state, host)
        actx.stop_timeout = args.timeout
        execute(actions, actx, store)
        if not actx.state.partitions and actx.state.site is not None:
            store.save(replace(actx.state, site=None))
        ctx.say(f"destroyed: {', '.join(sorted(names))}")
        if not actx.state.partitions:
            from partitioner.boot import watcher

            # Nothing left to watch: the supervisor apply started goes with the last partition.
            ended = watcher.end(root, store.dir)
            if ended is not None:
                ctx.info(f"partition: supervisor (pid {ended.pid}) ended")
    return 0
