"""``partition map [FILE] [-o OUT] [--format svg|png|text]``: the host with its partitions drawn on it.

With FILE, the plan of that manifest (as ``plan`` makes it); without, what the state
record says runs now (as ``status`` reads it).  SVG and PNG are drawn by hwloc's
lstopo (partitioner/map/hwloc.py); the text form is one block per NUMA node.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from partitioner.cli.common import Context
from partitioner.errors import UsageError
from partitioner.inventory.model import Host
from partitioner.map import owners as owners_mod
from partitioner.map.owners import Owners

FORMATS = ("svg", "png", "text")
_EXTENSIONS = {".svg": "svg", ".png": "png", ".txt": "text", ".text": "text"}


def register(sub: Any) -> None:
    p = sub.add_parser("map", help="draw the host's topology with each partition on it")
    p.add_argument(
        "file", metavar="FILE", nargs="?", help="the site manifest; without it, what runs now"
    )
    p.add_argument("-o", "--output", metavar="OUT", help="write the picture to OUT (- for stdout)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        help="svg, png or text (default: OUT's extension; text on a terminal, else svg)",
    )
    p.set_defaults(func=run)


def choose_format(given: str | None, out: str | None, terminal: bool) -> str:
    """The format asked for, else OUT's extension, else text for a terminal and SVG for a
    pipe or file (``partition map site.yaml > map.svg``)."""
    if given:
        return given
    if out and out != "-":
        ext = os.path.splitext(out)[1].lower()
        if ext not in _EXTENSIONS:
            raise UsageError(
                f"-o {out}: cannot tell the format from {ext or 'a name without an extension'}; "
                "name it .svg, .png or .txt, or give --format svg|png|text"
            )
        return _EXTENSIONS[ext]
    return "text" if terminal else "svg"


def layout(args: argparse.Namespace, ctx: Context) -> tuple[Owners, Host]:
    """Who owns what: the plan of FILE, or the record of what runs."""
    from partitioner.inventory import scan

    if args.file is not None:
        from partitioner.cli.plan import planned

        result, host, _ = planned(args.file, ctx)
        name = "standard input" if args.file == "-" else args.file
        return owners_mod.from_plan(result.to_json(), f"plan of {name}"), host
    from partitioner.cli.status import record_json, running

    host = scan(ctx.root())
    if ctx.host_root is not None:
        # The record belongs to this machine, not to the tree (as for plan).
        ctx.warn(
            f"partition: note: --host-root {ctx.host_root} without FILE: the state record is "
            "this machine's, so the tree is drawn with no partitions; give FILE to draw a plan"
        )
        return owners_mod.from_status({"partitions": {}}, None, None), host
    state = running(ctx)
    docs = {n: record_json(r, 0.0) for n, r in sorted(state.partitions.items())}
    site = state.site
    return (
        owners_mod.from_status(
            {"partitions": docs},
            site.host_cpus if site else None,
            site.host_memory_bytes if site else None,
        ),
        host,
    )


def run(args: argparse.Namespace, ctx: Context) -> int:
    out_path: str | None = args.output
    to_stdout = out_path in (None, "-")
    fmt = choose_format(args.format, out_path, to_stdout and ctx.out.isatty())
    if ctx.json and to_stdout and fmt != "text":
        raise UsageError(f"with --json, stdout holds the report: give -o OUT for the {fmt}")
    if fmt == "png" and to_stdout and ctx.out.isatty():
        raise UsageError("a PNG is not for a terminal: give -o OUT, or --format text")
    owners, host = layout(args, ctx)
    doc: dict[str, Any] = {"format": fmt, "output": None if to_stdout else out_path}
    doc.update(owners.to_json())
    if fmt == "text":
        from partitioner.map.text import render

        data = (render(host, owners) + "\n").encode()
        doc["text"] = data.decode()
    else:
        from partitioner.map.hwloc import draw

        data = draw(ctx.root(), host, owners, fmt).image
    if not to_stdout:
        assert out_path is not None
        try:
            with open(out_path, "wb") as f:
                f.write(data)
        except OSError as e:
            raise UsageError(f"cannot write {out_path}: {e.strerror}") from None
        ctx.info(f"partition: {fmt} map of the {owners.source} written to {out_path}")
    elif not ctx.json:
        ctx.out.flush()
        if fmt == "png":
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        else:
            ctx.out.write(data.decode())
            ctx.out.flush()
    if ctx.json:
        if to_stdout:
            doc["output"] = None
        ctx.emit_json(doc)
    return 0
