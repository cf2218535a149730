"""The emulated server's shape, as YAML and as frozen values, and the QEMU argv that builds it.

A topology file looks like this (``presets/numa.yaml`` is a full one)::

    name: numa
    cpu: {model: Nehalem, sockets: 2, cores: 2, threads: 2}
    nodes:                        # sockets are shared out evenly among nodes
      - {memory: 1GiB, hugepages_2m: 64}
      - {memory: 1GiB, hugepages_2m: 64}
    ports:                        # PCIe root ports; each holds exactly one of:
      - functions: [e1000e]       #   the functions of one slot (2+ = multi-function)
      - bridge: [e1000, e1000]    #   a PCIe-to-PCI bridge with conventional devices
      - node: 1                   #   (a port with a node sits on a pxb-pcie of that node)
        switch:                   #   a switch: one downstream port per entry
          - functions: [e1000e]
          - functions: [nvme]

:func:`qemu_args` is pure: the same topology and paths give the same argv.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from partitioner.cpuset import CpuSet
from partitioner.errors import PartitionError
from partitioner.units import MiB, SizeSyntaxError, format_size, parse_size
from partitioner.userfiles import read_named

PRESETS_DIR = Path(__file__).parent / "presets"

# QEMU device model -> (vendor:device the guest sees, is it PCI Express).  Conventional
# devices only go behind a bridge; PCIe ones only on a root or downstream port.
MODELS: Mapping[str, tuple[str, bool]] = {
    "e1000e": ("8086:10d3", True),
    "nvme": ("1b36:0010", True),
    "secondary-vga": ("1234:1111", True),
    "ich9-intel-hda": ("8086:293e", True),
    "e1000": ("8086:100e", False),
    # An 82576 with SR-IOV (QEMU 8.0 and later): its VFs are 8086:10ca.
    "igb": ("8086:10c9", True),
}
# Models whose function is an SR-IOV physical function: the VFs its sriov_totalvfs offers.
SRIOV_MODELS: Mapping[str, int] = {"igb": 8}

# pcie.0 slots: 00.0 is the host bridge and 1f the ICH9 functions.  Root ports and
# expander bridges take slots from 2 up; the 9p shares sit at fixed high slots so
# that adding a share never moves a topology device.
FIRST_ROOT_SLOT = 0x02
SHARE_SLOTS = (0x18, 0x19, 0x1A, 0x1B, 0x1C)
# Bus numbers of the pxb-pcie expander bridges: node K's bridge starts bus 0x40*(K+1),
# leaving room below each for the buses of the ports before it.
PXB_BUS_STRIDE = 0x40


# A topology is a few lines; anything much larger is not one.
MAX_TOPOLOGY_BYTES = 64 * 1024


class TopologyError(PartitionError):
    """A topology file that cannot be used; ``problems`` says every reason, ``source`` the file."""

    exit_code = 2

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(f"{source}: " + f"\n{source}: ".join(self.problems))


@dataclass(frozen=True)
class CpuTopology:
    model: str
    sockets: int
    cores: int
    threads: int

    @property
    def vcpus(self) -> int:
        return self.sockets * self.cores * self.threads


@dataclass(frozen=True)
class Node:
    id: int
    memory_bytes: int
    hugepages_2m: int
    cpus: CpuSet  # derived: the CPUs of this node's sockets, in QEMU's (and Linux's) numbering


@dataclass(frozen=True)
class Slot:
    """The functions of one device slot: function N is ``models[N]``."""

    models: tuple[str, ...]

    @property
    def multifunction(self) -> bool:
        return len(self.models) > 1


@dataclass(frozen=True)
class RootPort:
    """A PCIe root port and what it holds: exactly one of ``slot``, ``switch``, ``bridge``."""

    node: int | None  # None: on the main root complex (pcie.0); K: on node K's pxb-pcie
    slot: Slot | None = None
    switch: tuple[Slot, ...] = ()  # one downstream port per entry
    bridge: tuple[str, ...] = ()  # conventional device models, at slots 1, 2, ... behind it

    @property
    def kind(self) -> str:
        return "switch" if self.switch else "bridge" if self.bridge else "slot"


@dataclass(frozen=True)
class Topology:
    name: str
    cpu: CpuTopology
    nodes: tuple[Node, ...]
    ports: tuple[RootPort, ...]

    @property
    def memory_bytes(self) -> int:
        return sum(n.memory_bytes for n in self.nodes)

    def models(self) -> frozenset[str]:
        """Every device model the topology puts in a slot or behind a bridge."""
        out: set[str] = set()
        for p in self.ports:
            if p.slot is not None:
                out.update(p.slot.models)
            out.update(p.bridge)
            for s in p.switch:
                out.update(s.models)
        return frozenset(out)

    @property
    def has_sriov(self) -> bool:
        """Whether a function of the topology is an SR-IOV physical function (``igb``)."""
        return bool(self.models() & SRIOV_MODELS.keys())

    def qemu_devices(self) -> frozenset[str]:
        """The ``-device`` models :func:`qemu_args` uses for this topology: a QEMU that
        lists all of them (``-device help``) can boot it."""
        out = set(self.models()) | {"intel-iommu", "pcie-root-port", "virtio-9p-pci"}
        if any(p.node is not None for p in self.ports):
            out.add("pxb-pcie")
        if any(p.bridge for p in self.ports):
            out.add("pcie-pci-bridge")
        if any(p.switch for p in self.ports):
            out |= {"x3130-upstream", "xio3130-downstream"}
        return frozenset(out)

    def describe(self) -> str:
        """``numa: 8 vCPUs, 2 nodes``: the words the progress message uses."""
        n = len(self.nodes)
        return f"{self.name}: {self.cpu.vcpus} vCPUs, {n} node{'s' if n != 1 else ''}"


@dataclass(frozen=True)
class Share:
    """A host directory exported over 9p, found inside by its mount tag."""

    tag: str
    path: str
    readonly: bool


# -- parsing -------------------------------------------------------------------


def parse_topology(doc: object, source: str = "<topology>") -> Topology:
    """Check a loaded YAML document and build the Topology; every problem is reported at once."""
    problems: list[str] = []
    if not isinstance(doc, dict):
        raise TopologyError(source, ["the file must be a mapping with cpu, nodes and ports"])
    _unknown_keys(doc, {"name", "cpu", "nodes", "ports"}, "", problems)

    default_name = Path(source).stem if not source.startswith("<") else "custom"
    name = doc.get("name", default_name)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        problems.append(f"name: {name!r} is not a simple name (letters, digits, . _ -)")
        name = "topology"

    cpu = _parse_cpu(doc.get("cpu"), problems)
    node_docs = doc.get("nodes", [{"memory": "512MiB"}])
    nodes_raw: list[tuple[int, int]] = []
    if not isinstance(node_docs, list) or not node_docs:
        problems.append("nodes: must be a non-empty list of {memory, hugepages_2m}")
    else:
        for i, nd in enumerate(node_docs):
            nodes_raw.append(_parse_node(nd, f"nodes[{i}]", problems))
    n_nodes = max(len(nodes_raw), 1)
    if cpu is not None and cpu.sockets % n_nodes:
        problems.append(
            f"nodes: {len(nodes_raw)} nodes cannot share {cpu.sockets} sockets evenly "
            "(each node gets whole sockets)"
        )
    nodes: list[Node] = []
    if cpu is not None and not cpu.sockets % n_nodes:
        per_node = cpu.vcpus // n_nodes
        for i, (mem, huge) in enumerate(nodes_raw):
            nodes.append(Node(i, mem, huge, CpuSet(range(i * per_node, (i + 1) * per_node))))

    ports: list[RootPort] = []
    port_docs = doc.get("ports", [])
    if not isinstance(port_docs, list):
        problems.append("ports: must be a list of root ports")
        port_docs = []
    for i, pd in enumerate(port_docs):
        port = _parse_port(pd, f"ports[{i}]", len(nodes_raw), problems)
        if port is not None:
            ports.append(port)
    if len(_root_ports_on(None, ports)) + len(_pxb_nodes(ports)) > SHARE_SLOTS[0] - FIRST_ROOT_SLOT:
        problems.append("ports: too many root ports on the main root complex")

    if problems or cpu is None:
        raise TopologyError(source, problems)
    return Topology(name=name, cpu=cpu, nodes=tuple(nodes), ports=tuple(ports))


def _unknown_keys(d: Mapping[Any, Any], known: set[str], where: str, problems: list[str]) -> None:
    for k in d:
        if k not in known:
            prefix = f"{where}: " if where else ""
            problems.append(f"{prefix}unknown key {k!r} (known: {', '.join(sorted(known))})")


def _positive_int(v: object, where: str, problems: list[str], *, zero_ok: bool = False) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero_ok else 1):
        problems.append(
            f"{where}: {v!r} is not a {'non-negative' if zero_ok else 'positive'} integer"
        )
        return 0 if zero_ok else 1
    return v


def _parse_cpu(d: object, problems: list[str]) -> CpuTopology | None:
    if d is None:
        d = {}
    if not isinstance(d, dict):
        problems.append("cpu: must be a mapping {model, sockets, cores, threads}")
        return None
    _unknown_keys(d, {"model", "sockets", "cores", "threads"}, "cpu", problems)
    model = d.get("model", "Nehalem")
    if not isinstance(model, str) or not re.fullmatch(r"[A-Za-z0-9_.+-]+", model):
        problems.append(f"cpu.model: {model!r} is not a QEMU CPU model name")
        model = "Nehalem"
    return CpuTopology(
        model=model,
        sockets=_positive_int(d.get("sockets", 1), "cpu.sockets", problems),
        cores=_positive_int(d.get("cores", 1), "cpu.cores", problems),
        threads=_positive_int(d.get("threads", 1), "cpu.threads", problems),
    )


def _parse_node(d: object, where: str, problems: list[str]) -> tuple[int, int]:
    if not isinstance(d, dict):
        problems.append(f"{where}: must be a mapping {{memory, hugepages_2m}}")
        return (0, 0)
    _unknown_keys(d, {"memory", "hugepages_2m"}, where, problems)
    mem_text = d.get("memory")
    mem = 0
    if not isinstance(mem_text, str):
        problems.append(f"{where}.memory: give a size with a binary unit, e.g. 512MiB")
    else:
        try:
            mem = parse_size(mem_text)
        except SizeSyntaxError as e:
            problems.append(f"{where}.memory: {e}")
        if mem and (mem < 128 * MiB or mem % MiB):
            problems.append(f"{where}.memory: {mem_text} is not a whole number of MiB >= 128MiB")
    huge = _positive_int(d.get("hugepages_2m", 0), f"{where}.hugepages_2m", problems, zero_ok=True)
    if mem and huge * 2 * MiB > mem // 2:
        problems.append(
            f"{where}.hugepages_2m: {huge} pages of 2MiB take more than half of the node's {mem_text}"
        )
    return (mem, huge)


def _parse_models(v: object, where: str, pcie: bool, problems: list[str]) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(m, str) for m in v):
        problems.append(f"{where}: must be a non-empty list of device models")
        return ()
    if len(v) > 8:
        problems.append(f"{where}: a slot has at most 8 functions, not {len(v)}")
    for m in v:
        if m not in MODELS:
            problems.append(f"{where}: unknown device model {m!r} (known: {', '.join(MODELS)})")
        elif MODELS[m][1] != pcie:
            kind = "on a PCIe port" if pcie else "behind a bridge"
            problems.append(
                f"{where}: {m} is {'a conventional PCI' if not MODELS[m][1] else 'a PCIe'} "
                f"device and cannot go {kind}"
            )
    return tuple(v)


def _parse_port(d: object, where: str, n_nodes: int, problems: list[str]) -> RootPort | None:
    if not isinstance(d, dict):
        problems.append(f"{where}: must be a mapping with one of functions, switch, bridge")
        return None
    _unknown_keys(d, {"node", "functions", "switch", "bridge"}, where, problems)
    node = d.get("node")
    if node is not None and (
        isinstance(node, bool) or not isinstance(node, int) or not 0 <= node < n_nodes
    ):
        problems.append(f"{where}.node: {node!r} is not one of the {n_nodes} nodes")
        node = None
    held = [k for k in ("functions", "switch", "bridge") if k in d]
    if len(held) != 1:
        problems.append(
            f"{where}: a root port holds exactly one of functions, switch, bridge (got {held or 'none'})"
        )
        return None
    if held[0] == "functions":
        return RootPort(node, slot=Slot(_parse_models(d["functions"], where, True, problems)))
    if held[0] == "bridge":
        models = _parse_models(d["bridge"], f"{where}.bridge", False, problems)
        if len(models) > 30:
            problems.append(f"{where}.bridge: at most 30 devices behind a bridge")
        return RootPort(node, bridge=models)
    downs = d["switch"]
    if not isinstance(downs, list) or not downs:
        problems.append(f"{where}.switch: must be a non-empty list of downstream ports")
        return None
    slots: list[Slot] = []
    for j, dd in enumerate(downs):
        w = f"{where}.switch[{j}]"
        if not isinstance(dd, dict) or set(dd) != {"functions"}:
            problems.append(f"{w}: a downstream port is a mapping with only functions")
            continue
        slots.append(Slot(_parse_models(dd["functions"], w, True, problems)))
    return RootPort(node, switch=tuple(slots))


def _root_ports_on(node: int | None, ports: Sequence[RootPort]) -> list[int]:
    return [i for i, p in enumerate(ports) if p.node == node]


def _pxb_nodes(ports: Sequence[RootPort]) -> list[int]:
    return sorted({p.node for p in ports if p.node is not None})


def load_topology(preset_or_path: str) -> Topology:
    """A preset name (``small``, ``numa``) or the path of a topology YAML file."""
    path = Path(preset_or_path)
    if "/" not in preset_or_path and not preset_or_path.endswith((".yaml", ".yml")):
        path = PRESETS_DIR / f"{preset_or_path}.yaml"
        if not path.exists():
            raise TopologyError(
                preset_or_path,
                [
                    f"no such preset (presets: {', '.join(preset_names())}); or give a YAML file path"
                ],
            )
    try:
        data = read_named(path, MAX_TOPOLOGY_BYTES + 1)
    except OSError as e:
        raise TopologyError(str(path), [f"cannot read: {e.strerror}"]) from e
    if len(data) > MAX_TOPOLOGY_BYTES:
        raise TopologyError(
            str(path), [f"larger than {MAX_TOPOLOGY_BYTES // 1024}KiB: is this the right file?"]
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TopologyError(str(path), [f"not UTF-8 text (byte {e.start})"]) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TopologyError(str(path), [f"not valid YAML: {e}"]) from e
    except RecursionError:
        raise TopologyError(str(path), ["nested too deeply to be a topology"]) from None
    return parse_topology(doc, str(path))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


# -- the QEMU command line -------------------------------------------------------


def kernel_cmdline(topo: Topology, extra: Sequence[str] = ()) -> str:
    """Kernel arguments: the console on ttyS0, the IOMMU on, hugepages reserved per node."""
    args = [
        "console=ttyS0",
        # panic=-1 with QEMU's -no-reboot turns a kernel panic into QEMU exiting.
        "panic=-1",
        "intel_iommu=on",
        "iommu=pt",
        # TCG gains nothing from speculation mitigations, and they cost boot time.
        "mitigations=off",
        # The IO-APIC timer check fails at random when TCG vCPUs are starved of host
        # CPU ("timer doesn't work through Interrupt-remapped IO-APIC", a panic).
        "no_timer_check",
        "rdinit=/init",
    ]
    if any(n.hugepages_2m for n in topo.nodes):
        pools = ",".join(f"{n.id}:{n.hugepages_2m}" for n in topo.nodes)
        args += ["hugepagesz=2M", f"hugepages={pools}"]
    return " ".join([*args, *extra])


def _mem_arg(n: int) -> str:
    return format_size(n).replace("iB", "")  # QEMU's suffixes: 512M, 1G


def qemu_args(
    topo: Topology,
    *,
    kernel: str,
    initrd: str,
    cmdline: str,
    console_log: str,
    shares: Sequence[Share] = (),
    output: str = "stdio",
    qemu: str = "qemu-system-x86_64",
) -> list[str]:
    """The whole argv of the emulated server.

    The kernel's console (ttyS0) goes to ``console_log``; ttyS1 is the command's
    output, on the chardev ``output`` (``stdio``: QEMU's stdout).  ``-nodefaults``
    keeps QEMU from adding devices (a NIC, a VGA) that would change the PCI tree.
    """
    c = topo.cpu
    argv = [
        qemu,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-machine",
        "q35,kernel-irqchip=split",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        c.model,
        "-smp",
        f"{c.vcpus},sockets={c.sockets},cores={c.cores},threads={c.threads}",
        "-m",
        _mem_arg(topo.memory_bytes),
    ]
    for n in topo.nodes:
        argv += [
            "-object",
            f"memory-backend-ram,id=mem{n.id},size={_mem_arg(n.memory_bytes)}",
            "-numa",
            f"node,nodeid={n.id},cpus={n.cpus.as_list()[0]}-{n.cpus.as_list()[-1]},memdev=mem{n.id}",
        ]
    # The IOMMU first: it must exist before the PCI devices it translates for.
    argv += ["-device", "intel-iommu,intremap=on,caching-mode=on"]
    argv += ["-kernel", kernel, "-initrd", initrd, "-append", cmdline]
    argv += ["-serial", f"file:{console_log}", "-serial", output]

    slot = FIRST_ROOT_SLOT
    chassis = 0
    pxb_slot: dict[int, int] = {}
    for k in _pxb_nodes(topo.ports):
        argv += [
            "-device",
            f"pxb-pcie,id=pxb{k},bus_nr={PXB_BUS_STRIDE * (k + 1):#x},numa_node={k},"
            f"bus=pcie.0,addr={slot:#x}",
        ]
        pxb_slot[k] = 0
        slot += 1
    for i, port in enumerate(topo.ports):
        chassis += 1
        if port.node is None:
            bus, addr = "pcie.0", slot
            slot += 1
        else:
            bus, addr = f"pxb{port.node}", pxb_slot[port.node]
            pxb_slot[port.node] += 1
        rp = f"rp{i}"
        argv += [
            "-device",
            f"pcie-root-port,id={rp},bus={bus},addr={addr:#x},chassis={chassis},slot={chassis}",
        ]
        if port.slot is not None:
            argv += _slot_devices(port.slot, rp, f"d{i}")
        elif port.bridge:
            br = f"br{i}"
            argv += ["-device", f"pcie-pci-bridge,id={br},bus={rp},addr=0x0"]
            for j, model in enumerate(port.bridge):
                argv += ["-device", f"{model},id={br}s{j + 1},bus={br},addr={j + 1:#x}"]
        else:
            up = f"sw{i}"
            argv += ["-device", f"x3130-upstream,id={up},bus={rp},addr=0x0"]
            for j, down in enumerate(port.switch):
                chassis += 1
                dp = f"sw{i}p{j}"
                argv += [
                    "-device",
                    f"xio3130-downstream,id={dp},bus={up},addr={j:#x},chassis={chassis},slot={chassis}",
                ]
                argv += _slot_devices(down, dp, f"d{i}p{j}")
    for share, share_slot in zip(shares, SHARE_SLOTS, strict=False):
        ro = ",readonly=on" if share.readonly else ""
        argv += [
            "-fsdev",
            f"local,id=fs{share.tag},path={share.path},security_model=none{ro},multidevs=remap",
            # bus=pcie.0: with expander bridges present an unplaced device may land on one.
            "-device",
            f"virtio-9p-pci,fsdev=fs{share.tag},mount_tag={share.tag},bus=pcie.0,addr={share_slot:#x}",
        ]
    if len(shares) > len(SHARE_SLOTS):
        raise ValueError(f"at most {len(SHARE_SLOTS)} shares")
    return argv


def _slot_devices(slot: Slot, bus: str, prefix: str) -> list[str]:
    out: list[str] = []
    for fn, model in enumerate(slot.models):
        opts = f"{model},id={prefix}f{fn},bus={bus},addr=0x0.{fn}"
        if slot.multifunction and fn == 0:
            opts += ",multifunction=on"
        if model == "nvme":
            opts += f",serial=tb{prefix}f{fn}"
        out += ["-device", opts]
    return out


# -- what the guest will see ------------------------------------------------------


@dataclass(frozen=True)
class ExpectedFunction:
    """A function the guest will enumerate, located by its path of device slots from a root bus.

    ``root_bus`` is the root bus number (0 for pcie.0, the pxb's ``bus_nr``);
    ``path`` the (slot, function) of each device from the root port down, the last
    one being this function.  Bus numbers below a root port are the guest's choice,
    so a test walks sysfs by this path instead of guessing addresses.
    """

    root_bus: int
    path: tuple[tuple[int, int], ...]
    model: str
    node: int | None
    group_key: str  # functions that share this key share an IOMMU group

    @property
    def id(self) -> str:
        return MODELS[self.model][0]


def expected_functions(topo: Topology) -> list[ExpectedFunction]:
    """Every endpoint function of the topology, with the IOMMU grouping the kernel should make.

    Each root port's and each downstream port's slot is its own group (the ports
    do ACS); a PCIe-to-PCI bridge and everything behind it share one group, as
    conventional PCI cannot isolate the devices on one bus.
    """
    out: list[ExpectedFunction] = []
    slot = FIRST_ROOT_SLOT + len(_pxb_nodes(topo.ports))
    pxb_slot: dict[int, int] = dict.fromkeys(_pxb_nodes(topo.ports), 0)
    for i, port in enumerate(topo.ports):
        if port.node is None:
            root_bus, rp = 0, (slot, 0)
            slot += 1
        else:
            root_bus, rp = PXB_BUS_STRIDE * (port.node + 1), (pxb_slot[port.node], 0)
            pxb_slot[port.node] += 1
        if port.slot is not None:
            for fn, m in enumerate(port.slot.models):
                out.append(ExpectedFunction(root_bus, (rp, (0, fn)), m, port.node, f"port{i}"))
        elif port.bridge:
            for j, m in enumerate(port.bridge):
                out.append(
                    ExpectedFunction(root_bus, (rp, (0, 0), (j + 1, 0)), m, port.node, f"bridge{i}")
                )
        else:
            for j, down in enumerate(port.switch):
                for fn, m in enumerate(down.models):
                    out.append(
                        ExpectedFunction(
                            root_bus, (rp, (0, 0), (j, 0), (0, fn)), m, port.node, f"switch{i}.{j}"
                        )
                    )
    return out
