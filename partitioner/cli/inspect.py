"""``partition inspect``: the host as the partitioner sees it."""

from __future__ import annotations

import argparse
from typing import Any

from partitioner.cli.common import Context, table
from partitioner.cpuset import CpuSet
from partitioner.host import Host
from partitioner.inventory import scan
from partitioner.units import human_size, page_size_name
from vfio.preview import (
    ClaimPreview,
    claim_previews,
    group_endpoints,
    group_refusals,
    reset_refusal,
    stays_with_host,
    used_by_host,
)


def register(sub: Any) -> None:
    p = sub.add_parser("inspect", help="show the host: CPUs, NUMA nodes, memory, PCI functions")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ctx: Context) -> int:
    host = scan(ctx.root())
    doc = to_json(host)
    for note in host.notes:
        ctx.note(note)
    if ctx.json:
        ctx.emit_json(doc)
    else:
        ctx.say(render(host, doc))
    return 0


def to_json(host: Host) -> dict[str, Any]:
    """The shape of ``partition inspect --json`` (cli.md), and more."""
    cpus = [
        {
            "cpu": c.id,
            "core": c.core,
            "package": c.package,
            "die": c.die,
            "node": c.node,
            "online": c.online,
            "allowed": c.allowed,
            "siblings": c.siblings.as_list(),
            **({"kind": c.kind} if c.kind else {}),
        }
        for c in sorted(host.cpus.values(), key=lambda c: c.id)
    ]
    nodes = []
    for n in sorted(host.nodes.values(), key=lambda n: n.id):
        pools = {page_size_name(size): {"total": 0, "free": 0} for size in host.hugepage_sizes}
        for size, pool in n.hugepages.items():
            pools[page_size_name(size)] = {"total": pool.total, "free": pool.free}
        nodes.append(
            {
                "node": n.id,
                "cpus": n.cpus.as_list(),
                "memory_bytes": n.memory_bytes,
                "free_bytes": n.free_bytes,
                "distances": list(n.distances),
                "hugepages": pools,
            }
        )
    pci = []
    previews = claim_previews(host)
    for addr in sorted(host.pci):
        fn = host.pci[addr]
        preview = previews[addr]
        word = verdict_word(host, preview)
        pci.append(
            {
                "address": str(addr),
                "vendor": fn.vendor,
                "device": fn.device,
                "vendor_name": fn.vendor_name or None,  # udev's hwdb, live host only
                "device_name": fn.device_name or None,
                "class": fn.class_code,
                "label": fn.label,
                "subsystem": f"{fn.subsystem_vendor}:{fn.subsystem_device}",
                "iommu_group": fn.iommu_group,
                "numa_node": fn.numa_node,
                "driver": fn.driver,
                "netdev": list(fn.netdevs),
                "reset_methods": list(fn.reset_methods),
                "is_bridge": fn.is_bridge,
                "boot_vga": fn.boot_vga,
                "in_use": list(host.in_use.get(addr, ())),
                "assignable": preview.assignable,
                "why_not": preview.why_not,
                "takes_with_it": [str(a) for a in preview.takes_with_it],
                "verdict": word,
                "claim": preview.to_json(),
                "bars": [b.to_json() for b in fn.bars],
            }
        )
    return {
        "cpus": cpus,
        "numa_nodes": nodes,
        "pci": pci,
        "kvm": host.has_kvm,
        "iommu": host.has_iommu,
        "phys_bits": host.phys_bits,
        "hugepage_sizes": [page_size_name(s) for s in host.hugepage_sizes],
        "notes": list(host.notes),
    }


def render(host: Host, doc: dict[str, Any]) -> str:
    online = [c for c in host.cpus.values() if c.online]
    packages = {c.package for c in online}
    cores = {(c.package, c.siblings) for c in online}
    offline = CpuSet(c.id for c in host.cpus.values() if not c.online)
    disallowed = CpuSet(c.id for c in online if not c.allowed)
    lines = [
        f"CPUs: {len(online)} online in {len(packages)} package{'s' if len(packages) != 1 else ''}, "
        f"{len(cores)} cores, {host.threads_per_core()} thread{'s' if host.threads_per_core() != 1 else ''} "
        f"per core"
        + (f"; offline: {offline}" if offline else "")
        + (f"; not allowed here: {disallowed}" if disallowed else ""),
        f"KVM: {'yes' if host.has_kvm else 'no (/dev/kvm missing)'}; "
        f"IOMMU: {'yes' if host.has_iommu else 'no (no IOMMU groups: boot with intel_iommu=on or amd_iommu=on)'}",
        "",
    ]
    size_names = [page_size_name(s) for s in host.hugepage_sizes]
    node_rows = []
    for n in doc["numa_nodes"]:
        node_rows.append(
            [
                str(n["node"]),
                str(CpuSet(n["cpus"])) or "-",
                human_size(n["memory_bytes"]),
                human_size(n["free_bytes"]),
                *(f"{n['hugepages'][s]['free']}/{n['hugepages'][s]['total']}" for s in size_names),
            ]
        )
    lines.append(
        table(
            node_rows, ["NODE", "CPUS", "MEMORY", "FREE", *(f"{s} FREE/TOTAL" for s in size_names)]
        )
    )
    lines.append("")
    pci_rows = []
    for f in doc["pci"]:
        pci_rows.append(
            [
                f["address"],
                f"{f['vendor']}:{f['device']}",
                (f["label"] or f["class"]) + _largest_bar(f["bars"]),
                "-" if f["iommu_group"] is None else str(f["iommu_group"]),
                "-" if f["numa_node"] is None else str(f["numa_node"]),
                f["driver"] or "-",
                ",".join(f["netdev"]) or "-",
                f["verdict"],
            ]
        )
    if pci_rows:
        lines.append(
            table(
                pci_rows, ["PCI", "ID", "CLASS", "GROUP", "NODE", "DRIVER", "NETDEV", "ASSIGNABLE"]
            )
        )
        lines.extend(group_reasons(host, {f["verdict"] for f in doc["pci"]}))
    else:
        lines.append("no PCI functions")
    return "\n".join(lines)


def verdict_word(host: Host, v: ClaimPreview) -> str:
    """The verdict in a few words for the table; the reasons are said once per group below it."""
    fn = host.pci.get(v.address)
    if fn is None:
        return "no: not on this host"
    if stays_with_host(fn):
        return "no: bridge" if fn.is_bridge else "no: chipset"
    if fn.iommu_group is None or fn.iommu_group not in host.iommu_groups:
        return "no: no IOMMU group"
    if v.refusals:
        if used_by_host(host, fn):
            return "no: the host uses it"
        return f"no: see group {fn.iommu_group}"
    extra = ""
    if v.added:
        extra = f" +{len(v.added)} of its slot"
    if v.must_name:
        extra += f", name {len(v.must_name)} more"
    if v.no_reset:
        return f"with reset: none-ok{extra}"
    return f"yes{extra}"


def group_reasons(host: Host, words: set[str]) -> list[str]:
    """The reasons behind the table's verdicts, once per IOMMU group (the JSON has them per function)."""
    out: list[str] = []
    if host.pci and not host.has_iommu:
        out.append(
            "no IOMMU groups: no function can be assigned; enable VT-d / AMD-Vi in the BIOS and "
            "boot with intel_iommu=on (Intel) or amd_iommu=on (AMD)"
        )
    for g in sorted(host.iommu_groups):
        members = [host.pci[a] for a in sorted(host.iommu_groups[g].members) if a in host.pci]
        said = group_refusals(host, g)
        endpoints = group_endpoints(host, g)
        slots = {fn.address.slot_key for fn in endpoints}
        if len(slots) > 1:
            said.append(
                f"endpoints of several slots ({', '.join(str(fn.address) for fn in endpoints)}): "
                "the group is assigned whole, so name them all in one partition (rule 4)"
            )
        no_reset = [fn.address for fn in endpoints if not fn.reset_methods]
        if no_reset:
            said.append(reset_refusal(no_reset))
        if said and endpoints:
            out.append(f"IOMMU group {g} ({', '.join(str(fn.address) for fn in members)}):")
            out.extend(f"  {s}" for s in said)
    legend = [
        text
        for word, text in (
            ("no: bridge", "bridges and ports stay with the host (rule 4)"),
            (
                "no: chipset",
                "host and ISA bridges (class 06, header type 0) stay with the host (rule 5)",
            ),
            ("+", "+N of its slot: the free functions of its slot come along (rule 4)"),
        )
        if any(word in w for w in words)
    ]
    out[0:0] = legend
    if out:
        out.insert(0, "")
    return out


def _largest_bar(bars: list[dict[str, Any]]) -> str:
    """A large BAR (1 GiB or more: a GPU's memory) is worth a word in the table."""
    big = max((b["size"] for b in bars if b["kind"] == "mem"), default=0)
    return f" ({human_size(big)} BAR)" if big >= 1024**3 else ""
