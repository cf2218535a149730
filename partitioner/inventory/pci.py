"""PCI: functions (ids, class, driver, topology), their IOMMU groups, and their names.

Names come from udev's hardware database on the live host (``HostRoot.hwdb``);
a tree under --host-root has none, and ``inspect`` shows ids there.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from dataclasses import replace

from partitioner.inventory.bars import read_bars
from partitioner.inventory.model import IommuGroup, PciFunction
from partitioner.inventory.reader import Reader, is_number
from partitioner.inventory.sriov import names_its_vfs, read_physfns, read_sriov, relate
from partitioner.kernel import sysfs
from partitioner.kernel.root import HostRoot
from partitioner.pci import PciAddress, PciAddressSyntaxError

# Slots run 00-1f: a component that is not one is not a PCI function.
PCI_ADDR_RE = re.compile(r"^[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[01][0-9a-fA-F]\.[0-7]$")

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


def scan_pci(r: Reader) -> dict[PciAddress, PciFunction]:
    out: dict[PciAddress, PciFunction] = {}
    root = r.root
    names: dict[tuple[str, str], tuple[str, str]] = {}  # udev's names, asked once per id
    parsed: dict[str, PciAddress] = {}  # the functions read so far, by directory name
    # Values many functions share are made once: the bridges above the functions of one bus,
    # their reset methods.  A large host's Host holds thousands fewer objects.
    upstreams: dict[str, tuple[PciAddress, ...]] = {}
    resets: dict[str | None, tuple[str, ...]] = {}
    dirs: dict[PciAddress, str] = {}  # each function's directory, for a VF's physfn
    vfs: list[PciAddress] | None = []  # what PFs name as VFs; None: a PF's links fall short
    for name in root.listdir(sysfs.PCI_DEVICES):
        try:
            addr = PciAddress.parse(name)
        except PciAddressSyntaxError:
            r.note(f"{sysfs.pci_device(name)} is not a PCI address; ignored")
            continue
        real, uevent = _device_dir(r, name)
        if real is None:
            r.note(f"{sysfs.pci_device(name)} points nowhere; ignored")
            continue
        parent = real.rpartition("/")[0]
        upstream = upstreams.get(parent)
        if upstream is None:
            # A port is listed before what is behind it: its own address is reused.
            upstream = upstreams[parent] = tuple(
                parsed.get(part) or parse_pci(part)
                for part in parent.split("/")
                if PCI_ADDR_RE.match(part)
            )
        parsed[name] = addr
        ids = uevent_ids(uevent)
        class_code = ids[0] if ids else r.read_hex(f"{real}/class", 6)
        override = r.read(f"{real}/driver_override")
        reset = r.read(f"{real}/reset_method")
        group_name = root.readlink_name(f"{real}/iommu_group")
        group: int | None = None
        absent: str | None = None
        if group_name is not None:
            if is_number(group_name):
                group = int(group_name)
            else:
                absent = group_name
        numa = r.read_int(f"{real}/numa_node")
        vendor = ids[1] if ids else r.read_hex(f"{real}/vendor", 4)
        device = ids[2] if ids else r.read_hex(f"{real}/device", 4)
        named = names.get((vendor, device))
        if named is None:
            named = names[(vendor, device)] = names_of(r, vendor, device)
        sriov, sriov_problem = read_sriov(r, real)
        if not names_its_vfs(sriov, sriov_problem):
            vfs = None
        elif sriov is not None and vfs is not None:
            vfs += sriov.vfs
        dirs[addr] = real
        out[addr] = PciFunction(
            address=addr,
            vendor=vendor,
            device=device,
            class_code=class_code,
            subsystem_vendor=ids[3] if ids else r.read_hex(f"{real}/subsystem_vendor", 4),
            subsystem_device=ids[4] if ids else r.read_hex(f"{real}/subsystem_device", 4),
            driver=root.readlink_name(f"{real}/driver"),
            driver_override=None if override in (None, "", "(null)") else override,
            iommu_group=group,
            numa_node=numa if numa is not None and numa >= 0 else None,
            reset_methods=resets.get(reset)
            or resets.setdefault(reset, tuple(reset.split()) if reset else ()),
            # The kernel gives boot_vga to display-class devices only.
            boot_vga=class_code.startswith("03") and r.read_int(f"{real}/boot_vga") == 1,
            is_bridge=pci_is_bridge(root, real, class_code),
            upstream=upstream,
            # Its network interfaces come from one listing of /sys/class/net, where the
            # kernel links each one (scan_net), rather than a listing of net/ per function.
            netdevs=(),
            label=class_label(class_code),
            vendor_name=named[0],
            device_name=named[1],
            iommu_group_absent=absent,
            bars=read_bars(root, real),
            # Kernels before 5.15 have no reset_method: their `reset` file (write-only, there
            # only for a function the kernel can reset) says what reset_method would.
            reset_unnamed=reset is None and root.exists(f"{real}/reset"),
            sriov=sriov,
            sriov_problem=sriov_problem,
        )
    read_physfns(r, out, dirs, vfs)
    relate(out, r)
    return dict(sorted(out.items()))


def _device_dir(r: Reader, name: str) -> tuple[str | None, str | None]:
    """Where the function's link ``name`` in /sys/bus/pci/devices leads (None: to no
    directory), and the text of its ``uevent`` there.

    The kernel's link is relative and stays inside /sys, so its normalised target is the
    directory as soon as a file reads there (only a directory holds one): the read the scan
    makes anyway stands for the check.  Otherwise (no uevent: older trees, hwloc's dumps; or
    an odd link) :meth:`Reader.realdir` decides, as for any link."""
    link = sysfs.pci_device(name)
    target = r.root.readlink(link)
    guess: str | None = None
    if target is not None and not target.startswith("/"):
        guess = os.path.normpath(f"{sysfs.PCI_DEVICES}/{target}")
        if guess.startswith("/sys/"):
            text = r.read(f"{guess}/uevent")
            if text is not None:
                return guess, text
    real = r.realdir(link)
    if real is None or real == guess:
        return real, None
    return real, r.read(f"{real}/uevent")


_UEVENT_IDS = re.compile(
    r"^PCI_CLASS=([0-9A-Fa-f]{1,6})$.*?^PCI_ID=([0-9A-Fa-f]{4}):([0-9A-Fa-f]{4})$"
    r".*?^PCI_SUBSYS_ID=([0-9A-Fa-f]{4}):([0-9A-Fa-f]{4})$",
    re.M | re.S,
)


def uevent_ids(text: str | None) -> tuple[str, str, str, str, str] | None:
    """(class, vendor, device, subsystem vendor, subsystem device) from a PCI function's
    ``uevent``, in the form of the single files as read_hex gives them; None when the file is
    missing or does not hold all five (trees without it: hwloc's dumps, older snapshots).

    One read instead of five: a scan of thousands of functions is its file opens.  The kernel
    writes the class as ``%04X`` of its 24 bits, the ids as ``%04X:%04X`` (pci_uevent).
    """
    m = _UEVENT_IDS.search(text) if text else None
    if m is None:
        return None
    class_code, vendor, device, sub_vendor, sub_device = m.group(1, 2, 3, 4, 5)
    return (
        class_code.lower().zfill(6),
        vendor.lower(),
        device.lower(),
        sub_vendor.lower(),
        sub_device.lower(),
    )


def names_of(r: Reader, vendor: str, device: str) -> tuple[str, str]:
    """(vendor name, device name) from udev's hwdb; "" where it has none."""
    if len(vendor) != 4 or len(device) != 4:
        return "", ""
    entry = r.root.hwdb(f"pci:v0000{vendor.upper()}d0000{device.upper()}")
    return entry.get("ID_VENDOR_FROM_DATABASE", ""), entry.get("ID_MODEL_FROM_DATABASE", "")


def scan_iommu_groups(
    r: Reader, pci: dict[PciAddress, PciFunction]
) -> tuple[dict[int, IommuGroup], dict[PciAddress, PciFunction]]:
    """The IOMMU groups, and ``pci`` with the functions whose group link names a group the
    kernel does not list taken out of any group (``iommu_group_absent`` says which).

    A group's members are the functions whose ``iommu_group`` link names it, read once by
    scan_pci: the kernel makes that link and the group's ``devices/`` entry together
    (iommu_group_add_device), so listing every group's ``devices/`` again would read the same
    fact a second time.  Groups also hold non-PCI devices on some platforms; only PCI ones
    matter here."""
    members: dict[int, list[PciAddress]] = {}
    for name in r.root.listdir(sysfs.IOMMU_GROUPS):
        if not is_number(name):
            r.note(f"{sysfs.iommu_group(name)} is not an IOMMU group number; ignored")
            continue
        members[int(name)] = []
    out = pci
    for addr, fn in pci.items():
        missing = fn.iommu_group_absent
        if fn.iommu_group is not None:
            listed = members.get(fn.iommu_group)
            if listed is None:
                missing = str(fn.iommu_group)
            else:
                listed.append(addr)
        if missing is None:
            continue
        if out is pci:
            out = dict(pci)
        out[addr] = replace(fn, iommu_group=None, iommu_group_absent=missing)
        r.note(
            f"{addr} names IOMMU group {missing!r}, which the kernel does not list in "
            f"{sysfs.IOMMU_GROUPS}: taken as in no group"
        )
    groups = {g: IommuGroup(id=g, members=tuple(sorted(members[g]))) for g in sorted(members)}
    return groups, out


def nearest_pci(real: str) -> PciAddress | None:
    """The PCI function a sysfs device path hangs off (the last address in it)."""
    for part in reversed(real.split("/")):
        if PCI_ADDR_RE.match(part):
            return parse_pci(part)
    return None


@functools.lru_cache(maxsize=4096)
def parse_pci(text: str) -> PciAddress:
    return PciAddress.parse(text)


# The base classes a function with a bridge's header has: bridges (06); not defined (00),
# which the kernel gives a function whose class contradicts its header type; unassigned (ff).
_BRIDGE_BASE_CLASSES = ("06", "00", "ff")


def pci_is_bridge(root: HostRoot, device_dir: str, class_code: str) -> bool:
    """A bridge as the kernel means it (``pci_is_bridge``): header type 1 (PCI-to-PCI
    bridge or port) or 2 (CardBus), the low 7 bits of config space byte 0x0e.

    Not class 06xx: a host bridge (0600) or an ISA bridge (0601) is class 06 with
    header type 0, an endpoint to the kernel.  ``config`` is binary, so it is read
    through the root's path, not as text (and without blocking: a hostile tree may put a
    FIFO there).  A tree without it (hwloc's older dumps, snapshots) falls back to the
    classes that have header type 1 or 2: PCI bridge (0604), CardBus (0607),
    semi-transparent PCI bridge (0609).

    Only a function whose class can go with a bridge's header is asked (base class 06, 00
    or ff, or a class not known): pci_setup_device makes the class of a header type 0 or 2
    that contradicts it "not defined" (000000), and a header type 1 with a class that is
    no bridge's is an oddity that host controllers' drivers and quirks correct to 0604.
    Nor is a PCI bridge (0604) asked: the kernel shows that class on a header type 1 only
    (it makes a header type 0 or 2 of class 0604 "not defined").  A host of thousands of
    endpoints and ports is spared an open each (docs/decisions.md).
    """
    if len(class_code) == 6:
        if class_code[:2] not in _BRIDGE_BASE_CLASSES:
            return False
        if class_code[:4] == "0604":
            return True
    head = b""
    try:
        fd = os.open(root.local(f"{device_dir}/config"), os.O_RDONLY | os.O_NONBLOCK)
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                head = os.read(fd, 0x0F)
        finally:
            os.close(fd)
    except OSError:
        head = b""
    if len(head) == 0x0F:
        return head[0x0E] & 0x7F in (1, 2)
    return class_code[:4] in ("0604", "0607", "0609")


def interrupt_remapping(root: HostRoot) -> bool | None:
    """Whether interrupt remapping is in effect: None when nothing tells.

    The kernel says so in dmesg ("Enabled IRQ remapping"), which a tree does not
    hold.  What sysfs and proc show: remapped interrupts are delivered through
    the IR irqchip, whose name starts with ``IR-`` in ``/proc/interrupts``
    (``IR-PCI-MSI``, ``IR-IO-APIC``), on Intel and AMD alike.
    """
    text = root.read(sysfs.INTERRUPTS)
    if text is not None:
        return bool(re.search(r"\sIR-[A-Za-z]", text))
    return None
