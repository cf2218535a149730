"""``partition audit``: does every running partition still own what the plan gave it?

Reads the live host (or a tree) through the HostRoot and judges it against the
state record and the isolation record: the partition's vCPU threads alone on their
CPUs and its emulator threads off them, no other task, interrupt or unbound
workqueue on its CPUs (under ``isolation: full``), its device interrupts on its
CPUs, its memory on its nodes in its page size, its devices on vfio-pci, its
cgroup holding its threads, and the boot-time settings.  Rule 10's walls, read from
``/proc/PID`` of its QEMU: its own uid and gid (not root's, not another
partition's), no capabilities, ``NoNewPrivs``, seccomp filter mode where it was
started with ``-sandbox``, its root the empty directory it was chrooted into, no
open descriptor of another partition's run directory, console log or device
nodes, and its own ``/dev/vfio/N`` root's or its own, mode 0600.  A partition run
unconfined (``host.confine: false``) is reported too: its walls are down.  Each of its
SR-IOV VFs still the PF's VF it was given, with the MAC, VLAN and flags the host set on
it (read through the PF with iproute2, on the live host only).

A finding is ``drift`` (something moved that should not have: exit 3) or ``boot``
(what the kernel keeps on a CPU at run time, per-CPU kernel threads and managed
interrupts, and what only boot-time settings do: named, not drift, for
``partition host setup`` to handle).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from partitioner.cpuset import CpuSet
from partitioner.isolation.cgroup import cgroup_path, find_hierarchy, members
from partitioner.isolation.layout import Layout
from partitioner.isolation.moves import irq_target
from partitioner.isolation.runtime import layout_from_json, refused_irqs
from partitioner.isolation.view import (
    HostWork,
    Task,
    process_threads,
    read_host_work,
    running_processes,
)
from partitioner.kernel import sysfs, vflink
from partitioner.kernel.root import HostRoot
from partitioner.kernel.vflink import VfLink, VfLinkError, set_args
from partitioner.record.model import PartitionRecord, RunState, State
from partitioner.units import page_size_name

DRIFT = "drift"
BOOT = "boot"
IRQBALANCE_CONFIGS = ("/etc/default/irqbalance", "/etc/sysconfig/irqbalance")


@dataclass(frozen=True)
class Finding:
    partition: str
    kind: str  # task, vcpu, emulator, irq, workqueue, memory, device, vf, cgroup, irqbalance, boot, walls
    resource: str  # what it is about, named for people: "task 812 (sshd)", "interrupt 24 (ahci)"
    status: str  # DRIFT or BOOT
    detail: str  # what is wrong
    action: str  # what to do
    ids: Mapping[str, Any]  # numbers for machines: tid, pid, irq, cpus

    def to_json(self) -> dict[str, Any]:
        return {
            "partition": self.partition,
            "kind": self.kind,
            "resource": self.resource,
            "status": self.status,
            "detail": self.detail,
            "action": self.action,
            **dict(self.ids),
        }


@dataclass(frozen=True)
class Audit:
    partitions: Mapping[str, Mapping[str, Any]]  # name -> {state, isolation, cpus, pid}
    findings: tuple[Finding, ...]

    @property
    def drift(self) -> int:
        return sum(1 for f in self.findings if f.status == DRIFT)

    def to_json(self) -> dict[str, Any]:
        return {
            "clean": self.drift == 0,
            "drift": self.drift,
            "partitions": {n: dict(p) for n, p in self.partitions.items()},
            "findings": [f.to_json() for f in self.findings],
        }


def audit(
    root: HostRoot,
    state: State,
    isolation_record: Mapping[str, Any] | None,
    names: Iterable[str] | None = None,
) -> Audit:
    wanted = set(state.partitions) if names is None else set(names)
    layout = layout_from_json(isolation_record["layout"]) if isolation_record else None
    refused = refused_irqs(isolation_record)
    work = read_host_work(root)
    guests = {
        r.pid: n
        for n, r in state.partitions.items()
        if r.state is RunState.RUNNING and r.pid is not None
    }
    parts: dict[str, dict[str, Any]] = {}
    findings: list[Finding] = []
    for name, rec in sorted(state.partitions.items()):
        if name not in wanted:
            continue
        full = layout is not None and name in layout.partitions
        parts[name] = {
            "state": rec.state.value,
            "isolation": "full" if full else "pinned",
            "cpus": list(rec.placement.cpus),
            "pid": rec.pid,
        }
        if rec.state is RunState.STOPPED:
            continue
        if rec.state is RunState.FAILED or rec.pid is None or not root.exists(sysfs.proc(rec.pid)):
            findings.append(
                Finding(
                    name,
                    "process",
                    f"QEMU {rec.pid}",
                    DRIFT,
                    "recorded as running, but its QEMU is gone",
                    "partition start " + name,
                    {"pid": rec.pid},
                )
            )
            continue
        f = _Auditor(root, name, rec, work, guests, layout if full else None, refused)
        findings.extend(f.run())
        findings.extend(vf_findings(root, name, rec, state))
        if state.site is not None:  # a record without a site's line was never applied here
            walls = Walls(root, name, rec, state, state.site.confine)
            parts[name]["uid"] = walls.uid
            findings.extend(walls.run())
    return Audit(parts, tuple(findings))


class _Auditor:
    def __init__(
        self,
        root: HostRoot,
        name: str,
        rec: PartitionRecord,
        work: HostWork,
        guests: Mapping[int, str],
        layout: Layout | None,
        refused: frozenset[int],
    ) -> None:
        self.root, self.name, self.rec, self.work = root, name, rec, work
        self.guests, self.layout, self.refused = guests, layout, refused
        self.cpus = rec.placement.cpuset
        self.out: list[Finding] = []

    def add(
        self, kind: str, resource: str, status: str, detail: str, action: str, **ids: Any
    ) -> None:
        self.out.append(Finding(self.name, kind, resource, status, detail, action, ids))

    def run(self) -> list[Finding]:
        self.threads()
        self.host_tasks()
        self.irqs()
        self.workqueue()
        self.memory()
        self.devices()
        self.cgroup()
        self.irqbalance()
        self.boot()
        return self.out

    def threads(self) -> None:
        pid = self.rec.pid
        assert pid is not None
        mine = {t.tid: t for t in process_threads(self.root, pid)}
        vcpus = dict(self.rec.vcpu_threads)
        cpus = self.rec.placement.cpus
        for i, tid in sorted(vcpus.items()):
            t = mine.get(tid)
            if t is None:
                self.add(
                    "vcpu",
                    f"vCPU {i}",
                    DRIFT,
                    f"its thread {tid} is gone",
                    f"partition restart {self.name}",
                    tid=tid,
                )
            elif t.allowed != CpuSet([cpus[i]]):
                self.add(
                    "vcpu",
                    f"vCPU {i} thread {tid}",
                    DRIFT,
                    f"allowed on CPUs {t.allowed}, not on host CPU {cpus[i]} alone",
                    f"partition restart {self.name} (something changed its affinity)",
                    tid=tid,
                    cpus=t.allowed.as_list(),
                )
        for tid, t in sorted(mine.items()):
            if tid not in vcpus.values() and not t.allowed.isdisjoint(self.cpus):
                self.add(
                    "emulator",
                    f"emulator thread {tid} ({t.comm})",
                    DRIFT,
                    f"may run on the partition's CPUs {t.allowed & self.cpus}",
                    f"partition restart {self.name}",
                    tid=tid,
                    cpus=t.allowed.as_list(),
                )

    def host_tasks(self) -> None:
        for t in self.work.tasks:
            if t.pid == self.rec.pid or t.allowed.isdisjoint(self.cpus):
                continue
            if t.pid in self.guests:
                self.add(
                    "task",
                    f"task {t.tid} ({t.comm}) of partition {self.guests[t.pid]}",
                    DRIFT,
                    f"may run on CPUs {t.allowed & self.cpus}",
                    f"partition restart {self.guests[t.pid]}",
                    tid=t.tid,
                    pid=t.pid,
                    cpus=t.allowed.as_list(),
                )
            elif not t.movable:
                self.add(
                    "task",
                    _task_name(t),
                    BOOT,
                    f"a per-CPU kernel thread on CPUs {t.allowed & self.cpus}: the kernel does not move it",
                    "boot-time isolation (partition host setup: nohz_full, isolcpus) keeps its work away",
                    tid=t.tid,
                    pid=t.pid,
                    cpus=t.allowed.as_list(),
                )
            elif self.layout is not None:
                self.add(
                    "task",
                    _task_name(t),
                    DRIFT,
                    f"may run on the partition's CPUs {t.allowed & self.cpus}",
                    "partition apply moves it again; find what set its affinity (taskset, a service)",
                    tid=t.tid,
                    pid=t.pid,
                    cpus=t.allowed.as_list(),
                )

    def irqs(self) -> None:
        for i in self.work.irqs:
            if not i.actions:
                # No handler: nothing runs for it anywhere.  A guest's reset frees and requests
                # its devices' vfio interrupts again; a line between the two is not drift.
                continue
            where = i.where
            target = irq_target(i, self.layout) if self.layout is not None else None
            if target is not None and target == self.cpus:
                if not where.issubset(self.cpus):
                    self.add(
                        "irq",
                        f"interrupt {i.irq} ({i.owner})",
                        DRIFT,
                        f"the partition's own device interrupt is on CPUs {where}, not its CPUs {self.cpus}",
                        "partition apply puts it back",
                        irq=i.irq,
                        cpus=where.as_list(),
                    )
                continue
            if where.isdisjoint(self.cpus) or (target is not None and where.issubset(target)):
                continue
            if i.irq in self.refused:
                self.add(
                    "irq",
                    f"interrupt {i.irq} ({i.owner})",
                    BOOT,
                    f"on CPUs {where & self.cpus}; the kernel refuses to move it (managed or fixed)",
                    "boot-time isolation (partition host setup: managed_irq, irqaffinity) keeps it away",
                    irq=i.irq,
                    cpus=where.as_list(),
                )
            elif self.layout is not None:
                self.add(
                    "irq",
                    f"interrupt {i.irq} ({i.owner})",
                    DRIFT,
                    f"handled on the partition's CPUs {where & self.cpus}",
                    "partition apply moves it again; is irqbalance running?",
                    irq=i.irq,
                    cpus=where.as_list(),
                )

    def workqueue(self) -> None:
        m = self.work.workqueue_mask
        if self.layout is not None and m is not None and not m.isdisjoint(self.cpus):
            self.add(
                "workqueue",
                "unbound workqueue cpumask",
                DRIFT,
                f"unbound work may run on the partition's CPUs {m & self.cpus}",
                "partition apply sets it again",
                cpus=m.as_list(),
            )

    def memory(self) -> None:
        p = self.rec.placement
        pid = self.rec.pid
        maps = None if pid is None else self.root.read(sysfs.proc(pid, "numa_maps"))
        if maps is None:
            return
        want_kb = (p.hugepage_bytes or 4096) // 1024
        per_node: dict[int, int] = {}
        for line in maps.splitlines():
            m = re.search(r"kernelpagesize_kB=(\d+)", line)
            if m is None or int(m.group(1)) != want_kb:
                continue
            if p.hugepage_bytes is None and "anon=" not in line and "file=" not in line:
                continue
            for node, pages in re.findall(r"\bN(\d+)=(\d+)", line):
                per_node[int(node)] = per_node.get(int(node), 0) + int(pages) * want_kb * 1024
        held = sum(per_node.values())
        size = page_size_name(p.hugepage_bytes) if p.hugepage_bytes else "normal"
        if p.hugepage_bytes is not None and held < p.memory_bytes:
            self.add(
                "memory",
                "guest memory",
                DRIFT,
                f"only {held} of its {p.memory_bytes} bytes are in {size} pages",
                f"partition restart {self.name}",
                bytes=held,
            )
        if p.hugepage_bytes is None and held < p.memory_bytes:
            return  # normal pages: QEMU's own mappings are mixed in; only the nodes are judged
        away = {n: b for n, b in per_node.items() if n not in p.numa_nodes}
        if away and p.hugepage_bytes is not None:
            self.add(
                "memory",
                "guest memory",
                DRIFT,
                f"{sum(away.values())} bytes on node(s) {','.join(map(str, sorted(away)))}, "
                f"not its node(s) {','.join(map(str, p.numa_nodes))}",
                f"partition restart {self.name}",
                nodes=sorted(away),
            )

    def devices(self) -> None:
        for d in self.rec.placement.devices:
            drv = self.root.readlink_name(sysfs.pci_device(str(d.address), "driver"))
            if drv != "vfio-pci":
                self.add(
                    "device",
                    str(d.address),
                    DRIFT,
                    f"bound to {drv or 'no driver'}, not vfio-pci",
                    f"partition restart {self.name}",
                    address=str(d.address),
                )

    def cgroup(self) -> None:
        h = find_hierarchy(self.root)
        if h is None:
            return
        path = cgroup_path(h, self.name)
        if not self.root.is_dir(path):
            self.add(
                "cgroup",
                path,
                DRIFT,
                "the partition's cgroup is missing",
                f"partition restart {self.name}",
            )
            return
        got = members(self.root, path)
        for i, tid in sorted(self.rec.vcpu_threads.items()):
            if tid not in got.get(f"vcpu{i}", set()):
                self.add(
                    "cgroup",
                    f"{path}/vcpu{i}",
                    DRIFT,
                    f"vCPU {i} thread {tid} is not in it",
                    f"partition restart {self.name}",
                    tid=tid,
                )

    def irqbalance(self) -> None:
        if self.layout is None:
            return
        if "irqbalance" not in running_processes(self.root).values():
            return
        banned = CpuSet()
        for path in IRQBALANCE_CONFIGS:
            for line in (self.root.read(path) or "").splitlines():
                m = re.match(r"\s*IRQBALANCE_BANNED_CPULIST\s*=\s*\"?([0-9,\-]*)\"?", line)
                if m and m.group(1):
                    banned = banned | CpuSet.parse(m.group(1))
                m = re.match(r"\s*IRQBALANCE_BANNED_CPUS\s*=\s*\"?([0-9a-fA-F,]+)\"?", line)
                if m:
                    banned = banned | CpuSet.from_mask(m.group(1))
        if not self.cpus.issubset(banned):
            self.add(
                "irqbalance",
                "irqbalance",
                DRIFT,
                f"irqbalance runs and may move interrupts back onto CPUs {self.cpus - banned}",
                f"set IRQBALANCE_BANNED_CPULIST={self.layout.partition_cpus} in /etc/default/irqbalance "
                "and restart irqbalance",
                cpus=(self.cpus - banned).as_list(),
            )

    def boot(self) -> None:
        isolated = CpuSet.lenient(self.root.read(sysfs.CPU_ISOLATED)) or CpuSet()
        nohz = CpuSet.lenient(self.root.read(sysfs.CPU_NOHZ_FULL)) or CpuSet()
        missing = [
            n for n, s in (("isolcpus", isolated), ("nohz_full", nohz)) if not self.cpus.issubset(s)
        ]
        if missing:
            self.add(
                "boot",
                f"CPUs {self.cpus}",
                BOOT,
                f"not in the kernel's {' or '.join(missing)}: the tick, RCU callbacks and per-CPU "
                "work still run there",
                "partition host setup (kernel arguments), then reboot",
                cpus=self.cpus.as_list(),
            )


def vf_findings(root: HostRoot, name: str, rec: PartitionRecord, state: State) -> list[Finding]:
    """Each of the partition's VFs still where the plan put it, with the MAC, VLAN and flags
    the host set on it (read through its PF: ``kernel.vflink``)."""
    out: list[Finding] = []
    links: dict[str, tuple[str, dict[int, VfLink]] | None] = {}
    for d in rec.placement.devices:
        if d.vf is None:
            continue
        pf, index, address = str(d.vf.pf), d.vf.index, str(d.address)
        what = f"VF {index} of {pf} ({address})"
        now = root.readlink_name(sysfs.pci_virtfn(pf, index))
        if now != address:
            count = root.read_int(sysfs.pci_device(pf, sysfs.SRIOV_NUMVFS))
            out.append(
                Finding(
                    name,
                    "vf",
                    what,
                    DRIFT,
                    f"the PF has no VF {index} now (sriov_numvfs {count})"
                    if now is None
                    else f"VF {index} of the PF is {now} now",
                    f"partition destroy {name}, then apply the site again",
                    {"address": address, "pf": pf, "index": index},
                )
            )
            continue
        pf_rec = state.pf(pf)
        held = pf_rec.vf(index) if pf_rec is not None else None
        if held is None or held.partition != name or held.pending:
            continue  # no settings of the site's, or being set: nothing to judge
        if pf not in links:
            try:
                links[pf] = vflink.links_of(root, pf)
            except VfLinkError as e:
                out.append(
                    Finding(
                        name,
                        "vf",
                        what,
                        DRIFT,
                        f"its settings cannot be read through its PF: {e}",
                        "load the PF's network driver; install iproute2",
                        {"address": address, "pf": pf, "index": index},
                    )
                )
                links[pf] = None
                continue
        found = links[pf]
        if found is None:
            continue
        netdev, got_all = found
        got = got_all.get(index)
        if got is None:
            continue  # said above: the VF is gone
        wrong = set_args(held.want, got)
        if not wrong:
            continue
        fields = [a[0] for a in wrong]
        said = "; ".join(
            f"{f} is {_vf_value(got, f)}, the plan says {_vf_value(held.want, f)}" for f in fields
        )
        fix = "; ".join(" ".join(["ip link set dev", netdev, "vf", str(index), *a]) for a in wrong)
        out.append(
            Finding(
                name,
                "vf",
                what,
                DRIFT,
                f"its settings changed: {said}",
                f"{fix} (or destroy the partition and apply the site again)",
                {"address": address, "pf": pf, "index": index, "fields": fields},
            )
        )
    return out


def _vf_value(link: VfLink, field: str) -> str:
    if field == "vlan":
        return f"{link.vlan}" + (f" (qos {link.qos})" if link.qos else "")
    if field == "state":
        return str(link.link_state)
    if field == "min_tx_rate":
        return f"{link.min_tx_rate}/{link.max_tx_rate} Mbit/s (min/max)"
    v = getattr(link, field)
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


class Walls:
    """Rule 10 read back from ``/proc/PID`` of one partition's QEMU."""

    def __init__(
        self, root: HostRoot, name: str, rec: PartitionRecord, state: State, confine: bool
    ) -> None:
        self.root, self.name, self.rec, self.state, self.confine = root, name, rec, state, confine
        assert rec.pid is not None
        self.pid = rec.pid
        self.status = _status_fields(root.read(sysfs.proc(rec.pid, "status")) or "")
        ids = self.status.get("Uid", "").split()
        self.uid: int | None = int(ids[1]) if len(ids) > 1 and ids[1].isdigit() else None
        self.out: list[Finding] = []

    def add(self, resource: str, detail: str, action: str, **ids: Any) -> None:
        self.out.append(Finding(self.name, "walls", resource, DRIFT, detail, action, ids))

    def run(self) -> list[Finding]:
        if not self.confine:
            self.add(
                f"QEMU {self.pid}",
                f"runs unconfined as uid {self.uid} (host.confine: false): a guest that escapes "
                "its QEMU owns the host and every other partition",
                "set host.confine: true (the default) and apply --replace " + self.name,
                pid=self.pid,
                uid=self.uid,
            )
            return self.out
        self.identity()
        self.privileges()
        self.descriptors()
        self.device_nodes()
        return self.out

    def identity(self) -> None:
        restart = f"partition restart {self.name}"
        uids = self.status.get("Uid", "").split()
        gids = self.status.get("Gid", "").split()
        if not uids or "0" in uids or "0" in gids:
            self.add(
                f"QEMU {self.pid}",
                f"runs as root (Uid {' '.join(uids)}, Gid {' '.join(gids)}), not as a user of "
                "its own",
                restart,
                pid=self.pid,
                uid=self.uid,
            )
            return
        want = str(self.rec.uid)
        if self.rec.uid is None or set(uids) != {want} or set(gids) != {want}:
            self.add(
                f"QEMU {self.pid}",
                f"runs as Uid {' '.join(uids)} Gid {' '.join(gids)}, not as its own user "
                f"{self.rec.uid}",
                restart,
                pid=self.pid,
                uid=self.uid,
            )
        for other, r in sorted(self.state.partitions.items()):
            if other != self.name and r.uid is not None and str(r.uid) in uids:
                self.add(
                    f"QEMU {self.pid}",
                    f"runs as uid {r.uid}, the user of partition {other}",
                    restart,
                    pid=self.pid,
                    uid=self.uid,
                )

    def privileges(self) -> None:
        restart = f"partition restart {self.name}"
        cap = self.status.get("CapEff", "").strip()
        if not cap or int(cap, 16) != 0:
            self.add(
                f"QEMU {self.pid}",
                f"holds capabilities (CapEff {cap or 'unknown'}), it must hold none",
                restart,
                pid=self.pid,
            )
        if self.status.get("NoNewPrivs", "").strip() != "1":
            self.add(
                f"QEMU {self.pid}",
                "may gain privileges through exec (NoNewPrivs is not set)",
                restart,
                pid=self.pid,
            )
        if "-sandbox" in self.rec.argv and self.status.get("Seccomp", "").strip() != "2":
            self.add(
                f"QEMU {self.pid}",
                f"was started with -sandbox but runs without a seccomp filter (Seccomp "
                f"{self.status.get('Seccomp', '?').strip()}, not 2)",
                restart,
                pid=self.pid,
            )
        paths = self.rec.paths
        if "dir" in paths and any(a in ("-chroot", "-run-with") for a in self.rec.argv):
            want = f"{paths['dir']}/root"
            got = self.root.readlink(sysfs.proc(self.pid, "root"))
            if got is not None and got != want:
                self.add(
                    f"QEMU {self.pid}",
                    f"its root directory is {got}, not the empty {want}",
                    restart,
                    pid=self.pid,
                )

    def descriptors(self) -> None:
        theirs: dict[str, str] = {}  # a path (or a directory prefix ending in /) -> its partition
        for other, r in self.state.partitions.items():
            if other == self.name:
                continue
            if "dir" in r.paths:
                theirs[r.paths["dir"].rstrip("/") + "/"] = other
            if "console_log" in r.paths:
                theirs[r.paths["console_log"]] = other
            for c in r.claims:
                theirs[sysfs.dev_vfio(c.group)] = other
        fd_dir = sysfs.proc(self.pid, "fd")
        for fd in sorted(self.root.listdir(fd_dir), key=lambda x: int(x) if x.isdigit() else -1):
            target = self.root.readlink(f"{fd_dir}/{fd}")
            if target is None:
                continue
            for path, other in theirs.items():
                if target == path or (path.endswith("/") and target.startswith(path)):
                    self.add(
                        f"descriptor {fd} of QEMU {self.pid}",
                        f"is open on {target}, which belongs to partition {other}",
                        f"partition restart {self.name}; find how it got there",
                        pid=self.pid,
                        fd=int(fd) if fd.isdigit() else fd,
                    )

    def device_nodes(self) -> None:
        import os
        import stat

        for c in self.rec.claims:
            node = sysfs.dev_vfio(c.group)
            try:
                st = os.stat(self.root.path(node))
            except OSError:
                continue  # a claim under way, or a tree without /dev: the devices check speaks
            owner_ok = st.st_uid in (0, self.rec.uid) and st.st_gid in (0, self.rec.uid)
            if not owner_ok or stat.S_IMODE(st.st_mode) & 0o077:
                self.add(
                    node,
                    f"is owned by {st.st_uid}:{st.st_gid} with mode "
                    f"{stat.S_IMODE(st.st_mode):04o}: another partition's user may open it; it "
                    "must be root's or the partition's own, mode 0600",
                    f"chown root:root {node} && chmod 0600 {node} (a udev rule may have changed it)",
                    group=c.group,
                )


def _status_fields(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


def _task_name(t: Task) -> str:
    kind = "kernel thread" if t.kthread else "task"
    return f"{kind} {t.tid} ({t.comm})" + (f" of process {t.pid}" if t.pid != t.tid else "")
