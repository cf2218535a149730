"""The site manifest: YAML with locations, the schema, the semantic checks, the examples."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partitioner.cpuset import CpuSet
from partitioner.errors import ManifestError, Problem
from partitioner.manifest import loader, yamlnodes
from partitioner.manifest.loader import MAX_BYTES, load, loads
from partitioner.manifest.model import Boot, Disk, Location, Manifest
from partitioner.run import CommandFailed, run
from partitioner.units import GiB, MiB

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "partitions").glob("*.yaml"))
INPUTS = Path(__file__).resolve().parent / "manifests"

HEAD = "version: 1\npartitions:\n"


def problems(text: str | bytes) -> list[Problem]:
    with pytest.raises(ManifestError) as info:
        loads(text, "m.yaml")
    assert info.value.problems, "a ManifestError must carry at least one problem"
    return info.value.problems


def only(text: str | bytes) -> Problem:
    found = problems(text)
    assert len(found) == 1, "\n".join(map(str, found))
    return found[0]


def without_where(m: Manifest) -> Any:
    """The manifest's values with the locations dropped, to compare two files' meaning."""
    parts = {
        name: dataclasses.replace(
            p,
            where=Location("", 0, 0),
            devices=tuple(dataclasses.replace(d, where=Location("", 0, 0)) for d in p.devices),
        )
        for name, p in m.partitions.items()
    }
    return (m.host, parts)


# -- the examples ---------------------------------------------------------------------------


def test_there_are_the_four_examples() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"nic-firewall.yaml", "gpu-workstation.yaml", "two-socket.yaml", "demo.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads(path: Path, parser: str) -> None:
    first = path.read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=../schemas/site.schema.json"
    assert (path.parent / "../schemas/site.schema.json").resolve().is_file()
    m = load(path)
    assert m.file == str(path)
    assert m.partitions, "an example shows at least one partition"
    assert list(m.partitions) == sorted(m.partitions)
    # Commented, as a user's starting point should be.
    assert sum(1 for line in path.read_text().splitlines() if "#" in line) >= 5


def test_nic_firewall_example_values() -> None:
    m = load(ROOT / "partitions" / "nic-firewall.yaml")
    fw0 = m.partitions["fw0"]
    assert (fw0.cpu_count, fw0.cpu_list, fw0.memory_bytes) == (4, None, 4 * GiB)
    assert fw0.hugepage_bytes == 2 * MiB
    assert [(d.kind, d.value, d.count) for d in fw0.devices] == [
        ("pci", "0000:81:00.0", 1),
        ("id", "8086:10d3", 1),
    ]
    assert fw0.boot is not None and fw0.boot.kernel == "/srv/fw/vmlinuz"
    assert m.host.reserve_cpu_count == 2 and m.host.reserve_memory_bytes == 2 * GiB


def test_gpu_workstation_example_values() -> None:
    desk = load(ROOT / "partitions" / "gpu-workstation.yaml").partitions["desk"]
    assert desk.firmware == "uefi" and desk.hugepage_bytes == GiB
    assert [d.value for d in desk.devices if d.kind == "pci"] == ["0000:01:00.0", "0000:01:00.1"]
    assert [d.reset_none_ok for d in desk.devices] == [False, True, False]
    assert desk.devices[2].required is False
    assert desk.disks and desk.disks[-1].readonly


def test_two_socket_example_binds_one_partition_per_node() -> None:
    m = load(ROOT / "partitions" / "two-socket.yaml")
    assert {n: p.numa for n, p in m.partitions.items()} == {"node0": (0,), "node1": (1,)}
    assert [p.name for p in m.start_order()] == ["node0", "node1"]


def test_demo_example_is_for_the_test_bed() -> None:
    m = load(ROOT / "partitions" / "demo.yaml")
    assert m.host.accel == "tcg"
    fw0, lan0 = m.partitions["fw0"], m.partitions["lan0"]
    assert (fw0.cpu_count, fw0.memory_bytes, fw0.hugepage_bytes) == (1, 128 * MiB, 2 * MiB)
    assert fw0.devices[0].kind == "pci" and fw0.devices[0].value == "0000:81:00.0"
    assert fw0.boot is not None and "vmlinuz" in fw0.boot.kernel
    assert lan0.devices[0].kind == "pci"


# -- every problem in one run, each where it is ---------------------------------------------

TEN = [
    (6, 13, "host.reserve.memory", "write 2GiB"),
    (7, 8, "host.smt", "did you mean `isolate`"),
    (
        10,
        11,
        "partitions.fw0.cpus",
        "partition fw0 and the host's reserve (line 5) both take CPU 1",
    ),
    (11, 13, "partitions.fw0.memory", "not a whole number of 1GiB hugepages: use 2GiB or 3GiB"),
    (12, 5, "partitions.fw0.memroy", "did you mean `memory`"),
    (14, 16, "partitions.fw0.autostart", "expected true or false, not `yes`"),
    (18, 5, "partitions.fw0.order", "duplicate key `order` (first at line 17)"),
    (
        23,
        9,
        "partitions.lan0.devices[0]",
        "0000:81:00.0 is already named by partition fw0 (line 16)",
    ),
    (24, 3, "partitions.Web", "partition name"),
    (27, 5, "partitions.Web.boot", "needs `kernel`"),
]


def test_ten_mistakes_give_ten_located_messages(parser: str) -> None:
    path = INPUTS / "ten-mistakes.yaml"
    with pytest.raises(ManifestError) as info:
        load(path)
    got = info.value.problems
    assert len(got) == len(TEN), "\n".join(map(str, got))
    for problem, (line, column, where, text) in zip(got, TEN, strict=True):
        assert (problem.file, problem.line, problem.column) == (str(path), line, column), problem
        assert problem.path == where, problem
        assert text in problem.message, problem
        assert str(problem).startswith(f"{path}:{line}:{column}: ")


# -- YAML that is not a manifest -------------------------------------------------------------

BAD_YAML: list[tuple[str, str | bytes, int, int, str]] = [
    ("empty", "", 1, 1, "the manifest is empty: it needs at least `version: 1`"),
    ("only comments", "# nothing yet\n\n", 1, 1, "the manifest is empty"),
    ("explicit empty document", "---\n...\n", 1, 1, "the manifest is empty"),
    ("null document", "~\n", 1, 1, "the manifest is empty"),
    ("list", "- version: 1\n", 1, 1, "the manifest is a list"),
    ("scalar", "version 1\n", 1, 1, "the single value `version 1`"),
    ("tab indent", "version: 1\nhost:\n\tsmt: share\n", 3, 1, "a tab indents this line"),
    ("tab after key", "version:\t1\n", 1, 9, "a tab here"),
    ("unclosed flow", "version: 1\nhost: {smt: share\n", 3, 1, "invalid YAML: expected ',' or '}'"),
    ("bad indent", "version: 1\nhost:\n  smt: share\n accel: kvm\n", 4, 2, "invalid YAML"),
    ("unclosed quote", 'version: "1\n', 2, 1, "invalid YAML"),
    ("two documents", "version: 1\n---\nversion: 1\n", 2, 1, "a second YAML document"),
    ("NUL byte", b"version: 1\nhost:\x00\n", 2, 6, "binary file"),
    ("not UTF-8", b"version: 1\n# caf\xe9\n", 2, 6, "not UTF-8"),
    ("UTF-16", "version: 1\n".encode("utf-16"), 1, 4, "binary file"),
    ("control character", "version: 1\x07\n", 1, 11, "U+0007 is not allowed"),
    ("deep nesting", "version: 1\nx: " + "[" * 5000, 2, 67, "nested more than 64 levels"),
    # Deeper than libyaml's own limit (1000 levels), in block style: the project's rule speaks.
    (
        "deep block nesting",
        "version: 1\nx:\n" + "- " * 1500 + "a\n",
        3,
        127,
        "nested more than 64 levels",
    ),
    (
        "deep mixed nesting",
        "version: 1\n"
        + "".join(" " * i + f"k{i}:\n" for i in range(40))
        + " " * 40
        + "x: "
        + "[" * 2000,
        42,
        67,
        "nested more than 64 levels",
    ),
    ("too big", "#" * (MAX_BYTES + 1), 0, 0, "larger than 1MiB"),
    ("complex key", "version: 1\n? [a, b]\n: 1\n", 2, 3, "a key must be a plain name"),
    ("alias", "version: 1\nhost: &h {smt: share}\npartitions: *h\n", 3, 13, "alias *h"),
    ("alias as a key", "version: &v 1\n*v : 2\n", 2, 1, "alias *v"),
    ("float tag", "version: !!float 1\n", 1, 10, "YAML tag !!float"),
    ("local tag", "version: !one 1\n", 1, 10, "YAML tag !one"),
    ("bad int tag", "version: !!int one\n", 1, 10, "'one' is not a valid !!int"),
]


@pytest.fixture(params=["libyaml", "python"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both YAML parsers PyYAML offers: the manifest must mean the same under either."""
    if request.param == "libyaml" and not yamlnodes.HAVE_LIBYAML:
        pytest.skip("PyYAML was built without libyaml")
    monkeypatch.setattr(yamlnodes, "USE_LIBYAML", request.param == "libyaml")
    return str(request.param)


@pytest.mark.parametrize(("text", "line", "column", "message"), [c[1:] for c in BAD_YAML],
                         ids=[c[0] for c in BAD_YAML])  # fmt: skip
def test_bad_yaml_is_one_located_problem(
    parser: str, text: str | bytes, line: int, column: int, message: str
) -> None:
    if parser == "libyaml" and message == "a tab here":
        # YAML allows a tab between a key and its value; libyaml does too, PyYAML does not.
        assert loads(text).host == loads("version: 1").host
        return
    if parser == "libyaml" and message.startswith("invalid YAML: "):
        message = "invalid YAML"  # libyaml words syntax errors its own way
    p = only(text)
    assert (p.file, p.line, p.column) == ("m.yaml", line, column), p
    assert message in p.message, p


def test_a_refused_alias_key_leaves_the_rest_checked(parser: str) -> None:
    found = problems("version: &v 2\n*v : 2\n")
    assert [(p.line, p.column, p.message.split(":")[0]) for p in found] == [
        (1, 10, "version"),
        (2, 1, "alias *v is not allowed in a manifest"),
    ]


def test_billion_laughs_is_refused_without_expanding(parser: str) -> None:
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    found = problems("\n".join(lines) + "\n")
    aliases = [p for p in found if p.message.startswith("alias *")]
    assert len(aliases) == 90  # each alias refused where it stands; 10**10 items never built
    assert {p.line for p in aliases} == set(range(3, 12))


def test_fifty_megabyte_file_is_refused_before_parsing(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.write(b"version: 1\n")
        f.truncate(50 * 1024 * 1024)
    with pytest.raises(ManifestError) as info:
        load(big)
    [p] = info.value.problems
    assert (p.file, p.line) == (str(big), 0) and "1MiB" in p.message


def test_exactly_the_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "padded.yaml"
    body = b"version: 1\n"
    path.write_bytes(body + b"#" * (MAX_BYTES - len(body)))
    assert load(path).partitions == {}


@pytest.mark.parametrize("what", ["missing", "directory"])
def test_unreadable_file_is_a_problem_at_line_zero(tmp_path: Path, what: str) -> None:
    path = tmp_path / "site.yaml"
    if what == "directory":
        path.mkdir()
    with pytest.raises(ManifestError) as info:
        load(path)
    [p] = info.value.problems
    assert (p.file, p.line, p.column) == (str(path), 0, 0)
    assert p.message.startswith("cannot read the manifest: ")
    assert ("No such file" if what == "missing" else "directory") in p.message


def test_bom_and_crlf_are_accepted(parser: str) -> None:
    m = loads("\ufeffversion: 1\r\nhost:\r\n  smt: share\r\n".encode())
    assert m.host.smt == "share"


# -- duplicate keys ----------------------------------------------------------------------------


def test_duplicate_key_is_reported_at_the_second_with_the_first_line(parser: str) -> None:
    p = only(
        HEAD + "  fw0:\n    cpus: 2\n    memory: 1GiB\n  fw0:\n    cpus: 4\n    memory: 2GiB\n"
    )
    assert (p.line, p.column) == (6, 3)
    assert "duplicate key `fw0` (first at line 3)" in p.message


def test_every_duplicate_key_is_reported() -> None:
    text = "version: 1\nversion: 1\nhost:\n  smt: share\n  smt: share\n  accel: kvm\n  accel: tcg\n"
    assert [(p.line, p.column) for p in problems(text)] == [(2, 1), (5, 3), (7, 3)]


# -- the schema ----------------------------------------------------------------------------------


def partition(body: str, name: str = "fw0") -> str:
    return HEAD + f"  {name}:\n" + "".join(f"    {line}\n" for line in body.strip().splitlines())


@pytest.mark.parametrize(
    ("body", "line", "column", "message"),
    [
        ("cpus: 2\nmemory: 1GiB\nmemroy: 2GiB", 6, 5, "unknown key `memroy`; did you mean `memory`?"),
        ("cpus: 2\nmemory: 1GiB\nfirmwear: uefi", 6, 5, "did you mean `firmware`?"),
        ("cpus: 2\nmemory: 1GiB\nhugepages: 2MB", 6, 16, "expected one of 2MiB, 1GiB, none, not `2MB`; did you mean `2MiB`?"),
        ("cpus: 2\nmemory: 4GB", 5, 13, "decimal units are refused, write 4GiB"),
        ("cpus: 2\nmemory: 4096", 5, 13, "expected a size with a binary unit"),
        ("cpus: 2\nmemory: 1GiB\nfirmware: efi", 6, 15, "expected one of bios, uefi"),
        ("cpus: 2\nmemory: 1GiB\nautostart: no", 6, 16, "yes, no, on and off are text"),
        ("cpus: 2\nmemory: 1GiB\norder: 1.5", 6, 12, "expected a whole number, not `1.5`"),
        ("cpus: 0\nmemory: 1GiB", 4, 11, "expected a number of CPUs (1 or more)"),
        ("cpus: two\nmemory: 1GiB", 4, 11, "expected a number of CPUs"),
        ("cpus: 2", 3, 3, "partitions.fw0 needs `memory`"),
        ("memory: 1GiB", 3, 3, "partitions.fw0 needs `cpus`"),
        ("cpus: 2\nmemory: 1GiB\nnuma: [0, 0]", 6, 11, "distinct node numbers"),
        ("cpus: 2\nmemory: 1GiB\nnuma: any", 6, 11, "expected auto, a NUMA node number"),
        ("cpus: 2\nmemory: 1GiB\ndevices:\n  - 81:00.0", 7, 9, "expected a device written as `pci: ADDRESS`"),
        ("cpus: 2\nmemory: 1GiB\ndevices:\n  - pci: 81:00.0\n    id: 8086:10d3", 7, 9, "exactly one of `pci:`, `id:`, `netdev:` or `vf:`"),
        ("cpus: 2\nmemory: 1GiB\ndevices:\n  - required: false", 7, 9, "exactly one of `pci:`, `id:`, `netdev:` or `vf:`"),
        ("cpus: 2\nmemory: 1GiB\ndevices:\n  - pci: 81:00.0\n    count: 2", 7, 9, "`count` only with `id:`"),
        ("cpus: 2\nmemory: 1GiB\ndevices:\n  - pci: 1:30.0", 7, 14, "expected a PCI address"),
        ("cpus: 2\nmemory: 1GiB\ndevices:\n  - pci: 81:20.0", 7, 14, "expected a PCI address"),
        ("cpus: 2\nmemory: 1GiB\ndevices:\n  - id: 8086-10d3", 7, 13, "vendor:device id"),
        ("cpus: 2\nmemory: 1GiB\ndevices:\n  - id: 8086:10d3\n    count: 0", 8, 16, "expected at least 1"),
        ("cpus: 2\nmemory: 1GiB\ndevices:\n  - netdev: en p1", 7, 17, "network interface name"),
        ("cpus: 2\nmemory: 1GiB\ndevices:\n  - id: 8086:10d3\n    reset: none", 8, 16, "expected one of none-ok"),
        ("cpus: 2\nmemory: 1GiB\nboot:\n  cmdline: quiet", 6, 5, "partitions.fw0.boot needs `kernel`"),
        ("cpus: 2\nmemory: 1GiB\nboot:\n  kernel: ''", 7, 15, "expected some text"),
        ("cpus: 2\nmemory: 1GiB\ndisks:\n  - path: ''", 7, 15, "expected some text"),
        ("cpus: 2\nmemory: 1GiB\ndisks:\n  - /srv/disk.img", 7, 9, "expected a mapping, not `/srv/disk.img`"),
        ("cpus: 2\nmemory: 1GiB\ndisks:\n  - path: /x\n    readonly: yes", 8, 19, "expected true or false"),
    ],
)  # fmt: skip
def test_schema_problem(body: str, line: int, column: int, message: str) -> None:
    p = only(partition(body))
    assert (p.line, p.column) == (line, column), p
    assert message in p.message, p


@pytest.mark.parametrize(
    ("text", "line", "column", "message"),
    [
        ("version: 2\n", 1, 10, "expected 1, the only manifest version so far, not `2`"),
        ("version: '1'\n", 1, 10, "not `1`"),
        ("host:\n  smt: share\n", 1, 1, "the manifest needs `version`"),
        ("version: 1\nhots: {}\n", 2, 1, "unknown key `hots`; did you mean `host`?"),
        ("version: 1\nhost:\n  accel: qemu\n", 3, 10, "expected one of kvm, tcg"),
        ("version: 1\nhost:\n  reserve:\n    cpu: 2\n", 4, 5, "did you mean `cpus`?"),
        ("version: 1\nhost:\n  reserve:\n    cpus: 0\n", 4, 11, "expected a number of CPUs"),
        ("version: 1\nhost: [kvm]\n", 2, 7, "expected a mapping, not a list"),
        ("version: 1\npartitions:\n  9lives:\n    cpus: 1\n    memory: 1GiB\n", 3, 3, "partition name"),
        ("version: 1\npartitions:\n  fw0:\n", 3, 7, "expected a mapping, not an empty value"),
        ("version: 1\npartitions:\n  " + "a" * 33 + ":\n    cpus: 1\n    memory: 1GiB\n", 3, 3, "partition name"),
    ],
)  # fmt: skip
def test_top_level_problem(text: str, line: int, column: int, message: str) -> None:
    p = only(text)
    assert (p.line, p.column) == (line, column), p
    assert message in p.message, p


def test_unknown_keys_are_each_reported() -> None:
    found = problems(partition("cpus: 2\nmemory: 1GiB\ncolour: red\nsize: big"))
    assert [(p.line, p.message.split(": ", 1)[1]) for p in found] == [
        (6, "unknown key `colour`; expected one of: " + ", ".join(
            loader.schema()["$defs"]["partition"]["properties"])),
        (7, "unknown key `size`; expected one of: " + ", ".join(
            loader.schema()["$defs"]["partition"]["properties"])),
    ]  # fmt: skip


# -- what the schema cannot say ----------------------------------------------------------------


def test_explicit_cpu_lists_that_overlap_name_both_partitions() -> None:
    text = (
        HEAD
        + "  fw0:\n    cpus: '4-7'\n    memory: 1GiB\n  lan0:\n    cpus: '6-9,12'\n    memory: 1GiB\n"
    )
    p = only(text)
    assert (p.line, p.column) == (7, 11)
    assert "partition lan0 and partition fw0 (line 4) both take CPUs 6-7" in p.message


def test_a_list_overlapping_two_owners_names_each() -> None:
    text = (
        "version: 1\nhost:\n  reserve:\n    cpus: '0-1'\npartitions:\n"
        "  a:\n    cpus: '2-3'\n    memory: 1GiB\n"
        "  b:\n    cpus: '1-2,9'\n    memory: 1GiB\n"
    )
    found = problems(text)
    assert [(p.line, p.column) for p in found] == [(10, 11), (10, 11)]
    assert sorted(p.message.split(": ", 1)[1] for p in found) == [
        "partition b and partition a (line 7) both take CPU 2: a CPU has one owner",
        "partition b and the host's reserve (line 4) both take CPU 1: a CPU has one owner",
    ]


def test_cpu_list_overlapping_the_host_reserve() -> None:
    text = "version: 1\nhost:\n  reserve:\n    cpus: '0-1'\npartitions:\n  fw0:\n    cpus: '1-2'\n    memory: 1GiB\n"
    p = only(text)
    assert (p.line, p.column) == (7, 11)
    assert "the host's reserve (line 4) both take CPU 1" in p.message


def test_disjoint_lists_and_counts_are_fine() -> None:
    text = (
        "version: 1\nhost:\n  reserve:\n    cpus: '0,8'\npartitions:\n"
        "  a:\n    cpus: '1-3,9-11'\n    memory: 1GiB\n"
        "  b:\n    cpus: '4-7:3'\n    memory: 1GiB\n"
        "  c:\n    cpus: 64\n    memory: 1GiB\n"
    )
    m = loads(text)
    assert m.host.reserve_cpu_list == CpuSet([0, 8]) and m.host.reserve_cpu_count is None
    assert m.partitions["a"].cpu_list == CpuSet([1, 2, 3, 9, 10, 11])
    assert m.partitions["a"].cpu_count == 6
    assert m.partitions["b"].cpu_list == CpuSet([4, 7])
    assert (m.partitions["c"].cpu_count, m.partitions["c"].cpu_list) == (64, None)


@pytest.mark.parametrize(
    ("cpus", "message"),
    [("'7-4'", "runs backwards"), ("'0-8191,9000'", "beyond the largest CPU number")],
)
def test_cpu_list_that_the_pattern_lets_through(cpus: str, message: str) -> None:
    p = only(partition(f"cpus: {cpus}\nmemory: 1GiB"))
    assert (p.line, p.column) == (4, 11) and message in p.message


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("pci: 81:00.0", "pci: 0000:81:00.0"),
        ("pci: '0000:81:00.0'", "pci: 0000:81:00.0"),
        ("pci: 0000:AB:00.0", "pci: ab:00.0"),
        ("netdev: enp1s0", "netdev: enp1s0"),
    ],
)
def test_device_named_twice_across_partitions(first: str, second: str) -> None:
    text = (
        HEAD
        + f"  fw0:\n    cpus: 1\n    memory: 1GiB\n    devices:\n      - {first}\n"
        + f"  lan0:\n    cpus: 1\n    memory: 1GiB\n    devices:\n      - {second}\n"
    )
    p = only(text)
    assert (p.line, p.column) == (12, 9)
    assert "already named by partition fw0 (line 7)" in p.message


def test_device_named_twice_within_a_partition() -> None:
    p = only(partition("cpus: 1\nmemory: 1GiB\ndevices:\n  - pci: 81:00.0\n  - pci: '81:00.0'"))
    assert (p.line, p.column) == (8, 9)
    assert "0000:81:00.0 is named again (line 7)" in p.message


def test_the_same_id_in_two_partitions_is_fine() -> None:
    text = partition("cpus: 1\nmemory: 1GiB\ndevices:\n  - id: 8086:10d3") + (
        "  lan0:\n    cpus: 1\n    memory: 1GiB\n    devices:\n      - id: 8086:10D3\n"
    )
    m = loads(text)
    assert [p.devices[0].value for p in m.partitions.values()] == ["8086:10d3", "8086:10d3"]


def two_with_disks(a: str, b: str) -> str:
    return (
        HEAD
        + f"  fw0:\n    cpus: 1\n    memory: 1GiB\n    disks:\n      - {a}\n"
        + f"  lan0:\n    cpus: 1\n    memory: 1GiB\n    disks:\n      - {b}\n"
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("path: /srv/a.img", "path: /srv/a.img"),
        ("path: /srv/a.img", "{path: /srv//a.img, readonly: true}"),
        ("{path: /srv/a.img, readonly: true}", "path: /srv/./a.img"),
    ],
)
def test_a_written_disk_is_not_shared(a: str, b: str) -> None:
    p = only(two_with_disks(a, b))
    assert p.line == 12 and p.path == "partitions.lan0.disks[0]"
    assert "also a disk of partition fw0 (line 7)" in p.message


def test_a_read_only_disk_may_be_shared() -> None:
    m = loads(two_with_disks("{path: /iso, readonly: true}", "{path: /iso, readonly: true}"))
    assert [p.disks[0].readonly for p in m.partitions.values()] == [True, True]


@pytest.mark.parametrize(
    ("memory", "hugepages", "message"),
    [
        ("0GiB", "2MiB", "must be more than 0"),
        ("3MiB", "2MiB", "3MiB is not a whole number of 2MiB hugepages: use 2MiB or 4MiB"),
        ("1MiB", "2MiB", "use 2MiB,"),
        ("1536MiB", "1GiB", "use 1GiB or 2GiB"),
        ("6KiB", "none", "not a multiple of the 4KiB page size"),
    ],
)
def test_memory_must_be_whole_pages(memory: str, hugepages: str, message: str) -> None:
    p = only(partition(f"cpus: 1\nmemory: {memory}\nhugepages: {hugepages}"))
    assert (p.line, p.column) == (5, 13) and message in p.message, p


def test_memory_in_whole_pages_is_fine() -> None:
    m = loads(partition("cpus: 1\nmemory: 12KiB\nhugepages: none"))
    assert (m.partitions["fw0"].memory_bytes, m.partitions["fw0"].hugepage_bytes) == (12288, None)
    m = loads(partition("cpus: 1\nmemory: 3GiB\nhugepages: 1GiB"))
    assert m.partitions["fw0"].hugepage_bytes == GiB


def test_reserve_memory_may_be_zero_and_takes_sizes() -> None:
    m = loads("version: 1\nhost:\n  reserve:\n    memory: 0GiB\n")
    assert m.host.reserve_memory_bytes == 0
    p = only("version: 1\nhost:\n  reserve:\n    memory: 1.5GiB\n")
    assert (p.line, p.column) == (4, 13)


# -- YAML 1.1 traps ----------------------------------------------------------------------------


def test_yaml_1_1_would_have_spoiled_these() -> None:
    """The traps are real: PyYAML's own SafeLoader reads them as numbers and booleans."""
    spoiled = yaml.safe_load((INPUTS / "yaml11-traps.yaml").read_text())
    assert False in spoiled["partitions"] and True in spoiled["partitions"]
    assert spoiled["partitions"][False]["devices"][0]["pci"] == 81 * 60 + 0.0


def test_yaml_1_1_traps_read_as_written(parser: str) -> None:
    m = load(INPUTS / "yaml11-traps.yaml")
    assert list(m.partitions) == ["no", "on"]
    no = m.partitions["no"]
    assert [(d.kind, d.value) for d in no.devices] == [
        ("pci", "0000:81:00.0"),
        ("pci", "0000:82:00.1"),
        ("id", "8086:10d3"),
        ("netdev", "on"),
    ]
    assert no.order == 8
    assert m.partitions["on"].devices[0].value == "off"


@pytest.mark.parametrize("word", ["yes", "no", "on", "off", "y", "n", "Yes", "OFF"])
def test_yaml_1_1_booleans_are_refused_with_a_hint(word: str) -> None:
    p = only(partition(f"cpus: 1\nmemory: 1GiB\nautostart: {word}"))
    assert f"not `{word}`" in p.message and "not booleans" in p.message


@pytest.mark.parametrize("word", ["true", "True", "TRUE", "false", "False", "FALSE"])
def test_true_and_false_are_booleans(word: str) -> None:
    m = loads(partition(f"cpus: 1\nmemory: 1GiB\nautostart: {word}"))
    assert m.partitions["fw0"].autostart is (word.lower() == "true")


@pytest.mark.parametrize(("written", "value"), [("0x10", "0x10"), ("1_0", "1_0"), ("010", 10)])
def test_only_decimal_digits_are_integers(written: str, value: object) -> None:
    if isinstance(value, int):
        assert (
            loads(partition(f"cpus: 1\nmemory: 1GiB\norder: {written}")).partitions["fw0"].order
            == value
        )
    else:
        p = only(partition(f"cpus: 1\nmemory: 1GiB\norder: {written}"))
        assert f"expected a whole number, not `{value}`" in p.message


# -- defaults ----------------------------------------------------------------------------------


def test_defaults() -> None:
    m = load(INPUTS / "minimal.yaml")
    assert m.host.reserve_cpu_count is None and m.host.reserve_cpu_list is None
    assert m.host.reserve_memory_bytes == GiB
    assert (m.host.smt, m.host.accel) == ("isolate", "kvm")
    fw0 = m.partitions["fw0"]
    assert fw0.hugepage_bytes == 2 * MiB and fw0.numa == "auto" and fw0.firmware == "bios"
    assert fw0.autostart is True and fw0.order == 0
    assert fw0.boot is None and fw0.disks == ()
    [d] = fw0.devices
    assert (d.count, d.required, d.reset_none_ok) == (1, True, False)


def test_defaults_written_out_mean_the_same() -> None:
    a = load(INPUTS / "minimal.yaml")
    b = load(INPUTS / "defaults-explicit.yaml")
    assert without_where(a) == without_where(b)


def test_schema_defaults_match_the_loaders() -> None:
    """The defaults an editor shows (the schema's) are the ones load() applies."""
    s = loader.schema()
    part = s["$defs"]["partition"]["properties"]
    written = "\n".join(
        f"{key}: {json.dumps(part[key]['default'])}"
        for key in ("hugepages", "numa", "firmware", "autostart", "order")
    )
    explicit = loads(partition("cpus: 1\nmemory: 1GiB\n" + written))
    implicit = loads(partition("cpus: 1\nmemory: 1GiB"))
    assert without_where(explicit) == without_where(implicit)
    host = s["properties"]["host"]["properties"]
    explicit = loads(
        "version: 1\nhost:\n"
        f"  smt: {host['smt']['default']}\n  accel: {host['accel']['default']}\n"
        f"  reserve:\n    memory: {host['reserve']['properties']['memory']['default']}\n"
    )
    assert explicit.host == loads("version: 1\n").host


def test_empty_sections_mean_nothing_or_defaults() -> None:
    m = loads("version: 1\nhost:\n  reserve:\npartitions:\n")
    assert m.partitions == {} and m.host == loads("version: 1\n").host
    m = loads(partition("cpus: 1\nmemory: 1GiB\ndevices:\ndisks:"))
    assert (m.partitions["fw0"].devices, m.partitions["fw0"].disks) == ((), ())


def test_everything_written() -> None:
    text = (
        "version: 1\nhost:\n  reserve:\n    cpus: 2\n    memory: 2GiB\n  smt: share\n  accel: tcg\n"
        "partitions:\n  zz:\n    cpus: '4-7'\n    memory: 4GiB\n    hugepages: 1GiB\n"
        "    numa: [1, 0]\n    devices:\n      - pci: 81:00.0\n        required: false\n"
        "        reset: none-ok\n      - id: 10DE:1B80\n        count: 2\n      - netdev: enp3s0\n"
        "    boot:\n      kernel: /k\n      initrd: /i\n      cmdline: console=ttyS0\n"
        "    disks:\n      - path: /d\n        readonly: true\n    firmware: uefi\n"
        "    autostart: false\n    order: -5\n"
        "  aa:\n    cpus: 1\n    memory: 1GiB\n    order: -5\n"
    )
    m = loads(text, "all.yaml")
    assert m.file == "all.yaml"
    assert m.host.reserve_cpu_count == 2 and m.host.reserve_memory_bytes == 2 * GiB
    assert (m.host.smt, m.host.accel) == ("share", "tcg")
    assert list(m.partitions) == ["aa", "zz"]
    zz = m.partitions["zz"]
    assert zz.cpu_list == CpuSet([4, 5, 6, 7]) and zz.cpu_count == 4
    assert zz.numa == (0, 1) and zz.hugepage_bytes == GiB
    assert [(d.kind, d.value, d.count, d.required, d.reset_none_ok) for d in zz.devices] == [
        ("pci", "0000:81:00.0", 1, False, True),
        ("id", "10de:1b80", 2, True, False),
        ("netdev", "enp3s0", 1, True, False),
    ]
    assert zz.boot == Boot("/k", "/i", "console=ttyS0")
    assert zz.disks == (Disk("/d", True),)
    assert (zz.firmware, zz.autostart, zz.order) == ("uefi", False, -5)
    assert (zz.where.line, zz.where.column) == (9, 3)
    assert (zz.devices[1].where.line, zz.devices[1].where.column) == (18, 9)
    assert [p.name for p in m.start_order()] == ["aa", "zz"]


# -- the schema file ---------------------------------------------------------------------------


def test_schema_is_valid_2020_12_and_shipped_through_the_package() -> None:
    link = ROOT / "partitioner" / "site.schema.json"
    assert link.is_symlink() and os.readlink(link) == "../schemas/site.schema.json"
    s = loader.schema()
    assert s == json.loads((ROOT / "schemas" / "site.schema.json").read_text())
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(s)


def _walk(node: Any, where: str) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        out.append((where, node))
        for key, value in node.items():
            out += _walk(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _walk(value, f"{where}/{i}")
    return out


def test_every_property_has_a_description_and_objects_are_closed() -> None:
    checked = 0
    for where, node in _walk(loader.schema(), "#"):
        properties = node.get("properties")
        if isinstance(properties, dict) and not where.endswith("/properties"):
            for name, prop in properties.items():
                description = prop.get("description", "")
                assert len(description) > 20, f"{where}/properties/{name}: no useful description"
                checked += 1
        types = node.get("type")
        if "object" in (types if isinstance(types, list) else [types]):
            assert node.get("additionalProperties") is not True, where
            assert "additionalProperties" in node, f"{where} is open to unknown keys"
    assert checked >= 25


def test_reset_none_ok_is_in_the_schema() -> None:
    reset = loader.schema()["$defs"]["device"]["properties"]["reset"]
    assert reset["enum"] == ["none-ok"] and "reset" in reset["description"]


def test_installed_package_carries_the_schema(tmp_path: Path) -> None:
    """pip install . into a throwaway venv: the symlink arrives as the file, and load() finds it."""
    src = tmp_path / "src"
    files = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT)
    for rel in files.stdout.split("\0"):
        if rel.startswith(("partitioner/", "vfio/")) or rel in (
            "pyproject.toml",
            "schemas/site.schema.json",
        ):
            target = src / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            origin = ROOT / rel
            if origin.is_symlink():
                target.symlink_to(os.readlink(origin))
            elif origin.is_file():
                target.write_bytes(origin.read_bytes())
    (src / "README.md").write_text("partition\n")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    try:
        run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
             "--quiet", "--no-deps", str(src)], timeout=600)  # fmt: skip
    except CommandFailed as e:
        if "No matching distribution" in e.output or "Could not find a version" in e.output:
            pytest.skip(f"no package index to build with: {e.output[-200:]}")
        raise
    site = next((venv / "lib").glob("python3*/site-packages"))
    installed = site / "partitioner" / "site.schema.json"
    assert installed.is_file() and not installed.is_symlink()
    deps = next(Path(p) for p in sys.path if p.endswith("site-packages"))
    probe = (
        "import partitioner, partitioner.manifest.loader as l, sys; "
        f"assert partitioner.__file__.startswith({str(site)!r}), partitioner.__file__; "
        "m = l.load(sys.argv[1]); print(len(l.schema()['$defs']), sorted(m.partitions))"
    )
    out = run(
        [str(venv / "bin" / "python"), "-c", probe, str(ROOT / "partitions" / "demo.yaml")],
        env={"PYTHONPATH": str(deps), "PATH": os.environ.get("PATH", "")},
        cwd=tmp_path,
    )
    assert out.stdout.split() == [str(len(loader.schema()["$defs"])), "['fw0',", "'lan0']"]


# -- fuzzing -----------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def _loads_or_manifest_error(data: str | bytes) -> None:
    try:
        m = loads(data, "fuzz.yaml")
    except ManifestError as e:
        assert e.problems and all(isinstance(p, Problem) for p in e.problems)
        assert all(p.file == "fuzz.yaml" and p.line >= 0 and p.column >= 0 for p in e.problems)
        return
    assert isinstance(m, Manifest)


@FUZZ
@given(st.text())
def test_fuzz_text(text: str) -> None:
    _loads_or_manifest_error(text)


@FUZZ
@given(st.binary())
def test_fuzz_bytes(data: bytes) -> None:
    _loads_or_manifest_error(data)


_TOKENS = [
    "version", "host", "reserve", "cpus", "memory", "smt", "accel", "partitions", "fw0", "no",
    "hugepages", "numa", "devices", "pci", "id", "netdev", "count", "required", "reset", "boot",
    "kernel", "disks", "path", "firmware", "autostart", "order", "1", "0", "-1", "4GiB", "2MiB",
    "1GiB", "none", "auto", "81:00.0", "8086:10d3", "0-3", "7-4", "true", "yes", "~", "none-ok",
    ":", "- ", "  ", "\n", "[", "]", "{", "}", ",", "&a ", "*a", "!!str ", "'", '"', "#", "\t", "---",
]  # fmt: skip


@FUZZ
@given(st.lists(st.sampled_from(_TOKENS), max_size=60))
def test_fuzz_manifest_like_tokens(tokens: list[str]) -> None:
    _loads_or_manifest_error("".join(tokens))


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70000), st.sampled_from(_TOKENS), st.text(max_size=8)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(_TOKENS) | st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=25,
)


@settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    st.fixed_dictionaries(
        {"version": st.sampled_from([1, 1, 2, "1"])},
        optional={
            "host": _values,
            "partitions": st.dictionaries(
                st.sampled_from(["fw0", "lan0", "no", "Bad", "x" * 40]),
                st.dictionaries(st.sampled_from(_TOKENS), _values, max_size=8) | _values,
                max_size=3,
            ),
        },
    )
)
def test_fuzz_structured_documents(doc: dict[str, Any]) -> None:
    text = yaml.safe_dump(doc, allow_unicode=True)
    _loads_or_manifest_error(text)
    # The same document through a YAML 1.1 dumper's quoting must never crash either.
    _loads_or_manifest_error(re.sub(r"'", "", text))


def _read_with(text: str, fast: bool) -> tuple[Any, ...]:
    try:
        doc = yamlnodes.parse(text, "fuzz.yaml", fast=fast)
    except ManifestError:
        return ("refused",)
    if doc is None or doc.root is None:
        return ("empty",)  # where an absent document "starts" is nothing anyone reads
    return (doc.root, doc.values, doc.keys, sorted(map(str, doc.problems)))


@pytest.mark.skipif(not yamlnodes.HAVE_LIBYAML, reason="PyYAML was built without libyaml")
@FUZZ
@given(st.lists(st.sampled_from([t for t in _TOKENS if t != "\t"]), max_size=60))
def test_fuzz_both_parsers_read_the_same(tokens: list[str]) -> None:
    """libyaml (fast) and PyYAML's own parser give the same values at the same places."""
    text = "".join(tokens)
    assert _read_with(text, True) == _read_with(text, False)


@pytest.mark.skipif(not yamlnodes.HAVE_LIBYAML, reason="PyYAML was built without libyaml")
@pytest.mark.parametrize(
    ("text", "quick"),
    [
        (
            "version: 1\npartitions:\n  a: {cpus: 2, memory: 1GiB, devices: [{id: '8086:10d3'}]}\n",
            True,
        ),
        ("version: 1\n# only a comment after\n", True),
        ("version: &v 1\nx: *v\n", False),  # an alias: refused where it stands
        ("version: 1\nx: *nowhere\n", False),  # an alias of nothing
        ("&k version: 1\n*k : 2\n", False),  # an alias as a key
        ("version: 1\nversion: 2\n", False),  # a duplicate key, whose value is not read
        ("? [a]\n: 1\n", False),  # a key that is no name, whose inside is not read
        ("a: " + "[" * 63 + "]" * 63 + "\n", True),  # 64 levels: the deepest allowed
        ("a: " + "[" * 64 + "]" * 64 + "\n", False),  # 65: refused as compose() refuses it
        ("version: 1\n---\nversion: 1\n", False),  # a second document
        ("version: [1\n", False),  # not YAML
    ],
)
def test_libyamls_composer_reads_plain_documents_and_hands_the_rest_over(
    monkeypatch: pytest.MonkeyPatch, text: str, quick: bool
) -> None:
    """A plain document is composed by libyaml itself (half the time of composing its events
    in Python, which a site of thousands of partitions feels); what only the project's own
    composer says as the project does goes through it, and reads as it always did."""
    monkeypatch.setattr(yamlnodes, "USE_LIBYAML", True)
    real, composed = yamlnodes.compose, []

    def compose(*args: Any, **kwargs: Any) -> Any:
        composed.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(yamlnodes, "compose", compose)
    got = _read_with(text, True)
    assert bool(composed) is not quick
    monkeypatch.setattr(yamlnodes, "compose", real)

    def never(text: str) -> None:
        raise yamlnodes._Retry

    monkeypatch.setattr(yamlnodes, "_compose_quickly", never)
    assert got == _read_with(text, True)  # the same as compose() alone reads it


def test_a_document_that_passed_the_schema_is_not_checked_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from partitioner.manifest import loader

    monkeypatch.setenv("PARTITION_CACHE_DIR", str(tmp_path))
    good = "version: 1\npartitions:\n  a: {cpus: 2, memory: 1GiB}\n"
    bad = "version: 1\npartitions:\n  a: {cpus: 2, memroy: 1GiB}\n"
    loads(good, "good.yaml")
    assert len(list((tmp_path / "valid").iterdir())) == 1
    with pytest.raises(ManifestError):
        loads(bad, "bad.yaml")
    assert len(list((tmp_path / "valid").iterdir())) == 1  # failures are never remembered

    def no_schema() -> None:
        raise AssertionError("the schema was consulted")

    monkeypatch.setattr(loader, "_validator", no_schema)
    assert loads(good, "good.yaml").partitions["a"].cpu_count == 2
    # a document not seen before is checked, whatever it resembles
    with pytest.raises(AssertionError, match="consulted"):
        loads(good.replace("2", "4"), "other.yaml")


def test_the_schema_checks_each_kind_of_partition_entry_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A site of 300 partitions of two kinds asks the schema about two entries, not 300; a
    problem anywhere still gets every partition's own located report."""
    from partitioner.manifest import loader

    monkeypatch.setenv("PARTITION_CACHE_DIR", str(tmp_path / "not-a-dir"))
    (tmp_path / "not-a-dir").write_text("")  # passes cannot be remembered: every load checks
    seen: list[int] = []
    real = loader._validator()

    class Counting:
        def iter_errors(self, instance: Any) -> Any:
            seen.append(len(instance.get("partitions") or {}))
            return real.iter_errors(instance)

    monkeypatch.setattr(loader, "_validator", lambda: Counting())
    lines = ["version: 1", "partitions:"]
    for i in range(300):
        more = ", hugepages: none" if i % 2 else ""
        lines.append(f"  p{i:03d}: {{cpus: 2, memory: 1GiB{more}}}")
    site = "\n".join(lines) + "\n"
    m = loads(site, "big.yaml")
    assert len(m.partitions) == 300
    assert seen == [2], seen
    # Three entries of one kind wrong, and a bad name: each reported where it stands.
    bad = site.replace("p010: {cpus: 2, memory", "p010: {cpus: 2, memroy")
    bad = bad.replace("p020: {cpus: 2, memory", "p020: {cpus: 2, memroy")
    bad = bad.replace("p030: {cpus: 2, memory", "p030: {cpus: 2, memroy")
    bad = bad.replace("p040:", "P040:")
    with pytest.raises(ManifestError) as e:
        loads(bad, "bad.yaml")
    shown = [(p.line, p.message) for p in e.value.problems]
    for n in (10, 20, 30):
        assert any(line == n + 3 and "unknown key `memroy`" in msg for line, msg in shown), shown
    assert any(line == 43 and "P040" in msg for line, msg in shown), shown
