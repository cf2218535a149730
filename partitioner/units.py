"""Sizes with binary units, as the manifest writes them (``4GiB``) and as people read them."""

from __future__ import annotations

import re

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

_UNITS = {"B": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB, "TiB": TiB}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|TiB)\s*$")


class SizeSyntaxError(ValueError):
    """Text that is not a size with a binary unit."""


def parse_size(text: str) -> int:
    """``"4GiB"`` -> 4294967296.  Only whole numbers and binary units: ``4GB`` is refused on purpose
    (decimal or binary? the manifest does not guess)."""
    m = _SIZE_RE.match(text)
    if not m:
        hint = ""
        if re.match(r"^\s*\d+(\.\d+)?\s*[KMGT]?B?\s*$", text, re.IGNORECASE):
            hint = " (use a binary unit: KiB, MiB, GiB or TiB, e.g. 4GiB)"
        raise SizeSyntaxError(f"{text!r} is not a size{hint}")
    return int(m.group(1)) * _UNITS[m.group(2)]


def format_size(n: int) -> str:
    """The largest binary unit that divides ``n`` exactly: 4294967296 -> ``4GiB``; 1536 MiB -> ``1536MiB``."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return f"{n}B"


def page_size_name(n: int) -> str:
    """Hugepage size in the manifest's spelling: 2097152 -> ``2MiB``."""
    return format_size(n)


def kernel_page_size(n: int) -> str:
    """Hugepage size in the kernel's spelling (``hugepagesz=``): 2097152 -> ``2M``, 1 GiB -> ``1G``."""
    return f"{n // GiB}G" if n % GiB == 0 else f"{n // MiB}M"


def virtio_mem_block(hugepage_bytes: int | None) -> int:
    """The block size of a partition's virtio-mem devices: its page size, at least 2 MiB (what
    virtio-mem plugs and unplugs at once; each node's dynamic room and plugged amount are
    multiples of it)."""
    return max(hugepage_bytes or 0, 2 * MiB)


def human_size(n: int) -> str:
    """For people, not for manifests: exact where it can be, else one decimal (``10.3GiB``)."""
    exact = format_size(n)
    if exact.endswith(("GiB", "TiB")) or n < MiB:
        return exact
    for unit in ("TiB", "GiB", "MiB"):
        if n >= _UNITS[unit]:
            value = n / _UNITS[unit]
            return f"{value:.1f}{unit}" if n % _UNITS[unit] else f"{int(value)}{unit}"
    return exact
