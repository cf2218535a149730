"""The QEMU command line of a partition: a pure function of its Placement, the Plan and QEMU's caps.

Nothing here reads the host or starts anything; ``tests/test_argv.py`` compares
the output with golden files.  Decisions worth knowing:

- The guest starts paused (``-S``): ``launch`` pins the vCPU threads first.
- One memory backend per host NUMA node the partition uses, bound there
  (``policy=bind``), preallocated and locked (``-overcommit mem-lock=on``):
  a partition's memory is never taken back or swapped.  Hugepages come from
  ``memory-backend-memfd,hugetlb=on`` (no hugetlbfs mount needed).
- Preallocation threads run in a ``thread-context`` pinned to the partition's
  own CPUs on that node (QEMU 7.2+): they touch the memory from where it will
  be used, and never from CPUs that belong to the host or to a neighbour.
- Disk format comes from the file name: ``*.qcow2`` is qcow2, anything else
  raw.  Reading the image's magic would be I/O; saying ``format=`` explicitly
  keeps QEMU from probing raw images (and from the warning it prints).
- Block devices (``/dev/...``) bypass the host page cache (``cache=none,
  aio=native``); image files keep QEMU's default cache, because tmpfs and some
  other filesystems refuse O_DIRECT.
- PCI functions that share a host slot and include function 0 (a GPU and its
  audio function) stay together as one multifunction device behind one
  PCIe root port, with their function numbers; any other function gets a
  root port of its own.
- Under KVM every partition's CPUs are dedicated (rule 1), so the guest is told
  so and runs as on bare metal (:func:`kvm_settings`): ``-cpu host`` with
  ``migratable=off`` (the invariant TSC reaches the guest), ``host-phys-bits=on``
  (the planner checked that the host's width covers RAM and every BAR),
  ``kvm-hint-dedicated=on`` (native spinlocks, the haltpoll idle driver),
  ``host-cache-info=on`` when the guest's cores are whole host cores, and
  ``-overcommit cpu-pm=on`` (HLT and MWAIT stay in the guest) when KVM offers to
  keep HLT in the guest.  Each is left out, and said so, where QEMU or KVM lacks
  it.  No balloon device: a partition's memory is never taken back.
- Confined (rule 10, :class:`Jail`): QEMU is started as root under ``prlimit`` (the
  locked-memory limit the plan computed) and ``setpriv --no-new-privs``, sets itself up
  (opens its files, devices and sockets, locks its memory), then chroots into an
  empty directory and drops to the partition's uid and gid (``-chroot``/``-runas``, or
  ``-run-with``).  Its seccomp sandbox then leaves out ``elevateprivileges=deny``:
  QEMU installs the filter before it drops, and would be killed at its own setuid.
- A partition whose devices have large 64-bit BARs gets a 64-bit PCI window
  that holds them (``partitioner/planning/mmio.py`` sizes it); OVMF is told the same size,
  since it sizes its own aperture.
- A dynamic partition (rule 11, :func:`dynamic_memory`, ``Placement.max_vcpus``): ``-smp
  cpus=N,maxcpus=M`` and every slot on its guest node (``-numa cpu``); the fixed memory in
  the per-node backends above, and per node with room a virtio-mem device (``vmem{node}``,
  host node) over a backend of the same kind (``vmem-n{node}``) that reserves nothing
  (``reserve=off``: only what is plugged is taken, preallocated by the device); such a
  partition runs without ``mem-lock`` (QEMU refuses virtio-mem with it, docs/decisions.md).
  ``hotplug_slots`` spare root ports ``hp0..`` after the devices' ``rp{k}``, for devices
  attached live (``guest/live.py`` drives all of it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from partitioner.cpuset import CpuSet
from partitioner.errors import GuestError
from partitioner.guest.caps import QemuCaps
from partitioner.pci import PciAddress
from partitioner.planning.model import DeviceAssignment, Placement, Plan
from partitioner.units import GiB, KiB, MiB, virtio_mem_block

# Under TCG the translation cache is an anonymous mapping that mem-lock=on would lock and
# populate whole (1 GiB by default): a smaller cache keeps a test guest small.
TCG_TB_SIZE_MIB = 256  # planning.confine.TCG_TB_BYTES counts it in the locked-memory limit


@dataclass(frozen=True)
class Jail:
    """How a confined partition's QEMU is started (rule 10): its user and locked-memory limit."""

    uid: int
    gid: int
    memlock_bytes: int


SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# Under -runas: QEMU's own setgid/setuid come after the filter is installed.
SANDBOX_DROPPING = "on,obsolete=deny,spawn=deny,resourcecontrol=deny"


@dataclass(frozen=True)
class GuestPaths:
    """Where one partition's QEMU keeps its sockets and files."""

    dir: Path  # /run/partition/NAME, mode 0700, removed when the guest is gone
    qmp: Path
    console: Path
    console_log: Path  # in the log directory: it outlives the guest
    pidfile: Path
    output: Path  # QEMU's own stdout and stderr, kept to explain a failed start
    ovmf_vars: Path  # this partition's UEFI variable store (copied at first launch)

    @property
    def chroot(self) -> Path:
        """The empty directory a confined QEMU is chrooted into, root's, mode 0555."""
        return self.dir / "root"

    def to_json(self) -> dict[str, str]:
        return {
            "dir": str(self.dir),
            "qmp": str(self.qmp),
            "console": str(self.console),
            "console_log": str(self.console_log),
            "pidfile": str(self.pidfile),
            "output": str(self.output),
            "ovmf_vars": str(self.ovmf_vars),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> GuestPaths:
        d = Path(doc["dir"])
        return cls(
            dir=d,
            qmp=Path(doc["qmp"]),
            console=Path(doc["console"]),
            console_log=Path(doc["console_log"]),
            pidfile=Path(doc["pidfile"]),
            output=Path(doc.get("output") or d / "qemu.out"),
            ovmf_vars=Path(doc.get("ovmf_vars") or d / "OVMF_VARS.fd"),
        )


def guest_paths(
    run_dir: Path, log_dir: Path, name: str, *, state_dir: Path | None = None
) -> GuestPaths:
    """The paths of partition ``name``.  UEFI variables live under ``state_dir`` when given,
    so that boot entries survive a host reboot (the run directory is a tmpfs)."""
    d = Path(run_dir) / name
    vars_dir = Path(state_dir) / name if state_dir is not None else d
    return GuestPaths(
        dir=d,
        qmp=d / "qmp.sock",
        console=d / "console.sock",
        console_log=Path(log_dir) / f"{name}.console.log",
        pidfile=d / "qemu.pid",
        output=d / "qemu.out",
        ovmf_vars=vars_dir / "OVMF_VARS.fd",
    )


def qemu_argv(
    p: Placement, plan: Plan, paths: GuestPaths, caps: QemuCaps, jail: Jail | None = None
) -> list[str]:
    """The full argv that starts partition ``p`` paused: QEMU's binary first, or with a
    ``jail``, the wrappers that set its limits first (see :func:`jail_wrapper`)."""
    a: list[str] = [*(jail_wrapper(p.name, jail, caps) if jail else []), caps.binary]
    a += ["-name", f"{_esc(p.name)},debug-threads=on"]
    a += ["-no-user-config", "-nodefaults", "-display", "none", "-msg", "timestamp=on"]
    # mem-merge=off: no KSM on memory the partition owns; dump-guest-core=off: a QEMU crash
    # must not write the guest's whole memory into a core file.
    # Under KVM the full in-kernel irqchip (the default) is kept: split is only needed for
    # interrupt remapping by a guest-visible IOMMU, which partitions do not get.
    a += ["-machine", "q35,mem-merge=off,dump-guest-core=off"]
    if p.pci_hole64_bytes:
        a += ["-global", f"q35-pcihost.pci-hole64-size={_size(p.pci_hole64_bytes)}"]
        if p.spec.firmware == "uefi":
            mib = p.pci_hole64_bytes // MiB
            a += ["-fw_cfg", f"name=opt/ovmf/X-PciMmio64Mb,string={mib}"]
    kvm = kvm_settings(p, caps) if plan.accel == "kvm" else None
    if kvm is not None:
        a += ["-accel", "kvm", "-cpu", kvm.cpu]
    else:
        # thread=multi: one host thread per vCPU, so each can be pinned.  TCG's "max" model
        # says AuthenticAMD by default, and QEMU then warns that it cannot show SMT threads
        # (and the guest sees every thread as a core); as GenuineIntel it shows them.
        a += ["-accel", f"tcg,thread=multi,tb-size={TCG_TB_SIZE_MIB}"]
        a += ["-cpu", "max,vendor=GenuineIntel"]
    n, slots = len(p.cpus), p.max_vcpus
    topology = f"sockets={p.sockets},cores={p.cores},threads={p.threads}"
    if slots > n:
        a += ["-smp", f"cpus={n},{topology},maxcpus={slots}"]
    else:
        a += ["-smp", f"{n},{topology},maxcpus={n}"]
    vmem = dynamic_memory(p, caps)
    if vmem:
        fixed = sum(b for _, b in p.fixed_memory_per_node)
        most = fixed + sum(d.room for d in vmem)
        a += ["-m", f"size={_size(fixed)},slots={len(vmem)},maxmem={_size(most)}"]
    else:
        a += ["-m", _size(p.memory_bytes)]
    a += _memory(p, caps)
    # QEMU refuses virtio-mem with mem-lock ("Incompatible with mlock"): docs/decisions.md.
    lock = "mem-lock=off" if vmem else "mem-lock=on"
    a += ["-overcommit", ",".join([lock, *(kvm.overcommit if kvm else [])])]
    a += _firmware(p, paths, caps)
    a += _boot(p)
    a += _disks(p)
    # A function attached live goes back into the spare slot the record says it sits in.
    boot = tuple(d for d in p.devices if p.hotplug_slot(str(d.address)) is None)
    a += _devices(boot)
    a += _hotplug_ports(len(guest_ports(boot)), p)
    a += _virtio_mem(p, vmem, caps)
    a += ["-chardev", f"socket,id=qmp0,path={_esc(paths.qmp)},server=on,wait=off"]
    a += ["-mon", "chardev=qmp0,mode=control"]
    a += [
        "-chardev",
        f"socket,id=con0,path={_esc(paths.console)},server=on,wait=off,"
        f"logfile={_esc(paths.console_log)},logappend=on",
    ]
    a += ["-serial", "chardev:con0"]
    a += ["-pidfile", str(paths.pidfile)]
    if caps.sandbox:
        # resourcecontrol=deny stops QEMU from changing its own affinity and priorities: the
        # partitioner pins its threads from outside, and the thread-context that places the
        # preallocation threads is set up before the filter is installed.
        a += ["-sandbox", SANDBOX_DROPPING if jail else SANDBOX]
    if jail is not None:
        a += _jail_options(jail, paths, caps)
    a += ["-S"]
    return a


def jail_wrapper(name: str, jail: Jail, caps: QemuCaps) -> list[str]:
    """What runs before QEMU (each becomes the next program, same pid): ``prlimit`` sets the
    locked-memory limit, ``setpriv`` sets NoNewPrivs (kept across exec and the drop)."""
    if not caps.chroot or not caps.runas:
        raise GuestError(
            f"partition {name} is to run confined (host.confine) but QEMU {caps.version_text} "
            f"({caps.binary}) offers no way to {'chroot' if not caps.chroot else 'drop to a user'} "
            "after it has started (-chroot/-runas or -run-with): install a QEMU that does "
            "(every packaged QEMU since 2.x), or set host.confine: false to debug",
            partition=name,
        )
    n = str(jail.memlock_bytes)
    return ["prlimit", f"--memlock={n}:{n}", "--", "setpriv", "--no-new-privs", "--"]


def _jail_options(jail: Jail, paths: GuestPaths, caps: QemuCaps) -> list[str]:
    user = f"{jail.uid}:{jail.gid}"
    root = _esc(paths.chroot)
    if caps.chroot == "run-with" and caps.runas == "run-with":
        return ["-run-with", f"chroot={root},user={user}"]
    # -chroot takes its path whole (not QEMU's comma-separated options): no escaping.
    a = (
        ["-run-with", f"chroot={root}"]
        if caps.chroot == "run-with"
        else ["-chroot", str(paths.chroot)]
    )
    a += ["-run-with", f"user={user}"] if caps.runas == "run-with" else ["-runas", user]
    return a


@dataclass(frozen=True)
class KvmSettings:
    cpu: str  # the -cpu value
    overcommit: tuple[str, ...]  # added to -overcommit mem-lock=on
    left_out: tuple[str, ...]  # each dedicated-CPU setting not given, and why


def kvm_settings(p: Placement, caps: QemuCaps) -> KvmSettings:
    """The dedicated-CPU settings of ``p`` under KVM, from what QEMU and KVM offer."""
    cpu = ["host"]
    left: list[str] = []
    qemu = f"QEMU {caps.version_text}"
    wanted = (
        ("migratable", "off", "the invariant TSC (invtsc) stays hidden from the guest"),
        ("host-phys-bits", "on", "the guest keeps QEMU's default physical address width"),
        ("kvm-hint-dedicated", "on", "the guest keeps paravirtual spinlocks"),
    )
    for prop, value, cost in wanted:
        if prop in caps.cpu_props:
            cpu.append(f"{prop}={value}")
        else:
            left.append(f"{prop}={value} left out: {qemu} has no such CPU property; {cost}")
    if p.host_cache_info:
        if "host-cache-info" in caps.cpu_props:
            cpu.append("host-cache-info=on")
        else:
            left.append(f"host-cache-info=on left out: {qemu} has no such CPU property")
    overcommit: list[str] = []
    k = caps.kvm
    if not caps.cpu_pm:
        left.append(f"cpu-pm=on left out: {qemu} has no -overcommit cpu-pm")
    elif k is None:
        left.append("cpu-pm=on left out: the host's KVM was not asked")
    elif not k.available:
        left.append(f"cpu-pm=on left out: KVM cannot be asked ({k.error})")
    elif not k.can_keep_hlt:
        offered = ", ".join(k.exit_names) or "none"
        left.append(
            "cpu-pm=on left out: this kernel's KVM does not let a guest keep HLT "
            f"(KVM_CAP_X86_DISABLE_EXITS offers: {offered}); the guest's idle CPUs exit to "
            "the host (kernels before 4.16, or kvm.mitigate_smt_rsb=1 on an SMT host)"
        )
    else:
        overcommit.append("cpu-pm=on")
    return KvmSettings(cpu=",".join(cpu), overcommit=tuple(overcommit), left_out=tuple(left))


def guest_cpus_by_node(p: Placement) -> list[tuple[int, list[int]]]:
    """(host node, guest vCPU indices on it) for each node of ``p.memory_per_node``, in order."""
    nodes = [node for node, _ in p.memory_per_node]
    if p.cpu_nodes and len(p.cpu_nodes) == len(p.cpus):
        per = {node: [i for i, cn in enumerate(p.cpu_nodes) if cn == node] for node in nodes}
    else:
        # Without per-CPU nodes the planner placed all CPUs on one node: its first.
        per = {node: [] for node in nodes}
        if nodes:
            per[nodes[0]] = list(range(len(p.cpus)))
    return [(node, per[node]) for node in nodes]


def guest_nodes(p: Placement) -> dict[int, int]:
    """Host node -> the guest's NUMA node id for it (its place in ``p.memory_per_node``)."""
    return {node: i for i, (node, _) in enumerate(p.memory_per_node)}


def slot_topology(p: Placement, index: int) -> tuple[int, int, int]:
    """(socket-id, core-id, thread-id) of vCPU slot ``index``: QEMU numbers the slots of
    ``-smp sockets=S,cores=C,threads=T`` thread first, then core, then socket."""
    return index // (p.cores * p.threads), (index // p.threads) % p.cores, index % p.threads


def slot_guest_node(p: Placement, index: int) -> int:
    """The guest NUMA node of vCPU slot ``index``: its host node's (``slot_nodes``, else the
    host node of the CPU it runs on now, else the first node)."""
    nodes = guest_nodes(p)
    if p.slot_nodes:
        host = p.slot_nodes[index]
    elif p.cpu_nodes and index < len(p.cpu_nodes):
        host = p.cpu_nodes[index]
    else:
        return 0
    if host not in nodes:
        raise GuestError(
            f"partition {p.name}: vCPU slot {index} is planned on host node {host}, where the "
            f"partition has no memory (nodes {sorted(nodes)}): plan it again",
            partition=p.name,
        )
    return nodes[host]


@dataclass(frozen=True)
class VirtioMem:
    """One virtio-mem device of a dynamic partition: on host ``node``, guest node ``guest_node``,
    ``room`` bytes at most, ``plugged`` of them plugged at start, in blocks of ``block``."""

    node: int
    guest_node: int
    room: int
    plugged: int
    block: int

    @property
    def device_id(self) -> str:
        return f"vmem{self.node}"

    @property
    def backend_id(self) -> str:
        return f"vmem-n{self.node}"


def dynamic_memory(p: Placement, caps: QemuCaps | None = None) -> list[VirtioMem]:
    """The virtio-mem devices of ``p``, one per node with dynamic room; [] for a partition
    whose memory is static.  Refuses a placement virtio-mem cannot hold, or a QEMU (``caps``)
    without virtio-mem, naming what to do."""
    room = dict(p.dynamic_room_per_node)
    if not any(room.values()):
        return []
    if caps is not None and not caps.virtio_mem:
        raise GuestError(
            f"partition {p.name} has dynamic memory (min_memory < max_memory) but QEMU "
            f"{caps.version_text} ({caps.binary}) has no virtio-mem-pci device: install a QEMU "
            "built with it (5.1 or newer, every distribution's x86 build), or give the "
            "partition min_memory = max_memory",
            partition=p.name,
        )
    block = virtio_mem_block(p.hugepage_bytes)
    plugged = dict(p.plugged_per_node)
    nodes = guest_nodes(p)
    out: list[VirtioMem] = []
    for node, fixed in p.fixed_memory_per_node:
        r, now = room.get(node, 0), plugged.get(node, 0)
        if fixed <= 0:
            raise GuestError(
                f"partition {p.name}: node {node} has no fixed memory (min_memory's share is "
                "0): QEMU needs some fixed memory on every guest node; plan it again",
                partition=p.name,
            )
        if r % block or now % block or not 0 <= now <= r:
            raise GuestError(
                f"partition {p.name}: node {node}'s dynamic memory ({now} of {r} bytes plugged) "
                f"is not whole virtio-mem blocks of {_size(block)} within the room: plan it again",
                partition=p.name,
            )
        if r:
            out.append(VirtioMem(node, nodes[node], r, now, block))
    return out


def _backend(p: Placement, caps: QemuCaps, ident: str, size: int) -> tuple[str, list[str]]:
    """The kind and first options of a memory backend of ``p``'s page size."""
    opts = [f"id={ident}", f"size={_size(size)}"]
    if p.hugepage_bytes is None:
        kind = "memory-backend-ram"
    elif caps.memfd:
        kind = "memory-backend-memfd"
        opts += ["hugetlb=on", f"hugetlbsize={_size(p.hugepage_bytes)}"]
    else:
        kind = "memory-backend-file"
        # The mount points libvirt and systemd use for each page size.
        mount = "/dev/hugepages" if p.hugepage_bytes < GiB else "/dev/hugepages1G"
        opts += [f"mem-path={mount}"]
    return kind, opts


def _memory(p: Placement, caps: QemuCaps) -> list[str]:
    a: list[str] = []
    fixed = dict(p.fixed_memory_per_node)
    per_slot = p.max_vcpus > len(p.cpus)
    for i, (node, vcpus) in enumerate(guest_cpus_by_node(p)):
        # A memory-only node is preallocated from all the partition's CPUs (remote, but
        # still nobody else's); policy=bind puts the pages on the node all the same.
        host_cpus = CpuSet(p.cpus[v] for v in vcpus) if vcpus else CpuSet(p.cpus)
        threads = max(1, len(host_cpus))
        kind, opts = _backend(p, caps, f"mem{i}", fixed[node])
        opts += [f"host-nodes={node}", "policy=bind", "prealloc=on", f"prealloc-threads={threads}"]
        if caps.thread_context:
            affinity = ",".join(f"cpu-affinity={r}" for r in str(host_cpus).split(","))
            a += ["-object", f"thread-context,id=tc{i},{affinity}"]
            opts += [f"prealloc-context=tc{i}"]
        a += ["-object", f"{kind}," + ",".join(opts)]
        numa = f"node,nodeid={i},memdev=mem{i}"
        if vcpus and not per_slot:
            numa += "," + ",".join(f"cpus={r}" for r in str(CpuSet(vcpus)).split(","))
        a += ["-numa", numa]
    if per_slot:
        # Every slot, present or not, on its node: QEMU wants all of them placed.
        if p.sockets * p.cores * p.threads != p.max_vcpus:
            raise GuestError(
                f"partition {p.name}: guest topology {p.sockets} sockets x {p.cores} cores x "
                f"{p.threads} threads is not its {p.max_vcpus} vCPU slots: plan it again",
                partition=p.name,
            )
        for index in range(p.max_vcpus):
            socket, core, thread = slot_topology(p, index)
            a += [
                "-numa",
                f"cpu,node-id={slot_guest_node(p, index)},socket-id={socket},"
                f"core-id={core},thread-id={thread}",
            ]
    return a


def _virtio_mem(p: Placement, vmem: list[VirtioMem], caps: QemuCaps) -> list[str]:
    """Per node with room: a backend bound to the node that reserves nothing (only what the
    device plugs is taken from the pool, preallocated by the device as it plugs), and the
    device plugged up to ``plugged`` at start."""
    a: list[str] = []
    for d in vmem:
        kind, opts = _backend(p, caps, d.backend_id, d.room)
        opts += ["reserve=off", f"host-nodes={d.node}", "policy=bind"]
        a += ["-object", f"{kind}," + ",".join(opts)]
        dev = [
            f"id={d.device_id}",
            f"memdev={d.backend_id}",
            f"node={d.guest_node}",
            f"requested-size={_size(d.plugged)}",
            f"block-size={_size(d.block)}",
        ]
        if caps.virtio_mem_prealloc:
            dev.append("prealloc=on")
        a += ["-device", "virtio-mem-pci," + ",".join(dev)]
    return a


def _firmware(p: Placement, paths: GuestPaths, caps: QemuCaps) -> list[str]:
    if p.spec.firmware != "uefi":
        return []  # SeaBIOS, QEMU's default
    if caps.ovmf_code is None:
        raise GuestError(
            f"partition {p.name} wants firmware: uefi but no OVMF firmware is installed: "
            "install it with `apt-get install ovmf` (Debian, Ubuntu) or `dnf install edk2-ovmf`",
            partition=p.name,
        )
    return [
        "-drive",
        f"if=pflash,format=raw,unit=0,readonly=on,file={_esc(caps.ovmf_code)}",
        "-drive",
        f"if=pflash,format=raw,unit=1,file={_esc(paths.ovmf_vars)}",
    ]


def _boot(p: Placement) -> list[str]:
    boot = p.spec.boot
    if boot is None:
        return []
    a = ["-kernel", boot.kernel]
    if boot.initrd:
        a += ["-initrd", boot.initrd]
    if boot.cmdline:
        a += ["-append", boot.cmdline]
    return a


def disk_format(path: str) -> str:
    """``qcow2`` for ``*.qcow2`` files, ``raw`` for everything else (see the module docstring)."""
    return "qcow2" if path.lower().endswith(".qcow2") else "raw"


def _disks(p: Placement) -> list[str]:
    a: list[str] = []
    for i, disk in enumerate(p.spec.disks):
        drive = [
            f"file={_esc(disk.path)}",
            "if=none",
            f"id=disk{i}",
            f"format={disk_format(disk.path)}",
        ]
        if disk.path.startswith("/dev/"):
            drive += ["cache=none", "aio=native"]
        if disk.readonly:
            drive += ["readonly=on"]
        dev = [f"drive=disk{i}", f"iothread=io{i}", f"id=vd{i}"]
        if i == 0 and p.spec.boot is None:
            dev += ["bootindex=1"]
        a += ["-object", f"iothread,id=io{i}"]
        a += ["-drive", ",".join(drive)]
        a += ["-device", "virtio-blk-pci," + ",".join(dev)]
    return a


def guest_ports(devices: tuple[DeviceAssignment, ...]) -> list[list[tuple[DeviceAssignment, int]]]:
    """The guest's root ports, each with its functions and their guest function numbers: a
    host slot with function 0 stays together behind one port (a GPU and its audio function);
    any other function gets a port of its own (without function 0 the guest would not probe
    the slot).  The libvirt export lays devices out the same way."""
    slots: dict[tuple[int, int, int], list[DeviceAssignment]] = {}
    for d in sorted(devices, key=lambda d: d.address):
        slots.setdefault(d.address.slot_key, []).append(d)
    ports: list[list[tuple[DeviceAssignment, int]]] = []
    for functions in slots.values():
        if functions[0].address.function == 0:
            ports.append([(d, d.address.function) for d in functions])
        else:
            ports.extend([(d, 0)] for d in functions)
    return ports


def hostdev_numbers(ports: list[list[tuple[DeviceAssignment, int]]]) -> dict[PciAddress, int]:
    """Each device's number N in ``id=hostdevN``: its place in the guest's ports, in order (the
    libvirt export names the same devices by it)."""
    return {d.address: n for n, (d, _) in enumerate(m for members in ports for m in members)}


def _devices(devices: tuple[DeviceAssignment, ...]) -> list[str]:
    ports = guest_ports(devices)
    number = hostdev_numbers(ports)
    a: list[str] = []
    for k, members in enumerate(ports):
        a += ["-device", f"pcie-root-port,id=rp{k},chassis={k + 1},port={k + 16:#x}"]
        multi = len(members) > 1
        for d, fn in members:
            opts = [
                f"host={d.address}",
                f"id=hostdev{number[d.address]}",
                f"bus=rp{k}",
                f"addr=0.{fn}",
            ]
            if multi and fn == 0:
                opts.append("multifunction=on")
            a += ["-device", "vfio-pci," + ",".join(opts + _rom_and_display(d))]
    return a


def _rom_and_display(d: DeviceAssignment) -> list[str]:
    opts: list[str] = []
    if d.rom == "off":
        opts.append("rombar=0")  # no ROM BAR: no PXE or video BIOS runs in the guest
    elif d.rom:
        opts.append(f"romfile={_esc(d.rom)}")
    if d.primary_display:
        opts.append("x-vga=on")  # the legacy VGA ranges go to this GPU (SeaBIOS)
    return opts


def hotplug_port_ids(p: Placement) -> list[str]:
    """The ids of ``p``'s spare root ports, for devices attached live: ``hp0``, ``hp1``..."""
    return [f"hp{j}" for j in range(p.hotplug_slots)]


def _hotplug_ports(first: int, p: Placement) -> list[str]:
    """The spare root ports numbered after the ``first`` ones the devices took, so that every
    chassis and port number stays unique; a function the record says was attached live into
    ``hp{j}`` (a restart after a live change) is put back there, as ``hotdev{j}``."""
    by_address = {str(d.address): d for d in p.devices}
    a: list[str] = []
    for j in range(p.hotplug_slots):
        k = first + j
        a += ["-device", f"pcie-root-port,id=hp{j},chassis={k + 1},port={k + 16:#x}"]
        d = by_address.get(p.hotplugged[j]) if j < len(p.hotplugged) else None
        if d is not None:
            opts = [f"host={d.address}", f"id={hotplug_device_id(j)}", f"bus=hp{j}"]
            a += ["-device", "vfio-pci," + ",".join(opts + _rom_and_display(d))]
    return a


def hotplug_device_id(slot: int) -> str:
    """The QEMU device id of the function attached live into spare slot ``hp{slot}``."""
    return f"hotdev{slot}"


def _size(n: int) -> str:
    """A size QEMU reads exactly: the largest of G, M, K that divides it, else bytes."""
    if n == 0:
        return "0"
    for unit, suffix in ((GiB, "G"), (MiB, "M"), (KiB, "K")):
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    return f"{n}B"


def _esc(value: object) -> str:
    """QEMU option values escape a comma by doubling it."""
    return str(value).replace(",", ",,")


NO_ARGV = "no QEMU command line"


def command_lines(
    plan: Plan,
    run_dir: Path,
    log_dir: Path,
    state_dir: Path,
    *,
    live: bool,
    binary: str = "qemu-system-x86_64",
) -> tuple[dict[str, list[str] | None], dict[str, list[str]]]:
    """Each partition's QEMU command line as ``apply`` would start it, and per partition the
    dedicated-CPU settings left out and why (``partition plan --qemu``, ``qemu_argv``).

    ``live=False`` (``--host-root``): this machine's KVM is not the tree's host's, so it is
    not asked, and the command lines say so by leaving ``cpu-pm`` out."""
    from dataclasses import replace

    from partitioner.guest.caps import probe_qemu

    argvs: dict[str, list[str] | None] = {}
    notes: dict[str, list[str]] = {name: [] for name in plan.placements}
    try:
        caps = probe_qemu(binary)
    except GuestError as e:
        for name in plan.placements:
            argvs[name] = None
            notes[name].append(f"{NO_ARGV}: {e}")
        return argvs, notes
    missing_firmware = None
    if not live:
        caps = replace(caps, kvm=None)
        if caps.ovmf_code is None:
            # The firmware is the tree's machine's to have, not this one's: the command line
            # names the usual path, and a note says it was not found here.
            from partitioner.guest.caps import OVMF_CANDIDATES

            code, vars_ = OVMF_CANDIDATES[0]
            caps = replace(caps, ovmf_code=code, ovmf_vars=vars_)
            missing_firmware = (
                f"the UEFI firmware is not installed on this machine: the command line names "
                f"{code}, where Debian's ovmf package puts it; install it on the machine of "
                "--host-root (`apt-get install ovmf`, or `dnf install edk2-ovmf`)"
            )
    for name, p in plan.placements.items():
        if missing_firmware is not None and p.spec.firmware == "uefi":
            notes[name].append(missing_firmware)
        paths = guest_paths(run_dir, log_dir, name, state_dir=state_dir)
        try:
            argvs[name] = qemu_argv(p, plan, paths, caps)
        except GuestError as e:
            argvs[name] = None
            notes[name].append(f"{NO_ARGV}: {e}")
            continue
        if plan.accel == "kvm":
            notes[name] += kvm_settings(p, caps).left_out
    return argvs, notes
