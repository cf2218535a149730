"""``partition audit [NAME]``: one row per finding; exit 0 clean, 3 when anything drifted (docs/cli-reference.md)."""

from __future__ import annotations

import argparse
from typing import Any

from partitioner.cli.common import Context, table


def register(sub: Any) -> None:
    p = sub.add_parser(
        "audit", help="check that every running partition still owns what the plan gave it"
    )
    p.add_argument("name", metavar="NAME", nargs="?", help="only this partition")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    from partitioner.audit import DRIFT, audit
    from partitioner.errors import UsageError
    from partitioner.isolation.runtime import load_record
    from partitioner.record.reconcile import reconcile
    from partitioner.record.store import StateStore

    store = StateStore(ctx.state_dir)
    root = ctx.root()
    # Read-only: the record is not rewritten; what the next verb that holds the lock will
    # settle is said (and is ``reconciled`` in --json), and the audit judges the result.
    found = reconcile(store.load(), root, busy=store.busy())
    ctx.reconciled(found.findings, done=False)
    state = found.state
    if args.name is not None and args.name not in state.partitions:
        raise UsageError(
            f"no partition {args.name} has been applied here "
            f"(applied: {', '.join(state.partitions) or 'none'})"
        )
    result = audit(root, state, load_record(store.dir), None if args.name is None else [args.name])
    code = 3 if result.drift else 0
    if ctx.json:
        doc = result.to_json()
        if code:
            doc = {
                "ok": False,
                "exit": code,
                "problems": [f"{result.drift} finding(s) drifted"],
                **doc,
            }
        ctx.emit_json(doc)
        return code
    if not result.partitions:
        ctx.say("no partitions are applied on this host")
        return 0
    rows = [[f.partition, f.status, f.resource, f.detail, f.action] for f in result.findings]
    if rows:
        ctx.say(table(rows, ["PARTITION", "STATUS", "RESOURCE", "FINDING", "WHAT TO DO"]))
    boot = sum(1 for f in result.findings if f.status != DRIFT)
    ctx.say(
        f"{len(result.partitions)} partition(s): "
        + (f"{result.drift} drifted" if result.drift else "clean")
        + (f", {boot} left to the boot-time settings" if boot else "")
    )
    return code
