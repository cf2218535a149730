"""What the installed QEMU can do, asked of QEMU itself once per binary.

One short QEMU run (``-machine none -qmp stdio``) answers everything: the
version, the object types it was built with (``thread-context`` arrived in
7.2, ``memory-backend-memfd`` needs Linux memfd, ``vfio-pci`` needs a VFIO
build) and whether ``-sandbox`` exists (only when built with seccomp).  The
answer is cached per binary path, size and modification time, in memory and in
``$PARTITION_CACHE_DIR`` (default ``/var/cache/partition``), so that each
command does not pay for a QEMU run, and an upgraded QEMU is probed again.
Where UEFI firmware is installed is looked up every time: it is a package of
its own; so is what the host's KVM offers (``guest/kvm.py``), which can change
with a module parameter.  The x86 CPU properties (``qom-list-properties`` of
the ``max`` model) and ``-overcommit``'s parameters say which dedicated-CPU
settings this QEMU knows (``guest/argv.py``); the properties of ``virtio-mem-pci`` whether
it can preallocate what it plugs (``prealloc``, QEMU 7.1+).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from partitioner.errors import GuestError
from partitioner.guest.kvm import KvmCaps, probe_kvm
from partitioner.run import CommandFailed, run

# OVMF (code, vars template) pairs, preferred first.  Debian's ``ovmf`` ships the 4M
# builds next to the legacy 2M ones; Fedora and Arch use the edk2 paths.
OVMF_CANDIDATES: tuple[tuple[str, str], ...] = (
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
    ("/usr/share/edk2/x64/OVMF_CODE.fd", "/usr/share/edk2/x64/OVMF_VARS.fd"),
)

_SANDBOX_KNOBS = frozenset({"obsolete", "elevateprivileges", "spawn", "resourcecontrol"})
# The x86 CPU properties the KVM command line may use; the probe keeps those QEMU has.
CPU_PROPS = frozenset(
    {"migratable", "kvm-hint-dedicated", "host-cache-info", "host-phys-bits", "arch-capabilities"}
)
# Bump when the probe learns something new: older cache entries are probed again.
_CACHE_LAYOUT = 4


@dataclass(frozen=True)
class QemuCaps:
    binary: str  # absolute path of the QEMU that was probed
    version: tuple[int, int, int]
    package: str = ""  # distribution build string, e.g. "Debian 1:7.2+dfsg-7+deb12u18"
    thread_context: bool = False  # -object thread-context (7.2+): prealloc threads placed by us
    sandbox: bool = False  # -sandbox with obsolete/elevateprivileges/spawn/resourcecontrol
    memfd: bool = False  # memory-backend-memfd (hugetlb without a hugetlbfs mount)
    vfio_pci: bool = False
    iothread: bool = False
    ovmf_code: str | None = None  # UEFI firmware found on this host, None when not installed
    ovmf_vars: str | None = None
    cpu_props: frozenset[str] = frozenset()  # of CPU_PROPS, those this QEMU's x86 CPUs have
    cpu_pm: bool = False  # -overcommit cpu-pm=on (QEMU 3.0+)
    # How this QEMU is told to chroot and to drop to a user after it has set itself up
    # (rule 10): "run-with" (-run-with chroot=/user=, QEMU 8.1+/9.1+), the older options
    # "chroot" / "runas" (removed in 9.0 / deprecated in 9.1), or "" when it cannot.
    chroot: str = ""
    runas: str = ""
    virtio_mem: bool = False  # -device virtio-mem-pci (dynamic memory, QEMU 5.1+)
    virtio_mem_prealloc: bool = False  # its prealloc property: plugged memory preallocated
    kvm: KvmCaps | None = None  # what the host's KVM answered (live, never cached); None: not asked

    @property
    def version_text(self) -> str:
        return ".".join(str(v) for v in self.version)


_cache: dict[tuple[str, int], QemuCaps] = {}


def probe_qemu(binary: str = "qemu-system-x86_64") -> QemuCaps:
    """Ask ``binary`` (a name on PATH or a path) what it supports.

    Raises GuestError when it is not installed or does not answer.
    """
    path = binary if os.sep in binary else shutil.which(binary)
    if path is None or not os.access(path, os.X_OK):
        raise GuestError(
            f"QEMU ({binary}) is not installed: install it with `apt-get install qemu-system-x86` "
            "(Debian, Ubuntu) or `dnf install qemu-kvm` (Fedora)"
        )
    path = os.path.realpath(path)
    st = os.stat(path)
    key = (path, st.st_mtime_ns)
    caps = _cache.get(key)
    if caps is None:
        disk_key = f"{_CACHE_LAYOUT}:{path}:{st.st_size}:{st.st_mtime_ns}"
        caps = _read_disk_cache(disk_key)
        if caps is None:
            caps = _probe(path)
            _write_disk_cache(disk_key, caps)
        _cache[key] = caps
    ovmf_code, ovmf_vars = _find_ovmf()
    return replace(caps, ovmf_code=ovmf_code, ovmf_vars=ovmf_vars, kvm=probe_kvm())


def _disk_cache() -> Path:
    return Path(os.environ.get("PARTITION_CACHE_DIR") or "/var/cache/partition") / "qemu-caps.json"


def _read_disk_cache(key: str) -> QemuCaps | None:
    try:
        doc = json.loads(_disk_cache().read_text())
        entry = doc[key]
        return QemuCaps(
            **{
                **entry,
                "version": tuple(entry["version"]),
                "cpu_props": frozenset(entry.get("cpu_props", ())),
                "kvm": None,
            }
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no cache, another QEMU's, or an older layout: probe again


def _write_disk_cache(key: str, caps: QemuCaps) -> None:
    # Only the one QEMU's answer is kept; a cache that cannot be written costs time only.
    target = _disk_cache()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        doc = {**asdict(caps), "cpu_props": sorted(caps.cpu_props), "kvm": None}
        tmp.write_text(json.dumps({key: doc}))
        os.replace(tmp, target)
    except OSError:
        pass


def _probe(path: str) -> QemuCaps:
    commands: list[dict[str, Any]] = [
        {"execute": "qmp_capabilities"},
        {"execute": "query-version", "id": "version"},
        {"execute": "qom-list-types", "id": "types"},
        {
            "execute": "query-command-line-options",
            "arguments": {"option": "sandbox"},
            "id": "sandbox",
        },
        {
            "execute": "qom-list-properties",
            "arguments": {"typename": "max-x86_64-cpu"},
            "id": "cpu",
        },
        {
            "execute": "query-command-line-options",
            "arguments": {"option": "overcommit"},
            "id": "overcommit",
        },
        {
            "execute": "query-command-line-options",
            "arguments": {"option": "run-with"},
            "id": "run-with",
        },
        # Answered with an error by a QEMU without virtio-mem.
        {
            "execute": "device-list-properties",
            "arguments": {"typename": "virtio-mem-pci"},
            "id": "virtio-mem",
        },
        {"execute": "quit"},
    ]
    stdin = "".join(json.dumps(c) + "\n" for c in commands)
    argv = [path, "-machine", "none", "-nodefaults", "-no-user-config", "-display", "none"]
    argv += ["-qmp", "stdio"]
    try:
        cp = run(argv, input=stdin, timeout=30, check=False)
    except CommandFailed as e:
        raise GuestError(f"QEMU ({path}) could not be probed: {e}") from e
    replies: dict[str, dict[str, Any]] = {}
    for line in cp.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if isinstance(msg, dict) and isinstance(msg.get("id"), str):
            replies[msg["id"]] = msg
    version_reply = replies.get("version", {}).get("return")
    if not isinstance(version_reply, dict):
        raise GuestError(
            f"QEMU ({path}) did not answer a QMP query-version (exit code {cp.returncode}):\n"
            + "\n".join(cp.stdout.strip().splitlines()[-5:])
        )
    v = version_reply.get("qemu", {})
    version = (int(v.get("major", 0)), int(v.get("minor", 0)), int(v.get("micro", 0)))
    types = {t.get("name") for t in replies.get("types", {}).get("return", []) or []}
    sandbox_knobs: set[str] = set()
    # QEMU without seccomp has no "sandbox" option and answers this query with an error.
    for opt in replies.get("sandbox", {}).get("return", []) or []:
        sandbox_knobs.update(p.get("name", "") for p in opt.get("parameters", []))
    cpu_props = {p.get("name") for p in replies.get("cpu", {}).get("return", []) or []}
    overcommit: set[str] = set()
    for opt in replies.get("overcommit", {}).get("return", []) or []:
        overcommit.update(p.get("name", "") for p in opt.get("parameters", []))
    run_with: set[str] = set()
    for opt in replies.get("run-with", {}).get("return", []) or []:
        run_with.update(p.get("name", "") for p in opt.get("parameters", []))
    # -chroot and -runas are not QemuOpts, so the QMP query cannot list them: QEMU is asked
    # whether it accepts each (a QEMU of no machine, chrooted in / or running as nobody).
    chroot = (
        "run-with" if "chroot" in run_with else "chroot" if _accepts(path, "-chroot", "/") else ""
    )
    runas = (
        "run-with"
        if "user" in run_with
        else "runas"
        if _accepts(path, "-runas", "65534:65534")
        else ""
    )
    vmem_props = {p.get("name") for p in replies.get("virtio-mem", {}).get("return", []) or []}
    ovmf_code, ovmf_vars = _find_ovmf()
    return QemuCaps(
        binary=path,
        chroot=chroot,
        runas=runas,
        version=version,
        package=str(version_reply.get("package", "")).strip(),
        thread_context="thread-context" in types,
        sandbox=sandbox_knobs >= _SANDBOX_KNOBS,
        memfd="memory-backend-memfd" in types,
        vfio_pci="vfio-pci" in types,
        iothread="iothread" in types,
        ovmf_code=ovmf_code,
        ovmf_vars=ovmf_vars,
        cpu_props=CPU_PROPS & frozenset(n for n in cpu_props if isinstance(n, str)),
        cpu_pm="cpu-pm" in overcommit,
        virtio_mem="virtio-mem-pci" in types and "requested-size" in vmem_props,
        virtio_mem_prealloc="prealloc" in vmem_props,
    )


def _accepts(path: str, *option: str) -> bool:
    """Whether QEMU starts with ``option`` (it refuses an option it does not know at once)."""
    argv = [path, "-machine", "none", "-nodefaults", "-no-user-config", "-display", "none"]
    argv += [*option, "-qmp", "stdio"]
    stdin = json.dumps({"execute": "qmp_capabilities"}) + "\n" + json.dumps({"execute": "quit"})
    try:
        cp = run(argv, input=stdin + "\n", timeout=30, check=False)
    except CommandFailed:
        return False
    return cp.returncode == 0 and '"QMP"' in cp.stdout


def _find_ovmf() -> tuple[str | None, str | None]:
    for code, vars_ in OVMF_CANDIDATES:
        if Path(code).is_file() and Path(vars_).is_file():
            return code, vars_
    return None, None
