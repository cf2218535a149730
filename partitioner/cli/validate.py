"""``partition validate FILE``: the manifest alone, no host needed."""

from __future__ import annotations

import argparse
from typing import Any

from partitioner.cli.common import MANIFEST_HELP, Context, problems_json
from partitioner.errors import ManifestError
from partitioner.manifest.loader import load


def register(sub: Any) -> None:
    p = sub.add_parser("validate", help="check a manifest alone (no host needed)")
    p.add_argument("file", metavar="FILE", help=MANIFEST_HELP)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    try:
        manifest = load(args.file)
    except ManifestError as e:
        if not ctx.json:
            raise
        # docs/cli-reference.md's failure document, with validate's own keys.
        ctx.emit_json(
            {
                "ok": False,
                "exit": e.exit_code,
                "valid": False,
                "file": args.file,
                "problems": problems_json(e.problems),
                # Checking stopped at the most problems one run reports; there are more.
                "incomplete": e.incomplete,
            }
        )
        for problem in e.problems:
            ctx.warn(str(problem))
        return e.exit_code
    if ctx.json:
        ctx.emit_json(
            {
                "ok": True,
                "exit": 0,
                "valid": True,
                "file": args.file,
                "partitions": sorted(manifest.partitions),
            }
        )
    else:
        n = len(manifest.partitions)
        ctx.say(
            f"{args.file}: valid, {n} partition{'s' if n != 1 else ''}: {', '.join(manifest.partitions)}"
        )
    return 0
