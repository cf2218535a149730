"""Memory: NUMA nodes (their CPUs, size, distances), meminfo and hugepage pools."""

from __future__ import annotations

import re

from partitioner.cpuset import CpuSet
from partitioner.errors import HostReadError
from partitioner.inventory.cpus import NODE_DIR_RE, replace_cpu
from partitioner.inventory.model import Cpu, HugepagePool, NumaNode
from partitioner.inventory.reader import Reader
from partitioner.kernel import sysfs

# The largest page of any architecture Linux runs on (ppc64's 16 GiB "gigantic" pages).
MAX_PAGE_BYTES = 16 * 2**30
_HUGEPAGE_DIR_RE = re.compile(r"^hugepages-([0-9]+)kB$")
_MEMINFO_RE = re.compile(r"^(?:Node [0-9]+ )?(\w+):\s+([0-9]+)(?: kB)?\s*$", re.ASCII)
# Twenty digits hold any 64-bit count; longer is no kernel's number (and int() of
# thousands of digits costs time and refuses beyond 4300).
_MAX_DIGITS = 20


def scan_nodes(r: Reader, cpus: dict[int, Cpu]) -> dict[int, NumaNode]:
    """The NUMA nodes; fills in ``cpus``' ``node``."""
    online = CpuSet(c.id for c in cpus.values() if c.online)
    node_ids = sorted(
        int(m.group(1)) for n in r.root.listdir(sysfs.NODE) if (m := NODE_DIR_RE.match(n))
    )
    if not node_ids:
        return scan_single_node(r, cpus, online)
    nodes: dict[int, NumaNode] = {}
    claimed: set[int] = set()
    dropped: list[int] = []
    for n in node_ids:
        ncpus = r.read_cpuset(sysfs.node(n, "cpulist"), sysfs.node(n, "cpumap")) or CpuSet()
        ncpus = ncpus & online
        if claimed & set(ncpus):
            # hwloc too keeps the first node that names a CPU and drops the
            # ones that name it again (its "buggynuma" case): a CPU cannot
            # be local to two nodes, and the memory of the later nodes cannot
            # be placed with confidence, so it is not offered.
            dropped.append(n)
            continue
        claimed |= set(ncpus)
        meminfo = sysfs.node(n, "meminfo")
        mem = read_meminfo(r, meminfo)
        total = mem.get("MemTotal")
        if total is None:
            r.note(f"node {n}: no MemTotal in {meminfo}; taken as 0")
        nodes[n] = NumaNode(
            id=n,
            cpus=ncpus,
            memory_bytes=(total or 0) * 1024,
            free_bytes=mem.get("MemFree", 0) * 1024,
            distances=read_distances(r, sysfs.node(n, "distance")),
            hugepages=read_pools(r, sysfs.node(n, "hugepages")),
        )
    total_kb = read_meminfo(r, sysfs.MEMINFO).get("MemTotal")
    nodes_kb = sum(n.memory_bytes for n in nodes.values()) // 1024
    if total_kb and abs(nodes_kb - total_kb) > total_kb // 20 and not dropped:
        # Seen on VMs whose memory was hot-added or ballooned: the per-node
        # figures are what can be placed on a node, so they are the ones kept.
        r.note(
            f"the NUMA nodes hold {nodes_kb // 1024} MiB in all but /proc/meminfo says "
            f"MemTotal {total_kb // 1024} MiB; the nodes' figures are used"
        )
    if dropped:
        r.note(
            "the kernel gives some CPUs to more than one NUMA node; "
            f"node(s) {', '.join(map(str, dropped))} are left out, as hwloc does"
        )
    # Fill Cpu.node from the nodes' lists; offline CPUs are in no list, their
    # cpuN/nodeM link still says where they belong.
    node_of = {c: n.id for n in nodes.values() for c in n.cpus}
    for c in list(cpus.values()):
        nid = node_of.get(c.id)
        if nid is None and not c.online:
            for entry in r.root.listdir(sysfs.cpu(c.id)):
                m = NODE_DIR_RE.match(entry)
                if m and int(m.group(1)) in nodes:
                    nid = int(m.group(1))
                    break
        if nid is not None:
            cpus[c.id] = replace_cpu(c, node=nid)
    return nodes


def scan_single_node(r: Reader, cpus: dict[int, Cpu], online: CpuSet) -> dict[int, NumaNode]:
    """A kernel without NUMA is one node 0 with everything, as numactl and hwloc see it."""
    mem = read_meminfo(r, sysfs.MEMINFO)
    if "MemTotal" not in mem:
        r.note("no NUMA nodes and no MemTotal in /proc/meminfo: memory taken as 0")
    for c in list(cpus.values()):
        if c.online:
            cpus[c.id] = replace_cpu(c, node=0)
    return {
        0: NumaNode(
            id=0,
            cpus=online,
            memory_bytes=mem.get("MemTotal", 0) * 1024,
            free_bytes=mem.get("MemFree", 0) * 1024,
            distances=(10,),
            hugepages=read_pools(r, sysfs.HUGEPAGES),
        )
    }


def read_meminfo(r: Reader, path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (r.read(path) or "").splitlines():
        m = _MEMINFO_RE.match(line.strip())
        if m:
            if len(m.group(2)) > _MAX_DIGITS:
                r.note(f"{path}: {m.group(1)} is {len(m.group(2))} digits long; ignored")
                continue
            out[m.group(1)] = int(m.group(2))
    return out


def read_distances(r: Reader, path: str) -> tuple[int, ...]:
    text = r.read(path)
    if not text:
        return ()
    words = text.split()
    if not all(w.isascii() and w.isdigit() and len(w) <= _MAX_DIGITS for w in words):
        r.note(f"{path}: {text[:40]!r} is not a list of distances; ignored")
        return ()
    return tuple(int(x) for x in words)


def page_size_of(r: Reader, base: str, name: str) -> int | None:
    """The page size in bytes a ``hugepages-SIZEkB`` directory stands for; None (noted) if
    the name is no page size: the kernel's are powers of two above the 4 KiB base page."""
    m = _HUGEPAGE_DIR_RE.match(name)
    if not m:
        return None
    digits = m.group(1).lstrip("0") or "0"
    if len(digits) > 12 or int(digits) * 1024 > MAX_PAGE_BYTES:
        # Not junk beside the pools but a pool of pages no machine has: its size times
        # its count would be taken for memory the node holds, so the tree is refused.
        where = r.root.path(f"{base}/{name}")
        raise HostReadError(
            f"{where} is a pool of {digits[:20]}{'...' if len(digits) > 20 else ''} KiB pages, "
            f"larger than any page Linux has ({MAX_PAGE_BYTES // 2**30} GiB): the tree is "
            "damaged; take a new one with `partition snapshot DIR`",
            path=str(where),
        )
    kb = int(digits)
    if kb <= 4 or kb & (kb - 1):
        r.note(f"{base}/{name} is not a hugepage size; ignored")
        return None
    return kb * 1024


def read_pools(r: Reader, base: str) -> dict[int, HugepagePool]:
    pools: dict[int, HugepagePool] = {}
    for name in r.root.listdir(base):
        size = page_size_of(r, base, name)
        if size is None:
            continue
        d = f"{base}/{name}"
        pools[size] = HugepagePool(
            size_bytes=size,
            total=r.read_int(f"{d}/nr_hugepages", 0) or 0,
            free=r.read_int(f"{d}/free_hugepages", 0) or 0,
            surplus=r.read_int(f"{d}/surplus_hugepages", 0) or 0,
        )
    return dict(sorted(pools.items()))


def scan_hugepage_sizes(r: Reader, nodes: dict[int, NumaNode]) -> tuple[int, ...]:
    sizes = {
        size
        for n in r.root.listdir(sysfs.HUGEPAGES)
        if (size := page_size_of(r, sysfs.HUGEPAGES, n)) is not None
    }
    if not sizes:
        sizes = {s for node in nodes.values() for s in node.hugepages}
    return tuple(sorted(sizes))
