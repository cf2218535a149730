"""``partition inspect``: the host as the partitioner sees it."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import textwrap
from collections.abc import Mapping
from typing import Any, TextIO

from partitioner.cli.common import Context, table
from partitioner.cpuset import CpuSet
from partitioner.inventory import scan
from partitioner.inventory.model import Host, PciFunction
from partitioner.pci import PciAddress
from partitioner.units import human_size, page_size_name
from partitioner.vfio.preview import (
    ClaimPreview,
    claim_previews,
    group_endpoints,
    group_refusals,
    reset_refusal,
    stays_with_host,
    used_by_host,
    without_reset,
)

# The width of the table in a pipe or a file (docs/cli.md): a terminal's own, or COLUMNS.
MIN_WIDTH = 40
DEFAULT_WIDTH = 100


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
        ctx.say(render(host, doc, table_width(os.environ, ctx.out)))
        ctx.info(
            "partition: a picture of this host with a site's partitions on it: "
            "partition map FILE -o map.svg"
        )
    return 0


def to_json(host: Host) -> dict[str, Any]:
    """The shape of ``partition inspect --json`` (docs/cli-reference.md), and more."""
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
                **sriov_json(fn),
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


def render(host: Host, doc: dict[str, Any], width: int = 100) -> str:
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
    previews = claim_previews(host)
    rows = []
    for f, vf in pf_order(host, doc["pci"]):
        rows.append(
            [
                ("  " if vf else "") + f["address"],
                f"{f['vendor']}:{f['device']}",
                _name(f),
                "-" if f["iommu_group"] is None else str(f["iommu_group"]),
                "-" if f["numa_node"] is None else str(f["numa_node"]),
                _cut(f["driver"] or "-", 13),
                _cut(",".join(f["netdev"]) or "-", 15),
                short_verdict(host, previews[PciAddress.parse(f["address"])]),
            ]
        )
    header = ["PCI", "ID", "DEVICE", "GROUP", "NODE", "DRIVER", "NETDEV", "VERDICT"]
    text = "\n".join(_wrap(line, width) for line in "\n".join(lines).split("\n"))
    if not rows:
        return text + "\nno PCI functions"
    # A row is never wrapped: what is too wide is cut, DEVICE first, then NETDEV and DRIVER,
    # each to no less than its floor (a narrower terminal gets rows as narrow as that).
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    over = sum(widths) + 2 * (len(header) - 1) - width
    for column, floor in ((2, 12), (6, 6), (5, 6)):
        if over > 0 and widths[column] > floor:
            cut = min(over, widths[column] - floor)
            widths[column] -= cut
            over -= cut
    for r in rows:
        for column in (2, 5, 6):
            r[column] = _cut(r[column], widths[column])
    below = sriov_lines(host) + group_reasons(host, {r[-1] for r in rows})
    return "\n".join([text, table(rows, header), *(_wrap(line, width) for line in below)])


def sriov_json(fn: PciFunction) -> dict[str, Any]:
    """A function's SR-IOV part of ``inspect --json``: ``sriov`` of a physical function (its
    VFs by address), ``physfn`` of a virtual function."""
    caps = fn.sriov
    return {
        "sriov": None
        if caps is None
        else {
            "total_vfs": caps.total_vfs,
            "num_vfs": caps.num_vfs,
            "drivers_autoprobe": caps.drivers_autoprobe,
            "vf_offset": caps.vf_offset,
            "vf_stride": caps.vf_stride,
            "vf_device": caps.vf_device or None,
            "vfs": [str(a) for a in caps.vfs],
        },
        "sriov_problem": fn.sriov_problem,
        "physfn": None if fn.physfn is None else str(fn.physfn),
    }


def pf_order(host: Host, functions: list[dict[str, Any]]) -> list[tuple[dict[str, Any], bool]]:
    """The table's rows: address order, each physical function's VFs right under it (by
    index); (function, is one of those VFs)."""
    listed = {
        str(a): fn.address for fn in host.pci.values() if fn.sriov is not None for a in fn.sriov.vfs
    }
    by_address = {f["address"]: f for f in functions}
    out: list[tuple[dict[str, Any], bool]] = []
    for f in functions:
        if f["address"] in listed:
            continue
        out.append((f, False))
        caps = host.pci[PciAddress.parse(f["address"])].sriov
        for vf in caps.vfs if caps is not None else ():
            if str(vf) in by_address:
                out.append((by_address[str(vf)], True))
    return out


def sriov_lines(host: Host) -> list[str]:
    """One line per SR-IOV physical function: its VF count and whether host drivers take new VFs."""
    out = []
    for fn in host.pci.values():
        caps = fn.sriov
        if caps is None:
            if fn.sriov_problem:
                out.append(f"SR-IOV {fn.address}: unusable: {fn.sriov_problem}")
            continue
        named = f" ({', '.join(fn.netdevs)})" if fn.netdevs else ""
        out.append(
            f"SR-IOV {fn.address}{named}: {caps.num_vfs} of {caps.total_vfs} VFs made"
            + (" (listed under it)" if caps.vfs else "")
            + "; host drivers "
            + ("probe" if caps.drivers_autoprobe else "do not probe")
            + " new VFs"
        )
    return ["", *out] if out else []


def table_width(env: Mapping[str, str], out: TextIO) -> int:
    """``COLUMNS`` when it is a number, else the terminal's width, else 100 (a pipe, a file).

    A terminal that does not know its size says 0 columns (a serial console, a pty
    nobody sized): that is no width, so the default holds; nothing narrower than
    ``MIN_WIDTH`` is taken (a table cannot be cut below its columns' own names)."""
    given = env.get("COLUMNS", "")
    if given.isdigit() and int(given) > 0:
        return max(int(given), MIN_WIDTH)
    with contextlib.suppress(AttributeError, ValueError, OSError):
        if out.isatty():
            columns = os.get_terminal_size(out.fileno()).columns
            if columns > 0:
                return max(columns, MIN_WIDTH)
    return DEFAULT_WIDTH


def _name(f: dict[str, Any]) -> str:
    """The vendor and device names of udev's hwdb (``Intel 82574L Gigabit Network
    Connection``), else the class; a large BAR (a GPU's memory) is worth a word too."""
    bar = _largest_bar(f["bars"])
    if f["device_name"]:
        vendor = _short_vendor(f["vendor_name"] or "")
        return f"{vendor} {f['device_name']}".strip() + bar
    return str(f["label"] or f["class"]) + bar


def _short_vendor(name: str) -> str:
    """``Intel Corporation`` -> ``Intel``, ``Red Hat, Inc.`` -> ``Red Hat``: the company's
    legal form says nothing about the device."""
    name = name.split(",")[0].split(" [")[0]
    return re.sub(r"\s+(Corporation|Corp\.?|Inc\.?|Co\.|Ltd\.?|Limited|GmbH|AG)$", "", name)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 1)] + "~"


def _wrap(line: str, width: int) -> str:
    """A sentence longer than the width continues on indented lines (the table's rows fit)."""
    if len(line) <= width:
        return line
    indent = " " * (len(line) - len(line.lstrip()) + 2)
    return textwrap.fill(
        line, width, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
    )


def short_verdict(host: Host, v: ClaimPreview) -> str:
    """The table's verdict: one short word that never wraps (docs/cli.md lists them); the
    reasons are said once per group below the table, and in full in --json."""
    fn = host.pci.get(v.address)
    if fn is None:
        return "no"
    if stays_with_host(fn):
        return "no:bridge" if fn.is_bridge else "no:chipset"
    if fn.iommu_group is None or fn.iommu_group not in host.iommu_groups:
        return "no:nogroup"
    if v.refusals:
        return "no:host" if used_by_host(host, fn) else "no:group"
    word = "none-ok" if v.no_reset else "yes"
    if v.added:
        word += f"+{len(v.added)}"
    if v.must_name:
        word += "*"
    return word


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
        held = [fn.address for fn in endpoints]
        no_reset = without_reset(host, held, held)
        if no_reset:
            said.append(reset_refusal(no_reset))
        if said and endpoints:
            out.append(f"IOMMU group {g} ({', '.join(str(fn.address) for fn in members)}):")
            out.extend(f"  {s}" for s in said)
    legend = [
        f"{word:<10} {text}"
        for word, text in (
            ("yes+N", "it and the N free functions of its slot go to a guest together (rule 4)"),
            ("none-ok", "it, or what comes with it, has no reset method: `reset: none-ok`"),
            ("*", "the other endpoints of its IOMMU group must be named with it (below)"),
            ("no:bridge", "bridges and ports stay with the host (rule 4)"),
            ("no:chipset", "host and ISA bridges (class 06, header type 0) stay with the host"),
            ("no:nogroup", "the kernel lists no IOMMU group for it"),
            ("no:host", "the host uses it (below)"),
            ("no:group", "something in its IOMMU group keeps the group from a guest (below)"),
        )
        if any(_has(w, word) for w in words)
    ]
    out[0:0] = legend
    if out:
        out.insert(0, "")
    return out


def _has(verdict: str, word: str) -> bool:
    if word == "yes+N":
        return "+" in verdict
    if word == "*":
        return verdict.endswith("*")
    return verdict == word or (word == "none-ok" and verdict.startswith(word))


def _largest_bar(bars: list[dict[str, Any]]) -> str:
    """A large BAR (1 GiB or more: a GPU's memory) is worth a word in the table."""
    big = max((b["size"] for b in bars if b["kind"] == "mem"), default=0)
    return f" ({human_size(big)} BAR)" if big >= 1024**3 else ""
