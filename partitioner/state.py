"""The record of what ``apply`` put on the host: one JSON file, written atomically after every action.

The record is what lets a later command (``status``, ``stop``, a second
``apply`` after a killed one, ``destroy``) know what this host is running and
what must be given back: which QEMU process is which partition, the drivers
devices had before they were claimed, the hugepages added to the pools.

Writes go ``write temp -> fsync -> rename -> fsync dir``, so a crash at any
point leaves either the old record or the new one, never half of one.  One
``flock`` on ``STATE_DIR/lock`` keeps two changing commands apart; the holder
writes its pid and verb there so a waiting command can say who it waits for.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from partitioner.cpuset import CpuSet
from partitioner.errors import BusyError, StateError
from partitioner.hostroot import HostRoot
from partitioner.killpoint import point
from partitioner.manifest import NOWHERE, Boot, DeviceSpec, Disk, Location, PartitionSpec
from partitioner.pci import PciAddress
from partitioner.plan import DeviceAssignment, Placement, Plan, RunningPartition

STATE_VERSION = 1
STATE_FILE = "state.json"
LOCK_FILE = "lock"


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

    def to_json(self) -> dict[str, int]:
        return {"node": self.node, "size_bytes": self.size_bytes, "pages": self.pages}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> HugepageGrant:
        return cls(
            _nat(d["node"], "node"), _nat(d["size_bytes"], "size_bytes"), _nat(d["pages"], "pages")
        )


@dataclass(frozen=True)
class PoolIntent:
    """A hugepage pool change about to be made, recorded before the pool is touched.

    ``before`` is the pool's size (nr_hugepages) seen just before, ``target`` the size
    asked for.  A command killed between changing the pool and recording the grant
    leaves this; the next run turns it into the grant it really was (see ``settle``).
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

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "size_bytes": self.size_bytes,
            "op": self.op,
            "before": self.before,
            "target": self.target,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PoolIntent:
        op = str(d["op"])
        if op not in ("raise", "release"):
            raise ValueError(f"hugepage intent op {op!r} is neither raise nor release")
        return cls(
            _nat(d["node"], "node"),
            _nat(d["size_bytes"], "size_bytes"),
            op,
            _nat(d["before"], "before"),
            _nat(d["target"], "target"),
        )


def _nat(v: Any, what: str) -> int:
    """A whole number >= 0 from the record (``True`` and ``1.5`` are not numbers of pages)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{what} is {v!r}, not a whole number")
    if v < 0:
        raise ValueError(f"{what} is {v}, below 0")
    return v


@dataclass(frozen=True)
class SiteRecord:
    """The host side of the applied plan: what a later ``start`` needs to rebuild a Plan."""

    manifest: str
    accel: str
    smt: str
    host_cpus: CpuSet
    host_memory_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest,
            "accel": self.accel,
            "smt": self.smt,
            "host_cpus": str(self.host_cpus),
            "host_memory_bytes": self.host_memory_bytes,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SiteRecord:
        return cls(
            manifest=str(d["manifest"]),
            accel=str(d["accel"]),
            smt=str(d["smt"]),
            host_cpus=CpuSet.parse(str(d["host_cpus"])),
            host_memory_bytes=_nat(d["host_memory_bytes"], "host_memory_bytes"),
        )

    @classmethod
    def of_plan(cls, plan: Plan, manifest: str) -> SiteRecord:
        return cls(manifest, plan.accel, plan.smt, plan.host_cpus, plan.host_memory_bytes)


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
    claims: tuple[Mapping[str, Any], ...] = ()  # vfio GroupClaim.to_json(), in claim order
    hugepages: tuple[HugepageGrant, ...] = ()
    pool_intents: tuple[PoolIntent, ...] = ()  # pool changes under way (a killed command's)

    def holds_nothing(self) -> bool:
        return (
            self.state not in (RunState.RUNNING, RunState.STARTING)
            and not self.claims
            and not self.hugepages
            and not self.pool_intents
        )

    def claim_groups(self) -> list[int]:
        return [int(c["group"]) for c in self.claims]

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "pid": self.pid,
            "start_ticks": self.start_ticks,
            "started_at": self.started_at,
            "vcpu_threads": {str(k): v for k, v in sorted(self.vcpu_threads.items())},
            "paths": dict(sorted(self.paths.items())),
            "claims": [dict(c) for c in self.claims],
            "hugepages": [g.to_json() for g in self.hugepages],
            "pool_intents": [i.to_json() for i in self.pool_intents],
            "argv": list(self.argv),
            "placement": placement_to_json(self.placement),
        }

    @classmethod
    def from_json(cls, name: str, d: Mapping[str, Any]) -> PartitionRecord:
        _check_name(name)
        pid = d.get("pid")
        if pid is not None and _nat(pid, "pid") == 0:
            raise ValueError("pid is 0")
        paths = {str(k): str(v) for k, v in _obj(d.get("paths", {}), "paths").items()}
        _check_paths(name, paths)
        claims = tuple(dict(_obj(c, "a claim")) for c in _list(d.get("claims", []), "claims"))
        for c in claims:
            _nat(c["group"], "claim group")
            for f in _list(c.get("functions", []), "claim functions"):
                PciAddress.parse(str(_obj(f, "a claimed function")["address"]))
        return cls(
            name=name,
            state=RunState(d["state"]),
            placement=placement_from_json(_obj(d["placement"], "placement")),
            argv=tuple(str(a) for a in _list(d.get("argv", []), "argv")),
            pid=None if pid is None else int(pid),
            start_ticks=None
            if d.get("start_ticks") is None
            else _nat(d["start_ticks"], "start_ticks"),
            vcpu_threads={
                _nat(int(k), "vCPU"): _nat(v, "vCPU thread")
                for k, v in _obj(d.get("vcpu_threads", {}), "vcpu_threads").items()
            },
            paths=paths,
            started_at=None if d.get("started_at") is None else float(d["started_at"]),
            claims=claims,
            hugepages=tuple(
                HugepageGrant.from_json(_obj(g, "a hugepage grant"))
                for g in _list(d.get("hugepages", []), "hugepages")
            ),
            pool_intents=tuple(
                PoolIntent.from_json(_obj(i, "a hugepage intent"))
                for i in _list(d.get("pool_intents", []), "pool_intents")
            ),
        )


def _obj(v: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise ValueError(f"{what} is a {type(v).__name__}, not an object")
    return v


def _list(v: Any, what: str) -> list[Any]:
    if not isinstance(v, list):
        raise ValueError(f"{what} is a {type(v).__name__}, not a list")
    return v


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


@dataclass(frozen=True)
class State:
    site: SiteRecord | None = None
    partitions: Mapping[str, PartitionRecord] = field(default_factory=dict)

    def with_partition(self, rec: PartitionRecord) -> State:
        parts = dict(self.partitions)
        parts[rec.name] = rec
        return replace(self, partitions=dict(sorted(parts.items())))

    def without_partition(self, name: str) -> State:
        return replace(self, partitions={k: v for k, v in self.partitions.items() if k != name})

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "site": self.site.to_json() if self.site else None,
            "partitions": {n: r.to_json() for n, r in sorted(self.partitions.items())},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> State:
        d = _obj(d, "the record")
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"unknown state version {d.get('version')!r}")
        site = d.get("site")
        parts: dict[str, PartitionRecord] = {}
        for n, r in sorted(_obj(d.get("partitions", {}), "partitions").items()):
            try:
                parts[str(n)] = PartitionRecord.from_json(str(n), _obj(r, f"partition {n}"))
            except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
                raise ValueError(f"partition {n!r}: {_why(e)}") from e
        return cls(
            site=SiteRecord.from_json(_obj(site, "site")) if site else None, partitions=parts
        )

    def serialize(self) -> bytes:
        """Deterministic bytes: the same State always gives the same file (a no-op apply changes nothing)."""
        return (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode()


# -- Placement to and from JSON ----------------------------------------------
# Placement.to_json is the plan's view (lossy); the record needs every field
# back, the manifest's PartitionSpec included, to start the guest again later.


def _loc_to_json(loc: Location) -> list[Any]:
    return [loc.file, loc.line, loc.column]


def _loc_from_json(v: Any) -> Location:
    if not v:
        return NOWHERE
    return Location(str(v[0]), int(v[1]), int(v[2]))


def spec_to_json(s: PartitionSpec) -> dict[str, Any]:
    return {
        "name": s.name,
        "cpu_count": s.cpu_count,
        "cpu_list": None if s.cpu_list is None else str(s.cpu_list),
        "memory_bytes": s.memory_bytes,
        "hugepage_bytes": s.hugepage_bytes,
        "numa": s.numa if s.numa == "auto" else list(s.numa),
        "devices": [
            {
                "kind": d.kind,
                "value": d.value,
                "count": d.count,
                "required": d.required,
                "reset_none_ok": d.reset_none_ok,
                "rom": d.rom,
                "primary_display": d.primary_display,
                "where": _loc_to_json(d.where),
            }
            for d in s.devices
        ],
        "boot": None
        if s.boot is None
        else {"kernel": s.boot.kernel, "initrd": s.boot.initrd, "cmdline": s.boot.cmdline},
        "disks": [{"path": d.path, "readonly": d.readonly} for d in s.disks],
        "firmware": s.firmware,
        "autostart": s.autostart,
        "order": s.order,
        "on_crash": s.on_crash,
        "where": _loc_to_json(s.where),
    }


def spec_from_json(d: Mapping[str, Any]) -> PartitionSpec:
    boot = d.get("boot")
    numa = d["numa"]
    return PartitionSpec(
        name=str(d["name"]),
        cpu_count=int(d["cpu_count"]),
        cpu_list=None if d.get("cpu_list") is None else CpuSet.parse(str(d["cpu_list"])),
        memory_bytes=int(d["memory_bytes"]),
        hugepage_bytes=None if d.get("hugepage_bytes") is None else int(d["hugepage_bytes"]),
        numa="auto" if numa == "auto" else tuple(int(n) for n in numa),
        devices=tuple(
            DeviceSpec(
                kind=x["kind"],
                value=str(x["value"]),
                count=int(x.get("count", 1)),
                required=bool(x.get("required", True)),
                reset_none_ok=bool(x.get("reset_none_ok", False)),
                rom=x.get("rom"),
                primary_display=bool(x.get("primary_display", False)),
                where=_loc_from_json(x.get("where")),
            )
            for x in d.get("devices", [])
        ),
        boot=None
        if not boot
        else Boot(str(boot["kernel"]), boot.get("initrd"), boot.get("cmdline")),
        disks=tuple(
            Disk(str(x["path"]), bool(x.get("readonly", False))) for x in d.get("disks", [])
        ),
        firmware="uefi" if d.get("firmware") == "uefi" else "bios",
        autostart=bool(d.get("autostart", True)),
        order=int(d.get("order", 0)),
        on_crash="stop" if d.get("on_crash") == "stop" else "restart",
        where=_loc_from_json(d.get("where")),
    )


def placement_to_json(p: Placement) -> dict[str, Any]:
    return {
        "name": p.name,
        "cpus": list(p.cpus),
        "topology": [p.sockets, p.cores, p.threads],
        "numa_nodes": list(p.numa_nodes),
        "memory_per_node": [[n, b] for n, b in p.memory_per_node],
        "hugepage_bytes": p.hugepage_bytes,
        "devices": [
            {
                "address": str(d.address),
                "iommu_group": d.iommu_group,
                "vendor_device": d.vendor_device,
                "driver": d.driver,
                "added": d.added,
                "reason": d.reason,
                "reset_none_ok": d.reset_none_ok,
                "rom": d.rom,
                "primary_display": d.primary_display,
            }
            for d in p.devices
        ],
        "spec": spec_to_json(p.spec),
        "notes": list(p.notes),
        "cpu_nodes": list(p.cpu_nodes),
        "pci_hole64_bytes": p.pci_hole64_bytes,
        "host_cache_info": p.host_cache_info,
    }


def placement_from_json(d: Mapping[str, Any]) -> Placement:
    sockets, cores, threads = (_nat(x, "topology") for x in _list(d["topology"], "topology"))
    return Placement(
        name=str(d["name"]),
        cpus=tuple(_nat(c, "a CPU") for c in _list(d["cpus"], "cpus")),
        sockets=sockets,
        cores=cores,
        threads=threads,
        numa_nodes=tuple(_nat(n, "a NUMA node") for n in _list(d["numa_nodes"], "numa_nodes")),
        memory_per_node=tuple(
            (_nat(n, "a NUMA node"), _nat(b, "memory"))
            for n, b in _list(d["memory_per_node"], "memory_per_node")
        ),
        hugepage_bytes=None if d.get("hugepage_bytes") is None else int(d["hugepage_bytes"]),
        devices=tuple(
            DeviceAssignment(
                address=PciAddress.parse(str(x["address"])),
                iommu_group=int(x["iommu_group"]),
                vendor_device=str(x["vendor_device"]),
                driver=x.get("driver"),
                added=bool(x["added"]),
                reason=str(x.get("reason", "")),
                reset_none_ok=bool(x.get("reset_none_ok", False)),
                rom=x.get("rom"),
                primary_display=bool(x.get("primary_display", False)),
            )
            for x in d.get("devices", [])
        ),
        spec=spec_from_json(d["spec"]),
        notes=tuple(str(n) for n in d.get("notes", [])),
        cpu_nodes=tuple(int(n) for n in d.get("cpu_nodes", [])),
        pci_hole64_bytes=int(d.get("pci_hole64_bytes", 0)),
        host_cache_info=bool(d.get("host_cache_info", False)),
    )


# -- the store ------------------------------------------------------------------


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / STATE_FILE
        self.lock_path = self.dir / LOCK_FILE
        self._held: int | None = None

    def load(self) -> State:
        """The record as it is on disk, its whole shape checked here (the one place it is read).

        A record that is not what this version writes (garbage, a list for an object,
        missing keys, wrong types, negative numbers, nesting too deep to parse) is a
        StateError (exit 2) naming the file and what to do: never half-read.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError as e:
            if not self.path.is_symlink():
                return State()
            # A link to nothing (the state on a filesystem that is not mounted) is not "no
            # partitions": read as one, apply would claim again what runs.
            raise StateError(
                f"cannot read the state record {self.path}: it is a symbolic link to "
                f"{os.readlink(self.path)}, which does not exist; check that it is a readable "
                "file (or move it aside if nothing runs)",
                path=str(self.path),
            ) from e
        except OSError as e:
            raise StateError(
                f"cannot read the state record {self.path}: {e.strerror}; "
                f"check that it is a readable file (or move it aside if nothing runs)",
                path=str(self.path),
            ) from e
        try:
            return State.from_json(json.loads(data))
        except (
            ValueError,
            KeyError,
            TypeError,
            IndexError,
            AttributeError,
            RecursionError,
            OverflowError,
        ) as e:
            raise StateError(
                f"the state record {self.path} is damaged ({_why(e)}); it is not changed. "
                "Check which guests run (ps -C qemu-system-x86_64), "
                f"stop them by hand if needed, then move {self.path} aside and apply again",
                path=str(self.path),
            ) from e

    def save(self, state: State) -> None:
        """Replace the record atomically: after a crash the old or the new file is there, whole."""
        self._mkdir()
        data = state.serialize()
        tmp = self.dir / f".{STATE_FILE}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StateError(
                f"cannot write the state record {self.path}: {e.strerror}", path=str(self.path)
            ) from e
        # The rename is durable only once the directory entry is on disk.
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._sweep()
        point("state-saved")

    def _mkdir(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise StateError(
                f"cannot use the state directory {self.dir}: {e.strerror}; "
                "give --state-dir (or PARTITION_STATE_DIR) a directory this user can write",
                path=str(self.dir),
            ) from e
        if not self.dir.is_dir():
            raise StateError(
                f"the state directory {self.dir} is not a directory; "
                "give --state-dir (or PARTITION_STATE_DIR) a directory",
                path=str(self.dir),
            )

    def _sweep(self) -> None:
        """Remove temp files of saves that died before their rename (their process is gone)."""
        for p in self.dir.glob(f".{STATE_FILE}.*.tmp"):
            pid_text = p.name[len(STATE_FILE) + 2 : -4]
            if not pid_text.isdigit() or int(pid_text) == os.getpid():
                continue
            try:
                os.kill(int(pid_text), 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    p.unlink()
            except PermissionError:
                pass

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it (``pid 4242 (apply)``), or "" if unknown."""
        try:
            return self.lock_path.read_text().strip()
        except OSError:
            return ""

    def busy(self) -> bool:
        """True while another command holds the lock (its flock, not the text it left:
        a killed holder's text stays, its flock does not)."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # closing lets go of the shared lock, if it was taken
        return False

    @contextlib.contextmanager
    def lock(self, verb: str, timeout: float = 60.0) -> Iterator[None]:
        """Hold the state lock for ``verb``; wait up to ``timeout`` s for another holder, then fail naming it."""
        self._mkdir()
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StateError(
                f"cannot open the lock {self.lock_path} of the state directory: {e.strerror}; "
                "check that it is a writable file",
                path=str(self.lock_path),
            ) from e
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno_mod.EWOULDBLOCK, errno_mod.EAGAIN):
                        raise
                if time.monotonic() >= deadline:
                    who = self.holder() or "another partition command"
                    raise BusyError(
                        f"the state in {self.dir} is locked by {who}; waited {timeout:g}s. "
                        "Wait for it to finish, then run this again",
                        path=str(self.lock_path),
                        holder=who,
                    )
                time.sleep(0.1)
            os.ftruncate(fd, 0)
            since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            os.pwrite(fd, f"pid {os.getpid()} ({verb}) since {since}\n".encode(), 0)
            self._held = fd
            try:
                yield
            finally:
                self._held = None
                # Clear our name before letting go so a waiter never names a finished holder.
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _why(e: BaseException) -> str:
    if isinstance(e, KeyError):
        return f"{e.args[0]!r} is missing" if e.args else "a key is missing"
    if isinstance(e, RecursionError):
        return "nested too deeply to be a state record"
    if isinstance(e, UnicodeDecodeError):
        return "not UTF-8 text"
    return str(e)[:200] or type(e).__name__


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
        placements={n: r.placement for n, r in sorted(state.partitions.items())},
    )


def reconcile(state: State, root: HostRoot) -> tuple[State, list[str]]:
    """The record as reconciliation would leave it, and what it finds, changing nothing.

    For read-only verbs; the verbs that change the host use
    :func:`partitioner.reconcile.reconcile` and carry out what it finds.
    """
    from partitioner.reconcile import reconcile as full

    rec = full(state, root)
    return rec.state, [f.text(done=False) for f in rec.findings]
