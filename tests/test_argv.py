"""The QEMU command line as a pure function: golden files plus the rules it must keep.

Golden files are tests/golden/argv/NAME.txt, one argument per line.  Regenerate
them with ``PARTITION_REGEN_GOLDEN=1 pytest tests/test_argv.py`` and review the diff.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import replace
from pathlib import Path

import pytest

from partitioner.cpuset import CpuSet
from partitioner.errors import GuestError
from partitioner.guest.argv import (
    GuestPaths,
    disk_format,
    dynamic_memory,
    guest_nodes,
    guest_paths,
    hotplug_port_ids,
    qemu_argv,
)
from partitioner.guest.caps import CPU_PROPS, QemuCaps
from partitioner.guest.kvm import KvmCaps
from partitioner.guest.launch import RunningGuest
from partitioner.manifest.model import Boot, Disk, PartitionSpec
from partitioner.pci import PciAddress
from partitioner.planning.model import DeviceAssignment, Placement, Plan
from partitioner.units import GiB, MiB, virtio_mem_block

GOLDEN = Path(__file__).parent / "golden" / "argv"

CAPS = QemuCaps(
    binary="/usr/bin/qemu-system-x86_64",
    version=(7, 2, 0),
    thread_context=True,
    sandbox=True,
    memfd=True,
    vfio_pci=True,
    iothread=True,
    ovmf_code="/usr/share/OVMF/OVMF_CODE_4M.fd",
    ovmf_vars="/usr/share/OVMF/OVMF_VARS_4M.fd",
    cpu_props=CPU_PROPS,
    cpu_pm=True,
    # What this test machine's KVM answers: HLT, PAUSE and C-state exits can stay in the guest.
    kvm=KvmCaps(available=True, disable_exits=0b1110, max_vcpus=1024),
)
# A KVM that keeps every exit in the host (KVM_CAP_X86_DISABLE_EXITS answers 0).
NO_EXITS_CAPS = replace(CAPS, kvm=KvmCaps(available=True, disable_exits=0, max_vcpus=288))
OLD_CAPS = QemuCaps(binary="/opt/qemu-6.2/bin/qemu-system-x86_64", version=(6, 2, 0))


def _paths(name: str) -> GuestPaths:
    return guest_paths(
        Path("/run/partition"),
        Path("/var/log/partition"),
        name,
        state_dir=Path("/var/lib/partition"),
    )


def _dev(
    addr: str,
    group: int,
    *,
    added: bool = False,
    rom: str | None = None,
    primary_display: bool = False,
) -> DeviceAssignment:
    return DeviceAssignment(
        address=PciAddress.parse(addr),
        iommu_group=group,
        vendor_device="10de:1eb8",
        driver="nvidia",
        added=added,
        reason="test",
        rom=rom,
        primary_display=primary_display,
    )


def _placement(
    name: str,
    cpus: tuple[int, ...],
    memory: tuple[tuple[int, int], ...],
    *,
    topology: tuple[int, int, int] = (1, 1, 1),
    hugepages: int | None = 2 * MiB,
    cpu_nodes: tuple[int, ...] = (),
    devices: tuple[DeviceAssignment, ...] = (),
    boot: Boot | None = None,
    disks: tuple[Disk, ...] = (),
    firmware: str = "bios",
    hole64: int = 0,
    cache_info: bool = False,
) -> Placement:
    spec = PartitionSpec(
        name=name,
        cpu_count=len(cpus),
        cpu_list=None,
        memory_bytes=sum(b for _, b in memory),
        hugepage_bytes=hugepages,
        numa="auto",
        devices=(),
        boot=boot,
        disks=disks,
        firmware=firmware,  # type: ignore[arg-type]
    )
    sockets, cores, threads = topology
    return Placement(
        name=name,
        cpus=cpus,
        sockets=sockets,
        cores=cores,
        threads=threads,
        numa_nodes=tuple(n for n, _ in memory),
        memory_per_node=memory,
        hugepage_bytes=hugepages,
        devices=devices,
        spec=spec,
        cpu_nodes=cpu_nodes,
        pci_hole64_bytes=hole64,
        host_cache_info=cache_info,
    )


def _plan(p: Placement, accel: str = "kvm", host: str = "0-1") -> Plan:
    return Plan(
        accel=accel,
        smt="isolate",
        host_cpus=CpuSet.parse(host),
        host_memory_bytes=GiB,
        placements={p.name: p},
    )


CASES: dict[str, tuple[Placement, str, QemuCaps]] = {
    # The test guest of this machine: TCG, one CPU, normal pages, direct kernel boot.
    "tcg-small": (
        _placement(
            "t1",
            (1,),
            ((0, 256 * MiB),),
            hugepages=None,
            boot=Boot("/boot/vmlinuz", "/tmp/initrd.gz", "console=ttyS0 panic=-1"),
        ),
        "tcg",
        CAPS,
    ),
    # A firewall: 2 cores x 2 threads, 2 MiB pages, a GPU with its audio function (added), a
    # NIC, a function without function 0 in its slot, UEFI, a qcow2 image, a read-only disk
    # and a block device; a path with a comma.
    "kvm-devices-uefi": (
        _placement(
            "fw0",
            (4, 12, 5, 13),
            ((0, 4 * GiB),),
            topology=(1, 2, 2),
            devices=(
                _dev("0000:82:00.0", 20),
                _dev("0000:81:00.0", 19),
                _dev("0000:03:10.2", 40),
                _dev("0000:81:00.1", 19, added=True),
            ),
            disks=(
                Disk("/srv/fw/root.qcow2"),
                Disk("/srv/fw/data,1.img", readonly=True),
                Disk("/dev/nvme1n1"),
            ),
            firmware="uefi",
        ),
        "kvm",
        CAPS,
    ),
    # Two NUMA nodes with 1 GiB pages and disk boot: each guest node gets the vCPUs that run
    # on that host node, and its own backend bound there.
    "kvm-two-nodes-1g": (
        _placement(
            "db0",
            (8, 9, 24, 25),
            ((0, 8 * GiB), (1, 6 * GiB)),
            topology=(2, 2, 1),
            hugepages=GiB,
            cpu_nodes=(0, 0, 1, 1),
            disks=(Disk("/dev/disk/by-id/nvme-db0"),),
        ),
        "kvm",
        CAPS,
    ),
    # A data-centre GPU (3D controller, 16 MiB BAR0, 256 GiB 64-bit prefetchable BAR1) under
    # UEFI: a 512 GiB 64-bit window for QEMU and OVMF; whole cores, so the host's cache
    # description; the NIC has no option ROM.
    "kvm-gpu-large-bar-uefi": (
        _placement(
            "ml0",
            (4, 36, 5, 37),
            ((0, 64 * GiB),),
            topology=(1, 2, 2),
            hugepages=GiB,
            devices=(_dev("0000:c1:00.0", 60), _dev("0000:41:00.0", 30, rom="off")),
            disks=(Disk("/dev/disk/by-id/nvme-ml0"),),
            firmware="uefi",
            hole64=512 * GiB,
            cache_info=True,
        ),
        "kvm",
        CAPS,
    ),
    # A display GPU as the guest's primary VGA display under SeaBIOS, its audio function
    # along, its ROM from a file; two 64 GiB-BAR GPUs' window without OVMF's fw_cfg.
    "kvm-display-gpu-bios": (
        _placement(
            "ws0",
            (2, 3),
            ((0, 16 * GiB),),
            topology=(1, 2, 1),
            devices=(
                _dev("0000:01:00.0", 12, rom="/srv/roms/gpu,1.rom", primary_display=True),
                _dev("0000:01:00.1", 12, added=True),
            ),
            disks=(Disk("/srv/ws0/root.qcow2"),),
            hole64=256 * GiB,
        ),
        "kvm",
        CAPS,
    ),
    # A KVM that cannot keep HLT in the guest: no cpu-pm, the rest as usual.
    "kvm-no-exit-control": (
        _placement("k1", (6, 7), ((0, 2 * GiB),), topology=(1, 1, 2), cache_info=True),
        "kvm",
        NO_EXITS_CAPS,
    ),
    # A node with memory only, and an old QEMU without thread-context, memfd or seccomp.
    "old-qemu-memory-only-node": (
        _placement(
            "m1",
            (2, 3),
            ((0, 1 * GiB), (2, 512 * MiB)),
            topology=(1, 2, 1),
            cpu_nodes=(0, 0),
            boot=Boot("/srv/m1/vmlinuz"),
        ),
        "kvm",
        OLD_CAPS,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    p, accel, caps = CASES[case]
    argv = qemu_argv(p, _plan(p, accel), _paths(p.name), caps)
    text = "\n".join(argv) + "\n"
    golden = GOLDEN / f"{case}.txt"
    if os.environ.get("PARTITION_REGEN_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"no golden file {golden}: run with PARTITION_REGEN_GOLDEN=1"
    assert text == golden.read_text(), f"argv of {case} differs from {golden}"


def _opts(argv: list[str], flag: str) -> list[str]:
    return [v for f, v in itertools.pairwise(argv) if f == flag]


def _kv(opt: str) -> list[tuple[str, str]]:
    """QEMU's key=value list (first item may be a bare type name), ",," unescaped."""
    out = []
    for item in opt.replace(",,", "\0").split(","):
        k, _, v = item.partition("=")
        out.append((k, v.replace("\0", ",")))
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_rules_every_command_line_keeps(case: str) -> None:
    p, accel, caps = CASES[case]
    argv = qemu_argv(p, _plan(p, accel), _paths(p.name), caps)
    assert argv[0] == caps.binary
    assert argv[-1] == "-S", "the guest must start paused, to be pinned before it runs"
    # Memory is locked always; HLT stays in the guest only under KVM that offers it.
    keeps_hlt = accel == "kvm" and caps.cpu_pm and caps.kvm is not None and caps.kvm.can_keep_hlt
    assert _opts(argv, "-overcommit") == ["mem-lock=on,cpu-pm=on" if keeps_hlt else "mem-lock=on"]
    assert not any("balloon" in a for a in argv), "a partition's memory is never taken back"
    assert _opts(argv, "-name") == [f"{p.name},debug-threads=on"]

    # Every id is unique, across objects, drives, devices and chardevs.
    ids = [
        v
        for flag in ("-object", "-drive", "-device", "-chardev")
        for o in _opts(argv, flag)
        for k, v in _kv(o)
        if k == "id"
    ]
    assert len(ids) == len(set(ids))

    # Memory: one backend per node, bound there, preallocated; sizes add up to -m.
    backends = [dict(_kv(o)) for o in _opts(argv, "-object") if o.startswith("memory-backend-")]
    assert [int(b["host-nodes"]) for b in backends] == [n for n, _ in p.memory_per_node]
    total = 0
    for b, (_, size) in zip(backends, p.memory_per_node, strict=True):
        assert b["policy"] == "bind" and b["prealloc"] == "on"
        assert _bytes(b["size"]) == size
        total += size
        if p.hugepage_bytes is None:
            assert "memory-backend-ram" in b
        elif caps.memfd:
            assert b["hugetlb"] == "on" and _bytes(b["hugetlbsize"]) == p.hugepage_bytes
        else:
            assert b["mem-path"].startswith("/dev/hugepages")
    assert _bytes(_opts(argv, "-m")[0]) == total == p.memory_bytes

    # Guest NUMA: every vCPU on exactly one node, the node its host CPU is on.
    seen: list[int] = []
    for i, numa in enumerate(_opts(argv, "-numa")):
        kv = _kv(numa)
        assert ("memdev", f"mem{i}") in kv
        vcpus = [c for k, v in kv if k == "cpus" for c in CpuSet.parse(v)]
        if p.cpu_nodes:
            host_node = p.memory_per_node[i][0]
            assert all(p.cpu_nodes[v] == host_node for v in vcpus)
        seen += vcpus
    assert sorted(seen) == list(range(len(p.cpus)))

    # Prealloc threads run on the partition's CPUs only, never on the host's or a neighbour's.
    contexts = [o for o in _opts(argv, "-object") if o.startswith("thread-context")]
    assert bool(contexts) == caps.thread_context
    for tc in contexts:
        cpus = CpuSet.parse(",".join(v for k, v in _kv(tc) if k == "cpu-affinity"))
        assert cpus and cpus.issubset(CpuSet(p.cpus))

    smp = dict(_kv("n=" + _opts(argv, "-smp")[0]))
    assert (
        int(smp["n"])
        == len(p.cpus)
        == int(smp["sockets"]) * int(smp["cores"]) * int(smp["threads"])
    )
    assert bool(_opts(argv, "-sandbox")) == caps.sandbox
    if accel == "kvm":
        assert _opts(argv, "-accel") == ["kvm"]
        cpu = dict(_kv(_opts(argv, "-cpu")[0]))
        assert "host" in cpu
        # Every dedicated-CPU setting this QEMU has is given; the cache description only
        # when the guest's cores are whole host cores.
        want = {"migratable": "off", "host-phys-bits": "on", "kvm-hint-dedicated": "on"}
        assert {k: v for k, v in want.items() if k in caps.cpu_props} == {
            k: cpu[k] for k in want if k in cpu
        }
        assert ("host-cache-info" in cpu) == (p.host_cache_info and bool(caps.cpu_props))
    else:
        assert _opts(argv, "-accel")[0].startswith("tcg,thread=multi")


def test_devices_keep_slots_together_and_in_order() -> None:
    p, accel, caps = CASES["kvm-devices-uefi"]
    argv = qemu_argv(p, _plan(p, accel), _paths(p.name), caps)
    vfio = [dict(_kv(o)) for o in _opts(argv, "-device") if o.startswith("vfio-pci,")]
    assert [d["host"] for d in vfio] == [
        "0000:03:10.2",
        "0000:81:00.0",
        "0000:81:00.1",
        "0000:82:00.0",
    ]
    by_host = {d["host"]: d for d in vfio}
    # GPU and audio: one root port, functions 0 and 1, function 0 multifunction.
    assert by_host["0000:81:00.0"]["bus"] == by_host["0000:81:00.1"]["bus"]
    assert (by_host["0000:81:00.0"]["addr"], by_host["0000:81:00.1"]["addr"]) == ("0.0", "0.1")
    assert by_host["0000:81:00.0"].get("multifunction") == "on"
    # A lone function 2 (no function 0 in its slot) becomes function 0 of its own port.
    assert (
        by_host["0000:03:10.2"]["addr"] == "0.0" and "multifunction" not in by_host["0000:03:10.2"]
    )
    assert len({d["bus"] for d in vfio}) == 3


def test_disks() -> None:
    p, accel, caps = CASES["kvm-devices-uefi"]
    argv = qemu_argv(p, _plan(p, accel), _paths(p.name), caps)
    drives = [dict(_kv(o)) for o in _opts(argv, "-drive") if "if=none" in o]
    assert [d["file"] for d in drives] == [
        "/srv/fw/root.qcow2",
        "/srv/fw/data,1.img",
        "/dev/nvme1n1",
    ]
    assert [d["format"] for d in drives] == ["qcow2", "raw", "raw"]
    assert [d.get("readonly") for d in drives] == [None, "on", None]
    assert drives[2]["cache"] == "none" and "cache" not in drives[0]
    blk = [dict(_kv(o)) for o in _opts(argv, "-device") if o.startswith("virtio-blk-pci")]
    iothreads = [dict(_kv(o))["id"] for o in _opts(argv, "-object") if o.startswith("iothread")]
    assert [b["iothread"] for b in blk] == iothreads and len(iothreads) == 3
    # Direct kernel boot is absent, so the first disk boots... only without -kernel.
    assert blk[0].get("bootindex") == "1"
    assert disk_format("/x/IMAGE.QCOW2") == "qcow2" and disk_format("/x/a.img") == "raw"


def test_uefi_uses_a_private_vars_copy_and_read_only_code() -> None:
    p, accel, caps = CASES["kvm-devices-uefi"]
    argv = qemu_argv(p, _plan(p, accel), _paths(p.name), caps)
    flash = [dict(_kv(o)) for o in _opts(argv, "-drive") if o.startswith("if=pflash")]
    assert flash[0]["file"] == caps.ovmf_code and flash[0]["readonly"] == "on"
    assert flash[1]["file"] == "/var/lib/partition/fw0/OVMF_VARS.fd" and "readonly" not in flash[1]


def test_uefi_without_ovmf_is_a_guest_error_naming_the_package() -> None:
    p, accel, _ = CASES["kvm-devices-uefi"]
    with pytest.raises(GuestError, match="ovmf") as e:
        qemu_argv(p, _plan(p, accel), _paths(p.name), replace(CAPS, ovmf_code=None))
    assert e.value.partition == "fw0"


def test_console_and_qmp_sockets_and_log() -> None:
    p, accel, caps = CASES["tcg-small"]
    paths = _paths(p.name)
    argv = qemu_argv(p, _plan(p, accel), paths, caps)
    chardevs = {dict(_kv(o))["id"]: dict(_kv(o)) for o in _opts(argv, "-chardev")}
    assert chardevs["qmp0"]["path"] == str(paths.qmp)
    assert chardevs["con0"]["path"] == str(paths.console)
    assert chardevs["con0"]["logfile"] == "/var/log/partition/t1.console.log"
    assert _opts(argv, "-serial") == ["chardev:con0"]
    assert _opts(argv, "-mon") == ["chardev=qmp0,mode=control"]
    assert _opts(argv, "-kernel") == ["/boot/vmlinuz"]
    assert _opts(argv, "-append") == ["console=ttyS0 panic=-1"]


def test_guest_paths_and_running_guest_round_trip() -> None:
    paths = guest_paths(Path("/run/partition"), Path("/var/log/partition"), "fw0")
    assert paths.dir == Path("/run/partition/fw0")
    assert paths.qmp.parent == paths.dir and paths.console.parent == paths.dir
    assert paths.ovmf_vars == Path("/run/partition/fw0/OVMF_VARS.fd")
    assert GuestPaths.from_json(paths.to_json()) == paths
    g = RunningGuest(name="fw0", pid=42, vcpu_threads={0: 50, 1: 51}, paths=paths, started_at=1.5)
    assert RunningGuest.from_json(g.to_json()) == g
    assert g.to_json()["vcpu_threads"] == {"0": 50, "1": 51}


def _bytes(text: str) -> int:
    if text.isdigit():
        return int(text)
    units = {"B": 1, "K": 1024, "M": MiB, "G": GiB}
    return int(text[:-1]) * units[text[-1]]


# -- dynamic partitions (rule 11) ------------------------------------------------------------

VMEM_CAPS = replace(CAPS, virtio_mem=True, virtio_mem_prealloc=True)
# A QEMU 6.2 with virtio-mem but without its prealloc property, memfd or thread-context.
OLD_VMEM_CAPS = replace(OLD_CAPS, virtio_mem=True)


def _dynamic(
    p: Placement,
    *,
    slots: int = 0,
    slot_nodes: tuple[int, ...] = (),
    fixed: tuple[tuple[int, int], ...] = (),
    most: tuple[tuple[int, int], ...] = (),
    hotplug: int = 0,
) -> Placement:
    return replace(
        p,
        vcpu_slots=slots,
        slot_nodes=slot_nodes,
        fixed_per_node=fixed,
        max_per_node=most,
        spec=replace(p.spec, hotplug_slots=hotplug),
    )


DYNAMIC_CASES: dict[str, tuple[Placement, str, QemuCaps]] = {
    # The test guest grown live: 1 of 2 vCPUs, 128 MiB fixed + 64 MiB plugged of 256 MiB room
    # on normal pages, two spare root ports.
    "dynamic-tcg-ram": (
        _dynamic(
            _placement(
                "t1",
                (1,),
                ((0, 192 * MiB),),
                topology=(1, 2, 1),
                hugepages=None,
                boot=Boot("/boot/vmlinuz", "/tmp/initrd.gz", "console=ttyS0 panic=-1"),
            ),
            slots=2,
            fixed=((0, 128 * MiB),),
            most=((0, 384 * MiB),),
            hotplug=2,
        ),
        "tcg",
        VMEM_CAPS,
    ),
    # Two nodes of 1 GiB pages: 4 of 8 vCPU slots, each slot on its node; node 0 has 4 GiB
    # plugged of 12, node 1 nothing of 4; a GPU on rp0 and two spare ports after it.
    "dynamic-kvm-two-nodes-1g": (
        _dynamic(
            _placement(
                "db0",
                (8, 9, 24, 25),
                ((0, 8 * GiB), (1, 4 * GiB)),
                topology=(2, 4, 1),
                hugepages=GiB,
                cpu_nodes=(0, 0, 1, 1),
                devices=(_dev("0000:81:00.0", 19),),
                disks=(Disk("/dev/disk/by-id/nvme-db0"),),
            ),
            slots=8,
            slot_nodes=(0, 0, 1, 1, 0, 0, 1, 1),
            fixed=((0, 4 * GiB), (1, 4 * GiB)),
            most=((0, 16 * GiB), (1, 8 * GiB)),
            hotplug=2,
        ),
        "kvm",
        VMEM_CAPS,
    ),
    # Dynamic memory only, on a QEMU without memfd (hugetlbfs mount) or virtio-mem prealloc.
    "dynamic-old-qemu-memory": (
        _dynamic(
            _placement("m2", (2, 3), ((0, 3 * GiB),), topology=(1, 2, 1)),
            fixed=((0, 2 * GiB),),
            most=((0, 6 * GiB),),
        ),
        "kvm",
        OLD_VMEM_CAPS,
    ),
    # Dynamic CPUs only: memory stays static and locked.
    "dynamic-kvm-cpus-only": (
        _dynamic(_placement("c1", (4, 5), ((0, 2 * GiB),), topology=(1, 4, 1)), slots=4),
        "kvm",
        VMEM_CAPS,
    ),
}


@pytest.mark.parametrize("case", sorted(DYNAMIC_CASES))
def test_golden_dynamic(case: str) -> None:
    p, accel, caps = DYNAMIC_CASES[case]
    text = "\n".join(qemu_argv(p, _plan(p, accel), _paths(p.name), caps)) + "\n"
    golden = GOLDEN / f"{case}.txt"
    if os.environ.get("PARTITION_REGEN_GOLDEN") == "1":
        golden.write_text(text)
    assert golden.exists(), f"no golden file {golden}: run with PARTITION_REGEN_GOLDEN=1"
    assert text == golden.read_text(), f"argv of {case} differs from {golden}"


@pytest.mark.parametrize("case", sorted(DYNAMIC_CASES))
def test_rules_every_dynamic_command_line_keeps(case: str) -> None:
    p, accel, caps = DYNAMIC_CASES[case]
    argv = qemu_argv(p, _plan(p, accel), _paths(p.name), caps)
    assert argv[-1] == "-S"
    ids = [
        v
        for flag in ("-object", "-drive", "-device", "-chardev")
        for o in _opts(argv, flag)
        for k, v in _kv(o)
        if k == "id"
    ]
    assert len(ids) == len(set(ids))
    guest_node = {node: i for i, (node, _) in enumerate(p.memory_per_node)}

    # vCPUs: N present of M slots, every slot on the guest node of its host node.
    smp = dict(_kv(_opts(argv, "-smp")[0]))
    sockets, cores, threads = (int(smp[k]) for k in ("sockets", "cores", "threads"))
    assert sockets * cores * threads == p.max_vcpus == int(smp["maxcpus"])
    numa_cpus = [dict(_kv(o)) for o in _opts(argv, "-numa") if o.startswith("cpu,")]
    numa_nodes = [dict(_kv(o)) for o in _opts(argv, "-numa") if o.startswith("node,")]
    if p.max_vcpus > len(p.cpus):
        assert int(smp["cpus"]) == len(p.cpus)
        assert len(numa_cpus) == p.max_vcpus
        slots = {(int(c["socket-id"]), int(c["core-id"]), int(c["thread-id"])) for c in numa_cpus}
        assert len(slots) == p.max_vcpus
        assert all(s < sockets and c < cores and t < threads for s, c, t in slots)
        nodes = p.slot_nodes or (p.numa_nodes[0],) * p.max_vcpus
        assert [int(c["node-id"]) for c in numa_cpus] == [guest_node[n] for n in nodes]
        # Slot i is vCPU i: the present ones keep the node of the host CPU they run on.
        for i, n in enumerate(p.cpu_nodes):
            assert int(numa_cpus[i]["node-id"]) == guest_node[n]
        assert not any("cpus" in n for n in numa_nodes)
    else:
        assert "cpus" not in smp and not numa_cpus

    # Memory: fixed backends as for a static partition, preallocated; per node with room a
    # backend that reserves nothing and a virtio-mem device plugged up to what it has now.
    backends = {b["id"]: b for b in (dict(_kv(o)) for o in _opts(argv, "-object")) if "size" in b}
    fixed = dict(p.fixed_memory_per_node)
    for i, (node, _) in enumerate(p.memory_per_node):
        b = backends[f"mem{i}"]
        assert _bytes(b["size"]) == fixed[node] and b["prealloc"] == "on"
        assert b["host-nodes"] == str(node) and b["policy"] == "bind"
    vmem = [dict(_kv(o)) for o in _opts(argv, "-device") if o.startswith("virtio-mem-pci,")]
    rooms = [(n, r) for n, r in p.dynamic_room_per_node if r]
    plugged = dict(p.plugged_per_node)
    block = virtio_mem_block(p.hugepage_bytes)
    assert [d["id"] for d in vmem] == [f"vmem{n}" for n, _ in rooms]
    for d, (node, room) in zip(vmem, rooms, strict=True):
        b = backends[d["memdev"]]
        assert d["memdev"] == f"vmem-n{node}" and _bytes(b["size"]) == room
        assert b["reserve"] == "off" and "prealloc" not in b, "only what is plugged is taken"
        assert b["host-nodes"] == str(node) and b["policy"] == "bind"
        same_kind = [k for k in b if k.startswith("memory-backend-")]
        assert same_kind and same_kind[0] in backends["mem0"]
        assert (b.get("hugetlbsize"), b.get("mem-path")) == (
            backends["mem0"].get("hugetlbsize"),
            backends["mem0"].get("mem-path"),
        )
        assert int(d["node"]) == guest_node[node]
        assert _bytes(d["requested-size"]) == plugged[node]
        assert _bytes(d["block-size"]) == block
        assert d.get("prealloc") == ("on" if caps.virtio_mem_prealloc else None)
    overcommit = _opts(argv, "-overcommit")[0]
    m = _opts(argv, "-m")[0]
    if rooms:
        mem = dict(_kv(m))
        assert _bytes(mem["size"]) == sum(fixed.values())
        assert _bytes(mem["maxmem"]) == sum(b for _, b in p.max_per_node)
        assert int(mem["slots"]) == len(rooms)
        # QEMU refuses virtio-mem with mem-lock ("Incompatible with mlock").
        assert overcommit.startswith("mem-lock=off")
    else:
        assert _bytes(m) == p.memory_bytes and overcommit.startswith("mem-lock=on")

    # Root ports: the devices' rp{k} first, then the spare hp0..; chassis and port unique.
    ports = [dict(_kv(o)) for o in _opts(argv, "-device") if o.startswith("pcie-root-port,")]
    spare = [d["id"] for d in ports if d["id"].startswith("hp")]
    assert spare == [f"hp{j}" for j in range(p.hotplug_slots)]
    assert [d["id"] for d in ports] == [d["id"] for d in ports if d["id"].startswith("rp")] + spare
    assert len({d["chassis"] for d in ports}) == len({d["port"] for d in ports}) == len(ports)


@pytest.mark.parametrize("case", sorted(CASES))
def test_static_bounds_give_the_static_command_line(case: str) -> None:
    # A placement whose bounds equal what it has is static: the same argv, byte for byte.
    p, accel, caps = CASES[case]
    bounded = _dynamic(
        p,
        slots=len(p.cpus),
        slot_nodes=p.cpu_nodes,
        fixed=p.memory_per_node,
        most=p.memory_per_node,
    )
    plan = _plan(p, accel)
    assert qemu_argv(bounded, plan, _paths(p.name), caps) == qemu_argv(
        p, plan, _paths(p.name), caps
    )
    # ...and so does one that only left the bounds out, with a QEMU that has virtio-mem.
    vmem = replace(caps, virtio_mem=True, virtio_mem_prealloc=True)
    assert qemu_argv(p, plan, _paths(p.name), vmem) == qemu_argv(p, plan, _paths(p.name), caps)


def test_dynamic_placements_qemu_cannot_hold_are_refused() -> None:
    p, accel, _ = DYNAMIC_CASES["dynamic-tcg-ram"]
    plan, paths = _plan(p, accel), _paths(p.name)
    with pytest.raises(GuestError, match=r"no virtio-mem-pci device.*min_memory = max_memory"):
        qemu_argv(p, plan, paths, CAPS)
    odd = replace(p, memory_per_node=((0, 129 * MiB),))
    with pytest.raises(GuestError, match="not whole virtio-mem blocks of 2M"):
        qemu_argv(odd, plan, paths, VMEM_CAPS)
    over = replace(p, memory_per_node=((0, 512 * MiB),))
    with pytest.raises(GuestError, match="within the room"):
        qemu_argv(over, plan, paths, VMEM_CAPS)
    nothing_fixed = replace(p, fixed_per_node=((0, 0),))
    with pytest.raises(GuestError, match="no fixed memory"):
        qemu_argv(nothing_fixed, plan, paths, VMEM_CAPS)
    wrong_shape = replace(p, vcpu_slots=3)
    with pytest.raises(GuestError, match="is not its 3 vCPU slots"):
        qemu_argv(wrong_shape, plan, paths, VMEM_CAPS)
    q, accel, _ = DYNAMIC_CASES["dynamic-kvm-two-nodes-1g"]
    elsewhere = replace(q, slot_nodes=(0, 0, 1, 1, 0, 0, 1, 2))
    with pytest.raises(GuestError, match="slot 7 is planned on host node 2"):
        qemu_argv(elsewhere, _plan(q, accel), _paths(q.name), VMEM_CAPS)


def test_dynamic_placement_numbers_and_json() -> None:
    p, _, _ = DYNAMIC_CASES["dynamic-kvm-two-nodes-1g"]
    assert p.max_vcpus == 8
    assert p.fixed_memory_per_node == ((0, 4 * GiB), (1, 4 * GiB))
    assert p.plugged_per_node == ((0, 4 * GiB), (1, 0))
    assert p.dynamic_room_per_node == ((0, 12 * GiB), (1, 4 * GiB))
    assert p.hotplug_slots == 2
    assert [(d.node, d.guest_node, d.room, d.plugged) for d in dynamic_memory(p)] == [
        (0, 0, 12 * GiB, 4 * GiB),
        (1, 1, 4 * GiB, 0),
    ]
    assert hotplug_port_ids(p) == ["hp0", "hp1"]
    assert guest_nodes(p) == {0: 0, 1: 1}
    # (the spec's own JSON, hotplug_slots in it, is the manifest's to keep)
    assert replace(Placement.from_json(p.to_json()), spec=p.spec) == p
    # A placement recorded before dynamic partitions reads back static.
    s, _, _ = CASES["kvm-two-nodes-1g"]
    old = {
        k: v
        for k, v in s.to_json().items()
        if k not in ("vcpu_slots", "slot_nodes", "fixed_per_node", "max_per_node")
    }
    back = Placement.from_json(old)
    assert back == s and back.max_vcpus == 4 and back.dynamic_room_per_node == ((0, 0), (1, 0))
    assert back.plugged_per_node == ((0, 0), (1, 0)) and dynamic_memory(back) == []
    assert virtio_mem_block(None) == virtio_mem_block(4096) == 2 * MiB
    assert virtio_mem_block(GiB) == GiB


def test_a_function_attached_live_is_started_again_in_its_spare_slot() -> None:
    """After a live attach the record says which spare slot holds the function; a restart
    (the supervisor's, or start after stop) puts it back there, under the id a detach finds."""
    nic, gpu = _dev("0000:81:00.0", 19), _dev("0000:82:00.0", 20)
    p = _dynamic(_placement("a", (4,), ((0, GiB),), devices=(nic, gpu)), hotplug=2)
    p = replace(p, hotplugged=("", "0000:82:00.0"))
    argv = qemu_argv(p, _plan(p, "tcg"), _paths(p.name), CAPS)
    devices = _opts(argv, "-device")
    vfio = [d for d in devices if d.startswith("vfio-pci,")]
    assert vfio == [
        "vfio-pci,host=0000:81:00.0,id=hostdev0,bus=rp0,addr=0.0",
        "vfio-pci,host=0000:82:00.0,id=hotdev1,bus=hp1",
    ]
    ports = [d for d in devices if d.startswith("pcie-root-port,")]
    assert [dict(_kv(d))["id"] for d in ports] == ["rp0", "hp0", "hp1"]
    # hp1's function comes right after its port, so the guest finds it in that slot
    assert devices.index(vfio[1]) == devices.index(ports[2]) + 1
