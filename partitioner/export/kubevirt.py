"""One KubeVirt ``VirtualMachine`` per partition, and the ``permittedHostDevices`` it needs.

KubeVirt keeps what it has words for: dedicated CPUs with the emulator thread
isolated, the guest topology, guest NUMA cells that follow the host CPUs it
was given (``guestMappingPassthrough``), hugepages of the plan's size, locked
resources, the host (``nodeSelector``), the devices' models, no balloon.  It
cannot take the plan's CPU numbers (the kubelet's CPU manager picks them) nor
PCI addresses: its device plugin hands out any function of a vendor:device
model it has been permitted.  ``substitutions`` says, per partition, which of
its functions KubeVirt could swap for another of the same model, and with
whom; every other thing the export drops is in ``notes``.

What the guest boots from has to reach the VM, or KubeVirt starts a VM that
boots nothing.  A disk becomes a volume: a ``persistentVolumeClaim`` the user
names for its path (:class:`Sources`), else a raw image file as a ``hostDisk``;
a block device or a qcow2 image without a claim cannot be carried (``hostDisk``
takes a raw file).  Direct kernel boot becomes ``firmware.kernelBoot`` from a
container image the user names, holding the kernel and initrd at the paths the
manifest gives.  A partition with something it cannot carry, or with nothing
to boot from, is refused (:class:`~partitioner.errors.ExportError`), each
problem saying what to add.

A virtual function with a MAC address or a VLAN in the manifest (``export.network_vf``)
is a network: an ``sriov`` interface of the VM on a Multus network named
``PARTITION-vfK`` (K counts the partition's network VFs from 0), which the cluster
provides as a NetworkAttachmentDefinition of the SR-IOV CNI on the resource
``partition.local/sriov_DDDD_BB_SS_F``, the SR-IOV device plugin's pool of that PF's
VFs (:func:`sriov_resource_name`; with sriov-network-operator: a
SriovNetworkNodePolicy with that resourceName, ``resourcePrefix`` partition.local, the PF
as ``nicSelector.rootDevices`` and ``deviceType: vfio-pci``).  The VM carries the MAC
address; the VLAN, its priority, spoof checking, trust, link state and rates belong
to that network (a SriovNetwork's ``vlan``, ``vlanQoS``, ``spoofChk``, ``trust``,
``linkState``, ``minTxRate``, ``maxTxRate``), and the device plugin picks which VF of
the pool the VM gets: ``notes`` says both.  Any other VF is a host device by model.

A dynamic partition (rule 11) keeps what KubeVirt's hot-plug can say.  KubeVirt plugs
vCPUs by whole sockets, so one whose vCPU count may change gets sockets of one core
(``sockets`` = cpus / threads, ``maxSockets`` = max_cpus / threads) instead of the plan's
topology.  Dynamic memory is ``memory.guest`` = memory and ``maxGuest`` = max_memory,
without ``guestMappingPassthrough`` (KubeVirt refuses it with memory hot-plug), when
both are whole hot-plug blocks (2Mi, 1Gi with 1Gi pages).  ``notes`` says what is lost:
the guest topology and slot nodes, ``min_cpus`` and ``min_memory`` as floors, one
virtio-mem device per node, spare PCIe slots and devices attached live, and that
KubeVirt resizes a VM only by a live migration, which host devices forbid.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from partitioner.errors import ExportError
from partitioner.export import network_vf
from partitioner.guest.argv import disk_format
from partitioner.manifest.model import Disk
from partitioner.pci import PciAddress
from partitioner.planning.model import DeviceAssignment, Placement, Plan
from partitioner.units import GiB, MiB, format_size

API_VERSION = "kubevirt.io/v1"
# The extended-resource domain under which the exported device models are advertised.
RESOURCE_DOMAIN = "partition.local"
LABEL = "partition.local/partition"


@dataclass(frozen=True)
class KubeVirtExport:
    documents: dict[str, str]  # file name -> YAML text
    # partition -> one sentence per function KubeVirt may swap: what it could get instead
    substitutions: dict[str, list[str]]
    notes: dict[str, list[str]]  # partition -> what the export could not carry

    def to_json(self) -> dict[str, Any]:
        return {"substitutions": self.substitutions, "notes": self.notes}


@dataclass(frozen=True)
class Sources:
    """What the user names for the export that the manifest cannot say (``partition export``'s
    ``--pvc`` and ``--kernel-image``)."""

    claims: Mapping[str, str] = field(default_factory=dict)  # disk path -> PVC name
    kernel_images: Mapping[str, str] = field(default_factory=dict)  # partition -> image


def resource_name(vendor_device: str) -> str:
    """``10de:1eb8`` -> ``partition.local/pci-10de-1eb8``: the name a VM asks its device by."""
    return f"{RESOURCE_DOMAIN}/pci-{vendor_device.replace(':', '-')}"


def sriov_resource_name(pf: PciAddress) -> str:
    """``0000:82:00.0`` -> ``partition.local/sriov_0000_82_00_0``: the SR-IOV device plugin's
    resource of a PF's VFs (letters, digits and '_' only, as sriov-network-operator's
    resourceName must be)."""
    return f"{RESOURCE_DOMAIN}/sriov_{str(pf).replace(':', '_').replace('.', '_')}"


def sriov_network_name(partition: str, k: int) -> str:
    """The Multus network of the partition's ``k``-th network VF (from 0)."""
    return f"{partition}-vf{k}"


def _network_vfs(p: Placement) -> list[DeviceAssignment]:
    return [d for d in p.devices if network_vf(d)]


def export(
    plan: Plan,
    node: str,
    models: Mapping[PciAddress, str] | None = None,
    sources: Sources | None = None,
) -> KubeVirtExport:
    """The documents of ``plan`` for the Kubernetes node ``node``.

    ``models`` maps every PCI function of the host to its vendor:device (the
    inventory); functions of a model that no partition holds but that KubeVirt
    would also offer are counted among the possible substitutes.  ``sources``
    names the claims and kernel images; raises ExportError with every partition's
    problems when a VM would have nothing to boot or would miss a disk.
    """
    sources = sources or Sources()
    problems = [m for _, p in sorted(plan.placements.items()) for m in boot_problems(p, sources)]
    if problems:
        raise ExportError(problems)
    docs: dict[str, str] = {}
    subs: dict[str, list[str]] = {}
    notes: dict[str, list[str]] = {}
    holder = {d.address: name for name, p in plan.placements.items() for d in p.devices}
    everyone = dict(models or {})
    for p in plan.placements.values():
        for d in p.devices:
            everyone.setdefault(d.address, d.vendor_device)
    for d in (d for p in plan.placements.values() for d in _network_vfs(p)):
        everyone.pop(d.address, None)  # a network, not a host device of its model
    for name, p in sorted(plan.placements.items()):
        subs[name] = _substitutions(p, everyone, holder)
        notes[name] = _notes(p, plan, sources)
        vm = virtual_machine(p, plan, node, subs[name], sources)
        docs[f"{name}.yaml"] = yaml.safe_dump(vm, sort_keys=False)
    kv = kubevirt_config(plan)
    if kv is not None:
        docs["kubevirt-permitted-host-devices.yaml"] = yaml.safe_dump(kv, sort_keys=False)
    return KubeVirtExport(docs, subs, notes)


def boot_problems(p: Placement, sources: Sources) -> list[str]:
    """Why the VM of ``p`` would not start under KubeVirt, each with what to add."""
    out = []
    for disk in p.spec.disks:
        if _volume(disk, sources) is None:
            out.append(f"partition {p.name}: disk {disk.path}: {_cannot_carry(disk)}")
    boot = p.spec.boot
    if boot is not None and p.name not in sources.kernel_images:
        held = " and ".join(f for f in (boot.kernel, boot.initrd) if f)
        out.append(
            f"partition {p.name} boots the kernel {boot.kernel} directly: KubeVirt boots a "
            f"kernel only from a container image; add --kernel-image {p.name}=IMAGE, an image "
            f"holding {held} at {'those paths' if boot.initrd else 'that path'}"
        )
    if boot is None and not p.spec.disks:
        out.append(
            f"partition {p.name} has nothing to boot from (no boot: and no disks:): add a disk "
            "to the manifest (an image file, or a block device with --pvc PATH=CLAIM), or "
            f"boot: with a kernel and --kernel-image {p.name}=IMAGE"
        )
    return out


def _cannot_carry(disk: Disk) -> str:
    if disk.path.startswith("/dev/"):
        return (
            "a block device reaches a KubeVirt VM only through a PersistentVolumeClaim (a "
            f"local PersistentVolume with volumeMode: Block); add --pvc {disk.path}=CLAIM"
        )
    return (
        "a qcow2 image, and KubeVirt's hostDisk reads a file as raw: import it into a "
        f"PersistentVolumeClaim (CDI converts qcow2) and add --pvc {disk.path}=CLAIM, or "
        "convert it to a raw image (qemu-img convert -O raw) and name that in the manifest"
    )


def _volume(disk: Disk, sources: Sources) -> dict[str, Any] | None:
    """The volume source of ``disk`` (without its name), or None if it cannot be carried."""
    claim = sources.claims.get(disk.path)
    if claim is not None:
        return {"persistentVolumeClaim": {"claimName": claim, "readOnly": disk.readonly}}
    if disk.path.startswith("/dev/") or disk_format(disk.path) != "raw":
        return None
    return {"hostDisk": {"path": disk.path, "type": "Disk"}}


def virtual_machine(
    p: Placement, plan: Plan, node: str, subs: Iterable[str] = (), sources: Sources | None = None
) -> dict[str, Any]:
    """The ``VirtualMachine`` object of partition ``p`` as a dict (apiVersion kubevirt.io/v1)."""
    annotations = {"partition.local/planned-cpus": str(p.cpuset)}
    if p.devices:
        annotations["partition.local/planned-devices"] = " ".join(str(d.address) for d in p.devices)
    subs = list(subs)
    if subs:
        annotations["partition.local/device-substitution"] = "; ".join(subs)
    unit = _socket_threads(p)
    if unit is None:
        cpu: dict[str, Any] = {"sockets": p.sockets, "cores": p.cores, "threads": p.threads}
    else:
        # KubeVirt plugs whole sockets: one core each, so a core at a time, as apply does.
        cpu = {
            "sockets": len(p.cpus) // unit,
            "cores": 1,
            "threads": unit,
            "maxSockets": p.max_vcpus // unit,
        }
    cpu |= {"dedicatedCpuPlacement": True, "isolateEmulatorThread": True}
    max_guest = _max_guest(p)
    if max_guest is None:
        # KubeVirt refuses guestMappingPassthrough with memory hot-plug (maxGuest).
        cpu["numa"] = {"guestMappingPassthrough": {}}
    if plan.accel == "kvm":
        cpu["model"] = "host-passthrough"
    memory: dict[str, Any] = {"guest": _quantity(p.memory_bytes)}
    if max_guest is not None:
        memory["maxGuest"] = _quantity(max_guest)
    if p.hugepage_bytes is not None:
        memory["hugepages"] = {"pageSize": _quantity(p.hugepage_bytes)}
    devices: dict[str, Any] = {
        "autoattachMemBalloon": False,
        "autoattachGraphicsDevice": False,
        "autoattachSerialConsole": True,
        "logSerialConsole": True,
    }
    sources = sources or Sources()
    volumes: list[dict[str, Any]] = []
    for i, disk in enumerate(p.spec.disks):
        source = _volume(disk, sources)
        if source is None:
            continue  # export() refuses such a partition (boot_problems)
        entry: dict[str, Any] = {
            "name": f"disk{i}",
            "disk": {"bus": "virtio", "readonly": disk.readonly},
            "dedicatedIOThread": True,
        }
        if i == 0 and p.spec.boot is None:
            entry["bootOrder"] = 1
        devices.setdefault("disks", []).append(entry)
        volumes.append({"name": f"disk{i}", **source})
    if any(not network_vf(d) for d in p.devices):
        devices["hostDevices"] = [
            {"name": f"hostdev{i}", "deviceName": resource_name(d.vendor_device)}
            for i, d in enumerate(d for d in p.devices if not network_vf(d))
        ]
    networks: list[dict[str, Any]] = []
    for k, d in enumerate(_network_vfs(p)):
        name = f"vf{k}"
        iface: dict[str, Any] = {"name": name, "sriov": {}}
        if d.vf is not None and d.vf.settings is not None and d.vf.settings.mac is not None:
            iface["macAddress"] = d.vf.settings.mac
        devices.setdefault("interfaces", []).append(iface)
        networks.append({"name": name, "multus": {"networkName": sriov_network_name(p.name, k)}})
    firmware: dict[str, Any] = {
        "bootloader": {"efi": {"secureBoot": False}}
        if p.spec.firmware == "uefi"
        else {"bios": {"useSerial": True}}
    }
    boot = p.spec.boot
    image = sources.kernel_images.get(p.name)
    if boot is not None and image is not None:
        container: dict[str, Any] = {"image": image, "kernelPath": boot.kernel}
        if boot.initrd:
            container["initrdPath"] = boot.initrd
        firmware["kernelBoot"] = {"container": container}
        if boot.cmdline:
            firmware["kernelBoot"]["kernelArgs"] = boot.cmdline
    domain: dict[str, Any] = {
        "cpu": cpu,
        "memory": memory,
        # Requests equal to limits: the Guaranteed QoS class that dedicated CPUs require.
        "resources": {
            "requests": {"memory": _quantity(p.memory_bytes)},
            "limits": {"memory": _quantity(p.memory_bytes)},
        },
        "firmware": firmware,
        "features": {"acpi": {"enabled": True}},
        "devices": devices,
    }
    template_spec: dict[str, Any] = {
        "domain": domain,
        # The plan is made for this host's CPUs, memory and devices: it runs here only.
        "nodeSelector": {"kubernetes.io/hostname": node},
    }
    if volumes:
        template_spec["volumes"] = volumes
    if networks:
        template_spec["networks"] = networks
    labels = {LABEL: p.name}
    return {
        "apiVersion": API_VERSION,
        "kind": "VirtualMachine",
        "metadata": {"name": p.name, "labels": labels, "annotations": annotations},
        "spec": {
            "runStrategy": _run_strategy(p),
            "template": {"metadata": {"labels": dict(labels)}, "spec": template_spec},
        },
    }


def _socket_threads(p: Placement) -> int | None:
    """For a partition whose vCPU count changes live (rule 11): the vCPUs of one KubeVirt
    socket (its guest threads per core, 1 where they do not divide the counts); None for a
    static one, which keeps the plan's topology."""
    if p.max_vcpus == len(p.cpus) and p.spec.cpus_min >= len(p.cpus):
        return None
    t = p.threads
    return t if len(p.cpus) % t == 0 and p.max_vcpus % t == 0 else 1


def _hotplug_block(p: Placement) -> int:
    """The alignment KubeVirt asks of guest and maxGuest: 1Gi with 1Gi pages, else 2Mi."""
    return GiB if p.hugepage_bytes == GiB else 2 * MiB


def _max_guest(p: Placement) -> int | None:
    """``maxGuest``: the ceiling of a partition with dynamic memory, when KubeVirt can take
    it (both sizes in its hot-plug blocks); else None."""
    if not p.dynamic_memory:
        return None
    block = _hotplug_block(p)
    if p.memory_bytes % block or p.max_memory_bytes % block:
        return None
    return p.max_memory_bytes


def _run_strategy(p: Placement) -> str:
    """autostart and on_crash in KubeVirt's words: started with the site or by hand,
    restarted after a failure (RerunOnFailure) or left stopped (Once)."""
    if not p.spec.autostart:
        return "Manual"
    return "RerunOnFailure" if p.spec.on_crash == "restart" else "Once"


def kubevirt_config(plan: Plan) -> dict[str, Any] | None:
    """The ``KubeVirt`` resource's ``permittedHostDevices`` for every model the plan assigns,
    to merge into the cluster's own KubeVirt object (None without devices)."""
    models = sorted(
        {d.vendor_device for p in plan.placements.values() for d in p.devices if not network_vf(d)}
    )
    if not models:
        return None
    return {
        "apiVersion": API_VERSION,
        "kind": "KubeVirt",
        "metadata": {"name": "kubevirt", "namespace": "kubevirt"},
        "spec": {
            "configuration": {
                "permittedHostDevices": {
                    "pciHostDevices": [
                        {"pciVendorSelector": m.upper(), "resourceName": resource_name(m)}
                        for m in models
                    ]
                }
            }
        },
    }


def _substitutions(
    p: Placement, models: Mapping[PciAddress, str], holder: Mapping[PciAddress, str]
) -> list[str]:
    # Functions this partition holds itself are no loss: it gets them all, in some order.
    own = {d.address for d in p.devices}
    out = []
    for d in p.devices:
        if network_vf(d):
            continue  # the device plugin's choice within the PF's pool: said in the notes
        others = sorted(a for a, m in models.items() if m == d.vendor_device and a not in own)
        if not others:
            continue
        who = ", ".join(
            f"{a} ({'partition ' + holder[a] if a in holder else 'not in the plan'})"
            for a in others
        )
        out.append(f"{d.address} ({d.vendor_device}) could be swapped for {who}")
    return out


def _notes(p: Placement, plan: Plan, sources: Sources) -> list[str]:
    notes = [
        f"host CPUs {p.cpuset}: the kubelet's static CPU manager picks the CPUs; "
        "the export keeps their count, topology and dedication, not their numbers",
        f"memory per host node {dict(p.memory_per_node)}: KubeVirt follows the CPUs it was "
        "given (guestMappingPassthrough), not a node chosen ahead"
        if _max_guest(p) is None
        else f"memory per host node {dict(p.memory_per_node)}: KubeVirt places it where the "
        "pod lands, and the guest sees one NUMA node: KubeVirt refuses guestMappingPassthrough "
        "with memory hot-plug (maxGuest)",
    ]
    notes += _live_notes(p)
    if plan.host_cpus:
        notes.append(
            f"host reserve {plan.host_cpus}: the emulator thread gets a dedicated CPU of the "
            "pod (isolateEmulatorThread), not the host's reserve"
        )
    if plan.accel != "kvm":
        notes.append("accel tcg: KubeVirt runs only under KVM (or useEmulation cluster-wide)")
    if any(not network_vf(d) for d in p.devices):
        notes.append(
            "devices are asked by model, not by address; functions of one slot are "
            "separate devices, not one multifunction device"
        )
    notes += [_vf_note(p, k, d) for k, d in enumerate(_network_vfs(p))]
    if p.spec.boot is not None:
        notes.append(
            f"direct kernel boot from {p.spec.boot.kernel}: the kernel comes from the container "
            "image given with --kernel-image (firmware.kernelBoot), not from this host's file"
        )
    if any("hostDisk" in (_volume(d, sources) or {}) for d in p.spec.disks):
        notes.append("image files are hostDisk volumes: the HostDisk feature gate must be on")
    if p.spec.order:
        notes.append(f"order {p.spec.order}: KubeVirt starts VMs in no given order")
    return notes


def _live_notes(p: Placement) -> list[str]:
    """What KubeVirt cannot carry of a partition changed while it runs (rule 11)."""
    out = []
    n, slots, floor = len(p.cpus), p.max_vcpus, p.spec.cpus_min
    unit = _socket_threads(p)
    if unit is not None:
        lost = "" if unit == p.threads else f", and {p.threads} threads per core become 1"
        out.append(
            f"vCPUs {n} of {slots} slots (min_cpus {floor}): KubeVirt hot-plugs whole sockets, "
            f"so the VM has {n // unit} of at most {slots // unit} sockets (maxSockets) of one "
            f"core of {unit} thread{'s' if unit > 1 else ''}, not the plan's {p.sockets} "
            f"socket{'s' if p.sockets > 1 else ''} of {p.cores} cores x {p.threads} threads with "
            f"each slot on its host node{lost}; min_cpus {floor} is no floor there"
        )
    if p.dynamic_memory:
        block = _hotplug_block(p)
        if _max_guest(p) is None:
            out.append(
                f"memory {format_size(p.memory_bytes)} or max_memory "
                f"{format_size(p.max_memory_bytes)} is not a multiple of {format_size(block)}, "
                "which KubeVirt asks for memory hot-plug: maxGuest is left out, and the VM's "
                "memory is fixed there"
            )
        else:
            out.append(
                f"memory {format_size(p.memory_bytes)} (min_memory "
                f"{format_size(p.fixed_memory_bytes)}, max_memory "
                f"{format_size(p.max_memory_bytes)}): KubeVirt boots with all of guest fixed and "
                "plugs the rest up to maxGuest through one virtio-mem device on guest node 0, "
                "not one per host node over a fixed min_memory: there the floor is what the VM "
                "booted with, not min_memory"
            )
            if p.memory_bytes < GiB:
                out.append(
                    "KubeVirt's user guide asks at least 1Gi of guest memory for memory hot-plug"
                )
    if unit is not None or p.dynamic_memory:
        how = (
            "by a live migration (vmRolloutStrategy: LiveUpdate, workloadUpdateMethods: "
            "LiveMigrate)"
        )
        if p.devices:
            out.append(
                f"KubeVirt changes a running VM's CPUs and memory only {how}, which a VM with "
                "host devices cannot make: there, this partition changes size only by a restart"
            )
        else:
            out.append(f"KubeVirt changes a running VM's CPUs and memory only {how}")
    if p.hotplug_slots:
        out.append(
            f"hotplug_slots {p.hotplug_slots}: a VirtualMachine names no spare PCIe root ports, "
            "and KubeVirt attaches no host device to a running VM: a device added to this "
            "partition needs the VM restarted there"
        )
    return out


def _vf_note(p: Placement, k: int, d: DeviceAssignment) -> str:
    """What the VM of ``p`` cannot carry of its ``k``-th network VF, and what the cluster needs."""
    assert d.vf is not None and d.vf.settings is not None
    s = d.vf.settings
    held = [
        f"{key} {value}"
        for key, value, default in (
            ("vlan", s.vlan, None),
            ("qos", s.qos, None),
            ("spoofchk", "on" if s.spoofchk else "off", None),
            ("trust", "on" if s.trust else "off", None),
            ("link_state", s.link_state, None),
            ("min_tx_rate", s.min_tx_rate, None),
            ("max_tx_rate", s.max_tx_rate, None),
        )
        if value != default
    ]
    network = sriov_network_name(p.name, k)
    return (
        f"{d.address} (VF {d.vf.index} of {d.vf.pf}) is the sriov interface vf{k} on network "
        f"{network}, which the cluster must provide: a NetworkAttachmentDefinition of the "
        f"SR-IOV CNI on resource {sriov_resource_name(d.vf.pf)} (the PF's VFs on vfio-pci); "
        f"{', '.join(held)} belong to that network (a SriovNetwork's vlan, vlanQoS, spoofChk, "
        "trust, linkState, minTxRate, maxTxRate), not to the VM; the device plugin picks "
        f"which VF of the PF the VM gets, not VF {d.vf.index}"
    )


def _quantity(n: int) -> str:
    """A Kubernetes quantity in binary units: 4Gi, 2Mi, or bytes."""
    for unit, suffix in ((GiB, "Gi"), (MiB, "Mi"), (1024, "Ki")):
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)
