"""The emulated server's initramfs: busybox, the modules that reach the 9p root, and ``/init``.

The Debian kernel builds virtio and 9p as modules, so they must be loaded
before the host's filesystem can be mounted; they come from the kernel's own
``/lib/modules/VERSION`` in ``modules.dep`` order.  Built archives are cached
under ``$PARTITION_CACHE_DIR`` (or ``/var/cache/partition/testbed``), keyed by
the kernel version and a hash of everything that goes in.

``/init`` (busybox ``sh``) mounts the host's ``/`` read-only over 9p (tag
``hostroot``), gives it private ``/proc``, ``/sys``, ``/dev``, ``/tmp``, ``/run``
and ``/var``, mounts the control share (``tbctl``) at ``/run/testbed`` and the
output share (``tbout``) at ``/run/testbed-out``, and runs ``/run/testbed/job``
in a chroot with its output on ttyS1, once every present CPU was seen to take
local timer interrupts (otherwise it names the others in ``/run/testbed/timerless``
and powers off, and the host boots the server again).  The job's exit status is written to
``/run/testbed/rc`` (the host reads it from the control directory) and the
machine powers off.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import lzma
import os
import stat
import struct
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from partitioner.errors import GuestError, PreconditionError

BUSYBOX = "/bin/busybox"

# What the 9p root needs, before it is mounted (the test bed boots from it); dependencies are
# added from modules.dep, so this names only the leaves.
ROOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p")

CTL_DIR = "/run/testbed"
OUT_DIR = "/run/testbed-out"
# Written by /init when a CPU of the emulated server takes no timer interrupts.
TIMERLESS = "timerless"
TIMER_CHECK_SECONDS = 2
# Written by /init every second while the job runs (a count): the caller's sign of life.
HEARTBEAT = "heartbeat"

# 9p's default msize (8KiB in 6.1) makes every read of the host's files slow;
# 512000 is the most virtio transport accepts.  The root is read-only and
# nothing on the host changes it during a run, so its pages may be cached.
_ROOT_MOUNT_OPTS = "trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro"
_RW_MOUNT_OPTS = "trans=virtio,version=9p2000.L,msize=512000"

# Given two readings of /proc/interrupts' header and LOC line (files 1 and 2) and
# the present CPUs (-v present="0 1 ..."): the CPUs missing from either reading or
# whose count of local timer interrupts did not grow.
TIMER_CHECK_AWK = r"""
FNR == 1 { n = split($0, h); for (i = 1; i <= n; i++) col[FILENAME, substr(h[i], 4)] = i + 1; next }
$1 == "LOC:" { for (i = 2; i <= NF; i++) v[FILENAME, i] = $i }
END {
    k = split(present, p, " ")
    for (j = 1; j <= k; j++) {
        c = p[j]; a = col[ARGV[1], c]; b = col[ARGV[2], c]
        if (!a || !b || v[ARGV[2], b] + 0 <= v[ARGV[1], a] + 0) printf "%d ", c
    }
}
"""

INIT_SCRIPT = f"""#!/bin/sh
# /init of the partition testbed.  Messages go to the console (ttyS0, the kernel log).
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
say() {{ echo "testbed-init: $*" > /dev/console; }}
die() {{ say "FAILED: $*"; poweroff -f; sleep 5; }}
say "loading modules"
while read -r m; do
    insmod "/modules/$m" || die "insmod $m"
done < /modules/order
mkdir -p /newroot
mount -t 9p -o {_ROOT_MOUNT_OPTS} hostroot /newroot || die "mount the host root over 9p"
R=/newroot
mount -t proc proc $R/proc || die "mount proc"
mount -t sysfs sys $R/sys || die "mount sysfs"
mount -t devtmpfs dev $R/dev || die "mount devtmpfs"
# What systemd mounts on a real host: QEMU's mem-path and the cgroup tree may be wanted.
mkdir -p $R/dev/pts $R/dev/shm $R/dev/hugepages
mount -t devpts -o gid=5,mode=620 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t hugetlbfs -o pagesize=2M hugetlbfs $R/dev/hugepages
mount -t tmpfs -o mode=1777 tmpfs $R/tmp || die "mount /tmp"
mount -t tmpfs -o mode=755 tmpfs $R/run || die "mount /run"
# All of /var is private: /var/lib/partition may not exist on the read-only host,
# and /var/log, /var/tmp, /var/cache must be writable.
mount -t tmpfs -o mode=755 tmpfs $R/var || die "mount /var"
mkdir -p $R/var/lib/partition $R/var/log $R/var/cache $R/var/tmp $R/run/lock
chmod 1777 $R/var/tmp
ln -s /run $R/var/run
ln -s /run/lock $R/var/lock
if [ -d $R/sys/fs/cgroup ]; then mount -t cgroup2 cgroup2 $R/sys/fs/cgroup; fi
mkdir -p $R{CTL_DIR} $R{OUT_DIR}
mount -t 9p -o {_RW_MOUNT_OPTS} tbctl $R{CTL_DIR} || die "mount the control share"
mount -t 9p -o {_RW_MOUNT_OPTS} tbout $R{OUT_DIR} || die "mount the output share"
# Every CPU must run and its local timer tick before the job runs.  Under TCG an
# emulated CPU has been seen to lose its timer from the boot on; a job that needs
# an RCU grace period then waits for ever.  With busy loops on every present CPU,
# a CPU that is not online or whose count of local timer interrupts stays put for
# {TIMER_CHECK_SECONDS}s is named in {TIMERLESS}, and the caller boots the server again.
# Two loops on each: a nohz_full CPU (a site's boot-time settings) stops its tick
# while it runs one task alone, and keeps it while two share it.
present=$(awk -F, '{{ for (i = 1; i <= NF; i++) {{ n = split($i, r, "-");
    for (c = r[1]; c <= r[n]; c++) printf "%d ", c }} }}' /sys/devices/system/cpu/present)
pids=""
for c in $present; do
    for loop in 1 2; do
        taskset -c "$c" sh -c 'while :; do :; done' 2>/dev/null &
        pids="$pids $!"
    done
done
{{ head -n 1 /proc/interrupts; grep '^ *LOC:' /proc/interrupts; }} > /loc0
sleep {TIMER_CHECK_SECONDS}
{{ head -n 1 /proc/interrupts; grep '^ *LOC:' /proc/interrupts; }} > /loc1
kill $pids 2>/dev/null
stuck=$(echo $(awk -f /timer-check.awk -v present="$present" /loc0 /loc1))
if [ -n "$stuck" ]; then
    say "CPU $stuck: not online, or no local timer interrupts in {TIMER_CHECK_SECONDS}s"
    echo $stuck > $R{CTL_DIR}/{TIMERLESS}
    umount $R{OUT_DIR} $R{CTL_DIR}
    poweroff -f
fi
# ttyS1 carries the command's bytes to the caller unchanged (no CR added to LF).
stty -F /dev/ttyS1 raw -echo 115200
echo up > $R{CTL_DIR}/started
say "running the job"
(n=0; while :; do n=$((n + 1)); echo $n > $R{CTL_DIR}/{HEARTBEAT}; sleep 1; done) &
beat=$!
chroot $R /bin/sh {CTL_DIR}/job < /dev/null > /dev/ttyS1 2>&1
echo $? > $R{CTL_DIR}/rc
kill $beat
sync
umount $R{OUT_DIR} $R{CTL_DIR}
poweroff -f
"""


@dataclass(frozen=True)
class KernelModule:
    name: str  # as in modules.dep, without directory or suffix: "9pnet_virtio"
    path: Path


def kernel_version(kernel: str | os.PathLike[str]) -> str:
    """``/boot/vmlinuz-6.1.0-56-amd64`` -> ``6.1.0-56-amd64``."""
    name = Path(kernel).name
    if not name.startswith("vmlinuz-"):
        raise GuestError(
            f"cannot tell the version of kernel {kernel} (expected /boot/vmlinuz-VERSION)"
        )
    return name[len("vmlinuz-") :]


def default_kernel(boot: Path = Path("/boot")) -> Path:
    """The newest ``/boot/vmlinuz-*`` that has its modules installed."""
    found = sorted(
        (k for k in boot.glob("vmlinuz-*") if Path("/lib/modules", kernel_version(k)).is_dir()),
        key=lambda k: [
            int(x) if x.isdigit() else x for x in kernel_version(k).replace("-", ".").split(".")
        ],
    )
    if not found:
        raise PreconditionError(
            "no kernel to boot the emulated server: install linux-image-amd64 "
            "(a /boot/vmlinuz-VERSION with its /lib/modules/VERSION)"
        )
    return found[-1]


def _module_name(rel: str) -> str:
    base = Path(rel).name
    for suffix in (".ko.xz", ".ko.gz", ".ko.zst", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def module_load_order(modules_dir: Path, wanted: Iterable[str]) -> list[KernelModule]:
    """``wanted`` and their dependencies, each after what it needs (from ``modules.dep``).

    Modules built into the kernel (``modules.builtin``) need no loading and are left out.
    """
    dep_file = modules_dir / "modules.dep"
    try:
        lines = dep_file.read_text().splitlines()
    except OSError as e:
        raise GuestError(f"cannot read {dep_file}: {e.strerror}") from e
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in lines:
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        deps[_module_name(mod)] = (mod, [_module_name(d) for d in rest.split()])
    builtin: set[str] = set()
    builtin_file = modules_dir / "modules.builtin"
    if builtin_file.exists():
        builtin = {_module_name(x) for x in builtin_file.read_text().split()}

    order: list[KernelModule] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        if name in chain:
            raise GuestError(f"module dependency loop: {' -> '.join((*chain, name))}")
        if name not in deps:
            raise GuestError(
                f"kernel module {name} is neither in {dep_file} nor built in: "
                "this kernel cannot mount the host's filesystem over virtio 9p"
            )
        rel, needs = deps[name]
        for d in needs:
            visit(d, (*chain, name))
        seen.add(name)
        order.append(KernelModule(name, modules_dir / rel))

    for w in wanted:
        visit(w, ())
    return order


def module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        raise GuestError(
            f"{path}: zstd-compressed modules are not supported; use an xz or plain kernel"
        )
    return data


# -- cpio, "newc" format (what the kernel unpacks) ----------------------------------


class CpioWriter:
    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = [
            self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0,
        ]  # fmt: skip
        header = b"070701" + b"".join(f"{v:08X}".encode() for v in fields)
        self._ino += 1
        self._parts.append(header + encoded)
        self._pad()
        self._parts.append(data)
        self._pad()

    def _pad(self) -> None:
        n = sum(len(p) for p in self._parts)
        self._parts.append(b"\0" * (-n % 4))

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        """A device node, so that no root is needed to make, e.g., /dev/console."""
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._ino = 0
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


def build_initramfs(
    modules: Sequence[KernelModule], busybox: bytes, init: str = INIT_SCRIPT
) -> bytes:
    w = CpioWriter()
    for d in ("bin", "dev", "proc", "sys", "modules", "newroot", "tmp"):
        w.directory(d)
    w.file("bin/busybox", busybox, 0o755)
    w.symlink("bin/sh", "busybox")
    w.file("init", init.encode(), 0o755)
    w.file("timer-check.awk", TIMER_CHECK_AWK.encode(), 0o644)
    for m in modules:
        w.file(f"modules/{m.name}.ko", module_bytes(m.path))
    w.file("modules/order", "".join(f"{m.name}.ko\n" for m in modules).encode())
    return w.finish()


def cache_dir() -> Path:
    return Path(os.environ.get("PARTITION_CACHE_DIR") or "/var/cache/partition") / "testbed"


_PT_INTERP = 3


def needs_interpreter(program: bytes) -> bool | None:
    """Whether the ELF executable ``program`` names a dynamic loader (a ``PT_INTERP``
    program header): it then needs the host's shared libraries, which an initramfs
    does not have.  ``None`` when ``program`` is not an ELF executable at all."""
    if len(program) < 64 or program[:4] != b"\x7fELF" or program[4] not in (1, 2):
        return None
    order = {1: "<", 2: ">"}.get(program[5])
    if order is None:
        return None
    if program[4] == 2:  # ELFCLASS64
        phoff, phentsize, phnum = struct.unpack_from(order + "Q14xHH", program, 32)
    else:
        phoff, phentsize, phnum = struct.unpack_from(order + "I10xHH", program, 28)
    if phentsize < 4 or phoff + phentsize * phnum > len(program):
        return None
    return any(
        struct.unpack_from(order + "I", program, phoff + i * phentsize)[0] == _PT_INTERP
        for i in range(phnum)
    )


def static_busybox(busybox: str | os.PathLike[str] | None = None) -> bytes:
    """The bytes of a statically linked busybox, the only kind that runs in an initramfs.

    Debian's plain ``busybox`` package is linked against the C library: as ``/init``'s
    shell it would end the boot in a kernel panic, so it is refused here with what to do.
    """
    path = Path(busybox if busybox is not None else BUSYBOX)
    try:
        program = path.read_bytes()
    except OSError as e:
        raise PreconditionError(
            f"cannot read {path} ({e.strerror}): install busybox-static "
            "(apt-get install busybox-static)"
        ) from e
    dynamic = needs_interpreter(program)
    if dynamic is None:
        raise PreconditionError(
            f"{path} is not an ELF program: install busybox-static (apt-get install busybox-static)"
        )
    if dynamic:
        raise PreconditionError(
            f"{path} is dynamically linked (Debian's busybox package) and cannot run in the "
            "emulated server's initramfs: install busybox-static (apt-get install busybox-static, "
            "which replaces it)"
        )
    return program


def initramfs_for(kernel: str | os.PathLike[str], *, busybox: str | None = None) -> Path:
    """The cached initramfs for ``kernel``, built first if it is not there yet."""
    bb = static_busybox(busybox)
    version = kernel_version(kernel)
    modules = module_load_order(Path("/lib/modules", version), ROOT_MODULES)
    h = hashlib.sha256(INIT_SCRIPT.encode())
    h.update(TIMER_CHECK_AWK.encode())
    h.update(hashlib.sha256(bb).digest())
    for m in modules:
        h.update(f"{m.name}:{m.path}:{m.path.stat().st_size}:{m.path.stat().st_mtime_ns}".encode())
    target = cache_dir() / f"initramfs-{version}-{h.hexdigest()[:16]}.cpio"
    if target.exists():
        return target
    _write_atomically(target, build_initramfs(modules, bb))
    return target


def bootable_kernel(kernel: str | os.PathLike[str]) -> Path:
    """What to give QEMU's ``-kernel``: the uncompressed ELF ``vmlinux`` when the kernel allows.

    Under TCG, unpacking an xz bzImage takes the emulated CPU longer than the
    rest of the boot up to ``/init``; a kernel built with ``CONFIG_PVH`` boots
    from its ELF image directly (QEMU's PVH entry), so it is unpacked here once,
    with the host's CPU, and cached.  Anything else boots as it is.
    """
    kernel = Path(kernel)
    version = kernel_version(kernel)
    config = kernel.parent / f"config-{version}"
    try:
        pvh = "CONFIG_PVH=y" in config.read_text().splitlines()
        st = kernel.stat()
    except OSError:
        return kernel
    if not pvh:
        return kernel
    key = hashlib.sha256(f"{kernel}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / f"vmlinux-{version}-{key}"
    if target.exists():
        _readable(target)
        return target
    data = kernel.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        return kernel
    try:
        elf = lzma.LZMADecompressor().decompress(data[start:])
    except lzma.LZMAError:
        return kernel
    if not elf.startswith(b"\x7fELF"):
        return kernel
    _write_atomically(target, elf)
    _readable(target)
    return target


def _readable(path: Path) -> None:
    """Readable by all, as /boot's kernels are: a guest's QEMU (libvirt's, a confined one)
    may open it as another user."""
    with contextlib.suppress(OSError):
        if path.stat().st_mode & 0o044 != 0o044:
            path.chmod(0o644)


def _write_atomically(target: Path, data: bytes) -> None:
    # Written aside and renamed: several test runs may build the same file at once.
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
