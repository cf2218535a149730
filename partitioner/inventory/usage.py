"""What the host itself runs on (rule 5 of docs/manifest.md): its network, disks and swap.

A PCI function is in use when it carries the default route or an addressed
interface (directly or under a bridge, bond or VLAN), controls a mounted
filesystem or swap (directly or under device-mapper, md or NVMe multipath), or
carries a network or virtual filesystem: the virtio device of a 9p or virtiofs
mount, the interface that reaches an NFS, CIFS, Ceph or iSCSI server
(``partitioner.inventory.netfs``).
Stacked devices are walked once each: a link that points back up (a damaged
tree) cannot make the walk loop or grow with the number of paths.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace

from partitioner.inventory import netfs
from partitioner.inventory.model import NetInterface, PciFunction
from partitioner.inventory.pci import nearest_pci
from partitioner.inventory.reader import Reader
from partitioner.kernel import sysfs
from partitioner.pci import PciAddress

_MAJMIN_RE = re.compile(r"^[0-9]{1,10}:[0-9]{1,10}$")
_NVME_CTRL_RE = re.compile(r"^nvme[0-9]+$")
_HEX_RE = re.compile(r"^[0-9a-fA-F]{1,16}$")
_IFF_UP = 0x1
_IPV6_SCOPE_LINK = 0x20
_IPV6_SCOPE_HOST = 0x10
_RTF_REJECT = 0x200


# -- network interfaces ---------------------------------------------------------


def scan_net(r: Reader) -> tuple[dict[str, NetInterface], dict[PciAddress, list[str]]]:
    names = r.root.listdir(sysfs.CLASS_NET)
    if not names:
        return {}, {}
    v4_addr, v4_default = read_ipv4_routes(r)
    v6_addr, v6_default = read_ipv6(r)
    out: dict[str, NetInterface] = {}
    by_pci: dict[PciAddress, list[str]] = {}
    for name in names:
        real = r.realpath(sysfs.net(name))
        pci = nearest_pci(real)
        operstate = r.read(f"{real}/operstate") or ""
        flags = r.read_int(f"{real}/flags", None, base=16)
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


def read_ipv4_routes(r: Reader) -> tuple[set[str], set[str]]:
    """Interfaces with an IPv4 route (the kernel adds one per address) and with the default route."""
    has_route: set[str] = set()
    default: set[str] = set()
    for line in (r.read(sysfs.NET_ROUTE) or "").splitlines()[1:]:
        f = line.split()
        if len(f) < 8:
            continue
        has_route.add(f[0])
        if f[1] == "00000000" and f[7] == "00000000":
            default.add(f[0])
    return has_route, default


def read_ipv6(r: Reader) -> tuple[set[str], set[str]]:
    """Interfaces with a routable IPv6 address (link-local ones come by themselves), and
    with an IPv6 default route."""
    has_addr: set[str] = set()
    for line in (r.read(sysfs.NET_IF_INET6) or "").splitlines():
        f = line.split()
        if len(f) < 6 or not _HEX_RE.match(f[3]):
            continue
        if int(f[3], 16) not in (_IPV6_SCOPE_LINK, _IPV6_SCOPE_HOST):
            has_addr.add(f[5])
    default: set[str] = set()
    for line in (r.read(sysfs.NET_IPV6_ROUTE) or "").splitlines():
        f = line.split()
        if len(f) >= 10 and f[0] == "0" * 32 and f[1] == "00" and f[9] != "lo":
            flags = int(f[8], 16) if _HEX_RE.match(f[8]) else 0
            if not flags & _RTF_REJECT:  # the "unreachable" placeholder
                default.add(f[9])
    return has_addr, default


def with_netdevs(
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


def lower_interfaces(r: Reader, iface: str) -> list[str]:
    """The interface and those it is built on (a bridge's ports, a bond's slaves, a VLAN's
    parent, and theirs), each once."""
    out = [iface]
    seen = {iface}
    i = 0
    while i < len(out):
        for entry in r.root.listdir(sysfs.net(out[i])):
            lower = entry.removeprefix("lower_")
            if entry.startswith("lower_") and lower not in seen:
                seen.add(lower)
                out.append(lower)
        i += 1
    return out


# -- what the host runs on -------------------------------------------------------


def scan_in_use(
    r: Reader, pci: dict[PciAddress, PciFunction], netdevs: dict[str, NetInterface]
) -> dict[PciAddress, tuple[str, ...]]:
    reasons: dict[PciAddress, list[str]] = {}

    def add(addr: PciAddress, why: str) -> None:
        lst = reasons.setdefault(addr, [])
        if why not in lst:
            lst.append(why)

    all_mounts = netfs.mounts(r)
    for addr, why in netfs.virtio_uses(r, all_mounts):
        add(addr, why)
    servers = list(netfs.network_mounts(r, all_mounts))
    for majmin, mountpoint, source in mounted_block_devices(r):
        controllers = block_controllers(r, sysfs.block_by_number(majmin))
        for addr, leaf in controllers:
            name = leaf if leaf == source or not source else f"{leaf} under {source}"
            add(addr, f"controller of {mountpoint} ({name})")
        if not controllers:
            server = netfs.iscsi_server(r, r.realpath(sysfs.block_by_number(majmin)))
            if server is not None:
                servers.append(("iscsi", mountpoint, server))
    for what, point, server in servers:
        # The interface that reaches the server, and those it is built on.
        iface = netfs.route_interface(r, server)
        for lower in lower_interfaces(r, iface) if iface is not None else ():
            ln = netdevs.get(lower)
            if ln is None or ln.pci is None:
                continue
            through = "" if lower == iface else f" (through {iface})"
            add(
                ln.pci,
                f"{lower} reaches the server of {netfs.where(point)} ({what} {server}){through}",
            )
    for dev in swap_devices(r):
        for addr, leaf in block_controllers(r, sysfs.block(dev)):
            add(addr, f"swap on {leaf if leaf == dev else f'{leaf} under {dev}'}")
    for iface in busy_interfaces(netdevs):
        n = netdevs[iface]
        for lower in lower_interfaces(r, iface):
            ln = netdevs.get(lower)
            if ln is None or ln.pci is None:
                continue
            through = "" if lower == iface else f" (through {iface})"
            if n.default_route:
                add(ln.pci, f"{lower} carries the default route{through}")
            if n.up and n.has_address:
                add(ln.pci, f"{lower} is up with an address{through}")
    for addr, fn in pci.items():
        if fn.boot_vga:
            add(addr, "boot VGA device")
    return {a: tuple(why) for a, why in sorted(reasons.items())}


def busy_interfaces(netdevs: dict[str, NetInterface]) -> list[str]:
    return [n for n, i in netdevs.items() if i.default_route or (i.up and i.has_address)]


def mounted_block_devices(r: Reader) -> list[tuple[str, str, str]]:
    """(major:minor, mountpoint, device name) of mounted block devices."""
    out: list[tuple[str, str, str]] = []
    info = r.read(sysfs.SELF_MOUNTINFO)
    if info is not None:
        for line in info.splitlines():
            left, sep, right = line.partition(" - ")
            f = left.split()
            rf = right.split()
            if not sep or len(f) < 5 or not _MAJMIN_RE.match(f[2]):
                continue
            source = rf[1] if len(rf) > 1 else ""
            majmin = f[2]
            if majmin.startswith("0:"):
                # Major 0 is no block device (tmpfs, proc, overlay...), except for
                # filesystems that hand out anonymous numbers over real disks
                # (btrfs): their source still names the device.
                dev = block_by_source(r, source)
                if dev is None:
                    continue
                majmin = r.read(f"{dev}/dev") or ""
                if not _MAJMIN_RE.match(majmin):
                    continue
            out.append(
                (majmin, r.mount_point(sysfs.SELF_MOUNTINFO, f[4]), os.path.basename(source))
            )
        return out
    # No mountinfo (old snapshots, hwloc trees): /proc/mounts names the device only.
    for line in (r.read(sysfs.MOUNTS) or "").splitlines():
        f = line.split()
        if len(f) >= 2:
            dev = block_by_source(r, f[0])
            found = r.read(f"{dev}/dev") if dev else None
            if found and _MAJMIN_RE.match(found):
                out.append((found, r.mount_point(sysfs.MOUNTS, f[1]), os.path.basename(f[0])))
    return out


def block_by_source(r: Reader, source: str) -> str | None:
    """The /sys/class/block entry of a mount source such as ``/dev/sda1``,
    ``/dev/mapper/vg-root`` or ``/dev/disk/by-uuid/...``; None if it is no block device."""
    if not source.startswith("/dev/"):
        return None
    name = os.path.basename(r.root.realpath(source))
    if name not in ("", ".", "..") and r.root.exists(sysfs.block(name, "dev")):
        return sysfs.block(name)
    if source.startswith("/dev/mapper/"):
        # A snapshot has no /dev links: device-mapper names are in sysfs too.
        wanted = os.path.basename(source)
        for entry in r.root.listdir(sysfs.CLASS_BLOCK):
            if entry.startswith("dm-") and r.read(sysfs.block(entry, "dm/name")) == wanted:
                return sysfs.block(entry)
    return None


def swap_devices(r: Reader) -> list[str]:
    out: list[str] = []
    for line in (r.read(sysfs.SWAPS) or "").splitlines()[1:]:
        f = line.split()
        # A swap file lives on a mounted filesystem, whose controller is already kept.
        if len(f) >= 2 and f[1] == "partition" and f[0].startswith("/dev/"):
            name = os.path.basename(f[0])
            if name not in ("", ".", ".."):
                out.append(name)
    return out


def block_controllers(r: Reader, link: str) -> list[tuple[PciAddress, str]]:
    """The PCI functions under a block device, following dm/md ``slaves`` down to disks.

    Each device is visited once: stacks are shallow and share disks, and a damaged
    tree's slave link back to a device above would otherwise be walked once per path.
    """
    out: list[tuple[PciAddress, str]] = []
    seen: set[str] = set()
    todo = [link]
    while todo:
        real = r.realpath(todo.pop())
        if real in seen:
            continue
        seen.add(real)
        name = os.path.basename(real)
        addr = nearest_pci(real)
        if addr is not None:
            out.append((addr, name))
            continue
        slaves = r.root.listdir(f"{real}/slaves")
        todo.extend(f"{real}/slaves/{s}" for s in reversed(slaves))
        if not slaves and "/nvme-subsystem/" in real:
            # NVMe multipath: the namespace hangs off a virtual subsystem whose
            # controllers (nvme0, nvme1...) link to their PCI functions.
            parts = real.split("/")
            subsys = "/".join(parts[: parts.index("nvme-subsystem") + 2])
            for entry in r.root.listdir(subsys):
                if _NVME_CTRL_RE.match(entry):
                    ctrl = nearest_pci(r.realpath(f"{subsys}/{entry}"))
                    if ctrl is not None:
                        out.append((ctrl, name))
    return out
