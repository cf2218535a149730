"""The guest steps: a partition's QEMU started (pinned, fenced, recorded) and stopped.

Starting records the run directory before QEMU exists (the intent), then the pid
as soon as it is spawned, so a QEMU never outlives a command without the record
naming it.  Stopping asks the guest to power down (ACPI) and, after a timeout,
ends it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from partitioner.engine.confine import ensure_user
from partitioner.engine.context import ApplyContext
from partitioner.engine.step import Step
from partitioner.isolation.cgroup import fence, unfence
from partitioner.planning.confine import memlock_bytes
from partitioner.planning.model import Placement, Plan
from partitioner.record.model import PartitionRecord, RunState, plan_of_state
from partitioner.units import format_size, page_size_name


def _placement_summary(p: Placement) -> str:
    pages = page_size_name(p.hugepage_bytes) if p.hugepage_bytes else "normal"
    nodes = ",".join(str(n) for n in p.numa_nodes)
    devs = f", {len(p.devices)} PCI function(s)" if p.devices else ""
    return (
        f"QEMU on host CPUs {p.cpuset}, {format_size(p.memory_bytes)} ({pages} pages) "
        f"on node {nodes}{devs}"
    )


def _launch(ctx: ApplyContext, name: str, placement: Placement, plan: Plan) -> PartitionRecord:
    from partitioner.guest.argv import Jail, guest_paths, qemu_argv
    from partitioner.guest.launch import launch, memlock_ceiling, start_ticks

    jail = None
    if plan.confine:
        # Normally taken by its own step (TakeUser); a start of a partition recorded
        # without one (an older record) takes it here, saved before it is used all the same.
        uid = ensure_user(ctx, name)
        need = memlock_bytes(placement, plan.accel)
        ceiling = memlock_ceiling(ctx.root)
        if ceiling is not None and ceiling < need:
            ctx.progress(
                f"warning: {name}: its QEMU needs a locked-memory limit of {format_size(need)} "
                f"but this partitioner cannot give more than its own {format_size(ceiling)} "
                "(it lacks CAP_SYS_RESOURCE: a container?); QEMU locks its memory before it "
                "drops to its user, so it starts, but a device mapped later may be refused"
            )
            need = ceiling
        jail = Jail(uid=uid, gid=uid, memlock_bytes=need)
    before = ctx.record(name)
    paths = guest_paths(ctx.run_dir, ctx.log_dir, name, state_dir=ctx.state_dir)
    caps = ctx.caps()
    argv = qemu_argv(placement, plan, paths, caps, jail)
    # The intent first: the record names the run directory (and so the pidfile and the QMP
    # socket) before a QEMU can exist that outlives this command.
    ctx.update(
        replace(
            before,
            state=RunState.STARTING,
            placement=placement,
            argv=tuple(argv),
            pid=None,
            start_ticks=None,
            vcpu_threads={},
            paths=paths.to_json(),
            started_at=None,
        )
    )
    ctx.commit()

    def spawned(pid: int) -> None:
        rec = ctx.state.partitions[name]
        ctx.update(replace(rec, pid=pid, start_ticks=start_ticks(ctx.root, pid)))
        ctx.commit()

    try:
        guest = launch(
            placement,
            plan,
            paths,
            caps,
            root=ctx.root,
            timeout=ctx.launch_timeout,
            on_progress=ctx.on_progress,
            on_spawned=spawned,
            jail=jail,
        )
    except BaseException:
        # launch ended its QEMU and removed its run directory: the partition is as it was.
        rec = ctx.state.partitions[name]
        ctx.update(replace(rec, state=before.state, pid=None, start_ticks=None))
        ctx.commit()
        raise
    rec = replace(
        ctx.state.partitions[name],
        state=RunState.RUNNING,
        vcpu_threads=dict(guest.vcpu_threads),
        started_at=guest.started_at,
    )
    ctx.update(rec)
    try:
        fence(ctx.root, rec, plan.host_cpus)  # its cgroup, vCPUs and emulator apart
    except BaseException:
        _stop(ctx, rec, ctx.undo_stop_timeout)
        raise
    return rec


def _stop(ctx: ApplyContext, rec: PartitionRecord, timeout: float) -> None:
    from partitioner.guest.argv import GuestPaths, guest_paths
    from partitioner.guest.jail import remove_run_dir
    from partitioner.guest.launch import is_running, powerdown

    if rec.pid is not None and is_running(ctx.root, rec.pid, rec.name):
        ctx.progress(f"stopping {rec.name}")
        paths = (
            GuestPaths.from_json(dict(rec.paths))
            if rec.paths
            else guest_paths(ctx.run_dir, ctx.log_dir, rec.name, state_dir=ctx.state_dir)
        )
        powerdown(paths, rec.pid, timeout=timeout, root=ctx.root)
    elif rec.paths:
        remove_run_dir(GuestPaths.from_json(dict(rec.paths)).dir)
    unfence(ctx.root, rec.name)
    ctx.update(
        replace(
            rec,
            state=RunState.STOPPED,
            pid=None,
            start_ticks=None,
            vcpu_threads={},
            started_at=None,
        )
    )


@dataclass(frozen=True)
class Start(Step):
    target: str
    summary: str = ""
    kind: str = "start"

    @property
    def detail(self) -> str:
        return self.summary

    def do(self, ctx: ApplyContext) -> None:
        _launch(ctx, self.target, ctx.placement(self.target), ctx.plan_for(self.target))

    def undo(self, ctx: ApplyContext) -> None:
        rec = ctx.state.partitions.get(self.target)
        if rec is not None:
            _stop(ctx, rec, ctx.undo_stop_timeout)

    def check(self, ctx: ApplyContext) -> bool:
        from partitioner.guest.launch import is_running

        rec = ctx.state.partitions.get(self.target)
        return (
            rec is not None
            and rec.state is RunState.RUNNING
            and rec.pid is not None
            and is_running(ctx.root, rec.pid, self.target)
        )


@dataclass(frozen=True)
class Stop(Step):
    target: str
    timeout: float | None = None  # None: the context's stop timeout
    kind: str = "stop"

    @property
    def detail(self) -> str:
        return "ACPI power-down, then quit"

    def do(self, ctx: ApplyContext) -> None:
        rec = ctx.state.partitions[self.target]
        _stop(ctx, rec, self.timeout if self.timeout is not None else ctx.stop_timeout)

    def undo(self, ctx: ApplyContext) -> None:
        rec = ctx.state.partitions[self.target]
        _launch(ctx, self.target, rec.placement, plan_of_state(ctx.state))

    def check(self, ctx: ApplyContext) -> bool:
        rec = ctx.state.partitions.get(self.target)
        return rec is None or rec.state is RunState.STOPPED


@dataclass(frozen=True)
class Forget(Step):
    """Drop a partition that holds nothing any more from the record."""

    target: str
    kept: PartitionRecord  # the record as diff saw it, to put back on undo
    kind: str = "forget"

    @property
    def detail(self) -> str:
        return "remove from the state record"

    def do(self, ctx: ApplyContext) -> None:
        ctx.state = ctx.state.without_partition(self.target)

    def undo(self, ctx: ApplyContext) -> None:
        ctx.update(
            replace(
                self.kept,
                state=RunState.STOPPED,
                pid=None,
                vcpu_threads={},
                started_at=None,
                claims=(),
                hugepages=(),
            )
        )

    def check(self, ctx: ApplyContext) -> bool:
        return self.target not in ctx.state.partitions
