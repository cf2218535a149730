"""``partition host check [FILE]``: is this machine ready to run partitions, in the manner of
libvirt's ``virt-host-validate``; with a site, does the running kernel carry its boot-time
settings, and what needs a reboot.

Every fact is read through the one door (:class:`HostRoot`), so a snapshot or a
built tree is checked exactly like the live host.  The one thing a tree cannot
answer is whether ``/dev/kvm`` runs a vCPU with ``-cpu host``: that probe starts
QEMU, and only on the live host (:func:`probe_kvm_cpu_host`).

A tree may also lack a file the live host always has (an old snapshot without
``/proc/cpuinfo``, a built tree without ``/dev``): what it does not hold is
``unknown``, never a failure, since the machine it was taken from may well have
it.  On the live host a missing file is what it says (no ``/dev/kvm`` is no KVM).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from partitioner.boot.setup import SRIOV_SCRIPT, BootSettings, HostFacts, reboot_needed
from partitioner.cpuset import CpuSet
from partitioner.inventory.model import Host
from partitioner.inventory.pci import interrupt_remapping as inventory_interrupt_remapping
from partitioner.kernel import sysfs, vflink
from partitioner.kernel.root import HostRoot
from partitioner.kernel.vflink import VfLink, VfLinkError, set_args
from partitioner.units import GiB, page_size_name

Status = Literal["pass", "warn", "fail", "unknown"]


def _lacking(root: HostRoot, live: Status) -> Status:
    """The status of a fact that cannot be read: ``live`` on the live host; in a tree, unknown."""
    return live if root.live else "unknown"


def kvm_exists(root: HostRoot, host: Host) -> bool | None:
    """Whether ``/dev/kvm`` exists; None when the tree does not say.  A snapshot always makes
    ``dev/`` (empty where the machine had no KVM), so a tree without ``dev/`` is one that did not
    record it (an older snapshot, a dump of ``/sys`` and ``/proc`` only)."""
    if host.has_kvm or root.exists(sysfs.DEV_KVM):
        return True
    if root.live or root.is_dir(sysfs.DEV):
        return False
    return None


@dataclass(frozen=True)
class CheckItem:
    id: str  # stable, for scripts: "iommu", "interrupt-remapping", "site-isolated-cpus", ...
    title: str
    status: Status
    detail: str
    fix: str = ""  # what to do: a kernel argument, a BIOS setting, a package, a command
    reboot: bool = False  # the fix takes effect only after a reboot

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "fix": self.fix,
            "reboot": self.reboot,
        }


def _flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def _vendor(facts: HostFacts) -> Literal["intel", "amd", ""]:
    return (
        "intel"
        if facts.cpu_vendor == "GenuineIntel"
        else "amd"
        if facts.cpu_vendor == "AuthenticAMD"
        else ""
    )


def _iommu_arg(facts: HostFacts) -> str:
    v = _vendor(facts)
    if v == "intel":
        return "the kernel argument intel_iommu=on (`partition host setup` writes it) and VT-d in the firmware"
    if v == "amd":
        return "AMD-Vi / IOMMU enabled in the firmware (the AMD IOMMU is on by default when the firmware describes it)"
    return "VT-d (Intel: kernel argument intel_iommu=on) or AMD-Vi enabled in the firmware"


# -- the host ----------------------------------------------------------------------


def check_host(
    root: HostRoot, host: Host, facts: HostFacts, accel: str | None = None
) -> list[CheckItem]:
    """The machine's readiness; ``accel`` is the site's, when there is one: a site that says
    `accel: tcg` runs without KVM, so a missing KVM is a warning for it, not a failure."""
    cpuinfo = root.read(sysfs.CPUINFO)
    flags = _flags(cpuinfo or "")
    kvm = kvm_exists(root, host)
    items = [
        _virt(root, cpuinfo, flags, kvm),
        _kvm(kvm, flags),
        *_iommu(root, host, facts),
        _groups_acs(host),
        _hugepage_sizes(host, flags, cpuinfo is not None),
        _vfio(root, facts),
        _cgroup(root),
        _init(root),
    ]
    if accel == "tcg":
        items = [
            replace(
                i,
                status="warn",
                detail=i.detail + " (the site says accel: tcg and runs without KVM)",
            )
            if i.id in ("cpu-virt", "kvm") and i.status == "fail"
            else i
            for i in items
        ]
    return items


def _virt(root: HostRoot, cpuinfo: str | None, flags: set[str], has_kvm: bool | None) -> CheckItem:
    title = "hardware virtualization"
    if cpuinfo is None:
        return CheckItem(
            "cpu-virt", title, _lacking(root, "warn"), f"{sysfs.CPUINFO} cannot be read"
        )
    if "vmx" in flags or "svm" in flags:
        which = "VT-x (vmx)" if "vmx" in flags else "AMD-V (svm)"
        return CheckItem("cpu-virt", title, "pass", f"the CPU offers {which}")
    if has_kvm:
        # A KVM that hides vmx/svm from its guest's flags but still offers /dev/kvm:
        # a paravirtualized nested KVM.  Whether it runs real guests is the probe's to say.
        return CheckItem(
            "cpu-virt",
            title,
            "warn",
            "the CPU flags show neither vmx nor svm, yet /dev/kvm exists: a nested or paravirtualized KVM",
        )
    if has_kvm is None:
        return CheckItem(
            "cpu-virt",
            title,
            "unknown",
            "the CPU flags show neither vmx nor svm, and the tree does not say whether /dev/kvm "
            "exists (a paravirtualized KVM hides them): it has no dev/",
        )
    return CheckItem(
        "cpu-virt",
        title,
        "fail",
        "the CPU flags show neither vmx nor svm",
        "enable Intel VT-x or AMD-V (SVM) in the firmware; in a virtual machine, give it nested virtualization",
    )


def _kvm(kvm: bool | None, flags: set[str]) -> CheckItem:
    title = sysfs.DEV_KVM
    if kvm:
        return CheckItem("kvm", title, "pass", "/dev/kvm exists")
    if kvm is None:
        return CheckItem(
            "kvm",
            title,
            "unknown",
            "the tree has no dev/, so it does not say whether /dev/kvm exists "
            "(a snapshot makes dev/, empty where the machine has no KVM)",
        )
    module = (
        "kvm_intel" if "vmx" in flags else "kvm_amd" if "svm" in flags else "kvm_intel or kvm_amd"
    )
    return CheckItem(
        "kvm",
        title,
        "fail",
        "/dev/kvm is missing: guests can only run under `accel: tcg` (software emulation)",
        f"`modprobe {module}`; if it fails, enable virtualization in the firmware",
    )


def _iommu_units(root: HostRoot) -> list[str]:
    return root.listdir(sysfs.CLASS_IOMMU)


def interrupt_remapping(root: HostRoot) -> bool | None:
    """Whether interrupt remapping is in effect: None when nothing tells (the inventory's
    one reading, :func:`partitioner.inventory.pci.interrupt_remapping`, which the planner
    uses too).  Without ``/proc/interrupts``, an Intel unit's extended capability register
    (``intel-iommu/ecap`` bit 3, IR) says at least that the hardware can."""
    return inventory_interrupt_remapping(root)


def _ecap_ir(root: HostRoot) -> bool | None:
    found = None
    for unit in _iommu_units(root):
        ecap = root.read(f"{sysfs.CLASS_IOMMU}/{unit}/intel-iommu/ecap")
        if ecap is None:
            continue
        try:
            ir = bool(int(ecap, 16) & (1 << 3))
        except ValueError:
            continue
        found = ir if found is None else found and ir
    return found


def _iommu(root: HostRoot, host: Host, facts: HostFacts) -> list[CheckItem]:
    units = _iommu_units(root)
    on = bool(units) or host.has_iommu
    title = "IOMMU"
    if not on:
        args = " ".join(facts.cmdline or ())
        told = "intel_iommu=on" in args or "amd_iommu" in args
        why = (
            "the kernel was told to enable it, so the firmware does not describe one (no DMAR/IVRS table)"
            if told
            else "no IOMMU units in /sys/class/iommu and no IOMMU groups"
        )
        return [
            CheckItem(
                "iommu",
                title,
                "fail",
                f"no IOMMU is enabled: {why}",
                _iommu_arg(facts),
                reboot=True,
            ),
            CheckItem(
                "interrupt-remapping",
                "interrupt remapping",
                "fail",
                "no IOMMU, so no interrupt remapping: device assignment is unsafe (a device could raise any interrupt)",
                "enable the IOMMU (see above); interrupt remapping comes with it on every VT-d/AMD-Vi machine of the last decade",
                reboot=True,
            ),
        ]
    detail = f"enabled ({', '.join(units)})" if units else "enabled (IOMMU groups present)"
    items = [CheckItem("iommu", title, "pass", detail)]
    ir = interrupt_remapping(root)
    title = "interrupt remapping"
    unsafe = (root.read(sysfs.VFIO_UNSAFE_INTERRUPTS) or "N")[:1]
    if ir:
        items.append(
            CheckItem(
                "interrupt-remapping",
                title,
                "pass",
                "interrupts go through the IR irqchip (IR- in /proc/interrupts)",
            )
        )
    elif ir is None:
        hw = _ecap_ir(root)
        if hw:
            items.append(
                CheckItem(
                    "interrupt-remapping",
                    title,
                    _lacking(root, "warn"),
                    f"{sysfs.INTERRUPTS} cannot be read; the IOMMU's capability register says it can remap interrupts",
                )
            )
        else:
            items.append(
                CheckItem(
                    "interrupt-remapping",
                    title,
                    _lacking(root, "warn"),
                    "cannot tell: /proc/interrupts cannot be read",
                )
            )
    else:
        hw = _ecap_ir(root)
        fix = (
            "remove intremap=off / nointremap from the kernel command line"
            if hw
            or "intremap=off" in (facts.cmdline or ())
            or "nointremap" in (facts.cmdline or ())
            else "enable interrupt remapping (x2APIC / IR) in the firmware, or use a platform that has it"
        )
        items.append(
            CheckItem(
                "interrupt-remapping",
                title,
                "fail",
                "the IOMMU is on but no interrupt goes through interrupt remapping (no IR- irqchip in /proc/interrupts): "
                "device assignment is unsafe, and vfio refuses it",
                fix,
                reboot=True,
            )
        )
    if unsafe == "Y":
        items.append(
            CheckItem(
                "unsafe-interrupts",
                "vfio unsafe interrupts",
                "warn",
                "vfio_iommu_type1 allow_unsafe_interrupts=Y: devices are assigned without interrupt isolation",
                "remove allow_unsafe_interrupts=1 from /etc/modprobe.d once interrupt remapping works",
            )
        )
    return items


def _groups_acs(host: Host) -> CheckItem:
    title = "IOMMU groups and ACS"
    if not host.iommu_groups:
        return CheckItem(
            "iommu-groups",
            title,
            "fail",
            "no IOMMU groups: no device can be assigned",
            "enable the IOMMU",
        )
    shared: list[str] = []
    for g in sorted(host.iommu_groups.values(), key=lambda g: g.id):
        endpoints = [a for a in g.members if a in host.pci and not host.pci[a].is_bridge]
        slots = {(a.domain, a.bus, a.slot) for a in endpoints}
        if len(slots) > 1:
            shared.append(f"group {g.id} ({', '.join(str(a) for a in endpoints)})")
    n = len(host.iommu_groups)
    if shared:
        return CheckItem(
            "iommu-groups",
            title,
            "warn",
            f"{n} groups; devices of different slots share a group (no ACS isolation between them), "
            f"so they can only be assigned together: {'; '.join(shared)}",
            "move the cards to slots behind ACS-capable ports (root ports or switches with ACS), or assign a whole group",
        )
    return CheckItem(
        "iommu-groups", title, "pass", f"{n} groups, each holding one slot's functions"
    )


def _hugepage_sizes(host: Host, flags: set[str], have_cpuinfo: bool) -> CheckItem:
    title = "hugepage sizes"
    sizes = [page_size_name(s) for s in host.hugepage_sizes]
    if not sizes:
        return CheckItem(
            "hugepages",
            title,
            "fail",
            "the kernel offers no hugepages (/sys/kernel/mm/hugepages is empty)",
            "use a kernel built with CONFIG_HUGETLBFS",
        )
    if GiB not in host.hugepage_sizes:
        why = (
            "the CPU has no pdpe1gb flag"
            if have_cpuinfo and "pdpe1gb" not in flags
            else "the kernel offers none"
        )
        return CheckItem(
            "hugepages",
            title,
            "warn",
            f"{', '.join(sizes)} only: no 1 GiB pages ({why}); partitions with `hugepages: 1GiB` cannot run",
            "use `hugepages: 2MiB`, or a CPU with 1 GiB pages (pdpe1gb)",
        )
    return CheckItem("hugepages", title, "pass", ", ".join(sizes))


def _vfio(root: HostRoot, facts: HostFacts) -> CheckItem:
    title = "vfio-pci"
    if root.is_dir(sysfs.pci_driver("vfio-pci")):
        return CheckItem("vfio-pci", title, "pass", "the vfio-pci driver is loaded")
    release = facts.kernel_release
    if release:
        base = f"/lib/modules/{release}"
        listed = (
            (root.read(f"{base}/modules.builtin") or "")
            + "\n"
            + (root.read(f"{base}/modules.dep") or "")
        )
        if re.search(r"(^|/)vfio[-_]pci\.ko", listed, re.M):
            return CheckItem(
                "vfio-pci",
                title,
                "pass",
                "vfio-pci is available as a module (apply loads it)",
            )
        if root.is_dir(base):
            return CheckItem(
                "vfio-pci",
                title,
                "fail",
                f"kernel {release} has no vfio-pci module",
                "use a distribution kernel (Debian: linux-image-amd64) or one built with CONFIG_VFIO_PCI",
            )
    return CheckItem(
        "vfio-pci",
        title,
        # Not unknown in a tree: a snapshot copies the module list where the machine has one.
        "warn",
        "vfio-pci is not loaded and the kernel's module list cannot be read",
        "`modprobe vfio-pci`",
    )


def _cgroup(root: HostRoot) -> CheckItem:
    title = "cgroup v2 cpuset"
    mounts = root.read(sysfs.SELF_MOUNTINFO)
    if mounts is None and not root.live:
        return CheckItem(
            "cgroup-cpuset", title, "unknown", f"{sysfs.SELF_MOUNTINFO} cannot be read"
        )
    mounts = mounts or ""
    v2 = None
    v1_cpuset = False
    for line in mounts.splitlines():
        pre, _, post = line.partition(" - ")
        fields = pre.split()
        fstype = post.split()[0] if post else ""
        if len(fields) > 4 and fstype == "cgroup2" and v2 is None:
            v2 = fields[4]
        if fstype == "cgroup" and "cpuset" in post.split()[-1].split(","):
            v1_cpuset = True
    if v2 is not None:
        controllers = root.read(f"{v2.rstrip('/')}/cgroup.controllers")
        if controllers is None or "cpuset" in controllers.split():
            return CheckItem(
                "cgroup-cpuset",
                title,
                "pass",
                f"cgroup2 at {v2}" + (" with the cpuset controller" if controllers else ""),
            )
        return CheckItem(
            "cgroup-cpuset",
            title,
            "fail" if not v1_cpuset else "warn",
            f"cgroup2 at {v2} lacks the cpuset controller ({'held by a cgroup v1 hierarchy' if v1_cpuset else 'not offered'})",
            "boot with cgroup_no_v1=all (or systemd.unified_cgroup_hierarchy=1) so that cpuset is on cgroup v2",
            reboot=True,
        )
    if v1_cpuset:
        return CheckItem(
            "cgroup-cpuset",
            title,
            "warn",
            "cpuset is on cgroup v1 only",
            "boot with systemd.unified_cgroup_hierarchy=1 for cgroup v2",
            reboot=True,
        )
    return CheckItem(
        "cgroup-cpuset",
        title,
        "fail",
        "no cgroup filesystem is mounted",
        "mount cgroup2 on /sys/fs/cgroup (`mount -t cgroup2 none /sys/fs/cgroup`)",
    )


def init_system(root: HostRoot) -> str | None:
    comm = root.read(sysfs.proc(1, "comm"))
    if comm is None:
        return None
    if comm == "systemd" or root.is_dir(sysfs.SYSTEMD_RUNTIME):
        return "systemd"
    return comm


def _init(root: HostRoot) -> CheckItem:
    title = "init system"
    init = init_system(root)
    if init is None:
        return CheckItem(
            "init",
            title,
            _lacking(root, "warn"),
            f"{sysfs.proc(1, 'comm')} cannot be read: the init system is unknown",
        )
    if init == "systemd":
        return CheckItem(
            "init",
            title,
            "pass",
            "systemd: `partition host setup` installs partition-site.service to start the site at boot",
        )
    return CheckItem(
        "init",
        title,
        "pass",
        f"{init} (not systemd): have it run `partition host boot /etc/partition/site.yaml` at boot "
        "(`partition host setup` writes that file)",
    )


# -- the nested-KVM probe (live only) ----------------------------------------------------


def kvm_probe_item(returncode: int | None, output: str) -> CheckItem:
    """Classify what QEMU said when asked to create a paused ``-cpu host`` KVM guest."""
    title = "KVM runs -cpu host"
    if returncode == 0:
        return CheckItem("kvm-cpu-host", title, "pass", "QEMU created a KVM vCPU with -cpu host")
    msr = re.search(r"failed to set MSR (0x[0-9a-fA-F]+)", output)
    if msr:
        return CheckItem(
            "kvm-cpu-host",
            title,
            "warn",
            f"this /dev/kvm refuses -cpu host (QEMU: failed to set MSR {msr.group(1)}): a nested or "
            "restricted KVM that cannot run a stock guest kernel",
            "run partitions on bare metal, or use `accel: tcg` for tests and demos",
        )
    tail = " ".join(output.strip().splitlines()[-2:])[:300]
    return CheckItem(
        "kvm-cpu-host",
        title,
        "warn",
        f"QEMU could not create a -cpu host KVM guest (exit {returncode}): {tail}",
        "check `dmesg` for KVM errors and that the user may open /dev/kvm",
    )


def probe_kvm_cpu_host(qemu: str = "qemu-system-x86_64", timeout: float = 30.0) -> CheckItem:
    """Start QEMU paused with ``-accel kvm -cpu host`` and quit over QMP: a nested KVM that
    cannot set the host CPU's MSRs makes QEMU abort at the first vCPU reset, even paused."""
    from partitioner.run import CommandFailed, run

    argv = [
        qemu,
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-machine",
        "q35",
        "-m",
        "64",
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-qmp",
        "stdio",
    ]
    qmp = '{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n'
    try:
        cp = run(argv, check=False, timeout=timeout, input=qmp)
    except CommandFailed as e:
        return kvm_probe_item(e.returncode, e.output)
    return kvm_probe_item(cp.returncode, cp.stdout)


# -- a site's boot-time settings against the running kernel --------------------------


def check_site(
    root: HostRoot,
    host: Host,
    facts: HostFacts,
    settings: BootSettings,
    site: str,
) -> list[CheckItem]:
    """Whether the running kernel carries ``settings`` (compiled from the site by the same code
    as ``host setup``): the command line, and what the kernel reports it did with it."""
    fix = f"`partition host setup {site}`, then reboot"
    items: list[CheckItem] = []
    missing = reboot_needed(settings, facts)
    if facts.cmdline is None:
        items.append(
            CheckItem(
                "site-cmdline",
                "kernel arguments",
                _lacking(root, "warn"),
                f"{sysfs.CMDLINE} cannot be read",
            )
        )
    elif missing:
        items.append(
            CheckItem(
                "site-cmdline",
                "kernel arguments",
                "fail",
                f"the running kernel was booted without {' '.join(missing)}",
                fix,
                reboot=True,
            )
        )
    else:
        items.append(
            CheckItem("site-cmdline", "kernel arguments", "pass", " ".join(settings.kernel_args))
        )

    if settings.partition_cpus:
        want = settings.partition_cpus
        for key, path, what in (
            (
                "site-isolated-cpus",
                sysfs.CPU_ISOLATED,
                "isolated from the scheduler (isolcpus)",
            ),
            (
                "site-nohz-full",
                sysfs.CPU_NOHZ_FULL,
                "without the scheduler tick (nohz_full)",
            ),
        ):
            text = root.read(path)
            have = CpuSet.lenient(text)
            title = f"CPUs {what}"
            if text is None and not root.live:
                items.append(CheckItem(key, title, "unknown", f"{path} is not in the tree"))
            elif have is None:
                items.append(
                    CheckItem(
                        key,
                        title,
                        "fail" if key == "site-isolated-cpus" else "warn",
                        f"{path} cannot be read"
                        + (
                            " (a kernel built without CONFIG_NO_HZ_FULL)"
                            if key == "site-nohz-full"
                            else ""
                        ),
                        fix
                        if key == "site-isolated-cpus"
                        else "use a kernel built with CONFIG_NO_HZ_FULL",
                        reboot=True,
                    )
                )
            elif have == want:
                items.append(CheckItem(key, title, "pass", f"{want}, the partitions' CPUs"))
            else:
                extra = CpuSet(set(have) - set(want))
                lacking = CpuSet(set(want) - set(have))
                parts = []
                if lacking:
                    parts.append(f"the partitions' CPUs {lacking} are not")
                if extra:
                    parts.append(f"CPUs {extra} are, though no partition has them")
                items.append(
                    CheckItem(
                        key,
                        title,
                        "fail",
                        f"the kernel has {have or 'none'}, the site needs {want}: {'; '.join(parts)}",
                        fix,
                        reboot=True,
                    )
                )

    for size, nodes in sorted(settings.hugepages.items()):
        name = page_size_name(size)
        for node, pages in sorted(nodes.items()):
            have_n = root.read_int(f"{sysfs.hugepage_pool(size, node)}/nr_hugepages")
            title = f"{name} pool on node {node}"
            pool = sysfs.hugepage_pool(size, node)
            if (
                have_n is None
                and not root.live
                and (root.is_dir(pool) or not root.is_dir(sysfs.node(node, "hugepages")))
            ):
                # The pool is there but not its count, or the tree holds none of the node's
                # pools: it does not say.  A node listing other sizes only has none of this one.
                items.append(
                    CheckItem(
                        f"site-hugepages-{name}-node{node}",
                        title,
                        "unknown",
                        f"{pool}/nr_hugepages is not in the tree",
                    )
                )
            elif have_n is None:
                items.append(
                    CheckItem(
                        f"site-hugepages-{name}-node{node}",
                        title,
                        "fail",
                        f"the kernel offers no {name} pool on node {node}",
                        fix,
                        reboot=True,
                    )
                )
            elif have_n >= pages:
                items.append(
                    CheckItem(
                        f"site-hugepages-{name}-node{node}",
                        title,
                        "pass",
                        f"{have_n} pages, the site needs {pages}",
                    )
                )
            else:
                items.append(
                    CheckItem(
                        f"site-hugepages-{name}-node{node}",
                        title,
                        "fail",
                        f"{have_n} pages, the site needs {pages}: `apply` would have to raise the pool "
                        "at run time, which fragmented memory can refuse",
                        fix,
                        reboot=True,
                    )
                )

    for d in settings.devices:
        sysdev = sysfs.pci_device(str(d.address))
        driver = root.readlink_name(f"{sysdev}/driver")
        override = root.read(f"{sysdev}/driver_override")
        title = f"{d.address} ({d.partition})"
        key = f"site-device-{d.address}"
        if not root.exists(sysdev):
            items.append(CheckItem(key, title, "fail", f"{d.address} is not on this host"))
        elif driver == "vfio-pci" and override == "vfio-pci":
            items.append(
                CheckItem(key, title, "pass", "on vfio-pci, with driver_override vfio-pci")
            )
        elif driver == "vfio-pci" and override is None and not root.live:
            items.append(
                CheckItem(
                    key,
                    title,
                    "unknown",
                    "on vfio-pci; whether by driver_override (at boot) the tree does not say: "
                    f"{sysdev}/driver_override is not in it",
                )
            )
        elif driver == "vfio-pci":
            items.append(
                CheckItem(
                    key,
                    title,
                    "warn",
                    "on vfio-pci, but without driver_override: claimed at run time, not at boot",
                    fix,
                    reboot=True,
                )
            )
        else:
            items.append(
                CheckItem(
                    key,
                    title,
                    "fail",
                    f"{'bound to ' + driver if driver else 'bound to no driver'}: the early binding to vfio-pci "
                    "is not in effect",
                    fix,
                    reboot=True,
                )
            )
    items.extend(_sriov_items(root, settings, fix))
    return items


def _sriov_items(root: HostRoot, settings: BootSettings, fix: str) -> list[CheckItem]:
    """Each PF of ``host.sriov`` with its VF count, and each of the site's VFs on vfio-pci
    (by ``driver_override``, as the boot-time script binds it) with the MAC, VLAN and flags
    the site gives it (read through the PF with iproute2: the live host only)."""
    items: list[CheckItem] = []
    for pf in settings.sriov:
        key, title = f"site-sriov-{pf.address}", f"SR-IOV PF {pf.address}"
        sysdev = sysfs.pci_device(pf.address)
        count = root.read_int(sysfs.pci_device(pf.address, sysfs.SRIOV_NUMVFS))
        probe = root.read_int(sysfs.pci_device(pf.address, sysfs.SRIOV_DRIVERS_AUTOPROBE))
        driver = root.readlink_name(f"{sysdev}/driver")
        if not root.exists(sysdev):
            items.append(CheckItem(key, title, "fail", f"{pf.address} is not on this host"))
            continue
        if count is None:
            items.append(
                CheckItem(
                    key,
                    title,
                    _lacking(root, "fail"),
                    f"{sysfs.SRIOV_NUMVFS} cannot be read: not an SR-IOV physical function",
                )
            )
            continue
        if count == pf.vfs:
            probed = "" if probe is None else f", sriov_drivers_autoprobe {probe}"
            items.append(CheckItem(key, title, "pass", f"{count} VFs, as the site asks{probed}"))
        else:
            why = (
                "its driver has not bound it (the kernel makes VFs through the PF's driver, "
                "and the boot-time script runs when it binds)"
                if driver is None
                else f"bound to {driver}; the boot-time script {SRIOV_SCRIPT} did not make them"
            )
            items.append(
                CheckItem(
                    key,
                    title,
                    "fail",
                    f"{count} VFs, the site asks {pf.vfs}: {why}",
                    f"{fix} (or run {SRIOV_SCRIPT} {pf.address} now, while no VF of it is used)",
                    reboot=True,
                )
            )
        links: dict[int, VfLink] | None = None
        netdev = ""
        for v in pf.site_vfs:
            vkey = f"site-vf-{v.address}"
            vtitle = f"VF {v.index} of {pf.address} ({v.partition})"
            vdev = sysfs.pci_device(v.address)
            at = root.readlink_name(sysfs.pci_virtfn(pf.address, v.index))
            vdriver = root.readlink_name(f"{vdev}/driver")
            override = root.read(f"{vdev}/driver_override")
            if at != v.address:
                items.append(
                    CheckItem(
                        vkey,
                        vtitle,
                        "fail",
                        f"the PF has no VF {v.index}"
                        if at is None
                        else f"VF {v.index} is {at}, not {v.address} as planned",
                        fix,
                        reboot=True,
                    )
                )
                continue
            if vdriver == "vfio-pci" and override == "vfio-pci":
                items.append(
                    CheckItem(
                        vkey, vtitle, "pass", f"{v.address} on vfio-pci, with driver_override"
                    )
                )
            elif vdriver == "vfio-pci":
                items.append(
                    CheckItem(
                        vkey,
                        vtitle,
                        "warn" if root.live or override is not None else "unknown",
                        f"{v.address} on vfio-pci, without driver_override: claimed at run "
                        "time, not at boot",
                        fix,
                        reboot=True,
                    )
                )
            else:
                items.append(
                    CheckItem(
                        vkey,
                        vtitle,
                        "fail",
                        f"{v.address} is {'bound to ' + vdriver if vdriver else 'bound to no driver'}"
                        ": the boot-time binding to vfio-pci is not in effect",
                        fix,
                        reboot=True,
                    )
                )
            if v.settings is None:
                continue
            skey, stitle = (
                f"site-vf-settings-{v.address}",
                f"settings of VF {v.index} of {pf.address}",
            )
            if links is None:
                try:
                    found = vflink.links_of(root, pf.address)
                except VfLinkError as e:
                    items.append(CheckItem(skey, stitle, "fail", str(e), fix, reboot=True))
                    continue
                if found is None:
                    items.append(
                        CheckItem(
                            skey,
                            stitle,
                            "unknown",
                            "a VF's settings are read through its PF with iproute2, on the "
                            "live host only",
                        )
                    )
                    continue
                netdev, links = found
            got = links.get(v.index)
            if got is None:
                items.append(
                    CheckItem(skey, stitle, "fail", f"{netdev} lists no VF {v.index}", fix)
                )
                continue
            want = got.with_settings(v.settings)
            wrong = set_args(want, got)
            if not wrong:
                items.append(CheckItem(skey, stitle, "pass", want.describe()))
            else:
                items.append(
                    CheckItem(
                        skey,
                        stitle,
                        "fail",
                        f"{got.describe()}; the site sets {want.describe()}",
                        "; ".join(
                            " ".join(["ip link set dev", netdev, "vf", str(v.index), *a])
                            for a in wrong
                        )
                        + f", or {fix}",
                        reboot=True,
                    )
                )
    return items


def exit_code(items: Sequence[CheckItem]) -> int:
    """0 when nothing fails (warnings and unknowns allowed), 3 when an item fails: a precondition
    is missing (docs/cli-reference.md)."""
    return 3 if any(i.status == "fail" for i in items) else 0
