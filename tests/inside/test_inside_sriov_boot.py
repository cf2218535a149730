"""The boot-time proof for SR-IOV: run INSIDE the ``sriov`` server that tests/test_inside.py
booted with the kernel arguments ``partition host setup`` compiled for
tests/manifests/hostboot-sriov.yaml (its files in ``$TESTBED_OUT/sriov-boot/setup.json``).

The server has no udev: nothing has loaded a NIC driver when this module starts, as in
the initramfs.  Here the PF's driver (igb) is loaded as udev would load it, with igbvf
loaded before it (with autoprobe on, it would take every VF the moment it appears); then
the compiled udev rule's command runs, as udev runs it on the PF's ``bind`` event.  The
server then has the site's VFs: the count, the site's VFs on vfio-pci by address with
the MAC and VLAN the site gives them, and no host driver ever probed a VF (the kernel log
holds no word of igbvf about any of them).  ``partition host check`` says so.  At the end
the PF is put back as the boot found it, for test_inside_sriov.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from partitioner.kernel.root import HostRoot
from partitioner.run import run
from partitioner.vfio.claim import current_driver

OUT = Path(os.environ.get("TESTBED_OUT", "/run/testbed-out")) / "sriov-boot"
PROJECT = Path(__file__).resolve().parents[2]
SITE = PROJECT / "tests" / "manifests" / "hostboot-sriov.yaml"
SCRIPT = "/etc/partition/sriov-vfs"
RULES = "/etc/udev/rules.d/70-partition-sriov.rules"
ROOT = HostRoot("/")

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or not (OUT / "setup.json").exists(),
        reason="runs inside the sriov server booted by tests/test_inside.py",
    ),
    pytest.mark.incremental,
]


def dev(addr: str, leaf: str = "") -> Path:
    return Path("/sys/bus/pci/devices") / addr / leaf


def read(addr: str, leaf: str) -> str:
    return dev(addr, leaf).read_text().strip()


@dataclass
class Booted:
    setup: dict[str, Any]
    pf: str
    netdev: str
    vfs: int
    site: dict[str, dict[str, Any]]  # VF address -> its entry (index, partition, settings)
    log_before: int  # kernel log lines before the PF's driver was loaded
    ran: str  # what the rule's command said


def rule_command(rules: str, pf: str, driver: str) -> list[str]:
    """The RUN of the rule that matches a ``bind`` of ``pf`` by ``driver``, as udev reads it."""
    for line in rules.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        keys = dict(re.findall(r'(\w+(?:\{\w+\})?)(?:==|!=|\+=|=)"([^"]*)"', line))
        if keys.get("KERNEL") != pf or "bind" not in keys.get("ACTION", "").split("|"):
            continue
        assert keys.get("SUBSYSTEM") == "pci" and driver != "vfio-pci", line
        return shlex.split(keys["RUN"])
    raise AssertionError(f"no rule of {RULES} runs for {pf}:\n{rules}")


@pytest.fixture(scope="module")
def booted() -> Iterator[Booted]:
    setup: dict[str, Any] = json.loads((OUT / "setup.json").read_text())
    files = {f["path"]: f["content"] for f in setup["files"]}
    (pf_doc,) = setup["sriov"]
    pf = pf_doc["pf"]
    assert not os.path.exists("/sys/module/igb"), "a NIC driver is loaded already (no udev here)"
    assert read(pf, "sriov_numvfs") == "0"
    script = OUT / "sriov-vfs"
    script.write_text(files[SCRIPT])
    script.chmod(0o755)
    log_before = len(run(["dmesg"], timeout=60).stdout.splitlines())
    # What udev does at boot: the VF driver is there first (worst case), then the PF's
    # driver binds the PF; the bind event runs the rule.
    run(["modprobe", "igbvf"], timeout=120)
    run(["modprobe", "igb"], timeout=120)
    deadline = time.monotonic() + 60
    while not dev(pf, "net").is_dir() or not os.listdir(dev(pf, "net")):
        assert time.monotonic() < deadline, f"igb made no interface for {pf}"
        time.sleep(0.2)
    driver = os.path.basename(os.readlink(dev(pf, "driver")))
    argv = rule_command(files[RULES], pf, driver)
    assert argv[0] == SCRIPT
    cp = run([str(script), *argv[1:]], timeout=300, check=False)
    assert cp.returncode == 0, cp.stdout
    site = {v["address"]: v for v in pf_doc["site_vfs"]}
    yield Booted(
        setup,
        pf,
        os.listdir(dev(pf, "net"))[0],
        pf_doc["vfs"],
        site,
        log_before,
        cp.stdout,
    )
    # The PF as the boot found it, for the next module.
    for i in range(int(read(pf, "sriov_numvfs"))):
        vf = os.path.basename(os.readlink(dev(pf, f"virtfn{i}")))
        if current_driver(ROOT, vf) is not None:
            dev(vf, "driver/unbind").write_text(vf)
        dev(vf, "driver_override").write_text("\n")
    dev(pf, "sriov_numvfs").write_text("0")
    dev(pf, "sriov_drivers_autoprobe").write_text("1")
    for m in ("igbvf", "igb"):
        run(["modprobe", "-r", m], timeout=120, check=False)


def test_the_kernel_was_booted_with_the_compiled_arguments(booted: Booted) -> None:
    cmdline = shlex.split(ROOT.read("/proc/cmdline") or "")
    missing = [a for a in booted.setup["kernel_args"] if a not in cmdline]
    assert not missing, f"not on /proc/cmdline: {missing}"


def test_the_pf_has_the_vfs_made_with_autoprobe_off(booted: Booted) -> None:
    assert read(booted.pf, "sriov_numvfs") == str(booted.vfs)
    assert read(booted.pf, "sriov_drivers_autoprobe") == "0"
    assert f"{booted.pf}: {booted.vfs} VFs made, host drivers kept off them" in booted.ran


def test_the_sites_vfs_are_on_vfio_pci_and_the_others_on_nothing(booted: Booted) -> None:
    vfs = [os.path.basename(os.readlink(dev(booted.pf, f"virtfn{i}"))) for i in range(booted.vfs)]
    assert set(booted.site) < set(vfs)
    for i, vf in enumerate(vfs):
        if vf in booted.site:
            assert booted.site[vf]["index"] == i
            assert current_driver(ROOT, vf) == "vfio-pci", vf
            assert read(vf, "driver_override") == "vfio-pci"
        else:
            assert current_driver(ROOT, vf) is None, vf


def test_no_host_driver_ever_probed_a_vf(booted: Booted) -> None:
    """igbvf was loaded before the VFs were made: with autoprobe on it would have bound
    each and said so in the kernel log (``igbvf ADDRESS: ...``)."""
    assert os.path.isdir("/sys/bus/pci/drivers/igbvf")
    assert not [e for e in os.listdir("/sys/bus/pci/drivers/igbvf") if e.startswith("0000:")]
    log = run(["dmesg"], timeout=60).stdout.splitlines()[booted.log_before :]
    vfs = [os.path.basename(os.readlink(dev(booted.pf, f"virtfn{i}"))) for i in range(booted.vfs)]
    said = [ln for ln in log if "igbvf" in ln and any(vf in ln for vf in vfs)]
    assert not said, said


def test_the_pf_shows_each_site_vfs_mac_and_vlan(booted: Booted) -> None:
    shown = run(["ip", "-d", "link", "show", "dev", booted.netdev], timeout=60).stdout
    lines = {int(m[0]): m[1] for m in re.findall(r"^\s*vf (\d+)\s+(.*)$", shown, re.M)}
    for v in booted.site.values():
        s = v["settings"]
        assert f"link/ether {s['mac']}" in lines[v["index"]], shown
        assert f"vlan {s['vlan']}" in lines[v["index"]], shown


def test_host_check_passes_the_vfs_their_binding_and_settings(booted: Booted) -> None:
    cp = subprocess.run(
        [sys.executable, "-m", "partitioner.cli.main", "--json", "host", "check", str(SITE)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=PROJECT,
    )
    doc = json.loads(cp.stdout)
    items = {i["id"]: i for i in doc["items"]}
    ours = {k: (i["status"], i["detail"]) for k, i in items.items() if "sriov" in k or "-vf-" in k}
    assert ours[f"site-sriov-{booted.pf}"][0] == "pass", ours
    for vf, v in booted.site.items():
        assert ours[f"site-vf-{vf}"] == ("pass", f"{vf} on vfio-pci, with driver_override"), ours
        s = v["settings"]
        assert ours[f"site-vf-settings-{vf}"] == (
            "pass",
            f"mac {s['mac']}, vlan {s['vlan']}",
        ), ours
    assert items["site-cmdline"]["status"] == "pass", items["site-cmdline"]


def test_the_script_run_again_by_the_service_changes_nothing(booted: Booted) -> None:
    """The boot-time service runs it without a PF before it starts the partitions."""
    before = {vf: current_driver(ROOT, vf) for vf in booted.site}
    cp = run([str(OUT / "sriov-vfs")], timeout=300, check=False)
    assert cp.returncode == 0, cp.stdout
    assert "VFs made" not in cp.stdout
    assert read(booted.pf, "sriov_numvfs") == str(booted.vfs)
    assert {vf: current_driver(ROOT, vf) for vf in booted.site} == before
