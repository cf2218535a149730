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


# -- host check of a tree: what it does not hold is unknown ---------------------------------

# The site the test bed was booted for: TCG, `isolation: pinned` (no isolcpus needed), the
# 2 MiB pools its command line reserves on both nodes (hugepages=0:64,1:64).
PINNED_TCG = (
    "version: 1\n"
    'host: {reserve: {cpus: "0-1", memory: 256MiB}, accel: tcg, isolation: pinned}\n'
    "partitions:\n"
    '  t0: {cpus: "2-3", memory: 128MiB, hugepages: 2MiB}\n'
    '  t1: {cpus: "6-7", memory: 128MiB, hugepages: 2MiB}\n'
)
FULL_TCG = PINNED_TCG.replace("isolation: pinned", "isolation: full")


def check(
    capsys: pytest.CaptureFixture[str], root: Path, *site: str
) -> tuple[int, dict[str, dict[str, object]]]:
    rc, out, err = run(capsys, "--host-root", str(root), "--json", "host", "check", *site)
    doc = json.loads(out)
    assert doc["exit"] == rc, err
    return rc, {i["id"]: i for i in doc["items"]}


def copy_of_snapshot(tmp_path: Path) -> Path:
    dest = tmp_path / "host"
    shutil.copytree(SNAPSHOT, dest, symlinks=True)
    return dest


def test_host_check_of_the_shipped_snapshot_fails_only_for_what_the_test_bed_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(PINNED_TCG)
    rc, items = check(capsys, SNAPSHOT, str(site))
    assert rc == 0, items
    assert {str(i["status"]) for i in items.values()} <= {"pass", "warn", "unknown"}
    # What the refreshed snapshot holds is read, not guessed.
    assert items["iommu"]["detail"] == "enabled (dmar0)"
    assert items["interrupt-remapping"]["status"] == "pass"
    assert items["init"]["status"] == "pass" and "init (not systemd)" in str(
        items["init"]["detail"]
    )
    assert items["cgroup-cpuset"]["status"] == "pass"
    assert items["site-cmdline"]["status"] == "pass"
    assert items["site-hugepages-2MiB-node0"]["status"] == "pass"
    # Without a site, the test bed is what it is: a TCG machine with no KVM (an empty dev/).
    rc, items = check(capsys, SNAPSHOT)
    assert rc == 3
    assert sorted(k for k, i in items.items() if i["status"] == "fail") == ["cpu-virt", "kvm"]


def test_a_tree_without_dev_does_not_say_whether_kvm_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = copy_of_snapshot(tmp_path)
    shutil.rmtree(root / "dev")
    rc, items = check(capsys, root)
    assert items["kvm"]["status"] == "unknown", items["kvm"]
    # Neither vmx nor svm, and no word on /dev/kvm (a paravirtualized KVM hides them).
    assert items["cpu-virt"]["status"] == "unknown", items["cpu-virt"]
    assert rc == 0
    rc, out, _ = run(capsys, "--host-root", str(root), "host", "check")
    assert rc == 0
    assert any(ln.startswith("UNKNOWN  /dev/kvm") for ln in out.splitlines()), out
    assert "2 unknown (not in the host tree)" in out
    # An empty dev/ (as a snapshot of a machine without KVM makes it) says "absent".
    (root / "dev").mkdir()
    rc, items = check(capsys, root)
    assert rc == 3 and items["kvm"]["status"] == "fail"


def test_what_a_tree_lacks_is_unknown_not_a_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = copy_of_snapshot(tmp_path)
    for path in (
        "proc/cpuinfo",
        "proc/interrupts",
        "proc/1/comm",
        "proc/self/mountinfo",
        "proc/cmdline",
        "sys/devices/system/cpu/isolated",
        "sys/devices/system/cpu/nohz_full",
        "sys/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages",
    ):
        (root / path).unlink()
    site = tmp_path / "site.yaml"
    site.write_text(FULL_TCG)
    rc, items = check(capsys, root, str(site))
    unknown = {k for k, i in items.items() if i["status"] == "unknown"}
    assert unknown >= {
        "cpu-virt",
        "interrupt-remapping",
        "init",
        "cgroup-cpuset",
        "site-cmdline",
        "site-isolated-cpus",
        "site-nohz-full",
        "site-hugepages-2MiB-node0",
    }, items
    assert not [k for k, i in items.items() if i["status"] == "fail"], items
    assert rc == 0
    # A node that lists its pools without this size has none of it: that is known.
    shutil.rmtree(root / "sys/devices/system/node/node0/hugepages/hugepages-2048kB")
    (root / "sys/devices/system/node/node0/hugepages/hugepages-1048576kB").mkdir()
    rc, items = check(capsys, root, str(site))
    assert rc == 3 and items["site-hugepages-2MiB-node0"]["status"] == "fail"
