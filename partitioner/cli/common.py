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

from partitioner.errors import HostReadError, Problem, StateError, UsageError
from partitioner.kernel.root import HostRoot

if TYPE_CHECKING:
    from partitioner.record.reconcile import Finding

DEFAULT_STATE_DIR = "/var/lib/partition"
DEFAULT_RUN_DIR = "/run/partition"
DEFAULT_LOG_DIR = "/var/log/partition"


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

    def root(self) -> HostRoot:
        if self.host_root is None:
            return HostRoot("/")
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
        """The verb's one JSON document on stdout (``--json``), with what it reported."""
        if self.emitted:
            raise RuntimeError("a verb emitted a second JSON document")
        json.dump({**doc, **self.reported}, self.out, indent=2, sort_keys=False)
        self.out.write("\n")
        self.out.flush()
        self.emitted = True

    def say(self, text: str = "") -> None:
        """Human output on stdout (not in --json mode)."""
        if not self.json:
            print(text, file=self.out)

    def info(self, text: str) -> None:
        """Progress and notes on stderr, unless -q."""
        if self.verbosity >= 0:
            print(text, file=self.err)

    def warn(self, text: str) -> None:
        print(text, file=self.err)


def problems_json(problems: Sequence[Problem | str]) -> list[dict[str, Any]]:
    """Problems as the ``--json`` documents carry them (docs/cli.md): each an object with
    its ``message`` (the words a person reads on stderr), and for a manifest problem its ``file``,
    ``line`` and ``column`` (1-based; 0 for the whole file) and the ``path`` of the node."""
    out: list[dict[str, Any]] = []
    for p in problems:
        if isinstance(p, Problem):
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
