"""PCI addresses (``0000:81:00.0``), parsed and printed here only."""

from __future__ import annotations

import re
from dataclasses import dataclass

_ADDR_RE = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{4,8}):)?(?P<bus>[0-9a-fA-F]{2}):(?P<slot>[0-9a-fA-F]{2})\.(?P<func>[0-7])$"
)


class PciAddressSyntaxError(ValueError):
    """Text that is not a PCI address."""


@dataclass(frozen=True, order=True)
class PciAddress:
    domain: int
    bus: int
    slot: int
    function: int

    @classmethod
    def parse(cls, text: str) -> PciAddress:
        """``"81:00.0"`` or ``"0000:81:00.0"``; the domain defaults to 0."""
        m = _ADDR_RE.match(text.strip())
        if not m:
            raise PciAddressSyntaxError(
                f"{text!r} is not a PCI address (expected DDDD:BB:SS.F or BB:SS.F, e.g. 0000:81:00.0)"
            )
        slot = int(m.group("slot"), 16)
        if slot > 0x1F:
            raise PciAddressSyntaxError(
                f"{text!r} is not a PCI address: slot {slot:#x} is above 1f"
            )
        return cls(
            int(m.group("domain") or "0", 16), int(m.group("bus"), 16), slot, int(m.group("func"))
        )

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function}"

    @property
    def slot_key(self) -> tuple[int, int, int]:
        """Functions that share this key are in the same physical slot (a GPU and its audio function)."""
        return (self.domain, self.bus, self.slot)
