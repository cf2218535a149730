"""SR-IOV at boot: what ``host setup`` compiles for ``host.sriov`` (the VFs made when each PF's
driver binds it, the site's set up and bound to vfio-pci), and what ``host check`` says of a
PF's VF count and of each of the site's VFs, its binding and its settings.

The compile runs against the real snapshot of the ``sriov`` test bed
(tests/fixtures/hosts/testbed-sriov); the checks against the fake kernel of
tests/test_sriov_apply.py.  The compiled script itself runs on a real kernel in
tests/inside/test_inside_sriov_boot.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from fakesriov import FakeSriovKernel
from test_hostboot import run
from test_sriov_apply import MAC, PF, VF0, VF1, fake_kernel, site

from partitioner.boot.check import check_site
from partitioner.boot.setup import (
    SRIOV_RULES,
    SRIOV_SCRIPT,
    UNIT,
    HostFacts,
    boot_settings,
    vf_setting_args,
)
from partitioner.inventory import scan
from partitioner.kernel import vflink
from partitioner.manifest.model import VfSettings
from partitioner.planning.planner import plan

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "fixtures" / "hosts" / "testbed-sriov"
SITE = ROOT / "tests" / "manifests" / "hostboot-sriov.yaml"
FACTS = HostFacts("GenuineIntel", "6.1.0-13-amd64", ("intel_iommu=on", "iommu=pt"))


def compiled(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> dict[str, str | dict]:  # type: ignore[type-arg]
    target = tmp_path / "target"
    (target / "usr/lib/systemd").mkdir(parents=True)
    (target / "usr/lib/systemd/systemd").write_text("")
    rc, out, err = run(
        capsys, "--host-root", str(SNAPSHOT), "--json", "host", "setup", str(SITE), "--dry-run",
        "--root", str(target),
    )  # fmt: skip
    assert rc == 0, err
    doc: dict[str, str | dict] = json.loads(out)  # type: ignore[type-arg]
    return doc


def test_setup_makes_the_vfs_when_the_pf_binds_and_binds_the_sites_by_address(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    doc = compiled(capsys, tmp_path)
    files = {f["path"]: f for f in doc["files"]}  # type: ignore[union-attr]
    # The VFs do not exist in the initramfs (their PF's driver has not bound it yet):
    # the early binding has nothing of theirs, the SR-IOV script binds them.
    assert doc["devices"] == []
    assert not any("initramfs-tools" in p for p in files)
    assert doc["sriov"] == [
        {
            "pf": PF,
            "vfs": 4,
            "site_vfs": [
                {
                    "index": i,
                    "address": vf,
                    "partition": name,
                    "settings": {
                        "mac": MAC[name],
                        "vlan": vlan,
                        "qos": None,
                        "spoofchk": True,
                        "trust": False,
                        "link_state": None,
                        "min_tx_rate": None,
                        "max_tx_rate": None,
                    },
                }
                for i, (vf, name, vlan) in enumerate(((VF0, "fw", 100), (VF1, "lan", 200)))
            ],
        }
    ]
    rule = files[SRIOV_RULES]["content"].splitlines()[-1]
    assert rule == (
        f'ACTION=="add|bind", SUBSYSTEM=="pci", KERNEL=="{PF}", DRIVER=="?*", '
        f'DRIVER!="vfio-pci", RUN+="{SRIOV_SCRIPT} {PF}"'
    )
    script = files[SRIOV_SCRIPT]["content"]
    assert files[SRIOV_SCRIPT]["mode"] == "0755"
    body = script[script.index("make_vfs() {") :]
    # Autoprobe off before the count, and the count through 0.
    assert (
        body.index('echo 0 > "$sys/sriov_drivers_autoprobe"')
        < body.index('echo 0 > "$sys/sriov_numvfs"')
        < body.index('echo "$2" > "$sys/sriov_numvfs"')
    )
    assert f"\t\tmake_vfs {PF} 4 || return 1\n\t\tmodprobe -q vfio-pci\n" in script
    # Each setting its own command, then the VF bound by address; the other VFs stay unbound.
    assert (
        f"\t\tset_vf {PF} 0 {VF0} mac {MAC['fw']} && set_vf {PF} 0 {VF0} vlan 100 qos 0 "
        f"&& bind_vf {VF0}  # fw\n"
    ) in script
    assert f"bind_vf {VF1}  # lan\n" in script
    assert script.count("bind_vf 0000") == 2
    assert 'echo vfio-pci > "$sysdev/driver_override"' in script
    sh = shutil.which("sh")
    assert sh is not None
    subprocess.run([sh, "-n"], input=script, text=True, check=True)
    # The boot-time service runs it too before it starts the partitions (a failure is apply's
    # to report); udev is told to read the rule.
    unit = files[UNIT]["content"]
    assert f"ExecStartPre=-{SRIOV_SCRIPT}\n" in unit
    assert unit.index("ExecStartPre") < unit.index("ExecStart=")
    assert "udevadm control --reload" in doc["commands"]
    assert doc["reboot_needed"] is True


def test_settings_are_sent_as_apply_sends_them() -> None:
    assert vf_setting_args(VfSettings(mac="52:54:00:00:00:01")) == [["mac", "52:54:00:00:00:01"]]
    every = VfSettings(
        mac="52:54:00:00:00:01",
        vlan=7,
        qos=3,
        spoofchk=False,
        trust=True,
        link_state="enable",
        min_tx_rate=10,
        max_tx_rate=100,
    )
    assert vf_setting_args(every) == [
        ["mac", "52:54:00:00:00:01"],
        ["vlan", "7", "qos", "3"],
        ["spoofchk", "off"],
        ["trust", "on"],
        ["state", "enable"],
        ["min_tx_rate", "10", "max_tx_rate", "100"],
    ]
    assert vf_setting_args(VfSettings()) == []  # the defaults are a new VF's: nothing sent


@pytest.fixture
def fk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSriovKernel:
    return fake_kernel(tmp_path, monkeypatch)


def _check(fk: FakeSriovKernel) -> dict[str, tuple[str, str]]:
    host = scan(fk)
    m = site()
    settings = boot_settings(m, plan(m, host, {}), host, FACTS)
    items = check_site(fk, host, FACTS, settings, "site.yaml")
    return {i.id: (i.status, i.detail) for i in items if "sriov" in i.id or "vf" in i.id}


def _make(fk: FakeSriovKernel, *, settings: bool = True) -> None:
    """What the compiled script does, done on the fake kernel."""
    d = f"/sys/bus/pci/devices/{PF}"
    fk.write(f"{d}/sriov_drivers_autoprobe", "0")
    fk.write(f"{d}/sriov_numvfs", "4")
    for i, (vf, name, vlan) in enumerate(((VF0, "fw", "100"), (VF1, "lan", "200"))):
        if settings:
            fk.ip(["ip", "link", "set", "dev", "eth0", "vf", str(i), "mac", MAC[name]])
            fk.ip(["ip", "link", "set", "dev", "eth0", "vf", str(i), "vlan", vlan])
        fk.write(f"/sys/bus/pci/devices/{vf}/driver_override", "vfio-pci")
        fk.write("/sys/bus/pci/drivers_probe", vf)


def test_check_fails_a_pf_without_its_vfs_and_the_vfs_not_bound(fk: FakeSriovKernel) -> None:
    got = _check(fk)
    assert got[f"site-sriov-{PF}"] == (
        "fail",
        f"0 VFs, the site asks 4: bound to igb; the boot-time script {SRIOV_SCRIPT} did not "
        "make them",
    )
    assert got[f"site-vf-{VF0}"] == ("fail", "the PF has no VF 0")


def test_check_passes_the_vfs_the_boot_made_and_bound(
    fk: FakeSriovKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    _make(fk)
    got = _check(fk)
    assert got[f"site-sriov-{PF}"] == (
        "pass",
        "4 VFs, as the site asks, sriov_drivers_autoprobe 0",
    )
    assert got[f"site-vf-{VF0}"] == ("pass", f"{VF0} on vfio-pci, with driver_override")
    assert got[f"site-vf-{VF1}"][0] == "pass"
    # A tree: iproute2 would read this machine's interfaces, so the settings are not judged.
    assert got[f"site-vf-settings-{VF0}"][0] == "unknown"
    # The live host (here the fake's iproute2): MAC and VLAN as the site sets them.
    monkeypatch.setattr(vflink, "links_of", lambda root, pf: ("eth0", vflink.read_vf_links("eth0")))
    got = _check(fk)
    assert got[f"site-vf-settings-{VF0}"] == ("pass", f"mac {MAC['fw']}, vlan 100")
    assert got[f"site-vf-settings-{VF1}"] == ("pass", f"mac {MAC['lan']}, vlan 200")


def test_check_names_a_vf_on_another_driver_and_settings_not_set(
    fk: FakeSriovKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    _make(fk, settings=False)
    fk.write(f"/sys/bus/pci/devices/{VF1}/driver/unbind", VF1)
    monkeypatch.setattr(vflink, "links_of", lambda root, pf: ("eth0", vflink.read_vf_links("eth0")))
    got = _check(fk)
    assert got[f"site-vf-{VF1}"] == (
        "fail",
        f"{VF1} is bound to no driver: the boot-time binding to vfio-pci is not in effect",
    )
    status, detail = got[f"site-vf-settings-{VF0}"]
    assert (status, detail) == ("fail", f"defaults; the site sets mac {MAC['fw']}, vlan 100")
