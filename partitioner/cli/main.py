"""``partition``: the command line.  One module per verb in this package; this one dispatches.

Each verb module has ``register(subparsers)``, which adds its parser and sets
``func`` to a ``run(args, ctx) -> int``.  Exceptions of the project's tree are
turned into a message and the exit code ``cli.md`` gives, here and nowhere else.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from partitioner import __version__
from partitioner.cli.common import DEFAULT_STATE_DIR, Context
from partitioner.errors import (
    ManifestError,
    PartitionError,
    PlanError,
    RollbackIncomplete,
)

# Verb modules, in the order `partition --help` lists them.
VERB_MODULES: list[str] = [
    "inspect",
    "snapshot",
    "validate",
    "plan",
    "apply",
    "status",
    "lifecycle",
    "destroy",
    "console",
    "testbed",
    "host",
]
# The verbs a module registers, where they are not named like it.
_MODULE_OF = {"start": "lifecycle", "stop": "lifecycle", "restart": "lifecycle"}
# Global options that take a value (to find the verb without parsing).
_VALUED = {"--host-root", "--state-dir"}


def _verb_in(argv: Sequence[str]) -> str | None:
    """The module of the verb named in ``argv``, if it is plain to see: only that
    module is imported then, so a quick verb does not pay for every other's imports."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in _VALUED:
            skip = True
            continue
        if arg.startswith("-"):
            continue
        module = _MODULE_OF.get(arg, arg)
        return module if module in VERB_MODULES else None
    return None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"partition: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    p = _Parser(
        prog="partition",
        description="Logical partitions for x86 Linux servers on KVM.",
    )
    p.add_argument("--version", action="version", version=f"partition {__version__}")
    p.add_argument(
        "--host-root",
        metavar="DIR",
        default=os.environ.get("PARTITION_HOST_ROOT") or None,
        help="read the host's facts from DIR/sys and DIR/proc (read-only verbs only)",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        default=os.environ.get("PARTITION_STATE_DIR") or DEFAULT_STATE_DIR,
        help=f"where the record of running partitions lives (default {DEFAULT_STATE_DIR})",
    )
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("-v", "--verbose", action="count", default=0, help="say more on stderr")
    p.add_argument("-q", "--quiet", action="count", default=0, help="say less on stderr")
    sub = p.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    for name in [only] if only else VERB_MODULES:
        importlib.import_module(f"partitioner.cli.{name}").register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    wants_help = any(a in ("-h", "--help") for a in argv[:1]) or not argv
    parser = build_parser(None if wants_help else _verb_in(argv))
    args = parser.parse_args(argv)
    verbosity = args.verbose - args.quiet
    logging.basicConfig(
        level=logging.DEBUG
        if verbosity > 1
        else logging.INFO
        if verbosity > 0
        else logging.WARNING,
        format="partition: %(message)s",
    )
    # QEMU's QMP library logs every refused connection while QEMU is still starting;
    # the partitioner waits through those and reports what matters itself.
    if verbosity < 2:
        logging.getLogger("qemu").setLevel(logging.CRITICAL)
    ctx = Context(
        host_root=args.host_root,
        state_dir=Path(args.state_dir),
        json=args.json,
        verbosity=verbosity,
    )
    try:
        rc: int = args.func(args, ctx)
        return rc
    except ManifestError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        n = len(e.problems)
        print(f"partition: {n} problem{'s' if n != 1 else ''} in the manifest", file=sys.stderr)
        return e.exit_code
    except PlanError as e:
        for reason in e.problems:
            print(f"partition: {reason}", file=sys.stderr)
        return e.exit_code
    except RollbackIncomplete as e:
        print(f"partition: {e}", file=sys.stderr)
        for item in e.leftover:
            print(f"  left in place: {item}", file=sys.stderr)
        return e.exit_code
    except PartitionError as e:
        print(f"partition: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("partition: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception:
        print(
            "partition: unexpected failure (a bug in partition; please report it with this trace):",
            file=sys.stderr,
        )
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
