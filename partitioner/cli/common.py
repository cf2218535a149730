"""What every verb gets: the global options, and the ways of speaking to the user."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from partitioner.errors import UsageError
from partitioner.hostroot import HostRoot

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

    def root(self) -> HostRoot:
        return HostRoot(self.host_root or "/")

    def require_live(self, verb: str) -> None:
        """Verbs that change the host refuse --host-root (cli.md)."""
        if self.host_root is not None:
            raise UsageError(
                f"partition {verb} changes the host and cannot run against --host-root {self.host_root}; "
                "use plan or inspect with --host-root, and apply on the machine itself"
            )

    def emit_json(self, doc: Any) -> None:
        json.dump(doc, self.out, indent=2, sort_keys=False)
        self.out.write("\n")

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


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain left-aligned text table."""
    all_rows = [header, *rows]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header))]
    lines = []
    for r in all_rows:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip())
    return "\n".join(lines)
