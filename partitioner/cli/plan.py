"""``partition plan FILE``: the manifest against the host: placements and the actions apply would take."""

from __future__ import annotations

import argparse
import shlex
from dataclasses import replace
from typing import Any

from partitioner.cli.common import MANIFEST_HELP, Context, table
from partitioner.engine.diff import diff, held_replacements
from partitioner.guest.argv import NO_ARGV, command_lines
from partitioner.inventory import scan
from partitioner.inventory.model import Host
from partitioner.manifest.loader import load
from partitioner.planning.confine import memlock_bytes
from partitioner.planning.files import checked_plan, file_problems
from partitioner.planning.model import Plan
from partitioner.record.model import State, running_partitions
from partitioner.record.reconcile import Finding, reconcile
from partitioner.record.store import StateStore
from partitioner.units import format_size


def register(sub: Any) -> None:
    p = sub.add_parser("plan", help="check a manifest against the host and show the placement")
    p.add_argument("file", metavar="FILE", help=MANIFEST_HELP)
    p.add_argument(
        "--qemu", action="store_true", help="print each partition's QEMU command line too"
    )
    p.set_defaults(func=run)


def planned(file: str, ctx: Context) -> tuple[Plan, Host, State]:
    """The plan of ``file`` on ctx's host as ``plan`` shows it (``map`` draws it too), with
    the host and the reconciled record it was made against."""
    manifest = load(file)
    host = scan(ctx.root())
    state, findings = _reconciled(ctx)
    ctx.reconciled(findings, done=False)
    # The pure plan, then KVM's vCPU limit and the files it hands to QEMU (planning.files).  Under
    # --host-root the plan is for another machine, whose KVM and files are not here to be
    # asked: said, not held.
    here = ctx.host_root is None
    result = checked_plan(manifest, host, running_partitions(state), here=here)
    if not here:
        for problem in file_problems(manifest):
            ctx.note(f"{problem} (not checked: the plan is for --host-root's machine)")
    return result, host, state


def run(args: argparse.Namespace, ctx: Context) -> int:
    result, host, state = planned(args.file, ctx)
    acts = [a.to_json() for a in diff(result, state, host, replace=set())]
    held = held_replacements(result, state, replace=set())
    wanted = args.qemu or ctx.json
    argvs, left_out = command_lines(
        result, ctx.run_dir, ctx.log_dir, ctx.state_dir, live=ctx.host_root is None
    )
    result = replace(
        result,
        placements={
            # Why a command line could not be made matters only to whoever asked for one.
            n: replace(
                p,
                notes=(*p.notes, *(x for x in left_out[n] if wanted or not x.startswith(NO_ARGV))),
            )
            for n, p in result.placements.items()
        },
    )
    for note in plan_notes(result):
        ctx.note(note)
    if ctx.json:
        doc = result.to_json()
        for name, argv in argvs.items():
            doc["partitions"][name]["qemu_argv"] = argv
        for name, p in result.placements.items():
            # Rule 10: the RLIMIT_MEMLOCK its confined QEMU gets (none: it runs as root).
            doc["partitions"][name]["memlock_bytes"] = (
                memlock_bytes(p, result.accel) if result.confine else None
            )
        doc["actions"] = acts
        doc["held"] = held
        ctx.emit_json(doc)
        return 0
    ctx.say(render(result))
    for name, argv in argvs.items() if args.qemu else ():
        ctx.say(f"\n{name}: " + (shlex.join(argv) if argv else "no command line (see the notes)"))
    ctx.say()
    for name, change in held.items():
        ctx.say(
            f"held: {name} is running and the manifest changed it ({change}); apply leaves it "
            f"running unless given --replace {name}"
        )
    if acts:
        ctx.say("apply would:")
        for a in acts:
            ctx.say(f"  {a['action']:<18} {a['target']:<14} {a['detail']}")
    else:
        ctx.say("apply would change nothing.")
    return 0


def render(result: Plan) -> str:
    rows = []
    for name, p in result.placements.items():
        named = [str(d.address) for d in p.devices if not d.added]
        added = [str(d.address) for d in p.devices if d.added]
        rows.append(
            [
                name,
                str(p.cpuset),
                f"{p.sockets}x{p.cores}x{p.threads}",
                ",".join(map(str, p.numa_nodes)),
                format_size(p.memory_bytes),
                format_size(p.hugepage_bytes) if p.hugepage_bytes else "none",
                " ".join(named) + (f" +{' '.join(added)}" if added else "") or "-",
                ",".join(map(str, p.iommu_groups)) or "-",
                format_size(memlock_bytes(p, result.accel)) if result.confine else "root",
            ]
        )
    out = [
        f"host keeps CPUs {result.host_cpus or 'none'} and {format_size(result.host_memory_bytes)}; "
        f"smt: {result.smt}; accel: {result.accel}; "
        + (
            "each QEMU confined (LOCKED: its locked-memory limit)"
            if result.confine
            else "QEMU runs as root (host.confine: false)"
        ),
        "",
        table(
            rows,
            [
                "PARTITION",
                "CPUS",
                "TOPOLOGY",
                "NODES",
                "MEMORY",
                "PAGES",
                "DEVICES",
                "GROUPS",
                "LOCKED",
            ],
        ),
    ]
    return "\n".join(out)


def plan_notes(result: Plan) -> list[str]:
    """The plan's notes, said on stderr (cli.md: notes are not the report)."""
    return list(result.notes) + [
        f"{n}: {note}" for n, p in result.placements.items() for note in p.notes
    ]


def _reconciled(ctx: Context) -> tuple[State, list[Finding]]:
    """The record as ``apply`` would see it: reconciled with the host the way apply does
    (a dead guest is failed, so apply restarts it; a killed start is adopted or ended).

    With --host-root the state directory belongs to this machine, not to the
    tree being read, so the plan is made as if nothing ran there.
    """
    if ctx.host_root is not None:
        return State(), []
    store = StateStore(ctx.state_dir)
    found = reconcile(store.load(), ctx.root(), busy=store.busy())
    return found.state, found.findings
