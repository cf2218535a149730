"""Native speed on KVM: BARs, the 64-bit PCI window and address width, GPU options, KVM settings.

Hosts with GPUs are TreeBuilder trees laid out like real cards (tests/gpuhosts.py),
read back through the real inventory and planned by the real planner; the KVM
probe asks this machine's /dev/kvm; BAR parsing is checked against lspci on
this machine's own devices.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from gpuhosts import data_centre_gpu, display_gpu, gpu_server
from test_argv import CAPS
from treebuilder import BAR_MEM64_PREF, GiB, MiB, TreeBuilder

from partitioner.errors import GuestError, PlanError
from partitioner.guest.argv import guest_paths, kvm_settings, qemu_argv
from partitioner.guest.caps import QemuCaps
from partitioner.guest.kvm import (
    KVM_X86_DISABLE_EXITS_HLT,
    KvmCaps,
    probe_kvm,
)
from partitioner.inventory import scan
from partitioner.inventory.bars import (
    IORESOURCE_MEM_64,
    IORESOURCE_PREFETCH,
    high_bytes,
    parse_resource,
    read_bars,
)
from partitioner.inventory.cpus import phys_bits
from partitioner.inventory.model import Host
from partitioner.kernel.root import HostRoot
from partitioner.manifest.loader import loads
from partitioner.manifest.model import Manifest
from partitioner.planning.mmio import DEFAULT_WINDOW, bits_for, layout
from partitioner.planning.model import Placement, Plan
from partitioner.planning.planner import plan

# An H100 PCIe's `resource` as the kernel prints it: BAR0 32-bit registers, BAR1 and BAR3
# 64-bit prefetchable (each followed by the empty upper half), the ROM line, SR-IOV lines.
H100_RESOURCE = """\
0x00000000fb000000 0x00000000fbffffff 0x0000000000040200
0x0000380000000000 0x0000381fffffffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000382000000000 0x0000382001ffffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x00000000fc000000 0x00000000fc07ffff 0x0000000000046200
0x0000000000000000 0x0000000000000000 0x0000000000000000
"""


def manifest(text: str) -> Manifest:
    return loads(textwrap.dedent(text), file="site.yaml")


def host_of(t: TreeBuilder) -> Host:
    return scan(HostRoot(t.build()))


def problems(m: Manifest, h: Host) -> str:
    with pytest.raises(PlanError) as e:
        plan(m, h)
    return "\n".join(map(str, e.value.problems))


def _site(partitions: str, accel: str = "kvm") -> Manifest:
    return manifest(
        "version: 1\nhost:\n  reserve: {cpus: 2, memory: 8GiB}\n"
        f"  accel: {accel}\n  isolation: pinned\npartitions:\n" + textwrap.indent(partitions, "  ")
    )


def _argv(result: Plan, name: str, caps: QemuCaps = CAPS) -> list[str]:
    p = result.placements[name]
    return qemu_argv(p, result, guest_paths(Path("/run/p"), Path("/var/log/p"), name), caps)


def _after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


# -- BARs ------------------------------------------------------------------------------


def test_resource_of_a_data_centre_gpu() -> None:
    bars = parse_resource(H100_RESOURCE)
    assert [(b.index, b.size, b.kind) for b in bars] == [
        (0, 16 * MiB, "mem32"),
        (1, 128 * GiB, "mem64,prefetchable"),
        (3, 32 * MiB, "mem64,prefetchable"),
    ]
    assert high_bytes(bars) == (128 * GiB, 32 * MiB)
    # An unassigned BAR keeps its size; an I/O BAR is not a memory BAR.
    flags = IORESOURCE_MEM_64 | IORESOURCE_PREFETCH | 0x200
    text = f"0x0 0x{64 * GiB - 1:x} 0x{flags:x}\n0x0 0x0 0x0\n0xe000 0xe07f 0x40101\n"
    bars = parse_resource(text)
    assert [(b.index, b.size, b.high, b.is_io) for b in bars] == [
        (0, 64 * GiB, True, False),
        (2, 128, False, True),
    ]
    assert parse_resource("") == () and parse_resource("garbage\n1 2\n") == ()


def test_bars_of_this_machine_match_lspci() -> None:
    """Every memory BAR lspci reports on this machine's own devices, with its size."""
    if shutil.which("lspci") is None:
        pytest.skip("lspci (pciutils) is not installed")
    out = subprocess.run(["lspci", "-D", "-vv"], capture_output=True, text=True, check=True).stdout
    want: dict[str, set[tuple[int, int]]] = {}
    current = ""
    units = {"K": 1024, "M": MiB, "G": GiB, "T": 1024 * GiB}
    for line in out.splitlines():
        if line and not line[0].isspace():
            current = line.split()[0]
            want[current] = set()
        m = re.match(r"\s+Region (\d): Memory at \S+ .*\[size=(\d+)([KMGT]?)\]", line)
        if m and current:
            want[current].add((int(m.group(1)), int(m.group(2)) * units.get(m.group(3), 1)))
    host = scan(HostRoot("/"))
    checked = 0
    for addr, regions in want.items():
        fn = next((f for f in host.pci.values() if str(f.address) == addr), None)
        assert fn is not None, addr
        got = {(b.index, b.size) for b in fn.bars if b.is_mem}
        assert got == regions, (addr, got, regions)
        checked += len(regions)
    if not checked:
        pytest.skip("no device on this machine has a memory BAR")


def test_inventory_reads_bars_and_address_width(tree: TreeBuilder) -> None:
    gpus = gpu_server(tree, gpus=1, bar1=256 * GiB, phys_bits=46)
    h = host_of(tree)
    assert h.phys_bits == 46
    fn = next(f for f in h.pci.values() if str(f.address) == gpus[0])
    assert fn.class_code == "030200"
    assert high_bytes(fn.bars) == (256 * GiB, 32 * MiB)
    assert read_bars(HostRoot(tree.root), "/sys/bus/pci/devices/0000:00:10.0") == ()
    # A tree without /proc/cpuinfo says nothing about the width.
    assert phys_bits(HostRoot(tree.root / "nowhere")) is None


def test_this_machine_says_its_address_width() -> None:
    text = Path("/proc/cpuinfo").read_text()
    m = re.search(r"address sizes\s*:\s*(\d+) bits physical", text)
    assert phys_bits(HostRoot("/")) == (int(m.group(1)) if m else None)


def test_inspect_json_shows_bar_sizes(
    tree: TreeBuilder, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from partitioner.cli.main import main

    gpus = gpu_server(tree, gpus=1, bar1=64 * GiB)
    tree.build()
    rc = main(["--host-root", str(tree.root), "--json", "inspect"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    fn = _find_function(doc, gpus[0])
    assert [(b["index"], b["size"], b["bits"], b["prefetchable"]) for b in fn["bars"]] == [
        (0, 16 * MiB, 32, False),
        (1, 64 * GiB, 64, True),
        (3, 32 * MiB, 64, True),
    ]


def _find_function(doc: object, address: str) -> dict[str, object]:
    """The inspect JSON's entry for one PCI function, wherever the document keeps it."""
    stack = [doc]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            if d.get("address") == address and "bars" in d:
                return d
            stack.extend(d.values())
        elif isinstance(d, list):
            stack.extend(d)
    raise AssertionError(f"{address} with bars not in inspect --json")


# -- the 64-bit window and the address width ----------------------------------------------


@pytest.mark.parametrize(
    ("gpus", "window", "bits"),
    [(1, 512 * GiB, 40), (2, 1024 * GiB, 41), (8, 4096 * GiB, 43)],
)
def test_window_for_256g_bar_gpus(gpus: int, window: int, bits: int) -> None:
    # Each GPU: 256 GiB BAR1 and 32 MiB BAR3 behind its own root port; 64 GiB of RAM.
    lay = layout(64 * GiB, [(256 * GiB, 32 * MiB)] * gpus)
    assert lay.window == window and lay.needs_window
    base, end = lay.uefi_span()
    assert base % window == 0 and end - base == window
    assert bits_for(end) == bits
    # SeaBIOS packs them from the top of RAM, aligned to the largest BAR: never further out.
    assert lay.bios_span()[1] <= end


def test_small_bars_keep_qemus_default_window() -> None:
    lay = layout(8 * GiB, [(16 * MiB,), (), (128 * 1024,)])
    assert lay.window == DEFAULT_WINDOW and not lay.needs_window
    assert not layout(8 * GiB, []).needs_window


def test_planner_sizes_the_window_and_argv_passes_it_to_qemu_and_ovmf(tree: TreeBuilder) -> None:
    gpu_server(tree, gpus=2, bar1=128 * GiB, phys_bits=46)
    h = host_of(tree)
    m = _site(
        "ml: {cpus: 4, memory: 64GiB, hugepages: none, firmware: uefi,\n"
        '     devices: [{id: "10de:2331", count: 2}]}\n'
    )
    result = plan(m, h)
    p = result.placements["ml"]
    assert p.pci_hole64_bytes == 512 * GiB  # two 256 GiB port slots
    assert any("ml:" in n and "512GiB 64-bit PCI window" in n for n in result.notes)
    argv = _argv(result, "ml")
    assert "q35-pcihost.pci-hole64-size=512G" in _after(argv, "-global")
    assert _after(argv, "-fw_cfg") == [f"name=opt/ovmf/X-PciMmio64Mb,string={512 * 1024}"]
    # Under SeaBIOS the window is given to QEMU, and OVMF's knob is left out.
    result = plan(_site(m_text(firmware="bios")), h)
    argv = _argv(result, "ml")
    assert "q35-pcihost.pci-hole64-size=512G" in _after(argv, "-global")
    assert _after(argv, "-fw_cfg") == []
    # The record of a running partition keeps it, so a restart gets the same command line.
    again = Placement.from_json(result.placements["ml"].to_json())
    assert again == result.placements["ml"]


def m_text(firmware: str, memory: str = "64GiB", count: int = 2) -> str:
    return (
        f"ml: {{cpus: 4, memory: {memory}, hugepages: none, firmware: {firmware},\n"
        f'     devices: [{{id: "10de:2331", count: {count}}}]}}\n'
    )


def test_plan_refuses_a_window_beyond_the_address_width_under_uefi(tree: TreeBuilder) -> None:
    gpu_server(tree, gpus=2, bar1=256 * GiB, phys_bits=40)
    msg = problems(_site(m_text("uefi")), host_of(tree))
    # 1 TiB window aligned to 1 TiB: ends at 2 TiB, 41 bits; the CPU has 40.
    assert "ml:" in msg and "OVMF places at" in msg
    assert "needs 41 physical address bits" in msg and "has 40" in msg
    assert "fewer large-BAR devices" in msg


def test_plan_refuses_bars_seabios_puts_out_of_reach(tree: TreeBuilder) -> None:
    # One 128 GiB-BAR GPU: SeaBIOS puts its port's window at 128-384 GiB (39 bits).
    gpu_server(tree, gpus=1, bar1=128 * GiB, phys_bits=38)
    msg = problems(_site(m_text("bios", count=1)), host_of(tree))
    assert "firmware: bios cannot place" in msg and "SeaBIOS puts them at" in msg
    assert "needs 39 physical address bits" in msg and "has 38" in msg


def test_plan_accepts_the_same_gpus_with_enough_address_bits(tree: TreeBuilder) -> None:
    gpu_server(tree, gpus=1, bar1=128 * GiB, phys_bits=39)
    result = plan(_site(m_text("bios", count=1)), host_of(tree))
    assert result.placements["ml"].pci_hole64_bytes == 256 * GiB


def test_unknown_address_width_is_not_refused(tree: TreeBuilder) -> None:
    gpu_server(tree, gpus=2, bar1=256 * GiB, phys_bits=46)
    h = replace(host_of(tree), phys_bits=None)
    assert plan(_site(m_text("uefi")), h).placements["ml"].pci_hole64_bytes == 1024 * GiB


# -- GPU options --------------------------------------------------------------------------


def _workstation(tree: TreeBuilder) -> Host:
    gpu_server(tree, gpus=1, bar1=64 * GiB)
    display_gpu(tree, 0x30, 70)
    return host_of(tree)


def test_display_gpu_is_the_primary_display_with_its_rom_under_seabios(tree: TreeBuilder) -> None:
    h = _workstation(tree)
    m = _site(
        "ws: {cpus: 2, memory: 8GiB, hugepages: none,\n"
        '     devices: [{pci: "30:00.0", primary_display: true, rom: /srv/roms/3090.rom},\n'
        '               {pci: "10:00.0", rom: "off"}]}\n'
    )
    argv = _argv(plan(m, h), "ws")
    vfio = {d.split(",")[1]: d for d in _after(argv, "-device") if d.startswith("vfio-pci,")}
    assert vfio["host=0000:30:00.0"].endswith(",romfile=/srv/roms/3090.rom,x-vga=on")
    # The audio function goes along, as function 1 of the same guest slot, with no options.
    assert vfio["host=0000:30:00.1"].endswith("addr=0.1")
    assert vfio["host=0000:10:00.0"].endswith(",rombar=0")


def test_primary_display_on_a_compute_gpu_is_refused(tree: TreeBuilder) -> None:
    h = _workstation(tree)
    msg = problems(
        _site(
            "ws: {cpus: 2, memory: 8GiB, hugepages: none,\n"
            '     devices: [{pci: "10:00.0", primary_display: true}]}\n'
        ),
        h,
    )
    assert "class 0302" in msg and "3D controller" in msg and "remove primary_display" in msg


def test_primary_display_under_uefi_and_twice_are_refused(tree: TreeBuilder) -> None:
    h = _workstation(tree)
    display_gpu(tree, 0x31, 71)
    h = host_of(tree)
    msg = problems(
        _site(
            "ws: {cpus: 2, memory: 8GiB, hugepages: none, firmware: uefi,\n"
            '     devices: [{pci: "30:00.0", primary_display: true}]}\n'
        ),
        h,
    )
    assert "needs firmware: bios" in msg
    msg = problems(
        _site(
            "ws: {cpus: 2, memory: 8GiB, hugepages: none,\n"
            '     devices: [{pci: "30:00.0", primary_display: true},\n'
            '               {pci: "31:00.0", primary_display: true}]}\n'
        ),
        h,
    )
    assert "a guest has one primary display" in msg


@pytest.mark.parametrize(
    ("device", "words"),
    [
        ('{pci: "30:00.0", rom: roms/3090.rom}', "absolute path"),
        ('{pci: "30:00.0", rom: on}', "expected `off` or an absolute path"),
        ('{pci: "30:00.0", primary_display: yes please}', "primary_display"),
    ],
)
def test_bad_gpu_options_are_located_problems(device: str, words: str) -> None:
    from partitioner.errors import ManifestError

    with pytest.raises(ManifestError) as e:
        _site(f"ws: {{cpus: 2, memory: 8GiB, devices: [{device}]}}\n")
    text = str(e.value)
    assert words in text and "site.yaml:" in text, text


# -- dedicated-CPU settings ------------------------------------------------------------


def test_whole_cores_get_the_hosts_cache_description(tree: TreeBuilder) -> None:
    gpu_server(tree, gpus=0)
    h = host_of(tree)
    result = plan(_site("a: {cpus: 4, memory: 4GiB, hugepages: none}\n"), h)
    assert result.placements["a"].host_cache_info
    assert "host-cache-info=on" in _after(_argv(result, "a"), "-cpu")[0]


def test_split_cores_do_not_get_it_and_plan_says_why(tree: TreeBuilder) -> None:
    gpu_server(tree, gpus=0)
    h = host_of(tree)
    m = manifest(
        """\
        version: 1
        host: {reserve: {cpus: 2, memory: 8GiB}, smt: share, isolation: pinned}
        partitions:
          a: {cpus: 1, memory: 4GiB, hugepages: none}
        """
    )
    result = plan(m, h)
    assert not result.placements["a"].host_cache_info
    assert any(n.startswith("a: host-cache-info left out") for n in result.notes)
    assert "host-cache-info" not in _after(_argv(result, "a"), "-cpu")[0]
    # Under TCG there is no host CPU model to describe: nothing is said.
    tcg = manifest(
        """\
        version: 1
        host: {reserve: {cpus: 2, memory: 8GiB}, smt: share, accel: tcg, isolation: pinned}
        partitions:
          a: {cpus: 1, memory: 4GiB, hugepages: none}
        """
    )
    assert not any("host-cache-info" in n for n in plan(tcg, h).notes)


def test_each_setting_left_out_says_why(tree: TreeBuilder) -> None:
    gpu_server(tree, gpus=0)
    result = plan(_site("a: {cpus: 4, memory: 4GiB, hugepages: none}\n"), host_of(tree))
    p = result.placements["a"]
    full = kvm_settings(p, CAPS)
    assert full.left_out == () and full.overcommit == ("cpu-pm=on",)
    assert full.cpu == (
        "host,migratable=off,host-phys-bits=on,kvm-hint-dedicated=on,host-cache-info=on"
    )

    no_hlt = kvm_settings(p, replace(CAPS, kvm=KvmCaps(available=True, disable_exits=0b0101)))
    assert no_hlt.overcommit == ()
    assert len(no_hlt.left_out) == 1 and "does not let a guest keep HLT" in no_hlt.left_out[0]
    assert "offers: mwait, pause" in no_hlt.left_out[0]

    no_kvm = kvm_settings(p, replace(CAPS, kvm=KvmCaps(available=False, error="/dev/kvm: gone")))
    assert no_kvm.overcommit == () and "/dev/kvm: gone" in no_kvm.left_out[0]
    assert "was not asked" in kvm_settings(p, replace(CAPS, kvm=None)).left_out[0]

    old = kvm_settings(p, QemuCaps(binary="/opt/q", version=(2, 11, 0)))
    assert old.cpu == "host" and old.overcommit == ()
    assert [s.split("=")[0] for s in old.left_out] == [
        "migratable",
        "host-phys-bits",
        "kvm-hint-dedicated",
        "host-cache-info",
        "cpu-pm",
    ]
    assert all("QEMU 2.11.0" in s for s in old.left_out)


# -- KVM, asked for real ------------------------------------------------------------------


def test_kvm_probe_on_this_machine() -> None:
    if not Path("/dev/kvm").exists():
        k = probe_kvm()
        assert not k.available and "/dev/kvm" in k.error
        pytest.skip("no /dev/kvm here")
    k = probe_kvm()
    assert k.available, k.error
    assert k.max_vcpus >= 1
    # KVM never offers bits outside the four it defines.
    assert k.disable_exits & ~0b1111 == 0
    assert k.can_keep_hlt == bool(k.disable_exits & KVM_X86_DISABLE_EXITS_HLT)
    assert k.to_json()["disable_exits"] == k.exit_names


def test_kvm_probe_without_kvm(tmp_path: Path) -> None:
    k = probe_kvm(str(tmp_path / "kvm"))
    assert not k.available and "No such file" in k.error
    (tmp_path / "kvm").write_text("")
    k = probe_kvm(str(tmp_path / "kvm"))
    assert not k.available and "API version" in k.error


# -- the address width of the fixtures, for bench/README -------------------------------


def test_data_centre_gpu_fixture_has_the_real_layout(tree: TreeBuilder) -> None:
    tree.cpus(count=4)
    addr = data_centre_gpu(tree, 0x41, 9, bar1=64 * GiB)
    h = host_of(tree)
    fn = next(f for f in h.pci.values() if str(f.address) == addr)
    assert (fn.vendor, fn.device, fn.class_code) == ("10de", "2331", "030200")
    assert [(b.index, b.size, b.is_64bit, b.prefetchable) for b in fn.bars] == [
        (0, 16 * MiB, False, False),
        (1, 64 * GiB, True, True),
        (3, 32 * MiB, True, True),
    ]
    assert all(b.flags & BAR_MEM64_PREF == BAR_MEM64_PREF for b in fn.bars if b.high)


# -- plan --qemu and qemu_argv --------------------------------------------------------------


def test_plan_shows_the_command_lines_with_host_root(
    tree: TreeBuilder, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    import shlex

    from partitioner.cli.main import main
    from partitioner.guest.caps import probe_qemu

    try:
        probe_qemu()
    except GuestError as e:
        pytest.skip(str(e))
    gpu_server(tree, gpus=1, bar1=128 * GiB, phys_bits=46)
    display_gpu(tree, 0x30, 70)
    tree.build()
    site = tmp_path / "site.yaml"
    site.write_text(
        "version: 1\nhost: {reserve: {cpus: 2, memory: 8GiB}, isolation: pinned}\npartitions:\n"
        '  ml: {cpus: 4, memory: 16GiB, hugepages: none, devices: [{pci: "10:00.0"}]}\n'
        "  ws: {cpus: 2, memory: 8GiB, hugepages: none,\n"
        '       devices: [{pci: "30:00.0", primary_display: true, rom: "off"}]}\n'
    )
    common = ["--host-root", str(tree.root), "--state-dir", str(tmp_path / "state")]
    assert main([*common, "--json", "plan", str(site)]) == 0
    doc = json.loads(capsys.readouterr().out)
    ml = doc["partitions"]["ml"]["qemu_argv"]
    assert ml[ml.index("-global") + 1] == "q35-pcihost.pci-hole64-size=256G"
    assert ml[ml.index("-cpu") + 1].startswith("host,migratable=off")
    ws = doc["partitions"]["ws"]["qemu_argv"]
    assert any(a.endswith(",rombar=0,x-vga=on") for a in ws)
    # The tree's host is not this machine: its KVM is not asked, and the plan says so.
    assert "mem-lock=on" in ws and "mem-lock=on,cpu-pm=on" not in ws
    assert any("cpu-pm=on left out" in n for n in doc["partitions"]["ws"]["notes"])

    assert main([*common, "plan", str(site), "--qemu"]) == 0
    out = capsys.readouterr().out
    lines = {
        ln.split(": ", 1)[0]: ln.split(": ", 1)[1]
        for ln in out.splitlines()
        if ln.startswith(("ml: /", "ws: /"))
    }
    assert shlex.split(lines["ml"]) == ml and shlex.split(lines["ws"]) == ws
    assert main([*common, "plan", str(site)]) == 0
    assert "ml: /" not in capsys.readouterr().out  # without --qemu, no command lines


# -- golden command lines of the GPU fixtures ------------------------------------------------

GOLDEN = Path(__file__).parent / "golden" / "argv"

FIXTURE_SITES = {
    # Two H100-like GPUs (128 GiB BAR1 each) under UEFI on 1 GiB pages.
    "fixture-h100x2-uefi": (
        2,
        "ml: {cpus: 8, memory: 64GiB, hugepages: 1GiB, firmware: uefi,\n"
        '     devices: [{id: "10de:2331", count: 2}]}\n',
    ),
    # An RTX 3090-like display GPU as the primary display under SeaBIOS, with a ROM file.
    "fixture-rtx3090-bios-display": (
        0,
        "ws: {cpus: 4, memory: 16GiB, hugepages: none,\n"
        '     devices: [{pci: "30:00.0", primary_display: true, rom: /srv/roms/3090.rom}]}\n',
    ),
}


@pytest.mark.parametrize("case", sorted(FIXTURE_SITES))
def test_golden_command_lines_of_the_gpu_fixtures(case: str, tree: TreeBuilder) -> None:
    import os

    gpus, site = FIXTURE_SITES[case]
    gpu_server(tree, gpus=gpus, bar1=128 * GiB, phys_bits=46)
    display_gpu(tree, 0x30, 70)
    tree.node(0, memory_bytes=512 * GiB, free_bytes=500 * GiB, hugepages={GiB: (64, 64)})
    result = plan(_site(site), host_of(tree))
    (name,) = result.placements
    text = "\n".join(_argv(result, name)) + "\n"
    golden = GOLDEN / f"{case}.txt"
    if os.environ.get("PARTITION_REGEN_GOLDEN") == "1":
        golden.write_text(text)
    assert golden.exists(), f"no golden file {golden}: run with PARTITION_REGEN_GOLDEN=1"
    assert text == golden.read_text(), f"argv of {case} differs from {golden}"
