"""The record against the host, after a command that may have been killed at any instant.

Every change to the host is recorded as an intent before it is made (docs/decisions.md,
"Crash safety"): a partition ``starting`` with its run directory before QEMU is
spawned (then its pid and start time), a hugepage pool change with the pool's size
before it, a device claim with the drivers its functions had.  ``reconcile`` reads
those intents and the host and says, for each partition, what it finds and what is
to be done about it; :meth:`Reconciled.carry_out` does it (only the verbs that hold
the lock and change the host call it; ``status`` and ``plan`` show the outcome).

- A QEMU is found through the record's pid, its pidfile, or (for a start killed
  before the pidfile was written) its QMP socket path in a command line, and is
  taken as this partition's only when its command line names the partition and
  that socket, and its start time is the one recorded.  Any other process is never
  touched.
- A ``starting`` partition whose QEMU is pinned and running is adopted (``running``);
  one that is half-started is ended and its run directory removed (``stopped``).
- A ``running`` partition whose QEMU is gone is ``failed``; its run directory goes.
- A pool intent becomes the grant it really was (the pool's size now, against the
  size before and the size asked for), so each page is given back exactly once.
- A claim intent (a claim killed before it was recorded as done) is given back.
- A live change (rule 11) killed half-way is settled by what the guest really has,
  as its QEMU says (:mod:`partitioner.guest.view`): the vCPUs present are pinned and
  fenced, a virtio-mem device still on its way is held at the size it reached, a
  guest paused for a vCPU's pinning is let run, and the record takes that placement.
- An SR-IOV intent: a VF's settings under way are put back as they were; a PF whose
  VFs were being made is recorded as made if the kernel shows them all (with autoprobe
  off), and otherwise gets back its VF count and autoprobe, as does a PF being put back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from partitioner.cpuset import CpuSet
from partitioner.errors import DeviceError, GuestError, HugepageError
from partitioner.guest.argv import GuestPaths
from partitioner.guest.jail import remove_run_dir
from partitioner.kernel import sysfs
from partitioner.kernel.hugepages import pool_size
from partitioner.kernel.root import HostRoot
from partitioner.planning.model import Placement
from partitioner.record.model import (
    VFIO_PCI,
    GroupClaim,
    PartitionRecord,
    RunState,
    SriovRecord,
    State,
    VfRecord,
    settle_pool_intent,
    without_vf,
)
from partitioner.record.store import StateStore

if TYPE_CHECKING:
    from partitioner.guest.view import GuestView
from partitioner.units import format_size, page_size_name


@dataclass(frozen=True)
class Finding:
    """One thing reconciliation found: ``found`` is the fact, ``does`` what is done about it."""

    partition: str  # the partition's name; for a PF (``subject``), its PCI address
    found: str
    does: str = ""
    fix: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    subject: str = "partition"  # or "SR-IOV PF"

    def text(self, *, done: bool) -> str:
        """One line: the fact, then what was done (``done``) or what the next changing verb does."""
        s = f"{self.subject} {self.partition}: {self.found}"
        if not self.does:
            return s
        if done:
            return f"{s}; done: {self.does}"
        return f"{s}; the next apply, destroy, start or stop will {self.does}"

    def to_json(self, *, done: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "partition": self.partition,
            "found": self.found,
            "does": self.does,
            "done": done,
        }
        if self.subject != "partition":
            out["subject"] = self.subject
        return out


@dataclass(frozen=True)
class Reconciled:
    before: State  # the record as read
    state: State  # the record once the findings are dealt with
    findings: list[Finding]

    def carry_out(self) -> None:
        """Make the host what ``state`` says: end half-started QEMUs, remove run directories,
        give back claims that were under way.  The caller holds the state lock."""
        for f in self.findings:
            if f.fix is not None:
                f.fix()


def reconcile(state: State, root: HostRoot, *, busy: bool = False) -> Reconciled:
    """What the host and the record's intents say about each partition; changes nothing.

    ``busy``: another command holds the lock (a read-only verb asks), so a ``starting``
    partition may be starting right now: it is shown as it is, and its QEMU is not
    asked over QMP (one client at a time) while the starting command talks to it.
    """
    findings: list[Finding] = []
    out = state
    host_cpus = state.site.host_cpus if state.site is not None else CpuSet()
    for _name, rec in state.partitions.items():
        if busy:
            # Intents are changes under way, not interrupted ones: only the dead are told.
            if rec.state is not RunState.STARTING:
                out = out.with_partition(_settle_guest(rec, root, host_cpus, findings))
            continue
        rec = _settle_pools(rec, root, findings)
        rec = _settle_claims(rec, root, findings)
        rec = _settle_guest(rec, root, host_cpus, findings)
        rec = _settle_live(rec, root, findings)
        out = out.with_partition(rec)
    if not busy:
        # After the claims: a VF's claim is given back before its settings and its PF.
        out = _settle_sriov(out, root, findings)
    return Reconciled(state, out, findings)


def reconcile_store(store: StateStore, root: HostRoot) -> Reconciled:
    """Load, reconcile, carry out and save: what a verb that changes the host does first."""
    before = store.load()
    r = reconcile(before, root)
    if r.findings:
        r.carry_out()
    if r.state != before:
        store.save(r.state)
    return r


# -- hugepages -------------------------------------------------------------------


def _settle_pools(rec: PartitionRecord, root: HostRoot, findings: list[Finding]) -> PartitionRecord:
    for i in rec.pool_intents:
        size_now = pool_size(root, i.node, i.size_bytes)
        now = i.before if size_now is None else size_now  # no such pool: nothing can have moved
        moved = i.settle(now)
        rec = settle_pool_intent(rec, i, now)
        pool = f"the {page_size_name(i.size_bytes)} hugepage pool of node {i.node}"
        if i.op == "raise":
            findings.append(
                Finding(
                    rec.name,
                    f"raising {pool} from {i.before} to {i.target} pages was interrupted "
                    f"(it has {now})",
                    f"record {moved} page(s) as added for it (destroy gives them back)",
                )
            )
        else:
            left = sum(
                g.pages for g in rec.hugepages if (g.node, g.size_bytes) == (i.node, i.size_bytes)
            )
            findings.append(
                Finding(
                    rec.name,
                    f"shrinking {pool} from {i.before} to {i.target} pages was interrupted "
                    f"(it has {now})",
                    f"record {moved} page(s) as given back ({left} still to give back)",
                )
            )
    return rec


# -- devices ---------------------------------------------------------------------


def _settle_claims(
    rec: PartitionRecord, root: HostRoot, findings: list[Finding]
) -> PartitionRecord:
    kept: list[GroupClaim] = []
    for c in rec.claims:
        if not c.pending:
            for fn in c.functions:
                drv = root.readlink_name(sysfs.pci_device(fn.address, "driver"))
                if drv != VFIO_PCI and fn.driver != VFIO_PCI:
                    findings.append(
                        Finding(
                            rec.name,
                            f"{fn.address} (IOMMU group {c.group}) is no longer bound to vfio-pci "
                            f"(now {drv or 'no driver'})",
                        )
                    )
            kept.append(c)
            continue

        def give_back(claim: GroupClaim = c) -> None:
            from partitioner.vfio.claim import release_group

            release_group(root, claim)

        fns = ", ".join(f"{f.address} -> {f.driver or 'no driver'}" for f in c.functions)
        findings.append(
            Finding(
                rec.name,
                f"claiming IOMMU group {c.group} for vfio-pci was interrupted",
                f"give its functions back to the drivers they had ({fns or 'none'})",
                give_back,
            )
        )
    if len(kept) == len(rec.claims):
        return rec
    return replace(rec, claims=tuple(kept))


# -- SR-IOV ------------------------------------------------------------------------


def _settle_sriov(state: State, root: HostRoot, findings: list[Finding]) -> State:
    from partitioner.engine.sriov import made, put_back, put_back_vf

    for rec in state.sriov:
        for v in rec.vfs:
            if not v.pending:
                continue

            def vf_back(pf: str = rec.pf, v: VfRecord = v) -> None:
                put_back_vf(root, pf, v)

            findings.append(
                Finding(
                    v.partition,
                    f"changing the settings of VF {v.index} of {rec.pf} was interrupted",
                    f"put back what it had ({v.before.describe()})",
                    vf_back,
                )
            )
            rec = without_vf(rec, v.index)
        if rec.pending and rec.op == "create" and _made(made, root, rec):
            findings.append(
                Finding(
                    rec.pf,
                    f"making its {rec.numvfs} VFs was interrupted after the kernel made them",
                    f"record them as made (destroy puts back sriov_numvfs {rec.numvfs_before})",
                    subject="SR-IOV PF",
                )
            )
            rec = replace(rec, pending=False)
        elif rec.pending:
            what = f"making its {rec.numvfs} VFs" if rec.op == "create" else "putting it back"
            probe = 1 if rec.autoprobe_before else 0

            def pf_back(rec: SriovRecord = rec) -> None:
                put_back(root, rec)

            findings.append(
                Finding(
                    rec.pf,
                    f"{what} was interrupted",
                    f"put back sriov_numvfs {rec.numvfs_before} and sriov_drivers_autoprobe "
                    f"{probe}",
                    pf_back,
                    subject="SR-IOV PF",
                )
            )
            state = state.without_pf(rec.pf)
            continue
        state = state.with_pf(rec)
    return state


def _made(made: Callable[[HostRoot, SriovRecord], bool], root: HostRoot, rec: SriovRecord) -> bool:
    try:
        return made(root, rec)
    except DeviceError:
        return False  # no such PF (any more): nothing to record as made


# -- the guest ---------------------------------------------------------------------


def _paths(rec: PartitionRecord) -> GuestPaths | None:
    return GuestPaths.from_json(dict(rec.paths)) if "dir" in rec.paths else None


def find_qemu(root: HostRoot, rec: PartitionRecord) -> int | None:
    """The pid of this partition's QEMU, found through the record, its pidfile or its socket."""
    from partitioner.guest.launch import find_by_socket, identify, is_running, pid_in

    paths = _paths(rec)
    if paths is None:
        # A record from before run directories were recorded: the pid and -name only.
        ok = rec.pid is not None and is_running(root, rec.pid, rec.name)
        return rec.pid if ok else None
    if rec.pid is not None and identify(root, rec.pid, rec.name, paths, rec.start_ticks):
        return rec.pid
    from_file = pid_in(paths.pidfile)
    if (
        from_file is not None
        and from_file != rec.pid
        and identify(root, from_file, rec.name, paths)
    ):
        return from_file
    if rec.state is RunState.STARTING and from_file is None:
        return find_by_socket(root, rec.name, paths)
    return None


def _settle_guest(
    rec: PartitionRecord, root: HostRoot, host_cpus: CpuSet, findings: list[Finding]
) -> PartitionRecord:
    from partitioner.guest.launch import adoptable, start_ticks

    paths = _paths(rec)
    pid = find_qemu(root, rec)
    gone = replace(rec, pid=None, start_ticks=None, vcpu_threads={}, started_at=None)
    run_dir = paths.dir if paths is not None else None

    def clear_dir() -> None:
        if run_dir is not None:
            remove_run_dir(run_dir)

    def end(pid: int) -> Callable[[], None]:
        def fix() -> None:
            from partitioner.guest.launch import kill

            kill(pid, root=root)
            clear_dir()
            _wait_pages_back(root, rec)

        return fix

    leftover_dir = run_dir is not None and run_dir.exists()
    if rec.state is RunState.RUNNING:
        if pid is not None:
            return (
                rec if pid == rec.pid else replace(rec, pid=pid, start_ticks=start_ticks(root, pid))
            )
        findings.append(
            Finding(
                rec.name,
                f"its QEMU (pid {rec.pid}) is no longer running",
                "record it as failed"
                + (f" and remove its run directory {run_dir}" if leftover_dir else ""),
                clear_dir if leftover_dir else None,
            )
        )
        return replace(gone, state=RunState.FAILED)
    if rec.state is RunState.STARTING:
        if pid is None:
            findings.append(
                Finding(
                    rec.name,
                    "a start was interrupted before its QEMU ran",
                    "record it as stopped"
                    + (f" and remove its run directory {run_dir}" if leftover_dir else ""),
                    clear_dir if leftover_dir else None,
                )
            )
            return replace(gone, state=RunState.STOPPED)
        assert paths is not None
        vcpus = adoptable(root, pid, rec.placement, host_cpus, paths)
        if vcpus is not None:
            findings.append(
                Finding(
                    rec.name,
                    f"a start was interrupted after its QEMU (pid {pid}) was pinned and let run",
                    "adopt it as running",
                )
            )
            return replace(
                rec,
                state=RunState.RUNNING,
                pid=pid,
                start_ticks=start_ticks(root, pid),
                vcpu_threads=vcpus,
                started_at=_started_at(root, pid),
            )
        findings.append(
            Finding(
                rec.name,
                f"a start was interrupted while its QEMU (pid {pid}) was half-started",
                f"end QEMU pid {pid} and remove its run directory {run_dir}",
                end(pid),
            )
        )
        return replace(gone, state=RunState.STOPPED)
    # stopped or failed: no QEMU should be there, nor its run directory.
    if pid is not None:
        findings.append(
            Finding(
                rec.name,
                f"it is recorded as {rec.state.value} but its QEMU (pid {pid}) runs",
                f"end QEMU pid {pid} and remove its run directory {run_dir}",
                end(pid),
            )
        )
        return gone
    if leftover_dir:
        findings.append(
            Finding(
                rec.name,
                f"its run directory {run_dir} is left from a QEMU that is gone",
                "remove it",
                clear_dir,
            )
        )
    return rec


def seen_placement(before: Placement, after: Placement, view: GuestView) -> Placement:
    """The placement a guest between ``before`` and ``after`` really has, from ``view``.

    vCPUs present are always the first ones (growth appends, shrinking drops the
    highest); memory is each node's fixed part plus what its virtio-mem device has
    plugged; devices are those of either placement the guest has."""
    k = len(view.vcpus)
    src = after if len(after.cpus) >= len(before.cpus) else before
    cpus = src.cpus[:k]
    cpu_nodes = src.cpu_nodes[:k] if src.cpu_nodes else ()
    memory = after.memory_per_node
    if view.memory:
        # Each node's virtio-mem device is ``vmem{node}`` (guest/argv.py).
        memory = tuple(
            (node, fixed + (view.memory[f"vmem{node}"].size if f"vmem{node}" in view.memory else 0))
            for node, fixed in after.fixed_memory_per_node
        )
    named = {str(d.address) for d in after.devices}
    devices = tuple(d for d in after.devices if str(d.address) in view.vfio) + tuple(
        d for d in before.devices if str(d.address) in view.vfio and str(d.address) not in named
    )
    return replace(after, cpus=cpus, cpu_nodes=cpu_nodes, memory_per_node=memory, devices=devices)


def _settle_live(rec: PartitionRecord, root: HostRoot, findings: list[Finding]) -> PartitionRecord:
    from partitioner.guest.qmp import Qmp
    from partitioner.guest.view import observe

    intent = rec.live
    if intent is None:
        return rec
    paths = _paths(rec)
    if rec.state is not RunState.RUNNING or rec.pid is None or paths is None:
        findings.append(
            Finding(
                rec.name,
                f"a live change ({intent.op}) was cut short and its QEMU is gone",
                "forget the change",
            )
        )
        return replace(rec, live=None)
    try:
        with Qmp(paths.qmp, timeout=5.0, partition=rec.name) as qmp:
            view = observe(qmp)
    except (GuestError, OSError) as e:
        findings.append(
            Finding(
                rec.name,
                f"a live change ({intent.op}) was cut short and its QEMU does not answer "
                f"over QMP ({e}); the next command asks again",
            )
        )
        return rec
    before = rec.placement
    placement = seen_placement(before, intent.after, view)
    threads = {i: t for i, t in sorted(view.vcpus.items()) if i < len(placement.cpus)}
    slots = max(len(before.cpus), len(intent.after.cpus))
    gone_devices = [
        d for d in (*before.devices, *intent.after.devices) if str(d.address) not in view.vfio
    ]
    chroot = paths.chroot if rec.uid is not None else None

    def fix() -> None:
        import os

        from partitioner.guest.jail import withdraw_device
        from partitioner.isolation.cgroup import add_vcpu, remove_vcpu

        for i, tid in threads.items():
            add_vcpu(root, rec.name, i, tid, placement.cpus[i])  # its cgroup first, then pin
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(tid, {placement.cpus[i]})
        for i in range(len(placement.cpus), slots):
            remove_vcpu(root, rec.name, i)
        if chroot is not None:
            for d in gone_devices:
                if d.iommu_group is not None:
                    withdraw_device(root, chroot, str(d.address), d.iommu_group)
        with Qmp(paths.qmp, timeout=5.0, partition=rec.name) as qmp:
            for m in view.memory.values():
                if m.requested != m.size:
                    qmp.execute(
                        "qom-set",
                        {
                            "path": f"/machine/peripheral/{m.id}",
                            "property": "requested-size",
                            "value": m.size,
                        },
                    )
            if intent.resume and not view.running:
                qmp.execute("cont")

    has = (
        f"{len(placement.cpus)} vCPUs, {format_size(placement.memory_bytes)}, "
        f"{len(placement.devices)} PCI function(s)"
    )
    findings.append(
        Finding(
            rec.name,
            f"a live change ({intent.op}) was cut short; its guest has {has}",
            "record what the guest has, pin and fence its vCPUs"
            + (" and let it run" if intent.resume and not view.running else ""),
            fix,
        )
    )
    return replace(rec, placement=placement, vcpu_threads=threads, live=None)


def _wait_pages_back(root: HostRoot, rec: PartitionRecord, timeout: float = 10.0) -> None:
    """Wait (up to ``timeout`` s) for an ended QEMU's hugepages to be free in their pools.

    The kernel frees a dead process's hugepages a moment after it is gone; a plan made
    before that would raise the pool for pages that are about to come back.
    """
    import time

    from partitioner.kernel.hugepages import pool_counts

    size = rec.placement.hugepage_bytes
    if size is None:
        return
    deadline = time.monotonic() + timeout
    for node, nbytes in rec.placement.memory_per_node:
        while True:
            try:
                _nr, free = pool_counts(root, node, size)
            except HugepageError:
                break
            if free >= nbytes // size or time.monotonic() >= deadline:
                break
            time.sleep(0.05)


def _started_at(root: HostRoot, pid: int) -> float | None:
    """The wall-clock time ``pid`` started, from its start ticks and the boot time."""
    import os
    import time

    from partitioner.guest.launch import start_ticks

    ticks = start_ticks(root, pid)
    uptime = root.read(sysfs.UPTIME)
    if ticks is None or not uptime:
        return None
    with contextlib.suppress(ValueError, OSError):
        hz = os.sysconf("SC_CLK_TCK")
        return time.time() - float(uptime.split()[0]) + ticks / hz
    return None


__all__ = ["Finding", "Reconciled", "find_qemu", "reconcile", "reconcile_store"]
