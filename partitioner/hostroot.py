"""The one door to the host: every read (and write) of /sys, /proc and /dev goes through a HostRoot.

A HostRoot is rooted at a directory: ``/`` for the live machine, or a snapshot
tree (``partition snapshot``, hwloc's test corpus) for ``--host-root``.  Paths
given to it are absolute paths *as the kernel names them* (``/sys/bus/pci``);
the root is prefixed here and nowhere else.

Writes are for the live host only (claiming devices, hugepage pools).  Tests
subclass HostRoot and override :meth:`write` to play the kernel's part on a
tree they built (see ``tests/fakekernel.py``), so the code under test runs
unchanged.
"""

from __future__ import annotations

import errno as errno_mod
import os
from pathlib import Path


class HostRoot:
    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        self.root = Path(root).resolve()
        self.live = self.root == Path("/")
        # Reads go through plain strings: pathlib's joining costs more than the
        # read itself when a scan opens thousands of sysfs files.
        self._prefix = "" if self.live else str(self.root)

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

    def _local(self, kernel_path: str) -> str:
        if not kernel_path.startswith("/"):
            raise ValueError(f"kernel paths are absolute: {kernel_path!r}")
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

    def exists(self, kernel_path: str) -> bool:
        return os.path.exists(self._local(kernel_path))

    def is_dir(self, kernel_path: str) -> bool:
        return os.path.isdir(self._local(kernel_path))

    def read(self, kernel_path: str, default: str | None = None) -> str | None:
        """The file's text with surrounding whitespace stripped, or ``default`` if it cannot be read.

        Sysfs files that exist but refuse a read (EINVAL, EIO, EACCES: write-only
        attributes, devices that went away) also give ``default``.
        """
        try:
            # os.read on raw bytes: a buffered text file costs several times the
            # syscalls' price, and a host scan reads thousands of tiny files.
            fd = os.open(self._local(kernel_path), os.O_RDONLY | os.O_CLOEXEC)
            try:
                chunks = [os.read(fd, 65536)]
                # A sysfs attribute comes whole in one read; procfs hands out about
                # a page per read, so there only an empty read is the end.
                if kernel_path.startswith("/proc/") or len(chunks[0]) == 65536:
                    while chunks[-1]:
                        chunks.append(os.read(fd, 65536))
            finally:
                os.close(fd)
            return b"".join(chunks).decode("utf-8", errors="replace").strip()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
            return default
        except OSError as e:
            if e.errno in (errno_mod.EINVAL, errno_mod.EIO, errno_mod.ENODEV, errno_mod.ENXIO):
                return default
            raise

    def read_int(self, kernel_path: str, default: int | None = None, base: int = 10) -> int | None:
        text = self.read(kernel_path)
        if text is None:
            return default
        try:
            return int(text, base)
        except ValueError:
            return default

    def listdir(self, kernel_path: str) -> list[str]:
        """Sorted entries of a directory; empty if it is missing."""
        try:
            return sorted(os.listdir(self._local(kernel_path)))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return []

    def readlink_name(self, kernel_path: str) -> str | None:
        """The last component of a symlink's target (``driver`` -> ``e1000e``), or None."""
        try:
            return os.path.basename(os.readlink(self._local(kernel_path)))
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
        return self.kernel_path(os.path.realpath(self._local(kernel_path)))

    # -- writes (live host, or a test's fake kernel) -------------------------

    def write(self, kernel_path: str, value: str) -> None:
        """Write ``value`` to a kernel attribute in one ``write(2)``; OSError propagates with its errno."""
        fd = os.open(self.path(kernel_path), os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
