"""``scan(root) -> Host``: read the machine's CPUs, NUMA nodes, PCI functions and what the host runs on.

Everything is read through the :class:`HostRoot` it is given, so the same code
reads the live machine, a ``partition snapshot`` tree and hwloc's test corpus.
Nothing here writes.  Odd values never stop the scan: they degrade to "unknown"
and leave a sentence in ``Host.notes``; only a tree that is not a host at all
raises :class:`HostReadError`.

Where the kernel's facts contradict each other, the decision follows what
hwloc (the reference reader of these files) does, so that its test corpus is
an oracle for this module.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field, replace

from partitioner.cpuset import CpuListSyntaxError, CpuSet
from partitioner.errors import HostReadError
from partitioner.host import (
    Cpu,
    Host,
    HugepagePool,
    IommuGroup,
    NetInterface,
    NumaNode,
    PciFunction,
)
from partitioner.hostroot import HostRoot
from partitioner.mmio import phys_bits
from partitioner.pci import PciAddress, PciAddressSyntaxError
from partitioner.pcibars import read_bars

SYS_CPU = "/sys/devices/system/cpu"
SYS_NODE = "/sys/devices/system/node"
SYS_HUGEPAGES = "/sys/kernel/mm/hugepages"
SYS_PCI_DEVICES = "/sys/bus/pci/devices"
SYS_IOMMU_GROUPS = "/sys/kernel/iommu_groups"
SYS_CLASS_NET = "/sys/class/net"

_CPU_DIR_RE = re.compile(r"^cpu(\d+)$")
_NODE_DIR_RE = re.compile(r"^node(\d+)$")
_HUGEPAGE_DIR_RE = re.compile(r"^hugepages-(\d+)kB$")
# Slots run 00-1f: a component that is not one is not a PCI function.
_PCI_ADDR_RE = re.compile(r"^[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[01][0-9a-fA-F]\.[0-7]$")
_MAJMIN_RE = re.compile(r"^\d+:\d+$")
_NVME_CTRL_RE = re.compile(r"^nvme\d+$")
_NUMBER_RE = re.compile(r"\d+")
_MEMINFO_RE = re.compile(r"^(?:Node \d+ )?(\w+):\s+(\d+)(?: kB)?\s*$")
_IFF_UP = 0x1
_IPV6_SCOPE_LINK = 0x20
_IPV6_SCOPE_HOST = 0x10

# PCI base classes and a few subclasses, from the PCI code and ID assignment
# specification; enough to name a function in `inspect` when udev's hwdb is absent.
_CLASS_NAMES: dict[str, str] = {
    "0100": "SCSI storage controller",
    "0101": "IDE interface",
    "0104": "RAID bus controller",
    "0106": "SATA controller",
    "0107": "Serial Attached SCSI controller",
    "0108": "Non-Volatile memory controller",
    "0200": "Ethernet controller",
    "0207": "InfiniBand controller",
    "0280": "Network controller",
    "0300": "VGA compatible controller",
    "0302": "3D controller",
    "0380": "Display controller",
    "0401": "Multimedia audio controller",
    "0403": "Audio device",
    "0600": "Host bridge",
    "0601": "ISA bridge",
    "0604": "PCI bridge",
    "0680": "Bridge",
    "0700": "Serial controller",
    "0880": "System peripheral",
    "0c03": "USB controller",
    "0c05": "SMBus",
    "0c04": "Fibre Channel",
    "0c06": "InfiniBand",
    "1200": "Processing accelerators",
}
_BASE_CLASS_NAMES: dict[str, str] = {
    "00": "Unclassified device",
    "01": "Mass storage controller",
    "02": "Network controller",
    "03": "Display controller",
    "04": "Multimedia controller",
    "05": "Memory controller",
    "06": "Bridge",
    "07": "Communication controller",
    "08": "Generic system peripheral",
    "09": "Input device controller",
    "0b": "Processor",
    "0c": "Serial bus controller",
    "0d": "Wireless controller",
    "0e": "Intelligent controller",
    "0f": "Satellite communications controller",
    "10": "Encryption controller",
    "11": "Signal processing controller",
    "12": "Processing accelerators",
    "13": "Non-Essential Instrumentation",
    "40": "Coprocessor",
    "ff": "Unassigned class",
}


def class_label(class_code: str) -> str:
    """A human name for a 6-hex-digit PCI class code (``"020000"`` -> ``"Ethernet controller"``)."""
    return _CLASS_NAMES.get(class_code[:4]) or _BASE_CLASS_NAMES.get(class_code[:2], "")


def scan(root: HostRoot) -> Host:
    """Read the host under ``root`` into a frozen :class:`Host`."""
    return _Scanner(root).scan()


@dataclass
class _Scanner:
    root: HostRoot
    notes: list[str] = field(default_factory=list)
    # One resolution per link: PCI functions, block devices and interfaces share paths.
    _realpaths: dict[str, str] = field(default_factory=dict)

    # -- small readers that leave a note instead of failing -----------------

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def realpath(self, kernel_path: str) -> str:
        """Where a sysfs link leads, as a kernel path.

        Sysfs links are relative and sit in real directories, so one readlink
        and a normalisation resolve them; a full realpath (an lstat per path
        component) is kept for the odd link that does not fit that shape.
        """
        got = self._realpaths.get(kernel_path)
        if got is None:
            target = self.root.readlink(kernel_path)
            if target is None:
                got = kernel_path
            elif target.startswith("/"):
                got = self.root.realpath(kernel_path)
            else:
                got = os.path.normpath(os.path.join(os.path.dirname(kernel_path), target))
                if not got.startswith("/sys/") or not self.root.exists(got):
                    got = self.root.realpath(kernel_path)
            self._realpaths[kernel_path] = got
        return got

    def read_int(self, path: str, default: int | None = None, base: int = 10) -> int | None:
        text = self.root.read(path)
        if text is None:
            return default
        try:
            return int(text, base)
        except ValueError:
            self.note(f"{path}: {text[:40]!r} is not a number; taken as unknown")
            return default

    def read_cpuset(self, path: str, mask_path: str | None = None) -> CpuSet | None:
        """A cpulist file, else its hex mask twin (old kernels have only the mask)."""
        text = self.root.read(path)
        is_mask = False
        if text is None and mask_path is not None:
            path, text, is_mask = mask_path, self.root.read(mask_path), True
        if text is None:
            return None
        return self.parse_cpus(path, text, is_mask)

    def parse_cpus(self, path: str, text: str, is_mask: bool = False) -> CpuSet | None:
        if len(text) > 65536 or (not is_mask and any(len(n) > 6 for n in _NUMBER_RE.findall(text))):
            # Beyond any kernel's NR_CPUS: a junk "0-99999999999" would fill memory.
            self.note(f"{path}: {text[:40]!r} names impossible CPU numbers; ignored")
            return None
        try:
            return CpuSet.from_mask(text) if is_mask else CpuSet.parse(text)
        except CpuListSyntaxError:
            self.note(f"{path}: {text[:40]!r} is not a CPU list; ignored")
            return None

    def read_hex(self, path: str, digits: int) -> str:
        """A sysfs ``0x8086`` attribute as lowercase hex without ``0x`` ("" if unreadable)."""
        text = self.root.read(path)
        if text is None:
            return ""
        text = text.lower().removeprefix("0x")
        try:
            return f"{int(text, 16):0{digits}x}"
        except ValueError:
            self.note(f"{path}: {text[:40]!r} is not a hexadecimal number; ignored")
            return ""

    # -- the whole host ------------------------------------------------------

    def scan(self) -> Host:
        if not self.root.is_dir(SYS_CPU):
            where = self.root.path(SYS_CPU)
            if self.root.live:
                raise HostReadError(
                    f"{where} is missing: is /sys mounted? (mount -t sysfs sysfs /sys)",
                    path=str(where),
                )
            raise HostReadError(
                f"{self.root.root} does not look like a host tree: {where} is missing; "
                f"make one with `partition snapshot {self.root.root}` on the machine to describe",
                path=str(where),
            )
        cpus = self.scan_cpus()
        nodes = self.scan_nodes(cpus)
        pci = self.scan_pci()
        groups = self.scan_iommu_groups(pci)
        netdevs, net_pci = self.scan_net()
        if net_pci:
            pci = _with_netdevs(pci, net_pci)
        in_use = self.scan_in_use(pci, netdevs)
        return Host(
            cpus=cpus,
            nodes=nodes,
            pci=pci,
            iommu_groups=groups,
            in_use=in_use,
            netdevs=netdevs,
            has_kvm=self.root.exists("/dev/kvm"),
            phys_bits=phys_bits(self.root),
            has_iommu=bool(groups),
            hugepage_sizes=self.scan_hugepage_sizes(nodes),
            page_size=4096,
            vfio_pci_loaded=self.root.is_dir("/sys/bus/pci/drivers/vfio-pci"),
            notes=tuple(self.notes),
        )

    # -- CPUs ------------------------------------------------------------------

    def scan_cpus(self) -> dict[int, Cpu]:
        ids: list[int] = []
        for name in self.root.listdir(SYS_CPU):
            m = _CPU_DIR_RE.match(name)
            if m:
                ids.append(int(m.group(1)))
        present = self.read_cpuset(f"{SYS_CPU}/present")
        if present is not None and present:
            # A possible-but-absent CPU has no directory; a directory outside
            # "present" is a leftover the kernel does not count.
            present_ids = set(present)
            ids = [i for i in ids if i in present_ids]
        if not ids:
            raise HostReadError(
                f"no CPUs found under {self.root.path(SYS_CPU)}: the tree is not a host; "
                f"make one with `partition snapshot DIR`",
                path=str(self.root.path(SYS_CPU)),
            )
        ids.sort()
        online_set = self.read_cpuset(f"{SYS_CPU}/online")
        online_ids = set(online_set) if online_set is not None else None
        kinds = self.scan_cpu_kinds(ids)
        allowed = self.scan_allowed_cpus()

        # The kernel's sibling, package and die lists are symmetric: read once
        # for the first CPU of each core, package or die, and reused for the
        # others (a 1024-CPU host would otherwise cost thousands of opens).
        known_siblings: dict[int, CpuSet] = {}
        known_package: dict[int, int] = {}
        known_die: dict[int, int] = {}
        cpus: dict[int, Cpu] = {}
        for i in ids:
            d = f"{SYS_CPU}/cpu{i}"
            topo = f"{d}/topology"
            package = known_package.get(i)
            if package is None:
                package = self.read_int(f"{topo}/physical_package_id")
                if package is not None:
                    members = self.read_cpuset(
                        f"{topo}/package_cpus_list", f"{topo}/core_siblings"
                    ) or self.read_cpuset(f"{topo}/core_siblings_list")
                    if members is not None and i in members:
                        known_package.update(dict.fromkeys(members, package))
            if online_ids is not None:
                online = i in online_ids
            else:
                # Old kernels (and trees without the global file): the CPU's own
                # "online" (cpu0 often has none), else whether it has a topology.
                flag = self.read_int(f"{d}/online")
                online = flag == 1 if flag is not None else package is not None
            if not online or package is None:
                if online:
                    self.note(f"CPU {i} is online but has no topology; taken as its own core")
                cpus[i] = Cpu(
                    id=i,
                    online=online,
                    allowed=allowed is None or i in allowed,
                    package=-1 if package is None else package,
                    die=-1 if package is None else 0,
                    core=-1 if package is None else i,
                    node=None,
                    siblings=CpuSet([i]) if online else CpuSet(),
                    kind=kinds.get(i, ""),
                )
                continue
            die = known_die.get(i)
            if die is None:
                die = self.read_int(f"{topo}/die_id", 0)
                die = die if die is not None and die >= 0 else 0
                members = self.read_cpuset(f"{topo}/die_cpus_list")
                if members is not None and i in members:
                    known_die.update(dict.fromkeys(members, die))
            core = self.read_int(f"{topo}/core_id", i)
            siblings = known_siblings.get(i)
            if siblings is None:
                siblings = self.read_cpuset(
                    f"{topo}/thread_siblings_list", f"{topo}/thread_siblings"
                ) or self.read_cpuset(f"{topo}/core_cpus_list", f"{topo}/core_cpus")
                if siblings is None or i not in siblings:
                    siblings = CpuSet([i]) | (siblings or CpuSet())
                known_siblings.update(dict.fromkeys(siblings, siblings))
            cpus[i] = Cpu(
                id=i,
                online=True,
                allowed=allowed is None or i in allowed,
                package=package,
                die=die,
                core=core if core is not None else i,
                node=None,
                siblings=siblings,
                kind=kinds.get(i, ""),
            )
        # Siblings are told about online CPUs only: an offline thread is not a sibling one can own.
        online_now = {c.id for c in cpus.values() if c.online}
        for c in list(cpus.values()):
            if c.online and not set(c.siblings) <= online_now:
                cpus[c.id] = _replace_cpu(
                    c, siblings=CpuSet(s for s in c.siblings if s in online_now)
                )
        return cpus

    def scan_cpu_kinds(self, ids: list[int]) -> dict[int, str]:
        """Hybrid Intel parts list their performance and efficiency CPUs under two PMU devices.

        Without them (older kernels, trees that did not keep them), the two kinds
        still differ in base frequency, which is how hwloc tells them apart too.
        """
        kinds: dict[int, str] = {}
        for kind in ("core", "atom"):
            cs = self.read_cpuset(f"/sys/devices/cpu_{kind}/cpus")
            if cs is not None:
                for c in cs:
                    kinds[c] = kind
        if kinds or not self.root.exists(f"{SYS_CPU}/cpu{ids[0]}/cpufreq/base_frequency"):
            return kinds
        base: dict[int, int] = {}
        for i in ids:
            f = self.read_int(f"{SYS_CPU}/cpu{i}/cpufreq/base_frequency")
            if f is not None:
                base[i] = f
        if len(set(base.values())) == 2:
            fast = max(base.values())
            kinds = {i: "core" if f == fast else "atom" for i, f in base.items()}
        return kinds

    def scan_allowed_cpus(self) -> set[int] | None:
        """The CPUs of our cgroup's cpuset, as hwloc finds it; None when nothing restricts.

        The process's own affinity (Cpus_allowed_list) is only a fallback: root
        may pin a child outside its own affinity but never outside its cpuset.
        """
        cs = self.cgroup_cpuset()
        if cs is not None:
            return set(cs)
        status = self.root.read("/proc/self/status")
        if status:
            for line in status.splitlines():
                if line.startswith("Cpus_allowed_list:"):
                    cs = self.parse_cpus("/proc/self/status", line.split(":", 1)[1])
                    return set(cs) if cs is not None else None
        return None

    def cgroup_cpuset(self) -> CpuSet | None:
        v1_path: str | None = None
        v2_path: str | None = None
        text = self.root.read("/proc/self/cgroup")
        if text:
            for line in text.splitlines():
                parts = line.split(":", 2)
                if len(parts) != 3:
                    continue
                if parts[0] == "0" and parts[1] == "":
                    v2_path = parts[2]
                elif "cpuset" in parts[1].split(","):
                    v1_path = parts[2]
        legacy = self.root.read("/proc/self/cpuset")  # older kernels, and hwloc's trees
        mounts = self.cgroup_mounts()
        v1_files = (
            ("cpuset.effective_cpus", "cpuset.effective_mems"),
            ("cpuset.cpus", "cpuset.mems"),
            ("cpus", "mems"),
        )
        candidates: list[tuple[str, str, tuple[tuple[str, str], ...]]] = []
        for kind, mountpoint in mounts:
            if kind in ("v1", "cpuset") and (v1_path or legacy):
                candidates.append((mountpoint, v1_path or legacy or "/", v1_files))
            elif kind == "v2" and (v2_path or legacy) and not v1_path:
                candidates.append(
                    (
                        mountpoint,
                        v2_path or legacy or "/",
                        (("cpuset.cpus.effective", "cpuset.mems.effective"),),
                    )
                )
        for mountpoint, path, files in candidates:
            path = "/" + path.strip("/")
            if ".." in path.split("/"):
                self.note(f"cgroup path {path!r} leaves its hierarchy; ignored")
                continue
            # A cgroup2 group without the cpuset controller has no file: its
            # parent's set applies, up to the root.
            while True:
                base = mountpoint.rstrip("/") + (path if path != "/" else "")
                for cpus_file, mems_file in files:
                    cs = self.read_cpuset(f"{base}/{cpus_file}")
                    if cs is not None and cs:
                        self.note_mems(self.read_cpuset(f"{base}/{mems_file}"))
                        return cs
                if path == "/":
                    break
                path = os.path.dirname(path)
        return None

    def note_mems(self, mems: CpuSet | None) -> None:
        """hwloc hides NUMA nodes outside the cgroup's cpuset.mems.  They are kept here (the
        host has them, and partitions do not run in this process's cgroup) but said."""
        if mems is None:
            return
        nodes = [
            int(m.group(1)) for n in self.root.listdir(SYS_NODE) if (m := _NODE_DIR_RE.match(n))
        ]
        outside = CpuSet(n for n in nodes if n not in mems)
        if outside:
            self.note(
                f"this process's cgroup cpuset allows memory on NUMA node(s) {mems} only, "
                f"not on {outside}"
            )

    def cgroup_mounts(self) -> list[tuple[str, str]]:
        """(kind, mountpoint) of cpuset-capable mounts: "v1" cgroup with cpuset, "cpuset", "v2"."""
        out: list[tuple[str, str]] = []
        info = self.root.read("/proc/self/mountinfo")
        if info:
            for line in info.splitlines():
                left, sep, right = line.partition(" - ")
                f = left.split()
                r = right.split()
                if not sep or len(f) < 5 or len(r) < 1:
                    continue
                opts = r[2].split(",") if len(r) > 2 else []
                out.extend(_cgroup_kind(r[0], opts, _unescape(f[4])))
        if not out:
            mounts = self.root.read("/proc/mounts") or ""
            for line in mounts.splitlines():
                f = line.split()
                if len(f) >= 4:
                    out.extend(_cgroup_kind(f[2], f[3].split(","), _unescape(f[1])))
        # cpuset v1 first: where both exist, the v1 controller is the one that holds cpuset.
        out.sort(key=lambda km: {"v1": 0, "cpuset": 1, "v2": 2}[km[0]])
        return out

    # -- NUMA ------------------------------------------------------------------

    def scan_nodes(self, cpus: dict[int, Cpu]) -> dict[int, NumaNode]:
        online = CpuSet(c.id for c in cpus.values() if c.online)
        node_ids = sorted(
            int(m.group(1)) for n in self.root.listdir(SYS_NODE) if (m := _NODE_DIR_RE.match(n))
        )
        if not node_ids:
            return self.scan_single_node(cpus, online)
        nodes: dict[int, NumaNode] = {}
        claimed: set[int] = set()
        dropped: list[int] = []
        for n in node_ids:
            d = f"{SYS_NODE}/node{n}"
            ncpus = self.read_cpuset(f"{d}/cpulist", f"{d}/cpumap") or CpuSet()
            ncpus = ncpus & online
            if claimed & set(ncpus):
                # hwloc too keeps the first node that names a CPU and drops the
                # ones that name it again (its "buggynuma" case): a CPU cannot
                # be local to two nodes, and the memory of the later nodes cannot
                # be placed with confidence, so it is not offered.
                dropped.append(n)
                continue
            claimed |= set(ncpus)
            mem = self.read_meminfo(f"{d}/meminfo")
            total = mem.get("MemTotal")
            if total is None:
                self.note(f"node {n}: no MemTotal in {d}/meminfo; taken as 0")
            nodes[n] = NumaNode(
                id=n,
                cpus=ncpus,
                memory_bytes=(total or 0) * 1024,
                free_bytes=mem.get("MemFree", 0) * 1024,
                distances=self.read_distances(f"{d}/distance"),
                hugepages=self.read_pools(f"{d}/hugepages"),
            )
        total_kb = self.read_meminfo("/proc/meminfo").get("MemTotal")
        nodes_kb = sum(n.memory_bytes for n in nodes.values()) // 1024
        if total_kb and abs(nodes_kb - total_kb) > total_kb // 20 and not dropped:
            # Seen on VMs whose memory was hot-added or ballooned: the per-node
            # figures are what can be placed on a node, so they are the ones kept.
            self.note(
                f"the NUMA nodes hold {nodes_kb // 1024} MiB in all but /proc/meminfo says "
                f"MemTotal {total_kb // 1024} MiB; the nodes' figures are used"
            )
        if dropped:
            self.note(
                "the kernel gives some CPUs to more than one NUMA node; "
                f"node(s) {', '.join(map(str, dropped))} are left out, as hwloc does"
            )
        # Fill Cpu.node from the nodes' lists; offline CPUs are in no list, their
        # cpuN/nodeM link still says where they belong.
        node_of = {c: n.id for n in nodes.values() for c in n.cpus}
        for c in list(cpus.values()):
            nid = node_of.get(c.id)
            if nid is None and not c.online:
                for entry in self.root.listdir(f"{SYS_CPU}/cpu{c.id}"):
                    m = _NODE_DIR_RE.match(entry)
                    if m and int(m.group(1)) in nodes:
                        nid = int(m.group(1))
                        break
            if nid is not None:
                cpus[c.id] = _replace_cpu(c, node=nid)
        return nodes

    def scan_single_node(self, cpus: dict[int, Cpu], online: CpuSet) -> dict[int, NumaNode]:
        """A kernel without NUMA is one node 0 with everything, as numactl and hwloc see it."""
        mem = self.read_meminfo("/proc/meminfo")
        if "MemTotal" not in mem:
            self.note("no NUMA nodes and no MemTotal in /proc/meminfo: memory taken as 0")
        for c in list(cpus.values()):
            if c.online:
                cpus[c.id] = _replace_cpu(c, node=0)
        return {
            0: NumaNode(
                id=0,
                cpus=online,
                memory_bytes=mem.get("MemTotal", 0) * 1024,
                free_bytes=mem.get("MemFree", 0) * 1024,
                distances=(10,),
                hugepages=self.read_pools(SYS_HUGEPAGES),
            )
        }

    def read_meminfo(self, path: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in (self.root.read(path) or "").splitlines():
            m = _MEMINFO_RE.match(line.strip())
            if m:
                out[m.group(1)] = int(m.group(2))
        return out

    def read_distances(self, path: str) -> tuple[int, ...]:
        text = self.root.read(path)
        if not text:
            return ()
        try:
            return tuple(int(x) for x in text.split())
        except ValueError:
            self.note(f"{path}: {text[:40]!r} is not a list of distances; ignored")
            return ()

    def read_pools(self, base: str) -> dict[int, HugepagePool]:
        pools: dict[int, HugepagePool] = {}
        for name in self.root.listdir(base):
            m = _HUGEPAGE_DIR_RE.match(name)
            if not m:
                continue
            size = int(m.group(1)) * 1024
            d = f"{base}/{name}"
            pools[size] = HugepagePool(
                size_bytes=size,
                total=self.read_int(f"{d}/nr_hugepages", 0) or 0,
                free=self.read_int(f"{d}/free_hugepages", 0) or 0,
                surplus=self.read_int(f"{d}/surplus_hugepages", 0) or 0,
            )
        return dict(sorted(pools.items()))

    def scan_hugepage_sizes(self, nodes: dict[int, NumaNode]) -> tuple[int, ...]:
        sizes = {
            int(m.group(1)) * 1024
            for n in self.root.listdir(SYS_HUGEPAGES)
            if (m := _HUGEPAGE_DIR_RE.match(n))
        }
        if not sizes:
            sizes = {s for node in nodes.values() for s in node.hugepages}
        return tuple(sorted(sizes))

    # -- PCI -------------------------------------------------------------------

    def scan_pci(self) -> dict[PciAddress, PciFunction]:
        out: dict[PciAddress, PciFunction] = {}
        for name in self.root.listdir(SYS_PCI_DEVICES):
            try:
                addr = PciAddress.parse(name)
            except PciAddressSyntaxError:
                self.note(f"{SYS_PCI_DEVICES}/{name} is not a PCI address; ignored")
                continue
            real = self.realpath(f"{SYS_PCI_DEVICES}/{name}")
            if not self.root.is_dir(real):
                self.note(f"{SYS_PCI_DEVICES}/{name} points nowhere; ignored")
                continue
            upstream = tuple(
                _parse_pci(part) for part in real.split("/")[:-1] if _PCI_ADDR_RE.match(part)
            )
            class_code = self.read_hex(f"{real}/class", 6)
            override = self.root.read(f"{real}/driver_override")
            reset = self.root.read(f"{real}/reset_method")
            group = self.root.readlink_name(f"{real}/iommu_group")
            numa = self.read_int(f"{real}/numa_node")
            netdevs = tuple(n for n in self.root.listdir(f"{real}/net"))
            out[addr] = PciFunction(
                address=addr,
                vendor=self.read_hex(f"{real}/vendor", 4),
                device=self.read_hex(f"{real}/device", 4),
                class_code=class_code,
                subsystem_vendor=self.read_hex(f"{real}/subsystem_vendor", 4),
                subsystem_device=self.read_hex(f"{real}/subsystem_device", 4),
                driver=self.root.readlink_name(f"{real}/driver"),
                driver_override=None if override in (None, "", "(null)") else override,
                iommu_group=int(group) if group is not None and group.isdigit() else None,
                numa_node=numa if numa is not None and numa >= 0 else None,
                reset_methods=tuple(reset.split()) if reset else (),
                # The kernel gives boot_vga to display-class devices only.
                boot_vga=class_code.startswith("03") and self.read_int(f"{real}/boot_vga") == 1,
                is_bridge=class_code.startswith("06"),
                upstream=upstream,
                netdevs=netdevs,
                label=class_label(class_code),
                bars=read_bars(self.root, real),
            )
        return dict(sorted(out.items()))

    def scan_iommu_groups(self, pci: dict[PciAddress, PciFunction]) -> dict[int, IommuGroup]:
        groups: dict[int, IommuGroup] = {}
        for name in self.root.listdir(SYS_IOMMU_GROUPS):
            if not name.isdigit():
                continue
            members: list[PciAddress] = []
            for dev in self.root.listdir(f"{SYS_IOMMU_GROUPS}/{name}/devices"):
                # Groups also hold non-PCI devices on some platforms; only PCI ones matter here.
                if _PCI_ADDR_RE.match(dev):
                    members.append(_parse_pci(dev))
            groups[int(name)] = IommuGroup(id=int(name), members=tuple(sorted(members)))
        for addr, fn in pci.items():
            if fn.iommu_group is not None and fn.iommu_group not in groups:
                self.note(
                    f"{addr} names IOMMU group {fn.iommu_group}, which the kernel does not list"
                )
        return dict(sorted(groups.items()))

    # -- network interfaces ------------------------------------------------------

    def scan_net(self) -> tuple[dict[str, NetInterface], dict[PciAddress, list[str]]]:
        names = self.root.listdir(SYS_CLASS_NET)
        if not names:
            return {}, {}
        v4_addr, v4_default = self.read_ipv4_routes()
        v6_addr, v6_default = self.read_ipv6()
        out: dict[str, NetInterface] = {}
        by_pci: dict[PciAddress, list[str]] = {}
        for name in names:
            real = self.realpath(f"{SYS_CLASS_NET}/{name}")
            pci = _nearest_pci(real)
            operstate = self.root.read(f"{real}/operstate") or ""
            flags = self.read_int(f"{real}/flags", None, base=16)
            # Some drivers never report carrier ("unknown") while the interface is up and working.
            up = operstate == "up" or (
                operstate == "unknown" and flags is not None and bool(flags & _IFF_UP)
            )
            out[name] = NetInterface(
                name=name,
                pci=pci,
                up=up,
                has_address=name in v4_addr or name in v6_addr,
                default_route=name in v4_default or name in v6_default,
            )
            if pci is not None:
                by_pci.setdefault(pci, []).append(name)
        return out, by_pci

    def read_ipv4_routes(self) -> tuple[set[str], set[str]]:
        """Interfaces with an IPv4 route (the kernel adds one per address) and with the default route."""
        has_route: set[str] = set()
        default: set[str] = set()
        for line in (self.root.read("/proc/net/route") or "").splitlines()[1:]:
            f = line.split()
            if len(f) < 8:
                continue
            has_route.add(f[0])
            if f[1] == "00000000" and f[7] == "00000000":
                default.add(f[0])
        return has_route, default

    def read_ipv6(self) -> tuple[set[str], set[str]]:
        """Interfaces with a routable IPv6 address (link-local ones come by themselves), and
        with an IPv6 default route."""
        has_addr: set[str] = set()
        for line in (self.root.read("/proc/net/if_inet6") or "").splitlines():
            f = line.split()
            if len(f) < 6:
                continue
            try:
                scope = int(f[3], 16)
            except ValueError:
                continue
            if scope not in (_IPV6_SCOPE_LINK, _IPV6_SCOPE_HOST):
                has_addr.add(f[5])
        default: set[str] = set()
        for line in (self.root.read("/proc/net/ipv6_route") or "").splitlines():
            f = line.split()
            if len(f) >= 10 and f[0] == "0" * 32 and f[1] == "00" and f[9] != "lo":
                flags = int(f[8], 16) if _is_hex(f[8]) else 0
                if not flags & 0x200:  # RTF_REJECT: the "unreachable" placeholder
                    default.add(f[9])
        return has_addr, default

    # -- what the host runs on (rule 5) -----------------------------------------

    def scan_in_use(
        self, pci: dict[PciAddress, PciFunction], netdevs: dict[str, NetInterface]
    ) -> dict[PciAddress, tuple[str, ...]]:
        reasons: dict[PciAddress, list[str]] = {}

        def add(addr: PciAddress, why: str) -> None:
            lst = reasons.setdefault(addr, [])
            if why not in lst:
                lst.append(why)

        for majmin, mountpoint, source in self.mounted_block_devices():
            for addr, leaf in self.block_controllers(f"/sys/dev/block/{majmin}"):
                name = leaf if leaf == source or not source else f"{leaf} under {source}"
                add(addr, f"controller of {mountpoint} ({name})")
        for dev in self.swap_devices():
            for addr, leaf in self.block_controllers(f"/sys/class/block/{dev}"):
                add(addr, f"swap on {leaf if leaf == dev else f'{leaf} under {dev}'}")
        for iface in self.busy_interfaces(netdevs):
            n = netdevs[iface]
            for lower in self.lower_interfaces(iface):
                ln = netdevs.get(lower)
                if ln is None or ln.pci is None:
                    continue
                if n.default_route:
                    add(
                        ln.pci,
                        f"{lower} carries the default route"
                        + ("" if lower == iface else f" (through {iface})"),
                    )
                if n.up and n.has_address:
                    add(
                        ln.pci,
                        f"{lower} is up with an address"
                        + ("" if lower == iface else f" (through {iface})"),
                    )
        for addr, fn in pci.items():
            if fn.boot_vga:
                add(addr, "boot VGA device")
        return {a: tuple(r) for a, r in sorted(reasons.items())}

    def busy_interfaces(self, netdevs: dict[str, NetInterface]) -> list[str]:
        return [n for n, i in netdevs.items() if i.default_route or (i.up and i.has_address)]

    def lower_interfaces(self, iface: str, depth: int = 0) -> list[str]:
        """The interface and those it is built on (a bridge's ports, a bond's slaves, a VLAN's parent)."""
        out = [iface]
        if depth > 8:
            return out
        for entry in self.root.listdir(f"{SYS_CLASS_NET}/{iface}"):
            if entry.startswith("lower_"):
                out.extend(self.lower_interfaces(entry.removeprefix("lower_"), depth + 1))
        return out

    def mounted_block_devices(self) -> list[tuple[str, str, str]]:
        """(major:minor, mountpoint, device name) of mounted block devices."""
        out: list[tuple[str, str, str]] = []
        info = self.root.read("/proc/self/mountinfo")
        if info is not None:
            for line in info.splitlines():
                left, sep, right = line.partition(" - ")
                f = left.split()
                r = right.split()
                if not sep or len(f) < 5 or not _MAJMIN_RE.match(f[2]):
                    continue
                source = r[1] if len(r) > 1 else ""
                majmin = f[2]
                if majmin.startswith("0:"):
                    # Major 0 is no block device (tmpfs, proc, overlay...), except for
                    # filesystems that hand out anonymous numbers over real disks
                    # (btrfs): their source still names the device.
                    dev = self.block_by_source(source)
                    if dev is None:
                        continue
                    majmin = self.root.read(f"{dev}/dev") or ""
                    if not _MAJMIN_RE.match(majmin):
                        continue
                out.append((majmin, _unescape(f[4]), os.path.basename(source)))
            return out
        # No mountinfo (old snapshots, hwloc trees): /proc/mounts names the device only.
        for line in (self.root.read("/proc/mounts") or "").splitlines():
            f = line.split()
            if len(f) >= 2:
                dev = self.block_by_source(f[0])
                found = self.root.read(f"{dev}/dev") if dev else None
                if found and _MAJMIN_RE.match(found):
                    out.append((found, _unescape(f[1]), os.path.basename(f[0])))
        return out

    def block_by_source(self, source: str) -> str | None:
        """The /sys/class/block entry of a mount source such as ``/dev/sda1``,
        ``/dev/mapper/vg-root`` or ``/dev/disk/by-uuid/...``; None if it is no block device."""
        if not source.startswith("/dev/"):
            return None
        name = os.path.basename(self.root.realpath(source))
        if name not in ("", ".", "..") and self.root.exists(f"/sys/class/block/{name}/dev"):
            return f"/sys/class/block/{name}"
        if source.startswith("/dev/mapper/"):
            # A snapshot has no /dev links: device-mapper names are in sysfs too.
            wanted = os.path.basename(source)
            for entry in self.root.listdir("/sys/class/block"):
                if (
                    entry.startswith("dm-")
                    and self.root.read(f"/sys/class/block/{entry}/dm/name") == wanted
                ):
                    return f"/sys/class/block/{entry}"
        return None

    def swap_devices(self) -> list[str]:
        out: list[str] = []
        for line in (self.root.read("/proc/swaps") or "").splitlines()[1:]:
            f = line.split()
            # A swap file lives on a mounted filesystem, whose controller is already kept.
            if len(f) >= 2 and f[1] == "partition" and f[0].startswith("/dev/"):
                name = os.path.basename(f[0])
                if name not in ("", ".", ".."):
                    out.append(name)
        return out

    def block_controllers(self, link: str, depth: int = 0) -> list[tuple[PciAddress, str]]:
        """The PCI functions under a block device, following dm/md ``slaves`` down to disks."""
        if depth > 16:
            return []
        real = self.realpath(link)
        name = os.path.basename(real)
        addr = _nearest_pci(real)
        if addr is not None:
            return [(addr, name)]
        out: list[tuple[PciAddress, str]] = []
        for slave in self.root.listdir(f"{real}/slaves"):
            out.extend(self.block_controllers(f"{real}/slaves/{slave}", depth + 1))
        if not out and "/nvme-subsystem/" in real:
            # NVMe multipath: the namespace hangs off a virtual subsystem whose
            # controllers (nvme0, nvme1...) link to their PCI functions.
            parts = real.split("/")
            subsys = "/".join(parts[: parts.index("nvme-subsystem") + 2])
            for entry in self.root.listdir(subsys):
                if _NVME_CTRL_RE.match(entry):
                    ctrl = _nearest_pci(self.realpath(f"{subsys}/{entry}"))
                    if ctrl is not None:
                        out.append((ctrl, name))
        return out


def _cgroup_kind(fstype: str, opts: list[str], mountpoint: str) -> list[tuple[str, str]]:
    if fstype == "cgroup2":
        return [("v2", mountpoint)]
    if fstype == "cgroup" and "cpuset" in opts:
        return [("v1", mountpoint)]
    if fstype == "cpuset":
        return [("cpuset", mountpoint)]
    return []


def _unescape(text: str) -> str:
    """Mount tables escape space, tab, newline and backslash as octal (``\\040``)."""
    if "\\" not in text:
        return text
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True


def _nearest_pci(real: str) -> PciAddress | None:
    for part in reversed(real.split("/")):
        if _PCI_ADDR_RE.match(part):
            return _parse_pci(part)
    return None


@functools.lru_cache(maxsize=4096)
def _parse_pci(text: str) -> PciAddress:
    return PciAddress.parse(text)


def _replace_cpu(c: Cpu, *, siblings: CpuSet | None = None, node: int | None = None) -> Cpu:
    # Built directly: dataclasses.replace costs more than the sysfs reads on a big host.
    return Cpu(
        id=c.id,
        online=c.online,
        allowed=c.allowed,
        package=c.package,
        die=c.die,
        core=c.core,
        node=c.node if node is None else node,
        siblings=c.siblings if siblings is None else siblings,
        kind=c.kind,
    )


def _with_netdevs(
    pci: dict[PciAddress, PciFunction], by_pci: dict[PciAddress, list[str]]
) -> dict[PciAddress, PciFunction]:
    """Add interfaces found through /sys/class/net (virtio puts them a level down) to their functions."""
    out = dict(pci)
    for addr, names in by_pci.items():
        fn = out.get(addr)
        if fn is None:
            continue
        merged = tuple(sorted(set(fn.netdevs) | set(names)))
        if merged != fn.netdevs:
            out[addr] = replace(fn, netdevs=merged)
    return out
