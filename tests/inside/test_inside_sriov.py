"""SR-IOV through ``partition apply``, against a real kernel: run INSIDE the emulated server of
the ``sriov`` preset (QEMU's igb, an 82576 PF with 8 VFs, under the emulated VT-d).

The site is tests/manifests/hostboot-sriov.yaml with a guest to boot: two partitions,
each a VF of the same PF with a MAC and a VLAN.  ``plan`` lists the VFs' creation and
settings; ``apply`` makes 4 VFs with autoprobe off (igbvf, loaded first as udev would,
never binds one), sets each VF's MAC and VLAN through the PF (``ip -d link show`` of the
PF shows them), claims each for vfio-pci and starts the partitions: each nested guest
(Debian 12's QEMU 7.2 inside, igbvf in its image) sees its VF with the MAC the host set.
``status`` shows the VFs and their settings; ``audit`` names a VF whose MAC was changed
behind its back; ``plan`` refuses a new VF count while the VFs are in use, naming the
users.  ``destroy`` clears the settings and puts ``sriov_numvfs`` and autoprobe back.

Each kill point of SR-IOV (``vfs-created``, ``vf-configured`` of apply; ``vf-cleared``,
``vfs-restored`` of destroy) is hit with a real SIGKILL of the command; ``status``
answers after it and the next ``apply`` or ``destroy`` converges.  The main apply and
destroy are those recoveries; the guests boot once (the second round's guests have no
kernel to boot and sit in SeaBIOS, which is all ``apply`` needs), and the checks that
need only the host run while they boot.  Each command costs 10 to 20 s under TCG (a
Python start and a scan), so what the kernel and the record say is read directly where
that is the same answer.

tests/test_inside.py runs this module on its own boot of the ``sriov`` preset, after
test_inside_sriov_boot (which leaves the PF as the boot found it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from guestimage import KERNEL_CMDLINE, build_guest_initramfs, guest_kernel

from partitioner.kernel.root import HostRoot
from partitioner.run import run
from partitioner.vfio.claim import current_driver

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or not os.path.isdir("/sys/kernel/iommu_groups/0"),
        reason="runs inside the emulated VT-d server (root, IOMMU groups)",
    ),
    pytest.mark.incremental,
]

ROOT = HostRoot("/")
PROJECT = Path(__file__).resolve().parents[2]
SITE = PROJECT / "tests" / "manifests" / "hostboot-sriov.yaml"
IGB = ("0x8086", "0x10c9")
VFS = 4
NAMES = ("fw", "lan")
MAC = {"fw": "52:54:00:5f:00:01", "lan": "52:54:00:5f:00:02"}
VLAN = {"fw": 100, "lan": 200}
TIMEOUT = 900.0  # two TCG guests inside a TCG server on 2 shared cores: minutes


def dev(addr: str, leaf: str = "") -> Path:
    return Path("/sys/bus/pci/devices") / addr / leaf


def read(addr: str, leaf: str) -> str:
    return dev(addr, leaf).read_text().strip()


def vf_address(pf: str, index: int) -> str:
    domain, bus, devfn = pf.split(":")
    d, f = devfn.split(".")
    offset, stride = int(read(pf, "sriov_offset")), int(read(pf, "sriov_stride"))
    rid = (int(bus, 16) << 8 | int(d, 16) << 3 | int(f)) + offset + index * stride
    return f"{domain}:{rid >> 8:02x}:{(rid & 0xFF) >> 3:02x}.{rid & 7}"


class Site:
    def __init__(self, tmp: Path, pf: str, netdev: str) -> None:
        self.tmp, self.pf, self.netdev = tmp, pf, netdev
        self.env = {
            **os.environ,
            "PARTITION_STATE_DIR": str(tmp / "state"),
            "PARTITION_RUN_DIR": str(tmp / "run"),
            "PARTITION_LOG_DIR": str(tmp / "log"),
        }
        kernel, initrd = guest_kernel(), build_guest_initramfs(tmp / "img")
        boot = (
            f"    boot:\n      kernel: {kernel}\n      initrd: {initrd}\n"
            f"      cmdline: {KERNEL_CMDLINE}\n"
        )
        text = SITE.read_text()
        for name in NAMES:
            text = text.replace(f"  {name}:\n", f"  {name}:\n{boot}")
        self.manifest = tmp / "site.yaml"
        self.manifest.write_text(text)
        self.idle = tmp / "idle.yaml"  # the same site, its guests in SeaBIOS
        self.idle.write_text(SITE.read_text())
        self.vfs = {name: vf_address(pf, i) for i, name in enumerate(NAMES)}

    def cli(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "partitioner.cli.main", *args],
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            cwd=PROJECT,
        )

    def killed(self, point: str, *verb: str) -> None:
        """``verb`` killed with SIGKILL at the first pass of ``point``; then ``status`` answers."""
        cp = self.cli(*verb, env={**self.env, "PARTITION_TEST_KILL_AT": f"{point}:1"})
        assert cp.returncode == -9, (point, cp.returncode, cp.stdout, cp.stderr)
        st = self.cli("--json", "status")
        assert st.returncode == 0, (point, st.stderr)
        json.loads(st.stdout)

    def apply(self, manifest: Path | None = None) -> str:
        cp = self.cli("apply", "--no-supervise", str(manifest or self.manifest))
        assert cp.returncode == 0, (cp.stdout, cp.stderr)
        return cp.stdout

    def destroy(self) -> str:
        cp = self.cli("destroy", "--all", "--timeout", "2")
        assert cp.returncode == 0, (cp.stdout, cp.stderr)
        return cp.stdout

    def status(self) -> dict[str, Any]:
        cp = self.cli("--json", "status")
        assert cp.returncode == 0, cp.stderr
        doc: dict[str, Any] = json.loads(cp.stdout)
        return doc

    def vf_lines(self) -> dict[int, str]:
        shown = run(["ip", "-d", "link", "show", "dev", self.netdev], timeout=60).stdout
        return {int(m[0]): m[1] for m in re.findall(r"^\s*vf (\d+)\s+(.*)$", shown, re.M)}

    def record(self) -> dict[str, Any]:
        path = self.tmp / "state" / "state.json"
        doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        return doc

    def check_applied(self, label: str) -> None:
        """The site as apply leaves it: the VFs made, set, claimed; the guests running."""
        assert read(self.pf, "sriov_numvfs") == str(VFS), label
        assert read(self.pf, "sriov_drivers_autoprobe") == "0", label
        lines = self.vf_lines()
        for i, name in enumerate(NAMES):
            assert f"link/ether {MAC[name]}" in lines[i], (label, lines)
            assert f"vlan {VLAN[name]}" in lines[i], (label, lines)
            assert current_driver(ROOT, self.vfs[name]) == "vfio-pci", label
        for i in range(len(NAMES), VFS):
            assert current_driver(ROOT, vf_address(self.pf, i)) is None, label
        state = self.record()
        for n in NAMES:
            rec = state["partitions"][n]
            assert rec["state"] == "running", (label, n, rec["state"])
            assert os.path.exists(f"/proc/{rec['pid']}"), (label, n, "its QEMU is gone")
        pending = [
            r["pf"]
            for r in state.get("sriov", [])
            if r["pending"] or any(v["pending"] for v in r.get("vfs", []))
        ]
        assert pending == [], (label, state.get("sriov"))

    def check_destroyed(self, label: str) -> None:
        """The PF as it was before: no VF, autoprobe on; nothing in the record."""
        assert read(self.pf, "sriov_numvfs") == "0", label
        assert read(self.pf, "sriov_drivers_autoprobe") == "1", label
        assert not dev(self.pf, "virtfn0").exists(), label
        assert self.vf_lines() == {}, label
        state = self.record()
        assert not state.get("partitions") and not state.get("sriov"), (label, state)


@pytest.fixture(scope="module")
def site(testbed_out: Path) -> Iterator[Site]:
    """The igb PF with its driver loaded (its interface is how VF settings are set), and
    igbvf loaded too: a VF made with autoprobe on would be bound to it at once."""
    found = [
        a
        for a in sorted(os.listdir("/sys/bus/pci/devices"))
        if (read(a, "vendor"), read(a, "device")) == IGB
    ]
    if not found:
        pytest.skip("this topology has no igb (boot the sriov preset)")
    pf = found[0]
    loaded = [m for m in ("igbvf", "igb") if not os.path.exists(f"/sys/module/{m}")]
    for m in loaded:
        run(["modprobe", m], timeout=120)
    deadline = time.monotonic() + 60
    while not dev(pf, "net").is_dir() or not os.listdir(dev(pf, "net")):
        assert time.monotonic() < deadline, f"igb did not make an interface for {pf}"
        time.sleep(0.2)
    netdev = os.listdir(dev(pf, "net"))[0]
    run(["ip", "link", "set", netdev, "up"], timeout=60)
    assert read(pf, "sriov_numvfs") == "0" and read(pf, "sriov_drivers_autoprobe") == "1"
    # On the server's /tmp: a tmpfs without nodev, as a confined root receiving devices needs.
    tmp = Path(tempfile.mkdtemp(prefix="partition-sriov-"))
    s = Site(tmp, pf, netdev)
    try:
        yield s
    finally:
        for src, name in ((tmp / "log", "sriov-log"), (tmp / "state", "sriov-state")):
            if src.is_dir():
                shutil.copytree(src, testbed_out / name, dirs_exist_ok=True)
        if (tmp / "state" / "state.json").exists():
            s.cli("destroy", "--all", "--timeout", "2")
        # Whatever a failed test left: the PF as it was found.
        dev(pf, "sriov_numvfs").write_text("0")
        dev(pf, "sriov_drivers_autoprobe").write_text("1")
        for m in loaded:
            run(["modprobe", "-r", m], timeout=120, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def test_plan_lists_the_vfs_creation_and_each_vfs_settings(site: Site) -> None:
    """(The text form of the same actions: tests/test_sriov_apply.py.)"""
    cp = site.cli("--json", "plan", str(site.manifest))
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)
    acts = [a for a in doc["actions"] if a["action"] in ("create-vfs", "configure-vf", "claim-vf")]
    assert [(a["action"], a["target"]) for a in acts] == [
        ("create-vfs", site.pf),
        ("configure-vf", "fw"),
        ("claim-vf", "fw"),
        ("configure-vf", "lan"),
        ("claim-vf", "lan"),
    ]
    assert acts[0]["detail"].startswith(f"sriov_numvfs 0 -> {VFS}")
    assert (acts[0]["vfs"], acts[0]["numvfs_now"]) == (VFS, 0)
    for i, name in enumerate(NAMES):
        a = acts[1 + 2 * i]
        assert a["detail"] == f"VF {i} of {site.pf}: mac {MAC[name]}, vlan {VLAN[name]}"
        assert (a["index"], a["settings"]["mac"], a["settings"]["vlan"]) == (
            i,
            MAC[name],
            VLAN[name],
        )
        assert acts[2 + 2 * i]["address"] == site.vfs[name]
    assert doc["sriov"][0]["iommu_groups_known"] is False


def test_apply_killed_when_the_vfs_are_made_then_applied(site: Site) -> None:
    site.killed("vfs-created", "apply", "--no-supervise", str(site.manifest))
    # Made, with autoprobe off: the next apply records them and goes on.
    assert read(site.pf, "sriov_numvfs") == str(VFS)
    site.apply()
    site.check_applied("after a kill at vfs-created")


def test_no_host_driver_took_a_vf(site: Site) -> None:
    assert os.path.isdir("/sys/bus/pci/drivers/igbvf")
    assert not [e for e in os.listdir("/sys/bus/pci/drivers/igbvf") if e.startswith("0000:")]


def test_status_shows_each_partitions_vf_and_its_settings(site: Site) -> None:
    doc = site.status()
    for i, n in enumerate(NAMES):
        (v,) = doc["partitions"][n]["vfs"]
        assert (v["address"], v["pf"], v["index"], v["set"]) == (site.vfs[n], site.pf, i, True)
        assert (v["settings"]["mac"], v["settings"]["vlan"]) == (MAC[n], VLAN[n])
        assert isinstance(v["iommu_group"], int)
    assert doc["sriov"] == [
        {"pf": site.pf, "vfs": VFS, "numvfs_before": 0, "autoprobe_before": True, "pending": None}
    ]


def test_audit_names_a_vf_whose_mac_was_changed(site: Site) -> None:
    def vf_findings() -> tuple[int, list[dict[str, Any]]]:
        cp = site.cli("--json", "audit")
        doc = json.loads(cp.stdout)
        return cp.returncode, [f for f in doc["findings"] if f["kind"] == "vf"]

    assert vf_findings()[1] == []
    run(
        ["ip", "link", "set", "dev", site.netdev, "vf", "0", "mac", "52:54:00:00:00:66"], timeout=60
    )
    try:
        rc, found = vf_findings()
        assert rc == 3
        (f,) = found
        assert f["partition"] == "fw" and f["status"] == "drift" and f["fields"] == ["mac"]
        assert f"mac is 52:54:00:00:00:66, the plan says {MAC['fw']}" in f["detail"]
        assert f"ip link set dev {site.netdev} vf 0 mac {MAC['fw']}" in f["action"]
    finally:
        run(["ip", "link", "set", "dev", site.netdev, "vf", "0", "mac", MAC["fw"]], timeout=60)


def test_plan_refuses_a_new_count_under_the_vfs_in_use(site: Site) -> None:
    fewer = site.tmp / "fewer.yaml"
    fewer.write_text(site.manifest.read_text().replace("vfs: 4", "vfs: 2"))
    cp = site.cli("plan", str(fewer))
    assert cp.returncode == 3, (cp.stdout, cp.stderr)
    said = cp.stdout + cp.stderr
    assert f"VF 0 ({site.vfs['fw']}) is held by partition fw" in said, said
    assert f"VF 1 ({site.vfs['lan']}) is held by partition lan" in said, said
    assert read(site.pf, "sriov_numvfs") == str(VFS)


def test_each_nested_guest_sees_its_vf_with_the_mac_the_host_set(site: Site) -> None:
    parts = site.record()["partitions"]
    logs = {n: Path(parts[n]["paths"]["console_log"]) for n in NAMES}
    deadline = time.monotonic() + TIMEOUT
    seen: dict[str, str] = {}
    while len(seen) < len(NAMES) and time.monotonic() < deadline:
        for n, log in logs.items():
            text = log.read_text(errors="replace").replace("\r", "") if log.exists() else ""
            if n not in seen and "GUEST-READY" in text:
                seen[n] = text
        time.sleep(2)
    for n in NAMES:
        text = seen.get(n, "")
        assert "GUEST-READY" in text, f"{n}'s guest did not come up"
        assert re.search(r"^GUEST-PCI 8086:10ca ", text, re.M), text
        assert f"GUEST-NET eth0 {MAC[n]}" in text.splitlines(), text


def test_destroy_killed_while_a_vfs_settings_go_back_then_destroyed(site: Site) -> None:
    site.killed("vf-cleared", "destroy", "--all", "--timeout", "2")
    site.destroy()
    site.check_destroyed("after a kill at vf-cleared")


def test_apply_killed_while_a_vf_is_set_then_applied(site: Site) -> None:
    site.killed("vf-configured", "apply", "--no-supervise", str(site.idle))
    site.apply(site.idle)
    site.check_applied("after a kill at vf-configured")


def test_destroy_killed_while_the_pf_is_put_back_then_destroyed(site: Site) -> None:
    site.killed("vfs-restored", "destroy", "--all", "--timeout", "2")
    site.destroy()
    site.check_destroyed("after a kill at vfs-restored")
