"""The step protocol: each thing ``apply`` does to the host, with how it is undone and checked.

A step's ``do`` changes the host and the record together (``ctx.state``); ``undo``
takes the change back; ``check`` says the host and the record already show it
done, so a resumed command skips it.  ``plan`` and ``--dry-run`` list steps by
``str()``; ``--json`` by ``to_json()`` (docs/cli-reference.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from partitioner.engine.context import ApplyContext


@runtime_checkable
class Action(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def detail(self) -> str: ...

    def do(self, ctx: ApplyContext) -> None: ...
    def undo(self, ctx: ApplyContext) -> None: ...
    def check(self, ctx: ApplyContext) -> bool:
        """True when the host and the record already show this done (a resumed apply skips it)."""
        ...

    def to_json(self) -> dict[str, Any]: ...


class Step:
    """What every step shares: how it is listed (``plan``, ``--dry-run``) and shown in ``--json``."""

    kind: str
    target: str

    @property
    def detail(self) -> str:
        return ""

    def to_json(self) -> dict[str, Any]:
        return {"action": self.kind, "target": self.target, "detail": self.detail}

    def __str__(self) -> str:
        d = self.detail
        return f"{self.kind} {self.target}" + (f": {d}" if d else "")


@dataclass(frozen=True)
class Replace(Step):
    """A running partition whose placement changed: taken down and brought up again, as one step."""

    target: str
    steps: tuple[Action, ...]
    why: str
    kind: str = "replace"

    @property
    def detail(self) -> str:
        return self.why

    def do(self, ctx: ApplyContext) -> None:
        done: list[Action] = []
        try:
            for step in self.steps:
                step.do(ctx)
                done.append(step)
        except BaseException:
            # Half a replacement is worse than none: put the old partition back before reporting.
            for step in reversed(done):
                step.undo(ctx)
            raise

    def undo(self, ctx: ApplyContext) -> None:
        for step in reversed(self.steps):
            step.undo(ctx)

    def check(self, ctx: ApplyContext) -> bool:
        return False

    def to_json(self) -> dict[str, Any]:
        d = super().to_json()
        d["steps"] = [s.to_json() for s in self.steps]
        return d
