"""Ask the kernel itself whether a group can be handed to QEMU: the VFIO ioctls, bound with cffi.

ABI mode (no compiler at run time), through the ``ioctl`` plumbing
``guest/kvm.py`` shares (``partitioner/kernel/ioctl.py``): the structures are declared
as ``linux/vfio.h`` lays them out and the request numbers are computed the way
the kernel's ``_IO()`` macro does.  The sequence is the one
Documentation/driver-api/vfio.rst shows: open the container, check the API
version and the type1 IOMMU extension, open the group, ask its status, attach
it to the container, set the IOMMU model, then get each device's fd and info.
Everything is closed again before returning, so that QEMU can open the group.
"""

from __future__ import annotations

import errno as errno_mod
import os
from collections.abc import Collection, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from partitioner.errors import DeviceError
from partitioner.inventory.model import Host
from partitioner.kernel import sysfs
from partitioner.kernel.ioctl import IO as _IO
from partitioner.kernel.ioctl import IOC as _IOC  # noqa: F401 (the kernel's macro, as tests check it here)
from partitioner.kernel.ioctl import Binding, describe, errname
from partitioner.kernel.root import HostRoot
from partitioner.vfio.claim import VIABLE_DRIVERS
from partitioner.vfio.preview import stays_with_host

_binding = Binding(
    """
struct vfio_group_status {
    uint32_t argsz;
    uint32_t flags;
};
struct vfio_device_info {
    uint32_t argsz;
    uint32_t flags;
    uint32_t num_regions;
    uint32_t num_irqs;
    uint32_t cap_offset;
};
struct vfio_pci_dependent_device {
    uint32_t group_id;
    uint16_t segment;
    uint8_t bus;
    uint8_t devfn;
};
struct vfio_pci_hot_reset_info {
    uint32_t argsz;
    uint32_t flags;
    uint32_t count;
    struct vfio_pci_dependent_device devices[];
};
"""
)

VFIO_API_VERSION = 0
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_TYPE = ord(";")
VFIO_BASE = 100

# linux/vfio.h declares them all with _IO(): the argument's size is not encoded.
VFIO_GET_API_VERSION = _IO(VFIO_TYPE, VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = _IO(VFIO_TYPE, VFIO_BASE + 1)
VFIO_SET_IOMMU = _IO(VFIO_TYPE, VFIO_BASE + 2)
VFIO_GROUP_GET_STATUS = _IO(VFIO_TYPE, VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 5)
VFIO_GROUP_GET_DEVICE_FD = _IO(VFIO_TYPE, VFIO_BASE + 6)
VFIO_DEVICE_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 7)
VFIO_DEVICE_GET_PCI_HOT_RESET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)

VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1
VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1

CONTAINER_PATH = sysfs.DEV_VFIO_CONTAINER


@dataclass(frozen=True)
class GroupStatus:
    viable: bool
    container_set: bool


@dataclass(frozen=True)
class DeviceInfo:
    address: str
    flags: int
    num_regions: int
    num_irqs: int
    # Without a reset of its own: the functions a reset of its bus or slot reaches, as
    # VFIO_DEVICE_GET_PCI_HOT_RESET_INFO lists them; None when the kernel cannot reset
    # its bus (ENODEV: a root bus, a quirk's no_bus_reset) or was not asked.
    bus_reset_reaches: tuple[str, ...] | None = None

    @property
    def can_reset(self) -> bool:
        return bool(self.flags & VFIO_DEVICE_FLAGS_RESET)

    @property
    def is_pci(self) -> bool:
        return bool(self.flags & VFIO_DEVICE_FLAGS_PCI)


def _ioctl(fd: int, request: int, arg: Any, *, what: str, address: str = "", path: str = "") -> int:
    ret = _binding.ioctl(fd, request, arg)
    if ret < 0:
        code = _binding.errno
        raise DeviceError(
            f"{what}: the kernel answered {describe(code)}",
            address=address,
            path=path,
            errno=code,
        )
    return ret


def _open(root: HostRoot, kernel_path: str, *, what: str, hint: str) -> int:
    try:
        return os.open(root.path(kernel_path), os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        cause = {
            errno_mod.ENOENT: hint,
            errno_mod.EBUSY: "it is already open: a running QEMU (or another partition) holds it",
            errno_mod.EACCES: "permission denied: VFIO needs root",
            errno_mod.EPERM: "permission denied: VFIO needs root",
        }.get(e.errno or 0, e.strerror or "")
        raise DeviceError(
            f"cannot open {kernel_path} ({what}): {errname(e.errno or 0)}: {cause}",
            path=kernel_path,
            errno=e.errno,
        ) from e


@contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


class Container:
    """An open VFIO container (``/dev/vfio/vfio``) whose API and IOMMU model were checked."""

    def __init__(self, fd: int, iommu_type: int) -> None:
        self.fd = fd
        self.iommu_type = iommu_type

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_container(root: HostRoot) -> Container:
    """Open ``/dev/vfio/vfio`` and check the API version and a type1 IOMMU model."""
    fd = _open(
        root,
        CONTAINER_PATH,
        what="the VFIO container",
        hint="the vfio module is not loaded, or this host has no IOMMU "
        "(enable VT-d / AMD-Vi and boot with intel_iommu=on or amd_iommu=on, then modprobe vfio-pci)",
    )
    try:
        version = _ioctl(
            fd, VFIO_GET_API_VERSION, _binding.ffi.cast("int", 0), what="VFIO_GET_API_VERSION"
        )
        if version != VFIO_API_VERSION:
            raise DeviceError(
                f"{CONTAINER_PATH} speaks VFIO API version {version}, not {VFIO_API_VERSION}",
                path=CONTAINER_PATH,
            )
        # v2 first: it is what QEMU uses when the kernel offers it.
        for model in (VFIO_TYPE1v2_IOMMU, VFIO_TYPE1_IOMMU):
            if _ioctl(
                fd,
                VFIO_CHECK_EXTENSION,
                _binding.ffi.cast("int", model),
                what="VFIO_CHECK_EXTENSION",
            ):
                return Container(fd, model)
        raise DeviceError(
            f"{CONTAINER_PATH} offers no type1 IOMMU model (is vfio_iommu_type1 loaded?)",
            path=CONTAINER_PATH,
        )
    except BaseException:
        os.close(fd)
        raise


def _open_group(root: HostRoot, group: int) -> int:
    return _open(
        root,
        sysfs.dev_vfio(group),
        what=f"IOMMU group {group}",
        hint="no function of the group is bound to vfio-pci (claim it first)",
    )


def _status_of(fd: int, group: int) -> GroupStatus:
    st = _binding.ffi.new("struct vfio_group_status *")
    st.argsz = _binding.ffi.sizeof("struct vfio_group_status")
    _ioctl(fd, VFIO_GROUP_GET_STATUS, st, what=f"VFIO_GROUP_GET_STATUS of group {group}")
    flags = int(st.flags)
    return GroupStatus(
        viable=bool(flags & VFIO_GROUP_FLAGS_VIABLE),
        container_set=bool(flags & VFIO_GROUP_FLAGS_CONTAINER_SET),
    )


def group_status(root: HostRoot, group: int) -> GroupStatus:
    """VFIO_GROUP_GET_STATUS of ``/dev/vfio/<group>``."""
    with _fd(_open_group(root, group)) as fd:
        return _status_of(fd, group)


def device_info(group_fd: int, address: str) -> DeviceInfo:
    """VFIO_GROUP_GET_DEVICE_FD then VFIO_DEVICE_GET_INFO for one function of an attached group."""
    name = _binding.ffi.new("char[]", address.encode())
    dev = _ioctl(
        group_fd,
        VFIO_GROUP_GET_DEVICE_FD,
        name,
        what=f"VFIO_GROUP_GET_DEVICE_FD for {address}",
        address=address,
    )
    with _fd(dev):
        info = _binding.ffi.new("struct vfio_device_info *")
        info.argsz = _binding.ffi.sizeof("struct vfio_device_info")
        _ioctl(
            dev,
            VFIO_DEVICE_GET_INFO,
            info,
            what=f"VFIO_DEVICE_GET_INFO of {address}",
            address=address,
        )
        flags = int(info.flags)
        reaches = None if flags & VFIO_DEVICE_FLAGS_RESET else hot_reset_reach(dev, address)
        return DeviceInfo(address, flags, int(info.num_regions), int(info.num_irqs), reaches)


def hot_reset_reach(device_fd: int, address: str) -> tuple[str, ...] | None:
    """VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: the functions a reset of the device's bus (or
    slot) reaches, that VFIO_DEVICE_PCI_HOT_RESET needs the same user to hold; None when
    the kernel can reset neither (ENODEV).

    Asked twice, as the kernel wants: a header alone gets ENOSPC and the count, then an
    array of that size.
    """
    hdr = _binding.ffi.new("struct vfio_pci_hot_reset_info *")
    hdr.argsz = _binding.ffi.sizeof("struct vfio_pci_hot_reset_info")
    what = f"VFIO_DEVICE_GET_PCI_HOT_RESET_INFO of {address}"
    if _binding.ioctl(device_fd, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, hdr) >= 0:
        return ()
    code = _binding.errno
    if code == errno_mod.ENODEV:
        return None
    if code != errno_mod.ENOSPC:
        raise DeviceError(
            f"{what}: the kernel answered {describe(code)}", address=address, errno=code
        )
    count = int(hdr.count)
    full = _binding.ffi.new("struct vfio_pci_hot_reset_info *", {"devices": count})
    full.argsz = _binding.ffi.sizeof(
        "struct vfio_pci_hot_reset_info"
    ) + count * _binding.ffi.sizeof("struct vfio_pci_dependent_device")
    _ioctl(device_fd, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, full, what=what, address=address)
    return tuple(
        dependent_address(int(d.segment), int(d.bus), int(d.devfn))
        for d in full.devices[0 : int(full.count)]
    )


def dependent_address(segment: int, bus: int, devfn: int) -> str:
    """A PCI address as sysfs spells it, from the kernel's (segment, bus, devfn)."""
    return f"{segment:04x}:{bus:02x}:{devfn >> 3:02x}.{devfn & 7}"


def unreset(
    infos: list[DeviceInfo], reset_none_ok: Collection[str], held: Collection[str]
) -> list[str]:
    """The functions nothing resets, by the kernel's word: no reset flag, and either no bus
    reset or one that reaches a function the partition (``held``) does not hold; those in
    ``reset_none_ok`` are accepted as they are."""
    out: list[str] = []
    for i in infos:
        if i.can_reset or i.address in reset_none_ok:
            continue
        reach = i.bus_reset_reaches
        if reach is not None and set(held).issuperset(reach):
            continue
        out.append(i.address)
    return out


def _not_viable_members(root: HostRoot, host: Host, group: int) -> list[tuple[str, str]]:
    """(address, sentence) for each member whose driver keeps the group from being viable."""
    by_addr = {str(a): fn for a, fn in host.pci.items()}
    out: list[tuple[str, str]] = []
    for a in root.listdir(sysfs.iommu_group(group, "devices")):
        drv = root.readlink_name(sysfs.pci_device(a, "driver"))
        if drv is None or drv in VIABLE_DRIVERS:
            continue
        fn = by_addr.get(a)
        what = f" ({fn.id})" if fn is not None else ""
        if fn is not None and stays_with_host(fn):
            why = (
                "a bridge or chipset function may stay in the group only on pcieport, "
                "pci-stub or no driver"
            )
        else:
            why = "every endpoint of the group must be claimed together"
        out.append((a, f"{a}{what} is still bound to {drv} ({why})"))
    return out


def check_group(
    root: HostRoot,
    host: Host,
    group: int,
    *,
    reset_none_ok: set[str] | frozenset[str] = frozenset(),
    partition: Collection[str] = (),
) -> list[DeviceInfo]:
    """Ask the kernel whether QEMU will be able to use ``group``; DeviceError naming why not.

    Every function of the group bound to vfio-pci is opened and its info read;
    one without a reset is refused unless its address is in ``reset_none_ok`` or the
    kernel can reset its bus and everything that reset reaches is in the group or in
    ``partition`` (the addresses of the partition's devices): QEMU then resets it with
    VFIO_DEVICE_PCI_HOT_RESET.
    """
    infos: list[DeviceInfo] = []
    with ExitStack() as stack:
        container = stack.enter_context(open_container(root))
        gfd = stack.enter_context(_fd(_open_group(root, group)))
        status = _status_of(gfd, group)
        if not status.viable:
            who = _not_viable_members(root, host, group)
            raise DeviceError(
                f"IOMMU group {group} is not viable: "
                + (
                    "; ".join(s for _, s in who)
                    if who
                    else "the kernel says a member is held by a driver other than vfio-pci"
                ),
                address=who[0][0] if who else "",
                path=sysfs.dev_vfio(group),
            )
        if status.container_set:
            raise DeviceError(
                f"IOMMU group {group} is already attached to a container: "
                "a running QEMU (or another partition) holds it",
                path=sysfs.dev_vfio(group),
            )
        cfd = _binding.ffi.new("int *", container.fd)
        _ioctl(
            gfd, VFIO_GROUP_SET_CONTAINER, cfd, what=f"VFIO_GROUP_SET_CONTAINER of group {group}"
        )
        _ioctl(
            container.fd,
            VFIO_SET_IOMMU,
            _binding.ffi.cast("int", container.iommu_type),
            what=f"VFIO_SET_IOMMU for group {group}",
        )
        members = root.listdir(sysfs.iommu_group(group, "devices"))
        for a in members:
            if root.readlink_name(sysfs.pci_device(a, "driver")) != "vfio-pci":
                continue
            infos.append(device_info(gfd, a))
    held = {*partition, *members}
    refused = unreset(infos, reset_none_ok, held)
    if refused:
        raise DeviceError(
            f"{', '.join(refused)} in IOMMU group {group} cannot be reset (VFIO reports no reset "
            "method, nor a reset of its bus that reaches only this partition's functions): a "
            "guest that restarts cannot be given a clean device; add `reset: none-ok` "
            "to the device in the manifest to accept it",
            address=refused[0],
            path=sysfs.dev_vfio(group),
        )
    return infos
