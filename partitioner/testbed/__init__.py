"""The emulated VT-d server: a QEMU/TCG machine with an Intel IOMMU, NUMA nodes and a PCIe tree.

Behaviour only a kernel can confirm (IOMMU groups, vfio-pci, hugepages per
node) is tested in there; see ``server.py`` for how a command gets in and
its output, exit status and files get out.
"""

from partitioner.testbed.server import (
    TestbedBootFailure,
    TestbedServer,
    TestbedTimeout,
    run_in_testbed,
    snapshot_testbed,
)
from partitioner.testbed.topology import (
    Topology,
    TopologyError,
    expected_functions,
    load_topology,
    preset_names,
    qemu_args,
)

__all__ = [
    "TestbedBootFailure",
    "TestbedServer",
    "TestbedTimeout",
    "Topology",
    "TopologyError",
    "expected_functions",
    "load_topology",
    "preset_names",
    "qemu_args",
    "run_in_testbed",
    "snapshot_testbed",
]
