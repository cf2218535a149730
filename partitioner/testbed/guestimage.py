"""A tiny guest for test beds, tests and the demo: a stock kernel and a busybox initramfs
whose /init reports what the guest sees on its serial console, then waits for the ACPI
power button.

Console lines (one each, in this order)::

    GUEST-CPUS 1                      online CPUs the guest kernel counts
    GUEST-MEM-KB 246000               MemTotal
    GUEST-NUMA-NODES 1
    GUEST-SMT 0-1                     thread_siblings_list of CPU 0
    GUEST-PCI 8086:10d3 0000:01:00.0  one line per PCI function the guest sees
    GUEST-NET eth0 52:54:00:5f:00:01  one line per network interface (a passed SR-IOV VF's
                                      MAC is the one its PF set: igbvf is in the image)
    GUEST-READY
    GUEST-POWERDOWN                   when the power button was pressed (then poweroff -f)

and, once at start and then whenever one of them changes (a vCPU, virtio-mem memory or a
PCI function plugged or unplugged; checked every second, with shell builtins for the PCI
list: a fork is dear in a TCG guest inside a TCG server)::

    partition-guest: cpus=2 memtotal_kb=377856 pci=8086:29c0@0000:00:00.0,...

The guest onlines what is hot-plugged, as a partition's guest must (``docs/manifest.md``):
memory blocks as they come (``auto_online_blocks``: ``online_movable``, so that virtio-mem
can take them back), and every offline CPU it finds.

``python -m partitioner.testbed.guestimage DIR`` builds it and prints its path.
"""

from __future__ import annotations

import gzip
import hashlib
import sys
from pathlib import Path

from partitioner.testbed.initramfs import (
    CpioWriter,
    default_kernel,
    module_bytes,
    module_load_order,
    static_busybox,
)

BUSYBOX = Path("/bin/busybox")
KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1"

# evdev gives /dev/input/eventN; button turns the ACPI power button into an input event;
# virtio_pci and virtio_mem drive a dynamic partition's virtio-mem devices; igbvf drives an
# 82576 VF (QEMU's igb) passed to the guest, which learns its MAC from the PF.  All are modules
# in Debian's kernel; their dependencies come along, each loaded after what it needs.
MODULES = ("evdev", "button", "virtio_pci", "virtio_mem", "igbvf")

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# Hot-plugged memory is onlined movable as it comes (virtio-mem plugs at probe already).
echo online_movable > /sys/devices/system/memory/auto_online_blocks 2>/dev/null
while read -r m; do insmod "/lib/modules/$m" 2>/dev/null; done < /lib/modules/order
echo "GUEST-CPUS $(grep -c '^processor' /proc/cpuinfo)"
echo "GUEST-MEM-KB $(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)"
echo "GUEST-NUMA-NODES $(ls -d /sys/devices/system/node/node* 2>/dev/null | wc -l)"
echo "GUEST-SMT $(cat /sys/devices/system/cpu/cpu0/topology/thread_siblings_list)"
for d in /sys/bus/pci/devices/*; do
  [ -e "$d/vendor" ] || continue
  v=$(cat "$d/vendor"); i=$(cat "$d/device")
  echo "GUEST-PCI ${v#0x}:${i#0x} ${d##*/}"
done
for n in /sys/class/net/*; do
  [ "${n##*/}" = lo ] || echo "GUEST-NET ${n##*/} $(cat "$n/address")"
done
for e in /sys/class/input/event*; do
  [ "$(cat "$e/device/name" 2>/dev/null)" = "Power Button" ] || continue
  ( dd if=/dev/input/${e##*/} of=/dev/null bs=24 count=1 2>/dev/null
    echo GUEST-POWERDOWN; poweroff -f ) &
done
(
  last=""
  while true; do
    for f in /sys/devices/system/cpu/cpu[0-9]*/online; do
      [ "$(cat "$f" 2>/dev/null)" = 0 ] && echo 1 > "$f" 2>/dev/null
    done
    now="cpus=$(grep -c '^processor' /proc/cpuinfo)"
    now="$now memtotal_kb=$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)"
    pci=""
    for d in /sys/bus/pci/devices/*; do
      [ -e "$d/vendor" ] || continue
      read v < "$d/vendor"; read i < "$d/device"
      pci="$pci,${v#0x}:${i#0x}@${d##*/}"
    done
    now="$now pci=${pci#,}"
    [ "$now" != "$last" ] && echo "partition-guest: $now" && last=$now
    sleep 1
  done
) &
echo GUEST-READY
while true; do sleep 3600; done
"""


def guest_kernel() -> Path:
    """The newest /boot/vmlinuz-* with its modules (the guest loads those of MODULES)."""
    return default_kernel()


def build_guest_initramfs(dest_dir: Path) -> Path:
    """Build (or reuse, cached by content) the guest initramfs in ``dest_dir``."""
    busybox = static_busybox(BUSYBOX)
    release = guest_kernel().name.removeprefix("vmlinuz-")
    modules = module_load_order(Path("/lib/modules") / release, MODULES)
    h = hashlib.sha256(INIT.encode() + busybox)
    for m in modules:
        h.update(m.name.encode() + m.path.read_bytes())
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / f"guest-initramfs-{h.hexdigest()[:16]}.cpio.gz"
    if out.exists():
        return out
    w = CpioWriter()
    for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules", "tmp"):
        w.directory(d)
    w.char_device("dev/console", 5, 1)
    w.file("bin/busybox", busybox, 0o755)
    w.file("init", INIT.encode(), 0o755)
    for m in modules:
        w.file(f"lib/modules/{m.name}.ko", module_bytes(m.path))
    w.file("lib/modules/order", "".join(f"{m.name}.ko\n" for m in modules).encode())
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(w.finish(), compresslevel=1))
    tmp.rename(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m partitioner.testbed.guestimage DIR")
    print(build_guest_initramfs(Path(sys.argv[1])))
