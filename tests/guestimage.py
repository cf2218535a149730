"""The test guest (``partitioner.testbed.guestimage``), skipping a test where it cannot be built."""

from __future__ import annotations

from pathlib import Path

import pytest

from partitioner.errors import GuestError
from partitioner.testbed import guestimage
from partitioner.testbed.guestimage import KERNEL_CMDLINE

__all__ = ["KERNEL_CMDLINE", "build_guest_initramfs", "guest_kernel"]


def guest_kernel() -> Path:
    try:
        return guestimage.guest_kernel()
    except GuestError as e:
        pytest.skip(str(e))


def build_guest_initramfs(dest_dir: Path) -> Path:
    try:
        return guestimage.build_guest_initramfs(dest_dir)
    except GuestError as e:
        pytest.skip(str(e))
