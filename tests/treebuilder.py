"""Write a host tree (``sys``, ``proc``, ``dev``) in the kernel's layout, with real symlinks.

Tests describe a machine with a few calls and get a directory that
``HostRoot(dir)`` reads exactly as it reads ``/``::

    t = TreeBuilder(tmp_path)
    t.cpus(count=16, packages=2, threads=2, nodes=2)
    t.node(1, memory_bytes=8 * GiB, hugepages={2 * MiB: (512, 512)})
    t.pci("0000:80:01.0", class_code="060400", driver="pcieport", iommu_group=18, numa_node=1)
    t.pci("0000:81:00.0", vendor="8086", device="10d3", class_code="020000", driver="e1000e",
          iommu_group=19, numa_node=1, parent="0000:80:01.0", netdevs=("enp129s0",))
    t.netdev_up("enp129s0", default_route=True)
    root = t.build()

Everything is recorded first and written by :meth:`build`; :meth:`bind` and
:meth:`unbind` also work on a built tree (they move the ``driver`` link and the
driver directory's back link, as the kernel does), so a fake kernel can use them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

GiB = 1024**3
MiB = 1024**2

# IORESOURCE_* flags as the kernel shows them in a function's sysfs `resource`, taken from
# real devices (the low bits repeat the BAR register's own type bits).
BAR_MEM32 = 0x00040200
BAR_MEM64 = 0x00140204
BAR_MEM64_PREF = 0x0014220C
BAR_IO = 0x00040101


@dataclass
class _Cpu:
    id: int
    package: int
    die: int
    core: int
    node: int | None
    siblings: tuple[int, ...]
    online: bool
    kind: str


@dataclass
class _Node:
    id: int
    memory_bytes: int
    free_bytes: int
    hugepages: dict[int, tuple[int, int]]
    distances: tuple[int, ...] | None


@dataclass
class _Pci:
    address: str
    vendor: str
    device: str
    class_code: str
    subsystem_vendor: str
    subsystem_device: str
    driver: str | None
    driver_override: str | None
    iommu_group: int | None
    numa_node: int | None
    parent: str | None
    reset_methods: tuple[str, ...] | None
    boot_vga: bool | None
    netdevs: tuple[str, ...]
    header_type: int | None = None  # config space byte 0x0e; None: no config file
    reset_file: bool | None = None  # the `reset` file; None: there when reset_methods name one

    bars: Mapping[int, tuple[int, int]] | None = None


@dataclass
class _Sriov:
    total_vfs: int
    num_vfs: int
    offset: int
    stride: int
    vf_device: str
    autoprobe: bool


@dataclass
class _Block:
    name: str
    major: int
    minor: int
    pci: str | None  # the controller; None for a virtual device (dm, md, loop)
    parent: str | None  # the disk of a partition
    slaves: tuple[str, ...]  # dm/md: the block devices underneath
    multipath: bool = False  # nvme namespace under /sys/devices/virtual/nvme-subsystem
    dm_name: str | None = None  # device-mapper name: mounted as /dev/mapper/NAME


@dataclass
class _Net:
    name: str
    pci: str | None
    up: bool
    address: bool
    default_route: bool


class TreeBuilder:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._cpus = {}
        self._nodes = {}
        self._pci = {}
        self._blocks = {}
        self._nets = {}
        self._mounts = []
        self._swaps = []
        self._drivers = set()
        self._hugepage_sizes = (2 * MiB, GiB)
        self._allowed = None
        self._affinity = None
        self._kvm = False
        self._numa = True
        self._mem_total = None
        self._hybrid = False
        self._next_minor = 0
        self._made: set[str] = set()
        self._words: int | None = None
        self._phys_bits: int | None = None
        self._next_bar = 0x38_0000_0000_00  # where the "firmware" puts the next BAR
        self._sriov: dict[str, _Sriov] = {}
        self.built = False  # after build(), bind/unbind change the files

    # -- CPUs and memory -----------------------------------------------------

    def cpus(
        self,
        count: int,
        packages: int = 1,
        threads: int = 1,
        nodes: int = 1,
        dies: int = 1,
        memory_per_node: int = 4 * GiB,
    ) -> TreeBuilder:
        """A uniform machine numbered as Linux numbers Intel servers: first thread of every
        core of every package, then the second threads (so the siblings of CPU 0 are 0 and
        count/threads).  Nodes split packages evenly (or packages split nodes).  Nodes not
        described by :meth:`node` get ``memory_per_node``."""
        if count % (packages * threads * dies):
            raise ValueError("count must be a multiple of packages * dies * threads")
        cores_per_pkg = count // (packages * threads)
        cores_per_die = cores_per_pkg // dies
        per_thread = count // threads
        for p in range(packages):
            for c in range(cores_per_pkg):
                if nodes >= packages:
                    npp = nodes // packages
                    node = p * npp + c * npp // cores_per_pkg
                else:
                    node = p * nodes // packages
                ids = tuple(t * per_thread + p * cores_per_pkg + c for t in range(threads))
                for cpu_id in ids:
                    self.cpu(
                        cpu_id,
                        package=p,
                        die=c // cores_per_die,
                        core=c,
                        node=node,
                        siblings=ids,
                    )
        for n in range(nodes):
            if n not in self._nodes:
                self.node(n, memory_bytes=memory_per_node)
        return self

    def cpu(
        self,
        id: int,
        package: int = 0,
        core: int | None = None,
        node: int | None = 0,
        siblings: Iterable[int] | None = None,
        online: bool = True,
        die: int = 0,
        kind: str = "",
    ) -> TreeBuilder:
        """One CPU.  An offline CPU gets no topology directory, as in the kernel."""
        self._cpus[id] = _Cpu(
            id=id,
            package=package,
            die=die,
            core=id if core is None else core,
            node=node,
            siblings=tuple(sorted(siblings)) if siblings is not None else (id,),
            online=online,
            kind=kind,
        )
        if kind:
            self._hybrid = True
        if node is not None and node not in self._nodes and self._numa:
            self.node(node, memory_bytes=4 * GiB)
        return self

    def offline(self, *ids: int) -> TreeBuilder:
        for i in ids:
            self._cpus[i].online = False
        return self

    def node(
        self,
        id: int,
        memory_bytes: int = 4 * GiB,
        free_bytes: int | None = None,
        hugepages: Mapping[int, tuple[int, int]] | None = None,
        distances: Iterable[int] | None = None,
    ) -> TreeBuilder:
        """A NUMA node; ``hugepages`` maps page size in bytes to (total, free)."""
        self._nodes[id] = _Node(
            id=id,
            memory_bytes=memory_bytes,
            free_bytes=memory_bytes // 2 if free_bytes is None else free_bytes,
            hugepages=dict(hugepages or {}),
            distances=tuple(distances) if distances is not None else None,
        )
        return self

    def no_numa(self, mem_total: int = 8 * GiB) -> TreeBuilder:
        """A kernel without NUMA: no /sys/devices/system/node, only /proc/meminfo."""
        self._numa = False
        self._nodes.clear()
        self._mem_total = mem_total
        for c in self._cpus.values():
            c.node = None
        return self

    def hugepage_sizes(self, *sizes: int) -> TreeBuilder:
        """Page sizes the kernel offers (/sys/kernel/mm/hugepages); default 2MiB and 1GiB."""
        self._hugepage_sizes = tuple(sorted(sizes))
        return self

    def allowed(self, cpus: str) -> TreeBuilder:
        """Restrict the CPUs the partitioner may use through a cgroup2 cpuset (cpulist text)."""
        self._allowed = cpus
        return self

    def affinity(self, cpus: str) -> TreeBuilder:
        """The process's own affinity (Cpus_allowed_list in /proc/self/status)."""
        self._affinity = cpus
        return self

    def kvm(self, present: bool = True) -> TreeBuilder:
        self._kvm = present
        return self

    # -- PCI -----------------------------------------------------------------

    def pci(
        self,
        address: str,
        vendor: str = "8086",
        device: str = "10d3",
        class_code: str = "020000",
        driver: str | None = None,
        iommu_group: int | None = None,
        numa_node: int | None = None,
        parent: str | None = None,
        reset_methods: Iterable[str] | None = ("flr",),
        boot_vga: bool | None = None,
        netdevs: Iterable[str] = (),
        subsystem_vendor: str | None = None,
        subsystem_device: str | None = None,
        driver_override: str | None = None,
        header_type: int | None = -1,
        bars: Mapping[int, tuple[int, int]] | None = None,
        reset_file: bool | None = None,
    ) -> TreeBuilder:
        """A PCI function.  ``header_type`` goes to byte 0x0e of its ``config`` file: -1
        (default) derives it from the class as real devices have it (1 for a PCI bridge
        0604/0609, 2 for CardBus 0607, 0 otherwise), None leaves the file out (old trees).  ``parent`` (a bridge or port added before) puts it behind that
        bridge in /sys/devices; ``reset_methods=None`` leaves out the reset_method file (as
        kernels before 5.15 do, and later ones for a function they cannot reset);
        ``reset_file`` writes the write-only ``reset`` file (True) or leaves it out (False),
        by default there when ``reset_methods`` names a method; ``boot_vga`` writes the file only when not None (the kernel has it on VGA
        devices only); ``numa_node=None`` writes -1; ``bars`` (BAR number -> (size, flags),
        flags such as BAR_MEM64_PREF) writes ``resource`` as the kernel does."""
        if parent is not None and parent not in self._pci:
            raise ValueError(f"parent {parent} must be added before {address}")
        self._pci[address] = _Pci(
            address=address,
            vendor=vendor,
            device=device,
            class_code=class_code,
            subsystem_vendor=subsystem_vendor or vendor,
            subsystem_device=subsystem_device or "0000",
            driver=driver,
            driver_override=driver_override,
            iommu_group=iommu_group,
            numa_node=numa_node,
            parent=parent,
            reset_methods=tuple(reset_methods) if reset_methods is not None else None,
            boot_vga=boot_vga,
            netdevs=tuple(netdevs),
            header_type=_header_type(class_code) if header_type == -1 else header_type,
            bars=bars,
            reset_file=reset_file,
        )
        if driver:
            self._drivers.add(driver)
        for n in netdevs:
            self._nets.setdefault(n, _Net(n, address, False, False, False))
        return self

    def sriov(
        self,
        pf: str,
        total_vfs: int,
        num_vfs: int = 0,
        *,
        offset: int = 0x80,
        stride: int = 2,
        vf_device: str = "10ca",
        autoprobe: bool = True,
        vf_group: int | None = None,
        vf_driver: str | None = None,
        vf_netdevs: bool = False,
        same_group: bool = False,
    ) -> TreeBuilder:
        """Make ``pf`` (added before) an SR-IOV physical function with ``num_vfs`` of its
        ``total_vfs`` VFs made, as the kernel shows them: the ``sriov_*`` files, each VF a
        function beside the PF (same parent bridge, NUMA node and class) at the PF's routing
        ID + ``offset`` + index * ``stride``, linked ``virtfnN`` and ``physfn``.  VF i is in
        IOMMU group ``vf_group + i`` (None: no group; ``same_group``: all in ``vf_group``, as
        without ACS), bound to ``vf_driver``, with an interface ``PFNETDEVvI`` when
        ``vf_netdevs``."""
        f = self._pci[pf]
        self._sriov[pf] = _Sriov(total_vfs, num_vfs, offset, stride, vf_device, autoprobe)
        for i in range(num_vfs):
            vf = self.vf_address(pf, i)
            self.pci(
                vf,
                vendor=f.vendor,
                device=vf_device,
                class_code=f.class_code,
                driver=vf_driver,
                iommu_group=None if vf_group is None else vf_group + (0 if same_group else i),
                numa_node=f.numa_node,
                parent=f.parent,
                netdevs=(f"{f.netdevs[0] if f.netdevs else 'eth'}v{i}",) if vf_netdevs else (),
            )
        return self

    def vf_address(self, pf: str, index: int) -> str:
        """Where VF ``index`` of ``pf`` is (its routing ID plus the capability's offset and stride)."""
        s = self._sriov[pf]
        domain, bus, rest = pf.split(":")
        slot, fn = rest.split(".")
        rid = (int(bus, 16) << 8 | int(slot, 16) << 3 | int(fn)) + s.offset + index * s.stride
        return f"{domain}:{rid >> 8:02x}:{(rid >> 3) & 0x1F:02x}.{rid & 7}"

    def driver(self, name: str) -> TreeBuilder:
        """A loaded driver with no device (e.g. ``vfio-pci`` after modprobe)."""
        self._drivers.add(name)
        return self

    # -- what the host runs on -----------------------------------------------

    def disk(
        self, name: str, pci: str | None, partitions: int = 0, multipath: bool = False
    ) -> TreeBuilder:
        """A disk on the controller ``pci`` with partitions NAME1.. (NAMEp1 for nvme/mmc).
        ``multipath=True`` lays an nvme namespace out as kernels with native NVMe multipath
        do: under a virtual nvme-subsystem whose controller links lead to the PCI function."""
        self._blocks[name] = _Block(name, 259, self._minor(), pci, None, (), multipath)
        sep = "p" if name[-1].isdigit() else ""
        for i in range(1, partitions + 1):
            pname = f"{name}{sep}{i}"
            self._blocks[pname] = _Block(pname, 259, self._minor(), pci, name, ())
        return self

    def virtual_block(
        self, name: str, slaves: Iterable[str], dm_name: str | None = None
    ) -> TreeBuilder:
        """A dm/md device made of other block devices (its ``slaves``); ``dm_name`` gives a
        device-mapper device its name (dm/name), and mounts then name it /dev/mapper/NAME."""
        self._blocks[name] = _Block(
            name, 253, self._minor(), None, None, tuple(slaves), dm_name=dm_name
        )
        return self

    def mount(self, device: str, mountpoint: str = "/", fstype: str = "ext4") -> TreeBuilder:
        """A filesystem on block device ``device`` (a name given to disk/virtual_block, or a
        pseudo filesystem such as ``tmpfs`` that is not a block device)."""
        self._mounts.append((device, mountpoint, fstype))
        return self

    def swap(self, device: str) -> TreeBuilder:
        self._swaps.append(device)
        return self

    def netdev(
        self,
        name: str,
        pci: str | None = None,
        up: bool = False,
        address: bool = False,
        default_route: bool = False,
    ) -> TreeBuilder:
        """A network interface; ``pci=None`` makes it virtual (lo, bridges)."""
        self._nets[name] = _Net(name, pci, up, address, default_route)
        return self

    def netdev_up(
        self, name: str, address: bool = True, default_route: bool = False
    ) -> TreeBuilder:
        """Bring an interface (declared by ``pci(netdevs=...)`` or :meth:`netdev`) up."""
        n = self._nets.setdefault(name, _Net(name, None, False, False, False))
        n.up = True
        n.address = address
        n.default_route = default_route
        return self

    # -- writing -------------------------------------------------------------

    def _minor(self) -> int:
        self._next_minor += 1
        return self._next_minor - 1

    def _p(self, kernel_path: str) -> Path:
        return self.root / kernel_path.lstrip("/")

    def _mkdir(self, local: str) -> None:
        if local not in self._made:
            os.makedirs(local, exist_ok=True)
            self._made.add(local)

    def _write(self, kernel_path: str, text: str) -> None:
        local = str(self.root) + kernel_path
        self._mkdir(os.path.dirname(local))
        with open(local, "w") as f:
            f.write(text)

    def _write_config(self, kernel_path: str, f: _Pci) -> None:
        """The first 64 bytes of config space, as the kernel shows them to anyone (no root):
        ids, class and header type where the PCI spec puts them."""
        assert f.header_type is not None
        head = bytearray(64)
        head[0:2] = int(f.vendor, 16).to_bytes(2, "little")
        head[2:4] = int(f.device, 16).to_bytes(2, "little")
        head[9:12] = int(f.class_code, 16).to_bytes(3, "little")
        head[0x0E] = f.header_type
        local = str(self.root) + kernel_path
        self._mkdir(os.path.dirname(local))
        with open(local, "wb") as out:
            out.write(bytes(head))

    def _link(self, kernel_path: str, target_kernel_path: str) -> None:
        """A relative symlink, as sysfs makes them."""
        local = str(self.root) + kernel_path
        self._mkdir(os.path.dirname(local))
        rel = os.path.relpath(target_kernel_path, os.path.dirname(kernel_path))
        if os.path.islink(local):
            os.unlink(local)
        os.symlink(rel, local)

    def pci_path(self, address: str) -> str:
        """The kernel path of a function under /sys/devices (``/sys/devices/pci0000:80/.../ADDR``)."""
        chain = [address]
        while (parent := self._pci[chain[-1]].parent) is not None:
            chain.append(parent)
        top = chain[-1]
        domain, bus = top.split(":")[0], top.split(":")[1]
        return "/sys/devices/pci" + f"{domain}:{bus}/" + "/".join(reversed(chain))

    def build(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        self._words = max(1, (max(self._cpus, default=0) + 32) // 32)
        self._build_cpus()
        self._build_nodes()
        self._build_pci()
        self._build_sriov()
        self._build_blocks()
        self._build_net()
        self._build_proc()
        self.built = True
        return self.root

    def _cpulist(self, ids: Iterable[int]) -> str:
        from partitioner.cpuset import CpuSet

        return str(CpuSet(ids))

    def _mask(self, ids: Iterable[int]) -> str:
        v = 0
        for i in ids:
            v |= 1 << i
        words = []
        n = max(1, (max(self._cpus, default=0) + 32) // 32) if self._words is None else self._words
        for w in range(n):
            words.append(f"{(v >> (32 * w)) & 0xFFFFFFFF:08x}")
        return ",".join(reversed(words))

    def _build_cpus(self) -> None:
        base = "/sys/devices/system/cpu"
        all_ids = sorted(self._cpus)
        online = [c for c in all_ids if self._cpus[c].online]
        self._write(f"{base}/possible", self._cpulist(all_ids) + "\n")
        self._write(f"{base}/present", self._cpulist(all_ids) + "\n")
        self._write(f"{base}/online", self._cpulist(online) + "\n")
        self._write(f"{base}/offline", self._cpulist(set(all_ids) - set(online)) + "\n")
        by_pkg: dict[int, list[int]] = {}
        by_die: dict[tuple[int, int], list[int]] = {}
        for o in self._cpus.values():
            if o.online:
                by_pkg.setdefault(o.package, []).append(o.id)
                by_die.setdefault((o.package, o.die), []).append(o.id)
        for c in self._cpus.values():
            d = f"{base}/cpu{c.id}"
            if c.id != 0 or not c.online:
                # cpu0 usually cannot be hot-unplugged and then has no "online" file
                self._write(f"{d}/online", "1\n" if c.online else "0\n")
            else:
                self._p(d).mkdir(parents=True, exist_ok=True)
            if c.node is not None and self._numa:
                # The link stays while the CPU is offline: it says where it would come back.
                self._link(f"{d}/node{c.node}", f"/sys/devices/system/node/node{c.node}")
            if not c.online:
                continue
            t = f"{d}/topology"
            sib = [s for s in c.siblings if s in self._cpus]
            self._write(f"{t}/physical_package_id", f"{c.package}\n")
            self._write(f"{t}/die_id", f"{c.die}\n")
            self._write(f"{t}/core_id", f"{c.core}\n")
            self._write(f"{t}/thread_siblings_list", self._cpulist(sib) + "\n")
            self._write(f"{t}/thread_siblings", self._mask(sib) + "\n")
            self._write(f"{t}/core_cpus_list", self._cpulist(sib) + "\n")
            pkg = by_pkg[c.package]
            self._write(f"{t}/package_cpus_list", self._cpulist(pkg) + "\n")
            self._write(f"{t}/core_siblings_list", self._cpulist(pkg) + "\n")
            die = by_die[(c.package, c.die)]
            self._write(f"{t}/die_cpus_list", self._cpulist(die) + "\n")
        if self._hybrid:
            for kind in ("core", "atom"):
                ids = [c.id for c in self._cpus.values() if c.kind == kind]
                self._write(f"/sys/devices/cpu_{kind}/cpus", self._cpulist(ids) + "\n")

    def _build_nodes(self) -> None:
        for size in self._hugepage_sizes:
            d = f"/sys/kernel/mm/hugepages/hugepages-{size // 1024}kB"
            total = sum(n.hugepages.get(size, (0, 0))[0] for n in self._nodes.values())
            free = sum(n.hugepages.get(size, (0, 0))[1] for n in self._nodes.values())
            self._write(f"{d}/nr_hugepages", f"{total}\n")
            self._write(f"{d}/free_hugepages", f"{free}\n")
            self._write(f"{d}/surplus_hugepages", "0\n")
            self._write(f"{d}/resv_hugepages", "0\n")
        if not self._numa:
            return
        base = "/sys/devices/system/node"
        ids = sorted(self._nodes)
        self._write(f"{base}/possible", self._cpulist(ids) + "\n")
        self._write(f"{base}/online", self._cpulist(ids) + "\n")
        with_cpu = sorted({c.node for c in self._cpus.values() if c.node is not None and c.online})
        self._write(f"{base}/has_cpu", self._cpulist(with_cpu) + "\n")
        self._write(
            f"{base}/has_memory",
            self._cpulist(n for n in ids if self._nodes[n].memory_bytes) + "\n",
        )
        for n in self._nodes.values():
            d = f"{base}/node{n.id}"
            cpus = [c.id for c in self._cpus.values() if c.node == n.id and c.online]
            self._write(f"{d}/cpulist", self._cpulist(cpus) + "\n")
            self._write(f"{d}/cpumap", self._mask(cpus) + "\n")
            for c in cpus:
                self._link(f"{d}/cpu{c}", f"/sys/devices/system/cpu/cpu{c}")
            dist = n.distances or tuple(10 if o == n.id else 20 for o in ids)
            self._write(f"{d}/distance", " ".join(str(x) for x in dist) + "\n")
            kb = n.memory_bytes // 1024
            free_kb = n.free_bytes // 1024
            self._write(
                f"{d}/meminfo",
                f"Node {n.id} MemTotal:       {kb:8d} kB\n"
                f"Node {n.id} MemFree:        {free_kb:8d} kB\n"
                f"Node {n.id} MemUsed:        {kb - free_kb:8d} kB\n"
                f"Node {n.id} HugePages_Total: {0:5d}\n",
            )
            for size in self._hugepage_sizes:
                total, free = n.hugepages.get(size, (0, 0))
                h = f"{d}/hugepages/hugepages-{size // 1024}kB"
                self._write(f"{h}/nr_hugepages", f"{total}\n")
                self._write(f"{h}/free_hugepages", f"{free}\n")
                self._write(f"{h}/surplus_hugepages", "0\n")

    def _build_pci(self) -> None:
        self._write("/sys/bus/pci/drivers_probe", "")
        self._write("/sys/bus/pci/rescan", "")
        self._p("/sys/bus/pci/devices").mkdir(parents=True, exist_ok=True)
        for drv in sorted(self._drivers):
            self._make_driver(drv)
        groups: set[int] = set()
        for f in self._pci.values():
            d = self.pci_path(f.address)
            self._write(f"{d}/vendor", f"0x{f.vendor}\n")
            self._write(f"{d}/device", f"0x{f.device}\n")
            self._write(f"{d}/class", f"0x{f.class_code}\n")
            self._write(f"{d}/subsystem_vendor", f"0x{f.subsystem_vendor}\n")
            self._write(f"{d}/subsystem_device", f"0x{f.subsystem_device}\n")
            # What pci_uevent writes (the scan reads the ids from here where it can).
            self._write(
                f"{d}/uevent",
                "".join(
                    (
                        f"DRIVER={f.driver}\n" if f.driver else "",
                        f"PCI_CLASS={int(f.class_code, 16):04X}\n",
                        f"PCI_ID={f.vendor.upper()}:{f.device.upper()}\n",
                        f"PCI_SUBSYS_ID={f.subsystem_vendor.upper()}:{f.subsystem_device.upper()}\n",
                        f"PCI_SLOT_NAME={f.address}\n",
                        f"MODALIAS=pci:v0000{f.vendor.upper()}d0000{f.device.upper()}"
                        f"sv0000{f.subsystem_vendor.upper()}sd0000{f.subsystem_device.upper()}"
                        f"bc{f.class_code[:2].upper()}sc{f.class_code[2:4].upper()}"
                        f"i{f.class_code[4:6].upper()}\n",
                    )
                ),
            )
            self._write(f"{d}/driver_override", f"{f.driver_override or '(null)'}\n")
            self._write(f"{d}/numa_node", f"{-1 if f.numa_node is None else f.numa_node}\n")
            self._write(f"{d}/remove", "")
            if f.reset_methods is not None:
                self._write(f"{d}/reset_method", " ".join(f.reset_methods) + "\n")
            if f.reset_file if f.reset_file is not None else bool(f.reset_methods):
                self._write(f"{d}/reset", "")
            if f.header_type is not None:
                self._write_config(f"{d}/config", f)
            if f.boot_vga is not None:
                self._write(f"{d}/boot_vga", "1\n" if f.boot_vga else "0\n")
            if f.bars is not None:
                self._write(f"{d}/resource", self._resource(f.bars))
            self._link(f"{d}/subsystem", "/sys/bus/pci")
            self._link(f"/sys/bus/pci/devices/{f.address}", d)
            if f.iommu_group is not None:
                g = f"/sys/kernel/iommu_groups/{f.iommu_group}"
                groups.add(f.iommu_group)
                self._link(f"{d}/iommu_group", g)
                self._link(f"{g}/devices/{f.address}", d)
            if f.driver:
                self._link(f"{d}/driver", f"/sys/bus/pci/drivers/{f.driver}")
                self._link(f"/sys/bus/pci/drivers/{f.driver}/{f.address}", d)
        for g_id in groups:
            self._write(f"/sys/kernel/iommu_groups/{g_id}/type", "DMA\n")

    def _build_sriov(self) -> None:
        for pf, s in self._sriov.items():
            d = self.pci_path(pf)
            for leaf, value in (
                ("sriov_totalvfs", s.total_vfs),
                ("sriov_numvfs", s.num_vfs),
                ("sriov_drivers_autoprobe", int(s.autoprobe)),
                ("sriov_offset", s.offset),
                ("sriov_stride", s.stride),
            ):
                self._write(f"{d}/{leaf}", f"{value}\n")
            self._write(f"{d}/sriov_vf_device", f"{s.vf_device}\n")
            for i in range(s.num_vfs):
                vf = self.pci_path(self.vf_address(pf, i))
                self._link(f"{d}/virtfn{i}", vf)
                self._link(f"{vf}/physfn", d)

    def _resource(self, bars: Mapping[int, tuple[int, int]]) -> str:
        lines = ["0x0000000000000000 0x0000000000000000 0x0000000000000000"] * 7
        for i, (size, flags) in sorted(bars.items()):
            start = -(-self._next_bar // size) * size  # naturally aligned, as firmware does
            self._next_bar = start + size
            lines[i] = f"0x{start:016x} 0x{start + size - 1:016x} 0x{flags:016x}"
        return "\n".join(lines) + "\n"

    def phys_bits(self, bits: int) -> TreeBuilder:
        """/proc/cpuinfo says the CPU has ``bits`` physical address bits (not written otherwise)."""
        self._phys_bits = bits
        return self

    def _make_driver(self, name: str) -> None:
        d = f"/sys/bus/pci/drivers/{name}"
        for attr in ("bind", "unbind", "new_id", "remove_id", "uevent"):
            p = self._p(f"{d}/{attr}")
            if not p.exists():
                self._write(f"{d}/{attr}", "")

    def _block_path(self, name: str) -> str:
        b = self._blocks[name]
        if b.pci is None:
            return f"/sys/devices/virtual/block/{name}"
        if b.parent is not None:
            return f"{self._block_path(b.parent)}/{name}"
        ctrl = self.pci_path(b.pci)
        if name.startswith("nvme"):
            if b.multipath:
                return f"/sys/devices/virtual/nvme-subsystem/nvme-subsys{name[4:].split('n')[0]}/{name}"
            return f"{ctrl}/nvme/{name.split('n1')[0]}/{name}"
        return f"{ctrl}/ata1/host0/target0:0:0/0:0:0:0/block/{name}"

    def _build_blocks(self) -> None:
        for b in self._blocks.values():
            d = self._block_path(b.name)
            self._write(f"{d}/dev", f"{b.major}:{b.minor}\n")
            self._write(f"{d}/size", "2097152\n")
            self._link(f"/sys/dev/block/{b.major}:{b.minor}", d)
            self._link(f"/sys/class/block/{b.name}", d)
            self._p(f"{d}/slaves").mkdir(parents=True, exist_ok=True)
            for s in b.slaves:
                self._link(f"{d}/slaves/{s}", self._block_path(s))
            if b.dm_name is not None:
                self._write(f"{d}/dm/name", b.dm_name + "\n")
            if b.multipath and b.pci is not None:
                ctrl = b.name.split("n1")[0]
                ctrl_dir = f"{self.pci_path(b.pci)}/nvme/{ctrl}"
                self._write(f"{ctrl_dir}/subsysnqn", f"nqn.test:{ctrl}\n")
                self._link(f"{os.path.dirname(d)}/{ctrl}", ctrl_dir)

    def _build_net(self) -> None:
        route = [
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"
        ]
        inet6: list[str] = []
        self._p("/sys/class/net").mkdir(parents=True, exist_ok=True)
        for i, n in enumerate(self._nets.values()):
            if n.pci is None:
                d = f"/sys/devices/virtual/net/{n.name}"
            else:
                d = f"{self.pci_path(n.pci)}/net/{n.name}"
                self._link(f"{d}/device", self.pci_path(n.pci))
            self._write(f"{d}/operstate", "up\n" if n.up else "down\n")
            self._write(f"{d}/flags", "0x1003\n" if n.up else "0x1002\n")
            self._write(f"{d}/ifindex", f"{i + 2}\n")
            self._link(f"/sys/class/net/{n.name}", d)
            if n.default_route:
                route.append(f"{n.name}\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0")
            if n.address:
                route.append(f"{n.name}\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0")
                # A routable (scope 00) address: link-local ones come with every up interface.
                inet6.append(
                    f"fd00000000000000000000000000{i + 2:04x} {i + 2:02x} 40 00 80 {n.name:>8}"
                )
        self._write("/proc/net/route", "\n".join(route) + "\n")
        self._write("/proc/net/if_inet6", "".join(x + "\n" for x in inet6))

    def _build_proc(self) -> None:
        if self._phys_bits is not None:
            self._write(
                "/proc/cpuinfo",
                "".join(
                    f"processor\t: {c}\naddress sizes\t: {self._phys_bits} bits physical, "
                    "48 bits virtual\n\n"
                    for c in sorted(self._cpus) or [0]
                ),
            )
        total = self._mem_total
        if total is None:
            total = sum(n.memory_bytes for n in self._nodes.values()) or 8 * GiB
        self._write(
            "/proc/meminfo",
            f"MemTotal:       {total // 1024} kB\nMemFree:        {total // 2048} kB\n"
            f"Hugepagesize:       2048 kB\n",
        )
        mountinfo = [
            "22 1 0:21 / /proc rw,relatime - proc proc rw",
            "23 1 0:22 / /sys rw,relatime - sysfs sysfs rw",
            "24 1 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw",
        ]
        for i, (dev, mp, fstype) in enumerate(self._mounts):
            b = self._blocks.get(dev)
            if b is None:
                mountinfo.append(f"{30 + i} 1 0:{40 + i} / {mp} rw - {fstype} {dev} rw")
            else:
                # btrfs shows an anonymous device number; its source still names the disk.
                majmin = f"0:{40 + i}" if fstype == "btrfs" else f"{b.major}:{b.minor}"
                source = f"/dev/mapper/{b.dm_name}" if b.dm_name else f"/dev/{dev}"
                mountinfo.append(f"{30 + i} 1 {majmin} / {mp} rw,relatime - {fstype} {source} rw")
        self._write("/proc/self/mountinfo", "\n".join(mountinfo) + "\n")
        swaps = ["Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority"]
        for s in self._swaps:
            swaps.append(f"/dev/{s}                               partition\t1048572\t\t0\t\t-2")
        self._write("/proc/swaps", "\n".join(swaps) + "\n")
        all_ids = sorted(self._cpus)
        aff = self._affinity if self._affinity is not None else self._cpulist(all_ids)
        self._write(
            "/proc/self/status",
            f"Name:\tpartition\nCpus_allowed:\t{self._mask(all_ids)}\nCpus_allowed_list:\t{aff}\n",
        )
        if self._allowed is not None:
            self._write("/proc/self/cgroup", "0::/partition.slice\n")
            self._write(
                "/proc/mounts",
                "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n",
            )
            self._write(
                "/sys/fs/cgroup/partition.slice/cpuset.cpus.effective", self._allowed + "\n"
            )
        if self._kvm:
            self._write("/dev/kvm", "")

    # -- any other kernel file, written at once ---------------------------------

    def file(self, kernel_path: str, text: str) -> TreeBuilder:
        """A kernel file as the kernel shows it (``/proc/cmdline``, ``/proc/interrupts``),
        written now: on a built tree, or on a copy of a snapshot taken from a real kernel."""
        self._write(kernel_path, text)
        return self

    def link(self, kernel_path: str, target_kernel_path: str) -> TreeBuilder:
        """A relative symlink, as sysfs makes them, written now (both paths as the kernel names them)."""
        self._link(kernel_path, target_kernel_path)
        return self

    # -- on a built tree: the kernel's driver binding --------------------------

    def bind(self, address: str, driver: str) -> None:
        """Bind ``address`` to ``driver``: the device's ``driver`` link and the driver's back link."""
        if address in self._pci:
            self._pci[address].driver = driver
        self._drivers.add(driver)
        if not self.built:
            return
        self._make_driver(driver)
        d = self.device_path(address)
        self._link(f"{d}/driver", f"/sys/bus/pci/drivers/{driver}")
        self._link(f"/sys/bus/pci/drivers/{driver}/{address}", d)

    def unbind(self, address: str) -> None:
        """Unbind ``address`` from its driver, if it has one."""
        if address in self._pci:
            self._pci[address].driver = None
        if not self.built:
            return
        d = self.device_path(address)
        link = self._p(f"{d}/driver")
        if link.is_symlink():
            name = os.path.basename(os.readlink(link))
            link.unlink()
            back = self._p(f"/sys/bus/pci/drivers/{name}/{address}")
            if back.is_symlink():
                back.unlink()

    def device_path(self, address: str) -> str:
        """The /sys/devices kernel path of a function of a built tree."""
        if address in self._pci:
            return self.pci_path(address)
        link = self._p(f"/sys/bus/pci/devices/{address}")
        return "/" + str(Path(os.path.realpath(link)).relative_to(self.root.resolve()))


def _header_type(class_code: str) -> int:
    return {"0604": 1, "0609": 1, "0607": 2}.get(class_code[:4], 0)
