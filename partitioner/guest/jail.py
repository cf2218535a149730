"""A device exposed to a confined QEMU for a hot-plug: the few paths of its root that vfio-pci opens.

A confined QEMU (rule 10) chroots into an empty root-owned directory
(``GuestPaths.chroot``) once it is set up, and drops to the partition's uid: from
then on it can open no path of the host.  A device it was started with is no
matter (it opened ``/dev/vfio/N`` before), but a ``device_add vfio-pci`` later
finds the host by path.  QEMU 7.2's vfio-pci realize (``hw/vfio/pci.c``,
``hw/vfio/common.c``), seen by strace inside the emulated server (docs/decisions.md):

- ``stat(SYSFSDEV)``, ``SYSFSDEV`` being ``/sys/bus/pci/devices/ADDR`` (from ``host=``);
- ``readlink(SYSFSDEV/iommu_group)``: the group is the number its basename spells;
- ``realpath(SYSFSDEV/subsystem)``: whether it is a mediated device; missing means
  it is not, which is right for a PCI function;
- ``open(/dev/vfio/N)``, and ``open(/dev/vfio/vfio)`` when it has no container yet;

everything after goes through those descriptors (the device's own descriptor comes
from the group's ``VFIO_GROUP_GET_DEVICE_FD``, its config space and ROM through
its regions).  So :func:`expose_device` makes exactly these in the root, and
nothing else of the host: ``dev/vfio/vfio`` and ``dev/vfio/N``, character devices
with the host nodes' numbers owned by the partition's uid, mode 0600;
``sys/bus/pci/devices/ADDR/iommu_group``, a symbolic link whose basename is N
(pointing where the kernel's does, ``../../../../kernel/iommu_groups/N``, which does
not exist in the root and need not); every directory root's, mode 0555.  QEMU can
read them and open the two nodes; it can create, rename or remove nothing there.
:func:`withdraw_device` removes what :func:`expose_device` made, once the device is
gone from the guest (``DEVICE_DELETED``); both are idempotent, so an undo and a
reconciliation may call them again.

The nodes work only where the root's file system is not mounted ``nodev`` (an open
of a node there is refused, EACCES, root included): systemd mounts ``/run`` so, and
the default run directory is under it.  :func:`expose_device` refuses such a root
with a DeviceError that says so, before it makes anything.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from pathlib import Path

from partitioner.errors import CommandFailed, DeviceError
from partitioner.kernel import sysfs
from partitioner.kernel.root import HostRoot
from partitioner.pci import PciAddress, PciAddressSyntaxError
from partitioner.run import run

DIR_MODE = 0o555
NODE_MODE = 0o600
# The directories expose_device makes, deepest first (the device's own comes before them).
_DIRS = ("sys/bus/pci/devices", "sys/bus/pci", "sys/bus", "sys", "dev/vfio", "dev")


def _in(chroot: Path, kernel_path: str) -> Path:
    """The file of the root that QEMU, chrooted, opens as ``kernel_path``."""
    return chroot / kernel_path.lstrip("/")


def _address(address: str) -> str:
    """The address as QEMU spells ``host=`` in its sysfs path (``0000:81:00.0``)."""
    try:
        return str(PciAddress.parse(address))
    except PciAddressSyntaxError as e:
        raise DeviceError(str(e), address=address) from None


def group_link(address: str, group: int) -> str:
    """The ``iommu_group`` link's target, relative as the kernel writes it."""
    return os.path.relpath(sysfs.iommu_group(group), sysfs.pci_device(address))


def nodev(path: Path) -> bool:
    """True when ``path``'s file system is mounted ``nodev``: device nodes there cannot be opened."""
    return bool(os.statvfs(path).f_flag & os.ST_NODEV)


def _check_root(chroot: Path, address: str) -> None:
    try:
        st = os.lstat(chroot)
    except FileNotFoundError:
        raise DeviceError(
            f"the confined QEMU's root directory {chroot} does not exist: is its partition "
            "running confined (host.confine)?",
            address=address,
            path=str(chroot),
        ) from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
        raise DeviceError(
            f"{chroot} is not a directory of root's: it is not a confined QEMU's root "
            "(the partitioner makes it, root's, mode 0555, when the partition starts)",
            address=address,
            path=str(chroot),
        )
    if nodev(chroot):
        raise DeviceError(
            f"the confined QEMU's root {chroot} is on a file system mounted nodev (systemd "
            "mounts /run so): QEMU could not open a device node made there, so no device can "
            "be hot-plugged into it. Give the partitioner a run directory on a file system "
            "without nodev (PARTITION_RUN_DIR), then restart the partition",
            address=address,
            path=str(chroot),
        )


def _dir(path: Path) -> None:
    """``path`` a directory of root's, mode 0555 (made if missing)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, DIR_MODE)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise DeviceError(
            f"{path} is not a directory: the confined QEMU's root holds what the partitioner "
            "did not make there; stop the partition and remove it",
            path=str(path),
        )
    if (st.st_uid, st.st_gid) != (0, 0):
        os.chown(path, 0, 0, follow_symlinks=False)
    if stat.S_IMODE(st.st_mode) != DIR_MODE:
        os.chmod(path, DIR_MODE)


def _numbers(root: HostRoot, source: str, address: str) -> tuple[int, int]:
    numbers = root.char_device(source)
    if numbers is None:
        raise DeviceError(
            f"{root.path(source)} is not a character device: the IOMMU group must be claimed "
            "for vfio-pci first (and devtmpfs mounted on /dev)",
            address=address,
            path=str(root.path(source)),
        )
    return numbers


def _node(root: HostRoot, path: Path, numbers: tuple[int, int], uid: int) -> None:
    """``path`` a character device ``numbers``, ``uid``'s (user and group), mode 0600."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        root.mknod(path, *numbers, uid=uid, gid=uid, mode=NODE_MODE)
        return
    if stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == numbers:
        if (st.st_uid, st.st_gid) != (uid, uid):
            os.chown(path, uid, uid, follow_symlinks=False)
        if stat.S_IMODE(st.st_mode) != NODE_MODE:
            os.chmod(path, NODE_MODE)
        return
    _remove(path)  # another device's node (group numbers change across boots): replaced
    root.mknod(path, *numbers, uid=uid, gid=uid, mode=NODE_MODE)


def _link(root: HostRoot, path: Path, target: str) -> None:
    try:
        if os.readlink(path) == target:
            return
    except FileNotFoundError:
        root.symlink(path, target)
        return
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: there, but not a link
            raise
    _remove(path)
    root.symlink(path, target)


def _remove(path: Path) -> None:
    """Remove ``path`` (a file, node, link, or a directory of such); nothing if it is gone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        for entry in os.listdir(path):
            _remove(path / entry)
        os.rmdir(path)
    else:
        os.unlink(path)


def expose_device(root: HostRoot, chroot: Path, uid: int, address: str, group: int) -> None:
    """Make PCI function ``address`` of IOMMU group ``group`` reachable by the confined QEMU
    whose root is ``chroot`` and whose uid (and gid) is ``uid``: what its vfio-pci realize
    opens by path (the module's docstring lists it).  The group must be claimed for vfio-pci
    (``/dev/vfio/N`` exists on the host).  The partition's gid is its uid (rule 10).
    Idempotent; DeviceError naming the cause, with nothing made, when it cannot be done (no
    such group node, the function in another group, a nodev root)."""
    addr = _address(address)
    _check_root(chroot, addr)
    on_host = root.readlink_name(sysfs.pci_device(addr, "iommu_group"))
    if on_host != str(group):
        raise DeviceError(
            f"{addr} is not in IOMMU group {group} on this host"
            + (f" but in group {on_host}" if on_host else " (no such function, or no IOMMU)"),
            address=addr,
            path=str(root.path(sysfs.pci_device(addr, "iommu_group"))),
        )
    container = _numbers(root, sysfs.DEV_VFIO_CONTAINER, addr)
    group_node = _numbers(root, sysfs.dev_vfio(group), addr)
    for d in reversed(_DIRS):
        _dir(chroot / d)
    _node(root, _in(chroot, sysfs.DEV_VFIO_CONTAINER), container, uid)
    _node(root, _in(chroot, sysfs.dev_vfio(group)), group_node, uid)
    device = _in(chroot, sysfs.pci_device(addr))
    _dir(device)
    _link(root, _in(chroot, sysfs.pci_device(addr, "iommu_group")), group_link(addr, group))


def exposed(chroot: Path) -> dict[str, int]:
    """address -> IOMMU group of every function exposed in ``chroot`` (read from its links)."""
    out: dict[str, int] = {}
    devices = _in(chroot, sysfs.PCI_DEVICES)
    for entry in _entries(devices):
        try:
            name = os.path.basename(os.readlink(devices / entry / "iommu_group"))
        except OSError:
            continue
        if name.isascii() and name.isdigit():
            out[entry] = int(name)
    return out


def withdraw_device(root: HostRoot, chroot: Path, address: str, group: int) -> None:
    """Remove what :func:`expose_device` made for ``address``: its sysfs directory, the group's
    node unless another exposed function is in that group, the container node once no group
    node is left, and the directories left empty.  Idempotent: what is gone already is no
    matter (an undo, or a reconciliation after a killed command, may call it again)."""
    addr = _address(address)
    _remove(_in(chroot, sysfs.pci_device(addr)))
    if group not in exposed(chroot).values():
        root.remove(_in(chroot, sysfs.dev_vfio(group)))
    _tidy(root, chroot)


def withdraw_all(root: HostRoot, chroot: Path) -> dict[str, int]:
    """Withdraw every exposed function, and whatever a killed :func:`expose_device` left
    half made (a group node without its link, a directory without it): the root is empty
    again, as the partition started with it.  What was exposed is returned (address -> group)."""
    found = exposed(chroot)
    for entry in _entries(_in(chroot, sysfs.PCI_DEVICES)):
        _remove(_in(chroot, sysfs.PCI_DEVICES) / entry)
    for entry in _entries(_in(chroot, "/dev/vfio")):
        if entry.isdigit():
            root.remove(_in(chroot, sysfs.dev_vfio(entry)))
    _tidy(root, chroot)
    return found


def _entries(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _tidy(root: HostRoot, chroot: Path) -> None:
    """The container node once no group node is left, then every directory left empty."""
    if not any(e.isdigit() for e in _entries(_in(chroot, "/dev/vfio"))):
        root.remove(_in(chroot, sysfs.DEV_VFIO_CONTAINER))
    for d in _DIRS:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            if not os.listdir(chroot / d):
                os.rmdir(chroot / d)


def give_root_a_mount(chroot: Path) -> bool:
    """A confined QEMU's root on a ``nodev`` file system (systemd mounts ``/run`` so) gets a
    small tmpfs of its own where device nodes open, so a device can be hot-plugged into it;
    ``nosuid,noexec`` and root's, mode 0555.  True when it was mounted now.  The mount is
    found again by its path (:func:`remove_run_dir` takes it away), so no record is needed."""
    if not nodev(chroot) or os.path.ismount(chroot):
        return False
    try:
        run(
            [
                "mount",
                "-t",
                "tmpfs",
                "-o",
                "mode=0555,uid=0,gid=0,nosuid,noexec,size=1m",
                "partition-root",
                str(chroot),
            ],
            timeout=30,
        )
    except CommandFailed as e:
        raise DeviceError(
            f"the root {chroot} of a confined QEMU that may receive devices live is on a nodev "
            f"file system and a tmpfs could not be mounted on it ({e.output.strip()}): set "
            "PARTITION_RUN_DIR to a directory whose file system allows device nodes"
        ) from e
    return True


def remove_run_dir(run_dir: Path) -> None:
    """Remove a partition's run directory, the mount :func:`give_root_a_mount` put on its
    QEMU's root first (lazily: the QEMU that was chrooted there is gone or going)."""
    chroot = run_dir / "root"
    if os.path.ismount(chroot):
        with contextlib.suppress(CommandFailed):
            run(["umount", "-l", str(chroot)], timeout=30)
    shutil.rmtree(run_dir, ignore_errors=True)
