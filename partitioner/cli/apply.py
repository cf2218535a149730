"""``partition apply FILE [--dry-run] [--replace NAME]... [--replace-all]``: converge the host."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Any

from partitioner.cli.common import MANIFEST_HELP, Context
from partitioner.engine.prepare import converge, prepare
from partitioner.engine.step import Action
from partitioner.record.store import StateStore

DEFAULT_LOCK_TIMEOUT = 60.0


def register(sub: Any) -> None:
    p = sub.add_parser("apply", help="converge the host to a site manifest")
    p.add_argument("file", metavar="FILE", help=MANIFEST_HELP)
    p.add_argument("--dry-run", action="store_true", help="print the actions and do nothing")
    p.add_argument(
        "--replace",
        metavar="NAME",
        action="append",
        default=[],
        help="restart running partition NAME if the manifest changed it (repeatable)",
    )
    p.add_argument(
        "--replace-all", action="store_true", help="restart every running partition that changed"
    )
    p.add_argument(
        "--no-supervise",
        action="store_true",
        help="do not start a supervisor: crashed partitions are not restarted (on_crash) "
        "unless `partition host supervise` runs",
    )
    add_lock_timeout(p)
    p.add_argument(
        "--stop-timeout",
        metavar="S",
        type=float,
        default=60.0,
        help="seconds a guest gets to power down before QEMU is told to quit (default 60)",
    )
    p.set_defaults(func=run)


def add_lock_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lock-timeout",
        metavar="S",
        type=float,
        default=DEFAULT_LOCK_TIMEOUT,
        help=f"seconds to wait for another partition command to finish (default {DEFAULT_LOCK_TIMEOUT:g})",
    )


def progress(ctx: Context) -> Callable[[str], None] | None:
    """Long steps say what they do on a terminal, and stay quiet in a pipe (docs/cli-reference.md)."""
    if ctx.verbosity > 0 or (ctx.verbosity == 0 and ctx.err.isatty()):
        return lambda text: ctx.info(f"partition: {text}")
    return None


def print_actions(ctx: Context, actions: Sequence[Action], heading: str) -> None:
    ctx.say(heading)
    for a in actions:
        ctx.say(f"  {a.kind:<18} {a.target:<14} {a.detail}")


def _watch(
    args: argparse.Namespace, ctx: Context, store: StateStore, doc: dict[str, Any] | None
) -> None:
    """A supervisor watches the applied site (on_crash), the one there or a new one
    (partitioner.boot.watcher).  Failing to start one does not undo what was applied: it is said,
    and `status` says no supervisor watches."""
    from partitioner.boot import watcher
    from partitioner.errors import GuestError

    root = ctx.root()
    if args.no_supervise or not store.load().partitions:
        found = watcher.watcher(root, store.dir)
    else:
        env = {
            k: v
            for k, v in (
                ("PARTITION_RUN_DIR", str(ctx.run_dir)),
                ("PARTITION_LOG_DIR", str(ctx.log_dir)),
            )
        }
        before = watcher.watcher(root, store.dir)
        try:
            found = watcher.ensure(root, store.dir, ctx.log_dir, {**os.environ, **env})
        except GuestError as e:
            ctx.warn(f"partition: warning: {e}; crashed partitions are not restarted (on_crash)")
            found = watcher.watcher(root, store.dir)
        else:
            if not before.watching:
                ctx.info(f"partition: supervisor: {found.describe()}")
    if doc is not None:
        doc["supervisor"] = found.to_json()


def run(args: argparse.Namespace, ctx: Context) -> int:
    ctx.require_live("apply")
    root = ctx.root()
    store = StateStore(ctx.state_dir)
    # A dry run changes nothing, so it neither waits for nor blocks a running apply.
    lock = contextlib.nullcontext() if args.dry_run else store.lock("apply", args.lock_timeout)
    with lock:
        prepared = prepare(
            args.file,
            root,
            store,
            replace_names=args.replace,
            replace_all=args.replace_all,
            act=not args.dry_run,
            on_reconciled=lambda found: ctx.reconciled(found, done=not args.dry_run),
        )
        for name, change in prepared.held.items():
            ctx.warn(
                f"partition: {name} is running and the manifest changed it ({change}); "
                f"it is left as it runs. Use --replace {name} to restart it with the new placement"
            )
        acts = prepared.actions
        if ctx.json:
            doc: dict[str, Any] = {
                "actions": [a.to_json() for a in acts],
                "held": dict(prepared.held),
                "notes": list(prepared.notes),
                "dry_run": bool(args.dry_run),
            }
        if not acts:
            if not args.dry_run:
                _watch(args, ctx, store, doc if ctx.json else None)
            if ctx.json:
                doc["applied"] = False
                ctx.emit_json(doc)
            else:
                ctx.say("nothing to do")
            return 0
        if args.dry_run:
            if ctx.json:
                doc["applied"] = False
                ctx.emit_json(doc)
            else:
                print_actions(ctx, acts, "apply would:")
            return 0
        if not ctx.json:
            print_actions(ctx, acts, "applying:")
            # Out now, not at exit: an apply that is killed has said what it had begun.
            ctx.out.flush()
        converge(
            prepared,
            root=root,
            store=store,
            run_dir=ctx.run_dir,
            log_dir=ctx.log_dir,
            stop_timeout=args.stop_timeout,
            on_progress=progress(ctx),
        )
        _watch(args, ctx, store, doc if ctx.json else None)
        if ctx.json:
            doc["applied"] = True
            ctx.emit_json(doc)
        else:
            ctx.say(f"done: {len(acts)} action{'s' if len(acts) != 1 else ''}")
    return 0
