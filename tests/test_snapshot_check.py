"""Plans and checks of another machine's snapshot (`--host-root`): what this machine lacks, or
the snapshot does not hold, is said, never taken for the other machine's failure."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from partitioner.cli.main import main
from partitioner.guest.caps import OVMF_CANDIDATES

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "fixtures" / "hosts" / "testbed-numa"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_plan_qemu_of_a_snapshot_prints_uefi_command_lines_without_firmware_here(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: scripts/setup installs qemu-system-x86")
    if any(os.path.isfile(code) for code, _ in OVMF_CANDIDATES):
        pytest.skip("OVMF is installed on this machine: nothing is missing here")
    site = tmp_path / "site.yaml"
    site.write_text(
        "version: 1\n"
        'host: {reserve: {cpus: "0-1", memory: 256MiB}, accel: tcg}\n'
        "partitions:\n"
        '  u0: {cpus: "2-3", memory: 128MiB, hugepages: none, firmware: uefi}\n'
    )
    rc, out, err = run(capsys, "--host-root", str(SNAPSHOT), "plan", "--qemu", str(site))
    assert rc == 0, err
    code = OVMF_CANDIDATES[0][0]
    line = next(ln for ln in out.splitlines() if ln.startswith("u0: "))
    assert "qemu-system-x86_64" in line and f"file={code}" in line, line
    assert "the UEFI firmware is not installed on this machine" in out + err
    rc, out, err = run(capsys, "--host-root", str(SNAPSHOT), "--json", "plan", str(site))
    doc = json.loads(out)
    argv = doc["partitions"]["u0"]["qemu_argv"]
    assert argv is not None and any(code in a for a in argv)
