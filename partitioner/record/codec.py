"""The state record as JSON: the one place its shape is written and read back, every value checked.

``encode(state)`` gives deterministic bytes (the same State always gives the same
file, so a no-op apply changes nothing); ``decode(bytes)`` refuses anything that is
not what this version writes with a ``ValueError`` (or ``KeyError``, ``TypeError``)
naming the value, which the store turns into "the record is damaged" (exit 2).
A placement keeps the one form ``partition plan --json`` shows (:meth:`Placement.to_json`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from partitioner.cpuset import CpuSet
from partitioner.jsonvalues import nat, obj, seq
from partitioner.kernel.vflink import VfLink
from partitioner.pci import PciAddress
from partitioner.planning.confine import in_user_range
from partitioner.planning.model import Placement
from partitioner.record.model import (
    LIVE_OPS,
    FunctionRecord,
    GroupClaim,
    HugepageGrant,
    LiveIntent,
    PartitionRecord,
    PoolIntent,
    RunState,
    SiteRecord,
    SriovRecord,
    State,
    VfRecord,
)

# 2: a placement is kept in the form `plan --json` shows (one form), not a form of its own.
STATE_VERSION = 2


def encode(state: State) -> bytes:
    return (json.dumps(state_to_json(state), indent=2, sort_keys=True) + "\n").encode()


def decode(data: bytes) -> State:
    return state_from_json(json.loads(data))


def state_to_json(state: State) -> dict[str, Any]:
    out: dict[str, Any] = {
        "version": STATE_VERSION,
        "site": site_to_json(state.site) if state.site else None,
        "partitions": {n: partition_to_json(r) for n, r in sorted(state.partitions.items())},
    }
    if state.sriov:  # (absent when no PF was changed: the record of a site without SR-IOV)
        out["sriov"] = [sriov_to_json(r) for r in state.sriov]
    return out


def state_from_json(v: Any) -> State:
    d = obj(v, "the record")
    version = d.get("version")
    if version == 1:
        raise ValueError(
            "it was written by an earlier partition (record version 1); destroy its "
            "partitions with that version first"
        )
    if version != STATE_VERSION:
        raise ValueError(f"unknown state version {version!r}")
    site = d.get("site")
    parts: dict[str, PartitionRecord] = {}
    for n, r in sorted(obj(d.get("partitions", {}), "partitions").items()):
        try:
            parts[str(n)] = partition_from_json(str(n), obj(r, f"partition {n}"))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise ValueError(f"partition {n!r}: {why(e)}") from e
    sriov: list[SriovRecord] = []
    # A record from before SR-IOV has no list: no PF was changed.
    for i, r in enumerate(seq(d.get("sriov", []), "sriov")):
        try:
            sriov.append(sriov_from_json(obj(r, "an SR-IOV record")))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise ValueError(f"sriov[{i}]: {why(e)}") from e
    if len({r.pf for r in sriov}) != len(sriov):
        raise ValueError("sriov: a PF is recorded twice")
    return State(
        site=site_from_json(obj(site, "site")) if site else None,
        partitions=parts,
        sriov=tuple(sriov),
    )


def site_to_json(s: SiteRecord) -> dict[str, Any]:
    return {
        "manifest": s.manifest,
        "accel": s.accel,
        "smt": s.smt,
        "host_cpus": str(s.host_cpus),
        "host_memory_bytes": s.host_memory_bytes,
        "confine": s.confine,
    }


def site_from_json(d: Mapping[str, Any]) -> SiteRecord:
    return SiteRecord(
        manifest=str(d["manifest"]),
        accel=str(d["accel"]),
        smt=str(d["smt"]),
        host_cpus=CpuSet.parse(str(d["host_cpus"])),
        host_memory_bytes=nat(d["host_memory_bytes"], "host_memory_bytes"),
        # A record from before rule 10 has no word: its partitions start confined (the default).
        confine=bool(d.get("confine", True)),
    )


def grant_to_json(g: HugepageGrant) -> dict[str, int]:
    return {"node": g.node, "size_bytes": g.size_bytes, "pages": g.pages}


def grant_from_json(d: Mapping[str, Any]) -> HugepageGrant:
    return HugepageGrant(
        nat(d["node"], "node"), nat(d["size_bytes"], "size_bytes"), nat(d["pages"], "pages")
    )


def intent_to_json(i: PoolIntent) -> dict[str, Any]:
    return {
        "node": i.node,
        "size_bytes": i.size_bytes,
        "op": i.op,
        "before": i.before,
        "target": i.target,
    }


def intent_from_json(d: Mapping[str, Any]) -> PoolIntent:
    op = str(d["op"])
    if op not in ("raise", "release"):
        raise ValueError(f"hugepage intent op {op!r} is neither raise nor release")
    return PoolIntent(
        nat(d["node"], "node"),
        nat(d["size_bytes"], "size_bytes"),
        op,
        nat(d["before"], "before"),
        nat(d["target"], "target"),
    )


def sriov_to_json(r: SriovRecord) -> dict[str, Any]:
    return {
        "pf": r.pf,
        "numvfs_before": r.numvfs_before,
        "autoprobe_before": r.autoprobe_before,
        "numvfs": r.numvfs,
        "pending": r.pending,
        "op": r.op,
        "vfs": [
            {
                "index": v.index,
                "partition": v.partition,
                "before": v.before.to_json(),
                "want": v.want.to_json(),
                "pending": v.pending,
            }
            for v in r.vfs
        ],
    }


def sriov_from_json(d: Mapping[str, Any]) -> SriovRecord:
    op = str(d.get("op", "create"))
    if op not in ("create", "restore"):
        raise ValueError(f"SR-IOV intent op {op!r} is neither create nor restore")
    vfs: list[VfRecord] = []
    for v in (obj(x, "a VF record") for x in seq(d.get("vfs", []), "vfs")):
        partition = str(v["partition"])
        _check_name(partition)
        vfs.append(
            VfRecord(
                index=nat(v["index"], "VF index"),
                partition=partition,
                before=VfLink.from_json(obj(v["before"], "a VF's settings before")),
                want=VfLink.from_json(obj(v["want"], "a VF's settings")),
                pending=_bool(v.get("pending", False), "VF pending"),
            )
        )
    if len({v.index for v in vfs}) != len(vfs):
        raise ValueError("a VF is recorded twice")
    return SriovRecord(
        pf=str(PciAddress.parse(str(d["pf"]))),
        numvfs_before=nat(d["numvfs_before"], "numvfs_before"),
        autoprobe_before=_bool(d["autoprobe_before"], "autoprobe_before"),
        numvfs=nat(d["numvfs"], "numvfs"),
        pending=_bool(d.get("pending", False), "pending"),
        op=op,
        vfs=tuple(vfs),
    )


def _bool(v: object, what: str) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{what} {v!r} is not true or false")
    return v


def claim_to_json(c: GroupClaim) -> dict[str, Any]:
    return {
        "group": c.group,
        "functions": [
            {"address": f.address, "driver": f.driver, "driver_override": f.driver_override}
            for f in c.functions
        ],
        "loaded_vfio_pci": c.loaded_vfio_pci,
        "pending": c.pending,
    }


def claim_from_json(v: Any) -> GroupClaim:
    d = obj(v, "a claim")
    return GroupClaim(
        group=nat(d["group"], "claim group"),
        functions=tuple(
            FunctionRecord(
                address=str(PciAddress.parse(str(f["address"]))),
                driver=_opt_str(f.get("driver")),
                driver_override=_opt_str(f.get("driver_override")),
            )
            for f in (
                obj(x, "a claimed function") for x in seq(d.get("functions", []), "claim functions")
            )
        ),
        loaded_vfio_pci=bool(d.get("loaded_vfio_pci", False)),
        pending=bool(d.get("pending", False)),
    )


def partition_to_json(r: PartitionRecord) -> dict[str, Any]:
    return {
        "state": r.state.value,
        "pid": r.pid,
        "start_ticks": r.start_ticks,
        "started_at": r.started_at,
        "vcpu_threads": {str(k): v for k, v in sorted(r.vcpu_threads.items())},
        "paths": dict(sorted(r.paths.items())),
        "claims": [claim_to_json(c) for c in r.claims],
        "hugepages": [grant_to_json(g) for g in r.hugepages],
        "pool_intents": [intent_to_json(i) for i in r.pool_intents],
        "argv": list(r.argv),
        "placement": r.placement.to_json(),
        "uid": r.uid,
        "live": None
        if r.live is None
        else {"op": r.live.op, "after": r.live.after.to_json(), "resume": r.live.resume},
    }


def _live(v: object) -> LiveIntent | None:
    if v is None:
        return None
    d = obj(v, "a live change")
    op = str(d["op"])
    if op not in LIVE_OPS:
        raise ValueError(f"live change {op!r} is none of {', '.join(LIVE_OPS)}")
    return LiveIntent(op, Placement.from_json(d["after"]), bool(d.get("resume", False)))


def partition_from_json(name: str, d: Mapping[str, Any]) -> PartitionRecord:
    _check_name(name)
    pid = d.get("pid")
    if pid is not None and nat(pid, "pid") == 0:
        raise ValueError("pid is 0")
    paths = {str(k): str(v) for k, v in obj(d.get("paths", {}), "paths").items()}
    _check_paths(name, paths)
    return PartitionRecord(
        name=name,
        state=RunState(d["state"]),
        placement=Placement.from_json(d["placement"]),
        argv=tuple(str(a) for a in seq(d.get("argv", []), "argv")),
        pid=None if pid is None else int(pid),
        start_ticks=None if d.get("start_ticks") is None else nat(d["start_ticks"], "start_ticks"),
        vcpu_threads={
            nat(int(k), "vCPU"): nat(v, "vCPU thread")
            for k, v in obj(d.get("vcpu_threads", {}), "vcpu_threads").items()
        },
        paths=paths,
        started_at=None if d.get("started_at") is None else float(d["started_at"]),
        claims=tuple(claim_from_json(c) for c in seq(d.get("claims", []), "claims")),
        hugepages=tuple(
            grant_from_json(obj(g, "a hugepage grant"))
            for g in seq(d.get("hugepages", []), "hugepages")
        ),
        pool_intents=tuple(
            intent_from_json(obj(i, "a hugepage intent"))
            for i in seq(d.get("pool_intents", []), "pool_intents")
        ),
        uid=_user(d.get("uid")),
        live=_live(d.get("live")),
    )


def _user(v: object) -> int | None:
    """A partition's uid: in the range rule 10 keeps for partitions, or none (never root's)."""
    if v is None:
        return None
    uid = nat(v, "uid")
    if not in_user_range(uid):
        raise ValueError(f"uid {uid} is not in the range kept for partitions")
    return uid


def _opt_str(v: object) -> str | None:
    return None if v is None else str(v)


_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")  # the schema's partition name


def _check_name(name: str) -> None:
    # The name becomes a directory under the run directory: nothing that could leave it.
    if not _NAME.fullmatch(name):
        raise ValueError(f"partition name {name!r} is not a partition name")


def _check_paths(name: str, paths: Mapping[str, str]) -> None:
    """The run directory a record names is NAME under some directory; its sockets are in it.

    Reconciliation removes that directory and signals the process behind its pidfile:
    a record pointing anywhere else is refused, not followed.
    """
    if "dir" not in paths:
        return  # nothing to find a QEMU by, nothing that reconciliation removes
    d = paths["dir"]
    if not d.startswith("/") or Path(d).name != name or ".." in Path(d).parts:
        raise ValueError(f"paths.dir {d!r} is not a run directory of partition {name}")
    for key in ("qmp", "console", "pidfile"):
        if key in paths and Path(paths[key]).parent != Path(d):
            raise ValueError(f"paths.{key} {paths[key]!r} is not in {d}")


def why(e: BaseException) -> str:
    """What a decoding error says, in a sentence for the user."""
    if isinstance(e, KeyError):
        return f"{e.args[0]!r} is missing" if e.args else "a key is missing"
    if isinstance(e, RecursionError):
        return "nested too deeply to be a state record"
    if isinstance(e, UnicodeDecodeError):
        return "not UTF-8 text"
    return str(e)[:200] or type(e).__name__
