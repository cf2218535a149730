"""The diff: the ordered steps that take the host from what the record says runs to what the plan says.

Partitions leaving the plan are torn down first (stops in reverse start order,
then their devices and pages), then partitions are brought up in start order.
A running partition whose ``cpus``, ``memory`` or devices changed within its bounds
is changed live (rule 11, :mod:`partitioner.engine.live`): every partition's
give-backs first (so a partition may grow into what another gives up in the same
apply), then the takes in start order.  Any other change of a running partition
leaves it running unless its operator names it with ``--replace``
(:func:`held_replacements` says which and why).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from partitioner.engine.confine import GiveBackUser, TakeUser
from partitioner.engine.devices import ClaimGroup, ReleaseGroup
from partitioner.engine.guests import Forget, Start, Stop, _placement_summary
from partitioner.engine.hugepages import (
    ReleaseHugepages,
    ReleasePagesLive,
    ReserveHugepages,
    ReservePagesLive,
    _idle_need,
)
from partitioner.engine.live import (
    AddCpus,
    AttachDevice,
    DetachDevice,
    GrowMemory,
    LiveStep,
    RemoveCpus,
    Rerecord,
    ShrinkMemory,
)
from partitioner.engine.sriov import ClaimVf, ConfigureVf, clears_of, pf_changes
from partitioner.engine.step import Action, Replace
from partitioner.inventory.model import Host
from partitioner.planning.live import LiveChange, hotplugged_after, live_change
from partitioner.planning.model import Placement, Plan
from partitioner.record.model import PartitionRecord, RunState, State
from partitioner.units import format_size
from partitioner.vfio.preview import group_endpoints


def _stop_key(rec: PartitionRecord) -> tuple[int, str]:
    return (rec.placement.spec.order, rec.name)


def teardown(records: Iterable[PartitionRecord], state: State | None = None) -> list[Action]:
    """Take partitions down and give back what they hold: stops first (reverse start order), then
    devices (a VF's settings put back after its claim is released) and pages, so nothing is
    released from under a guest that still runs.  ``state``: the record, for the VFs' settings."""
    recs = sorted(records, key=_stop_key, reverse=True)
    out: list[Action] = [Stop(r.name) for r in recs if r.state is RunState.RUNNING]
    for r in recs:
        out.extend(_release(r, state))
        out.append(Forget(r.name, r))
    return out


def _release(r: PartitionRecord, state: State | None) -> list[Action]:
    out: list[Action] = []
    for c in reversed(r.claims):
        fns = tuple((f.address, f.driver) for f in c.functions)
        out.append(ReleaseGroup(r.name, c.group, fns))
    if state is not None:
        out.extend(clears_of(r.name, state))
    out.extend(ReleaseHugepages(r.name, g.node, g.size_bytes, g.pages) for g in r.hugepages)
    if r.uid is not None:
        out.append(GiveBackUser(r.name, r.uid))
    return out


def _bring_up(
    p: Placement,
    host: Host,
    shortfall: dict[tuple[int, int], int],
    state: State,
    held: Iterable[int] = (),
    *,
    confine: bool = True,
) -> list[Action]:
    out: list[Action] = []
    if p.hugepage_bytes is not None:
        size = p.hugepage_bytes
        for node, nbytes in p.memory_per_node:
            pages = nbytes // size
            key = (node, size)
            if key not in shortfall:
                pool = host.nodes[node].hugepages.get(size) if node in host.nodes else None
                shortfall[key] = _idle_need(state, node, size, p.name) - (pool.free if pool else 0)
            # Partitions started earlier in this apply take their pages before this one asks.
            shortfall[key] += pages
            if shortfall[key] > 0:
                out.append(ReserveHugepages(p.name, node, size, pages))
    out.extend(_claims(p, host, held))
    rec = state.partitions.get(p.name)
    if confine and (rec is None or rec.uid is None):
        out.append(TakeUser(p.name))
    out.append(Start(p.name, _placement_summary(p)))
    return out


def _claims(p: Placement, host: Host, held: Iterable[int]) -> list[Action]:
    out: list[Action] = []
    have = set(held)
    # A VF gets its settings through its PF, then is claimed with the group the kernel gave
    # it when it was made (a VF made by this apply has none known at plan time).
    for d in p.devices:
        if d.vf is not None:
            pf = str(d.vf.pf)
            if d.vf.settings is not None:
                out.append(ConfigureVf(p.name, pf, d.vf.index, d.vf.settings))
            out.append(ClaimVf(p.name, pf, d.vf.index, str(d.address)))
    vf_only = {d.iommu_group for d in p.devices if d.vf is not None} - {
        d.iommu_group for d in p.devices if d.vf is None
    }
    for g in p.iommu_groups:
        if g in have or g in vf_only:
            continue

        # What claim_group takes, listed as it will.
        fns = tuple((str(fn.address), fn.driver) for fn in group_endpoints(host, g))
        out.append(ClaimGroup(p.name, g, fns))
    return out


def _changes(new: Placement, old: Placement) -> str:
    said: list[str] = []
    if new.cpus != old.cpus:
        said.append(f"CPUs {old.cpuset} -> {new.cpuset}")
    if new.memory_per_node != old.memory_per_node:
        said.append(f"memory {format_size(old.memory_bytes)} -> {format_size(new.memory_bytes)}")
    if new.hugepage_bytes != old.hugepage_bytes:
        said.append("page size changed")
    if tuple(d.address for d in new.devices) != tuple(d.address for d in old.devices):
        said.append("devices changed")
    if (new.sockets, new.cores, new.threads) != (old.sockets, old.cores, old.threads):
        said.append("CPU topology changed")
    if (new.spec.boot, new.spec.disks, new.spec.firmware) != (
        old.spec.boot,
        old.spec.disks,
        old.spec.firmware,
    ):
        said.append("boot, disks or firmware changed")
    return ", ".join(said) or "placement changed"


def held_replacements(plan: Plan, state: State, *, replace: set[str]) -> dict[str, str]:
    """Running partitions the manifest changed but that are left running: name -> what changed.

    A running partition is never restarted behind its operator's back; ``--replace NAME``
    or ``--replace-all`` says to.
    """
    out: dict[str, str] = {}
    for name, p in plan.placements.items():
        rec = state.partitions.get(name)
        if (
            rec is not None
            and rec.state is RunState.RUNNING
            and name not in replace
            and not p.same_resources(rec.placement)
        ):
            live = live_change(p, rec.placement)
            if not isinstance(live, LiveChange):
                out[name] = f"{_changes(p, rec.placement)}; {live}"
    return out


def _pool_need(
    host: Host, state: State, shortfall: dict[tuple[int, int], int], node: int, size: int, name: str
) -> int:
    key = (node, size)
    if key not in shortfall:
        pool = host.nodes[node].hugepages.get(size) if node in host.nodes else None
        shortfall[key] = _idle_need(state, node, size, name) - (pool.free if pool else 0)
    return shortfall[key]


def _live_steps(
    p: Placement,
    rec: PartitionRecord,
    host: Host,
    shortfall: dict[tuple[int, int], int],
    state: State,
) -> tuple[list[Action], list[Action]]:
    """A running partition changed live from its recorded placement to ``p``: (the steps that
    give back, the steps that take), each step from one placement to the next."""
    cur = rec.placement
    gives: list[Action] = []
    takes: list[Action] = []
    size = p.hugepage_bytes
    # Give back: vCPUs, memory, devices.
    if len(p.cpus) < len(cur.cpus):
        nxt = replace(cur, spec=p.spec, cpus=p.cpus, cpu_nodes=p.cpu_nodes)
        gives.append(RemoveCpus(p.name, cur, nxt))
        cur = nxt
    old_mem, new_mem = dict(cur.memory_per_node), dict(p.memory_per_node)
    for node in sorted(old_mem):
        if new_mem.get(node, 0) < old_mem[node]:
            nxt = replace(
                cur, spec=p.spec, memory_per_node=_with_node(cur, node, new_mem.get(node, 0))
            )
            gives.append(ShrinkMemory(p.name, cur, nxt, node))
            if size:
                gives.append(
                    ReleasePagesLive(p.name, node, size, (old_mem[node] - new_mem[node]) // size)
                )
            cur = nxt
    keep_groups = set(p.iommu_groups)
    for g in cur.iommu_groups:
        if g not in keep_groups:
            left = tuple(d for d in cur.devices if d.iommu_group != g)
            nxt = replace(cur, spec=p.spec, devices=left, hotplugged=hotplugged_after(cur, left))
            gives.append(DetachDevice(p.name, cur, nxt, g))
            claim = rec.claim_of(g)
            if claim is not None:
                fns = tuple((f.address, f.driver) for f in claim.functions)
                gives.append(ReleaseGroup(p.name, g, fns))
            cur = nxt
    # Take: memory (its pages first), devices (their groups claimed first), vCPUs.
    for node in sorted(new_mem):
        if new_mem[node] > old_mem.get(node, 0):
            if size:
                pages = (new_mem[node] - old_mem.get(node, 0)) // size
                shortfall[(node, size)] = (
                    _pool_need(host, state, shortfall, node, size, p.name) + pages
                )
                if shortfall[(node, size)] > 0:
                    takes.append(ReservePagesLive(p.name, node, size, pages))
            nxt = replace(cur, spec=p.spec, memory_per_node=_with_node(cur, node, new_mem[node]))
            takes.append(GrowMemory(p.name, cur, nxt, node))
            cur = nxt
    have_groups = set(cur.iommu_groups)
    held = set(rec.claim_groups())
    for g in p.iommu_groups:
        if g not in have_groups:
            if g not in held:
                fns = tuple((str(fn.address), fn.driver) for fn in group_endpoints(host, g))
                takes.append(ClaimGroup(p.name, g, fns))
            added = tuple(d for d in p.devices if d.iommu_group == g)
            more = (*cur.devices, *added)
            nxt = replace(cur, spec=p.spec, devices=more, hotplugged=hotplugged_after(cur, more))
            takes.append(AttachDevice(p.name, cur, nxt, g))
            cur = nxt
    if len(p.cpus) > len(cur.cpus):
        takes.append(
            AddCpus(p.name, cur, replace(cur, spec=p.spec, cpus=p.cpus, cpu_nodes=p.cpu_nodes))
        )
    if not gives and not takes:
        # Nothing for the guest to do (its devices listed in another order): recorded as planned.
        takes.append(Rerecord(p.name, rec.placement, p))
    # The last step leaves the placement exactly as planned.
    steps = [*gives, *takes]
    for i in range(len(steps) - 1, -1, -1):
        last = steps[i]
        if isinstance(last, LiveStep):
            steps[i] = last.ending_at(p)
            break
    return steps[: len(gives)], steps[len(gives) :]


def _stray_claims(p: Placement, rec: PartitionRecord) -> list[Action]:
    """Groups a running partition holds claimed that its guest has not got and its plan does
    not want (a live change killed between the claim and the plug, or between the unplug and
    the release): given back."""
    wanted = {*p.iommu_groups, *rec.placement.iommu_groups}
    return [
        ReleaseGroup(p.name, c.group, tuple((f.address, f.driver) for f in c.functions))
        for c in rec.claims
        if c.group not in wanted and not c.pending
    ]


def _with_node(p: Placement, node: int, nbytes: int) -> tuple[tuple[int, int], ...]:
    return tuple((n, nbytes if n == node else b) for n, b in p.memory_per_node)


def diff(plan: Plan, state: State, host: Host, *, replace: set[str]) -> list[Action]:
    """The ordered actions that take the host from ``state`` to ``plan``; [] when nothing changed."""
    out: list[Action] = []
    gone = [r for n, r in state.partitions.items() if n not in plan.placements]
    out.extend(teardown(gone, state))
    # PFs: those leaving the plan (or changing their count) put back once the partitions that
    # left gave back their VFs, then the plan's VFs made before any partition comes up.
    now = {
        str(a): fn.sriov.num_vfs
        for a, fn in ((pf.address, host.pci.get(pf.address)) for pf in plan.sriov)
        if fn is not None and fn.sriov is not None
    }
    restores, creations = pf_changes(((str(pf.address), pf.vfs) for pf in plan.sriov), state, now)
    out.extend(restores)
    out.extend(creations)
    shortfall: dict[tuple[int, int], int] = {}
    # Live changes: every partition's give-backs before anything is taken.
    takes: dict[str, list[Action]] = {}
    for p in plan.start_order():
        rec = state.partitions.get(p.name)
        if rec is not None and rec.state is RunState.RUNNING and p.name not in replace:
            out.extend(_stray_claims(p, rec))
        if (
            rec is not None
            and rec.state is RunState.RUNNING
            and p.name not in replace
            and not p.same_resources(rec.placement)
            and isinstance(live_change(p, rec.placement), LiveChange)
        ):
            gives, takes[p.name] = _live_steps(p, rec, host, shortfall, state)
            out.extend(gives)
    for p in plan.start_order():
        if p.name in takes:
            out.extend(takes[p.name])
            continue
        rec = state.partitions.get(p.name)
        # A partition placed anew gives its user back first and takes one when it starts.
        without = state.without_partition(p.name)
        if rec is None:
            out.extend(_bring_up(p, host, shortfall, state, confine=plan.confine))
        elif not p.same_resources(rec.placement):
            if rec.state is RunState.RUNNING:
                if p.name not in replace:
                    continue  # held_replacements() reports it
                steps = [Stop(p.name), *_release(rec, state), Forget(p.name, rec)]
                steps += _bring_up(p, host, shortfall, without, confine=plan.confine)
                out.append(Replace(p.name, tuple(steps), _changes(p, rec.placement)))
            else:
                out.extend([*_release(rec, state), Forget(p.name, rec)])
                out.extend(_bring_up(p, host, shortfall, without, confine=plan.confine))
        elif rec.state is not RunState.RUNNING:
            # What is missing (pages or a claim an apply killed half-way never made, pages a
            # stopped partition gave back) is taken before it starts.
            out.extend(
                _bring_up(p, host, shortfall, state, rec.claim_groups(), confine=plan.confine)
            )
    return out
