"""``partition inspect`` at 100 columns (docs/cli.md, "inspect at 100 columns"): the table
fits the width, its verdict is one short word per row, the device is named by udev's
hardware database where the tree kept its names, the reasons are said once per group
below, and ``COLUMNS`` sets the width."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from partitioner.cli.main import main
from partitioner.kernel.root import SNAPSHOT_HWDB, HostRoot

FIXTURE = Path(__file__).parent / "fixtures" / "hosts" / "testbed-numa"
LARGE = "32em64t-2n8c+dax+nvme+mic+dimms"  # the corpus host with the most PCI functions
SHORT = re.compile(r"(yes|none-ok)(\+\d+)?\*?|no(:(bridge|chipset|nogroup|host|group))?")


@pytest.fixture(autouse=True)
def no_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)


def inspect(capsys: pytest.CaptureFixture[str], root: Path) -> tuple[str, dict[str, Any]]:
    assert main(["--host-root", str(root), "inspect"]) == 0
    out = capsys.readouterr().out
    assert main(["--host-root", str(root), "--json", "inspect"]) == 0
    return out, json.loads(capsys.readouterr().out)


def with_names(tmp_path: Path) -> Path:
    """The fixture as `partition snapshot` keeps it now: with the names udev's hardware
    database (this machine's, the real one) gives its functions."""
    root = tmp_path / "host"
    shutil.copytree(FIXTURE, root, symlinks=True)
    live = HostRoot("/")
    entries = []
    for dev in sorted((root / "sys/bus/pci/devices").iterdir()):
        vendor = (dev / "vendor").read_text().strip()[2:].upper()
        device = (dev / "device").read_text().strip()[2:].upper()
        alias = f"pci:v0000{vendor}d0000{device}"
        names = live.hwdb(alias)
        if names:
            props = "".join(f" {k}={v}\n" for k, v in sorted(names.items()))
            entries.append(f"{alias}*\n{props}")
    assert entries, "no /usr/lib/udev/hwdb.bin: run scripts/setup (systemd-hwdb --usr update)"
    hwdb = root / SNAPSHOT_HWDB.lstrip("/")
    hwdb.parent.mkdir(parents=True, exist_ok=True)
    hwdb.write_text("\n".join(sorted(set(entries))))
    return root


def rows_of(out: str, doc: dict[str, Any]) -> dict[str, str]:
    rows = {line.split()[0]: line for line in out.splitlines() if re.match(r"[0-9a-f]{4}:", line)}
    assert sorted(rows) == sorted(f["address"] for f in doc["pci"]), "one line per function"
    return rows


def test_the_fixture_fits_100_columns_with_udevs_names(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    root = with_names(tmp_path)
    out, doc = inspect(capsys, root)
    assert max(len(line) for line in out.splitlines()) <= 100
    rows = rows_of(out, doc)
    # The names of the JSON, in the table (cut to the room left, never wrapped).
    nic = next(f for f in doc["pci"] if f["address"] == "0000:41:00.0")
    assert nic["vendor_name"] == "Intel Corporation"
    assert "Intel 82574L Gigabit" in rows["0000:41:00.0"]
    # The verdict: one short word, the row's last, from docs/cli.md's list.
    for row in rows.values():
        assert SHORT.fullmatch(row.split()[-1]), row
    assert rows["0000:42:00.0"].endswith(" yes+1")
    assert rows["0000:86:00.0"].endswith(" no:bridge")
    assert rows["0000:87:01.0"].endswith(" no:group")
    assert rows["0000:00:1f.2"].endswith(" none-ok+1")
    assert rows["0000:00:18.0"].endswith(" no:host")  # the root filesystem's 9p transport
    # The reasons once per group, below the table.
    assert out.count("IOMMU group 16 (") == 1 and out.count("is bound to shpchp") == 1
    assert out.index("IOMMU group 16 (") > out.index("0000:87:02.0")
    # Wider: the names whole.
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as m:
        m.setenv("COLUMNS", "200")
        assert main(["--host-root", str(root), "inspect"]) == 0
    wide = capsys.readouterr().out
    assert "Intel 82574L Gigabit Network Connection" in wide
    assert max(len(line) for line in wide.splitlines()) > 100


@pytest.mark.parametrize("columns", [None, "80", "120"])
def test_a_large_corpus_host_fits_the_width(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    hwloc_trees: Any,
    columns: str | None,
) -> None:
    if columns is not None:
        monkeypatch.setenv("COLUMNS", columns)
    out, doc = inspect(capsys, hwloc_trees[LARGE])
    assert len(doc["pci"]) > 100
    width = int(columns or 100)
    assert max(len(line) for line in out.splitlines()) <= width
    for row in rows_of(out, doc).values():
        assert SHORT.fullmatch(row.split()[-1]), row


def test_a_terminal_that_does_not_know_its_size_gets_the_default_width() -> None:
    """A serial console (the emulated server's) or an unsized pty says 0 columns: no width."""
    import os
    import pty
    import subprocess
    import sys

    from partitioner.cli.inspect import DEFAULT_WIDTH, MIN_WIDTH, table_width

    leader, follower = pty.openpty()
    try:
        with os.fdopen(os.dup(follower), "w") as tty:
            assert os.get_terminal_size(tty.fileno()).columns == 0
            assert table_width({}, tty) == DEFAULT_WIDTH
            assert table_width({"COLUMNS": "3"}, tty) == MIN_WIDTH
        # The whole verb on that terminal: a table, not a traceback.  The terminal is read
        # while the verb writes, so a long table never fills it.
        proc = subprocess.Popen(
            [sys.executable, "-m", "partitioner.cli.main", "--host-root", str(FIXTURE), "inspect"],
            stdout=follower, stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": ""},
        )  # fmt: skip
        os.close(follower)
        follower = -1
        out = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the verb has closed its end
                break
            if not chunk:
                break
            out += chunk
        err = proc.stderr.read() if proc.stderr else b""
        rc = proc.wait(timeout=120)
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    assert rc == 0, err.decode()
    assert b"Traceback" not in err
    assert b"0000:00:18.0" in out
