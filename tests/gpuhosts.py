"""Host trees with GPUs, written by TreeBuilder from the layout of real cards.

- A data-centre GPU (NVIDIA H100 PCIe, ``10de:2331``): a 3D controller (class
  0302) with a 16 MiB 32-bit BAR0 (registers), a 64-bit prefetchable BAR1 (its
  memory: 128 GiB on the 80 GB card; ``bar1`` chooses) and a 32 MiB 64-bit
  prefetchable BAR3, one function alone in its slot and IOMMU group, behind a
  PCIe root port of its own.
- A display GPU (NVIDIA RTX 3090, ``10de:2204``): a VGA controller (class
  0300) with 16 MiB BAR0, a 32 GiB BAR1 (resizable BAR on), 32 MiB BAR3, an
  I/O BAR5, and its HDMI audio function (``10de:1aef``, class 0403) in the same
  slot and IOMMU group, with no reset of its own (no FLR; the kernel shows neither
  ``reset_method`` nor ``reset`` for it): VFIO resets it through the bus below the
  root port, which holds the GPU and its audio alone.
"""

from __future__ import annotations

from treebuilder import BAR_IO, BAR_MEM32, BAR_MEM64_PREF, GiB, MiB, TreeBuilder

H100 = ("10de", "2331")
RTX3090 = ("10de", "2204")
RTX3090_AUDIO = ("10de", "1aef")


def data_centre_gpu(
    t: TreeBuilder, bus: int, group: int, *, bar1: int = 128 * GiB, node: int = 0
) -> str:
    """An H100-like 3D controller at ``0000:BUS:00.0`` behind root port 0000:00:BUS.0."""
    port = f"0000:00:{bus:02x}.0"
    addr = f"0000:{bus:02x}:00.0"
    t.pci(port, class_code="060400", driver="pcieport", iommu_group=group + 100, numa_node=node)
    t.pci(
        addr,
        vendor=H100[0],
        device=H100[1],
        class_code="030200",
        driver="nvidia",
        iommu_group=group,
        numa_node=node,
        parent=port,
        bars={0: (16 * MiB, BAR_MEM32), 1: (bar1, BAR_MEM64_PREF), 3: (32 * MiB, BAR_MEM64_PREF)},
    )
    return addr


def display_gpu(t: TreeBuilder, bus: int, group: int, *, node: int = 0) -> str:
    """An RTX 3090-like VGA controller at ``0000:BUS:00.0`` with its audio at ``.1``, behind
    a root port of their own (``0000:00:1c.N``, N = BUS mod 8, as chipsets number theirs)."""
    port = f"0000:00:1c.{bus % 8}"
    addr = f"0000:{bus:02x}:00.0"
    t.pci(port, class_code="060400", driver="pcieport", iommu_group=group + 100, numa_node=node)
    t.pci(
        addr,
        vendor=RTX3090[0],
        device=RTX3090[1],
        class_code="030000",
        driver="nouveau",
        iommu_group=group,
        numa_node=node,
        parent=port,
        boot_vga=False,
        bars={
            0: (16 * MiB, BAR_MEM32),
            1: (32 * GiB, BAR_MEM64_PREF),
            3: (32 * MiB, BAR_MEM64_PREF),
            5: (128, BAR_IO),
        },
    )
    t.pci(
        f"0000:{bus:02x}:00.1",
        vendor=RTX3090_AUDIO[0],
        device=RTX3090_AUDIO[1],
        class_code="040300",
        driver="snd_hda_intel",
        iommu_group=group,
        numa_node=node,
        parent=port,
        reset_methods=None,
        bars={0: (16 * 1024, BAR_MEM32)},
    )
    return addr


def gpu_server(
    t: TreeBuilder, *, gpus: int = 2, bar1: int = 128 * GiB, phys_bits: int = 46
) -> list[str]:
    """One node, 8 cores x 2 threads, 64 GiB, KVM and an IOMMU, ``gpus`` data-centre GPUs."""
    t.cpus(count=16, packages=1, threads=2, nodes=1, memory_per_node=512 * GiB)
    t.node(0, memory_bytes=512 * GiB, free_bytes=500 * GiB, hugepages={GiB: (0, 0)})
    t.kvm()
    t.phys_bits(phys_bits)
    return [data_centre_gpu(t, 0x10 + i, 40 + i, bar1=bar1) for i in range(gpus)]
