"""The cffi binding of the VFIO ioctls: numbers and layouts against linux/vfio.h, and its errors.

This machine has no IOMMU and no /dev/vfio: the calls that need one run
inside the emulated server (tests/inside/test_inside_vfio.py).  Here the
binding's arithmetic is checked against the kernel's header (by hand, and by
the C compiler when one is installed), and its error paths against the real
kernel, which answers ENOTTY to a VFIO ioctl on a file that is not VFIO's.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from partitioner.errors import DeviceError
from partitioner.inventory.model import Host
from partitioner.kernel.root import HostRoot
from partitioner.run import run
from partitioner.vfio import ioctl as v

HEADER = Path("/usr/include/linux/vfio.h")

# _IO(';', 100 + n) = (0 << 30) | (0 << 16) | (0x3b << 8) | (100 + n), worked out by hand.
BY_HAND = {
    "VFIO_GET_API_VERSION": 0x3B64,
    "VFIO_CHECK_EXTENSION": 0x3B65,
    "VFIO_SET_IOMMU": 0x3B66,
    "VFIO_GROUP_GET_STATUS": 0x3B67,
    "VFIO_GROUP_SET_CONTAINER": 0x3B68,
    "VFIO_GROUP_UNSET_CONTAINER": 0x3B69,
    "VFIO_GROUP_GET_DEVICE_FD": 0x3B6A,
    "VFIO_DEVICE_GET_INFO": 0x3B6B,
    "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO": 0x3B70,
}


def empty_host() -> Host:
    return Host(
        cpus={},
        nodes={},
        pci={},
        iommu_groups={},
        in_use={},
        netdevs={},
        has_kvm=False,
        has_iommu=False,
        hugepage_sizes=(),
    )


def test_request_numbers_by_hand() -> None:
    for name, value in BY_HAND.items():
        assert getattr(v, name) == value, name
    assert v.VFIO_TYPE == 0x3B
    assert v._IOC(2, ord("k"), 3, 8) == (2 << 30) | (8 << 16) | (ord("k") << 8) | 3


def test_struct_layouts_by_hand() -> None:
    assert v._binding.ffi.sizeof("struct vfio_group_status") == 8
    assert v._binding.ffi.sizeof("struct vfio_device_info") == 20
    assert v._binding.ffi.offsetof("struct vfio_device_info", "num_regions") == 8
    assert v._binding.ffi.offsetof("struct vfio_device_info", "num_irqs") == 12
    assert v._binding.ffi.offsetof("struct vfio_device_info", "cap_offset") == 16
    assert v._binding.ffi.sizeof("struct vfio_pci_hot_reset_info") == 12
    assert v._binding.ffi.sizeof("struct vfio_pci_dependent_device") == 8
    assert v._binding.ffi.offsetof("struct vfio_pci_dependent_device", "devfn") == 7


@pytest.mark.skipif(
    shutil.which("cc") is None or not HEADER.exists(), reason="needs a C compiler and linux/vfio.h"
)
def test_numbers_and_layouts_match_the_kernel_header(tmp_path: Path) -> None:
    """Let the compiler evaluate the header's own macros and sizeofs."""
    names = [
        *BY_HAND,
        "VFIO_API_VERSION",
        "VFIO_TYPE1_IOMMU",
        "VFIO_TYPE1v2_IOMMU",
        "VFIO_GROUP_FLAGS_VIABLE",
        "VFIO_GROUP_FLAGS_CONTAINER_SET",
        "VFIO_DEVICE_FLAGS_RESET",
        "VFIO_DEVICE_FLAGS_PCI",
    ]
    lines = [f'printf("{n} %lu\\n", (unsigned long)({n}));' for n in names]
    for s in ("vfio_group_status", "vfio_device_info", "vfio_pci_hot_reset_info"):
        lines.append(f'printf("sizeof {s} %zu\\n", sizeof(struct {s}));')
    for f in ("flags", "num_regions", "num_irqs"):
        lines.append(f'printf("offsetof {f} %zu\\n", offsetof(struct vfio_device_info, {f}));')
    src = tmp_path / "v.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <linux/vfio.h>\n"
        "int main(void) {\n" + "\n".join(lines) + "\nreturn 0; }\n"
    )
    exe = tmp_path / "v"
    run(["cc", "-o", str(exe), str(src)], timeout=120)
    out = run([str(exe)]).stdout
    got = dict(line.rsplit(" ", 1) for line in out.splitlines())
    for n in names:
        assert int(got[n]) == getattr(v, n), n
    assert int(got["sizeof vfio_group_status"]) == v._binding.ffi.sizeof("struct vfio_group_status")
    # Newer headers may grow vfio_device_info (a trailing pad); the kernel takes any argsz
    # that covers num_irqs, so only the fields read here must sit where the kernel puts them.
    assert int(got["sizeof vfio_device_info"]) >= v._binding.ffi.sizeof("struct vfio_device_info")
    for f in ("flags", "num_regions", "num_irqs"):
        assert int(got[f"offsetof {f}"]) == v._binding.ffi.offsetof("struct vfio_device_info", f)
    assert int(got["sizeof vfio_pci_hot_reset_info"]) == v._binding.ffi.sizeof(
        "struct vfio_pci_hot_reset_info"
    )


def test_missing_container_is_a_clean_device_error() -> None:
    if Path("/dev/vfio/vfio").exists():
        pytest.skip("this machine has VFIO")
    with pytest.raises(DeviceError) as e:
        v.open_container(HostRoot("/"))
    assert e.value.path == "/dev/vfio/vfio"
    assert e.value.errno == errno.ENOENT
    assert "intel_iommu=on" in str(e.value)


def test_check_group_without_vfio_is_a_clean_device_error(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="cannot open /dev/vfio/vfio"):
        v.check_group(HostRoot(tmp_path), empty_host(), 19, reset_none_ok=set())


def fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_ioctl_errors_from_the_real_kernel_and_no_fd_leaks(tmp_path: Path) -> None:
    """A container path that is a plain file: the kernel answers ENOTTY to the VFIO ioctl."""
    (tmp_path / "dev/vfio").mkdir(parents=True)
    (tmp_path / "dev/vfio/vfio").write_text("")
    before = fds()
    with pytest.raises(DeviceError, match="VFIO_GET_API_VERSION: the kernel answered ENOTTY") as e:
        v.open_container(HostRoot(tmp_path))
    assert e.value.errno == errno.ENOTTY
    assert fds() == before


def test_group_status_ioctl_reaches_the_kernel(tmp_path: Path) -> None:
    (tmp_path / "dev/vfio").mkdir(parents=True)
    (tmp_path / "dev/vfio/7").write_text("")
    before = fds()
    with pytest.raises(DeviceError, match=r"VFIO_GROUP_GET_STATUS of group 7: .*ENOTTY"):
        v.group_status(HostRoot(tmp_path), 7)
    with pytest.raises(DeviceError, match="no function of the group is bound to vfio-pci"):
        v.group_status(HostRoot(tmp_path), 8)
    assert fds() == before


def test_device_info_flags() -> None:
    info = v.DeviceInfo("0000:01:00.0", v.VFIO_DEVICE_FLAGS_PCI, 9, 5)
    assert info.is_pci and not info.can_reset
    assert v.DeviceInfo("0000:01:00.0", 3, 9, 5).can_reset
