"""``partition host setup``: a site compiled into what the host needs at boot, as files.

The compiler is pure: a manifest, its plan and a few host facts in, a list of
files out (:func:`compile_setup`).  Writing them under a root directory,
showing the difference from what is there, and taking them away again are
separate steps (:func:`changes`, :func:`write`, :func:`undo_changes`), so that
tests compile into a temporary tree and ``--dry-run`` writes nothing.

What a site needs at boot, and why it cannot wait for ``apply``:

- kernel arguments: the IOMMU on; the partitions' CPUs kept from the
  scheduler's load balancing, the tick, RCU callbacks and managed interrupts
  (rule 9 of docs/manifest.md: what cannot be moved at run time); and the
  hugepage pools reserved per node before memory fragments (1 GiB pages
  practically never can be raised later);
- early binding: each of the site's PCI functions, by address, gets
  ``driver_override = vfio-pci`` in the initramfs, before udev loads any
  driver, so a host driver never touches it;
- SR-IOV (``host.sriov``): a PF's VFs can only be made once its driver has bound
  it, which the initramfs's early binding comes before.  A udev rule runs a script
  of the site's when the PF's driver binds (and the boot-time service runs it
  again before it starts the partitions, whichever comes first; they take turns
  by a lock): ``sriov_drivers_autoprobe`` 0 first, so no host driver probes a VF,
  then ``sriov_numvfs``; each of the site's VFs gets its MAC, VLAN and flags
  through the PF (``ip link set dev PF vf N``, one setting a command) and is then
  bound to vfio-pci by address (``driver_override``), as the early binding does;
- start at boot: a systemd unit that runs ``partition host boot``, or the
  same command from another init system.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from partitioner.cpuset import CpuSet
from partitioner.inventory.model import Host
from partitioner.kernel import sysfs
from partitioner.kernel.root import HostRoot
from partitioner.kernel.vflink import VfLink, set_args
from partitioner.manifest.model import Manifest, VfSettings
from partitioner.planning.model import Plan
from partitioner.units import format_size, kernel_page_size, page_size_name

# Where everything lives on the target; the record lists what was written so that
# --undo takes away exactly that, whatever the site says by then.
SITE_COPY = "/etc/partition/site.yaml"
RECORD = "/etc/partition/host-setup.json"
GRUB_DROPIN = "/etc/default/grub.d/partition.cfg"
KERNEL_CMDLINE = "/etc/kernel/cmdline"  # systemd-boot / kernel-install
ITOOLS_SCRIPT = "/etc/initramfs-tools/scripts/init-top/partition-vfio"
ITOOLS_HOOK = "/etc/initramfs-tools/hooks/partition-vfio"
DRACUT_CONF = "/etc/dracut.conf.d/partition-vfio.conf"
DRACUT_MODULE = "/usr/lib/dracut/modules.d/90partition-vfio"
MODPROBE_CONF = "/etc/modprobe.d/partition-vfio.conf"
SRIOV_SCRIPT = "/etc/partition/sriov-vfs"
SRIOV_RULES = "/etc/udev/rules.d/70-partition-sriov.rules"
SRIOV_LOCK = "/run/partition-sriov.lock"
UNIT = "/etc/systemd/system/partition-site.service"
UNIT_LINK = "/etc/systemd/system/multi-user.target.wants/partition-site.service"
# The program the boot-time service of another machine or an image runs, unless told
# (docs/cli.md): where `pip install --prefix /usr/local` and most images put it.
TARGET_PARTITION = "/usr/local/bin/partition"

HEADER = "Written by `partition host setup`; `partition host setup --undo` removes it."

# Kernel argument keys this tool sets: on a systemd-boot host, /etc/kernel/cmdline is one
# line shared with the rest of the system, and ours replace any earlier value of these.
OUR_KEYS = (
    "intel_iommu",
    "amd_iommu",
    "iommu",
    "isolcpus",
    "nohz_full",
    "rcu_nocbs",
    "irqaffinity",
    "hugepagesz",
    "hugepages",
    "default_hugepagesz",
)

Bootloader = Literal["grub", "systemd-boot"]
Initramfs = Literal["initramfs-tools", "dracut"]


@dataclass(frozen=True)
class HostFacts:
    """What the compiler needs to know about the machine beyond its topology."""

    cpu_vendor: str  # /proc/cpuinfo vendor_id: "GenuineIntel", "AuthenticAMD", "" if unknown
    kernel_release: str  # /proc/sys/kernel/osrelease, "" if unknown
    cmdline: tuple[str, ...] | None  # /proc/cmdline split, None if unknown

    @property
    def kernel_version(self) -> tuple[int, int] | None:
        m = re.match(r"(\d+)\.(\d+)", self.kernel_release)
        return (int(m.group(1)), int(m.group(2))) if m else None


def read_facts(root: HostRoot) -> HostFacts:
    cpuinfo = root.read(sysfs.CPUINFO) or ""
    vendor = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id":
            vendor = value.strip()
            break
    cmdline = root.read(sysfs.CMDLINE)
    return HostFacts(
        cpu_vendor=vendor,
        kernel_release=root.read(sysfs.OSRELEASE) or "",
        cmdline=tuple(shlex.split(cmdline)) if cmdline is not None else None,
    )


@dataclass(frozen=True)
class EarlyDevice:
    address: str  # "0000:41:00.0"
    partition: str
    host_driver: str | None  # the driver the host would bind (for the modprobe softdep)


@dataclass(frozen=True)
class BootVf:
    """One of the site's VFs: made at boot with its PF, given its settings, bound to vfio-pci."""

    index: int
    address: str  # where the PF's offset and stride put it
    partition: str
    settings: VfSettings | None


@dataclass(frozen=True)
class BootPf:
    """A PF of ``host.sriov`` whose ``vfs`` VFs are made at boot; ``site_vfs``: the site's."""

    address: str
    vfs: int
    site_vfs: tuple[BootVf, ...]


@dataclass(frozen=True)
class BootSettings:
    """What the running kernel must carry for the site: compiled once, used by setup and check."""

    kernel_args: tuple[str, ...]
    partition_cpus: CpuSet  # kept from the host at boot (isolation: full), else empty
    reserve_cpus: CpuSet
    hugepages: Mapping[int, Mapping[int, int]]  # page size -> node -> pages, boot-time pools
    devices: tuple[EarlyDevice, ...]
    notes: tuple[str, ...] = ()
    sriov: tuple[BootPf, ...] = ()  # VFs made at boot, once each PF's driver has bound it


def boot_settings(manifest: Manifest, plan: Plan, host: Host, facts: HostFacts) -> BootSettings:
    """The kernel arguments, pools and early-bound devices of ``plan``."""
    args: list[str] = []
    notes: list[str] = []
    if facts.cpu_vendor == "GenuineIntel":
        args.append("intel_iommu=on")
    elif facts.cpu_vendor == "AuthenticAMD":
        # The AMD IOMMU driver is on by default when the firmware describes the IOMMU
        # (IVRS); `amd_iommu=on` is not one of its options (the kernel logs "Unknown
        # option"), so nothing is added: the BIOS setting (IOMMU / AMD-Vi) is what counts.
        notes.append(
            "AMD CPU: the AMD IOMMU is on by default when the firmware enables it (BIOS: IOMMU / AMD-Vi); "
            "no amd_iommu= argument is needed"
        )
    else:
        notes.append(
            "CPU vendor unknown (/proc/cpuinfo unreadable): no intel_iommu= argument; "
            "add intel_iommu=on on an Intel host"
        )
    # Passthrough for the host's own DMA: devices the host keeps are not slowed by
    # translation; assigned devices get their own domain through VFIO regardless.
    args.append("iommu=pt")

    partition_cpus = CpuSet(c for p in plan.placements.values() for c in p.cpus)
    if manifest.host.isolation == "full" and partition_cpus:
        cpus = str(partition_cpus)
        # managed_irq: drivers' managed interrupts avoid these CPUs where they can;
        # domain: out of the scheduler's load balancing (only pinned threads run there).
        args.append(f"isolcpus=managed_irq,domain,{cpus}")
        args.append(f"nohz_full={cpus}")
        args.append(f"rcu_nocbs={cpus}")
        args.append(f"irqaffinity={plan.host_cpus}")
    else:
        partition_cpus = CpuSet()

    # Each partition's memory now (memory_per_node), not its max_memory: the ceiling of a
    # dynamic partition is not a reservation (rule 11), and apply takes the pages it grows by.
    pools: dict[int, dict[int, int]] = {}
    for (node, size), pages in sorted(plan.hugepages_needed().items()):
        if pages:
            pools.setdefault(size, {})[node] = pages
    for p in plan.start_order():
        if p.hugepage_bytes is not None and p.max_memory_bytes > p.memory_bytes:
            notes.append(
                f"partition {p.name}: the boot-time pools hold its memory "
                f"({format_size(p.memory_bytes)}), not its max_memory "
                f"({format_size(p.max_memory_bytes)}): the pages it grows by live are raised "
                f"when `partition apply` grows it, which fragmentation can refuse "
                f"({page_size_name(p.hugepage_bytes)} pages)"
            )
    version = facts.kernel_version
    per_node = version is None or version >= (5, 16)
    # Largest pages first: a 1 GiB page needs 1 GiB of contiguous memory, best
    # found before anything else is carved out at boot.
    for size in sorted(pools, reverse=True):
        nodes = pools[size]
        args.append(f"hugepagesz={kernel_page_size(size)}")
        if per_node and host.nodes:
            args.append("hugepages=" + ",".join(f"{n}:{c}" for n, c in sorted(nodes.items())))
        else:
            args.append(f"hugepages={sum(nodes.values())}")
    if pools and not per_node:
        notes.append(
            f"kernel {facts.kernel_release} is older than 5.16 and does not take per-node counts "
            "(hugepages=N0:count,N1:count): the total is reserved at boot and the kernel spreads "
            "it evenly over the nodes; `partition apply` then moves what a node lacks at run time "
            "(which fragmentation can refuse). Boot a 5.16 or later kernel for per-node pools"
        )

    devices: list[EarlyDevice] = []
    site_vfs: dict[str, list[BootVf]] = {}
    for p in plan.start_order():
        for d in p.devices:
            if d.vf is not None:
                # Made at boot once its PF's driver is bound, after the initramfs: the
                # SR-IOV script binds it (sriov_files), not the early binding.
                site_vfs.setdefault(str(d.vf.pf), []).append(
                    BootVf(d.vf.index, str(d.address), p.name, d.vf.settings)
                )
                continue
            fn = host.pci.get(d.address)
            driver = fn.driver if fn is not None else d.driver
            if driver == "vfio-pci":
                driver = d.driver if d.driver != "vfio-pci" else None
            devices.append(EarlyDevice(str(d.address), p.name, driver))
    devices.sort(key=lambda d: d.address)
    return BootSettings(
        kernel_args=tuple(args),
        partition_cpus=partition_cpus,
        reserve_cpus=plan.host_cpus,
        hugepages={s: dict(n) for s, n in pools.items()},
        devices=tuple(devices),
        notes=tuple(notes),
        sriov=tuple(
            BootPf(
                str(pf.address),
                pf.vfs,
                tuple(sorted(site_vfs.get(str(pf.address), []), key=lambda v: v.index)),
            )
            for pf in plan.sriov
        ),
    )


# -- the target: what the root directory boots with --------------------------------


@dataclass(frozen=True)
class Target:
    root: Path
    bootloader: Bootloader
    initramfs: Initramfs
    systemd: bool  # the target runs systemd: units are written and enabled


def detect_target(root: Path) -> Target:
    """How the system under ``root`` boots, from the files it has.

    GRUB unless the tree is set up for kernel-install/systemd-boot and has no
    GRUB defaults; initramfs-tools unless only dracut is there (Debian's
    defaults); systemd units when systemd is installed there.
    """

    def has(p: str) -> bool:
        return (root / p.lstrip("/")).exists()

    sdboot = (
        has(KERNEL_CMDLINE)
        or has("/boot/efi/loader/loader.conf")
        or has("/efi/loader/loader.conf")
        or has("/boot/loader/loader.conf")
    )
    bootloader: Bootloader = "systemd-boot" if sdboot and not has("/etc/default/grub") else "grub"
    dracut = (has("/etc/dracut.conf.d") or has("/usr/lib/dracut")) and not has(
        "/etc/initramfs-tools"
    )
    systemd = has("/lib/systemd/systemd") or has("/usr/lib/systemd/systemd")
    return Target(
        root=root,
        bootloader=bootloader,
        initramfs="dracut" if dracut else "initramfs-tools",
        systemd=systemd,
    )


@dataclass(frozen=True)
class SetupFile:
    path: str  # absolute, on the target
    content: str  # a symlink's target when ``symlink``
    purpose: str
    mode: int = 0o644
    symlink: bool = False
    group: Literal["cmdline", "initramfs", "units", "sriov", "site"] = "site"


@dataclass(frozen=True)
class SetupPlan:
    target: Target
    settings: BootSettings
    files: tuple[SetupFile, ...]
    edited_originals: Mapping[str, str]  # files we change but do not own: their content before
    notes: tuple[str, ...] = ()


def _bind_script(devices: Sequence[EarlyDevice]) -> str:
    """The shell that claims the site's functions: the same text in initramfs-tools and dracut."""
    addrs = " ".join(d.address for d in devices)
    return (
        "# Only the site's functions, by PCI address (vfio-pci.ids= would take every\n"
        "# device with the same vendor:device).  driver_override makes the kernel offer\n"
        "# each to vfio-pci alone; it is set before udev loads any driver.\n"
        f"for dev in {addrs}; do\n"
        '\tsysdev="/sys/bus/pci/devices/$dev"\n'
        '\t[ -e "$sysdev/driver_override" ] || continue\n'
        '\techo vfio-pci > "$sysdev/driver_override"\n'
        "\t# A driver built into the kernel may have bound it already: let it go.\n"
        '\tif [ -e "$sysdev/driver" ] && [ "$(basename "$(readlink "$sysdev/driver")")" != vfio-pci ]; then\n'
        '\t\techo "$dev" > "$sysdev/driver/unbind"\n'
        "\tfi\n"
        "done\n"
        "modprobe -q vfio-pci 2>/dev/null || true\n"
        f"for dev in {addrs}; do\n"
        '\t[ -e "/sys/bus/pci/devices/$dev/driver" ] || echo "$dev" > /sys/bus/pci/drivers_probe 2>/dev/null || true\n'
        "done\n"
    )


def _initramfs_files(devices: Sequence[EarlyDevice], kind: Initramfs) -> list[SetupFile]:
    if not devices:
        return []
    files: list[SetupFile] = []
    script = _bind_script(devices)
    drivers = sorted({d.host_driver for d in devices if d.host_driver})
    if kind == "initramfs-tools":
        # It must run before udev's own init-top script starts udevd and coldplugs the
        # drivers.  initramfs-tools orders scripts with tsort of their prerequisites,
        # listed in name order, and tsort keeps that order for unrelated ones: with no
        # prerequisites, "partition-vfio" runs before "udev" (a test runs that code).
        files.append(
            SetupFile(
                ITOOLS_SCRIPT,
                "#!/bin/sh\n"
                f"# {HEADER}\n"
                'PREREQ=""\nprereqs() { echo "$PREREQ"; }\n'
                'case "$1" in prereqs) prereqs; exit 0 ;; esac\n' + script,
                "bind the site's PCI functions to vfio-pci in the initramfs, before udev",
                mode=0o755,
                group="initramfs",
            )
        )
        files.append(
            SetupFile(
                ITOOLS_HOOK,
                "#!/bin/sh\n"
                f"# {HEADER}\n"
                'PREREQ=""\nprereqs() { echo "$PREREQ"; }\n'
                'case "$1" in prereqs) prereqs; exit 0 ;; esac\n'
                ". /usr/share/initramfs-tools/hook-functions\n"
                "manual_add_modules vfio vfio_iommu_type1 vfio_pci\n",
                "put vfio-pci into the initramfs",
                mode=0o755,
                group="initramfs",
            )
        )
    else:
        # dracut: a module of our own whose pre-udev hook runs the same script.
        files.append(
            SetupFile(
                f"{DRACUT_MODULE}/module-setup.sh",
                "#!/bin/bash\n"
                f"# {HEADER}\n"
                "check() { return 0; }\n"
                "depends() { return 0; }\n"
                "installkernel() { hostonly='' instmods vfio vfio_iommu_type1 vfio_pci; }\n"
                'install() { inst_hook pre-udev 00 "$moddir/partition-vfio.sh"; }\n',
                "dracut module: vfio-pci and the binding hook into the initramfs",
                mode=0o755,
                group="initramfs",
            )
        )
        files.append(
            SetupFile(
                f"{DRACUT_MODULE}/partition-vfio.sh",
                f"#!/bin/sh\n# {HEADER}\n" + script,
                "bind the site's PCI functions to vfio-pci in the initramfs, before udev",
                mode=0o755,
                group="initramfs",
            )
        )
        files.append(
            SetupFile(
                DRACUT_CONF,
                f"# {HEADER}\n"
                'add_dracutmodules+=" partition-vfio "\n'
                + (f'install_items+=" {MODPROBE_CONF} "\n' if drivers else ""),
                "include the module in every initramfs dracut builds",
                group="initramfs",
            )
        )
    if not drivers:
        # No host driver to order after vfio-pci: a file of comments alone would say nothing.
        return files
    lines = [f"# {HEADER}"]
    lines.append(
        "# The host drivers of the site's functions load after vfio-pci, so that a\n"
        "# function whose driver_override says vfio-pci is taken by it at once."
    )
    lines.extend(f"softdep {drv} pre: vfio-pci" for drv in drivers)
    files.append(
        SetupFile(
            MODPROBE_CONF,
            "\n".join(lines) + "\n",
            "load vfio-pci before the site devices' host drivers",
            group="initramfs",
        )
    )
    return files


def vf_setting_args(settings: VfSettings) -> list[list[str]]:
    """The ``ip link set dev PF vf N`` arguments that give a new VF ``settings``, one list per
    command (the kernel stops at the first setting a driver refuses), only what differs from
    a new VF's: as ``apply`` sends them (``kernel.vflink.set_args``)."""
    return set_args(VfLink().with_settings(settings), VfLink())


def _sriov_script(pfs: Sequence[BootPf]) -> str:
    """The shell that makes a PF's VFs and sets up the site's: run by udev when the PF's driver
    binds it (``sriov-vfs PF``), and by the boot-time service before it starts the partitions
    (``sriov-vfs``: every PF whose driver is bound)."""
    lines = [
        "#!/bin/sh",
        f"# {HEADER}",
        "# The site's SR-IOV virtual functions, made once the physical function's driver has",
        "# bound it (the kernel makes VFs only through that driver): sriov_drivers_autoprobe 0",
        "# first, so that no host driver probes a VF; then sriov_numvfs; then each of the",
        "# site's VFs gets its MAC, VLAN and flags through the PF and is bound to vfio-pci by",
        "# address.  udev runs it with the PF's address when its driver binds it, by",
        f"# {SRIOV_RULES};",
        "# the boot-time service runs it without one (every PF whose driver is bound)",
        "# before it starts the partitions.  Both take turns by a lock.",
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        'say() { echo "partition-sriov: $*" >&2; echo "partition-sriov: $*" > /dev/kmsg 2>/dev/null; }',
        "",
        "make_vfs() {  # PF COUNT",
        '\tsys="/sys/bus/pci/devices/$1"',
        '\t[ -e "$sys/sriov_numvfs" ] || { say "$1: not an SR-IOV physical function"; return 1; }',
        '\t[ -e "$sys/driver" ] || { say "$1: no driver bound: its VFs wait for it"; return 1; }',
        '\t[ "$(cat "$sys/sriov_numvfs")" = "$2" ] && return 0',
        '\techo 0 > "$sys/sriov_drivers_autoprobe" || return 1',
        "\t# The kernel takes a new count only from 0.",
        '\t[ "$(cat "$sys/sriov_numvfs")" = 0 ] || echo 0 > "$sys/sriov_numvfs" || return 1',
        '\techo "$2" > "$sys/sriov_numvfs" || { say "$1: sriov_numvfs $2 refused"; return 1; }',
        '\tsay "$1: $2 VFs made, host drivers kept off them"',
        "}",
        "",
        "set_vf() {  # PF INDEX ADDRESS SETTING...: one setting, through the PF's interface",
        '\tpf="$1"; index="$2"; addr="$3"; shift 3',
        '\tnet=$(ls "/sys/bus/pci/devices/$pf/net" 2>/dev/null | head -n 1)',
        '\t[ -n "$net" ] || { say "$pf: no network interface to set VF $index through"; return 1; }',
        '\tip link set dev "$net" vf "$index" "$@" && return 0',
        '\tsay "$addr: VF $index of $pf: $1 refused: left unbound for apply to set up"; return 1',
        "}",
        "",
        "bind_vf() {  # ADDRESS: to vfio-pci by address, as the early binding does",
        '\tsysdev="/sys/bus/pci/devices/$1"',
        '\t[ -e "$sysdev" ] || { say "$1: not there (the PF has fewer VFs)"; return 1; }',
        '\techo vfio-pci > "$sysdev/driver_override"',
        '\t[ -e "$sysdev/driver" ] || echo "$1" > /sys/bus/pci/drivers_probe',
        "}",
        "",
        "pf_of_site() {  # PF",
        '\tcase "$1" in',
    ]
    for pf in pfs:
        lines.append(f"\t{pf.address})")
        lines.append(f"\t\tmake_vfs {pf.address} {pf.vfs} || return 1")
        if pf.site_vfs:
            lines.append("\t\tmodprobe -q vfio-pci")
        for v in pf.site_vfs:
            cmds = vf_setting_args(v.settings) if v.settings is not None else []
            sets = [
                f"set_vf {pf.address} {v.index} {v.address} {' '.join(shlex.quote(a) for a in c)}"
                for c in cmds
            ]
            # A VF whose settings were refused is left unbound: apply sets it up (or says why).
            chain = " && ".join([*sets, f"bind_vf {v.address}"])
            lines.append(f"\t\t{chain}  # {v.partition}")
        lines.append("\t\t;;")
    lines += [
        '\t*) say "$1 is not a PF of the site"; return 1 ;;',
        "\tesac",
        "}",
        "",
        f'exec 9>"{SRIOV_LOCK}" && flock 9',
        'if [ $# -gt 0 ]; then pf_of_site "$1"; exit $?; fi',
        "rc=0",
        f"for pf in {' '.join(pf.address for pf in pfs)}; do",
        '\t[ -e "/sys/bus/pci/devices/$pf/driver" ] || continue  # udev runs it when bound',
        '\tpf_of_site "$pf" || rc=1',
        "done",
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"


def _sriov_rules(pfs: Sequence[BootPf]) -> str:
    lines = [
        f"# {HEADER}",
        "# When a PF of the site is bound by its driver (or found bound, at coldplug), make its",
        f"# VFs and set up the site's ({SRIOV_SCRIPT}).  Not for vfio-pci: it is not the PF's",
        "# network driver.",
    ]
    for pf in pfs:
        lines.append(
            f'ACTION=="add|bind", SUBSYSTEM=="pci", KERNEL=="{pf.address}", DRIVER=="?*", '
            f'DRIVER!="vfio-pci", RUN+="{SRIOV_SCRIPT} {pf.address}"'
        )
    return "\n".join(lines) + "\n"


def _sriov_files(pfs: Sequence[BootPf]) -> list[SetupFile]:
    if not pfs:
        return []
    return [
        SetupFile(
            SRIOV_SCRIPT,
            _sriov_script(pfs),
            "make the site's SR-IOV VFs (autoprobe off), set and bind the site's to vfio-pci",
            mode=0o755,
            group="sriov",
        ),
        SetupFile(
            SRIOV_RULES,
            _sriov_rules(pfs),
            "run it when each PF's driver binds it",
            group="sriov",
        ),
    ]


def _unit(partition_cmd: Sequence[str], sriov: bool = False) -> str:
    cmd = shlex.join([*partition_cmd, "host", "boot", SITE_COPY])
    stop = shlex.join([*partition_cmd, "destroy", SITE_COPY])
    return (
        f"# {HEADER}\n"
        "[Unit]\n"
        f"Description=Logical partitions of {SITE_COPY}\n"
        "After=local-fs.target systemd-modules-load.service network-pre.target\n"
        f"ConditionPathExists={SITE_COPY}\n"
        "\n"
        "[Service]\n"
        "# `host boot` starts the partitions with autostart: true in `order`, as `apply`\n"
        "# would, then stays to restart the ones that crash (on_crash); systemd\n"
        "# restarts it in turn.  Stopping the service stops them in the reverse order.\n"
        "Type=exec\n"
        + (
            "# The site's VFs made first, if udev has not (its rule runs the same script).\n"
            f"ExecStartPre=-{SRIOV_SCRIPT}\n"
            if sriov
            else ""
        )
        + f"ExecStart={cmd}\n"
        f"ExecStop={stop}\n"
        "Restart=on-failure\n"
        "RestartSec=5\n"
        "# The guests are not this service's processes to kill: `destroy` stops them.\n"
        "KillMode=process\n"
        "TimeoutStartSec=infinity\n"
        "TimeoutStopSec=600\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def compile_setup(
    manifest: Manifest,
    manifest_text: str,
    plan: Plan,
    host: Host,
    facts: HostFacts,
    target: Target,
    partition_cmd: Sequence[str],
) -> SetupPlan:
    """Every file the site needs at boot on ``target``: pure, nothing is read but ``target``'s
    one shared file (``/etc/kernel/cmdline``) through the record of what it was."""
    settings = boot_settings(manifest, plan, host, facts)
    files: list[SetupFile] = []
    edited: dict[str, str] = {}
    notes = list(settings.notes)
    args = " ".join(settings.kernel_args)
    if target.bootloader == "grub":
        files.append(
            SetupFile(
                GRUB_DROPIN,
                f"# {HEADER}\n"
                "# Kernel arguments of the site (read by update-grub after /etc/default/grub).\n"
                f'GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX {args}"\n',
                "kernel arguments for GRUB (update-grub reads grub.d after /etc/default/grub)",
                group="cmdline",
            )
        )
    else:
        original = _original(target, KERNEL_CMDLINE)
        if original is None:
            # kernel-install falls back to /proc/cmdline when the file is missing: keep
            # what the machine boots with now, without the boot loader's own words.
            base = [
                a for a in (facts.cmdline or ()) if not a.startswith(("BOOT_IMAGE=", "initrd="))
            ]
        else:
            edited[KERNEL_CMDLINE] = original
            base = original.split()
        kept = [a for a in base if a.split("=", 1)[0] not in OUR_KEYS]
        files.append(
            SetupFile(
                KERNEL_CMDLINE,
                " ".join([*kept, *settings.kernel_args]) + "\n",
                "kernel arguments for kernel-install / systemd-boot",
                group="cmdline",
            )
        )
    files.extend(_initramfs_files(settings.devices, target.initramfs))
    files.extend(_sriov_files(settings.sriov))
    if target.systemd:
        files.append(
            SetupFile(
                UNIT,
                _unit(partition_cmd, sriov=bool(settings.sriov)),
                "start the site's partitions at boot, in order, and restart them on crash",
                group="units",
            )
        )
        files.append(
            SetupFile(
                UNIT_LINK,
                "../partition-site.service",
                "enable it (what `systemctl enable` does)",
                symlink=True,
                group="units",
            )
        )
    else:
        notes.append(
            "no systemd on the target: have its init system run "
            f"`{shlex.join([*partition_cmd, 'host', 'boot', SITE_COPY])}` once the local "
            f"filesystems are mounted (it stays in the foreground to restart crashed partitions: "
            f"run it as a respawned service), and `partition destroy {SITE_COPY}` at shutdown"
        )
    files.append(
        SetupFile(SITE_COPY, manifest_text, "the site the boot-time start reads", group="site")
    )
    return SetupPlan(
        target=target,
        settings=settings,
        files=tuple(files),
        edited_originals=edited,
        notes=tuple(notes),
    )


# -- the record of what was written ----------------------------------------------


def _local(target: Target, path: str) -> Path:
    return target.root / path.lstrip("/")


def _read_record(target: Target) -> dict[str, Any] | None:
    try:
        doc = json.loads(_local(target, RECORD).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _original(target: Target, path: str) -> str | None:
    """The content of a shared file before we first edited it (from the record), or now."""
    rec = _read_record(target)
    if rec is not None and path in rec.get("edited", {}):
        value = rec["edited"][path]
        return value if isinstance(value, str) else None
    try:
        return _local(target, path).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _made_dirs(setup: SetupPlan) -> list[str]:
    """Directories the files need that the target lacks, plus those an earlier setup made:
    ``--undo`` removes them again when they are left empty."""
    target = setup.target
    earlier = (_read_record(target) or {}).get("dirs", [])
    made = {d for d in earlier if isinstance(d, str)}
    for f in [*setup.files, SetupFile(RECORD, "", "")]:
        d = os.path.dirname(f.path)
        while d not in ("/", "") and not _local(target, d).is_dir():
            made.add(d)
            d = os.path.dirname(d)
    return sorted(made)


def record_file(setup: SetupPlan) -> SetupFile:
    doc = {
        "version": 1,
        "files": sorted(f.path for f in setup.files if f.path not in setup.edited_originals),
        "dirs": _made_dirs(setup),
        "edited": dict(sorted(setup.edited_originals.items())),
        "kernel_args": list(setup.settings.kernel_args),
    }
    return SetupFile(
        RECORD,
        json.dumps(doc, indent=2) + "\n",
        "what host setup wrote, for --undo",
    )


# -- changes: what writing would do --------------------------------------------------


@dataclass(frozen=True)
class FileChange:
    path: str
    action: Literal["create", "update", "remove", "restore", "rmdir", "unchanged"]
    purpose: str
    content: str | None  # the new content (None for remove)
    diff: str  # unified diff from what is there
    mode: int = 0o644
    symlink: bool = False
    group: str = "site"

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "action": self.action,
            "purpose": self.purpose,
            "mode": f"{self.mode:04o}",
            "symlink": self.symlink,
            "content": self.content,
            "diff": self.diff,
        }


def _current(target: Target, path: str) -> tuple[str | None, bool, int | None]:
    """(content or link target, is a symlink, mode) of a file on the target; None if absent."""
    local = _local(target, path)
    if local.is_symlink():
        return os.readlink(local), True, None
    try:
        return local.read_text(), False, local.stat().st_mode & 0o7777
    except (FileNotFoundError, NotADirectoryError):
        return None, False, None


def _diff(path: str, old: str | None, new: str | None) -> str:
    return "".join(
        difflib.unified_diff(
            (old or "").splitlines(keepends=True),
            (new or "").splitlines(keepends=True),
            fromfile=path if old is not None else "/dev/null",
            tofile=path if new is not None else "/dev/null",
        )
    )


def changes(setup: SetupPlan) -> list[FileChange]:
    """Each file of the setup against the target, plus files an earlier setup wrote that this
    one no longer needs (a device dropped, dracut replaced by initramfs-tools)."""
    target = setup.target
    out: list[FileChange] = []
    wanted = [*setup.files, record_file(setup)]
    for f in wanted:
        content, is_link, mode = _current(target, f.path)
        if content is None:
            action: Literal["create", "update", "unchanged"] = "create"
        elif content == f.content and is_link == f.symlink and (f.symlink or mode == f.mode):
            action = "unchanged"
        else:
            action = "update"
        out.append(
            FileChange(
                f.path,
                action,
                f.purpose,
                f.content,
                "" if action == "unchanged" else _diff(f.path, content, f.content),
                f.mode,
                f.symlink,
                f.group,
            )
        )
    rec = _read_record(target) or {}
    paths = {f.path for f in wanted}
    for path in rec.get("files", []):
        if isinstance(path, str) and path not in paths:
            gone = _removal(target, path, "written by an earlier host setup, no longer needed")
            if gone is not None:
                out.append(gone)
    return out


def _removal(target: Target, path: str, why: str) -> FileChange | None:
    """The removal of a file host setup wrote, or None when it is not there any more."""
    content, is_link, _ = _current(target, path)
    if content is None:
        return None
    diff = "" if is_link else _diff(path, content, None)
    return FileChange(path, "remove", why, None, diff, group=_group_of(path))


def undo_changes(target: Target) -> list[FileChange]:
    """What ``--undo`` does: remove every file the record lists, put back every file it edited."""
    rec = _read_record(target)
    if rec is None:
        return []
    out: list[FileChange] = []
    for path in rec.get("files", []):
        gone = _removal(target, path, "written by host setup") if isinstance(path, str) else None
        if gone is not None:
            out.append(gone)
    for path, original in rec.get("edited", {}).items():
        content, _, _ = _current(target, path)
        if content != original:
            out.append(
                FileChange(
                    path,
                    "restore",
                    "put back as it was before host setup",
                    original,
                    _diff(path, content, original),
                    group=_group_of(path),
                )
            )
    content, _, _ = _current(target, RECORD)
    if content is not None and RECORD not in rec.get("files", []):
        out.append(FileChange(RECORD, "remove", "the record of host setup", None, ""))
    # Deepest first, and only those left empty (``write`` checks): someone else's file in
    # one of them keeps it.
    for d in sorted((d for d in rec.get("dirs", []) if isinstance(d, str)), reverse=True):
        if _local(target, d).is_dir():
            out.append(FileChange(d, "rmdir", "a directory host setup made", None, ""))
    return out


def _group_of(path: str) -> str:
    if path in (GRUB_DROPIN, KERNEL_CMDLINE):
        return "cmdline"
    if path.startswith(
        ("/etc/initramfs-tools", "/etc/dracut", "/usr/lib/dracut", "/etc/modprobe.d")
    ):
        return "initramfs"
    if path.startswith("/etc/systemd"):
        return "units"
    if path in (SRIOV_SCRIPT, SRIOV_RULES):
        return "sriov"
    return "site"


def write(target: Target, change_list: Sequence[FileChange]) -> None:
    """Carry out the changes under ``target.root``: each file replaced atomically."""
    for c in change_list:
        local = _local(target, c.path)
        if c.action == "unchanged":
            continue
        if c.action == "rmdir":
            with contextlib.suppress(OSError):
                local.rmdir()
            continue
        if c.action == "remove":
            if local.is_symlink() or local.exists():
                local.unlink()
            continue
        assert c.content is not None
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.partition-tmp")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        if c.symlink:
            os.symlink(c.content, tmp)
        else:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, c.mode)
            try:
                os.write(fd, c.content.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(tmp, c.mode)
        os.replace(tmp, local)


@dataclass(frozen=True)
class Commands:
    """What must run after the files changed, so that the next boot uses them."""

    argv: tuple[tuple[str, ...], ...]
    reasons: tuple[str, ...] = field(default=())


def follow_up(target: Target, change_list: Sequence[FileChange], facts: HostFacts) -> Commands:
    changed = {c.group for c in change_list if c.action != "unchanged"}
    argv: list[tuple[str, ...]] = []
    reasons: list[str] = []
    if "cmdline" in changed:
        if target.bootloader == "grub":
            argv.append(("update-grub",))
            reasons.append("update-grub: write the kernel arguments into grub.cfg")
        else:
            release = facts.kernel_release or "$(uname -r)"
            argv.append(("kernel-install", "add", release, f"/boot/vmlinuz-{release}"))
            reasons.append("kernel-install add: give the boot entry the new command line")
    if "initramfs" in changed:
        if target.initramfs == "initramfs-tools":
            argv.append(("update-initramfs", "-u", "-k", "all"))
            reasons.append("update-initramfs: put the early binding into the initramfs")
        else:
            argv.append(("dracut", "-f", "--regenerate-all"))
            reasons.append("dracut: put the early binding into the initramfs")
    if "sriov" in changed and target.systemd:
        argv.append(("udevadm", "control", "--reload"))
        reasons.append("udevadm control --reload: udev reads the SR-IOV rule")
    if "units" in changed and target.systemd:
        argv.append(("systemctl", "daemon-reload"))
        reasons.append("systemctl daemon-reload: systemd reads the unit")
    return Commands(tuple(argv), tuple(reasons))


def reboot_needed(settings: BootSettings, facts: HostFacts) -> list[str]:
    """Kernel arguments of the site that the running kernel was not booted with."""
    if facts.cmdline is None:
        return list(settings.kernel_args)
    have = set(facts.cmdline)
    return [a for a in settings.kernel_args if a not in have]
