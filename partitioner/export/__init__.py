"""The plan as documents for managers that already run guests: libvirt and KubeVirt.

Both exports are pure functions of a :class:`~partitioner.planning.model.Plan` (and, for
KubeVirt, of the host's PCI inventory, to say which devices it could swap):
nothing here reads the host or starts anything.  They carry the same decisions
as ``partitioner.guest.argv``'s QEMU command line; what an engine cannot
express is said in each export's ``notes`` and in docs/cli.md.
"""

from partitioner.planning.model import DeviceAssignment


def network_vf(d: DeviceAssignment) -> bool:
    """A virtual function the exports hand over as a network interface (libvirt's
    ``<interface type='hostdev'>``, KubeVirt's ``sriov`` interface): one whose manifest entry
    gives it a MAC address or a VLAN, settings only a network PF has.  Any other VF (one
    with no settings, a storage VF) is a PCI device like the rest."""
    s = d.vf.settings if d.vf is not None else None
    return s is not None and (s.mac is not None or s.vlan is not None)
