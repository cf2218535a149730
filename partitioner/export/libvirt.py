"""One libvirt domain XML per partition: the QEMU command line of ``guest.argv`` in libvirt's words.

Decisions (each mirrors one of ``partitioner.guest.argv``):

- Every vCPU is pinned to its planned host CPU (``vcpupin``); the emulator and
  I/O threads run on the host reserve (``emulatorpin``, ``iothreadpin``), as
  ``launch`` pins QEMU's other threads there.
- One guest NUMA cell per host node of the plan, with the vCPUs that run on
  that node and its memory bound there (``numatune`` ``memnode`` strict =
  QEMU's ``policy=bind``).
- Memory is locked, never merged (``nosharepages``), kept out of core dumps,
  allocated at start with one thread per partition CPU on the node; hugepages
  of the plan's size come from memfd (no hugetlbfs mount), as in argv.
- PCI functions are ``managed='no'`` VFIO hostdevs (``<driver name='vfio'/>``): the
  host binds them to vfio-pci (``partition host setup`` does it at boot), libvirt
  never rebinds them.
  Functions of one host slot that include function 0 share one root port as
  one multifunction device with their function numbers; any other function
  gets a root port of its own.
- The serial console is a pty (``virsh console``) logged to a file; there is
  no balloon, no USB, no display, as with ``-nodefaults -display none``.
- UEFI is asked by ``firmware='efi'`` without Secure Boot, so that libvirt
  picks the OVMF build it knows: the export names no path of this host.
- Under KVM the guest's physical address width is the host's
  (``<maxphysaddr mode='passthrough'/>``, QEMU's ``host-phys-bits=on``), as argv
  gives it under KVM: the plan checked that the host's width covers RAM and BARs.
- A ``primary_display`` device gets ``x-vga=on`` through libvirt's
  ``<qemu:override>`` (libvirt 8.2+): the hostdev is given a user alias
  (``ua-hostdevN``, argv's ``id=hostdevN``) and the override sets the property on
  it.  libvirt has no element for it, and marks such a domain tainted.
- A virtual function with a MAC address or a VLAN in the manifest (``export.network_vf``)
  is an ``<interface type='hostdev' managed='no'>`` with ``<mac>`` and ``<vlan><tag>``:
  libvirt sets them on the VF through its PF at start, as apply does.  libvirt has no
  words for a VF's ``qos``, ``spoofchk: false``, ``trust``, ``link_state`` or rates (it
  carries no ``<bandwidth>`` for a hostdev interface): :func:`notes` says so, and the
  ``<metadata>`` keeps every setting.  Without a MAC address in the manifest libvirt
  gives the VF one of its own.  Any other VF is a ``<hostdev>`` like any function.
- ``-overcommit cpu-pm=on`` is not exported (docs/decisions.md, "cpu-pm in the
  libvirt export"): libvirt has no element for it, and a ``<qemu:commandline>``
  ``-overcommit cpu-pm=on`` after libvirt's own ``-overcommit mem-lock=on``
  would turn the memory lock off.
- Rule 10 (``host.confine``, the default): each domain names a user of its own
  through a static DAC label (``+UID:+GID`` with ``relabel='yes'``: libvirt
  starts QEMU as that user and, with ``dynamic_ownership``, hands it its device
  nodes and files, and takes them back).  The uid is the partitioner's range
  (``record.model.USER_BASE``) plus the partition's place in name order: the
  export is a pure function of the plan, and libvirt, not the partitioner, then
  manages the domain.  The rest of the walls are ``qemu.conf``'s (docs/cli.md,
  "The libvirt export and rule 10's walls").
- A dynamic partition (rule 11) mirrors argv's dynamic parts.  vCPUs: ``<vcpu
  current='N'>M</vcpu>`` and ``<vcpus>``: the first ``min_cpus`` enabled and not
  hot-pluggable, the other present ones enabled and hot-pluggable (libvirt unplugs
  only those, so ``min_cpus`` is its floor too), the slots above N disabled and
  hot-pluggable; each guest cell lists every slot on its node, as argv's ``-numa cpu``.
  Memory: the cells hold the fixed part (``min_memory``), ``<maxMemory slots='K'>`` is
  argv's ``maxmem`` and ``slots``, and each node with room has a ``<memory
  model='virtio-mem'>`` device (its host node in ``<nodemask>``, the page size in
  ``<pagesize>``, ``<size>``, ``<node>``, ``<block>``, ``<requested>``); ``<memory>`` is
  then the fixed part plus every device's size, as libvirt counts it, and there is no
  ``<locked/>`` (QEMU refuses virtio-mem with mem-lock; argv leaves it off too).  The
  virtio-mem devices sit on pcie.0, as argv's (libvirt would put each behind a root
  port, taking a spare one), and so do the disks of a partition with spare slots.
  ``hotplug_slots`` extra ``pcie-root-port`` controllers after the devices' own, a
  function the record says was attached live in the spare port argv gives it.  What
  libvirt does not do of a live change (place an added vCPU, reserve pages before a
  grow) is in :func:`notes`.  A static partition's XML is unchanged, byte for byte.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from partitioner.cpuset import CpuSet
from partitioner.export import network_vf
from partitioner.guest.argv import (
    TCG_TB_SIZE_MIB,
    VirtioMem,
    disk_format,
    dynamic_memory,
    guest_cpus_by_node,
    guest_ports,
    hostdev_numbers,
    slot_guest_node,
)
from partitioner.manifest.model import vf_settings_to_json
from partitioner.planning.confine import USER_BASE
from partitioner.planning.model import DeviceAssignment, Placement, Plan
from partitioner.units import KiB, format_size, page_size_name

# The libvirt XML namespace of the plan's own record inside <metadata>.
NAMESPACE = "https://partition.invalid/xmlns/libvirt/1"
# libvirt's QEMU namespace: <qemu:override> sets device properties libvirt has no element for.
QEMU_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0"
CONSOLE_LOG_DIR = "/var/log/libvirt/qemu"
# Slots of pcie.0 given to the devices argv puts there (virtio-mem, and disks when spare
# root ports must stay free): above the root ports libvirt packs from slot 1, below the
# chipset's LPC, SATA and SMBus functions in slot 0x1f.
INTEGRATED_FIRST, INTEGRATED_LAST = 0x10, 0x1E
ET.register_namespace("partition", NAMESPACE)
ET.register_namespace("qemu", QEMU_NAMESPACE)


def domain_xml(p: Placement, plan: Plan) -> str:
    """The domain XML of partition ``p`` (``virsh define``-able), as text ending in a newline."""
    tcg = plan.accel != "kvm"
    dom = ET.Element("domain", type="qemu" if tcg else "kvm")
    _sub(dom, "name", p.name)
    _sub(dom, "description", f"partition {p.name}, exported from the plan by `partition export`")
    _metadata(dom, p, plan)
    vmem = dynamic_memory(p)
    # dumpCore='off': as dump-guest-core=off, a QEMU crash writes no guest memory to a core.
    _sub(dom, "memory", str(_memory_kib(p, vmem)), unit="KiB", dumpCore="off")
    if vmem:
        # argv's -m size=FIXED,slots=K,maxmem=MAX: K counts the virtio-mem devices.
        most = p.fixed_memory_bytes + sum(d.room for d in vmem)
        _sub(dom, "maxMemory", str(most // KiB), slots=str(len(vmem)), unit="KiB")
    _memory_backing(dom, p, locked=not vmem)
    _vcpus(dom, p)
    if p.spec.disks:
        _sub(dom, "iothreads", str(len(p.spec.disks)))
    _cputune(dom, p, plan)
    _numatune(dom, p)
    _os(dom, p)
    features = _sub(dom, "features")
    _sub(features, "acpi")  # stop asks the guest to power down through ACPI
    _sub(features, "apic")
    if tcg:
        # -accel tcg,tb-size=: the translation cache is locked with the rest; keep it small.
        tcg_el = _sub(features, "tcg")
        _sub(tcg_el, "tb-cache", str(TCG_TB_SIZE_MIB), unit="MiB")
    else:
        # Every vCPU has a host CPU of its own: the guest may skip its paravirtual spinlock
        # and idle paths (KVM_HINTS_REALTIME).
        kvm = _sub(features, "kvm")
        _sub(kvm, "hint-dedicated", state="on")
    _cpu(dom, p, tcg)
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")
    _devices(dom, p, vmem)
    if plan.confine:
        uid = USER_BASE + sorted(plan.placements).index(p.name)
        label = _sub(dom, "seclabel", type="static", model="dac", relabel="yes")
        _sub(label, "label", f"+{uid}:+{uid}")
    _overrides(dom, p)
    ET.indent(dom, space="  ")
    return ET.tostring(dom, encoding="unicode") + "\n"


def documents(plan: Plan) -> dict[str, str]:
    """File name -> content: ``NAME.xml`` for each partition, in name order."""
    return {f"{name}.xml": domain_xml(p, plan) for name, p in sorted(plan.placements.items())}


def _metadata(dom: ET.Element, p: Placement, plan: Plan) -> None:
    """What the plan decided, for a reader and for drift checks: libvirt keeps it verbatim."""
    md = _sub(dom, "metadata")
    rec = ET.SubElement(md, f"{{{NAMESPACE}}}plan")
    rec.set("cpus", str(p.cpuset))
    rec.set("host-cpus", str(plan.host_cpus))
    rec.set("accel", plan.accel)
    rec.set("smt", plan.smt)
    for d in p.devices:
        dev = ET.SubElement(rec, f"{{{NAMESPACE}}}device")
        dev.set("address", str(d.address))
        dev.set("id", d.vendor_device)
        if d.iommu_group is not None:  # None: a VF apply has yet to make, known then
            dev.set("iommu-group", str(d.iommu_group))
        dev.set("reason", d.reason)
        slot = p.hotplug_slot(str(d.address))
        if slot is not None:  # attached live, in spare root port hp{slot}
            dev.set("hotplug-slot", str(slot))
        if d.vf is not None:
            dev.set("vf-of", str(d.vf.pf))
            dev.set("vf-index", str(d.vf.index))
            for key, value in (vf_settings_to_json(d.vf.settings) or {}).items():
                if value is not None:
                    dev.set(key.replace("_", "-"), str(value).lower())


def _memory_kib(p: Placement, vmem: list[VirtioMem]) -> int:
    """``<memory>``: what the guest has; with virtio-mem devices, libvirt's total, the fixed
    part (the cells) and every device's whole size (what it reports back from a define)."""
    if not vmem:
        return p.memory_bytes // KiB
    return (p.fixed_memory_bytes + sum(d.room for d in vmem)) // KiB


def _memory_backing(dom: ET.Element, p: Placement, *, locked: bool) -> None:
    mb = _sub(dom, "memoryBacking")
    if p.hugepage_bytes is not None:
        hp = _sub(mb, "hugepages")
        cells = ",".join(str(i) for i in range(len(p.memory_per_node)))
        _sub(hp, "page", size=str(p.hugepage_bytes // KiB), unit="KiB", nodeset=cells)
    _sub(mb, "nosharepages")
    if locked:
        # Not with virtio-mem: QEMU refuses it under mem-lock, as argv leaves mem-lock off.
        _sub(mb, "locked")
    _sub(mb, "source", type="memfd" if p.hugepage_bytes is not None else "anonymous")
    # One preallocation thread per partition CPU, as argv's prealloc-threads (libvirt
    # gives one number for the whole guest: the largest node's CPU count is argv's most).
    threads = max(1, max((len(v) for _, v in guest_cpus_by_node(p)), default=1))
    _sub(mb, "allocation", mode="immediate", threads=str(threads))


def _vcpus(dom: ET.Element, p: Placement) -> None:
    """``<vcpu>``, and for a partition whose vCPUs change live, ``<vcpus>``: argv's ``-smp
    cpus=N,maxcpus=M``.  The first ``min_cpus`` vCPUs are never unplugged (libvirt starts
    them with -smp); the other present ones are hot-pluggable, so that libvirt may unplug
    them down to ``min_cpus``, as apply does (libvirt starts those with -device); the slots
    above N are empty and hot-pluggable."""
    n, slots = len(p.cpus), p.max_vcpus
    floor = min(n, max(1, p.spec.cpus_min))
    if slots == n and floor == n:
        _sub(dom, "vcpu", str(n), placement="static")
        return
    attrs = {"placement": "static"}
    if slots > n:
        attrs["current"] = str(n)
    _sub(dom, "vcpu", str(slots), **attrs)
    vcpus = _sub(dom, "vcpus")
    for i in range(slots):
        _sub(
            vcpus,
            "vcpu",
            id=str(i),
            enabled="yes" if i < n else "no",
            hotpluggable="no" if i < floor else "yes",
        )


def _cputune(dom: ET.Element, p: Placement, plan: Plan) -> None:
    ct = _sub(dom, "cputune")
    for i, cpu in enumerate(p.cpus):
        _sub(ct, "vcpupin", vcpu=str(i), cpuset=str(cpu))
    if plan.host_cpus:
        reserve = str(plan.host_cpus)
        _sub(ct, "emulatorpin", cpuset=reserve)
        for i in range(len(p.spec.disks)):
            _sub(ct, "iothreadpin", iothread=str(i + 1), cpuset=reserve)


def _numatune(dom: ET.Element, p: Placement) -> None:
    nt = _sub(dom, "numatune")
    nodes = ",".join(str(n) for n, _ in p.memory_per_node)
    _sub(nt, "memory", mode="strict", nodeset=nodes)
    for i, (node, _) in enumerate(p.memory_per_node):
        _sub(nt, "memnode", cellid=str(i), mode="strict", nodeset=str(node))


def _os(dom: ET.Element, p: Placement) -> None:
    attrs = {"firmware": "efi"} if p.spec.firmware == "uefi" else {}
    os_el = _sub(dom, "os", **attrs)
    _sub(os_el, "type", "hvm", arch="x86_64", machine="q35")
    if p.spec.firmware == "uefi":
        fw = _sub(os_el, "firmware")
        _sub(fw, "feature", enabled="no", name="enrolled-keys")
        _sub(fw, "feature", enabled="no", name="secure-boot")
    boot = p.spec.boot
    if boot is not None:
        _sub(os_el, "kernel", boot.kernel)
        if boot.initrd:
            _sub(os_el, "initrd", boot.initrd)
        if boot.cmdline:
            _sub(os_el, "cmdline", boot.cmdline)


def _cpu(dom: ET.Element, p: Placement, tcg: bool) -> None:
    # TCG has no host CPU to pass through: "maximum" is QEMU's -cpu max.
    cpu = _sub(dom, "cpu", mode="maximum" if tcg else "host-passthrough", migratable="off")
    _sub(
        cpu,
        "topology",
        sockets=str(p.sockets),
        dies="1",
        cores=str(p.cores),
        threads=str(p.threads),
    )
    if p.host_cache_info and not tcg:
        _sub(cpu, "cache", mode="passthrough")  # QEMU's host-cache-info=on
    if not tcg:
        # QEMU's host-phys-bits=on (libvirt 8.7+, host-passthrough only), given by argv under
        # KVM: the guest sees the host's address width, which the plan checked covers its
        # RAM and every BAR; QEMU's default (40 bits) may not reach a large BAR's window.
        _sub(cpu, "maxphysaddr", mode="passthrough")
    numa = _sub(cpu, "numa")
    fixed = dict(p.fixed_memory_per_node)
    for i, (node, vcpus) in enumerate(_cells(p)):
        attrs = {"id": str(i), "memory": str(fixed[node] // KiB), "unit": "KiB"}
        if vcpus:
            attrs["cpus"] = str(CpuSet(vcpus))
        _sub(numa, "cell", **attrs)


def _cells(p: Placement) -> list[tuple[int, list[int]]]:
    """(host node, guest vCPUs on it) per guest node: for a partition with vCPU slots, every
    slot, present or not, on its node (argv's ``-numa cpu``), else the present vCPUs."""
    if p.max_vcpus == len(p.cpus):
        return guest_cpus_by_node(p)
    cells: list[tuple[int, list[int]]] = [(node, []) for node, _ in p.memory_per_node]
    for index in range(p.max_vcpus):
        cells[slot_guest_node(p, index)][1].append(index)
    return cells


def _boot_devices(p: Placement) -> tuple[DeviceAssignment, ...]:
    """The functions with ports of their own: all but those the record put in spare slots."""
    return tuple(d for d in p.devices if p.hotplug_slot(str(d.address)) is None)


def _devices(dom: ET.Element, p: Placement, vmem: list[VirtioMem]) -> None:
    devs = _sub(dom, "devices")
    for i, disk in enumerate(p.spec.disks):
        block = disk.path.startswith("/dev/")
        el = _sub(devs, "disk", type="block" if block else "file", device="disk")
        drv = {"name": "qemu", "type": disk_format(disk.path), "iothread": str(i + 1)}
        if block:
            drv |= {"cache": "none", "io": "native"}
        _sub(el, "driver", **drv)
        _sub(el, "source", **{"dev" if block else "file": disk.path})
        _sub(el, "target", dev=f"vd{_letters(i)}", bus="virtio")
        if disk.readonly:
            _sub(el, "readonly")
        if i == 0 and p.spec.boot is None:
            _sub(el, "boot", order="1")
        if p.hotplug_slots and INTEGRATED_FIRST + i <= INTEGRATED_LAST:
            # On pcie.0, as argv's virtio-blk-pci: libvirt would give it a spare root port.
            _sub(el, "address", **_integrated(INTEGRATED_FIRST + i))
    ports = guest_ports(_boot_devices(p))
    if p.pci_hole64_bytes:
        # The 64-bit PCI window that holds the devices' large BARs (q35-pcihost.pci-hole64-size).
        root = _sub(devs, "controller", type="pci", index="0", model="pcie-root")
        _sub(root, "pcihole64", str(p.pci_hole64_bytes // KiB), unit="KiB")
    for k in range(len(ports)):
        ctl = _sub(devs, "controller", type="pci", index=str(k + 1), model="pcie-root-port")
        _sub(ctl, "target", chassis=str(k + 1), port=f"{k + 16:#x}")
    # argv's spare root ports hp0.. for devices attached live, numbered after the devices' own.
    for j in range(p.hotplug_slots):
        k = len(ports) + j
        ctl = _sub(devs, "controller", type="pci", index=str(k + 1), model="pcie-root-port")
        _sub(ctl, "target", chassis=str(k + 1), port=f"{k + 16:#x}")
    number = hostdev_numbers(ports)
    for k, members in enumerate(ports):
        multi = len(members) > 1
        for d, fn in members:
            hd = _hostdev(devs, d, bus=k + 1, function=fn, multifunction=multi and fn == 0)
            if d.primary_display:
                # A user alias ("ua-"): the name <qemu:override> finds the device by.
                _sub(hd, "alias", name=hostdev_alias(number[d.address]))
    # A function the record says was attached live goes back into its spare slot, as argv.
    by_address = {str(d.address): d for d in p.devices}
    for j, address in enumerate(p.hotplugged[: p.hotplug_slots]):
        if address in by_address:
            _hostdev(devs, by_address[address], bus=len(ports) + j + 1)
    serial = _sub(devs, "serial", type="pty")
    _sub(serial, "log", file=f"{CONSOLE_LOG_DIR}/{p.name}.console.log", append="on")
    _sub(serial, "target", type="isa-serial", port="0")
    console = _sub(devs, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    _sub(devs, "controller", type="usb", model="none")
    _sub(devs, "memballoon", model="none")
    for j, vm in enumerate(vmem):
        _virtio_mem(devs, p, vm, INTEGRATED_FIRST + len(p.spec.disks) + j)


def _hostdev(
    devs: ET.Element,
    d: DeviceAssignment,
    *,
    bus: int,
    function: int = 0,
    multifunction: bool = False,
) -> ET.Element:
    """One function in the guest at ``bus`` (its root port's index), slot 0."""
    if network_vf(d):
        hd = _vf_interface(devs, d)
    else:
        hd = _sub(devs, "hostdev", mode="subsystem", type="pci", managed="no")
        # vfio-pci, as argv: libvirt's default backend resolves to VFIO only on a host
        # that has it, so a conversion elsewhere (domxml-to-native) would refuse it.
        _sub(hd, "driver", name="vfio")
        src = _sub(hd, "source")
        _sub(src, "address", **_host_address(d))
    guest = {
        "type": "pci",
        "domain": "0x0000",
        "bus": f"{bus:#04x}",
        "slot": "0x00",
        "function": f"{function:#x}",
    }
    if multifunction:
        guest["multifunction"] = "on"
    _sub(hd, "address", **guest)
    if d.rom == "off":
        _sub(hd, "rom", bar="off")
    elif d.rom:
        _sub(hd, "rom", file=d.rom)
    return hd


def _integrated(slot: int) -> dict[str, str]:
    """A guest address on the root bus (pcie.0), as an integrated endpoint."""
    return {
        "type": "pci",
        "domain": "0x0000",
        "bus": "0x00",
        "slot": f"{slot:#04x}",
        "function": "0x0",
    }


def _virtio_mem(devs: ET.Element, p: Placement, d: VirtioMem, slot: int) -> None:
    """argv's virtio-mem device of host node ``d.node``: its room bound to that node, of the
    partition's page size, plugged up to what the guest has on it now; on pcie.0 as argv's
    (libvirt would otherwise put it behind a root port, a spare one if there is one)."""
    mem = _sub(devs, "memory", model="virtio-mem")
    src = _sub(mem, "source")
    if p.hugepage_bytes is not None:
        _sub(src, "pagesize", str(p.hugepage_bytes // KiB), unit="KiB")
    _sub(src, "nodemask", str(d.node))
    target = _sub(mem, "target")
    _sub(target, "size", str(d.room // KiB), unit="KiB")
    _sub(target, "node", str(d.guest_node))
    _sub(target, "block", str(d.block // KiB), unit="KiB")
    _sub(target, "requested", str(d.plugged // KiB), unit="KiB")
    if slot <= INTEGRATED_LAST:
        _sub(mem, "address", **_integrated(slot))


def _host_address(d: DeviceAssignment) -> dict[str, str]:
    a = d.address
    return {
        "domain": f"{a.domain:#06x}",
        "bus": f"{a.bus:#04x}",
        "slot": f"{a.slot:#04x}",
        "function": f"{a.function:#x}",
    }


def _vf_interface(devs: ET.Element, d: DeviceAssignment) -> ET.Element:
    """A network VF: libvirt sets its MAC address and VLAN through the PF when it starts the
    domain, then hands it to the guest by VFIO (managed='no': it is on vfio-pci already)."""
    assert d.vf is not None and d.vf.settings is not None
    s = d.vf.settings
    el = _sub(devs, "interface", type="hostdev", managed="no")
    if s.mac is not None:
        _sub(el, "mac", address=s.mac)
    _sub(el, "driver", name="vfio")
    src = _sub(el, "source")
    _sub(src, "address", type="pci", **_host_address(d))
    if s.vlan is not None:
        vlan = _sub(el, "vlan")
        _sub(vlan, "tag", id=str(s.vlan))
    return el


def notes(plan: Plan) -> dict[str, list[str]]:
    """Partition -> what its domain XML cannot carry: the VF settings libvirt has no words
    for, and what libvirt does not do of a live change that apply does."""
    out: dict[str, list[str]] = {}
    for name, p in sorted(plan.placements.items()):
        said = [n for d in p.devices for n in _vf_notes(d)] + _live_notes(p)
        if said:
            out[name] = said
    return out


def _live_notes(p: Placement) -> list[str]:
    """What a live change under libvirt leaves to the operator (rule 11): apply places an added
    vCPU and reserves grown memory itself; libvirt does neither."""
    out = []
    n, slots = len(p.cpus), p.max_vcpus
    if slots > n:
        added = f"vCPU {n}" if slots == n + 1 else f"vCPUs {n}-{slots - 1}"
        out.append(
            f"{added} (the slots above cpus, plugged by `virsh setvcpus {p.name} COUNT --live`) "
            "have no host CPU in the XML, which cannot know the plan's choice: libvirt runs a "
            f"plugged vCPU on any CPU; pin each with `virsh vcpupin {p.name} VCPU CPU --live` "
            "to the CPU `partition plan` names in its add-cpus line"
        )
    fixed = dict(p.fixed_memory_per_node)
    for d in dynamic_memory(p):
        if p.hugepage_bytes is not None:
            room = (
                f"node {d.node}'s pool of {page_size_name(p.hugepage_bytes)} pages must already "
                "hold what the guest grows by (apply raises it first)"
            )
        else:
            room = f"node {d.node} must have the memory free (apply checks it first, rule 3)"
        out.append(
            f"virtio-mem of host node {d.node} (guest node {d.guest_node}: "
            f"{format_size(fixed[d.node])} fixed, up to {format_size(d.room)} more): `virsh "
            f"update-memory-device {p.name} --node {d.guest_node} --requested-size SIZE --live` "
            f"takes pages as the guest plugs them and reserves none before: {room}"
        )
    return out


def _vf_notes(d: DeviceAssignment) -> list[str]:
    s = d.vf.settings if d.vf is not None else None
    if d.vf is None or s is None:
        return []
    lost = [
        f"{key} {value}"
        for key, value, default in (
            ("mac", None if network_vf(d) else s.mac, None),
            ("vlan", None if network_vf(d) else s.vlan, None),
            ("qos", s.qos, None),
            ("spoofchk", "on" if s.spoofchk else "off", "on"),
            ("trust", "on" if s.trust else "off", "off"),
            ("link_state", s.link_state, None),
            ("min_tx_rate", s.min_tx_rate, None),
            ("max_tx_rate", s.max_tx_rate, None),
        )
        if value != default
    ]
    vf = f"{d.address} (VF {d.vf.index} of {d.vf.pf})"
    out = []
    if lost:
        out.append(
            f"{vf}: libvirt sets only a VF's MAC address and VLAN; set {', '.join(lost)} on "
            f"the PF before the domain starts (ip link set PF vf {d.vf.index} ...)"
        )
    if network_vf(d) and s.mac is None:
        out.append(f"{vf}: libvirt gives it a MAC address of its own (the manifest names none)")
    return out


def hostdev_alias(n: int) -> str:
    """The user alias of the ``n``-th hostdev (argv's ``id=hostdevN``; QEMU's id under libvirt)."""
    return f"ua-hostdev{n}"


def _overrides(dom: ET.Element, p: Placement) -> None:
    """``x-vga=on`` on the primary display (argv's ``vfio-pci,...,x-vga=on``): libvirt has no
    element for it; ``<qemu:override>`` (libvirt 8.2+) sets the property on the ``-device``
    libvirt formats, found by the hostdev's user alias.  libvirt marks the domain tainted
    ("custom-device") and applies it at start only, not to a hotplug."""
    n_of = hostdev_numbers(guest_ports(_boot_devices(p)))
    shown = [d for d in p.devices if d.primary_display]
    if not shown:
        return
    override = ET.SubElement(dom, f"{{{QEMU_NAMESPACE}}}override")
    for d in sorted(shown, key=lambda d: n_of[d.address]):
        dev = ET.SubElement(override, f"{{{QEMU_NAMESPACE}}}device")
        dev.set("alias", hostdev_alias(n_of[d.address]))
        frontend = ET.SubElement(dev, f"{{{QEMU_NAMESPACE}}}frontend")
        prop = ET.SubElement(frontend, f"{{{QEMU_NAMESPACE}}}property")
        prop.set("name", "x-vga")
        prop.set("type", "bool")
        prop.set("value", "true")


def _letters(i: int) -> str:
    """vda, vdb, ... vdz, vdaa: the disk names libvirt expects for index ``i``."""
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(ord("a") + r) + s
    return s


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el
