"""``apply`` as a library: manifest and host in, the actions that converge them, then running them.

``prepare()`` loads, reconciles the record with the host (carrying out what
reconciliation finds only with ``act=True``, under the lock: ending a
half-started QEMU, recording an interrupted hugepage change), scans, plans
against what runs and diffs.  ``converge()`` runs the
actions under :func:`partitioner.engine.executor.execute` (saving after each, undoing
on failure).  The CLI verb and the benchmark both go through here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from partitioner.engine.context import ApplyContext
from partitioner.engine.diff import diff, held_replacements
from partitioner.engine.executor import execute
from partitioner.engine.isolation import apply_actions as isolation_actions
from partitioner.engine.step import Action
from partitioner.errors import UsageError
from partitioner.inventory.model import Host
from partitioner.kernel.root import HostRoot
from partitioner.manifest.model import Manifest
from partitioner.planning.model import Plan
from partitioner.record.model import SiteRecord, State, running_partitions
from partitioner.record.reconcile import Finding, reconcile, reconcile_store
from partitioner.record.store import StateStore


@dataclass(frozen=True)
class Prepared:
    manifest: Manifest
    host: Host
    plan: Plan
    state: State  # the record, reconciled with the host
    actions: list[Action]
    held: dict[str, str]  # running partitions the manifest changed, left running: name -> change
    notes: list[str]  # what reconciling the record with the host found (and did, with act)
    findings: list[Finding]


def prepare(
    manifest_path: str | Path,
    root: HostRoot,
    store: StateStore,
    *,
    replace_names: Iterable[str] = (),
    replace_all: bool = False,
    act: bool = False,
    boot: bool = False,
    on_reconciled: Callable[[list[Finding]], None] | None = None,
) -> Prepared:
    """``on_reconciled`` hears what reconciling found as soon as it is known (and done,
    with ``act``): the plan that follows may still fail.

    ``boot`` (``host boot``): the partitions with ``autostart: false`` are left out of what
    starts, unless they run already (a service restart must not stop them).  The whole site
    is still planned and isolated, so that each partition keeps the CPUs ``host setup``
    isolated for it and the ones started later by hand find them fenced."""
    from partitioner.inventory import scan
    from partitioner.manifest.loader import load
    from partitioner.planning.files import checked_plan

    manifest = load(manifest_path)
    rec = reconcile_store(store, root) if act else reconcile(store.load(), root, busy=store.busy())
    state = rec.state
    if on_reconciled is not None:
        on_reconciled(rec.findings)
    # Scanned after reconciling: a QEMU it ended has given its pages back by now.
    host = scan(root)
    result = checked_plan(manifest, host, running_partitions(state))  # the plan, then its files
    wanted = set(result.placements) if replace_all else set(replace_names)
    unknown = sorted(wanted - set(result.placements))
    if unknown:
        raise UsageError(
            f"--replace names {', '.join(unknown)}, not a partition of {manifest.file} "
            f"(partitions: {', '.join(result.placements) or 'none'})"
        )
    started = result
    if boot:
        running = running_partitions(state)
        started = replace(
            result,
            placements={
                n: p
                for n, p in result.placements.items()
                if manifest.partitions[n].autostart or n in running
            },
        )
    return Prepared(
        manifest=manifest,
        host=host,
        plan=started,
        state=state,
        actions=diff(started, state, host, replace=wanted)
        + isolation_actions(manifest.host.isolation, result, state, store.dir, root),
        held=held_replacements(result, state, replace=wanted),
        notes=[f.text(done=act) for f in rec.findings],
        findings=rec.findings,
    )


def converge(
    prepared: Prepared,
    *,
    root: HostRoot,
    store: StateStore,
    run_dir: Path,
    log_dir: Path,
    stop_timeout: float = 60.0,
    on_progress: Callable[[str], None] | None = None,
) -> ApplyContext:
    """Run the prepared actions; the caller holds ``store.lock``.  Returns the context (its final state)."""
    site = SiteRecord.of_plan(prepared.plan, str(Path(prepared.manifest.file).resolve()))
    ctx = ApplyContext(
        root=root,
        plan=prepared.plan,
        state=replace(prepared.state, site=site),
        run_dir=run_dir,
        log_dir=log_dir,
        state_dir=store.dir,
        host=prepared.host,
        stop_timeout=stop_timeout,
        on_progress=on_progress,
    )
    # A rolled-back apply leaves the record as it found it, the site's line included.
    execute(prepared.actions, ctx, store, restore=prepared.state)
    return ctx
