"""The test guest (``partitioner.testbed.guestimage``), skipping a test where it cannot be built."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from partitioner.errors import GuestError
from partitioner.testbed import guestimage
from partitioner.testbed.guestimage import KERNEL_CMDLINE

__all__ = ["KERNEL_CMDLINE", "build_guest_initramfs", "guest_kernel"]


# Inside the emulated server: the guest kernel's ELF image, which tests/test_inside.py
# unpacked on the host and left in the shared output directory.
SHARED_KERNEL = "guest-vmlinux"


def guest_kernel() -> Path:
    """The kernel a test guest boots.  Inside the emulated server, the uncompressed image the
    host made (QEMU boots it through its PVH entry): a bzImage unpacks itself in the guest,
    which under TCG inside TCG takes longer than the rest of the guest's boot."""
    shared = os.environ.get("TESTBED_OUT")
    if shared and (Path(shared) / SHARED_KERNEL).is_file():
        return Path(shared) / SHARED_KERNEL
    try:
        return guestimage.guest_kernel()
    except GuestError as e:
        pytest.skip(str(e))


def build_guest_initramfs(dest_dir: Path) -> Path:
    try:
        return guestimage.build_guest_initramfs(dest_dir)
    except GuestError as e:
        pytest.skip(str(e))
