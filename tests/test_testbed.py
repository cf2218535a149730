"""The emulated VT-d server: topology parsing and argv (pure), the initramfs, and real boots of `small`."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from partitioner.cpuset import CpuSet
from partitioner.errors import PreconditionError
from partitioner.kernel.root import HostRoot
from partitioner.run import run
from partitioner.testbed.initramfs import (
    INIT_SCRIPT,
    TIMER_CHECK_AWK,
    CpioWriter,
    bootable_kernel,
    build_initramfs,
    module_load_order,
)
from partitioner.testbed.server import (
    TestbedBootFailure,
    TestbedEmulationFault,
    TestbedHang,
    TestbedQemuCrash,
    TestbedServer,
    TestbedTimeout,
    TestbedTimerFault,
    hidden_shares,
    job_script,
    once_more_after_a_fault,
    run_in_testbed,
)
from partitioner.testbed.topology import (
    Share,
    Topology,
    TopologyError,
    expected_functions,
    kernel_cmdline,
    load_topology,
    parse_topology,
    qemu_args,
)
from partitioner.units import GiB, MiB

PROJECT = Path(__file__).resolve().parents[1]


def argv_of(topo: Topology, shares: list[Share] | None = None) -> list[str]:
    return qemu_args(
        topo,
        kernel="/boot/vmlinuz-X",
        initrd="/c/initrd",
        cmdline=kernel_cmdline(topo),
        console_log="/r/console.log",
        shares=shares or [],
    )


def devices(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


# -- topology: parsing -----------------------------------------------------------


def test_presets_parse_into_what_the_brief_asks() -> None:
    small = load_topology("small")
    assert small.cpu.vcpus == 2 and len(small.nodes) == 1
    kinds = [p.kind for p in small.ports]
    assert kinds.count("bridge") == 1
    assert any(p.slot is not None and p.slot.models == ("e1000e", "e1000e") for p in small.ports)

    numa = load_topology("numa")
    assert (numa.cpu.model, numa.cpu.sockets, numa.cpu.cores, numa.cpu.threads) == (
        "Nehalem", 2, 2, 2,
    )  # fmt: skip
    assert [n.cpus for n in numa.nodes] == [CpuSet.parse("0-3"), CpuSet.parse("4-7")]
    assert all(n.memory_bytes == GiB and n.hugepages_2m == 64 for n in numa.nodes)
    assert {p.node for p in numa.ports} == {None, 0, 1}
    assert any(p.switch for p in numa.ports)
    models = {m for e in expected_functions(numa) for m in [e.model]}
    assert {"secondary-vga", "ich9-intel-hda", "nvme", "e1000", "e1000e"} <= models


def test_nodes_share_sockets_and_cpus_follow_qemu_numbering() -> None:
    t = parse_topology(
        {
            "cpu": {"sockets": 4, "cores": 2, "threads": 2},
            "nodes": [{"memory": "256MiB"}, {"memory": "512MiB", "hugepages_2m": 8}],
        },
        "t.yaml",
    )
    assert t.name == "t"
    assert [str(n.cpus) for n in t.nodes] == ["0-7", "8-15"]
    assert t.memory_bytes == 768 * MiB


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ("not a mapping", "must be a mapping"),
        ({"cpu": {"sockets": 3}, "nodes": [{"memory": "1GiB"}, {"memory": "1GiB"}]}, "evenly"),
        ({"cpu": {"cores": 0}}, "cpu.cores: 0 is not a positive integer"),
        ({"cpu": {"sockets": True}}, "cpu.sockets"),
        ({"nodes": [{"memory": "1GB"}]}, "binary unit"),
        ({"nodes": [{"memory": "64MiB"}]}, ">= 128MiB"),
        ({"nodes": [{"memory": "256MiB", "hugepages_2m": 100}]}, "more than half"),
        (
            {"ports": [{"functions": ["e1000"]}]},
            "conventional PCI device and cannot go on a PCIe port",
        ),
        ({"ports": [{"bridge": ["e1000e"]}]}, "cannot go behind a bridge"),
        ({"ports": [{"functions": ["rtl8139"]}]}, "unknown device model 'rtl8139'"),
        ({"ports": [{"functions": ["e1000e"] * 9}]}, "at most 8 functions"),
        ({"ports": [{"functions": ["e1000e"], "bridge": ["e1000"]}]}, "exactly one of"),
        ({"ports": [{}]}, "exactly one of"),
        ({"ports": [{"node": 3, "functions": ["e1000e"]}]}, "node: 3 is not one of the 1 nodes"),
        ({"ports": [{"switch": [{"functions": ["nvme"], "x": 1}]}]}, "only functions"),
        ({"cpu": {"sockets": 1}, "color": "red"}, "unknown key 'color'"),
        ({"name": "a b"}, "not a simple name"),
    ],
)
def test_bad_topologies_are_refused_with_the_reason(doc: object, needle: str) -> None:
    with pytest.raises(TopologyError) as ei:
        parse_topology(doc, "bad.yaml")
    assert needle in str(ei.value)
    assert str(ei.value).startswith("bad.yaml: ")
    assert ei.value.exit_code == 2


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(TopologyError) as ei:
        parse_topology({"cpu": {"cores": -1}, "ports": [{"functions": ["nope"]}, {}]}, "x.yaml")
    assert len(ei.value.problems) == 3


def test_load_topology_names_presets_and_reads_files(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match=r"no such preset.*numa, small"):
        load_topology("huge")
    f = tmp_path / "mine.yaml"
    f.write_text("cpu: {sockets: 1, cores: 1}\nnodes: [{memory: 256MiB}]\n")
    assert load_topology(str(f)).name == "mine"
    f.write_text("cpu: [1, 2\n")
    with pytest.raises(TopologyError, match="not valid YAML"):
        load_topology(str(f))
    with pytest.raises(TopologyError, match="cannot read"):
        load_topology(str(tmp_path / "missing.yaml"))


# -- topology: the QEMU argv ------------------------------------------------------


def test_machine_iommu_and_cpu_arguments() -> None:
    argv = argv_of(load_topology("numa"))
    assert argv[0] == "qemu-system-x86_64"
    assert "-nodefaults" in argv and "-no-reboot" in argv
    assert opt(argv, "-machine") == ["q35,kernel-irqchip=split"]
    assert opt(argv, "-accel") == ["tcg,thread=multi"]
    assert opt(argv, "-cpu") == ["Nehalem"]
    assert opt(argv, "-smp") == ["8,sockets=2,cores=2,threads=2"]
    assert opt(argv, "-m") == ["2G"]
    devs = devices(argv)
    assert devs[0] == "intel-iommu,intremap=on,caching-mode=on"
    assert opt(argv, "-serial") == ["file:/r/console.log", "stdio"]
    assert opt(argv, "-kernel") == ["/boot/vmlinuz-X"] and opt(argv, "-initrd") == ["/c/initrd"]


def test_numa_nodes_have_their_own_memory_backend() -> None:
    argv = argv_of(load_topology("numa"))
    assert opt(argv, "-object") == [
        "memory-backend-ram,id=mem0,size=1G",
        "memory-backend-ram,id=mem1,size=1G",
    ]
    assert opt(argv, "-numa") == [
        "node,nodeid=0,cpus=0-3,memdev=mem0",
        "node,nodeid=1,cpus=4-7,memdev=mem1",
    ]


def test_kernel_cmdline_turns_the_iommu_on_and_reserves_hugepages_per_node() -> None:
    line = kernel_cmdline(load_topology("numa")).split()
    for arg in (
        "intel_iommu=on",
        "iommu=pt",
        "console=ttyS0",
        "hugepagesz=2M",
        "hugepages=0:64,1:64",
    ):
        assert arg in line
    none = parse_topology({"nodes": [{"memory": "256MiB"}]})
    assert not any(a.startswith("hugepages") for a in kernel_cmdline(none).split())


def test_root_ports_pxb_and_node_local_devices() -> None:
    t = parse_topology(
        {
            "cpu": {"sockets": 2},
            "nodes": [{"memory": "256MiB"}, {"memory": "256MiB"}],
            "ports": [{"functions": ["e1000e"]}, {"node": 1, "functions": ["e1000e"]}],
        }
    )
    devs = devices(argv_of(t))
    assert "pxb-pcie,id=pxb1,bus_nr=0x80,numa_node=1,bus=pcie.0,addr=0x2" in devs
    assert "pcie-root-port,id=rp0,bus=pcie.0,addr=0x3,chassis=1,slot=1" in devs
    assert "pcie-root-port,id=rp1,bus=pxb1,addr=0x0,chassis=2,slot=2" in devs
    assert "e1000e,id=d0f0,bus=rp0,addr=0x0.0" in devs
    assert "e1000e,id=d1f0,bus=rp1,addr=0x0.0" in devs
    assert not any(d.startswith("pxb-pcie,id=pxb0") for d in devs)


def test_multifunction_slot_gpu_with_audio_and_nvme() -> None:
    t = parse_topology(
        {
            "ports": [
                {"functions": ["e1000e", "e1000e"]},
                {"functions": ["secondary-vga", "ich9-intel-hda"]},
                {"functions": ["nvme"]},
            ]
        }
    )
    devs = devices(argv_of(t))
    assert "e1000e,id=d0f0,bus=rp0,addr=0x0.0,multifunction=on" in devs
    assert "e1000e,id=d0f1,bus=rp0,addr=0x0.1" in devs
    assert "secondary-vga,id=d1f0,bus=rp1,addr=0x0.0,multifunction=on" in devs
    assert "ich9-intel-hda,id=d1f1,bus=rp1,addr=0x0.1" in devs
    assert "nvme,id=d2f0,bus=rp2,addr=0x0.0,serial=tbd2f0" in devs


def test_switch_and_bridge() -> None:
    t = parse_topology(
        {
            "ports": [
                {"switch": [{"functions": ["e1000e"]}, {"functions": ["nvme"]}]},
                {"bridge": ["e1000", "e1000"]},
            ]
        }
    )
    devs = devices(argv_of(t))
    assert "x3130-upstream,id=sw0,bus=rp0,addr=0x0" in devs
    assert "xio3130-downstream,id=sw0p0,bus=sw0,addr=0x0,chassis=2,slot=2" in devs
    assert "xio3130-downstream,id=sw0p1,bus=sw0,addr=0x1,chassis=3,slot=3" in devs
    assert "e1000e,id=d0p0f0,bus=sw0p0,addr=0x0.0" in devs
    assert "nvme,id=d0p1f0,bus=sw0p1,addr=0x0.0,serial=tbd0p1f0" in devs
    assert "pcie-root-port,id=rp1,bus=pcie.0,addr=0x3,chassis=4,slot=4" in devs
    assert "pcie-pci-bridge,id=br1,bus=rp1,addr=0x0" in devs
    assert "e1000,id=br1s1,bus=br1,addr=0x1" in devs
    assert "e1000,id=br1s2,bus=br1,addr=0x2" in devs
    # chassis/slot pairs must be unique or QEMU refuses to start
    pairs = [d.split("chassis=")[1] for d in devs if "chassis=" in d]
    assert len(pairs) == len(set(pairs))


def test_shares_are_9p_on_pcie0_and_only_the_root_is_readonly() -> None:
    argv = argv_of(
        load_topology("numa"), [Share("hostroot", "/", True), Share("tbout", "/x/out", False)]
    )
    assert opt(argv, "-fsdev") == [
        "local,id=fshostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "local,id=fstbout,path=/x/out,security_model=none,multidevs=remap",
    ]
    nine = [d for d in devices(argv) if d.startswith("virtio-9p-pci")]
    assert nine == [
        "virtio-9p-pci,fsdev=fshostroot,mount_tag=hostroot,bus=pcie.0,addr=0x18",
        "virtio-9p-pci,fsdev=fstbout,mount_tag=tbout,bus=pcie.0,addr=0x19",
    ]


def test_qemu_args_is_pure() -> None:
    t = load_topology("numa")
    assert argv_of(t) == argv_of(t)


def test_expected_functions_group_keys() -> None:
    exp = expected_functions(load_topology("small"))
    keys = [e.group_key for e in exp]
    assert keys == ["port0", "port1", "port2", "port2", "bridge3", "bridge3"]
    assert exp[4].path == ((5, 0), (0, 0), (1, 0)) and exp[4].id == "8086:100e"


# -- the initramfs and the job ------------------------------------------------------


def test_cpio_newc_is_read_back_by_cpio(tmp_path: Path) -> None:
    if shutil.which("cpio") is None:
        pytest.skip("needs cpio")
    w = CpioWriter()
    w.directory("bin")
    w.file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    w.file("odd", b"x" * 5)
    w.symlink("bin/link", "tool")
    archive = tmp_path / "a.cpio"
    archive.write_bytes(w.finish())
    dest = tmp_path / "out"
    dest.mkdir()
    run(["sh", "-c", f"cpio -id --quiet < {archive}"], cwd=dest)
    assert (dest / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.access(dest / "bin/tool", os.X_OK)
    assert (dest / "odd").read_bytes() == b"xxxxx"
    assert os.readlink(dest / "bin/link") == "tool"


def _modules_dir() -> Path:
    dirs = sorted(Path("/lib/modules").glob("*/modules.dep"))
    if not dirs:
        pytest.skip("no kernel modules installed")
    return dirs[-1].parent


def test_module_order_puts_dependencies_first() -> None:
    order = [
        m.name for m in module_load_order(_modules_dir(), ["virtio_pci", "9pnet_virtio", "9p"])
    ]
    for before, after in [
        ("virtio_ring", "virtio"),
        ("virtio", "virtio_pci"),
        ("virtio_pci_modern_dev", "virtio_pci"),
        ("9pnet", "9pnet_virtio"),
        ("netfs", "fscache"),
        ("fscache", "9p"),
    ]:
        if before in order and after in order:
            assert order.index(before) < order.index(after), order
    assert order[-1] == "9p"
    assert len(order) == len(set(order))


def test_initramfs_holds_init_busybox_and_modules_in_order(tmp_path: Path) -> None:
    mods = module_load_order(_modules_dir(), ["9p"])
    data = build_initramfs(mods, b"BUSYBOX")
    dest = tmp_path / "x"
    dest.mkdir()
    (tmp_path / "i.cpio").write_bytes(data)
    run(["sh", "-c", f"cpio -id --quiet < {tmp_path / 'i.cpio'}"], cwd=dest)
    assert (dest / "init").read_text() == INIT_SCRIPT
    assert (dest / "bin/busybox").read_bytes() == b"BUSYBOX"
    assert (dest / "modules/order").read_text().split() == [f"{m.name}.ko" for m in mods]
    assert all((dest / "modules" / f"{m.name}.ko").stat().st_size > 1000 for m in mods)


def test_pvh_kernels_boot_from_their_unpacked_elf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PARTITION_CACHE_DIR", str(tmp_path / "cache"))
    fake = tmp_path / "vmlinuz-9.9.9"
    fake.write_bytes(b"\xfd7zXZ\x00garbage")
    assert bootable_kernel(fake) == fake  # no config-9.9.9 saying CONFIG_PVH: as it is
    (tmp_path / "config-9.9.9").write_text("CONFIG_PVH=y\n")
    assert bootable_kernel(fake) == fake  # not a real xz stream: as it is
    real = sorted(Path("/boot").glob("vmlinuz-*"))
    if not real or not os.access(real[-1], os.R_OK):
        pytest.skip("no readable /boot/vmlinuz-*")
    config = real[-1].parent / f"config-{real[-1].name[len('vmlinuz-') :]}"
    if "CONFIG_PVH=y" not in config.read_text().splitlines():
        pytest.skip("this kernel has no PVH entry")
    elf = bootable_kernel(real[-1])
    assert elf.parent == tmp_path / "cache" / "testbed"
    assert elf.read_bytes()[:4] == b"\x7fELF"
    assert bootable_kernel(real[-1]) == elf  # cached


def test_job_script_runs_argv_in_cwd_with_only_the_given_env(tmp_path: Path) -> None:
    weird = ["it's", "a b", "$HOME", "`x`", ""]
    script = job_script(
        [
            sys.executable,
            "-c",
            "import os,sys; print(os.getcwd()); print(sys.argv[1:]); print(sorted(os.environ))",
            *weird,
        ],
        str(tmp_path),
        {"A": "1 2", "PATH": "/usr/bin:/bin"},
    )
    (tmp_path / "job").write_text(script)
    out = run(["/bin/sh", str(tmp_path / "job")], env={"LEAK": "x", "PATH": "/usr/bin:/bin"}).stdout
    lines = out.splitlines()
    assert lines[0] == str(tmp_path)
    assert lines[1] == repr(weird)
    assert "LEAK" not in lines[2] and "'A'" in lines[2]
    cp = run(["/bin/sh", "-c", job_script(["true"], str(tmp_path / "nope"), {})], check=False)
    assert cp.returncode == 125
    assert f"no directory {tmp_path / 'nope'} inside" in cp.stdout


def test_directories_the_server_hides_are_shared_on_their_own() -> None:
    shares = hidden_shares(["/tmp/ci/clone/tests", "/tmp/ci/clone/.venv", "/srv/x", "/var/a/b"])
    assert [(s.tag, s.path, s.readonly) for s in shares] == [
        ("tbhidden0", "/tmp/ci", True),
        ("tbhidden1", "/var/a", True),
    ]
    script = job_script(["true"], "/tmp/ci/clone", {}, shares)
    mounts = [ln for ln in script.splitlines() if " mount -t 9p " in ln]
    assert len(mounts) == 2 and "tbhidden0 /tmp/ci" in mounts[0] and ",ro " in mounts[0]
    assert script.index("tbhidden1 /var/a") < script.index("cd /tmp/ci/clone")


@pytest.mark.parametrize("path", ["/tmp", "/proc/1", "/sys/x", "/dev/shm/x"])
def test_a_directory_the_server_cannot_show_is_refused(path: str) -> None:
    with pytest.raises(PreconditionError, match=r"is not visible inside the emulated server"):
        hidden_shares([path])


# -- real boots of `small` ------------------------------------------------------------


def _boot_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("qemu-system-x86_64") is None:
        return "needs qemu-system-x86"
    if not list(Path("/boot").glob("vmlinuz-*")) or not Path("/bin/busybox").exists():
        return "needs linux-image-amd64 and busybox-static"
    return None


boots = pytest.mark.skipif(_boot_skip_reason() is not None, reason=str(_boot_skip_reason()))


def qemu_processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line mentions ``text`` (a run directory: unique per boot)."""
    root = HostRoot("/")
    pids = []
    for name in root.listdir("/proc"):
        if name.isdigit():
            cmd = root.read(f"/proc/{name}/cmdline") or ""
            if text in cmd and "qemu" in cmd:
                pids.append(int(name))
    return pids


@pytest.mark.qemu
@boots
@pytest.mark.parametrize(
    ("argv", "rc"), [(["true"], 0), (["sh", "-c", "echo out; echo err >&2; exit 7"], 7)]
)
def test_exit_code_and_output_come_back_and_no_qemu_is_left(
    argv: list[str], rc: int, tmp_path: Path
) -> None:
    out, progress = io.StringIO(), io.StringIO()
    with TestbedServer(
        "small", argv, timeout=300, stream=out, progress=progress, out_dir=tmp_path
    ) as tb:
        assert tb.wait() == rc
        run_dir = str(tb.run_dir)
        pid = tb.proc.pid if tb.proc else -1
    assert tb.boot_seconds is not None and tb.boot_seconds < 240
    if rc == 7:
        assert out.getvalue() == "out\nerr\n"  # no kernel log, no CR: ttyS1 is raw
    assert "booting emulated server (small: 2 vCPUs, 1 node) with /" in progress.getvalue()
    assert qemu_processes_mentioning(run_dir) == []
    assert not Path(f"/proc/{pid}").exists() or qemu_processes_mentioning(run_dir) == []
    assert not Path(run_dir).exists()


@pytest.mark.qemu
@boots
def test_cwd_env_and_the_writable_share(tmp_path: Path) -> None:
    out = io.StringIO()
    # A directory under /tmp, which is private inside: shared on its own, as a checkout
    # under /tmp is.
    cwd = tmp_path / "checkout"
    cwd.mkdir()
    (cwd / "marker").write_text("seen\n")
    script = (
        'echo "$PWD|$FOO|$TESTBED|$(id -u)"; cat marker; '
        'echo made > "$TESTBED_OUT/file"; '
        "touch /root/x 2>/dev/null && echo root-writable || echo root-readonly; "
        "touch /tmp/y /var/lib/partition/z /var/log/w /run/v && echo private-writable; "
        "grep -c . /proc/cpuinfo >/dev/null; cat /sys/devices/system/node/possible"
    )
    rc = run_in_testbed(
        "small",
        ["sh", "-c", script],
        timeout=300,
        cwd=str(cwd),
        env={"FOO": "bar baz"},
        out_dir=tmp_path,
        stream=out,
        progress=None,
    )
    assert rc == 0, out.getvalue()
    lines = out.getvalue().splitlines()
    assert lines[0] == f"{cwd}|bar baz|small|0"
    assert lines[1:4] == ["seen", "root-readonly", "private-writable"]
    assert (tmp_path / "file").read_text() == "made\n"


@pytest.mark.qemu
@boots
def test_timeout_kills_the_server() -> None:
    t0 = time.monotonic()
    tb = TestbedServer("small", ["sleep", "600"], timeout=4, stream=None, progress=None)
    with pytest.raises(TestbedTimeout) as ei, tb:
        tb.wait()
    run_dir = str(tb.run_dir)
    assert time.monotonic() - t0 < 60
    assert ei.value.exit_code == 4 and "did not finish within 4s" in str(ei.value)
    assert qemu_processes_mentioning(run_dir) == []
    # the kernel log is kept for whoever reads the error
    assert ei.value.log_path is not None and ei.value.log_path.exists()
    assert str(ei.value.log_path) in str(ei.value)
    shutil.rmtree(run_dir)


def _stuck_cpus(tmp_path: Path, first: str, second: str, present: str) -> str:
    """What /init's timer check names, by the busybox awk that runs it there."""
    (tmp_path / "loc0").write_text(first)
    (tmp_path / "loc1").write_text(second)
    (tmp_path / "check.awk").write_text(TIMER_CHECK_AWK)
    cp = subprocess.run(
        ["/bin/busybox", "awk", "-f", "check.awk", "-v", f"present={present}", "loc0", "loc1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    return cp.stdout.strip()


@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="needs busybox-static")
def test_the_timer_check_names_a_cpu_that_did_not_tick_or_is_not_online(tmp_path: Path) -> None:
    head = "           CPU0       CPU1       CPU2\n"
    loc = " LOC:  {}  {}  {}   Local timer interrupts\n"
    first = head + loc.format(100, 200, 300)
    assert _stuck_cpus(tmp_path, first, head + loc.format(150, 260, 301), "0 1 2") == ""
    assert _stuck_cpus(tmp_path, first, head + loc.format(150, 200, 350), "0 1 2") == "1"
    # CPU 3 is present but not online: no column for it.
    assert _stuck_cpus(tmp_path, first, head + loc.format(150, 210, 350), "0 1 2 3") == "3"
    # A CPU that went offline between the readings.
    gone = "           CPU0       CPU2\n LOC:  150  350   Local timer interrupts\n"
    assert _stuck_cpus(tmp_path, first, gone, "0 1 2") == "1"


@pytest.mark.qemu
@boots
@pytest.mark.parametrize(
    ("append", "silence", "reason", "every_log_says"),
    [
        # maxcpus=1: the second of `small`'s CPUs is present but never brought up, as a
        # CPU whose timer the emulation lost looks to /init's check.
        (
            "maxcpus=1",
            60,
            "CPU 1 of the emulated server did not run or took no timer interrupts",
            "testbed-init: CPU 1: not online",
        ),
        # `quiet` keeps the kernel silent until /init's first line, seconds after QEMU's
        # start: longer than the 2s this server is given, as a hung boot is silent.
        ("quiet", 2, "boot stopped: no kernel output for 2s", ""),
    ],
    ids=["a CPU that never runs", "a boot that stops printing"],
)
def test_a_faulty_boot_is_booted_again_then_a_boot_failure(
    append: str, silence: float, reason: str, every_log_says: str
) -> None:
    progress = io.StringIO()
    tb = TestbedServer(
        "small",
        ["true"],
        timeout=300,
        append=[append],
        boot_silence=silence,
        stream=None,
        progress=progress,
    )
    with pytest.raises(TestbedBootFailure) as ei, tb:
        tb.wait()
    assert reason in str(ei.value) and "in each of 3 boots" in str(ei.value)
    assert progress.getvalue().count("booting it again") == 2
    assert tb.run_dir is not None and qemu_processes_mentioning(str(tb.run_dir)) == []
    # Every boot's kernel log is kept.
    for log in ("console-boot1.log", "console-boot2.log", "console.log"):
        assert every_log_says in (tb.run_dir / log).read_text(errors="replace")
    shutil.rmtree(tb.run_dir)


@pytest.mark.qemu
@boots
def test_a_tickless_cpu_by_design_passes_the_timer_check_on_the_first_boot() -> None:
    # nohz_full stops the tick of a CPU that runs a single task: what a site's boot-time
    # settings give its partitions' CPUs, not a fault.  The check must still see them tick
    # (with one busy loop per CPU, some of seven such CPUs were taken for faulty each boot).
    progress = io.StringIO()
    tb = TestbedServer(
        "numa",
        ["true"],
        timeout=300,
        append=["nohz_full=1-7 rcu_nocbs=1-7 isolcpus=managed_irq,domain,1-7"],
        stream=None,
        progress=progress,
    )
    with tb:
        assert tb.wait() == 0
    assert "booting it again" not in progress.getvalue()


@pytest.mark.qemu
@boots
def test_a_cpu_that_loses_its_timer_while_the_command_runs_stops_the_server() -> None:
    t0 = time.monotonic()
    # The kernel's own words, through its log as the kernel prints them.
    line = "rcu: \tPossible timer handling issue on cpu=1 timer-softirq=2"
    tb = TestbedServer(
        "small",
        ["sh", "-c", f"printf '{line}\\n' > /dev/kmsg; sleep 600"],
        timeout=300,
        stream=None,
        progress=None,
    )
    with pytest.raises(TestbedTimerFault) as ei, tb:
        tb.wait()
    assert time.monotonic() - t0 < 120
    assert "cpu=1 timer-softirq=2" in str(ei.value) and ei.value.exit_code == 4
    assert tb.run_dir is not None and qemu_processes_mentioning(str(tb.run_dir)) == []
    assert ei.value.log_path is not None and str(ei.value.log_path) in str(ei.value)
    shutil.rmtree(tb.run_dir)


def _wait_for(path: Path, seconds: float = 240) -> None:
    """Until the emulated server has written ``path`` (on a share), at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert path.exists(), f"the emulated server did not write {path} in {seconds:g}s"


@pytest.mark.qemu
@boots
def test_a_server_that_stops_answering_under_the_command_is_stopped() -> None:
    # A command quiet for three times the limit is not taken for a hang: the heartbeat runs.
    quiet = TestbedServer(
        "small", ["sleep", "15"], timeout=300, hang_seconds=5, stream=None, progress=None
    )
    with quiet:
        assert quiet.wait() == 0
    # Every emulated CPU stopped at once, as a hung emulator looks from the host.
    tb = TestbedServer(
        "small", ["sleep", "600"], timeout=300, hang_seconds=5, stream=None, progress=None
    )
    with pytest.raises(TestbedHang) as ei, tb:
        assert tb.run_dir is not None and tb.proc is not None
        _wait_for(tb.run_dir / "ctl" / "heartbeat")
        os.kill(tb.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        tb.wait()
    assert time.monotonic() - t0 < 60
    assert isinstance(ei.value, TestbedEmulationFault) and ei.value.exit_code == 4
    assert "no heartbeat for 5s" in str(ei.value)
    assert tb.run_dir is not None and qemu_processes_mentioning(str(tb.run_dir)) == []
    shutil.rmtree(tb.run_dir)


@pytest.mark.qemu
@boots
def test_a_qemu_that_crashes_under_the_command_is_an_emulation_fault() -> None:
    tb = TestbedServer("small", ["sleep", "600"], timeout=300, stream=None, progress=None)
    with pytest.raises(TestbedQemuCrash) as ei, tb:
        assert tb.run_dir is not None and tb.proc is not None
        _wait_for(tb.run_dir / "ctl" / "started")  # the command runs from here on
        os.kill(tb.proc.pid, signal.SIGSEGV)  # as the emulator's own crash ends it
        tb.wait()
    assert isinstance(ei.value, TestbedEmulationFault) and ei.value.exit_code == 4
    assert "died of SIGSEGV" in str(ei.value)
    assert tb.run_dir is not None and qemu_processes_mentioning(str(tb.run_dir)) == []
    shutil.rmtree(tb.run_dir)


@pytest.mark.qemu
@boots
def test_a_qemu_that_crashes_during_the_boot_is_booted_again() -> None:
    progress = io.StringIO()
    tb = TestbedServer("small", ["echo", "ran"], timeout=300, stream=None, progress=progress)
    with tb:
        assert tb.run_dir is not None and tb.proc is not None
        console, started = tb.run_dir / "console.log", tb.run_dir / "ctl" / "started"
        deadline = time.monotonic() + 120
        # The kernel has begun (its first line is out) and /init has not reached the command.
        while time.monotonic() < deadline:
            if console.exists() and b"Linux version" in console.read_bytes():
                break
            time.sleep(0.05)
        assert not started.exists()
        first = tb.proc
        os.kill(first.pid, signal.SIGSEGV)  # as Debian's QEMU 7.2 was seen to crash
        assert tb.wait() == 0
        assert tb.proc is not first
    said = progress.getvalue()
    assert "died of SIGSEGV during the boot" in said and said.count("booting it again") == 1
    assert qemu_processes_mentioning(str(tb.run_dir)) == []


@pytest.mark.parametrize(
    ("ends", "runs", "result"),
    [
        (["hang", 0], 2, 0),  # a fault, then the command's own exit code
        (["hang", "hang"], 2, TestbedHang),  # a second fault is the answer
        (["timeout"], 1, TestbedTimeout),  # a command too slow is not the emulation's fault
        ([3], 1, 3),  # nor is a command that failed
    ],
    ids=["fault then done", "fault twice", "timeout", "exit 3"],
)
def test_a_command_that_may_run_twice_runs_once_more_after_an_emulation_fault(
    ends: list[str | int], runs: int, result: int | type[Exception]
) -> None:
    calls: list[int] = []

    def run() -> int:
        end = ends[len(calls)]
        calls.append(1)
        if end == "hang":
            raise TestbedHang("small", 120, None)
        if end == "timeout":
            raise TestbedTimeout("small", 900, True)
        assert isinstance(end, int)
        return end

    said = io.StringIO()
    if isinstance(result, int):
        assert once_more_after_a_fault(run, said, "running it again") == result
    else:
        with pytest.raises(result):
            once_more_after_a_fault(run, said, "running it again")
    assert len(calls) == runs
    assert ("running it again on a fresh server" in said.getvalue()) is (ends[0] == "hang")


@pytest.mark.qemu
@boots
def test_a_kernel_that_does_not_boot_is_a_boot_failure_with_the_log(tmp_path: Path) -> None:
    real = sorted(Path("/boot").glob("vmlinuz-*"))[-1]
    fake = tmp_path / real.name
    fake.write_bytes(b"\0" * 4096)
    tb = TestbedServer("small", ["true"], timeout=120, kernel=fake, progress=None)
    with pytest.raises(TestbedBootFailure) as ei, tb:
        tb.wait()
    assert "did not come up" in str(ei.value)
    assert "linux kernel too old" in ei.value.log_tail  # QEMU's own complaint about the image
    assert qemu_processes_mentioning(str(tmp_path)) == []
    assert tb.run_dir is not None and ei.value.log_path == tb.run_dir / "console.log"
    shutil.rmtree(tb.run_dir)


@pytest.mark.qemu
@boots
@pytest.mark.parametrize(
    ("sig", "rc"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)]
)
def test_ctrl_c_sigterm_or_sigkill_on_the_cli_ends_qemu(sig: int, rc: int) -> None:
    # The CLI's own timeout bounds the wait for its lines: readline() blocks until it says
    # something, and it says something at the latest when that timeout ends the server.
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "partitioner.cli.main", "testbed", "run"),
            *("--timeout", "300", "--", "sleep", "600"),
        ],
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As at a terminal: a suite started in the background by a shell without job
        # control inherits SIGINT ignored, and Python then leaves it ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stderr is not None
        line = ""
        deadline = time.monotonic() + 240
        while "up after" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, "the CLI ended before the server came up"
        children = [
            int(p)
            for p in HostRoot("/").listdir("/proc")
            if p.isdigit()
            and (HostRoot("/").read(f"/proc/{p}/stat") or "").split(") ")[-1].split()[1:2]
            == [str(proc.pid)]
        ]
        assert children, "no QEMU child of the CLI"
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == rc

        def qemu_left() -> list[int]:
            return [
                pid
                for pid in children
                if "qemu" in (HostRoot("/").read(f"/proc/{pid}/cmdline") or "")
            ]

        # A CLI that cannot clean up (SIGKILL) leaves it to the kernel: QEMU dies with it.
        deadline = time.monotonic() + 30
        while qemu_left() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert qemu_left() == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.qemu
@boots
def test_snapshot_of_small_reads_back_as_that_host(tmp_path: Path) -> None:
    from partitioner.inventory import scan
    from partitioner.testbed.server import snapshot_testbed

    dest = tmp_path / "snap"
    snapshot_testbed("small", dest, timeout=400, progress=None)
    host = scan(HostRoot(dest))
    assert sorted(host.cpus) == [0, 1]
    assert host.has_iommu
    e1000e = [f for f in host.pci.values() if f.id == "8086:10d3"]
    assert len(e1000e) == 4
    # the two-function NIC: two e1000e in one slot, one group
    by_slot: dict[tuple[int, int, int], list[int | None]] = {}
    for f in e1000e:
        by_slot.setdefault(f.address.slot_key, []).append(f.iommu_group)
    assert sorted(len(g) for g in by_slot.values()) == [1, 1, 2]
    assert all(len(set(g)) == 1 for g in by_slot.values())
    assert host.nodes[0].hugepages[2 * MiB].total == 32
