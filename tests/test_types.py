"""The small domain types: CpuSet (kernel cpulist syntax), PciAddress, sizes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from partitioner.cpuset import CpuListSyntaxError, CpuSet
from partitioner.pci import PciAddress, PciAddressSyntaxError
from partitioner.units import GiB, MiB, SizeSyntaxError, format_size, parse_size


@pytest.mark.parametrize(
    ("text", "cpus", "canonical"),
    [
        ("0-3,8,10-11", [0, 1, 2, 3, 8, 10, 11], "0-3,8,10-11"),
        ("", [], ""),
        ("  5 \n", [5], "5"),
        ("3,1,2", [1, 2, 3], "1-3"),
        ("0-7:2", [0, 2, 4, 6], "0,2,4,6"),
        ("1,1,1", [1], "1"),
    ],
)
def test_cpulist_parse_and_print(text: str, cpus: list[int], canonical: str) -> None:
    s = CpuSet.parse(text)
    assert s.as_list() == cpus
    assert str(s) == canonical


@pytest.mark.parametrize(
    "bad",
    [
        "a",
        "1-",
        "-1",
        "3-1",
        "1,,2",
        "1.5",
        "0-3:0",
        "0-15:2/4",
        "0-99999999999",
        "8192",
        "1" * 100,
    ],
)
def test_cpulist_rejects(bad: str) -> None:
    with pytest.raises(CpuListSyntaxError):
        CpuSet.parse(bad)


def test_cpumask() -> None:
    assert str(CpuSet.from_mask("00000000,0000ff0f")) == "0-3,8-15"
    assert CpuSet.from_mask("1,00000000") == CpuSet([32])
    with pytest.raises(CpuListSyntaxError):
        CpuSet.from_mask("xyz")
    with pytest.raises(CpuListSyntaxError):
        CpuSet.from_mask("f" * 5000)


def test_set_algebra() -> None:
    a, b = CpuSet.parse("0-5"), CpuSet.parse("4-9")
    assert str(a & b) == "4-5" and str(a - b) == "0-3" and str(a | b) == "0-9"
    assert not a.isdisjoint(b) and CpuSet([4]).issubset(a) and 5 in a and 6 not in a
    assert hash(CpuSet([1, 2])) == hash(CpuSet.parse("1-2"))


@given(st.sets(st.integers(min_value=0, max_value=8191)))
def test_cpulist_round_trip(cpus: set[int]) -> None:
    s = CpuSet(cpus)
    assert CpuSet.parse(str(s)) == s
    assert set(s) == cpus


_plain_item = st.one_of(
    st.integers(0, 9999).map(str),
    st.tuples(st.integers(0, 9999), st.integers(0, 9999)).map(lambda r: f"{r[0]}-{r[1]}"),
    st.sampled_from(["0007", "8191", "8192", "0-8191", "9999-0"]),
)


@given(st.lists(_plain_item, min_size=1, max_size=70).map(",".join))
def test_a_plain_cpulist_reads_as_the_general_reading_reads_it(text: str) -> None:
    """sysfs's lists ("0,2048", "0-63") are read without the general checks (thousands of
    sibling lists on a large host); what they give, or refuse, is the general reading's (a
    leading space sends a text through it)."""

    def read(t: str) -> CpuSet | str:
        try:
            return CpuSet.parse(t)
        except CpuListSyntaxError as e:
            return str(e)

    assert read(text) == read(" " + text)


def test_pci_address() -> None:
    assert str(PciAddress.parse("81:00.0")) == "0000:81:00.0"
    assert str(PciAddress.parse("0001:0A:1f.7")) == "0001:0a:1f.7"
    assert PciAddress.parse("81:00.0") == PciAddress.parse("0000:81:00.0")
    assert PciAddress.parse("81:00.0").slot_key == PciAddress.parse("81:00.1").slot_key
    for bad in ["81:00", "81:20.0", "81:00.8", "zz:00.0", ""]:
        with pytest.raises(PciAddressSyntaxError):
            PciAddress.parse(bad)


def test_sizes() -> None:
    assert parse_size("4GiB") == 4 * GiB
    assert parse_size("512MiB") == 512 * MiB
    assert format_size(4 * GiB) == "4GiB" and format_size(1536 * MiB) == "1536MiB"
    with pytest.raises(SizeSyntaxError, match="binary unit"):
        parse_size("4GB")
    with pytest.raises(SizeSyntaxError):
        parse_size("four GiB")
