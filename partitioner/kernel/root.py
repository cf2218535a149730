"""The one door to the host: every read (and write) of /sys, /proc and /dev goes through a HostRoot.

A HostRoot is rooted at a directory: ``/`` for the live machine, or a snapshot
tree (``partition snapshot``, hwloc's test corpus) for ``--host-root``.  Paths
given to it are absolute paths *as the kernel names them* (``/sys/bus/pci``);
the root is prefixed here and nowhere else.

Writes are for the live host only (claiming devices, hugepage pools, and the device
nodes a confined QEMU's root is given for a hot-plug, see ``guest/jail.py``).  Tests
subclass HostRoot and override :meth:`write` to play the kernel's part on a
tree they built (see ``tests/fakekernel.py``), so the code under test runs
unchanged.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import os
import re
import stat
from pathlib import Path
from typing import Any

from partitioner.errors import HostReadError

# The kernel writes numbers in ASCII; int() and str.isdigit() would also take other
# scripts' digits ("٣", "²").  Twenty digits hold any 64-bit value, and bounding the
# text first keeps int() linear on a hostile file.
_INT_RE = re.compile(r"-?[0-9]{1,20}")
_HEX_RE = re.compile(r"(?:0[xX])?[0-9a-fA-F]{1,16}")

# Reads stop here: the largest kernel text the scan reads (mountinfo of a host with
# many thousands of mounts) is a few MiB; a hostile tree's file could fill memory.
MAX_FILE = 64 * 2**20

_READ = os.O_RDONLY | os.O_CLOEXEC

# Where a snapshot keeps the hwdb entries its scan read (udev's own source format).
SNAPSHOT_HWDB = "/etc/udev/hwdb.d/60-partition-snapshot.hwdb"


def parse_int(text: str, base: int = 10) -> int | None:
    """``text`` as the kernel writes a number (ASCII, at most 64 bits), else None."""
    text = text.strip()
    if not (_INT_RE if base == 10 else _HEX_RE).fullmatch(text):
        return None
    return int(text, base)


class HostRoot:
    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        self.root = Path(root).resolve()
        self.live = self.root == Path("/")
        # Reads go through plain strings: pathlib's joining costs more than the
        # read itself when a scan opens thousands of sysfs files.
        self._prefix = "" if self.live else str(self.root)
        self._hwdb: _Hwdb | None = None
        self._tree_hwdb: dict[str, dict[str, str]] | None = None

    def __repr__(self) -> str:
        return f"HostRoot({str(self.root)!r})"

    # -- paths ---------------------------------------------------------------

    def path(self, kernel_path: str) -> Path:
        """The file on this machine that stands for ``kernel_path`` (an absolute kernel path)."""
        if not kernel_path.startswith("/"):
            raise ValueError(f"kernel paths are absolute: {kernel_path!r}")
        if self.live:
            return Path(kernel_path)
        return self.root / kernel_path.lstrip("/")

    def local(self, kernel_path: str) -> str:
        """:meth:`path` as a plain string, for reads a scan makes once per function."""
        return self._local(kernel_path)

    def _local(self, kernel_path: str) -> str:
        if not kernel_path.startswith("/"):
            raise ValueError(f"kernel paths are absolute: {kernel_path!r}")
        if "\0" in kernel_path:
            # Built from a damaged file's text: no file has that name, and os.open
            # would raise ValueError rather than the OSError every reader handles.
            raise FileNotFoundError(errno_mod.ENOENT, "NUL in path", kernel_path)
        return self._prefix + kernel_path

    def kernel_path(self, local: str | os.PathLike[str]) -> str:
        """Inverse of :meth:`path`: ``/snap/sys/devices/x`` -> ``/sys/devices/x``."""
        p = Path(local)
        if self.live:
            return str(p)
        try:
            return "/" + str(p.relative_to(self.root))
        except ValueError:
            return str(p)

    # -- reads ---------------------------------------------------------------

    def _too_big(self, kernel_path: str) -> HostReadError:
        where = self.path(kernel_path)
        return HostReadError(
            f"{where} is larger than {MAX_FILE // 2**20} MiB, more than the kernel writes in "
            "any file the partitioner reads: the tree is damaged; take a new one with "
            "`partition snapshot DIR`",
            path=str(where),
        )

    def _loop(self, kernel_path: str) -> HostReadError:
        where = self.path(kernel_path)
        return HostReadError(
            f"{where} is a loop of symbolic links where the kernel has a file or directory: "
            "the tree is damaged; take a new one with `partition snapshot DIR`",
            path=str(where),
        )

    def exists(self, kernel_path: str) -> bool:
        # access(F_OK) with the effective ids is stat's answer without stat's struct or a
        # Python exception for a missing file: the scan asks it of every PCI function.
        return "\0" not in kernel_path and os.access(
            self._local(kernel_path), os.F_OK, effective_ids=True
        )

    def is_dir(self, kernel_path: str) -> bool:
        return "\0" not in kernel_path and os.path.isdir(self._local(kernel_path))

    def read(self, kernel_path: str, default: str | None = None) -> str | None:
        """The file's text with surrounding whitespace stripped, or ``default`` if it cannot be read.

        Sysfs files that exist but refuse a read (EINVAL, EIO, EACCES: write-only
        attributes, devices that went away) also give ``default``.
        """
        # A host scan reads thousands of tiny files, and this is the price of each beyond its
        # syscalls: os.read on raw bytes (a buffered text file costs several times the
        # syscalls' price), and the checks of _local inline.
        if not kernel_path.startswith("/"):
            raise ValueError(f"kernel paths are absolute: {kernel_path!r}")
        if "\0" in kernel_path:
            return default  # built from a damaged file's text: no file has that name
        try:
            fd = os.open(self._prefix + kernel_path, _READ)
            try:
                data = os.read(fd, 65536)
                # A sysfs attribute comes whole in one read; procfs hands out about
                # a page per read, so there only an empty read is the end.
                if len(data) == 65536 or kernel_path.startswith("/proc/"):
                    data = self._read_on(kernel_path, fd, data)
            finally:
                os.close(fd)
            return data.decode("utf-8", "replace").strip()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
            return default
        except OSError as e:
            if e.errno in (errno_mod.EINVAL, errno_mod.EIO, errno_mod.ENODEV, errno_mod.ENXIO):
                return default
            if e.errno == errno_mod.ELOOP:
                raise self._loop(kernel_path) from None
            raise

    def _read_on(self, kernel_path: str, fd: int, first: bytes) -> bytes:
        """The rest of a file whose first read gave ``first``, up to an empty read."""
        chunks = [first]
        size = len(first)
        while chunks[-1]:
            chunks.append(os.read(fd, 65536))
            size += len(chunks[-1])
            if size > MAX_FILE:
                raise self._too_big(kernel_path)
        return b"".join(chunks)

    def read_int(self, kernel_path: str, default: int | None = None, base: int = 10) -> int | None:
        text = self.read(kernel_path)
        if text is None:
            return default
        value = parse_int(text, base)
        return default if value is None else value

    def listdir(self, kernel_path: str) -> list[str]:
        """Sorted entries of a directory; empty if it is missing."""
        try:
            return sorted(os.listdir(self._local(kernel_path)))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return []
        except OSError as e:
            if e.errno == errno_mod.ELOOP:
                raise self._loop(kernel_path) from None
            raise

    def readlink_name(self, kernel_path: str) -> str | None:
        """The last component of a symlink's target (``driver`` -> ``e1000e``), or None."""
        try:
            return os.readlink(self._local(kernel_path)).rpartition("/")[2]
        except OSError:
            return None

    def readlink(self, kernel_path: str) -> str | None:
        """A symlink's target as written (sysfs writes relative ones), or None if not a link."""
        try:
            return os.readlink(self._local(kernel_path))
        except OSError:
            return None

    def realpath(self, kernel_path: str) -> str:
        """Resolve symlinks inside the tree and give the result as a kernel path.

        Sysfs links are relative, so they resolve inside a snapshot too.
        """
        if "\0" in kernel_path:
            return kernel_path
        return self.kernel_path(os.path.realpath(self._local(kernel_path)))

    def hwdb(self, modalias: str) -> dict[str, str]:
        """udev's hardware database entry for a modalias (``pci:v00008086d000010D3``).

        The live host asks libudev.  A tree under --host-root has the entries its
        snapshot's scan got, in udev's hwdb source format at :data:`SNAPSHOT_HWDB`,
        and no others: names come from the machine described, never from the one
        reading (docs/decisions.md).  {} when there is none.
        """
        if self.live:
            if self._hwdb is None:
                self._hwdb = _Hwdb()
            return self._hwdb.lookup(modalias)
        if self._tree_hwdb is None:
            self._tree_hwdb = parse_hwdb(self.read(SNAPSHOT_HWDB) or "")
        return self._tree_hwdb.get(modalias, {})

    # -- writes (live host, or a test's fake kernel) -------------------------

    def write(self, kernel_path: str, value: str) -> None:
        """Write ``value`` to a kernel attribute in one ``write(2)``; OSError propagates with its errno."""
        fd = os.open(self.path(kernel_path), os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def char_device(self, kernel_path: str) -> tuple[int, int] | None:
        """``(major, minor)`` of the character device node at ``kernel_path`` (``/dev/vfio/7``),
        or None when there is none (missing, or not a character device)."""
        try:
            st = os.stat(self._local(kernel_path))
        except (OSError, ValueError):
            return None
        if not stat.S_ISCHR(st.st_mode):
            return None
        return os.major(st.st_rdev), os.minor(st.st_rdev)

    # -- files of this machine made for a confined QEMU (not kernel paths) ----
    #
    # ``path`` below is a file of the partitioner's own run directory (a confined QEMU's
    # root, ``GuestPaths.chroot``), used as given: it is not under ``self.root``.

    def mknod(self, path: Path, major: int, minor: int, *, uid: int, gid: int, mode: int) -> None:
        """A character device node ``major:minor`` at ``path``, owned by ``uid:gid`` with
        ``mode`` (the umask aside); FileExistsError if ``path`` exists."""
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(major, minor))
        os.chown(path, uid, gid, follow_symlinks=False)
        os.chmod(path, mode)

    def symlink(self, path: Path, target: str) -> None:
        """A symbolic link at ``path`` to ``target`` (as written); FileExistsError if ``path`` exists."""
        os.symlink(target, path)

    def remove(self, path: Path) -> None:
        """Remove the file, node or link at ``path`` (not a directory); nothing if it is gone."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class _Hwdb:
    """libudev's hwdb through pyudev, which binds ``udev_hwdb_*`` but gives them no
    Python API: its Context's library handle is used directly.  Without libudev or
    /usr/lib/udev/hwdb.bin every lookup is {} and callers show ids."""

    def __init__(self) -> None:
        self._lib: Any = None
        self._handle: Any = None
        self._cache: dict[str, dict[str, str]] = {}
        try:
            import pyudev

            self._context = pyudev.Context()
            self._lib = self._context._libudev
            self._handle = self._lib.udev_hwdb_new(self._context) or None
        except Exception:  # no libudev, or a pyudev without the binding: names are optional
            self._handle = None

    def lookup(self, modalias: str) -> dict[str, str]:
        got = self._cache.get(modalias)
        if got is not None:
            return got
        got = {}
        if self._handle is not None:
            from pyudev._util import udev_list_iterate

            entry = self._lib.udev_hwdb_get_properties_list_entry(
                self._handle, modalias.encode("ascii"), 0
            )
            for key, value in udev_list_iterate(self._lib, entry):
                got[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        self._cache[modalias] = got
        return got

    def __del__(self) -> None:
        if self._handle is not None and self._lib is not None:
            self._lib.udev_hwdb_unref(self._handle)


def format_hwdb(entries: dict[str, dict[str, str]]) -> str:
    """hwdb source text (``man hwdb``): a match line, then indented KEY=VALUE lines."""
    out: list[str] = []
    for modalias in sorted(entries):
        if entries[modalias]:
            out.append(modalias + "*")
            out.extend(f" {k}={v}" for k, v in sorted(entries[modalias].items()))
            out.append("")
    return "\n".join(out)


def parse_hwdb(text: str) -> dict[str, dict[str, str]]:
    """The entries of :func:`format_hwdb`'s text, keyed by exact modalias (no globbing:
    a lookup stays one dictionary access however long a hostile file is)."""
    out: dict[str, dict[str, str]] = {}
    current: list[dict[str, str]] = []
    in_props = False
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            current, in_props = [], False
        elif line[0] in " \t":
            key, sep, value = line.strip().partition("=")
            if sep:
                in_props = True
                for props in current:
                    props[key] = value
        else:
            if in_props:
                current, in_props = [], False
            current.append(out.setdefault(line.rstrip("*"), {}))
    return out
