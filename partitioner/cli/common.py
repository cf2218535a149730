"""What every verb gets: the global options, and the ways of speaking to the user."""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from partitioner.errors import HostReadError, PlanProblem, Problem, StateError, UsageError
from partitioner.kernel.root import HostRoot

if TYPE_CHECKING:
    from partitioner.record.reconcile import Finding

DEFAULT_STATE_DIR = "/var/lib/partition"
DEFAULT_RUN_DIR = "/run/partition"
DEFAULT_LOG_DIR = "/var/log/partition"
MANIFEST_HELP = "the site manifest (site.yaml; - reads standard input)"


@dataclass
class Context:
    host_root: str | None  # --host-root, None for the live host
    state_dir: Path
    json: bool
    verbosity: int  # 0 normal, >0 -v, <0 -q
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    run_dir: Path = field(
        default_factory=lambda: Path(os.environ.get("PARTITION_RUN_DIR", DEFAULT_RUN_DIR))
    )
    log_dir: Path = field(
        default_factory=lambda: Path(os.environ.get("PARTITION_LOG_DIR", DEFAULT_LOG_DIR))
    )
    # Whether the verb wrote its JSON document: main writes one for it when it did not
    # (a failure, or a verb with no report of its own), so stdout holds exactly one.
    emitted: bool = False
    # What the verb's JSON document carries whatever happens once it is known (``reconciled``):
    # emit_json adds it to the verb's own document, main to the one it writes for the verb.
    reported: dict[str, Any] = field(default_factory=dict)
    _root_said: bool = False  # -v says once where the host's facts come from

    def root(self) -> HostRoot:
        if self.host_root is None:
            self._said_root("the live host (/sys, /proc)")
            return HostRoot("/")
        self._said_root(f"the host tree {self.host_root} (--host-root)")
        # What --host-root names is known here; past this point a path that loops or is
        # not a directory would surface as some library's error about some file in it.
        try:
            st = os.stat(self.host_root)
        except FileNotFoundError:
            return HostRoot(self.host_root)  # the scan says what a host tree needs
        except OSError as e:
            raise HostReadError(
                f"--host-root {self.host_root}: {e.strerror}; give a directory made by "
                f"`partition snapshot DIR` on the machine to describe",
                path=self.host_root,
            ) from None
        if not stat.S_ISDIR(st.st_mode):
            raise HostReadError(
                f"--host-root {self.host_root} is not a directory; give a directory made by "
                "`partition snapshot DIR` on the machine to describe",
                path=self.host_root,
            )
        return HostRoot(self.host_root)

    def _said_root(self, where: str) -> None:
        if not self._root_said:
            self._root_said = True
            self.detail(f"host facts from {where}; state directory {self.state_dir}")

    def require_live(self, verb: str) -> None:
        """Verbs that change the host refuse --host-root (docs/cli-reference.md), and need a state
        directory they can write: said now, before anything is changed."""
        if self.host_root is not None:
            raise UsageError(
                f"partition {verb} changes the host and cannot run against --host-root {self.host_root}; "
                "use plan or inspect with --host-root, and apply on the machine itself"
            )
        self.check_state_dir()

    def check_state_dir(self) -> None:
        """The state directory is one this process can write: made here if missing (the
        lock, taken next, would make it anyway), or refused naming it, before any change."""
        what = f"the state directory {self.state_dir} (--state-dir, env PARTITION_STATE_DIR)"
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        except FileExistsError:
            try:
                os.stat(self.state_dir)
                why = "it is not a directory"
            except OSError as e:  # a symbolic link that loops or leads nowhere
                why = e.strerror or str(e)
            raise StateError(
                f"cannot use {what}: {why}; give a directory", path=str(self.state_dir)
            ) from None
        except OSError as e:
            raise StateError(
                f"cannot use {what}: {e.strerror}; give a directory this user can write",
                path=str(self.state_dir),
            ) from None
        if not os.access(self.state_dir, os.W_OK | os.X_OK):
            raise StateError(
                f"cannot use {what}: this user cannot write it "
                "(run as root, or give a directory you can write)",
                path=str(self.state_dir),
            )

    def reconciled(self, findings: Iterable[Finding], *, done: bool) -> None:
        """What reconciling the record with the host found: each said on stderr, and kept as
        the ``reconciled`` of the verb's JSON document, on success and on failure alike
        (docs/cli.md).  ``done``: this verb did what each says (it holds the lock and
        changes the host); else the next verb that does will."""
        findings = list(findings)
        for f in findings:
            self.warn(f"partition: {f.text(done=done)}")
        self.reported["reconciled"] = [f.to_json(done=done) for f in findings]

    def emit_json(self, doc: dict[str, Any]) -> None:
        """The verb's one JSON document on stdout (``--json``), with what it reported.

        ``ok`` and ``exit`` lead every document (cli.md): a verb that emits on failure
        says them itself; any other document is a success, ``"ok": true, "exit": 0``."""
        if self.emitted:
            raise RuntimeError("a verb emitted a second JSON document")
        head = {"ok": doc.get("ok", True), "exit": doc.get("exit", 0)}
        json.dump({**head, **doc, **self.reported}, self.out, indent=2, sort_keys=False)
        self.out.write("\n")
        self.out.flush()
        self.emitted = True

    def say(self, text: str = "") -> None:
        """Human output on stdout (not in --json mode)."""
        if not self.json:
            print(text, file=self.out)

    # What is said on stderr at each verbosity (docs/cli.md, "-v and -q"):
    #   -q      problems and warnings only (warn);
    #   normal  and notes and hints (info, note), progress on a terminal;
    #   -v      and where the facts come from (detail), progress in a pipe too, and the
    #           steps apply and destroy take (logging INFO);
    #   -vv     and every command run and QMP exchange (logging DEBUG).

    def info(self, text: str) -> None:
        """A note, a hint or progress on stderr, unless -q."""
        if self.verbosity >= 0:
            print(text, file=self.err)

    def note(self, text: str) -> None:
        """``partition: note: TEXT`` on stderr, unless -q: what a reader of the report
        should know but need not act on (what a plan or export leaves out)."""
        self.info(f"partition: note: {text}")

    def detail(self, text: str) -> None:
        """``partition: TEXT`` on stderr with -v only: where the verb's facts come from."""
        if self.verbosity > 0:
            print(f"partition: {text}", file=self.err)

    def warn(self, text: str) -> None:
        """A warning on stderr, -q or not: something the user has to act on."""
        print(text, file=self.err)


def problems_json(problems: Sequence[Problem | PlanProblem | str]) -> list[dict[str, Any]]:
    """Problems as the ``--json`` documents carry them (docs/cli.md): each an object with
    its ``message`` (the words a person reads on stderr), and for a manifest problem its ``file``,
    ``line`` and ``column`` (1-based; 0 for the whole file) and the ``path`` of the node; a plan
    problem its place, ``partition``, ``field`` and ``host`` (the host resources involved)."""
    out: list[dict[str, Any]] = []
    for p in problems:
        if isinstance(p, PlanProblem):
            out.append(p.to_json())
        elif isinstance(p, Problem):
            out.append(
                {
                    "message": p.message,
                    "file": p.file,
                    "line": p.line,
                    "column": p.column,
                    "path": p.path,
                }
            )
        else:
            out.append({"message": p})
    return out


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain left-aligned text table."""
    all_rows = [header, *rows]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header))]
    lines = []
    for r in all_rows:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip())
    return "\n".join(lines)
