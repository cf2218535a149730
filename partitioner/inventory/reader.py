"""What every part of the scan reads with: a HostRoot, plus notes instead of failures.

Odd values never stop a scan: they degrade to "unknown" and leave a sentence in
``Host.notes`` naming the file.  A file the kernel could not have written
(NUL bytes in a /proc table) is a damaged tree, and stops it with :class:`HostReadError`.
Numbers are taken as the kernel writes them: ASCII digits, at most 64 bits.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from partitioner.cpuset import CpuListSyntaxError, CpuSet
from partitioner.errors import HostReadError
from partitioner.kernel.root import HostRoot, parse_int

# Any run of ASCII digits: a cpulist whose numbers are longer than this names no real CPU.
_NUMBER_RE = re.compile(r"[0-9]+")
_MAX_CPULIST = 65536


@dataclass
class Reader:
    root: HostRoot
    notes: list[str] = field(default_factory=list)
    # One resolution per link: PCI functions, block devices and interfaces share paths.
    _realpaths: dict[str, str] = field(default_factory=dict)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def read(self, path: str) -> str | None:
        """The file's text, None if it cannot be read.

        A NUL byte in a /proc table stops the scan: those are the kernel's text, and
        a line cut by a NUL would be read as another fact.  In /sys a NUL is garbage
        like any other, refused by the attribute's parser with a note.
        """
        text = self.root.read(path)
        if text is not None and "\0" in text and path.startswith("/proc/"):
            where = self.root.path(path)
            raise HostReadError(
                f"{where} holds NUL bytes, which the kernel never writes in it: the tree is "
                "damaged; take a new one with `partition snapshot DIR`",
                path=str(where),
            )
        return text

    def realpath(self, kernel_path: str) -> str:
        """Where a sysfs link leads, as a kernel path.

        Sysfs links are relative and sit in real directories, so one readlink
        and a normalisation resolve them; a full realpath (an lstat per path
        component) is kept for the odd link that does not fit that shape.
        """
        got = self._realpaths.get(kernel_path)
        if got is None:
            target = self.root.readlink(kernel_path)
            if target is None:
                got = kernel_path
            elif target.startswith("/"):
                got = self.root.realpath(kernel_path)
            else:
                got = os.path.normpath(os.path.join(os.path.dirname(kernel_path), target))
                if not got.startswith("/sys/") or not self.root.exists(got):
                    got = self.root.realpath(kernel_path)
            self._realpaths[kernel_path] = got
        return got

    def realdir(self, kernel_path: str) -> str | None:
        """:meth:`realpath` of a link to a directory (a device's), None when it leads to no
        directory.  The usual sysfs link, relative inside /sys, costs one readlink and one
        stat: the stat that tells it is a directory also tells the normalisation was right."""
        got = self._realpaths.get(kernel_path)
        if got is None:
            target = self.root.readlink(kernel_path)
            if target is not None and not target.startswith("/"):
                got = os.path.normpath(os.path.join(os.path.dirname(kernel_path), target))
                if got.startswith("/sys/") and self.root.is_dir(got):
                    self._realpaths[kernel_path] = got
                    return got
            got = kernel_path if target is None else self.root.realpath(kernel_path)
            self._realpaths[kernel_path] = got
        return got if self.root.is_dir(got) else None

    def mount_point(self, path: str, text: str) -> str:
        """A mount point as ``path`` (a mount table) writes it, unescaped.  The kernel writes
        them absolute; a relative one is a damaged table, and a mount the scan cannot place
        could be the host's own disk (rule 5), so it stops the scan rather than being skipped."""
        point = unescape_mount(text)
        if not point.startswith("/"):
            where = self.root.path(path)
            shown = point if len(point) <= 60 else point[:57] + "..."
            raise HostReadError(
                f"{where} gives the mount point {shown!r}, not an absolute path as the kernel "
                "writes: the tree is damaged; take a new one with `partition snapshot DIR`",
                path=str(where),
            )
        return point

    def read_int(self, path: str, default: int | None = None, base: int = 10) -> int | None:
        text = self.read(path)
        if text is None:
            return default
        value = parse_int(text, base)
        if value is None:
            self.note(f"{path}: {text[:40]!r} is not a number; taken as unknown")
            return default
        return value

    def read_cpuset(self, path: str, mask_path: str | None = None) -> CpuSet | None:
        """A cpulist file, else its hex mask twin (old kernels have only the mask; a list
        that cannot be read as one is noted and the mask asked instead)."""
        text = self.read(path)
        if text is not None:
            got = self.parse_cpus(path, text)
            if got is not None or mask_path is None:
                return got
        if mask_path is None:
            return None
        text = self.read(mask_path)
        return None if text is None else self.parse_cpus(mask_path, text, is_mask=True)

    def parse_cpus(self, path: str, text: str, is_mask: bool = False) -> CpuSet | None:
        if len(text) > _MAX_CPULIST or (
            not is_mask and any(len(n) > 6 for n in _NUMBER_RE.findall(text))
        ):
            # Beyond any kernel's NR_CPUS: a junk "0-99999999999" would fill memory.
            self.note(f"{path}: {text[:40]!r} names impossible CPU numbers; ignored")
            return None
        try:
            return CpuSet.from_mask(text) if is_mask else CpuSet.parse(text)
        except CpuListSyntaxError:
            self.note(f"{path}: {text[:40]!r} is not a CPU list; ignored")
            return None

    def read_hex(self, path: str, digits: int) -> str:
        """A sysfs ``0x8086`` attribute as lowercase hex without ``0x`` ("" if unreadable)."""
        text = self.read(path)
        if text is None:
            return ""
        value = parse_int(text, 16)
        if value is None or value >= 16**digits:
            self.note(f"{path}: {text[:40]!r} is not a {digits}-digit hexadecimal number; ignored")
            return ""
        return f"{value:0{digits}x}"


def is_number(text: str) -> bool:
    """A name the kernel made from a number (``cpu12``'s 12, IOMMU group ``7``): ASCII digits."""
    return parse_int(text) is not None and not text.startswith("-")


def unescape_mount(text: str) -> str:
    """Mount tables escape space, tab, newline and backslash as octal (``\\040``)."""
    if "\\" not in text:
        return text
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)
