"""A PCI function's BARs, from sysfs ``resource``: a pure parser and one read through HostRoot.

The kernel writes one line per resource, ``start end flags`` in hex
(``drivers/pci/pci-sysfs.c``, ``resource_show``): lines 0 to 5 are the BARs, line
6 the expansion ROM, the rest (SR-IOV BARs, bridge windows) are not the
function's own BARs and are ignored.  A 64-bit BAR takes two BAR registers: its
line is followed by an empty one.  An empty slot is all zeros.  A BAR the
kernel could not place still has its size (``end - start + 1`` with ``start``
0), which is what a guest's window must hold.
"""

from __future__ import annotations

from dataclasses import dataclass

from partitioner.kernel.root import HostRoot

# include/linux/ioport.h
IORESOURCE_IO = 0x00000100
IORESOURCE_MEM = 0x00000200
IORESOURCE_PREFETCH = 0x00002000
IORESOURCE_MEM_64 = 0x00100000

_BAR_LINES = 6  # PCI_STD_NUM_BARS


@dataclass(frozen=True)
class Bar:
    index: int  # BAR register number, 0-5
    size: int  # bytes
    flags: int  # the kernel's IORESOURCE_* flags

    @property
    def is_io(self) -> bool:
        return bool(self.flags & IORESOURCE_IO)

    @property
    def is_mem(self) -> bool:
        return bool(self.flags & IORESOURCE_MEM)

    @property
    def is_64bit(self) -> bool:
        return self.is_mem and bool(self.flags & IORESOURCE_MEM_64)

    @property
    def prefetchable(self) -> bool:
        return self.is_mem and bool(self.flags & IORESOURCE_PREFETCH)

    @property
    def high(self) -> bool:
        """A BAR firmware may place above 4 GiB: 64-bit and prefetchable.  Behind a PCIe
        port only the prefetchable window is 64-bit, so a non-prefetchable BAR stays low."""
        return self.is_64bit and self.prefetchable

    @property
    def kind(self) -> str:
        if self.is_io:
            return "io"
        bits = "64" if self.is_64bit else "32"
        return f"mem{bits}" + (",prefetchable" if self.prefetchable else "")

    def to_json(self) -> dict[str, object]:
        return {
            "index": self.index,
            "size": self.size,
            "kind": "io" if self.is_io else "mem",
            "bits": 64 if self.is_64bit else 32,
            "prefetchable": self.prefetchable,
        }


def parse_resource(text: str) -> tuple[Bar, ...]:
    """The BARs of one ``resource`` file's text; lines that do not parse are skipped."""
    bars: list[Bar] = []
    for index, line in enumerate(text.splitlines()[:_BAR_LINES]):
        parts = line.split()
        if len(parts) != 3:
            continue
        try:
            start, end, flags = (int(p, 16) for p in parts)
        except ValueError:
            continue
        if flags & (IORESOURCE_IO | IORESOURCE_MEM) == 0 or end < start or end == 0:
            continue  # an empty slot, or the upper half of a 64-bit BAR
        bars.append(Bar(index=index, size=end - start + 1, flags=flags))
    return tuple(bars)


def read_bars(root: HostRoot, device_dir: str) -> tuple[Bar, ...]:
    """The BARs of the function whose sysfs directory is ``device_dir`` (a kernel path)."""
    text = root.read(f"{device_dir}/resource")
    return parse_resource(text) if text else ()


def high_bytes(bars: tuple[Bar, ...]) -> tuple[int, ...]:
    """Sizes of the BARs that go into a guest's 64-bit window, largest first."""
    return tuple(sorted((b.size for b in bars if b.high), reverse=True))
