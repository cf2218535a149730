"""The 64-bit PCI window chosen for one, two and eight 256 GiB-BAR GPUs, and the address bits it needs.

Builds host trees with ``tests/gpuhosts.py`` (data-centre GPUs: 16 MiB BAR0,
256 GiB 64-bit prefetchable BAR1, 32 MiB BAR3, each behind its own root port),
scans them with the real inventory, plans a partition that takes all the GPUs
with 64 GiB of RAM under ``firmware: uefi`` and ``firmware: bios``, and prints the
window ``pci-hole64-size`` / ``X-PciMmio64Mb`` the partition gets, where OVMF and
SeaBIOS put it, and the physical address bits the host CPU needs.  No timing:
the figures are exact.

    .venv/bin/python bench/gpu_window.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

from gpuhosts import gpu_server  # noqa: E402
from treebuilder import GiB, TreeBuilder  # noqa: E402

from partitioner.inventory import scan  # noqa: E402
from partitioner.kernel.root import HostRoot  # noqa: E402
from partitioner.manifest.loader import loads  # noqa: E402
from partitioner.planning.mmio import bits_for, placement_layout  # noqa: E402
from partitioner.planning.planner import plan  # noqa: E402
from partitioner.units import human_size  # noqa: E402

SITE = """\
version: 1
host: {{reserve: {{cpus: 2, memory: 8GiB}}, isolation: pinned}}
partitions:
  ml: {{cpus: 4, memory: 64GiB, hugepages: none, firmware: {fw},
       devices: [{{id: "10de:2331", count: {n}}}]}}
"""


def main() -> None:
    print(
        f"{'GPUs':>4} {'BARs':>10} {'window':>8} {'OVMF span':>30} {'bits':>4} "
        f"{'SeaBIOS span':>30} {'bits':>4}"
    )
    for n in (1, 2, 8):
        with tempfile.TemporaryDirectory() as d:
            t = TreeBuilder(Path(d) / "host")
            gpu_server(t, gpus=n, bar1=256 * GiB, phys_bits=52)
            host = scan(HostRoot(t.build()))
            result = plan(loads(SITE.format(fw="uefi", n=n), file="site.yaml"), host)
            p = result.placements["ml"]
            lay = placement_layout(p, host)
            assert p.pci_hole64_bytes == lay.window
            ub, ue = lay.uefi_span()
            bb, be = lay.bios_span()
            print(
                f"{n:>4} {human_size(lay.bar_bytes):>10} {human_size(lay.window):>8} "
                f"{ub:#15x}-{ue:#14x} {bits_for(ue):>4} {bb:#15x}-{be:#14x} {bits_for(be):>4}"
            )


if __name__ == "__main__":
    main()
