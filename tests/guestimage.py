"""A tiny test guest: the host's stock kernel and a busybox initramfs whose /init reports what
the guest sees on its serial console, then waits for the ACPI power button.

Console lines (one each, in this order)::

    GUEST-CPUS 1                      online CPUs the guest kernel counts
    GUEST-MEM-KB 246000               MemTotal
    GUEST-NUMA-NODES 1
    GUEST-SMT 0-1                     thread_siblings_list of CPU 0
    GUEST-PCI 8086:10d3 0000:01:00.0  one line per PCI function the guest sees
    GUEST-READY
    GUEST-POWERDOWN                   when the power button was pressed (then poweroff -f)

The initramfs is written as a newc cpio archive here (no cpio tool, no root needed for the
/dev/console node) and cached by content.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import stat
from pathlib import Path

import pytest

BUSYBOX = Path("/bin/busybox")
KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1"

# evdev gives /dev/input/eventN; button turns the ACPI power button into an input event.
# Both are modules in Debian's kernel and have no dependencies.
MODULES = ("kernel/drivers/input/evdev.ko", "kernel/drivers/acpi/button.ko")

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in /lib/modules/*.ko; do insmod "$m" 2>/dev/null; done
echo "GUEST-CPUS $(grep -c '^processor' /proc/cpuinfo)"
echo "GUEST-MEM-KB $(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)"
echo "GUEST-NUMA-NODES $(ls -d /sys/devices/system/node/node* 2>/dev/null | wc -l)"
echo "GUEST-SMT $(cat /sys/devices/system/cpu/cpu0/topology/thread_siblings_list)"
for d in /sys/bus/pci/devices/*; do
  [ -e "$d/vendor" ] || continue
  v=$(cat "$d/vendor"); i=$(cat "$d/device")
  echo "GUEST-PCI ${v#0x}:${i#0x} ${d##*/}"
done
for e in /sys/class/input/event*; do
  [ "$(cat "$e/device/name" 2>/dev/null)" = "Power Button" ] || continue
  ( dd if=/dev/input/${e##*/} of=/dev/null bs=24 count=1 2>/dev/null
    echo GUEST-POWERDOWN; poweroff -f ) &
done
echo GUEST-READY
while true; do sleep 3600; done
"""


def guest_kernel() -> Path:
    """The newest /boot/vmlinuz-*; skips the test when there is none."""
    kernels = sorted(Path("/boot").glob("vmlinuz-*"), key=lambda p: _version_key(p.name))
    readable = [k for k in kernels if os.access(k, os.R_OK)]
    if not readable:
        pytest.skip("no readable /boot/vmlinuz-*: apt-get install linux-image-amd64")
    return readable[-1]


def build_guest_initramfs(dest_dir: Path) -> Path:
    """Build (or reuse) the test initramfs in ``dest_dir``; skips when busybox is missing."""
    if not BUSYBOX.is_file():
        pytest.skip("no /bin/busybox: apt-get install busybox-static")
    kernel = guest_kernel()
    release = kernel.name.removeprefix("vmlinuz-")
    modules = [Path("/lib/modules") / release / m for m in MODULES]
    modules = [m for m in modules if m.is_file()]
    busybox = BUSYBOX.read_bytes()
    h = hashlib.sha256(INIT.encode() + busybox)
    for m in modules:
        h.update(m.read_bytes())
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / f"guest-initramfs-{h.hexdigest()[:16]}.cpio.gz"
    if out.exists():
        return out
    w = _Newc()
    for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules", "tmp"):
        w.add(d, stat.S_IFDIR | 0o755)
    w.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    w.add("bin/busybox", stat.S_IFREG | 0o755, busybox)
    w.add("init", stat.S_IFREG | 0o755, INIT.encode())
    for m in modules:
        w.add(f"lib/modules/{m.name}", stat.S_IFREG | 0o644, m.read_bytes())
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(w.finish(), compresslevel=1))
    tmp.rename(out)
    return out


class _Newc:
    """The kernel's initramfs format: cpio "newc" (Documentation/driver-api/early-userspace)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = [
            self.ino,
            mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(mode) else 1,
            0,  # mtime: fixed, so that the archive depends on its content only
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(name) + 1,
            0,
        ]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08x" % f for f in fields))
        self.buf.write(name.encode() + b"\0")
        self._pad()
        self.buf.write(data)
        self._pad()

    def finish(self) -> bytes:
        self.ino = 0
        self.add("TRAILER!!!", 0)
        return self.buf.getvalue()

    def _pad(self) -> None:
        self.buf.write(b"\0" * (-self.buf.tell() % 4))


def _version_key(name: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", name)]
