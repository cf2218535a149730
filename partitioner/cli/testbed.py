"""``partition testbed run|snapshot``: an emulated VT-d server (QEMU/TCG, Intel IOMMU) to try things in."""

from __future__ import annotations

import argparse
import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from partitioner.cli.common import Context
from partitioner.errors import UsageError
from partitioner.testbed.server import TestbedServer, snapshot_testbed
from partitioner.testbed.topology import load_topology, preset_names


def register(sub: Any) -> None:
    p = sub.add_parser(
        "testbed",
        help="boot an emulated VT-d server and run a command in it",
        description="Boot an emulated server (QEMU under TCG with an emulated Intel IOMMU), "
        "run a command in it as root with the host's filesystem shared read-only.",
    )
    verbs = p.add_subparsers(dest="testbed_verb", metavar="run|snapshot")
    verbs.required = True
    presets = ", ".join(preset_names())

    r = verbs.add_parser(
        "run",
        help="run COMMAND in the emulated server and exit with its exit code",
        description="Run COMMAND as root in an emulated server, in the current directory "
        "(the host's / is shared read-only; /tmp, /run, /var are private and writable; "
        "$TESTBED_OUT is a writable directory shared with the host). Its output is "
        "streamed here (its stdin is /dev/null); the exit status is the command's.",
        epilog="example: partition testbed run --topology numa -- partition inspect",
    )
    r.add_argument(
        "--topology",
        metavar="PRESET|FILE",
        default="small",
        help=f"a preset ({presets}) or a topology YAML file (default: small)",
    )
    r.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        default=900.0,
        help="seconds for the whole run, boot included (default 900)",
    )
    r.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        help="host directory shared writable as $TESTBED_OUT (default: a temporary one)",
    )
    r.add_argument(
        "--keep",
        action="store_true",
        help="keep the run directory (kernel log console.log, QEMU's messages) and say where",
    )
    r.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")
    r.set_defaults(func=run)

    s = verbs.add_parser(
        "snapshot",
        help="boot it and save its /sys and /proc as `partition snapshot` does",
    )
    s.add_argument("topology", metavar="PRESET|FILE", help=f"a preset ({presets}) or a YAML file")
    s.add_argument("dest", metavar="DIR", type=Path, help="where the snapshot goes (new or empty)")
    s.add_argument(
        "--timeout", metavar="S", type=float, default=900.0, help="seconds (default 900)"
    )
    s.set_defaults(func=snapshot)


def run(args: argparse.Namespace, ctx: Context) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("partition testbed run: give the command after --, e.g. -- uname -a")
    topo = load_topology(args.topology)
    progress = ctx.err if ctx.verbosity >= 0 else None
    server = TestbedServer(
        topo,
        command,
        timeout=args.timeout,
        out_dir=args.out,
        # With --json, stdout holds the one document: the command's output goes to stderr.
        stream=ctx.err if ctx.json else ctx.out,
        progress=progress,
        keep=args.keep,
    )
    try:
        with _signals_end_the_run(), server:
            rc = server.wait()
    finally:
        if args.keep and server.run_dir is not None:
            ctx.warn(f"testbed: kept {server.run_dir} (console.log is the kernel's log)")
    if server.total_seconds is not None:
        ctx.info(f"testbed: command exited with {rc} after {server.total_seconds:.1f}s in all")
    if ctx.json:
        doc: dict[str, Any] = {
            "ok": rc == 0,
            "exit": rc,
            "command": command,
            "topology": topo.name,
            "seconds": server.total_seconds,
        }
        if rc != 0:
            doc["problems"] = [{"message": f"the command exited with {rc}"}]
        ctx.emit_json(doc)
    return rc


@contextlib.contextmanager
def _signals_end_the_run() -> Iterator[None]:
    """SIGTERM and SIGHUP (a closed terminal) end this process as Ctrl-C does.

    QEMU runs in its own session and would not get them; raising here unwinds the
    with-blocks that end it.
    """

    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def snapshot(args: argparse.Namespace, ctx: Context) -> int:
    dest: Path = args.dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UsageError(f"partition testbed snapshot: {dest} exists and is not an empty directory")
    topo = load_topology(args.topology)
    with _signals_end_the_run():
        snapshot_testbed(
            topo, dest, timeout=args.timeout, progress=ctx.err if ctx.verbosity >= 0 else None
        )
    ctx.info(f"testbed: snapshot of {topo.name} saved in {dest}; use it with --host-root {dest}")
    if ctx.json:
        ctx.emit_json({"ok": True, "exit": 0, "dir": str(dest.absolute()), "topology": topo.name})
    return 0
