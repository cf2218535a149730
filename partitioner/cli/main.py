"""``partition``: the command line.  One module per verb in this package; this one dispatches.

Each verb module has ``register(subparsers)``, which adds its parser and sets
``func`` to a ``run(args, ctx) -> int``.  Exceptions of the project's tree are
turned into a message and the exit code ``docs/cli-reference.md`` gives, here and nowhere else.

The global options are accepted before and after the verb: every verb's parser
gets them too.  They default to ``SUPPRESS`` everywhere, so that a verb's parser
never overwrites a value given before the verb; the environment and the
defaults are applied once, after parsing (:func:`_resolve`).

With ``--json``, stdout holds exactly one JSON document whatever happens: the
verb's own, or the one written here (:func:`_document`) on failure, on a usage
error, and on success of a verb that has no report of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import json
import logging
import os
import sys
import threading
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from partitioner import __version__
from partitioner.cli.common import DEFAULT_STATE_DIR, Context, problems_json
from partitioner.errors import (
    ManifestError,
    PartitionError,
    PlanError,
    PlanProblem,
    Problem,
    RollbackIncomplete,
    UsageError,
)

# Verb modules, in the order `partition --help` lists them.
VERB_MODULES: list[str] = [
    "inspect",
    "snapshot",
    "validate",
    "plan",
    "apply",
    "status",
    "map",
    "lifecycle",
    "destroy",
    "audit",
    "console",
    "export",
    "testbed",
    "host",
]
# The verbs a module registers, where they are not named like it.
_MODULE_OF = {"start": "lifecycle", "stop": "lifecycle", "restart": "lifecycle"}
# Global options that take a value (to find the verb without parsing).
_VALUED = {"--host-root", "--state-dir"}
# Where a global option given after the verb is kept, apart from one given before it
# (argparse would otherwise let the verb's parser overwrite the earlier one).
_AFTER = "after_"


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


def _json_in(argv: Sequence[str]) -> bool:
    """Whether ``--json`` was asked for, before parsing (a usage error needs to know)."""
    for arg in argv:
        if arg == "--":
            return False
        if arg == "--json":
            return True
    return False


class _ArgumentError(Exception):
    """argparse refused the command line: ``usage`` is the parser's usage line."""

    def __init__(self, message: str, usage: str) -> None:
        self.usage = usage
        super().__init__(message)


class _Verbs(argparse._SubParsersAction):  # type: ignore[type-arg]
    """Verb parsers get the global options, and their one-line ``help`` as the
    description their own ``--help`` starts with."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if "help" in kwargs and "description" not in kwargs:
            text = str(kwargs["help"])
            kwargs["description"] = text[:1].upper() + text[1:] + "."
        parser: argparse.ArgumentParser = super().add_parser(name, **kwargs)
        return parser


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, globals_dest: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _Verbs)
        _add_globals(self, globals_dest)

    def error(self, message: str) -> NoReturn:
        raise _ArgumentError(message, self.format_usage())

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        # A verb that is not one is answered with the nearest verbs (cli.md), as git does.
        if (
            isinstance(action, _Verbs)
            and action.choices is not None
            and value not in action.choices
        ):
            raise _ArgumentError(unknown_verb(self.prog, str(value), action.choices), "")
        super()._check_value(action, value)


def unknown_verb(prog: str, word: str, verbs: Iterable[str]) -> str:
    """``partition plna``: "unknown verb 'plna'; did you mean plan?", then every verb."""
    names = list(verbs)
    near = difflib.get_close_matches(word, names, n=3, cutoff=0.6)
    if not near:
        # A prefix or a fragment of a verb is a likely slip too (`partition snap`).
        near = [v for v in names if word and (v.startswith(word) or word in v)][:3]
    hint = f"; did you mean {' or '.join(near)}?" if near else ""
    return f"unknown verb {word!r}{hint} (`{prog} --help` lists: {', '.join(names)})"


class _VerbParser(_Parser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, globals_dest=_AFTER, **kwargs)


def _add_globals(p: argparse.ArgumentParser, prefix: str) -> None:
    g = p.add_argument_group("global options (before or after the verb)")
    s = argparse.SUPPRESS
    g.add_argument(
        "--host-root",
        metavar="DIR",
        dest=prefix + "host_root",
        default=s,
        help="read the host's facts from DIR/sys and DIR/proc (read-only verbs only; "
        "env PARTITION_HOST_ROOT)",
    )
    g.add_argument(
        "--state-dir",
        metavar="DIR",
        dest=prefix + "state_dir",
        default=s,
        help="where the record of running partitions lives "
        f"(env PARTITION_STATE_DIR, default {DEFAULT_STATE_DIR})",
    )
    g.add_argument(
        "--json",
        action="store_true",
        dest=prefix + "json",
        default=s,
        help="one JSON document on stdout, on failure too",
    )
    g.add_argument(
        "-v",
        "--verbose",
        action="count",
        dest=prefix + "verbose",
        default=s,
        help="say more on stderr",
    )
    g.add_argument(
        "-q", "--quiet", action="count", dest=prefix + "quiet", default=s, help="say less on stderr"
    )


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    p = _Parser(
        prog="partition",
        description="Logical partitions for x86 Linux servers on KVM.",
        epilog="`partition VERB --help` tells more of each verb.",
    )
    p.add_argument("--version", action="version", version=f"partition {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB", parser_class=_VerbParser)
    sub.required = True
    for name in [only] if only else VERB_MODULES:
        importlib.import_module(f"partitioner.cli.{name}").register(sub)
    return p


def _resolve(args: argparse.Namespace) -> tuple[str | None, Path, bool, int]:
    """The global options as given (after the verb wins), else the environment, else the default."""
    given = vars(args)

    def get(name: str) -> Any:
        return given.get(_AFTER + name, given.get(name))

    host_root = get("host_root")
    if host_root == "":
        # Not the live host: a script's `--host-root "$TREE"` with TREE unset must not
        # turn a read of a snapshot into a change of this machine.
        raise UsageError("--host-root needs a directory (it is empty)")
    if host_root is None:
        host_root = os.environ.get("PARTITION_HOST_ROOT") or None
    state_dir = get("state_dir")
    if state_dir == "":
        raise UsageError("--state-dir needs a directory (it is empty)")
    state_dir = state_dir or os.environ.get("PARTITION_STATE_DIR") or DEFAULT_STATE_DIR
    as_json = bool(get("json"))
    verbosity = (given.get("verbose") or 0) + (given.get(_AFTER + "verbose") or 0)
    verbosity -= (given.get("quiet") or 0) + (given.get(_AFTER + "quiet") or 0)
    return host_root, Path(state_dir), as_json, verbosity


def _check_seconds(args: argparse.Namespace) -> None:
    """Every number option of the command line is a time in seconds (``--timeout``,
    ``--lock-timeout``, ``--stop-timeout``): ``nan`` would make every deadline unreachable
    (a wait that never ends), a negative or endless one is no deadline either."""
    for key, value in vars(args).items():
        if isinstance(value, float) and not 0 <= value <= threading.TIMEOUT_MAX:
            raise UsageError(
                f"--{key.replace('_', '-')} {value}: give a number of seconds, "
                f"0 or more (at most {threading.TIMEOUT_MAX:.0f})"
            )


def _check_argv(argv: Sequence[str]) -> None:
    """No path, name or number can hold a NUL byte (and exec cannot pass one): say so
    here rather than let the first system call that sees it fail on its own terms."""
    for i, arg in enumerate(argv, 1):
        if "\0" in arg:
            raise UsageError(
                f"argument {i} ({arg.split(chr(0))[0][:60]!r}...) contains a NUL byte, "
                "which no path, name or number can hold"
            )


def _document(
    ok: bool, code: int, problems: list[dict[str, Any]], ctx: Context | None = None
) -> dict[str, Any]:
    doc: dict[str, Any] = {"ok": ok, "exit": code}
    if not ok:
        doc["problems"] = problems
    if ctx is not None:
        doc.update(ctx.reported)  # what the verb reported before it ended (``reconciled``)
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Arguments that are not UTF-8 reach Python as surrogates; give them back as the
    # bytes they were when they are printed, instead of failing to print them.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):
                reconfigure(errors="surrogateescape")
    as_json = _json_in(argv)
    out, err = sys.stdout, sys.stderr
    try:
        _check_argv(argv)
        wants_help = any(a in ("-h", "--help") for a in argv[:1]) or not argv
        parser = build_parser(None if wants_help else _verb_in(argv))
        args = parser.parse_args(argv)
        host_root, state_dir, as_json, verbosity = _resolve(args)
        _check_seconds(args)
    except _ArgumentError as e:
        if as_json:
            _emit(out, _document(False, 2, problems_json([str(e)])))
        else:
            err.write(e.usage)
        print(f"partition: {e}", file=err)
        return 2
    except PartitionError as e:
        if as_json:
            _emit(out, _document(False, e.exit_code, problems_json([str(e)])))
        print(f"partition: {e}", file=err)
        return e.exit_code
    logging.basicConfig(
        level=logging.DEBUG
        if verbosity > 1
        else logging.INFO
        if verbosity > 0
        else logging.WARNING,
        format="partition: %(message)s",
        stream=err,
    )
    # QEMU's QMP library logs every refused connection while QEMU is still starting;
    # the partitioner waits through those and reports what matters itself.
    if verbosity < 2:
        logging.getLogger("qemu").setLevel(logging.CRITICAL)
    ctx = Context(host_root=host_root, state_dir=state_dir, json=as_json, verbosity=verbosity)
    try:
        rc: int = args.func(args, ctx)
    except PartitionError as e:
        lines = _say_error(e, err)
        if as_json and not ctx.emitted:
            doc = _document(False, e.exit_code, problems_json(lines), ctx)
            # What a program acting on the failure needs besides the words.
            for key in ("path", "holder", "leftover", "partition", "address", "incomplete"):
                value = getattr(e, key, None)
                if value:
                    doc[key] = value
            _emit(out, doc)
        return e.exit_code
    except KeyboardInterrupt:
        print("partition: interrupted", file=err)
        if as_json and not ctx.emitted:
            _emit(out, _document(False, 130, problems_json(["interrupted"]), ctx))
        return 130
    except BrokenPipeError:
        return 0
    except Exception:
        print(
            "partition: unexpected failure (a bug in partition; please report it with this trace):",
            file=err,
        )
        traceback.print_exc()
        if as_json and not ctx.emitted:
            problem = "unexpected failure (a bug in partition); the trace is on stderr"
            _emit(out, _document(False, 1, problems_json([problem]), ctx))
        return 1
    if as_json and not ctx.emitted:
        problems = [] if rc == 0 else [f"partition {args.verb} ended with exit status {rc}"]
        _emit(out, _document(rc == 0, rc, problems_json(problems), ctx))
    return rc


def _say_error(e: PartitionError, err: Any) -> list[Problem | PlanProblem | str]:
    """Say the error on stderr; return its messages, which are the problems of the JSON
    document too (without the ``partition:`` a terminal line starts with)."""
    if isinstance(e, ManifestError):
        for problem in e.problems:
            print(problem, file=err)
        n = len(e.problems)
        if e.incomplete:
            print(
                f"partition: the manifest has more than {n} problems; checking stopped at "
                f"{n}: fix these and run again",
                file=err,
            )
        else:
            print(f"partition: {n} problem{'s' if n != 1 else ''} in the manifest", file=err)
        return list(e.problems)
    if isinstance(e, PlanError):
        # Each starts with FILE:LINE:COL where it is located (after the `partition:` every
        # line of a failure starts with).
        for plan_problem in e.problems:
            print(f"partition: {plan_problem}", file=err)
        return list(e.problems)
    print(f"partition: {e}", file=err)
    if isinstance(e, RollbackIncomplete):
        for item in e.leftover:
            print(f"  left in place: {item}", file=err)
    return [str(e)]


def _emit(out: Any, doc: dict[str, Any]) -> None:
    json.dump(doc, out, indent=2)
    out.write("\n")
    out.flush()


if __name__ == "__main__":
    sys.exit(main())
