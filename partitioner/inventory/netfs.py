"""Network and virtual filesystems the host runs on (rule 5 of docs/manifest.md).

- **9p over virtio**: a mount's source is its tag; the virtio device whose
  ``mount_tag`` names it hangs off its PCI function (virtio-9p-pci) in sysfs.
- **virtiofs**: the source is its tag; ``/sys/fs/virtiofs/N/{tag,device}`` say
  which virtio device carries it (Linux 6.10 and later).  Older kernels do not
  say, so every virtio-fs device is kept then.
- **NFS, CIFS/SMB, Ceph**: the server's address is in the mount (``addr=``,
  ``mon_addr=`` or the source), and the interface that reaches it is the route
  to it (the longest prefix of ``/proc/net/route`` or ``/proc/net/ipv6_route``);
  that interface, and those it is built on, lead to PCI functions.
- **iSCSI**: a disk under an iSCSI session; its connection's ``address``, routed
  the same way.

NBD's server is known only to the process that connected it (nbd-client's
socket), not to sysfs: its interface is kept by the rule for interfaces that are
up with an address (docs/decisions.md, "The host keeps its filesystems").
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from partitioner.inventory.pci import nearest_pci
from partitioner.inventory.reader import Reader
from partitioner.kernel import sysfs
from partitioner.pci import PciAddress

_VIRTIO_FS_ID = 0x1A  # the virtio device type of virtio-fs (the virtio spec, 5.11)
_NET_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "ceph"})
_HEX_RE = re.compile(r"^[0-9a-fA-F]{1,32}$")
_SESSION_RE = re.compile(r"^session([0-9]{1,10})$")
_RTF_UP = 0x1
_RTF_REJECT = 0x200
_MAX_SERVERS = 16  # addresses looked at per mount (Ceph lists its monitors)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str
    source: str
    options: str  # the super block's options (mountinfo's last field)


def where(point: str) -> str:
    return "the root filesystem /" if point == "/" else point


def mounts(r: Reader) -> list[Mount]:
    """The mounts of /proc/self/mountinfo with their type, source and super options."""
    out: list[Mount] = []
    for line in (r.read(sysfs.SELF_MOUNTINFO) or "").splitlines():
        left, sep, right = line.partition(" - ")
        f = left.split()
        rf = right.split()
        if not sep or len(f) < 5 or len(rf) < 2:
            continue
        point = r.mount_point(sysfs.SELF_MOUNTINFO, f[4])
        out.append(Mount(point, rf[0], rf[1], rf[2] if len(rf) > 2 else ""))
    return out


# -- virtual filesystems: the virtio device under them ------------------------------


def virtio_uses(r: Reader, all_mounts: list[Mount]) -> Iterator[tuple[PciAddress, str]]:
    tags9p: dict[str, PciAddress] = {}
    fs_devices: list[PciAddress] = []
    for name in r.root.listdir(sysfs.VIRTIO_DEVICES):
        pci = nearest_pci(r.realpath(sysfs.virtio_device(name)))
        if pci is None:
            continue
        tag = (r.read(sysfs.virtio_device(name, "mount_tag")) or "").strip("\0 \n")
        if tag:
            tags9p[tag] = pci
        kind = r.read_int(sysfs.virtio_device(name, "device"), None, base=16)
        if kind == _VIRTIO_FS_ID:
            fs_devices.append(pci)
    fs_tags: dict[str, PciAddress] = {}
    for entry in r.root.listdir(sysfs.FS_VIRTIOFS):
        tag = (r.read(sysfs.virtiofs(entry, "tag")) or "").strip()
        pci = nearest_pci(r.realpath(sysfs.virtiofs(entry, "device")))
        if tag and pci is not None:
            fs_tags[tag] = pci
    for m in all_mounts:
        if m.fstype == "9p" and "trans=virtio" in m.options.split(","):
            pci = tags9p.get(m.source)
            if pci is not None:
                yield pci, f"virtio transport of {where(m.point)} (9p {m.source})"
        elif m.fstype == "virtiofs":
            pci = fs_tags.get(m.source)
            if pci is not None:
                yield pci, f"virtio transport of {where(m.point)} (virtiofs {m.source})"
            elif not fs_tags:
                # No tags in sysfs on this kernel: any virtio-fs device may carry it.
                for dev in fs_devices:
                    yield (
                        dev,
                        (
                            f"a virtio-fs device, which may carry {where(m.point)} (virtiofs "
                            f"{m.source}; this kernel does not say which device has which tag)"
                        ),
                    )


# -- network filesystems: the interface that reaches the server ---------------------


def servers(m: Mount) -> list[Address]:
    """The server addresses of a network mount, as the kernel keeps them."""
    found: list[str] = []
    for opt in m.options.split(","):
        key, _, value = opt.partition("=")
        if key == "addr":
            found.append(value)
        elif key == "mon_addr":
            found.extend(value.split("/"))
    if m.fstype == "ceph" and ":/" in m.source:
        found.extend(m.source.split(":/", 1)[0].split(","))
    out: list[Address] = []
    for text in found[:_MAX_SERVERS]:
        a = _address(text)
        if a is not None and a not in out:
            out.append(a)
    return out


def _address(text: str) -> Address | None:
    text = text.strip()
    if text.startswith("["):  # [v6]:port
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def route_interface(r: Reader, addr: Address) -> str | None:
    """The interface the kernel routes ``addr`` through: the longest matching prefix, then
    the lowest metric, of /proc/net/route (IPv4) or /proc/net/ipv6_route."""
    best: tuple[int, int, str] | None = None  # (-prefix, metric, iface): smallest wins
    if isinstance(addr, ipaddress.IPv4Address):
        # The kernel prints each address as the hex of its in-memory (network order) word.
        want = struct.unpack("<I", addr.packed)[0]
        for line in (r.read(sysfs.NET_ROUTE) or "").splitlines()[1:]:
            f = line.split()
            if len(f) < 8 or not all(_HEX_RE.match(x) for x in (f[1], f[3], f[7])):
                continue
            dest, flags, mask = int(f[1], 16), int(f[3], 16), int(f[7], 16)
            if not flags & _RTF_UP or flags & _RTF_REJECT or want & mask != dest:
                continue
            key = (-bin(mask).count("1"), int(f[6]) if f[6].isdigit() else 0, f[0])
            best = key if best is None or key < best else best
    else:
        want6 = int.from_bytes(addr.packed, "big")
        for line in (r.read(sysfs.NET_IPV6_ROUTE) or "").splitlines():
            f = line.split()
            if len(f) < 10 or not all(_HEX_RE.match(x) for x in (f[0], f[1], f[5], f[8])):
                continue
            dest, plen, flags = int(f[0], 16), int(f[1], 16), int(f[8], 16)
            if plen > 128 or not flags & _RTF_UP or flags & _RTF_REJECT or f[9] == "lo":
                continue
            if plen and want6 >> (128 - plen) != dest >> (128 - plen):
                continue
            key = (-plen, int(f[5], 16), f[9])
            best = key if best is None or key < best else best
    return None if best is None else best[2]


def network_mounts(r: Reader, all_mounts: list[Mount]) -> Iterator[tuple[str, str, Address]]:
    """(what, mount point, server address) of each network mount's servers."""
    for m in all_mounts:
        if m.fstype in _NET_FS:
            for a in servers(m):
                yield m.fstype, m.point, a


def iscsi_server(r: Reader, block_real: str) -> Address | None:
    """The target address of a disk under an iSCSI session, from its connection."""
    session = next(
        (mt.group(1) for p in block_real.split("/") if (mt := _SESSION_RE.match(p))), None
    )
    if session is None:
        return None
    for name in r.root.listdir(sysfs.CLASS_ISCSI_CONNECTION):
        if name.startswith(f"connection{session}:"):
            a = _address(r.read(sysfs.iscsi_connection(name, "address")) or "")
            if a is not None:
                return a
    return None
