"""Hostile manifests: never a traceback, a hang or a wrong yes (issue 8, section 2).

Each case goes through the command line in-process (``validate``, and ``plan``
against the emulated server's snapshot) and must give the exit code of cli.md
(2: the manifest is not valid; 3: it does not fit this host), a message
located at ``FILE:LINE:COL``, and no traceback.  Every case passed (or hung)
before these checks existed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from partitioner.cli.main import main
from partitioner.cpuset import MAX_CPUS, CpuListSyntaxError, CpuSet

TESTBED_NUMA = Path(__file__).resolve().parent / "fixtures" / "hosts" / "testbed-numa"

HEAD = "version: 1\nhost: {reserve: {cpus: 1}, smt: share, accel: tcg, isolation: pinned}\n"


def part(extra: str = "") -> str:
    return "partitions:\n  fw0: {cpus: 1, memory: 64MiB, hugepages: none" + extra + "}\n"


# (id, manifest text, line, what the message says)
INVALID = [
    # names, ids and interface names that end in a newline become file and unit names
    ("name ends in a newline", HEAD + 'partitions:\n  "fw0\\n": {cpus: 1, memory: 64MiB}\n', 4,
     r"partitions\.fw0\\n: expected a partition name"),
    ("id ends in a newline", HEAD + part(', devices: [{id: "8086:10d3\\n"}]'), 4,
     r"devices\[0\]\.id: expected a vendor:device id .*not `8086:10d3\\n`"),
    ("netdev ends in a newline", HEAD + part(', devices: [{netdev: "eth0\\n"}]'), 4,
     r"devices\[0\]\.netdev: expected a network interface name"),
    ("pci ends in a newline", HEAD + part(', devices: [{pci: "81:00.0\\n"}]'), 4,
     r"devices\[0\]\.pci: expected a PCI address"),
    ("memory ends in a newline", HEAD + 'partitions:\n  fw0: {cpus: 1, memory: "64MiB\\n"}\n', 4,
     r"fw0\.memory: expected a size"),
    ("cpu list ends in a newline", HEAD + 'partitions:\n  fw0: {cpus: "2-3\\n", memory: 64MiB}\n',
     4, r"fw0\.cpus: expected a number of CPUs"),
    # NUL in whatever becomes a path, an argument or a command line
    ("NUL in the kernel path", HEAD + part(', boot: {kernel: "/boot/vm\\0linuz"}'), 4,
     r"boot\.kernel: expected text without NUL bytes"),
    ("NUL in the initrd path", HEAD + part(', boot: {kernel: /k, initrd: "/i\\0"}'), 4,
     r"boot\.initrd: expected text without NUL bytes"),
    ("NUL in the command line", HEAD + part(', boot: {kernel: /k, cmdline: "console=ttyS0\\0"}'),
     4, r"boot\.cmdline: expected text without NUL bytes"),
    ("NUL in a disk path", HEAD + part(', disks: [{path: "/var/lib/a\\0.img"}]'), 4,
     r"disks\[0\]\.path: expected text without NUL bytes"),
    ("NUL in an interface name", HEAD + part(', devices: [{netdev: "eth\\0"}]'), 4,
     r"devices\[0\]\.netdev: expected a network interface name"),
    # a CPU list whose items name far more CPUs than Linux can have: bounded by its text
    ("cpu list of 10000 ranges",
     HEAD + 'partitions:\n  fw0: {cpus: "' + ",".join(["0-8191"] * 10000) + '", memory: 64MiB}\n',
     4, r"fw0\.cpus: CPU list .* has 10000 items, more than the 8192 CPUs"),
]  # fmt: skip


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(autouse=True)
def _own_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("STATE", "RUN", "LOG", "CACHE"):
        monkeypatch.setenv(f"PARTITION_{var}_DIR", str(tmp_path / var.lower()))


@pytest.mark.parametrize(
    ("text", "line", "said"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_manifest_is_exit_2_located(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, line: int, said: str
) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(text)
    for argv in (
        ["validate", str(site)],
        ["--host-root", str(TESTBED_NUMA), "plan", str(site)],
    ):
        rc, out, err = run(capsys, *argv)
        assert rc == 2, (argv, out, err)
        assert "Traceback" not in err
        assert re.search(rf"^{re.escape(str(site))}:{line}:\d+: .*{said}", err, re.M), err
        # One message stays one line: the newline or NUL is shown escaped.
        assert all(x.startswith((str(site), "partition: ")) for x in err.strip().splitlines())
    rc, out, _ = run(capsys, "--json", "validate", str(site))
    doc = json.loads(out)
    assert rc == 2 and doc["valid"] is False and doc["problems"][0]["line"] == line


def test_a_million_ranges_are_refused_without_expanding() -> None:
    # 7MB of text: CpuSet.parse says no after counting the items, before reading a number.
    with pytest.raises(CpuListSyntaxError, match="1000000 items"):
        CpuSet.parse(",".join(["0-8191"] * 1_000_000))
    with pytest.raises(CpuListSyntaxError, match="beyond what Linux supports"):
        CpuSet.parse("0-4000000000")
    # A long list that is still a list of CPUs gives them, once each.
    assert len(CpuSet.parse(",".join(["0-8191"] * MAX_CPUS))) == MAX_CPUS


def plan_of(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, *, live: bool = False
) -> tuple[Path, int, str, str]:
    site = tmp_path / "site.yaml"
    site.write_text(text)
    root = () if live else ("--host-root", str(TESTBED_NUMA))
    rc, out, err = run(capsys, *root, "plan", str(site))
    assert "Traceback" not in err
    return site, rc, out, err


def test_reserve_memory_larger_than_the_host_is_exit_3_with_the_sizes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    text = "version: 1\nhost:\n  reserve: {cpus: 1, memory: 64GiB}\n  accel: tcg\npartitions: {}\n"
    site, rc, out, err = plan_of(capsys, tmp_path, text)
    assert rc == 3 and out == ""
    # the snapshot's two nodes hold 2GiB in all
    assert re.search(
        rf"^partition: {re.escape(str(site))}:3:30: host.reserve.memory is 64GiB but this host has "
        r"[0-9.]+[GM]iB of memory in all",
        err,
        re.M,
    ), err


def test_files_handed_to_qemu_must_exist_and_be_readable(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\x7fELF")
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    text = (
        HEAD + "partitions:\n"
        f"  a: {{cpus: 1, memory: 64MiB, hugepages: none, boot: {{kernel: {kernel}}}, "
        f"disks: [{{path: {disk}}}]}}\n"
        "  b:\n    cpus: 1\n    memory: 64MiB\n    hugepages: none\n"
        f"    boot:\n      kernel: {tmp_path}/missing\n      initrd: {tmp_path}\n"
        f"    disks:\n      - path: {fifo}\n"
    )
    # On this machine, where QEMU would open them: exit 3 (whatever else does not fit).
    site, rc, out, err = plan_of(capsys, tmp_path, text, live=True)
    assert rc == 3 and out == "", err
    missing = (
        f"{site}:10:15: partitions.b.boot.kernel {tmp_path}/missing: no such file on this machine"
    )
    assert f"partition: {missing}\n" in err
    assert f"{site}:11:15: partitions.b.boot.initrd {tmp_path}: is a directory" in err
    assert f"{site}:13:15: partitions.b.disks[0].path {fifo}: is not a regular file" in err
    assert "partitions.a" not in err  # a's files are there
    # A plan for another machine (--host-root) cannot see its files: notes, not problems.
    _, rc, out, err = plan_of(capsys, tmp_path, text)
    assert rc == 0 and "fw0" not in err, err
    assert f"partition: note: {missing} (not checked" in err


def test_apply_checks_the_files_as_plan_does(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # On this machine (apply reads the live host), nothing is changed: a dry run.
    site = tmp_path / "site.yaml"
    site.write_text(HEAD + part(f", boot: {{kernel: {tmp_path}/no-kernel}}"))
    rc, out, err = run(capsys, "apply", "--dry-run", str(site))
    assert rc == 3 and out == "" and "Traceback" not in err, err
    assert (
        f"{site}:4:" in err and f"partitions.fw0.boot.kernel {tmp_path}/no-kernel: no such" in err
    )
