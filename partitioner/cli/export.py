"""``partition export FILE --format libvirt|kubevirt [--out DIR]``: the plan as another manager's documents.

Read-only: it plans as ``plan`` does (keeping running partitions where they
are, or as if nothing ran with --host-root) and writes documents, nothing else.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

from partitioner.cli.common import MANIFEST_HELP, Context
from partitioner.errors import UsageError
from partitioner.export import kubevirt, libvirt
from partitioner.inventory import scan
from partitioner.kernel import sysfs
from partitioner.manifest.loader import load
from partitioner.manifest.model import Manifest
from partitioner.planning.planner import plan
from partitioner.record.model import State, running_partitions
from partitioner.record.store import StateStore


def register(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="the plan as libvirt domain XML or KubeVirt VirtualMachine objects"
    )
    p.add_argument("file", metavar="FILE", help=MANIFEST_HELP)
    p.add_argument("--format", required=True, choices=["libvirt", "kubevirt"])
    p.add_argument(
        "--out", metavar="DIR", help="write one file per document into DIR (else: stdout)"
    )
    p.add_argument(
        "--node",
        metavar="NAME",
        help="kubevirt: the Kubernetes node name of this host (default: its hostname)",
    )
    p.add_argument(
        "--pvc",
        metavar="PATH=CLAIM",
        action="append",
        default=[],
        help="kubevirt: the disk PATH of the manifest is the PersistentVolumeClaim CLAIM "
        "(needed for a block device or a qcow2 image; repeatable)",
    )
    p.add_argument(
        "--kernel-image",
        metavar="[NAME=]IMAGE",
        action="append",
        default=[],
        help="kubevirt: the container image holding partition NAME's boot kernel and initrd "
        "at the manifest's paths (without NAME=: every partition with boot:; repeatable)",
    )
    p.set_defaults(func=run)


# A Kubernetes object name (DNS-1123 subdomain), as a PersistentVolumeClaim's must be.
_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def sources_of(args: argparse.Namespace, manifest: Manifest) -> kubevirt.Sources:
    """--pvc and --kernel-image, checked against the manifest: each names what it is for."""
    if args.format != "kubevirt" and (args.pvc or args.kernel_image):
        raise UsageError("--pvc and --kernel-image are for --format kubevirt")
    disks = {d.path for spec in manifest.partitions.values() for d in spec.disks}
    claims: dict[str, str] = {}
    for given in args.pvc:
        path, eq, claim = given.rpartition("=")
        if not eq or not path:
            raise UsageError(f"--pvc {given}: give PATH=CLAIM (a disk path of the manifest)")
        if path not in disks:
            raise UsageError(
                f"--pvc {given}: {path} is no disk of {manifest.file} "
                f"(disks: {', '.join(sorted(disks)) or 'none'})"
            )
        if len(claim) > 253 or not _K8S_NAME.fullmatch(claim):
            raise UsageError(
                f"--pvc {given}: {claim!r} is not a claim name Kubernetes takes "
                "(lower-case letters, digits, '-' and '.', starting and ending alphanumeric)"
            )
        claims[path] = claim
    booted = sorted(n for n, spec in manifest.partitions.items() if spec.boot is not None)
    images: dict[str, str] = {}
    for given in args.kernel_image:
        name, eq, image = given.rpartition("=")
        if not image.strip() or any(c.isspace() for c in image):
            raise UsageError(f"--kernel-image {given}: name a container image")
        if not eq and not booted:
            raise UsageError(
                f"--kernel-image {given}: no partition of {manifest.file} has boot: "
                "(a kernel image is for direct kernel boot)"
            )
        for n in [name] if eq else booted:
            if n not in booted:
                raise UsageError(
                    f"--kernel-image {given}: {n} is no partition of {manifest.file} that has "
                    f"boot: (with boot: {', '.join(booted) or 'none'})"
                )
            images[n] = image
    return kubevirt.Sources(claims=claims, kernel_images=images)


def run(args: argparse.Namespace, ctx: Context) -> int:
    manifest = load(args.file)
    sources = sources_of(args, manifest)
    root = ctx.root()
    host = scan(root)
    state = State() if ctx.host_root is not None else StateStore(ctx.state_dir).load()
    result = plan(manifest, host, running_partitions(state))
    extra: dict[str, Any] = {}
    if args.format == "libvirt":
        docs = libvirt.documents(result)
        extra = {"notes": libvirt.notes(result)}
    else:
        node = args.node or (root.read(sysfs.HOSTNAME) or "").strip()
        if not node:
            raise UsageError(
                f"the host tree {ctx.host_root} does not say its hostname: "
                "name the Kubernetes node with --node NAME"
            )
        kv = kubevirt.export(result, node, {a: f.id for a, f in host.pci.items()}, sources)
        docs = kv.documents
        extra = kv.to_json()
    if args.out:
        _write(Path(args.out), docs)
    if ctx.json:
        ctx.emit_json(
            {
                "format": args.format,
                "out": args.out,
                "files": sorted(docs),
                "documents": docs,
                **extra,
            }
        )
        return 0
    if args.out:
        for name in docs:
            ctx.say(str(Path(args.out) / name))
    else:
        for name, text in docs.items():
            ctx.say(_header(args.format, name))
            ctx.out.write(text)
    for name, lines in extra.get("substitutions", {}).items():
        for line in lines:
            ctx.note(f"{name}: KubeVirt picks devices by model: {line}")
    for name, lines in extra.get("notes", {}).items():
        for line in lines:
            ctx.note(f"{name}: not exported: {line}")
    return 0


def _header(fmt: str, name: str) -> str:
    """A comment naming the file a document would have with --out."""
    return f"<!-- {name} -->" if fmt == "libvirt" else f"---\n# {name}"


def _write(out: Path, docs: dict[str, str]) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in docs.items():
            tmp = out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, out / name)
    except OSError as e:
        raise UsageError(
            f"cannot write the export into {out}: {e.strerror}; name a writable directory"
        ) from e
