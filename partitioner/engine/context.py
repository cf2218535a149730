"""What the apply engine's steps act with: a small typed context handed to each step.

It carries the host door, the plan being applied and the record as it stands
after the last step (``state``), which is what the executor saves.  A step that
must save an intent before the change it announces calls :meth:`ApplyContext.commit`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from partitioner.inventory.model import Host
from partitioner.kernel.root import HostRoot
from partitioner.planning.model import Placement, Plan
from partitioner.record.model import PartitionRecord, RunState, State, plan_of_state
from partitioner.record.store import StateStore

if TYPE_CHECKING:
    from partitioner.guest.caps import QemuCaps


@dataclass
class ApplyContext:
    """What actions act with: the host door, the plan being applied, and the record as it stands."""

    root: HostRoot
    plan: Plan
    state: State
    run_dir: Path
    log_dir: Path
    state_dir: Path | None = None  # where UEFI variable stores persist
    host: Host | None = None  # the scanned host: claiming a group needs it
    qemu_binary: str = "qemu-system-x86_64"
    stop_timeout: float = 60.0  # ACPI power-down before QEMU is told to quit
    undo_stop_timeout: float = 5.0  # a guest started by this very apply need not shut down politely
    launch_timeout: float = 120.0
    live_timeout: float = 60.0  # for a guest to take or give up a vCPU, memory or a device
    release_wait: float = 10.0  # for an exited QEMU's hugepages to be free again
    on_progress: Callable[[str], None] | None = None
    store: StateStore | None = None  # set by execute: an intent is saved before its change
    _caps: QemuCaps | None = field(default=None, repr=False)

    def commit(self) -> None:
        """Save the record as it stands now, mid-action: an intent must be on disk before
        the host change it announces (execute saves after each action anyway)."""
        if self.store is not None:
            self.store.save(self.state)

    def caps(self) -> QemuCaps:
        if self._caps is None:
            from partitioner.guest.caps import probe_qemu

            self._caps = probe_qemu(self.qemu_binary)
        return self._caps

    def progress(self, text: str) -> None:
        if self.on_progress is not None:
            self.on_progress(text)

    def record(self, name: str) -> PartitionRecord:
        """The partition's record, created (stopped, holding nothing) from the plan if it has none."""
        rec = self.state.partitions.get(name)
        if rec is None:
            rec = PartitionRecord(name=name, state=RunState.STOPPED, placement=self.placement(name))
            self.state = self.state.with_partition(rec)
        return rec

    def update(self, rec: PartitionRecord) -> None:
        self.state = self.state.with_partition(rec)

    def placement(self, name: str) -> Placement:
        """The placement to act on: the plan's, or for a partition leaving the plan, the recorded one."""
        if name in self.plan.placements:
            return self.plan.placements[name]
        return self.state.partitions[name].placement

    def plan_for(self, name: str) -> Plan:
        return self.plan if name in self.plan.placements else plan_of_state(self.state)
