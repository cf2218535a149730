"""The isolation steps: the host's own work moved off the partitions' CPUs, and put back.

What moves where is decided by :mod:`partitioner.isolation` (a pure layout and
the moves it implies, read from and written to the host there, every change
recorded with the value it replaced); these steps put that in ``apply``'s and
``destroy``'s lists, after the partitions' own steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from partitioner.engine.context import ApplyContext
from partitioner.engine.step import Action, Step
from partitioner.isolation.layout import Layout, layout_of
from partitioner.isolation.runtime import (
    guests_of,
    in_place,
    isolate,
    layout_from_json,
    load_record,
    record_path,
    restore,
)
from partitioner.kernel.root import HostRoot
from partitioner.planning.model import Plan
from partitioner.record.model import State

log = logging.getLogger("partitioner.isolation")


@dataclass(frozen=True)
class IsolateHost(Step):
    """Take the host's processes, movable kernel threads, unbound workqueues and movable
    interrupts off the partitions' CPUs; the partitions' device interrupts onto theirs."""

    layout: Layout
    state_dir: str
    target: str = "host"
    kind: str = "isolate-host"

    @property
    def detail(self) -> str:
        return (
            f"host work off CPUs {self.layout.partition_cpus} onto the reserve "
            f"{self.layout.reserve}; devices' interrupts to their partition's CPUs"
        )

    def do(self, ctx: ApplyContext) -> None:
        doc = isolate(ctx.root, self.layout, guests_of(ctx.state), self.state_dir)
        for r in doc["refused"]:
            log.info(
                "the kernel keeps %s %s (%s) where it is: %s",
                r["kind"],
                r["id"],
                r["name"],
                r["errno"],
            )

    def undo(self, ctx: ApplyContext) -> None:
        for note in restore(ctx.root, self.state_dir):
            log.warning("%s", note)

    def check(self, ctx: ApplyContext) -> bool:
        return in_place(ctx.root, self.layout, guests_of(ctx.state), self.state_dir)


@dataclass(frozen=True)
class ReleaseHost(Step):
    """Put back every affinity and mask the isolation record holds: the last partition is gone."""

    layout: Layout  # what was isolated, to isolate again if this is undone
    state_dir: str
    target: str = "host"
    kind: str = "release-host"

    @property
    def detail(self) -> str:
        return f"put back the affinities and masks changed to keep CPUs {self.layout.partition_cpus} free"

    def do(self, ctx: ApplyContext) -> None:
        for note in restore(ctx.root, self.state_dir):
            log.warning("%s", note)

    def undo(self, ctx: ApplyContext) -> None:
        isolate(ctx.root, self.layout, guests_of(ctx.state), self.state_dir)

    def check(self, ctx: ApplyContext) -> bool:
        return not record_path(self.state_dir).exists()


def apply_actions(
    mode: str, plan: Plan, state: State, state_dir: str | Path, root: HostRoot
) -> list[Action]:
    """What ``apply`` adds after the partitions' own actions: isolate the host for a ``full``
    site (unless it already is, exactly), or put the host back for a ``pinned`` or empty one."""
    doc = load_record(state_dir)
    if mode == "full" and plan.placements:
        layout = layout_of(plan)
        if root.live and in_place(root, layout, guests_of(state), state_dir):
            return []
        return [IsolateHost(layout, str(state_dir))]
    if doc is not None:
        return [ReleaseHost(layout_from_json(doc["layout"]), str(state_dir))]
    return []


def destroy_actions(
    actions: list[Action], state: State, names: set[str], state_dir: str | Path
) -> list[Action]:
    """``destroy``'s actions with the host put back once no partition is left: right after the
    guests stop, before their devices go back to their drivers (a driver that binds asks for
    interrupts, which get ``default_smp_affinity``: it must be the host's own again by then).

    While others still run, the destroyed partition's CPUs stay fenced: the host gets
    them back with the last partition."""
    doc = load_record(state_dir)
    if doc is None or set(state.partitions) - names:
        return actions
    stops = 0
    while stops < len(actions) and actions[stops].kind == "stop":
        stops += 1
    release = ReleaseHost(layout_from_json(doc["layout"]), str(state_dir))
    return [*actions[:stops], release, *actions[stops:]]
