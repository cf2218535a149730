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
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from partitioner.cpuset import CpuSet
from partitioner.export import network_vf
from partitioner.guest.argv import (
    TCG_TB_SIZE_MIB,
    disk_format,
    guest_cpus_by_node,
    guest_ports,
    hostdev_numbers,
)
from partitioner.manifest.model import vf_settings_to_json
from partitioner.planning.confine import USER_BASE
from partitioner.planning.model import DeviceAssignment, Placement, Plan
from partitioner.units import KiB

# The libvirt XML namespace of the plan's own record inside <metadata>.
NAMESPACE = "https://partition.invalid/xmlns/libvirt/1"
# libvirt's QEMU namespace: <qemu:override> sets device properties libvirt has no element for.
QEMU_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0"
CONSOLE_LOG_DIR = "/var/log/libvirt/qemu"
ET.register_namespace("partition", NAMESPACE)
ET.register_namespace("qemu", QEMU_NAMESPACE)


def domain_xml(p: Placement, plan: Plan) -> str:
    """The domain XML of partition ``p`` (``virsh define``-able), as text ending in a newline."""
    tcg = plan.accel != "kvm"
    dom = ET.Element("domain", type="qemu" if tcg else "kvm")
    _sub(dom, "name", p.name)
    _sub(dom, "description", f"partition {p.name}, exported from the plan by `partition export`")
    _metadata(dom, p, plan)
    # dumpCore='off': as dump-guest-core=off, a QEMU crash writes no guest memory to a core.
    _sub(dom, "memory", str(p.memory_bytes // KiB), unit="KiB", dumpCore="off")
    _memory_backing(dom, p)
    _sub(dom, "vcpu", str(len(p.cpus)), placement="static")
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
    _devices(dom, p)
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
        if d.vf is not None:
            dev.set("vf-of", str(d.vf.pf))
            dev.set("vf-index", str(d.vf.index))
            for key, value in (vf_settings_to_json(d.vf.settings) or {}).items():
                if value is not None:
                    dev.set(key.replace("_", "-"), str(value).lower())


def _memory_backing(dom: ET.Element, p: Placement) -> None:
    mb = _sub(dom, "memoryBacking")
    if p.hugepage_bytes is not None:
        hp = _sub(mb, "hugepages")
        cells = ",".join(str(i) for i in range(len(p.memory_per_node)))
        _sub(hp, "page", size=str(p.hugepage_bytes // KiB), unit="KiB", nodeset=cells)
    _sub(mb, "nosharepages")
    _sub(mb, "locked")
    _sub(mb, "source", type="memfd" if p.hugepage_bytes is not None else "anonymous")
    # One preallocation thread per partition CPU, as argv's prealloc-threads (libvirt
    # gives one number for the whole guest: the largest node's CPU count is argv's most).
    threads = max(1, max((len(v) for _, v in guest_cpus_by_node(p)), default=1))
    _sub(mb, "allocation", mode="immediate", threads=str(threads))


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
    for i, (node, vcpus) in enumerate(guest_cpus_by_node(p)):
        size = dict(p.memory_per_node)[node]
        attrs = {"id": str(i), "memory": str(size // KiB), "unit": "KiB"}
        if vcpus:
            attrs["cpus"] = str(CpuSet(vcpus))
        _sub(numa, "cell", **attrs)


def _devices(dom: ET.Element, p: Placement) -> None:
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
    ports = guest_ports(p.devices)
    if p.pci_hole64_bytes:
        # The 64-bit PCI window that holds the devices' large BARs (q35-pcihost.pci-hole64-size).
        root = _sub(devs, "controller", type="pci", index="0", model="pcie-root")
        _sub(root, "pcihole64", str(p.pci_hole64_bytes // KiB), unit="KiB")
    for k in range(len(ports)):
        ctl = _sub(devs, "controller", type="pci", index=str(k + 1), model="pcie-root-port")
        _sub(ctl, "target", chassis=str(k + 1), port=f"{k + 16:#x}")
    number = hostdev_numbers(ports)
    for k, members in enumerate(ports):
        multi = len(members) > 1
        for d, fn in members:
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
                "bus": f"{k + 1:#04x}",
                "slot": "0x00",
                "function": f"{fn:#x}",
            }
            if multi and fn == 0:
                guest["multifunction"] = "on"
            _sub(hd, "address", **guest)
            if d.rom == "off":
                _sub(hd, "rom", bar="off")
            elif d.rom:
                _sub(hd, "rom", file=d.rom)
            if d.primary_display:
                # A user alias ("ua-"): the name <qemu:override> finds the device by.
                _sub(hd, "alias", name=hostdev_alias(number[d.address]))
    serial = _sub(devs, "serial", type="pty")
    _sub(serial, "log", file=f"{CONSOLE_LOG_DIR}/{p.name}.console.log", append="on")
    _sub(serial, "target", type="isa-serial", port="0")
    console = _sub(devs, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    _sub(devs, "controller", type="usb", model="none")
    _sub(devs, "memballoon", model="none")


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
    """Partition -> what its domain XML cannot carry (the VF settings libvirt has no words for)."""
    out: dict[str, list[str]] = {}
    for name, p in sorted(plan.placements.items()):
        said = [n for d in p.devices for n in _vf_notes(d)]
        if said:
            out[name] = said
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
    n_of = hostdev_numbers(guest_ports(p.devices))
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
