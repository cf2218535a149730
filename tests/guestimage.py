"""The test guest (``partitioner.testbed.guestimage``), skipping a test where it cannot be built."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from partitioner.errors import GuestError
from partitioner.testbed import guestimage
from partitioner.testbed.guestimage import KERNEL_CMDLINE
from partitioner.testbed.initramfs import bootable_kernel

__all__ = ["KERNEL_CMDLINE", "build_guest_initramfs", "guest_kernel"]


# Inside the emulated server: the guest kernel's ELF image, which tests/test_inside.py
# unpacked on the host and left in the shared output directory.
SHARED_KERNEL = "guest-vmlinux"


def guest_kernel() -> Path:
    """The kernel a test guest boots: its uncompressed ELF image where the kernel has PVH
    (QEMU boots it through that entry), made once and cached; inside the emulated server,
    the one the host made.  A bzImage unpacks itself in the guest, which under TCG takes
    about half of the test guest's boot, and under TCG inside TCG minutes."""
    shared = os.environ.get("TESTBED_OUT")
    if shared and (Path(shared) / SHARED_KERNEL).is_file():
        return Path(shared) / SHARED_KERNEL
    try:
        return bootable_kernel(guestimage.guest_kernel())
    except GuestError as e:
        pytest.skip(str(e))


def build_guest_initramfs(dest_dir: Path) -> Path:
    try:
        return guestimage.build_guest_initramfs(dest_dir)
    except GuestError as e:
        pytest.skip(str(e))
