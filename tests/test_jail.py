"""A device exposed in a confined QEMU's root for a hot-plug (guest/jail.py), on real files.

The host is a tree under a temporary directory whose ``dev/vfio`` nodes are real character
devices (made with mknod, with the numbers of ``/dev/null``, ``/dev/zero`` and ``/dev/full``,
which any process may open) and whose ``sys/bus/pci/devices/ADDR/iommu_group`` links are
the kernel's.  The confined QEMU's root is a temporary directory too, and what QEMU's
vfio-pci realize does there is done for real by a child process that chroots into it and
drops to the partition's uid, as QEMU does: stat the device's sysfs directory, read its
group from the link, open the group's node and the container's, and fail to change anything.
The real hot-plug, through apply, is in tests/inside/test_inside_live.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from partitioner.errors import DeviceError, GuestError
from partitioner.guest.jail import (
    expose_device,
    exposed,
    group_link,
    nodev,
    withdraw_all,
    withdraw_device,
)
from partitioner.kernel.root import HostRoot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mknod and chown need root")

UID = 1_879_048_200  # in the partitions' range (planning.confine.USER_BASE + 8)
NIC = "0000:81:00.0"
FN0, FN1 = "0000:42:00.0", "0000:42:00.1"  # two functions, one group


def _numbers(path: str) -> tuple[int, int]:
    rdev = os.stat(path).st_rdev
    return os.major(rdev), os.minor(rdev)


NULL, ZERO, FULL = _numbers("/dev/null"), _numbers("/dev/zero"), _numbers("/dev/full")


def _mknod(path: Path, numbers: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(*numbers))


def _function(host: Path, address: str, group: int) -> None:
    d = host / "sys/bus/pci/devices" / address
    d.mkdir(parents=True, exist_ok=True)
    os.symlink(f"../../../../kernel/iommu_groups/{group}", d / "iommu_group")


@pytest.fixture
def host(tmp_path: Path) -> HostRoot:
    """The container node, groups 7 (claimed: its node is there), 9 (claimed) and 11 (not)."""
    h = tmp_path / "host"
    _mknod(h / "dev/vfio/vfio", NULL)
    _mknod(h / "dev/vfio/7", ZERO)
    _mknod(h / "dev/vfio/9", FULL)
    _function(h, NIC, 7)
    _function(h, FN0, 9)
    _function(h, FN1, 9)
    _function(h, "0000:03:00.0", 11)
    return HostRoot(h)


@pytest.fixture
def chroot(tmp_path: Path) -> Path:
    """An empty root as launch makes it: root's, mode 0555, under a 0700 run directory."""
    run = tmp_path / "run" / "p"
    run.mkdir(parents=True, mode=0o700)
    r = run / "root"
    r.mkdir(mode=0o555)
    os.chmod(r, 0o555)
    return r


def listing(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root``: kind, owner, group, mode, and the node's numbers or link."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISCHR(st.st_mode):
                rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
                out[rel] = ("chr", st.st_uid, st.st_gid, oct(mode), rdev)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", st.st_uid, st.st_gid, oct(mode))
            else:
                out[rel] = ("file", st.st_uid, st.st_gid, oct(mode))
    return out


DIR = ("dir", 0, 0, "0o555")


def test_expose_makes_what_vfio_pci_opens_and_nothing_else(host: HostRoot, chroot: Path) -> None:
    expose_device(host, chroot, UID, NIC, 7)
    assert listing(chroot) == {
        "dev": DIR,
        "dev/vfio": DIR,
        "dev/vfio/vfio": ("chr", UID, UID, "0o600", NULL),
        "dev/vfio/7": ("chr", UID, UID, "0o600", ZERO),
        "sys": DIR,
        "sys/bus": DIR,
        "sys/bus/pci": DIR,
        "sys/bus/pci/devices": DIR,
        f"sys/bus/pci/devices/{NIC}": DIR,
        f"sys/bus/pci/devices/{NIC}/iommu_group": ("link", "../../../../kernel/iommu_groups/7"),
    }
    assert exposed(chroot) == {NIC: 7}
    assert group_link(NIC, 7) == "../../../../kernel/iommu_groups/7"


# What QEMU 7.2's vfio-pci realize does by path, chrooted and as the partition's user
# (hw/vfio/pci.c vfio_realize, hw/vfio/common.c vfio_get_group / vfio_connect_container),
# plus what it must not be able to do.  Run in a forked child: chroot cannot be undone.
def as_qemu(chroot: Path, uid: int, address: str) -> dict[str, Any]:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        out: dict[str, Any] = {}
        try:
            os.close(read_fd)
            os.chroot(chroot)
            os.chdir("/")
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            sysfsdev = f"/sys/bus/pci/devices/{address}"

            def attempt(name: str, fn: Any) -> None:
                try:
                    out[name] = fn()
                except OSError as e:
                    out[name] = errno.errorcode.get(e.errno or 0, str(e.errno))

            attempt("stat", lambda: stat.S_ISDIR(os.stat(sysfsdev).st_mode))
            group = os.path.basename(os.readlink(f"{sysfsdev}/iommu_group"))
            out["group"] = group

            def opens(path: str) -> str:
                os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
                return "ok"

            attempt("open-group", lambda: opens(f"/dev/vfio/{group}"))
            attempt("open-container", lambda: opens("/dev/vfio/vfio"))
            attempt("create", lambda: os.open("/dev/vfio/new", os.O_CREAT | os.O_WRONLY, 0o600))
            attempt("unlink", lambda: os.unlink(f"/dev/vfio/{group}"))
            attempt("write-in-sys", lambda: os.mkdir(f"{sysfsdev}/x"))
        except BaseException as e:
            out["crash"] = repr(e)
        finally:
            os.write(write_fd, json.dumps(out).encode())
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    result: dict[str, Any] = json.loads(data)
    return result


def test_the_confined_user_opens_the_nodes_and_changes_nothing(
    host: HostRoot, chroot: Path
) -> None:
    expose_device(host, chroot, UID, NIC, 7)
    got = as_qemu(chroot, UID, NIC)
    assert got == {
        "stat": True,
        "group": "7",
        "open-group": "ok",
        "open-container": "ok",
        "create": "EACCES",
        "unlink": "EACCES",
        "write-in-sys": "EACCES",
    }
    # Another partition's user gets no further than the nodes' modes.
    other = as_qemu(chroot, UID + 1, NIC)
    assert (other["open-group"], other["open-container"]) == ("EACCES", "EACCES"), other


def test_without_expose_the_confined_user_finds_no_device(chroot: Path) -> None:
    # The control: what a hot-plug meets in the empty root the partition starts with.
    got = as_qemu(chroot, UID, NIC)
    assert got["crash"].startswith("FileNotFoundError"), got


def test_expose_is_idempotent_and_mends_what_drifted(host: HostRoot, chroot: Path) -> None:
    expose_device(host, chroot, UID, NIC, 7)
    want = listing(chroot)
    expose_device(host, chroot, UID, NIC, 7)
    assert listing(chroot) == want
    node = chroot / "dev/vfio/7"
    os.chown(node, 0, 0)
    os.chmod(node, 0o666)
    os.chmod(chroot / "sys", 0o755)
    link = chroot / f"sys/bus/pci/devices/{NIC}/iommu_group"
    link.unlink()
    os.symlink("../../../../kernel/iommu_groups/3", link)
    expose_device(host, chroot, UID, NIC, 7)
    assert listing(chroot) == want
    # A node of the same name with other numbers (a group number of an earlier boot).
    node.unlink()
    os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(*FULL))
    expose_device(host, chroot, UID, NIC, 7)
    assert listing(chroot) == want


def test_withdraw_leaves_the_root_empty_and_may_run_again(host: HostRoot, chroot: Path) -> None:
    expose_device(host, chroot, UID, NIC, 7)
    withdraw_device(host, chroot, NIC, 7)
    assert listing(chroot) == {}
    withdraw_device(host, chroot, NIC, 7)  # again: nothing to do, no error
    assert listing(chroot) == {}
    assert stat.S_IMODE(os.stat(chroot).st_mode) == 0o555  # the root itself stays


def test_withdraw_of_one_group_keeps_the_container_for_another(
    host: HostRoot, chroot: Path
) -> None:
    expose_device(host, chroot, UID, NIC, 7)
    expose_device(host, chroot, UID, FN0, 9)
    withdraw_device(host, chroot, NIC, 7)
    got = listing(chroot)
    assert "dev/vfio/7" not in got and f"sys/bus/pci/devices/{NIC}" not in got
    assert got["dev/vfio/vfio"][0] == "chr" and got["dev/vfio/9"][4] == FULL
    assert exposed(chroot) == {FN0: 9}
    withdraw_device(host, chroot, FN0, 9)
    assert listing(chroot) == {}


def test_withdraw_of_one_function_keeps_its_groups_node_for_the_other(
    host: HostRoot, chroot: Path
) -> None:
    expose_device(host, chroot, UID, FN0, 9)
    expose_device(host, chroot, UID, FN1, 9)
    withdraw_device(host, chroot, FN0, 9)
    assert exposed(chroot) == {FN1: 9}
    assert "dev/vfio/9" in listing(chroot)
    assert as_qemu(chroot, UID, FN1)["open-group"] == "ok"
    withdraw_device(host, chroot, FN1, 9)
    assert listing(chroot) == {}


def test_withdraw_all_clears_what_a_killed_expose_left(host: HostRoot, chroot: Path) -> None:
    expose_device(host, chroot, UID, NIC, 7)
    expose_device(host, chroot, UID, FN0, 9)
    # Killed half-way through a third: its node made, its directory without the link.
    os.mknod(chroot / "dev/vfio/11", stat.S_IFCHR | 0o600, os.makedev(*NULL))
    (chroot / "sys/bus/pci/devices/0000:03:00.0").mkdir(mode=0o555)
    assert withdraw_all(host, chroot) == {NIC: 7, FN0: 9}
    assert listing(chroot) == {}
    assert withdraw_all(host, chroot) == {}


@pytest.mark.parametrize(
    ("address", "group", "says"),
    [
        ("0000:03:00.0", 11, "must be claimed for vfio-pci first"),  # no /dev/vfio/11
        (NIC, 9, "is not in IOMMU group 9 on this host but in group 7"),
        ("0000:05:00.0", 7, "(no such function, or no IOMMU)"),
        ("../../etc", 7, "is not a PCI address"),
    ],
)
def test_expose_refuses_what_would_not_work_and_changes_nothing(
    host: HostRoot, chroot: Path, address: str, group: int, says: str
) -> None:
    with pytest.raises(DeviceError) as e:
        expose_device(host, chroot, UID, address, group)
    assert says in str(e.value)
    assert listing(chroot) == {}


def test_expose_refuses_a_root_that_is_not_a_confined_qemus(host: HostRoot, tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="does not exist: is its partition running confined"):
        expose_device(host, tmp_path / "nothing", UID, NIC, 7)
    mine = tmp_path / "theirs"
    mine.mkdir()
    os.chown(mine, UID, UID)
    with pytest.raises(DeviceError, match="not a directory of root's"):
        expose_device(host, mine, UID, NIC, 7)
    assert os.listdir(mine) == []


@contextlib.contextmanager
def nodev_tmpfs(where: Path) -> Iterator[Path]:
    where.mkdir()
    cp = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "nodev,size=1m,mode=0555", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if cp.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {cp.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_root_on_a_nodev_file_system_is_refused_with_the_reason(
    host: HostRoot, tmp_path: Path
) -> None:
    with nodev_tmpfs(tmp_path / "run") as run:
        assert nodev(run)
        # Why: there a node opens for nobody, root included (the systemd /run of a real host).
        os.mknod(run / "null", stat.S_IFCHR | 0o666, os.makedev(*NULL))
        with pytest.raises(PermissionError):
            os.close(os.open(run / "null", os.O_RDWR))
        os.unlink(run / "null")
        with pytest.raises(DeviceError, match=r"mounted nodev.*PARTITION_RUN_DIR"):
            expose_device(host, run, UID, NIC, 7)
        assert os.listdir(run) == []
    assert not nodev(tmp_path)


def test_a_restart_clears_what_a_dead_qemu_had_exposed_and_nothing_else(
    host: HostRoot, chroot: Path
) -> None:
    from test_argv import CAPS, _placement

    from partitioner.guest.argv import Jail, guest_paths
    from partitioner.guest.launch import _prepare_dirs
    from partitioner.units import MiB

    paths = guest_paths(chroot.parents[1], chroot.parents[2] / "log", "p")
    assert paths.chroot == chroot
    p = _placement("p", (1,), ((0, 128 * MiB),))
    jail = Jail(uid=UID, gid=UID, memlock_bytes=1024 * MiB)
    expose_device(host, chroot, UID, NIC, 7)
    _prepare_dirs(p, paths, CAPS, jail, host)
    assert listing(chroot) == {}
    # What the partitioner did not make there is still refused.
    expose_device(host, chroot, UID, NIC, 7)
    os.mknod(chroot / "dev" / "kvm", stat.S_IFCHR | 0o600, os.makedev(*NULL))
    with pytest.raises(GuestError, match=r"of partition p is not empty \(dev\)"):
        _prepare_dirs(p, paths, CAPS, jail, host)
    assert list(listing(chroot)) == ["dev", "dev/kvm"]


def test_a_root_on_a_nodev_file_system_gets_a_mount_of_its_own_and_loses_it_with_its_run_dir(
    host: HostRoot, tmp_path: Path
) -> None:
    """systemd's /run is nodev: a partition that may receive devices live gets a small
    tmpfs on its QEMU's root, where the nodes expose_device makes open; removing the run
    directory takes the mount away first."""
    from partitioner.guest.jail import give_root_a_mount, remove_run_dir

    with nodev_tmpfs(tmp_path / "run") as run:
        # the run directory itself is made on the nodev file system, as launch makes it
        subprocess.run(["mount", "-o", "remount,mode=0755", str(run)], check=True)
        run_dir = run / "p"
        run_dir.mkdir(mode=0o700)
        root = run_dir / "root"
        root.mkdir(mode=0o555)
        assert nodev(root)
        assert give_root_a_mount(root) is True
        assert os.path.ismount(root) and not nodev(root)
        assert give_root_a_mount(root) is False  # once
        st = os.stat(root)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o555)
        expose_device(host, root, UID, NIC, 7)
        assert exposed(root) == {NIC: 7}
        remove_run_dir(run_dir)
        assert not run_dir.exists()
        assert not os.path.ismount(root)
