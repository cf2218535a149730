"""``scan(root) -> Host``: read the machine's CPUs, NUMA nodes, PCI functions and what the host runs on.

Everything is read through the :class:`HostRoot` it is given, so the same code
reads the live machine, a ``partition snapshot`` tree and hwloc's test corpus.
Nothing here writes.  Odd values never stop the scan: they degrade to "unknown"
and leave a sentence in ``Host.notes``; only a tree that is not a host at all,
or one damaged past reading (NUL bytes in kernel text, symlink loops where the
kernel has directories), raises :class:`HostReadError`.

One module per domain, each with one reason to change: ``cpus`` (CPUs, kinds,
the allowed set, cgroups), ``memory`` (NUMA nodes, meminfo, hugepage pools),
``pci`` (functions, IOMMU groups, names), ``usage`` (what the host runs on:
network, block devices, swap, mounts); ``reader`` is what they read with.

Where the kernel's facts contradict each other, the decision follows what
hwloc (the reference reader of these files) does, so that its test corpus is
an oracle for this package.
"""

from __future__ import annotations

from partitioner.errors import HostReadError
from partitioner.gcpause import collector_paused
from partitioner.inventory.cpus import phys_bits, scan_cpus
from partitioner.inventory.memory import scan_hugepage_sizes, scan_nodes
from partitioner.inventory.model import Host
from partitioner.inventory.pci import (
    class_label,
    interrupt_remapping,
    pci_is_bridge,
    scan_iommu_groups,
    scan_pci,
)
from partitioner.inventory.reader import Reader
from partitioner.inventory.usage import scan_in_use, scan_net, with_netdevs
from partitioner.kernel import sysfs
from partitioner.kernel.root import HostRoot

__all__ = ["class_label", "pci_is_bridge", "scan"]


@collector_paused()
def scan(root: HostRoot) -> Host:
    """Read the host under ``root`` into a frozen :class:`Host`."""
    if not root.is_dir(sysfs.CPU):
        where = root.path(sysfs.CPU)
        if root.live:
            raise HostReadError(
                f"{where} is missing: is /sys mounted? (mount -t sysfs sysfs /sys)",
                path=str(where),
            )
        raise HostReadError(
            f"{root.root} does not look like a host tree: {where} is missing; "
            f"make one with `partition snapshot {root.root}` on the machine to describe",
            path=str(where),
        )
    r = Reader(root)
    cpus = scan_cpus(r)
    nodes = scan_nodes(r, cpus)
    groups, pci = scan_iommu_groups(r, scan_pci(r))
    netdevs, net_pci = scan_net(r)
    if net_pci:
        pci = with_netdevs(pci, net_pci)
    in_use = scan_in_use(r, pci, netdevs)
    return Host(
        cpus=cpus,
        nodes=nodes,
        pci=pci,
        iommu_groups=groups,
        in_use=in_use,
        netdevs=netdevs,
        has_kvm=root.exists(sysfs.DEV_KVM),
        phys_bits=phys_bits(root),
        has_iommu=bool(groups),
        interrupt_remapping=interrupt_remapping(root),
        hugepage_sizes=scan_hugepage_sizes(r, nodes),
        page_size=4096,
        vfio_pci_loaded=root.is_dir(sysfs.pci_driver("vfio-pci")),
        notes=tuple(r.notes),
    )
