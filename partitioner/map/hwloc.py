"""The picture, drawn by hwloc: ``lstopo`` reads the host, ``hwloc-annotate`` colours it.

Three steps, each an hwloc program run through :mod:`partitioner.run` in a
scratch directory:

1. ``lstopo --of xml`` reads the topology of the host, or of a ``--host-root``
   tree through ``HWLOC_FSROOT``;
2. ``hwloc-annotate`` adds the partitions: each owner's PUs and PCI functions get an
   ``lstopoStyle`` info attribute (``Background=#rrggbb;Text=#rrggbb``), and Misc
   objects carry what lstopo does not draw (each partition's memory share and the
   hugepage pools under their NUMA node, and the legend with its colours);
3. ``lstopo`` draws the annotated XML as SVG (its native writer, whose elements carry
   ``class`` and ``id`` per object) or PNG (cairo).

``hwloc-annotate`` names objects by logical index (``pu:3``); those are the order in
which lstopo's XML lists each type of object, which is how they are counted here.
What was annotated is read back and checked against the owners before drawing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from partitioner.cpuset import CpuSet
from partitioner.errors import HostReadError, PreconditionError
from partitioner.inventory.model import Host
from partitioner.kernel.root import HostRoot
from partitioner.map.owners import RESERVE, RESERVE_COLOUR, Owners
from partitioner.pci import PciAddress
from partitioner.run import CommandFailed, run
from partitioner.units import format_size, human_size

PACKAGE = "hwloc"  # Debian's package of lstopo and hwloc-annotate
STYLE = "lstopoStyle"  # the info attribute lstopo takes an object's colours from
# Every PCI function and bridge, not only those hwloc deems important: a partition's
# device must be on the picture whatever its class.  The same filters at drawing time,
# else lstopo drops again what the XML holds.  Disallowed PUs (outside this process's
# cgroup) are drawn too: they are the host's CPUs all the same.  Nothing collapsed or
# factorized (lstopo draws the first two and last of many identical cores): every PU
# and function is drawn in its own box, in its owner's colour.
_FILTERS = ("--filter", "bridge:all", "--filter", "pcidev:all", "--filter", "osdev:none")
_DRAW = (*_FILTERS, "--disallowed", "--no-collapse", "--no-factorize", "--no-default-legend")
_TIMEOUT = 120.0
# What lstopo's Linux backend says when a tree has no CPU topology it can read; it then
# describes the machine it runs on instead, which must not be drawn as the tree.
_NO_SYSFS = "failed to find sysfs cpu topology directory"


@dataclass(frozen=True)
class Drawn:
    """What was drawn: the image, and for each owner the PUs and PCI functions styled."""

    image: bytes
    cpus: Mapping[str, CpuSet]  # owner (a partition, or RESERVE) -> PUs in its colour
    devices: Mapping[str, tuple[PciAddress, ...]]


def tools() -> tuple[str, str]:
    """The paths of lstopo and hwloc-annotate, or a PreconditionError saying what to install."""
    lstopo, annotate = shutil.which("lstopo"), shutil.which("hwloc-annotate")
    if lstopo is None or annotate is None:
        missing = "lstopo" if lstopo is None else "hwloc-annotate"
        raise PreconditionError(
            f"partition map draws with hwloc, and {missing} is not installed: install "
            f"Debian's package `{PACKAGE}` (apt-get install {PACKAGE}), or use --format text"
        )
    return lstopo, annotate


def _env(root: HostRoot) -> dict[str, str]:
    env = dict(os.environ)
    if not root.live:
        env["HWLOC_FSROOT"] = str(root.root)
        # hwloc's x86 backend asks the CPU this runs on (CPUID), which is not the tree's.
        env["HWLOC_COMPONENTS"] = "-x86"
    return env


def _hwloc(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    try:
        return run(argv, env=env, timeout=_TIMEOUT).stdout
    except CommandFailed as e:
        if e.returncode is None and "not found" in e.output:
            tools()  # raises naming the package
        raise


def read_topology(root: HostRoot, host: Host, lstopo: str, work: Path) -> Path:
    """lstopo's XML of the host into ``work``; HostReadError when hwloc cannot read the tree
    or sees other CPUs than the scan did (it would draw another machine)."""
    out = work / "topology.xml"
    where = "this host" if root.live else f"the tree {root.root}"
    fix = (
        ""
        if root.live
        else "; take the tree again with `partition snapshot DIR` (it copies what hwloc reads)"
    )
    try:
        said = _hwloc(
            [lstopo, *_FILTERS, "--disallowed", "--of", "xml", "-f", str(out)], _env(root)
        )
    except CommandFailed as e:
        raise HostReadError(
            f"hwloc cannot read {where}: {e.output.strip()[-300:]}{fix}", path=str(root.root)
        ) from None
    if _NO_SYSFS in said:
        raise HostReadError(
            f"hwloc cannot read the CPU topology of {where} "
            f"(no sysfs/devices/system/cpu/cpu*/topology masks){fix}",
            path=str(root.root),
        )
    seen = CpuSet(int(e.get("os_index", "-1")) for e in _objects(ET.parse(out).getroot(), "PU"))
    if seen != host.online_cpus:
        raise HostReadError(
            f"hwloc sees CPUs {seen or 'none'} in {where} where the kernel's files list "
            f"{host.online_cpus or 'none'}: it cannot draw this host{fix}",
            path=str(root.root),
        )
    return out


def _objects(root: ET.Element, kind: str) -> Iterator[ET.Element]:
    """The objects of one type in document order, which is their logical index order."""
    return (e for e in root.iter("object") if e.get("type") == kind)


def _logical(xml: Path, kind: str, key: str) -> dict[str, int]:
    """Attribute ``key`` of each object of type ``kind`` -> its logical index."""
    root = ET.parse(xml).getroot()
    return {str(e.get(key)): i for i, e in enumerate(_objects(root, kind))}


def _style(colour: str, text: str) -> str:
    return f"Background={colour};Text={text}"


def annotate(xml: Path, owners: Owners, host: Host, annotate_bin: str) -> Path:
    """The owners on lstopo's XML: styles on PUs and PCI functions, Misc objects for memory
    shares, hugepage pools and the legend.  Returns the annotated file."""
    out = xml.with_name("annotated.xml")
    shutil.copyfile(xml, out)

    def call(*args: str) -> None:
        # --ri: a style replaces one set before (not kept beside it).
        replace = ["--ri"] if "info" in args else []
        _hwloc([annotate_bin, *replace, str(out), str(out), *args])

    nodes = _logical(xml, "NUMANode", "os_index")
    # What lstopo shows of memory is each node's size; the pools and shares are Misc
    # objects under the node, drawn as boxes beside it.
    misc_styles: list[tuple[str, str, str]] = []  # (misc name, colour, text colour)
    for node_id, node in sorted(host.nodes.items()):
        if str(node_id) not in nodes:
            continue
        numa = f"numanode:{nodes[str(node_id)]}"
        for size, pool in sorted(node.hugepages.items()):
            if pool.total:
                call(numa, "misc", f"{format_size(size)} pages: {pool.total} ({pool.free} free)")
        for s in owners.shares:
            share = s.memory_per_node.get(node_id)
            if share is None and s.numa_nodes == (node_id,):
                share = s.memory_bytes
            if share:
                name = f"{s.name}: {human_size(share)}" + (
                    f" in {s.hugepages} pages" if s.hugepages != "none" else ""
                )
                call(numa, "misc", name)
                misc_styles.append((name, s.colour, s.text_colour))
    for name, colour, text in legend(owners):
        call("root", "misc", name)
        misc_styles.append((name, colour, text))

    pus = _logical(out, "PU", "os_index")
    pci = _logical(out, "PCIDev", "pci_busid")
    miscs = ET.parse(out).getroot()
    misc_index = {e.get("name"): i for i, e in enumerate(_objects(miscs, "Misc"))}
    styled: list[tuple[list[str], str]] = []
    reserve = [f"pu:{pus[str(c)]}" for c in owners.reserve_cpus if str(c) in pus]
    if reserve:
        styled.append((reserve, _style(*RESERVE_COLOUR)))
    for s in owners.shares:
        objects = [f"pu:{pus[str(c)]}" for c in s.cpus if str(c) in pus]
        objects += [f"pci:{pci[str(a)]}" for a in s.all_devices if str(a) in pci]
        if objects:
            styled.append((objects, _style(s.colour, s.text_colour)))
    for name, colour, text in misc_styles:
        styled.append(([f"misc:{misc_index[name]}"], _style(colour, text)))
    for objects, style in styled:
        call("--", *objects, "--", "info", STYLE, style)
    return out


def legend(owners: Owners) -> list[tuple[str, str, str]]:
    """The legend's lines with their colours: one per partition (name, CPUs, memory,
    devices), then the host reserve."""
    lines = []
    for s in owners.shares:
        pages = f" in {s.hugepages} pages" if s.hugepages != "none" else ""
        nodes = ",".join(map(str, s.numa_nodes)) or "-"
        devices = " ".join(str(a) for a in s.devices)
        if s.added_devices:
            devices += " +" + " ".join(str(a) for a in s.added_devices)
        lines.append(
            (
                f"{s.name}: CPUs {s.cpus or 'none'}; {human_size(s.memory_bytes)}{pages} "
                f"on node {nodes}; devices {devices.strip() or 'none'}",
                s.colour,
                s.text_colour,
            )
        )
    memory = (
        f" and {human_size(owners.reserve_memory_bytes)}"
        if owners.reserve_memory_bytes is not None
        else ""
    )
    lines.append(
        (
            f"{RESERVE} reserve: CPUs {owners.reserve_cpus or 'none'}{memory}",
            *RESERVE_COLOUR,
        )
    )
    return lines


def check(
    annotated: Path, owners: Owners
) -> tuple[dict[str, CpuSet], dict[str, tuple[PciAddress, ...]]]:
    """Which PUs and functions carry each owner's style in the annotated XML: each owner
    must have exactly what it owns there (the logical indexes were counted right)."""
    root = ET.parse(annotated).getroot()
    colours = {_style(s.colour, s.text_colour): s.name for s in owners.shares}
    colours[_style(*RESERVE_COLOUR)] = RESERVE

    def owner(e: ET.Element) -> str | None:
        for info in e.findall("info"):
            if info.get("name") == STYLE:
                return colours.get(str(info.get("value")))
        return None

    cpus: dict[str, set[int]] = {}
    for e in _objects(root, "PU"):
        who = owner(e)
        if who is not None:
            cpus.setdefault(who, set()).add(int(e.get("os_index", "-1")))
    devices: dict[str, list[PciAddress]] = {}
    for e in _objects(root, "PCIDev"):
        who = owner(e)
        if who is not None:
            devices.setdefault(who, []).append(PciAddress.parse(str(e.get("pci_busid"))))
    got_cpus = {k: CpuSet(v) for k, v in cpus.items()}
    got_devices = {k: tuple(sorted(v, key=str)) for k, v in devices.items()}
    for s in owners.shares:
        if got_cpus.get(s.name, CpuSet()) != s.cpus or set(got_devices.get(s.name, ())) != set(
            s.all_devices
        ):
            raise RuntimeError(
                f"hwloc-annotate styled {got_cpus.get(s.name)} {got_devices.get(s.name)} for "
                f"{s.name}, which owns {s.cpus} {list(map(str, s.all_devices))}"
            )
    return got_cpus, got_devices


def draw(root: HostRoot, host: Host, owners: Owners, fmt: str) -> Drawn:
    """The picture of ``owners`` on the host, as SVG or PNG bytes."""
    lstopo, annotate_bin = tools()
    missing = [f"CPU {c}" for s in owners.shares for c in s.cpus if c not in host.online_cpus] + [
        f"device {a}" for s in owners.shares for a in s.all_devices if a not in host.pci
    ]
    if missing:
        raise HostReadError(
            f"the layout names {', '.join(missing)}, which this host does not have: "
            "draw a plan on the host it was made for (--host-root)"
        )
    with tempfile.TemporaryDirectory(prefix="partition-map-") as tmp:
        work = Path(tmp)
        xml = read_topology(root, host, lstopo, work)
        annotated = annotate(xml, owners, host, annotate_bin)
        cpus, devices = check(annotated, owners)
        image = work / f"map.{fmt}"
        of = "nativesvg" if fmt == "svg" else fmt
        _hwloc(
            [
                lstopo,
                "-i",
                str(annotated),
                *_DRAW,
                "--append-legend",
                f"Partitions: {owners.source}",
                "--of",
                of,
                "-f",
                str(image),
            ]
        )
        return Drawn(image=image.read_bytes(), cpus=cpus, devices=devices)
