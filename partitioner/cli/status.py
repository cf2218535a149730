"""``partition status [NAME]``: each partition's state, CPUs, memory, devices, uptime and process."""

from __future__ import annotations

import argparse
import time
from typing import Any

from partitioner import stats
from partitioner.cli.common import Context, table
from partitioner.errors import UsageError
from partitioner.planning.model import Placement
from partitioner.record.codec import grant_to_json
from partitioner.record.model import PartitionRecord, RunState, State
from partitioner.record.reconcile import reconcile
from partitioner.record.store import StateStore
from partitioner.units import format_size


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="the applied partitions and how they run")
    p.add_argument("name", metavar="NAME", nargs="?", help="only this partition")
    p.add_argument(
        "--prometheus",
        action="store_true",
        help="the figures in Prometheus' text format (node_exporter's textfile collector)",
    )
    p.set_defaults(func=run)


def record_json(rec: PartitionRecord, now: float, shown: str | None = None) -> dict[str, Any]:
    p = rec.placement
    running = rec.state is RunState.RUNNING
    return {
        "state": shown or rec.state.value,
        "pid": rec.pid if running else None,
        "uid": rec.uid,  # its QEMU's user and group (rule 10); None: none taken, or unconfined
        "cpus": list(p.cpus),
        "numa_nodes": list(p.numa_nodes),
        "memory_bytes": p.memory_bytes,
        "hugepages": format_size(p.hugepage_bytes) if p.hugepage_bytes else "none",
        "vcpu_threads": {str(i): t for i, t in sorted(rec.vcpu_threads.items())} if running else {},
        "devices": [str(d.address) for d in p.devices],
        "iommu_groups": list(p.iommu_groups),
        "uptime_s": round(now - rec.started_at, 1)
        if running and rec.started_at is not None
        else None,
        "console_log": rec.paths.get("console_log"),
        "hugepages_added": [grant_to_json(g) for g in rec.hugepages],
        "bounds": bounds_json(p),
    }


def vfs_json(rec: PartitionRecord, state: State) -> list[dict[str, Any]]:
    """The partition's VFs with the settings the host set on each (what the record says was
    set: ``set`` false while that is under way, or when the VF was given no settings)."""
    out: list[dict[str, Any]] = []
    for d in rec.placement.devices:
        if d.vf is None:
            continue
        pf = state.pf(str(d.vf.pf))
        held = pf.vf(d.vf.index) if pf is not None else None
        mine = held is not None and held.partition == rec.name
        out.append(
            {
                "address": str(d.address),
                "pf": str(d.vf.pf),
                "index": d.vf.index,
                "iommu_group": d.iommu_group,
                "settings": held.want.to_json() if held is not None and mine else None,
                "set": bool(mine and held is not None and not held.pending),
            }
        )
    return out


def sriov_json(state: State) -> list[dict[str, Any]]:
    """The PFs whose VFs apply made (or found made, and keeps), with what destroy puts back."""
    return [
        {
            "pf": r.pf,
            "vfs": r.numvfs,
            "numvfs_before": r.numvfs_before,
            "autoprobe_before": r.autoprobe_before,
            "pending": r.op if r.pending else None,
        }
        for r in state.sriov
    ]


def _vf_line(name: str, v: dict[str, Any]) -> str:
    from partitioner.kernel.vflink import VfLink

    head = f"{name}: VF {v['index']} of {v['pf']} ({v['address']})"
    if v["settings"] is None:
        return f"{head}: no settings of the site's"
    said = VfLink.from_json(v["settings"]).describe()
    return f"{head}: {said}" + ("" if v["set"] else " (being set)")


def bounds_json(p: Placement) -> dict[str, int]:
    """What the partition has now against the bounds it may be changed within live (rule 11)."""
    s = p.spec
    return {
        "cpus": len(p.cpus),
        "min_cpus": s.cpus_min,
        "max_cpus": s.cpus_max,
        "memory_bytes": p.memory_bytes,
        "min_memory_bytes": s.memory_min,
        "max_memory_bytes": s.memory_max,
        "hotplug_slots": s.hotplug_slots,
    }


def _bounds_line(name: str, b: dict[str, int]) -> str | None:
    if (
        (b["min_cpus"], b["max_cpus"]) == (b["cpus"], b["cpus"])
        and (
            b["min_memory_bytes"],
            b["max_memory_bytes"],
        )
        == (b["memory_bytes"], b["memory_bytes"])
        and not b["hotplug_slots"]
    ):
        return None
    return (
        f"{name}: {b['cpus']} vCPUs (min {b['min_cpus']}, max {b['max_cpus']}), "
        f"{format_size(b['memory_bytes'])} (min {format_size(b['min_memory_bytes'])}, "
        f"max {format_size(b['max_memory_bytes'])}), {b['hotplug_slots']} hot-plug slot(s)"
    )


def _shown(rec: PartitionRecord) -> str | None:
    """``paused`` for a running partition whose QEMU says so (docs/cli-reference.md's states); else None.

    Asked over QMP with a short deadline: a QEMU busy with another client stays ``running``.
    """
    if rec.state is not RunState.RUNNING or not rec.paths.get("qmp"):
        return None
    from partitioner.errors import GuestError
    from partitioner.guest.launch import qmp_status

    try:
        status = qmp_status(rec.paths["qmp"], rec.name, timeout=2.0)
    except GuestError:
        return None
    return "paused" if status in ("paused", "suspended") else None


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d" if d else "") + (f"{h:02d}:{m:02d}:{s:02d}" if d or h else f"{m}:{s:02d}")


def running(ctx: Context) -> State:
    """The record reconciled with the host, as ``status`` shows it (``map`` draws it too)."""
    store = StateStore(ctx.state_dir)
    # Read-only: the record is checked against the live processes but not rewritten here;
    # the next apply or lifecycle verb records what it finds (and does what it says).
    found = reconcile(store.load(), ctx.root(), busy=store.busy())
    ctx.reconciled(found.findings, done=False)
    return found.state


def run(args: argparse.Namespace, ctx: Context) -> int:
    store = StateStore(ctx.state_dir)
    state = running(ctx)
    recs = dict(state.partitions)
    if args.name is not None:
        if args.name not in recs:
            raise UsageError(
                f"no partition {args.name} has been applied here "
                f"(applied: {', '.join(recs) or 'none'})"
            )
        recs = {args.name: recs[args.name]}
    now = time.time()
    docs = {name: record_json(rec, now, _shown(rec)) for name, rec in sorted(recs.items())}
    # Restarts and the last exit reason, kept by the supervisor (on_crash).
    from partitioner.boot.supervisor import status_fields

    for name, d in docs.items():
        d.update(status_fields(store.dir, name))
        d["vfs"] = vfs_json(recs[name], state)

    from partitioner.boot import watcher

    watching = watcher.watcher(ctx.root(), store.dir)
    figures = stats.of_records(ctx.root(), recs)  # CPU, run-queue delay, memory, interrupts
    if args.prometheus:
        ctx.out.write(stats.prometheus(figures.values(), down=sorted(set(recs) - set(figures))))
        return 0
    for name, s in figures.items():
        docs[name]["stats"] = s.to_json()
    if ctx.json:
        ctx.emit_json(
            {"partitions": docs, "sriov": sriov_json(state), "supervisor": watching.to_json()}
        )
        return 0
    if not docs:
        ctx.say("no partitions are applied on this host")
        if watching.watching:
            ctx.say(f"supervisor: {watching.describe()}")
        return 0
    rows = []
    for name, d in docs.items():
        rows.append(
            [
                name,
                d["state"],
                str(d["pid"] or "-"),
                str(recs[name].placement.cpuset),
                ",".join(map(str, d["numa_nodes"])),
                format_size(d["memory_bytes"]) + f" ({d['hugepages']})",
                " ".join(d["devices"]) or "-",
                _uptime(d["uptime_s"]),
            ]
        )
    ctx.say(
        table(rows, ["PARTITION", "STATE", "PID", "CPUS", "NODES", "MEMORY", "DEVICES", "UPTIME"])
    )
    ctx.say(f"supervisor: {watching.describe()}")
    for name, d in docs.items():
        said = _bounds_line(name, d["bounds"])
        if said is not None:
            ctx.say(said)
    for name, d in docs.items():
        for v in d["vfs"]:
            ctx.say(_vf_line(name, v))
    for pf in sriov_json(state) if args.name is None else ():
        ctx.say(
            f"host: PF {pf['pf']}: {pf['vfs']} VFs for the site (the last destroy puts back "
            f"sriov_numvfs {pf['numvfs_before']} and sriov_drivers_autoprobe "
            f"{int(pf['autoprobe_before'])})"
            + (f"; a {pf['pending']} was interrupted" if pf["pending"] else "")
        )
    for name, d in docs.items():
        if d["restarts"] or d["failed_reason"]:
            ctx.say(f"{name}: restarted {d['restarts']} times; last exit: {d['last_exit']}")
        if d["failed_reason"]:
            ctx.say(f"{name}: failed: {d['failed_reason']}")

    if figures:
        ctx.say("\n" + table(stats.render(figures), stats.RENDER_HEADERS))
    # Who holds each CPU, a line per node; the whole picture is `partition map`'s.
    from partitioner.inventory import scan
    from partitioner.map.owners import from_status
    from partitioner.map.text import cpu_strips

    owners = from_status(
        {"partitions": docs},
        state.site.host_cpus if state.site else None,
        state.site.host_memory_bytes if state.site else None,
    )
    ctx.say()
    for line in cpu_strips(scan(ctx.root()), owners):
        ctx.say(line)
    ctx.info("partition: the picture of these partitions on the host: partition map -o map.svg")
    return 0
