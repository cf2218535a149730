"""``partition snapshot DIR``: save what the partitioner reads of this host, for ``--host-root``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from partitioner.cli.common import Context
from partitioner.inventory.snapshot import take_snapshot_with_host


def register(sub: Any) -> None:
    p = sub.add_parser(
        "snapshot",
        help="copy the part of /sys and /proc the partitioner reads into DIR, for --host-root",
    )
    p.add_argument("dir", metavar="DIR", help="where to write the tree (new or empty)")
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a DIR that is not empty (its sys, proc and dev are replaced)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    dest = Path(args.dir)
    files, host = take_snapshot_with_host(ctx.root(), dest, force=args.force)
    if ctx.json:
        ctx.emit_json(
            {
                "dir": str(dest.absolute()),
                "files": files,
                "cpus": len(host.cpus),
                "numa_nodes": len(host.nodes),
                "pci_functions": len(host.pci),
                "notes": list(host.notes),
            }
        )
    else:
        ctx.say(
            f"{dest}: {files} files: {len(host.cpus)} CPUs, {len(host.nodes)} NUMA "
            f"node{'s' if len(host.nodes) != 1 else ''}, {len(host.pci)} PCI functions"
        )
        ctx.info(f"read it with: partition --host-root {dest} inspect (or plan FILE)")
    for note in host.notes:
        ctx.note(note)
    return 0
