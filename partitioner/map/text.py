"""The terminal form of the map: per NUMA node, who owns each CPU, memory and device.

Drawn here, not by hwloc: lstopo's text output (``--of console``) shows no colours or
owners, and a terminal reader wants the owner's name beside each CPU.
"""

from __future__ import annotations

from partitioner.inventory.model import Host
from partitioner.map.owners import RESERVE, Owners
from partitioner.units import format_size, human_size

FREE = "."  # a CPU nobody holds


def cpu_strips(host: Host, owners: Owners) -> list[str]:
    """One line per NUMA node: each online CPU with its owner (``status`` shows these)."""
    lines = []
    for node_id, node in sorted(host.nodes.items()):
        if not node.cpus:
            continue
        cells = " ".join(f"{c}:{owners.owner_of_cpu(c) or FREE}" for c in node.cpus)
        lines.append(f"node {node_id}  {cells}")
    homeless = [c for c in host.online_cpus if host.cpus[c].node is None]
    if homeless:
        cells = " ".join(f"{c}:{owners.owner_of_cpu(c) or FREE}" for c in homeless)
        lines.append(f"no node  {cells}")
    return lines


def render(host: Host, owners: Owners) -> str:
    """The whole map as text."""
    reserve_memory = (
        f" and {human_size(owners.reserve_memory_bytes)}"
        if owners.reserve_memory_bytes is not None
        else ""
    )
    out = [
        f"partitions: {owners.source}; {RESERVE} reserve: CPUs "
        f"{owners.reserve_cpus or 'none'}{reserve_memory}; {FREE} free",
    ]
    for node_id, node in sorted(host.nodes.items()):
        packages = sorted({host.cpus[c].package for c in node.cpus})
        pools = ", ".join(
            f"{format_size(size)} pages {p.total} ({p.free} free)"
            for size, p in sorted(node.hugepages.items())
            if p.total
        )
        out.append("")
        out.append(
            f"node {node_id} (package {','.join(map(str, packages)) or '-'}): "
            f"{human_size(node.memory_bytes)}" + (f"; {pools}" if pools else "")
        )
        cores: dict[tuple[int, int, int], list[int]] = {}
        for c in node.cpus:
            cpu = host.cpus[c]
            cores.setdefault((cpu.package, cpu.die, cpu.core), []).append(c)
        cells = [
            "[" + " ".join(f"{c}:{owners.owner_of_cpu(c) or FREE}" for c in cpus) + "]"
            for cpus in cores.values()
        ]
        out.append("  cpus    " + " ".join(cells))
        for s in owners.shares:
            share = s.memory_per_node.get(node_id)
            if share is None and s.numa_nodes == (node_id,):
                share = s.memory_bytes
            if share:
                pages = f" in {s.hugepages} pages" if s.hugepages != "none" else ""
                out.append(f"  memory  {s.name}: {human_size(share)}{pages}")
        for address, fn in sorted(host.pci.items(), key=lambda kv: str(kv[0])):
            who = owners.owner_of_device(address)
            if who is not None and fn.numa_node == node_id:
                out.append(f"  device  {address} {who}" + (f" ({fn.label})" if fn.label else ""))
    elsewhere = [
        (a, owners.owner_of_device(a))
        for a, fn in sorted(host.pci.items(), key=lambda kv: str(kv[0]))
        if fn.numa_node not in host.nodes and owners.owner_of_device(a)
    ]
    if elsewhere:
        out.append("")
        out.append("no node")
        out.extend(f"  device  {a} {who}" for a, who in elsewhere)
    return "\n".join(out)
