"""The plan as documents for managers that already run guests: libvirt and KubeVirt.

Both exports are pure functions of a :class:`~partitioner.planning.model.Plan` (and, for
KubeVirt, of the host's PCI inventory, to say which devices it could swap):
nothing here reads the host or starts anything.  They carry the same decisions
as ``partitioner.guest.argv``'s QEMU command line; what an engine cannot
express is said in each export's ``notes`` and in docs/cli.md.
"""
