"""``partition snapshot DIR``: copy the part of /sys, /proc and /dev that ``scan`` and ``host check`` read.

The copy is driven by the scan itself: ``scan`` runs once against a recorder
that notes every path it reads, lists or resolves, and exactly those are
mirrored into DIR.  So the snapshot holds what the partitioner needs and no
more, nothing is walked blindly (all of /sys is huge and full of loops), and
``scan(HostRoot(DIR))`` gives the same Host as the scan that recorded it.

Under /sys, symlinks are copied as symlinks with their (relative) targets, as
the kernel writes them, so PCI topology and driver links survive.  Under /proc
the links (``/proc/self`` is the reader's pid, ``/proc/net`` is per-process)
are followed and their content stored as plain files.  ``/dev/kvm`` becomes an
empty file: the scan only asks whether it exists.  The PCI names the scan got from
udev's hardware database are written as a hwdb source file in the tree
(``kernel.root.SNAPSHOT_HWDB``), which is where a tree's HostRoot looks them up.
A destination that is the source tree, inside it or around it is refused.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from partitioner.errors import UsageError
from partitioner.inventory import scan
from partitioner.inventory.model import Host
from partitioner.kernel import sysfs
from partitioner.kernel.root import SNAPSHOT_HWDB, HostRoot, format_hwdb

# The parts of a host tree a snapshot owns; --force replaces these and leaves the rest of DIR alone.
SNAPSHOT_TOPS = ("sys", "proc", "dev")
_MAX_FILE = 16 * 1024 * 1024
_MAX_LINK_DEPTH = 40


class _Recorder(HostRoot):
    """A HostRoot that reads through another one and remembers what was asked."""

    def __init__(self, inner: HostRoot) -> None:
        super().__init__(inner.root)
        self.inner = inner
        self.files: dict[str, str] = {}  # path -> the text the scan got
        self.dirs: list[str] = []
        self.links: list[str] = []
        self.probes: list[str] = []
        self.hwdb_seen: dict[str, dict[str, str]] = {}

    def exists(self, kernel_path: str) -> bool:
        self.probes.append(kernel_path)
        return self.inner.exists(kernel_path)

    def is_dir(self, kernel_path: str) -> bool:
        self.probes.append(kernel_path)
        return self.inner.is_dir(kernel_path)

    def read(self, kernel_path: str, default: str | None = None) -> str | None:
        text = self.inner.read(kernel_path, None)
        if text is not None:
            self.files.setdefault(kernel_path, text)
            return text
        return default

    def listdir(self, kernel_path: str) -> list[str]:
        self.dirs.append(kernel_path)
        return self.inner.listdir(kernel_path)

    def hwdb(self, modalias: str) -> dict[str, str]:
        got = self.inner.hwdb(modalias)
        self.hwdb_seen[modalias] = got
        return got

    def readlink_name(self, kernel_path: str) -> str | None:
        self.links.append(kernel_path)
        return self.inner.readlink_name(kernel_path)

    def readlink(self, kernel_path: str) -> str | None:
        self.links.append(kernel_path)
        return self.inner.readlink(kernel_path)

    def realpath(self, kernel_path: str) -> str:
        self.links.append(kernel_path)
        return self.inner.realpath(kernel_path)


@dataclass
class _Mirror:
    src: HostRoot
    dest: Path
    files: int = 0
    # What the scan read, written as it was read: live files change between two reads.
    seen: dict[str, str] = field(default_factory=dict)
    # Paths the scan only asked about (exists): a write-only file (a function's `reset`)
    # is kept as an empty file, which is all the scan learnt of it.
    probed: set[str] = field(default_factory=set)
    _done: dict[str, str | None] = field(default_factory=dict)

    def local_src(self, kernel_path: str) -> str:
        return str(self.src.path(kernel_path))

    def local_dest(self, kernel_path: str) -> str:
        return str(self.dest) + kernel_path

    def mirror(self, kernel_path: str, depth: int = 0) -> str | None:
        """Make ``kernel_path`` exist in dest as in src, link by link; return the real path reached."""
        if kernel_path in self._done:
            return self._done[kernel_path]
        if depth > _MAX_LINK_DEPTH:
            return None
        kernel_path = os.path.normpath(kernel_path)
        if kernel_path.startswith("/proc/") or kernel_path == "/proc":
            result = self.mirror_flat(kernel_path)
            self._done[kernel_path] = result
            return result
        cur = ""
        parts = [p for p in kernel_path.split("/") if p]
        for i, part in enumerate(parts):
            nxt = f"{cur}/{part}"
            try:
                st = os.lstat(self.local_src(nxt))
            except OSError:
                self._done[kernel_path] = None
                return None
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(self.local_src(nxt))
                resolved = os.path.normpath(
                    target if target.startswith("/") else os.path.join(cur or "/", target)
                )
                self.make_link(nxt, resolved)
                # Links that leave the kernel's trees are copied but not followed.
                if not resolved.startswith(("/sys/", "/dev/")):
                    self._done[kernel_path] = None
                    return None
                real = self.mirror(resolved, depth + 1)
                if real is None:
                    self._done[kernel_path] = None
                    return None
                cur = real
            elif stat.S_ISDIR(st.st_mode):
                os.makedirs(self.local_dest(nxt), exist_ok=True)
                cur = nxt
            elif i == len(parts) - 1:
                self.copy_file(nxt, st)
                cur = nxt
            else:
                self._done[kernel_path] = None
                return None
        self._done[kernel_path] = cur
        return cur

    def mirror_flat(self, kernel_path: str) -> str | None:
        """/proc: follow links in the source, store real files and directories in dest."""
        local = self.local_src(kernel_path)
        try:
            st = os.stat(local)
        except OSError:
            return None
        if stat.S_ISDIR(st.st_mode):
            os.makedirs(self.local_dest(kernel_path), exist_ok=True)
        else:
            self.copy_file(kernel_path, st)
        return kernel_path

    def make_link(self, kernel_path: str, resolved: str) -> None:
        dest = self.local_dest(kernel_path)
        if os.path.lexists(dest):
            return
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.symlink(os.path.relpath(resolved, os.path.dirname(kernel_path)), dest)

    def copy_file(self, kernel_path: str, st: os.stat_result) -> None:
        dest = self.local_dest(kernel_path)
        if os.path.lexists(dest):
            return
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if not stat.S_ISREG(st.st_mode):
            # Device nodes (/dev/kvm): the scan only asks whether they exist.
            Path(dest).touch()
            self.files += 1
            return
        text = self.seen.get(kernel_path)
        if text is not None:
            data = (text + "\n").encode()
        else:
            try:
                with open(self.local_src(kernel_path), "rb") as f:
                    data = f.read(_MAX_FILE)
            except OSError:
                if kernel_path in self.probed:
                    Path(dest).touch()
                    self.files += 1
                # Otherwise a write-only or refusing attribute: the scan saw nothing there either.
                return
        with open(dest, "wb") as f:
            f.write(data)
        self.files += 1

    def mirror_listing(self, kernel_path: str) -> None:
        """A listed directory: its subdirectories and links are copied (the scan uses their
        names); its plain files only if they were read."""
        real = self.mirror(kernel_path)
        if real is None:
            return
        try:
            entries = os.listdir(self.local_src(real))
        except OSError:
            return
        for name in entries:
            p = f"{real}/{name}"
            try:
                st = os.lstat(self.local_src(p))
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode) or stat.S_ISDIR(st.st_mode):
                if real.startswith("/proc"):
                    if stat.S_ISDIR(st.st_mode):
                        os.makedirs(self.local_dest(p), exist_ok=True)
                    continue
                if stat.S_ISLNK(st.st_mode):
                    target = os.readlink(self.local_src(p))
                    resolved = os.path.normpath(
                        target if target.startswith("/") else os.path.join(real, target)
                    )
                    self.make_link(p, resolved)
                else:
                    os.makedirs(self.local_dest(p), exist_ok=True)


def check_overlap(src: HostRoot, dest: Path) -> None:
    """Refuse a destination that is the tree being read, inside it, or holding it: writing
    there would replace (``--force``) or grow the files being copied.  On the live host
    only /sys, /proc and /dev are read, so only those (and / itself) are refused."""
    real = dest.resolve()  # through symlinks, as the writes will go
    source = src.root  # already resolved
    inside = (
        any(real.is_relative_to(source / top) for top in SNAPSHOT_TOPS)
        if src.live
        else real.is_relative_to(source)
    )
    if real == source or inside:
        raise UsageError(
            f"{dest} is inside the tree being copied ({source}): write the snapshot elsewhere"
        )
    if source.is_relative_to(real):
        raise UsageError(
            f"{dest} holds the tree being copied ({source}): write the snapshot elsewhere"
        )


def check_dest(dest: Path, force: bool) -> None:
    """Refuse a directory that holds anything, unless ``force``, and a place where no
    directory can be made: under a file, or a symbolic link to nothing."""
    if dest.is_symlink() and not dest.exists():
        raise UsageError(
            f"{dest} is a symbolic link to {os.readlink(dest)}, which does not exist: "
            "create that directory, or choose another DIR"
        )
    for above in dest.parents:
        if above.exists():
            if not above.is_dir():
                raise UsageError(
                    f"{above} is not a directory, so {dest} cannot be made under it: "
                    "choose another DIR"
                )
            break
        if above.is_symlink():
            raise UsageError(
                f"{above} is a symbolic link to {os.readlink(above)}, which does not exist, "
                f"so {dest} cannot be made under it: choose another DIR"
            )
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise UsageError(
            f"{dest} exists and is not empty; choose a new directory, or add --force "
            f"to replace the {', '.join(SNAPSHOT_TOPS)} it holds"
        )


def clear_dest(dest: Path) -> None:
    """Remove what an earlier snapshot left in ``dest`` (only the parts a snapshot owns)."""
    for top in SNAPSHOT_TOPS:
        p = dest / top
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
    names = dest / SNAPSHOT_HWDB.lstrip("/")
    if names.is_symlink() or names.is_file():
        names.unlink()
    dest.mkdir(parents=True, exist_ok=True)


def take_snapshot_with_host(src: HostRoot, dest: Path, *, force: bool = False) -> tuple[int, Host]:
    """Snapshot ``src`` into ``dest``; also give the Host the recording scan saw."""
    dest = Path(dest).absolute()
    check_overlap(src, dest)
    check_dest(dest, force)
    recorder = _Recorder(src)
    host = scan(recorder)  # HostReadError passes up before anything is written
    # What `host check` reads beyond the scan (the CPU's flags, the kernel's command line and
    # release, interrupt chips, IOMMU units, cgroups, the init system, the CPUs the kernel
    # isolated), so that it speaks of the tree as it would of the machine.
    from partitioner.boot.check import check_host
    from partitioner.boot.setup import read_facts

    check_host(recorder, host, read_facts(recorder))
    # And what `host check FILE` reads of a site's settings: the CPUs the kernel isolated,
    # and each function's driver_override (whichever functions the site will name).
    for path in (sysfs.CPU_ISOLATED, sysfs.CPU_NOHZ_FULL):
        recorder.read(path)
    _probe_for_hwloc(recorder, host)
    for address in host.pci:
        recorder.read(sysfs.pci_device(str(address), "driver_override"))
        # The scan finds a function's interfaces through /sys/class/net; the tree keeps the
        # function's own net/ as the machine has it.
        recorder.listdir(sysfs.pci_device(str(address), "net"))
    # And each group's own list of its devices (the scan takes members from the functions'
    # links; a claim's checks read the list, as the kernel's VFIO does).
    for group in host.iommu_groups:
        recorder.listdir(sysfs.iommu_group(group, "devices"))
    try:
        clear_dest(dest)
    except OSError as e:
        # What check_dest cannot see ahead: no permission, a read-only filesystem.
        raise UsageError(
            f"cannot write the snapshot into {dest}: {e.strerror or e}; choose another DIR"
        ) from None
    for top in SNAPSHOT_TOPS:
        # Each top exists even where the machine had nothing in it (no /dev/kvm): a tree
        # without /dev is one that does not say, a tree with an empty /dev says "absent".
        (dest / top).mkdir(exist_ok=True)
    m = _Mirror(src=src, dest=dest, seen=recorder.files, probed=set(recorder.probes))
    for p in recorder.files:
        m.mirror(p)
    for p in recorder.links:
        m.mirror(p)
    for p in recorder.probes:
        m.mirror(p)
    for p in recorder.dirs:
        m.mirror_listing(p)
    names = format_hwdb(recorder.hwdb_seen)
    if names:
        # The names the scan got from udev: --host-root shows them as the live host does.
        local = dest / SNAPSHOT_HWDB.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(names)
        m.files += 1
    return m.files, host


# What hwloc's Linux backend reads beyond the scan, so that `partition map` (lstopo under
# HWLOC_FSROOT) draws a snapshot as it draws the machine: without the topology masks it
# gives up on /sys ("failed to find sysfs cpu topology directory") and describes the CPU
# it runs on instead; without config space it cannot tell bridges and nests no PCI tree.
_HWLOC_CPU_FILES = (
    "online", "topology/core_cpus", "topology/core_cpus_list", "topology/thread_siblings",
    "topology/core_id", "topology/package_cpus", "topology/package_cpus_list",
    "topology/core_siblings", "topology/physical_package_id", "topology/die_cpus",
    "topology/die_cpus_list", "topology/die_id", "topology/cluster_cpus", "topology/cluster_id",
)  # fmt: skip
_HWLOC_CACHE_FILES = (
    "level", "type", "size", "shared_cpu_map", "coherency_line_size",
    "ways_of_associativity", "number_of_sets", "physical_line_partition", "id",
)  # fmt: skip
_HWLOC_NODE_FILES = ("cpumap", "meminfo", "distance")
_HWLOC_PCI_FILES = ("config", "class", "vendor", "device", "subsystem_vendor",
                    "subsystem_device", "local_cpus", "numa_node", "revision",
                    "current_link_speed", "current_link_width")  # fmt: skip
_HWLOC_OTHER = (
    f"{sysfs.CPU}/possible", f"{sysfs.NODE}/online", f"{sysfs.NODE}/possible",
    "/proc/cpuinfo", "/proc/meminfo",
)  # fmt: skip


def _probe_for_hwloc(recorder: _Recorder, host: Host) -> None:
    """Note the files hwloc reads, as probes: the mirror copies them byte for byte (PCI
    config space is binary, not text for the scan's reader)."""
    paths = list(_HWLOC_OTHER)
    for cpu in host.cpus:
        paths += [sysfs.cpu(cpu, leaf) for leaf in _HWLOC_CPU_FILES]
        for index in recorder.listdir(sysfs.cpu(cpu, "cache")):
            if index.startswith("index"):
                paths += [sysfs.cpu(cpu, f"cache/{index}/{leaf}") for leaf in _HWLOC_CACHE_FILES]
    for node in host.nodes:
        paths += [sysfs.node(node, leaf) for leaf in _HWLOC_NODE_FILES]
    for address in host.pci:
        paths += [sysfs.pci_device(str(address), leaf) for leaf in _HWLOC_PCI_FILES]
    for path in paths:
        recorder.exists(path)


def take_snapshot(src: HostRoot, dest: Path, *, force: bool = False) -> int:
    """Copy what ``scan(src)`` reads into ``dest``; the number of files written."""
    return take_snapshot_with_host(src, dest, force=force)[0]
