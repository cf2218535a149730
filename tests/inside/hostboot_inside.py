"""The emulated server booted with what `partition host setup` compiled for a site: run INSIDE it
by tests/test_hostboot_testbed.py, in a boot of its own (the kernel arguments are the test).

Not named test_*: tests/test_inside.py's shared boot (without these arguments) must not
collect it.  The host-side test writes ``$TESTBED_OUT/expect.json`` (the compiled settings)
and runs the compiled initramfs script (init-top) before this module, as the initramfs does
before udev loads drivers; the ``nic_drivers`` fixture then loads e1000e as udev would.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from partitioner.cpuset import CpuSet
from partitioner.kernel.root import HostRoot
from partitioner.run import run

OUT = Path(os.environ.get("TESTBED_OUT", "/run/testbed-out"))
PROJECT = Path(__file__).resolve().parents[2]
SITE = PROJECT / "tests" / "manifests" / "hostboot-numa.yaml"
ROOT = HostRoot("/")

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or not (OUT / "expect.json").exists(),
        reason="runs inside the emulated server booted by tests/test_hostboot_testbed.py",
    ),
    pytest.mark.usefixtures("nic_drivers"),
]


@pytest.fixture(scope="module")
def expect() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((OUT / "expect.json").read_text())
    return doc


def partition(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    cp = run(
        [sys.executable, "-m", "partitioner.cli.main", *argv], check=False, env=env, timeout=900
    )
    return cp.returncode, cp.stdout


def test_kernel_booted_with_the_compiled_arguments(expect: dict[str, Any]) -> None:
    cmdline = shlex.split(ROOT.read("/proc/cmdline") or "")
    missing = [a for a in expect["kernel_args"] if a not in cmdline]
    assert not missing, f"not on /proc/cmdline: {missing}"


def test_isolated_and_nohz_full_hold_exactly_the_partitions_cpus(expect: dict[str, Any]) -> None:
    want = CpuSet(expect["partition_cpus"])
    assert want  # the site isolates something
    assert CpuSet.parse(ROOT.read("/sys/devices/system/cpu/isolated") or "") == want
    assert CpuSet.parse(ROOT.read("/sys/devices/system/cpu/nohz_full") or "") == want


def test_each_nodes_pools_hold_the_compiled_pages(expect: dict[str, Any]) -> None:
    sizes = set()
    for size, nodes in expect["hugepages"].items():
        sizes.add(int(size))
        for node, count in nodes.items():
            path = f"/sys/devices/system/node/node{node}/hugepages/hugepages-{int(size) // 1024}kB/nr_hugepages"
            # The test bed reserves no pages of its own in this boot: these are the site's.
            assert ROOT.read_int(path) == count, path
    assert 1024**3 in sizes  # 1 GiB pages, reserved at boot


def test_site_devices_never_met_their_host_driver(expect: dict[str, Any]) -> None:
    log = run(["dmesg"], timeout=60).stdout
    site = expect["devices"]
    assert site
    for addr in site:
        assert ROOT.readlink_name(f"/sys/bus/pci/devices/{addr}/driver") == "vfio-pci", addr
        assert ROOT.read(f"/sys/bus/pci/devices/{addr}/driver_override") == "vfio-pci"
        assert f"e1000e {addr}" not in log, f"e1000e probed {addr}"
    # e1000e is loaded and took every other e1000e NIC: it would have taken these too.
    others = [
        d
        for d in ROOT.listdir("/sys/bus/pci/devices")
        if d not in site and ROOT.read(f"/sys/bus/pci/devices/{d}/device") == "0x10d3"
    ]
    assert others
    for d in others:
        assert ROOT.readlink_name(f"/sys/bus/pci/devices/{d}/driver") == "e1000e", d
        assert f"e1000e {d}" in log


def test_host_check_passes_for_the_site() -> None:
    rc, out = partition("--json", "host", "check", str(SITE), "--no-probe")
    doc = json.loads(out)
    assert rc == 0, doc["problems"]
    assert doc["missing_kernel_args"] == []


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = dict(os.environ)
    env.update(
        PARTITION_STATE_DIR=str(tmp_path / "state"),
        PARTITION_RUN_DIR=str(tmp_path / "run"),
        PARTITION_LOG_DIR=str(tmp_path / "log"),
    )
    yield env
    run(
        [sys.executable, "-m", "partitioner.cli.main", "destroy", "--all"],
        env=env,
        check=False,
        timeout=600,
    )


def pools() -> dict[str, int]:
    out = {}
    for node in ROOT.listdir("/sys/devices/system/node"):
        if not node.startswith("node"):
            continue
        for size in ROOT.listdir(f"/sys/devices/system/node/{node}/hugepages"):
            out[f"{node}/{size}"] = (
                ROOT.read_int(f"/sys/devices/system/node/{node}/hugepages/{size}/nr_hugepages", -1)
                or 0
            )
    return out


def test_apply_starts_the_site_without_raising_a_pool(dirs: dict[str, str]) -> None:
    before = pools()
    rc, out = partition("apply", str(SITE), env=dirs)
    assert rc == 0, out
    assert pools() == before
    rc, out = partition("--json", "status", env=dirs)
    assert rc == 0, out
    status = json.loads(out)["partitions"]
    assert {n: p["state"] for n, p in status.items()} == {"fw0": "running", "lan0": "running"}
    assert all(p["hugepages_added"] == [] for p in status.values())
    rc, out = partition("destroy", str(SITE), env=dirs)
    assert rc == 0, out
    assert pools() == before
