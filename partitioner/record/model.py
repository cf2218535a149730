"""The record of what ``apply`` put on the host, as values: partitions, their claims, grants and intents.

The record is what lets a later command (``status``, ``stop``, a second
``apply`` after a killed one, ``destroy``) know what this host is running and
what must be given back: which QEMU process is which partition, the drivers
devices had before they were claimed, the hugepages added to the pools.

Everything here is a frozen value and every function is pure; the JSON form is
:mod:`partitioner.record.codec`, the file and its lock :mod:`partitioner.record.store`,
and what a killed command left behind is settled by :mod:`partitioner.record.reconcile`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from partitioner.cpuset import CpuSet
from partitioner.errors import StateError
from partitioner.kernel.vflink import VfLink
from partitioner.planning.model import Placement, Plan, RunningPartition

VFIO_PCI = "vfio-pci"


class RunState(StrEnum):
    STARTING = "starting"  # its QEMU is (being) spawned; not yet pinned and let run
    RUNNING = "running"
    STOPPED = "stopped"  # not running on purpose (stop, or not started yet); resources still held
    FAILED = "failed"  # recorded as running, but its QEMU is gone


@dataclass(frozen=True)
class HugepageGrant:
    """Pages ``apply`` added to a node's pool for one partition; destroy gives back exactly these."""

    node: int
    size_bytes: int
    pages: int


@dataclass(frozen=True)
class PoolIntent:
    """A hugepage pool change about to be made, recorded before the pool is touched.

    ``before`` is the pool's size (nr_hugepages) seen just before, ``target`` the size
    asked for.  A command killed between changing the pool and recording the grant
    leaves this; the next run turns it into the grant it really was (``settle_pool_intent``).
    """

    node: int
    size_bytes: int
    op: str  # "raise" (pages added for the partition) or "release" (given back)
    before: int
    target: int

    def settle(self, now: int) -> int:
        """Pages that moved, given the pool's size ``now``: never more than asked for, never < 0.

        Another process resizing the same pool meanwhile can only make this smaller
        than the truth for a raise (pages then stay in the pool, never taken from
        someone else), and never larger than what this command asked for.
        """
        if self.op == "raise":
            return max(0, min(now - self.before, self.target - self.before))
        return max(0, min(self.before - now, self.before - self.target))


@dataclass(frozen=True)
class FunctionRecord:
    """What one PCI function had before it was claimed."""

    address: str
    driver: str | None
    driver_override: str | None

    @property
    def was_on_vfio(self) -> bool:
        """Already on vfio-pci before the claim: nothing was taken, so nothing is given back."""
        return self.driver == VFIO_PCI


@dataclass(frozen=True)
class GroupClaim:
    """One IOMMU group claimed for vfio-pci: its endpoints, in the order they were claimed.

    ``pending`` is the intent: saved, with the drivers the functions have, before the
    first function is unbound; a kill during the claim leaves it, and the next run
    gives the functions back to those drivers exactly once.
    """

    group: int
    functions: tuple[FunctionRecord, ...]
    loaded_vfio_pci: bool = False  # this claim loaded the vfio-pci module
    pending: bool = False

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(f.address for f in self.functions)


LIVE_OPS = (
    "add-cpus",
    "remove-cpus",
    "grow-memory",
    "shrink-memory",
    "attach-device",
    "detach-device",
)


@dataclass(frozen=True)
class LiveIntent:
    """A live change to a running guest (rule 11), recorded before QEMU is asked for it.

    ``after`` is the placement once the change is done; the record's placement is the
    one before it until then.  A command killed in between leaves this, and the next
    run takes what the guest really has from QEMU (``query-hotpluggable-cpus``,
    ``query-memory-devices``, its devices) as the truth (:mod:`partitioner.record.reconcile`).
    ``resume`` says the guest was running when the change paused it (a vCPU is pinned
    before the guest may run it), so a kill in that window is followed by letting it run.
    """

    op: str  # one of LIVE_OPS
    after: Placement
    resume: bool = False


@dataclass(frozen=True)
class SiteRecord:
    """The host side of the applied plan: what a later ``start`` needs to rebuild a Plan."""

    manifest: str
    accel: str
    smt: str
    host_cpus: CpuSet
    host_memory_bytes: int
    confine: bool = True

    @classmethod
    def of_plan(cls, plan: Plan, manifest: str) -> SiteRecord:
        return cls(
            manifest, plan.accel, plan.smt, plan.host_cpus, plan.host_memory_bytes, plan.confine
        )


@dataclass(frozen=True)
class PartitionRecord:
    name: str
    state: RunState
    placement: Placement
    argv: tuple[str, ...] = ()  # the QEMU command line it was (or will be) started with
    pid: int | None = None
    start_ticks: int | None = (
        None  # /proc/PID/stat field 22 of that pid: the pid is ours only with it
    )
    vcpu_threads: Mapping[int, int] = field(default_factory=dict)  # vCPU index -> host thread id
    paths: Mapping[str, str] = field(default_factory=dict)  # qmp, console, console_log, dir...
    started_at: float | None = None  # time.time() when it was let run
    claims: tuple[GroupClaim, ...] = ()  # in claim order
    hugepages: tuple[HugepageGrant, ...] = ()
    pool_intents: tuple[PoolIntent, ...] = ()  # pool changes under way (a killed command's)
    uid: int | None = None  # its QEMU's user and group (rule 10), recorded before first used
    live: LiveIntent | None = None  # a live change under way (a killed command's)

    def holds_nothing(self) -> bool:
        return (
            self.state not in (RunState.RUNNING, RunState.STARTING)
            and not self.claims
            and not self.hugepages
            and not self.pool_intents
            and self.uid is None
        )

    def claim_groups(self) -> list[int]:
        return [c.group for c in self.claims]

    def claim_of(self, group: int) -> GroupClaim | None:
        return next((c for c in self.claims if c.group == group), None)


@dataclass(frozen=True)
class VfRecord:
    """One VF's settings as set for a partition, with what it had before (destroy puts that back).

    ``pending`` is the intent: saved before the first setting is sent; a kill before the
    settings are recorded as made leaves it, and the next run puts ``before`` back.
    """

    index: int
    partition: str
    before: VfLink
    want: VfLink
    pending: bool = True


@dataclass(frozen=True)
class SriovRecord:
    """A physical function whose VFs ``apply`` made: what it had before, so destroy puts it back.

    ``pending`` is the intent, saved before ``sriov_drivers_autoprobe`` or ``sriov_numvfs``
    is written: ``op`` "create" (making ``numvfs`` VFs) or "restore" (putting back
    ``numvfs_before`` and ``autoprobe_before``).  A kill in between leaves it; the next run
    records the VFs as made if they all are (create), or else puts both values back.
    """

    pf: str
    numvfs_before: int
    autoprobe_before: bool
    numvfs: int
    pending: bool = True
    op: str = "create"  # or "restore"
    vfs: tuple[VfRecord, ...] = ()  # VFs whose settings were changed, in the order they were

    def vf(self, index: int) -> VfRecord | None:
        return next((v for v in self.vfs if v.index == index), None)


@dataclass(frozen=True)
class State:
    site: SiteRecord | None = None
    partitions: Mapping[str, PartitionRecord] = field(default_factory=dict)
    sriov: tuple[SriovRecord, ...] = ()  # PFs whose VFs apply made, in the order it made them

    def with_partition(self, rec: PartitionRecord) -> State:
        parts = dict(self.partitions)
        parts[rec.name] = rec
        return replace(self, partitions=dict(sorted(parts.items())))

    def without_partition(self, name: str) -> State:
        return replace(self, partitions={k: v for k, v in self.partitions.items() if k != name})

    def pf(self, address: str) -> SriovRecord | None:
        """The record of the PF at ``address``, if apply made its VFs."""
        return next((r for r in self.sriov if r.pf == address), None)

    def with_pf(self, rec: SriovRecord) -> State:
        """``rec`` in place of the PF's record (appended when it has none)."""
        if self.pf(rec.pf) is None:
            return replace(self, sriov=(*self.sriov, rec))
        return replace(self, sriov=tuple(rec if r.pf == rec.pf else r for r in self.sriov))

    def without_pf(self, address: str) -> State:
        return replace(self, sriov=tuple(r for r in self.sriov if r.pf != address))


# -- changes to one partition's record (pure) ------------------------------------


def add_grant(rec: PartitionRecord, grant: HugepageGrant) -> PartitionRecord:
    """``grant`` added to (or, with negative pages, taken from) the record's grants."""
    merged: dict[tuple[int, int], int] = {}
    for g in (*rec.hugepages, grant):
        merged[(g.node, g.size_bytes)] = merged.get((g.node, g.size_bytes), 0) + g.pages
    return replace(
        rec,
        hugepages=tuple(HugepageGrant(n, s, c) for (n, s), c in sorted(merged.items()) if c > 0),
    )


def drop_intent(rec: PartitionRecord, intent: PoolIntent) -> PartitionRecord:
    left = list(rec.pool_intents)
    if intent in left:
        left.remove(intent)
    return replace(rec, pool_intents=tuple(left))


def settle_pool_intent(rec: PartitionRecord, intent: PoolIntent, now: int) -> PartitionRecord:
    """The record once an interrupted pool change is taken for what it did: the pool has ``now``.

    The one rule for an intent, used by the step that was interrupted (its undo) and by
    reconciliation after a killed command alike: the pages that moved become (or leave)
    the partition's grant, and the intent is dropped.
    """
    moved = intent.settle(now)
    signed = moved if intent.op == "raise" else -moved
    return add_grant(
        drop_intent(rec, intent), HugepageGrant(intent.node, intent.size_bytes, signed)
    )


def with_vf(rec: SriovRecord, vf: VfRecord) -> SriovRecord:
    """``vf`` in place of the record of the same VF index (appended when there is none)."""
    if rec.vf(vf.index) is None:
        return replace(rec, vfs=(*rec.vfs, vf))
    return replace(rec, vfs=tuple(vf if v.index == vf.index else v for v in rec.vfs))


def without_vf(rec: SriovRecord, index: int) -> SriovRecord:
    return replace(rec, vfs=tuple(v for v in rec.vfs if v.index != index))


def drop_claim(rec: PartitionRecord, group: int) -> PartitionRecord:
    return replace(rec, claims=tuple(c for c in rec.claims if c.group != group))


# -- views for the planner and for status --------------------------------------


def running_partitions(state: State) -> dict[str, RunningPartition]:
    """What the planner must keep where it is (manifest rule 8): partitions holding host resources.

    A stopped or failed partition still holds its devices and pages until it is
    destroyed, so the planner sees it too.
    """
    out: dict[str, RunningPartition] = {}
    for name, rec in state.partitions.items():
        p = rec.placement
        out[name] = RunningPartition(
            name=name,
            cpus=p.cpus,
            memory_per_node=p.memory_per_node,
            hugepage_bytes=p.hugepage_bytes,
            devices=tuple(d.address for d in p.devices),
            placement=p,
        )
    return out


def plan_of_state(state: State) -> Plan:
    """The applied plan, rebuilt from the record: what ``start`` of one partition launches against."""
    if state.site is None:
        raise StateError("nothing has been applied on this host (the state record is empty)")
    return Plan(
        accel=state.site.accel,
        smt=state.site.smt,
        host_cpus=state.site.host_cpus,
        host_memory_bytes=state.site.host_memory_bytes,
        confine=state.site.confine,
        placements={n: r.placement for n, r in sorted(state.partitions.items())},
    )
