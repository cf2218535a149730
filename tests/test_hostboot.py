"""`partition host check` and `partition host setup`: against trees built on the real snapshot of
the emulated server (tests/fixtures/hosts/testbed-numa), into temporary target roots, and live."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from treebuilder import GiB, MiB, TreeBuilder

from partitioner.boot.check import kvm_probe_item
from partitioner.cli.main import main
from partitioner.kernel.root import HostRoot

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "fixtures" / "hosts" / "testbed-numa"
DEMO = ROOT / "partitions" / "demo.yaml"
# The demo site on the numa server: fw0 takes 81:00.0 (node 1), lan0 the two functions of
# 42:00.x (node 0); the reserve is 0,4; each takes one CPU and 64 2MiB pages.
DEMO_ADDRS = ["0000:42:00.0", "0000:42:00.1", "0000:81:00.0"]
INTEL_CPUINFO = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel Core i7 9xx (Nehalem Class Core i7)\n"
    "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx "
    "fxsr sse sse2 ss syscall nx lm constant_tsc rep_good nopl xtopology cpuid pni vmx ssse3 cx16 "
    "sse4_1 sse4_2 x2apic popcnt hypervisor lahf_lm\n\n"
)
# /proc/interrupts of the numa test bed with its emulated VT-d (intremap=on): MSI vectors
# are delivered through the IR irqchip.
INTERRUPTS_IR = (
    "            CPU0       CPU1       CPU2       CPU3\n"
    "   0:         41          0          0          0  IR-IO-APIC    2-edge      timer\n"
    "  24:          0          0          0          0  DMAR-MSI    0-edge      dmar0\n"
    "  25:        210          0          0          0  IR-PCI-MSIX-0000:00:04.0    0-edge      virtio0-config\n"
)
INTERRUPTS_NO_IR = INTERRUPTS_IR.replace("IR-IO-APIC", "IO-APIC").replace("IR-PCI-MSIX", "PCI-MSIX")
SITE_ARGS = [
    "intel_iommu=on",
    "iommu=pt",
    "isolcpus=managed_irq,domain,1,5",
    "nohz_full=1,5",
    "rcu_nocbs=1,5",
    "irqaffinity=0,4",
    "hugepagesz=2M",
    "hugepages=0:64,1:64",
]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def snapshot_tree(tmp_path: Path) -> TreeBuilder:
    """A copy of the real snapshot, with the facts host check reads that it lacks written on
    top: an Intel CPU with VT-x, the IOMMU unit, /dev/kvm, vfio-pci loaded, and the NICs on e1000e
    (as the booted server has them)."""
    dest = tmp_path / "host"
    shutil.copytree(SNAPSHOT, dest, symlinks=True)
    t = TreeBuilder(dest)
    t.file("/proc/cpuinfo", INTEL_CPUINFO)
    t.file("/proc/sys/kernel/osrelease", "6.1.0-18-amd64\n")
    t.file("/proc/1/comm", "init\n")
    t.file("/proc/interrupts", INTERRUPTS_IR)
    t.file("/dev/kvm", "")
    t.file("/sys/devices/virtual/iommu/dmar0/intel-iommu/ecap", "f0205e\n")
    t.link("/sys/class/iommu/dmar0", "/sys/devices/virtual/iommu/dmar0")
    t.file("/sys/bus/pci/drivers/vfio-pci/new_id", "")
    t.file("/sys/bus/pci/drivers/e1000e/new_id", "")
    root = HostRoot(dest)
    for addr in DEMO_ADDRS:
        real = root.realpath(f"/sys/bus/pci/devices/{addr}")
        t.link(f"{real}/driver", "/sys/bus/pci/drivers/e1000e")
    t.file("/proc/cmdline", "BOOT_IMAGE=/vmlinuz root=/dev/vda ro console=ttyS0\n")
    t.file("/sys/devices/system/cpu/isolated", "\n")
    t.file("/sys/devices/system/cpu/nohz_full", "(null)\n")
    return t


def booted_with_site(t: TreeBuilder) -> None:
    """What the kernel shows after booting with the demo site's settings."""
    root = HostRoot(t.root)
    t.file("/proc/cmdline", "BOOT_IMAGE=/vmlinuz root=/dev/vda ro " + " ".join(SITE_ARGS) + "\n")
    t.file("/sys/devices/system/cpu/isolated", "1,5\n")
    t.file("/sys/devices/system/cpu/nohz_full", "1,5\n")
    for addr in DEMO_ADDRS:
        real = root.realpath(f"/sys/bus/pci/devices/{addr}")
        t.link(f"{real}/driver", "/sys/bus/pci/drivers/vfio-pci")
        t.file(f"{real}/driver_override", "vfio-pci\n")


def check_json(capsys: pytest.CaptureFixture[str], host: Path, *extra: str) -> tuple[int, dict]:
    rc, out, err = run(capsys, "--host-root", str(host), "--json", "host", "check", *extra)
    assert err == "" or rc != 1, err
    return rc, json.loads(out)


def items(doc: dict) -> dict[str, dict]:
    return {i["id"]: i for i in doc["items"]}


# -- host check: the machine ------------------------------------------------------------


def test_ready_host_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = snapshot_tree(tmp_path)
    rc, doc = check_json(capsys, t.root)
    it = items(doc)
    assert rc == 0 and doc["ok"] is True, doc["problems"]
    for key in (
        "cpu-virt",
        "kvm",
        "iommu",
        "interrupt-remapping",
        "vfio-pci",
        "cgroup-cpuset",
        "init",
    ):
        assert it[key]["status"] == "pass", it[key]
    # The snapshot's group 16 holds two conventional NICs behind one PCI bridge: no ACS.
    assert it["iommu-groups"]["status"] == "warn"
    assert "0000:87:01.0" in it["iommu-groups"]["detail"]
    # The emulated Nehalem has no 1 GiB pages.
    assert it["hugepages"]["status"] == "warn" and "1 GiB" in it["hugepages"]["detail"]
    assert "kvm-cpu-host" not in it  # a tree cannot answer that: only the live host is probed


def test_host_without_iommu_fails_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = snapshot_tree(tmp_path)
    shutil.rmtree(t.root / "sys/kernel/iommu_groups")
    (t.root / "sys/kernel/iommu_groups").mkdir()
    os.unlink(t.root / "sys/class/iommu/dmar0")
    rc, doc = check_json(capsys, t.root)
    it = items(doc)
    assert rc == 3 and doc["ok"] is False and doc["exit"] == 3
    assert it["iommu"]["status"] == "fail" and it["iommu"]["reboot"] is True
    assert "intel_iommu=on" in it["iommu"]["fix"]  # an Intel CPU: the argument that enables it
    assert it["interrupt-remapping"]["status"] == "fail"
    assert it["iommu-groups"]["status"] == "fail"
    assert any("IOMMU" in p for p in doc["problems"])


def test_iommu_without_interrupt_remapping_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = snapshot_tree(tmp_path)
    t.file("/proc/interrupts", INTERRUPTS_NO_IR)
    t.file("/sys/devices/virtual/iommu/dmar0/intel-iommu/ecap", "f02056\n")  # bit 3 (IR) clear
    rc, doc = check_json(capsys, t.root)
    it = items(doc)
    assert rc == 3
    assert it["iommu"]["status"] == "pass"
    assert it["interrupt-remapping"]["status"] == "fail"
    assert "unsafe" in it["interrupt-remapping"]["detail"]
    assert "firmware" in it["interrupt-remapping"]["fix"]


def test_interrupt_remapping_turned_off_says_which_argument(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = snapshot_tree(tmp_path)
    t.file("/proc/interrupts", INTERRUPTS_NO_IR)  # the hardware can (ecap IR set) but does not
    t.file("/proc/cmdline", "root=/dev/vda intremap=off\n")
    rc, doc = check_json(capsys, t.root)
    ir = items(doc)["interrupt-remapping"]
    assert rc == 3 and ir["status"] == "fail" and "intremap=off" in ir["fix"]


def test_no_kvm_no_vfio_no_cgroup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = snapshot_tree(tmp_path)
    os.unlink(t.root / "dev/kvm")
    shutil.rmtree(t.root / "sys/bus/pci/drivers/vfio-pci")
    t.file("/proc/self/mountinfo", "25 24 0:22 / /proc rw,relatime - proc proc rw\n")
    # The snapshot keeps /lib as the machine has it, a link to usr/lib (merged /usr).
    (t.root / "usr/lib/modules/6.1.0-18-amd64").mkdir(parents=True)
    t.file("/lib/modules/6.1.0-18-amd64/modules.dep", "kernel/drivers/net/e1000e/e1000e.ko:\n")
    t.file("/lib/modules/6.1.0-18-amd64/modules.builtin", "")
    rc, doc = check_json(capsys, t.root)
    it = items(doc)
    assert rc == 3
    assert it["kvm"]["status"] == "fail" and "kvm_intel" in it["kvm"]["fix"]
    assert it["vfio-pci"]["status"] == "fail"
    assert it["cgroup-cpuset"]["status"] == "fail"
    # A site that runs under accel: tcg needs no KVM: the same facts warn for it.
    _, doc = check_json(capsys, t.root, str(DEMO))
    assert items(doc)["kvm"]["status"] == "warn" and "accel: tcg" in items(doc)["kvm"]["detail"]
    # With the module on disk, vfio-pci passes (apply loads it).
    t.file(
        "/lib/modules/6.1.0-18-amd64/modules.dep",
        "kernel/drivers/vfio/pci/vfio-pci.ko: kernel/drivers/vfio/vfio.ko\n",
    )
    _, doc = check_json(capsys, t.root)
    assert items(doc)["vfio-pci"]["status"] == "pass"


def test_kvm_probe_classifies_a_nested_kvm() -> None:
    # What QEMU 7.2 prints on this machine's nested /dev/kvm (issue 12, "Proof").
    out = (
        "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n"
        "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: "
        "Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed.\n"
    )
    item = kvm_probe_item(-6, out)
    assert item.status == "warn" and "0x10a" in item.detail
    assert kvm_probe_item(0, "").status == "pass"
    other = kvm_probe_item(1, "Could not access KVM kernel module: Permission denied\n")
    assert other.status == "warn" and "Permission denied" in other.detail


# -- host check FILE: the site's boot-time settings ---------------------------------------


def test_site_settings_in_force_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = snapshot_tree(tmp_path)
    booted_with_site(t)
    rc, doc = check_json(capsys, t.root, str(DEMO))
    it = items(doc)
    assert rc == 0, doc["problems"]
    assert doc["missing_kernel_args"] == [] and doc["reboot_needed"] is False
    assert it["site-cmdline"]["status"] == "pass"
    assert it["site-isolated-cpus"]["status"] == "pass"
    assert it["site-nohz-full"]["status"] == "pass"
    assert it["site-hugepages-2MiB-node0"]["status"] == "pass"
    assert it["site-hugepages-2MiB-node1"]["status"] == "pass"
    for addr in DEMO_ADDRS:
        assert it[f"site-device-{addr}"]["status"] == "pass"


def test_site_settings_missing_need_a_reboot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = snapshot_tree(tmp_path)  # booted without the site's settings: NICs on e1000e
    rc, doc = check_json(capsys, t.root, str(DEMO))
    it = items(doc)
    assert rc == 3 and doc["reboot_needed"] is True
    assert doc["missing_kernel_args"] == SITE_ARGS
    for key in ("site-cmdline", "site-isolated-cpus", "site-nohz-full"):
        assert it[key]["status"] == "fail" and it[key]["reboot"] is True, it[key]
        assert "host setup" in it[key]["fix"]
    for addr in DEMO_ADDRS:
        dev = it[f"site-device-{addr}"]
        assert dev["status"] == "fail" and "e1000e" in dev["detail"]


def test_site_settings_partly_wrong_name_the_cpus_and_pool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = snapshot_tree(tmp_path)
    booted_with_site(t)
    t.file("/sys/devices/system/cpu/isolated", "1-2,5\n")  # CPU 2 isolated, no partition has it
    t.file("/sys/devices/system/node/node1/hugepages/hugepages-2048kB/nr_hugepages", "40\n")
    rc, doc = check_json(capsys, t.root, str(DEMO))
    it = items(doc)
    assert rc == 3
    iso = it["site-isolated-cpus"]
    assert iso["status"] == "fail" and "CPUs 2 are" in iso["detail"]
    pool = it["site-hugepages-2MiB-node1"]
    assert pool["status"] == "fail" and "40 pages, the site needs 64" in pool["detail"]
    assert it["site-hugepages-2MiB-node0"]["status"] == "pass"


def test_check_people_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = snapshot_tree(tmp_path)
    rc, out, _ = run(capsys, "--host-root", str(t.root), "host", "check", str(DEMO))
    assert rc == 3
    assert "FAIL  CPUs isolated" in out
    assert "fix: `partition host setup" in out and "(reboot)" in out


@pytest.mark.qemu
def test_live_check_on_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    """This machine has no IOMMU: host check fails on it (exit 3) and says so; where /dev/kvm
    exists, the probe starts QEMU for real and reports what it found."""
    if os.listdir("/sys/kernel/iommu_groups"):
        pytest.skip("this machine has an IOMMU")
    rc, out, _ = run(capsys, "--json", "host", "check")
    doc = json.loads(out)
    it = items(doc)
    assert rc == 3 and it["iommu"]["status"] == "fail"
    if os.path.exists("/dev/kvm") and shutil.which("qemu-system-x86_64"):
        probe = it["kvm-cpu-host"]
        direct = subprocess.run(
            ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-machine", "q35", "-m", "64",
             "-nodefaults", "-display", "none", "-S", "-qmp", "stdio"],
            input='{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n',
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert (probe["status"] == "pass") == (direct.returncode == 0), probe
        if "failed to set MSR" in direct.stderr:
            assert "refuses -cpu host" in probe["detail"]


# -- host setup ----------------------------------------------------------------------------


def target_root(tmp_path: Path, *, systemd: bool = True) -> Path:
    r = tmp_path / "target"
    (r / "etc/default").mkdir(parents=True)
    (r / "etc/default/grub").write_text('GRUB_CMDLINE_LINUX=""\n')
    (r / "etc/initramfs-tools").mkdir(parents=True)
    if systemd:
        (r / "usr/lib/systemd").mkdir(parents=True)
        (r / "usr/lib/systemd/systemd").write_text("")
    return r


def listing(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = p.read_text()
        else:
            out[str(p.relative_to(root))] = "dir"
    return out


def setup_json(
    capsys: pytest.CaptureFixture[str], host: Path, target: Path, *extra: str, site: Path = DEMO
) -> dict:
    rc, out, err = run(
        capsys, "--host-root", str(host), "--json", "host", "setup", str(site), "--root",
        str(target), *extra,
    )  # fmt: skip
    assert rc == 0, err
    doc: dict = json.loads(out)
    return doc


def test_setup_compiles_the_site(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = snapshot_tree(tmp_path)
    target = target_root(tmp_path)
    doc = setup_json(capsys, t.root, target)
    assert doc["kernel_args"] == SITE_ARGS
    assert doc["changed"] is True and doc["reboot_needed"] is True
    # Not the root of this machine: nothing is run, the commands are said.
    assert doc["commands_run"] == []
    assert doc["commands"] == [
        "update-grub",
        "update-initramfs -u -k all",
        "systemctl daemon-reload",
    ]
    grub = (target / "etc/default/grub.d/partition.cfg").read_text()
    assert 'GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX ' + " ".join(SITE_ARGS) + '"' in grub
    script = target / "etc/initramfs-tools/scripts/init-top/partition-vfio"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert "for dev in " + " ".join(DEMO_ADDRS) + "; do" in text
    assert "vfio-pci.ids" not in text.replace("(vfio-pci.ids=", "")  # by address, never by id
    subprocess.run(["sh", "-n", str(script)], check=True)
    hook = target / "etc/initramfs-tools/hooks/partition-vfio"
    assert "manual_add_modules vfio vfio_iommu_type1 vfio_pci" in hook.read_text()
    subprocess.run(["sh", "-n", str(hook)], check=True)
    modprobe = (target / "etc/modprobe.d/partition-vfio.conf").read_text()
    assert "softdep e1000e pre: vfio-pci" in modprobe
    unit = (target / "etc/systemd/system/partition-site.service").read_text()
    assert "ExecStart=" in unit and "host boot /etc/partition/site.yaml" in unit
    link = target / "etc/systemd/system/multi-user.target.wants/partition-site.service"
    assert os.readlink(link) == "../partition-site.service"
    assert (target / "etc/partition/site.yaml").read_text() == DEMO.read_text()
    assert (target / "etc/default/grub").read_text() == 'GRUB_CMDLINE_LINUX=""\n'  # never edited


def test_setup_twice_changes_nothing_and_undo_removes_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = snapshot_tree(tmp_path)
    target = target_root(tmp_path)
    before = listing(target)
    setup_json(capsys, t.root, target)
    written = listing(target)
    mtimes = {p: p.lstat().st_mtime_ns for p in target.rglob("*")}
    again = setup_json(capsys, t.root, target)
    assert again["changed"] is False and again["commands"] == []
    assert {f["action"] for f in again["files"]} == {"unchanged"}
    assert listing(target) == written
    assert {p: p.lstat().st_mtime_ns for p in target.rglob("*")} == mtimes
    undone = setup_json(capsys, t.root, target, "--undo")
    assert undone["changed"] is True
    assert {f["action"] for f in undone["files"]} == {"remove", "rmdir"}
    assert listing(target) == before
    # Undoing again: nothing there.
    assert setup_json(capsys, t.root, target, "--undo")["changed"] is False


def test_dry_run_writes_nothing_and_shows_the_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = snapshot_tree(tmp_path)
    target = target_root(tmp_path)
    before = listing(target)
    rc, out, _ = run(
        capsys, "--host-root", str(t.root), "host", "setup", str(DEMO), "--root", str(target),
        "--dry-run",
    )  # fmt: skip
    assert rc == 0 and listing(target) == before
    assert "would create   /etc/default/grub.d/partition.cfg" in out
    assert 'echo vfio-pci > "$sysdev/driver_override"' in out  # contents shown
    assert "then run (in " in out and "update-grub" in out


def test_a_changed_site_shows_the_difference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = snapshot_tree(tmp_path)
    target = target_root(tmp_path)
    setup_json(capsys, t.root, target)
    # fw0 no longer takes its NIC: the scripts lose 81:00.0.
    site = tmp_path / "site.yaml"
    site.write_text(
        DEMO.read_text()
        .replace('      - pci: "0000:81:00.0"', "      []")
        .replace("    devices:\n      []", "    devices: []")
    )
    doc = setup_json(capsys, t.root, target, site=site)
    by_path = {f["path"]: f for f in doc["files"]}
    script = by_path["/etc/initramfs-tools/scripts/init-top/partition-vfio"]
    assert script["action"] == "update"
    assert "-for dev in 0000:42:00.0 0000:42:00.1 0000:81:00.0; do" in script["diff"]
    assert "+for dev in 0000:42:00.0 0000:42:00.1; do" in script["diff"]
    assert by_path["/etc/systemd/system/partition-site.service"]["action"] == "unchanged"
    assert "update-initramfs -u -k all" in doc["commands"]
    assert "systemctl daemon-reload" not in doc["commands"]


def test_systemd_boot_keeps_the_rest_of_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = snapshot_tree(tmp_path)
    target = tmp_path / "target"
    (target / "etc/kernel").mkdir(parents=True)
    original = "root=UUID=1234 ro quiet isolcpus=3 iommu=off\n"
    (target / "etc/kernel/cmdline").write_text(original)
    doc = setup_json(capsys, t.root, target)
    assert doc["bootloader"] == "systemd-boot" and doc["systemd"] is False
    line = (target / "etc/kernel/cmdline").read_text()
    assert line == "root=UUID=1234 ro quiet " + " ".join(SITE_ARGS) + "\n"
    assert doc["commands"][0].startswith("kernel-install add 6.1.0-18-amd64 ")
    assert any("no systemd on the target" in n and "host boot" in n for n in doc["notes"])
    assert setup_json(capsys, t.root, target)["changed"] is False
    setup_json(capsys, t.root, target, "--undo")
    assert (target / "etc/kernel/cmdline").read_text() == original


def test_dracut_gets_a_module_of_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = snapshot_tree(tmp_path)
    target = tmp_path / "target"
    (target / "etc/dracut.conf.d").mkdir(parents=True)
    doc = setup_json(capsys, t.root, target)
    assert doc["initramfs"] == "dracut"
    mod = target / "usr/lib/dracut/modules.d/90partition-vfio"
    assert "inst_hook pre-udev" in (mod / "module-setup.sh").read_text()
    assert "0000:81:00.0" in (mod / "partition-vfio.sh").read_text()
    assert (
        'add_dracutmodules+=" partition-vfio "'
        in (target / "etc/dracut.conf.d/partition-vfio.conf").read_text()
    )
    assert "dracut -f --regenerate-all" in doc["commands"]
    setup_json(capsys, t.root, target, "--undo")
    assert not mod.exists()


def server_1g(t: TreeBuilder, vendor: str = "GenuineIntel", release: str = "6.1.0") -> Path:
    t.cpus(count=8, packages=2, threads=2, nodes=2, memory_per_node=16 * GiB)
    for n in range(2):
        t.node(n, memory_bytes=16 * GiB, free_bytes=14 * GiB, hugepages={2 * MiB: (0, 0)})
    t.kvm()
    root = t.build()
    t.file("/proc/cpuinfo", INTEL_CPUINFO.replace("GenuineIntel", vendor))
    t.file("/proc/sys/kernel/osrelease", release + "\n")
    return root


SITE_1G = """\
version: 1
host: {reserve: {cpus: 2, memory: 1GiB}, isolation: %s}
partitions:
  big: {cpus: 2, memory: 4GiB, hugepages: 1GiB, numa: [0, 1]}
  small: {cpus: 2, memory: 512MiB, hugepages: 2MiB, numa: 1}
"""


def test_pools_per_node_and_size_largest_first(
    tree: TreeBuilder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = server_1g(tree)
    site = tmp_path / "site.yaml"
    site.write_text(SITE_1G % "full")
    doc = setup_json(capsys, host, target_root(tmp_path), "--dry-run", site=site)
    args = doc["kernel_args"]
    assert args[-4:] == ["hugepagesz=1G", "hugepages=0:2,1:2", "hugepagesz=2M", "hugepages=1:256"]
    assert doc["hugepages"] == {str(GiB): {"0": 2, "1": 2}, str(2 * MiB): {"1": 256}}


def test_pools_hold_a_dynamic_partitions_memory_not_its_ceiling(
    tree: TreeBuilder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A partition with dynamic memory gets boot-time pages for its memory now; its
    max_memory is a ceiling, not a reservation (rule 11), and host setup says so."""
    host = server_1g(tree)
    site = tmp_path / "site.yaml"
    site.write_text(
        SITE_1G.replace(
            "memory: 4GiB, hugepages: 1GiB,",
            "memory: 4GiB, min_memory: 2GiB, max_memory: 8GiB, hugepages: 1GiB,",
        )
        % "full"
    )
    doc = setup_json(capsys, host, target_root(tmp_path), "--dry-run", site=site)
    assert doc["kernel_args"][-4:-2] == ["hugepagesz=1G", "hugepages=0:2,1:2"]
    assert doc["hugepages"][str(GiB)] == {"0": 2, "1": 2}
    [said] = [n for n in doc["notes"] if "partition big" in n]
    assert "hold its memory (4GiB), not its max_memory (8GiB)" in said
    assert not any("partition small" in n for n in doc["notes"])


def test_older_kernel_gets_totals_and_is_told(
    tree: TreeBuilder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = server_1g(tree, release="5.10.0-28-amd64")
    site = tmp_path / "site.yaml"
    site.write_text(SITE_1G % "full")
    doc = setup_json(capsys, host, target_root(tmp_path), "--dry-run", site=site)
    assert doc["kernel_args"][-4:] == [
        "hugepagesz=1G",
        "hugepages=4",
        "hugepagesz=2M",
        "hugepages=256",
    ]
    assert any("older than 5.16" in n for n in doc["notes"])


def test_pinned_sites_and_amd_hosts(
    tree: TreeBuilder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = server_1g(tree, vendor="AuthenticAMD")
    site = tmp_path / "site.yaml"
    site.write_text(SITE_1G % "pinned")
    doc = setup_json(capsys, host, target_root(tmp_path), "--dry-run", site=site)
    args = doc["kernel_args"]
    # isolation: pinned keeps every CPU the host's: no boot-time isolation.
    assert not any(
        a.startswith(("isolcpus", "nohz_full", "rcu_nocbs", "irqaffinity")) for a in args
    )
    # AMD: the IOMMU is on by default; amd_iommu=on is no option of the kernel's.
    assert args[0] == "iommu=pt" and not any("iommu=on" in a for a in args)
    assert any("AMD" in n for n in doc["notes"])


def test_an_image_runs_its_own_partition(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The unit and the note for other init systems name the target's program, never the
    virtual environment of the machine that compiled them."""
    t = snapshot_tree(tmp_path)
    target = target_root(tmp_path)
    doc = setup_json(capsys, t.root, target)
    unit = (target / "etc/systemd/system/partition-site.service").read_text()
    assert "ExecStart=/usr/local/bin/partition host boot /etc/partition/site.yaml" in unit
    assert "ExecStop=/usr/local/bin/partition destroy /etc/partition/site.yaml" in unit
    assert sys.prefix not in unit and str(ROOT) not in unit
    # The image does not have it yet: said, so that the boot does not fail silently.
    assert any("/usr/local/bin/partition is not a program in" in n for n in doc["notes"])
    (target / "usr/local/bin").mkdir(parents=True)
    (target / "usr/local/bin/partition").write_text("#!/bin/sh\n")
    (target / "usr/local/bin/partition").chmod(0o755)
    doc = setup_json(capsys, t.root, target)
    assert not any("is not a program" in n for n in doc["notes"])

    other = target_root(tmp_path / "b", systemd=False)
    doc = setup_json(capsys, t.root, other, "--partition-bin", "/opt/partition/bin/partition")
    assert any(
        "`/opt/partition/bin/partition host boot /etc/partition/site.yaml`" in n
        for n in doc["notes"]
    )
    assert not any(sys.prefix in n for n in doc["notes"])

    rc, _, err = run(
        capsys, "--host-root", str(t.root), "host", "setup", str(DEMO), "--root", str(target),
        "--partition-bin", "bin/partition",
    )  # fmt: skip
    assert rc == 2 and "--partition-bin" in err and "absolute" in err


@pytest.mark.parametrize("initramfs", ["initramfs-tools", "dracut"])
def test_no_file_is_only_comments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], initramfs: str
) -> None:
    """Functions with no host driver: nothing to order after vfio-pci, so no modprobe file."""
    t = snapshot_tree(tmp_path)
    root = HostRoot(t.root)
    for addr in DEMO_ADDRS:
        real = root.realpath(f"/sys/bus/pci/devices/{addr}")
        os.unlink(t.root / f"{real}/driver".lstrip("/"))
    target = target_root(tmp_path)
    if initramfs == "dracut":
        shutil.rmtree(target / "etc/initramfs-tools")
        (target / "etc/dracut.conf.d").mkdir(parents=True)
    doc = setup_json(capsys, t.root, target)
    assert doc["initramfs"] == initramfs
    written = [f for f in doc["files"] if not f["symlink"] and f["content"] is not None]
    assert written
    for f in written:
        said = [
            ln for ln in f["content"].splitlines() if ln.strip() and not ln.lstrip().startswith("#")
        ]
        assert said, f"{f['path']} holds only comments"
    assert not (target / "etc/modprobe.d/partition-vfio.conf").exists()
    if initramfs == "dracut":
        conf = (target / "etc/dracut.conf.d/partition-vfio.conf").read_text()
        assert "modprobe.d" not in conf


def test_host_root_refuses_to_write_this_machine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = snapshot_tree(tmp_path)
    rc, _, err = run(capsys, "--host-root", str(t.root), "host", "setup", str(DEMO))
    assert rc == 2 and "--root DIR" in err


def test_generated_unit_passes_systemd_analyze(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """systemd-analyze verify works without systemd as PID 1 on a unit file given by path."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: scripts/setup installs the systemd package")
    t = snapshot_tree(tmp_path)
    target = target_root(tmp_path)
    # verify wants the program to exist here: this machine's, in place of the image's own.
    here = Path(sys.executable).parent / "partition"
    setup_json(capsys, t.root, target, "--partition-bin", str(here))
    units = tmp_path / "units"
    units.mkdir()
    shutil.copy(target / "etc/systemd/system/partition-site.service", units)
    cp = subprocess.run(
        [analyze, "verify", str(units / "partition-site.service")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert cp.returncode == 0, cp.stdout + cp.stderr
    # It can fail: a unit whose command is not there is refused.
    bad = units / "broken.service"
    bad.write_text(
        (units / "partition-site.service")
        .read_text()
        .replace("ExecStart=", "ExecStart=/nonexistent/")
    )
    cp = subprocess.run([analyze, "verify", str(bad)], capture_output=True, text=True, check=False)
    assert cp.returncode != 0


def test_testbed_run_takes_kernel_arguments() -> None:
    from partitioner.cli.main import build_parser
    from partitioner.testbed.server import TestbedServer

    args = build_parser("testbed").parse_args(
        [
            "testbed",
            "run",
            "--append",
            "isolcpus=1 nohz_full=1",
            "--append",
            "iommu=pt",
            "--",
            "true",
        ]
    )
    assert args.append == ["isolcpus=1 nohz_full=1", "iommu=pt"]
    server = TestbedServer("numa", ["true"], append=args.append)
    assert server.append == ["isolcpus=1", "nohz_full=1", "iommu=pt"]


def test_init_top_script_runs_before_udev(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """initramfs-tools' own ordering code (hook-functions: get_prereq_pairs | tsort) puts the
    compiled script before udev's, which starts udevd and loads the drivers."""
    system = Path("/usr/share/initramfs-tools/scripts/init-top")
    if not (system / "udev").exists():
        pytest.skip("initramfs-tools (with udev's init-top script) is not installed")
    t = snapshot_tree(tmp_path)
    target = target_root(tmp_path)
    setup_json(capsys, t.root, target)
    scripts = tmp_path / "init-top"
    shutil.copytree(system, scripts)
    shutil.copy(target / "etc/initramfs-tools/scripts/init-top/partition-vfio", scripts)
    order = subprocess.run(
        ["sh", "-c", '. /usr/share/initramfs-tools/hook-functions; initdir="$1"; scriptdir=; '
         "get_prereq_pairs | tsort", "sh", str(scripts)],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert order.index("partition-vfio") < order.index("udev"), order
