"""Sets of host CPUs, and the kernel's cpulist syntax ("0-3,8,10-11"), parsed and printed here only."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator


class CpuListSyntaxError(ValueError):
    """Text that is not a kernel cpulist."""


# The kernel's own ceiling (CONFIG_NR_CPUS is at most 8192 on x86-64).  A bound is
# needed anyway: "0-99999999999" would otherwise be expanded in full.
MAX_CPUS = 8192

# A cpulist as sysfs writes it, short enough to read at once: at most 64 items of ASCII
# numbers of at most 4 digits, no spaces or strides.
_PLAIN = re.compile(r"[0-9]{1,4}(?:-[0-9]{1,4})?(?:,[0-9]{1,4}(?:-[0-9]{1,4})?){0,63}")


class CpuSet:
    """An immutable, ordered set of CPU numbers."""

    __slots__ = ("_cpus", "_set")

    def __init__(self, cpus: Iterable[int] = ()) -> None:
        items = frozenset(cpus)
        for c in items:
            if not isinstance(c, int) or isinstance(c, bool) or c < 0:
                raise ValueError(f"not a CPU number: {c!r}")
        self._cpus: tuple[int, ...] = tuple(sorted(items))
        self._set = items

    @classmethod
    def _trusted(cls, cpus: list[int]) -> CpuSet:
        """A set of numbers already known to be CPU numbers (what a plain cpulist names)."""
        out = cls.__new__(cls)
        out._set = frozenset(cpus)
        out._cpus = tuple(sorted(out._set))
        return out

    @classmethod
    def lenient(cls, text: str | None) -> CpuSet | None:
        """A cpulist as the kernel printed it in a file (``read`` gives None for a missing one):
        None when there is no file or it holds no cpulist.  ``(null)`` is the empty set
        (``nohz_full`` with no CPUs, as kernels before 6.x print it)."""
        if text is None:
            return None
        if text.strip() == "(null)":
            return cls()
        try:
            return cls.parse(text)
        except CpuListSyntaxError:
            return None

    @classmethod
    def parse(cls, text: str) -> CpuSet:
        """Parse kernel cpulist syntax: ``"0-3,8,10-11"``; also ``"0-7:2"`` strides as the kernel accepts.

        An empty string (or only whitespace) is the empty set, as in an empty sysfs ``cpulist``.
        """
        if _PLAIN.fullmatch(text):
            # What sysfs writes ("0,2048", "0-63"): read without the general checks, which
            # a host of thousands of CPUs would otherwise run for every sibling list.
            cpus: list[int] = []
            for part in text.split(","):
                lo, _, hi = part.partition("-")
                first, last = int(lo), int(hi or lo)
                if last >= MAX_CPUS or last < first:
                    break  # said by the general reading below, as it says it
                cpus.extend(range(first, last + 1))
            else:
                return cls._trusted(cpus)
        singles, ranges = _items(text)
        out = set(singles)
        if sum(len(r) for r in ranges) <= 4 * MAX_CPUS:
            for r in ranges:
                out.update(r)
        else:
            # Ranges naming far more CPUs than there can be ("0-8191" a million times):
            # marked in a bitmap at C speed, so the work grows with the text, not with
            # what the text repeats.
            bits = _bitmap(ranges)
            out.update(i for i, b in enumerate(bits) if b)
        return cls(out)

    @staticmethod
    def parse_bits(text: str) -> int:
        """The CPUs of a cpulist as the bits of an int (CPU n is bit n), for the checks
        that compare many lists (a manifest's overlaps): built without a Python step per
        CPU, so a list's cost is its text, not the CPUs it names."""
        singles, ranges = _items(text)
        mask = 0
        for c in singles:
            mask |= 1 << c
        strided = [r for r in ranges if r.step != 1]
        for r in ranges:
            if r.step == 1:
                mask |= ((1 << len(r)) - 1) << r.start
        if strided:
            mask |= int(bytes(_bitmap(strided)[::-1]).translate(_BINARY), 2)
        return mask

    @classmethod
    def from_bits(cls, mask: int) -> CpuSet:
        """The set :meth:`parse_bits` gives as an int."""
        return cls(_bit_numbers(mask))

    @classmethod
    def from_mask(cls, text: str) -> CpuSet:
        """Parse a kernel hex mask (``"00000000,0000ff0f"``), as in ``cpumap`` or ``Cpus_allowed``."""
        digits = text.strip().replace(",", "")
        if not digits:
            return cls()
        if len(digits) > MAX_CPUS // 4:
            raise CpuListSyntaxError(f"CPU mask {text[:40]!r}... is longer than {MAX_CPUS} CPUs")
        try:
            if not digits.isascii():  # int() would take other scripts' digits
                raise ValueError(digits)
            value = int(digits, 16)
        except ValueError:
            raise CpuListSyntaxError(f"not a CPU mask: {text!r}") from None
        return cls(i for i in range(value.bit_length()) if value >> i & 1)

    def __str__(self) -> str:
        """Canonical cpulist syntax, ranges collapsed: ``0-3,8``."""
        parts: list[str] = []
        cpus = self._cpus
        i = 0
        while i < len(cpus):
            j = i
            while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
                j += 1
            parts.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
            i = j + 1
        return ",".join(parts)

    def __repr__(self) -> str:
        return f"CpuSet({str(self)!r})"

    def __iter__(self) -> Iterator[int]:
        return iter(self._cpus)

    def __len__(self) -> int:
        return len(self._cpus)

    def __contains__(self, cpu: object) -> bool:
        return cpu in self._set

    def __bool__(self) -> bool:
        return bool(self._cpus)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CpuSet) and self._cpus == other._cpus

    def __hash__(self) -> int:
        return hash(self._cpus)

    def __or__(self, other: CpuSet) -> CpuSet:
        return CpuSet(self._cpus + other._cpus)

    def __and__(self, other: CpuSet) -> CpuSet:
        return CpuSet(self._set & other._set)

    def __sub__(self, other: CpuSet) -> CpuSet:
        return CpuSet(self._set - other._set)

    def isdisjoint(self, other: CpuSet) -> bool:
        return self._set.isdisjoint(other._set)

    def issubset(self, other: CpuSet) -> bool:
        return self._set <= other._set

    def as_list(self) -> list[int]:
        return list(self._cpus)


_BINARY = bytes.maketrans(b"\x00\x01", b"01")


def _bit_numbers(mask: int) -> list[int]:
    """The numbers of the set bits of ``mask``, at C speed (a string of its bits)."""
    digits = bin(mask)[:1:-1]
    out: list[int] = []
    i = digits.find("1")
    while i >= 0:
        out.append(i)
        i = digits.find("1", i + 1)
    return out


def _bitmap(ranges: list[range]) -> bytearray:
    bits = bytearray(MAX_CPUS)
    ones = memoryview(b"\x01" * MAX_CPUS)
    for r in ranges:
        bits[r.start : r.stop : r.step] = ones[: len(r)]
    return bits


def _items(text: str) -> tuple[list[int], list[range]]:
    """The single CPUs and the ranges of a cpulist, checked; nothing expanded."""
    text = text.strip()
    if not text:
        return [], []
    items = text.count(",") + 1
    if items > MAX_CPUS:
        # Checked on the text before any number is read: the work stays bounded by it.
        raise CpuListSyntaxError(
            f"CPU list {text[:40]!r}... has {items} items, more than the {MAX_CPUS} CPUs "
            "Linux supports"
        )
    singles: list[int] = []
    ranges: list[range] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise CpuListSyntaxError(f"empty item in CPU list {text!r}")
        stride = 1
        if ":" in part:
            part, _, stride_text = part.partition(":")
            if "/" in stride_text:  # kernel form "0-15:2/4": used/group size
                raise CpuListSyntaxError(f"group strides are not supported in {text!r}")
            stride = _parse_int(stride_text, text)
            if stride <= 0:
                raise CpuListSyntaxError(f"stride must be positive in {text!r}")
        if "-" in part:
            lo_text, _, hi_text = part.partition("-")
            lo, hi = _parse_int(lo_text, text), _parse_int(hi_text, text)
            if hi < lo:
                raise CpuListSyntaxError(f"range {part!r} runs backwards in CPU list {text!r}")
            ranges.append(range(lo, hi + 1, stride))
        else:
            singles.append(_parse_int(part, text))
    return singles, ranges


def _parse_int(text: str, whole: str) -> int:
    text = text.strip()
    # ASCII only: str.isdigit() and int() also take "²" and "٣", which no kernel writes.
    if not (text.isascii() and text.isdigit()):
        raise CpuListSyntaxError(f"{text!r} is not a CPU number in CPU list {whole!r}")
    if len(text) > 5 or int(text) >= MAX_CPUS:
        raise CpuListSyntaxError(
            f"CPU {text} in CPU list {whole!r} is beyond what Linux supports (CPUs 0-{MAX_CPUS - 1})"
        )
    return int(text)
