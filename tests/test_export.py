"""``partition export``: libvirt XML and KubeVirt objects as pure functions of the Plan.

Golden files are tests/golden/export/CASE.xml and CASE.kubevirt.yaml, for the
same placements as tests/test_argv.py's QEMU command lines, and fixture-*.xml
for the GPU hosts of tests/test_native.py (H100-like, RTX-like), planned from
their trees as its golden QEMU command lines are.  Regenerate them
with ``PARTITION_REGEN_GOLDEN=1 pytest tests/test_export.py`` and review the diff.
Every libvirt document is checked against libvirt's own RELAX NG schema
(``xmllint``), every KubeVirt object against KubeVirt's OpenAPI definitions with
unknown fields refused.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from gpuhosts import display_gpu, gpu_server
from test_argv import (
    CASES,
    DYNAMIC_CASES,
    VMEM_CAPS,
    _dev,
    _dynamic,
    _kv,
    _opts,
    _paths,
    _placement,
    _plan,
)
from test_argv import _bytes as _qemu_bytes
from test_native import FIXTURE_SITES, _site, host_of
from treebuilder import GiB, TreeBuilder

from partitioner.cli.main import main
from partitioner.cpuset import CpuSet
from partitioner.errors import ExportError
from partitioner.export import kubevirt, libvirt
from partitioner.guest.argv import guest_cpus_by_node, qemu_argv
from partitioner.manifest.model import Disk
from partitioner.pci import PciAddress
from partitioner.planning.model import Placement, Plan
from partitioner.planning.planner import plan as plan_site
from partitioner.units import KiB, MiB

GOLDEN = Path(__file__).parent / "golden" / "export"
FIXTURE_HOST = Path(__file__).parent / "fixtures" / "hosts" / "testbed-numa"
DOMAIN_RNG = Path("/usr/share/libvirt/schemas/domain.rng")
SWAGGER = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "kubevirt" / "swagger.json"
if not SWAGGER.exists():
    SWAGGER = Path("/work/shared/schemas/kubevirt/swagger.json")


def _check_golden(name: str, text: str) -> None:
    golden = GOLDEN / name
    if os.environ.get("PARTITION_REGEN_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"no golden file {golden}: run with PARTITION_REGEN_GOLDEN=1"
    assert text == golden.read_text(), f"{name} differs from {golden}"


def _xmllint(docs: dict[str, str], tmp_path: Path) -> None:
    """Every document valid against libvirt's domain.rng (the schema virsh define uses)."""
    if shutil.which("xmllint") is None or not DOMAIN_RNG.exists():
        pytest.skip(
            "needs xmllint and libvirt's schemas: apt-get install libxml2-utils libvirt-daemon"
        )
    paths = []
    for name, text in docs.items():
        (tmp_path / name).write_text(text)
        paths.append(str(tmp_path / name))
    cp = subprocess.run(
        ["xmllint", "--noout", "--relaxng", str(DOMAIN_RNG), *paths],
        capture_output=True,
        text=True,
    )
    assert cp.returncode == 0, cp.stderr


@functools.cache
def _strict_validator(definition: str) -> jsonschema.Draft4Validator:
    """KubeVirt's swagger definitions with ``additionalProperties: false`` added wherever an
    object lists its properties and says nothing of others: a misspelled field fails."""
    if not SWAGGER.exists():
        pytest.skip(f"KubeVirt's API schema is not at {SWAGGER} (../shared/schemas/kubevirt)")
    defs = copy.deepcopy(json.loads(SWAGGER.read_text())["definitions"])
    for d in defs.values():
        if "properties" in d and "additionalProperties" not in d:
            d["additionalProperties"] = False
    return jsonschema.Draft4Validator({"$ref": f"#/definitions/{definition}", "definitions": defs})


def _kubevirt_valid(doc: dict[str, Any]) -> None:
    kind = {"VirtualMachine": "v1.VirtualMachine", "KubeVirt": "v1.KubeVirt"}[doc["kind"]]
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in _strict_validator(kind).iter_errors(doc)
    ]
    assert not errors, errors


# -- libvirt ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_libvirt_golden_and_valid(case: str, tmp_path: Path) -> None:
    p, accel, _ = CASES[case]
    text = libvirt.domain_xml(p, _plan(p, accel))
    _check_golden(f"{case}.xml", text)
    _xmllint({f"{case}.xml": text}, tmp_path)


def _fixture_plan(case: str, tree: TreeBuilder) -> Plan:
    """The plan of test_native's golden command lines: its GPU server tree and site."""
    gpus, site = FIXTURE_SITES[case]
    gpu_server(tree, gpus=gpus, bar1=128 * GiB, phys_bits=46)
    display_gpu(tree, 0x30, 70)
    tree.node(0, memory_bytes=512 * GiB, free_bytes=500 * GiB, hugepages={GiB: (64, 64)})
    return plan_site(_site(site), host_of(tree))


@pytest.mark.parametrize("case", sorted(FIXTURE_SITES))
def test_libvirt_golden_and_valid_for_the_gpu_fixtures(
    case: str, tree: TreeBuilder, tmp_path: Path
) -> None:
    result = _fixture_plan(case, tree)
    (p,) = result.placements.values()
    text = libvirt.domain_xml(p, result)
    _check_golden(f"{case}.xml", text)
    _xmllint({f"{case}.xml": text}, tmp_path)
    _check_kvm_settings(ET.fromstring(text), p, result.accel)


def test_the_schema_check_can_fail(tmp_path: Path) -> None:
    """A misspelled element is refused by the same check the golden documents pass."""
    p, accel, _ = CASES["tcg-small"]
    text = libvirt.domain_xml(p, _plan(p, accel)).replace("<vcpupin ", "<vcpu_pin ")
    with pytest.raises(AssertionError, match="Extra element cputune"):
        _xmllint({"bad.xml": text}, tmp_path)


def _attrs(root: ET.Element, path: str) -> list[dict[str, str]]:
    return [dict(e.attrib) for e in root.findall(path)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_libvirt_carries_the_plan(case: str) -> None:
    """The decisions of guest/argv.py, read back from the XML."""
    p, accel, _ = CASES[case]
    plan = _plan(p, accel)
    root = ET.fromstring(libvirt.domain_xml(p, plan))
    assert root.get("type") == ("kvm" if accel == "kvm" else "qemu")
    # Each vCPU on its host CPU; the emulator and iothreads on the reserve.
    pins = {int(a["vcpu"]): int(a["cpuset"]) for a in _attrs(root, "cputune/vcpupin")}
    assert pins == dict(enumerate(p.cpus))
    assert root.find("vcpu").text == str(len(p.cpus))  # type: ignore[union-attr]
    assert _attrs(root, "cputune/emulatorpin") == [{"cpuset": str(plan.host_cpus)}]
    iopins = _attrs(root, "cputune/iothreadpin")
    assert len(iopins) == len(p.spec.disks)
    assert all(a["cpuset"] == str(plan.host_cpus) for a in iopins)
    # Topology and NUMA cells: each cell's vCPUs run on the host node its memory is bound to.
    topo = root.find("cpu/topology").attrib  # type: ignore[union-attr]
    assert (int(topo["sockets"]), int(topo["cores"]), int(topo["threads"])) == (
        p.sockets,
        p.cores,
        p.threads,
    )
    cells = _attrs(root, "cpu/numa/cell")
    memnodes = _attrs(root, "numatune/memnode")
    assert len(cells) == len(memnodes) == len(p.memory_per_node)
    for cell, mn, (node, size), (_, vcpus) in zip(
        cells, memnodes, p.memory_per_node, guest_cpus_by_node(p), strict=True
    ):
        assert int(cell["memory"]) * KiB == size
        assert mn == {"cellid": cell["id"], "mode": "strict", "nodeset": str(node)}
        assert CpuSet.parse(cell.get("cpus", "")) == CpuSet(vcpus)
        if p.cpu_nodes:
            assert all(p.cpu_nodes[v] == node for v in vcpus)
    # Memory: locked, unshared, allocated at start, of the plan's page size.
    mb = root.find("memoryBacking")
    assert mb is not None
    assert mb.find("locked") is not None and mb.find("nosharepages") is not None
    assert mb.find("allocation").get("mode") == "immediate"  # type: ignore[union-attr]
    pages = _attrs(mb, "hugepages/page")
    if p.hugepage_bytes is None:
        assert pages == []
    else:
        assert [int(a["size"]) * KiB for a in pages] == [p.hugepage_bytes]
        assert mb.find("source").get("type") == "memfd"  # type: ignore[union-attr]
    assert int(root.find("memory").text) * KiB == p.memory_bytes  # type: ignore[arg-type, union-attr]
    # No balloon; a serial console; host-passthrough under KVM with the dedicated hint.
    assert _attrs(root, "devices/memballoon") == [{"model": "none"}]
    assert root.find("devices/serial") is not None
    if accel == "kvm":
        assert root.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]
        assert _attrs(root, "features/kvm/hint-dedicated") == [{"state": "on"}]
    # Devices by host address, unmanaged, VFIO.
    hostdevs = root.findall("devices/hostdev")
    assert {h.get("managed") for h in hostdevs} <= {"no"}
    assert [h.get("name") for h in root.findall("devices/hostdev/driver")] == ["vfio"] * len(
        hostdevs
    )
    got = sorted(_host_address(h) for h in hostdevs)
    assert got == sorted(d.address for d in p.devices)
    _check_kvm_settings(root, p, accel)


QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"


def _check_kvm_settings(root: ET.Element, p: Placement, accel: str) -> None:
    """host-phys-bits=on under KVM (argv's condition) and x-vga=on on the primary display,
    in libvirt's spelling; no <qemu:commandline> (cpu-pm is not exported: decisions.md)."""
    maxphys = _attrs(root, "cpu/maxphysaddr")
    assert maxphys == ([{"mode": "passthrough"}] if accel == "kvm" else []), maxphys
    assert root.find(f"{QEMU_NS}commandline") is None
    aliases = {
        _host_address(h): a.get("name")
        for h in root.findall("devices/hostdev")
        if (a := h.find("alias")) is not None
    }
    shown = [d.address for d in p.devices if d.primary_display]
    assert sorted(aliases) == sorted(shown)
    assert all(str(name).startswith("ua-") for name in aliases.values())
    overridden = {
        dev.get("alias"): [
            dict(prop.attrib) for prop in dev.findall(f"{QEMU_NS}frontend/{QEMU_NS}property")
        ]
        for dev in root.findall(f"{QEMU_NS}override/{QEMU_NS}device")
    }
    assert overridden == {
        aliases[a]: [{"name": "x-vga", "type": "bool", "value": "true"}] for a in shown
    }


def _host_address(h: ET.Element) -> PciAddress:
    a = h.find("source/address")
    assert a is not None
    return PciAddress(*(int(a.get(k, "0"), 16) for k in ("domain", "bus", "slot", "function")))


def test_functions_of_one_slot_stay_together() -> None:
    """A GPU and its audio function share one guest slot with their function numbers; a
    function without function 0 in its slot gets a port of its own, as function 0."""
    p, accel, _ = CASES["kvm-devices-uefi"]
    root = ET.fromstring(libvirt.domain_xml(p, _plan(p, accel)))
    guest = {}
    for h in root.findall("devices/hostdev"):
        g = h.find("address")
        assert g is not None
        guest[str(_host_address(h))] = (g.get("bus"), g.get("function"), g.get("multifunction"))
    assert guest["0000:81:00.0"][0] == guest["0000:81:00.1"][0]
    assert guest["0000:81:00.0"][1:] == ("0x0", "on")
    assert guest["0000:81:00.1"][1] == "0x1"
    assert guest["0000:03:10.2"][1] == "0x0"
    buses = [v[0] for k, v in guest.items() if k not in ("0000:81:00.1",)]
    assert len(buses) == len(set(buses)), "every other function has a root port of its own"
    ports = {c.get("index") for c in root.findall("devices/controller[@model='pcie-root-port']")}
    assert {str(int(v[0] or "0", 16)) for v in guest.values()} <= ports


# -- dynamic partitions (rule 11) ---------------------------------------------------------


def _bounded(p: Placement, *, min_cpus: int | None = None) -> Placement:
    """``p`` with the manifest's bounds its placement was made from: max_cpus its slots,
    min/max_memory its fixed part and ceiling (and min_cpus when given)."""
    return replace(
        p,
        spec=replace(
            p.spec,
            min_cpus=min_cpus,
            max_cpus=p.max_vcpus if p.max_vcpus > len(p.cpus) else None,
            min_memory_bytes=p.fixed_memory_bytes if p.dynamic_memory else None,
            max_memory_bytes=p.max_memory_bytes if p.dynamic_memory else None,
        ),
    )


def _hotplugged() -> Placement:
    """2 of 4 vCPUs with min_cpus 1, 2 MiB pages, a disk, a device of its own and one attached
    live into the second of two spare slots (the first freed by a detach)."""
    p = _dynamic(
        _placement(
            "t2",
            (1, 3),
            ((0, 256 * MiB),),
            topology=(1, 4, 1),
            disks=(Disk("/srv/t2/root.img"),),
            devices=(_dev("0000:81:00.0", 19), _dev("0000:82:00.0", 20)),
        ),
        slots=4,
        fixed=((0, 128 * MiB),),
        most=((0, 512 * MiB),),
        hotplug=2,
    )
    return _bounded(replace(p, hotplugged=("", "0000:82:00.0")), min_cpus=1)


DYNAMIC_EXPORT_CASES: dict[str, tuple[Placement, str]] = {
    **{case: (_bounded(p), accel) for case, (p, accel, _) in DYNAMIC_CASES.items()},
    "dynamic-tcg-hotplugged": (_hotplugged(), "tcg"),
}


@pytest.mark.parametrize("case", sorted(DYNAMIC_EXPORT_CASES))
def test_libvirt_golden_and_valid_dynamic(case: str, tmp_path: Path) -> None:
    p, accel = DYNAMIC_EXPORT_CASES[case]
    text = libvirt.domain_xml(p, _plan(p, accel))
    _check_golden(f"{case}.xml", text)
    _xmllint({f"{case}.xml": text}, tmp_path)


@pytest.mark.parametrize("case", sorted(DYNAMIC_EXPORT_CASES))
def test_libvirt_mirrors_the_dynamic_command_line(case: str) -> None:
    """What argv puts on QEMU's command line for a dynamic partition, read back from the XML:
    the vCPU slots and their nodes, the fixed memory and its ceiling, each virtio-mem device,
    the lock left off with virtio-mem, the spare root ports and what sits in them."""
    p, accel = DYNAMIC_EXPORT_CASES[case]
    plan = _plan(p, accel)
    root = ET.fromstring(libvirt.domain_xml(p, plan))
    argv = qemu_argv(p, plan, _paths(p.name), VMEM_CAPS)

    # vCPUs: -smp cpus=N,maxcpus=M; the first min_cpus never unplugged, the rest hot-pluggable.
    smp = dict(_kv(_opts(argv, "-smp")[0]))
    vcpu = root.find("vcpu")
    assert vcpu is not None and int(vcpu.text or "") == int(smp["maxcpus"]) == p.max_vcpus
    n = len(p.cpus)
    assert vcpu.get("current") == (str(n) if p.max_vcpus > n else None)
    floor = p.spec.cpus_min
    assert _attrs(root, "vcpus/vcpu") == [
        {
            "id": str(i),
            "enabled": "yes" if i < n else "no",
            "hotpluggable": "no" if i < floor else "yes",
        }
        for i in range(p.max_vcpus)
        if p.max_vcpus > n or floor < n  # static vCPUs: no <vcpus>
    ]
    pins = {int(a["vcpu"]): int(a["cpuset"]) for a in _attrs(root, "cputune/vcpupin")}
    assert pins == dict(enumerate(p.cpus))
    # Every slot in the cell of argv's -numa cpu node-id (all in one cell without them).
    slot_cells = [
        int(dict(_kv(o))["node-id"]) for o in _opts(argv, "-numa") if o.startswith("cpu,")
    ] or [0] * p.max_vcpus
    cells = _attrs(root, "cpu/numa/cell")
    for cell in cells:
        want = [i for i, c in enumerate(slot_cells) if c == int(cell["id"])]
        assert CpuSet.parse(cell.get("cpus", "")) == CpuSet(want)
    # Memory: the cells hold the fixed part (argv's fixed backends), <maxMemory> is -m's
    # maxmem and slots; no <locked/> where argv says mem-lock=off.
    fixed = dict(p.fixed_memory_per_node)
    assert [int(c["memory"]) * KiB for c in cells] == [fixed[n] for n, _ in p.memory_per_node]
    overcommit = _opts(argv, "-overcommit")[0]
    locked = root.find("memoryBacking/locked") is not None
    assert locked == overcommit.startswith("mem-lock=on")
    vmem = [dict(_kv(o)) for o in _opts(argv, "-device") if o.startswith("virtio-mem-pci,")]
    backends = {b["id"]: b for b in (dict(_kv(o)) for o in _opts(argv, "-object")) if "size" in b}
    most = root.find("maxMemory")
    memory = root.find("memory")
    assert memory is not None
    if vmem:
        m = dict(_kv(_opts(argv, "-m")[0]))
        assert most is not None and int(most.text or "") * KiB == _qemu_bytes(m["maxmem"])
        assert most.get("slots") == m["slots"]
        assert int(memory.text or "") * KiB == _qemu_bytes(m["maxmem"])
    else:
        assert most is None and int(memory.text or "") * KiB == p.memory_bytes
    devices = root.findall("devices/memory")
    assert len(devices) == len(vmem)
    for el, d in zip(devices, vmem, strict=True):
        b = backends[d["memdev"]]
        assert el.get("model") == "virtio-mem"
        assert el.findtext("source/nodemask") == b["host-nodes"]
        page = el.find("source/pagesize")
        if "hugetlbsize" in b or "mem-path" in b:
            assert page is not None and int(page.text or "") * KiB == p.hugepage_bytes
        else:
            assert page is None
        assert int(el.findtext("target/size") or "") * KiB == _qemu_bytes(b["size"])
        assert el.findtext("target/node") == d["node"]
        assert int(el.findtext("target/block") or "") * KiB == _qemu_bytes(d["block-size"])
        assert int(el.findtext("target/requested") or "") * KiB == _qemu_bytes(d["requested-size"])
        # On the root bus as argv's, not in a root port (a spare one would be taken).
        assert _guest_address(el).get("bus") == "0x00"
    # Root ports: as many as argv's (the devices' own, then the spare ones); a function the
    # record put in spare slot hpJ is in the J-th spare port.
    ports = [dict(_kv(o)) for o in _opts(argv, "-device") if o.startswith("pcie-root-port,")]
    controllers = root.findall("devices/controller[@model='pcie-root-port']")
    assert len(controllers) == len(ports)
    index = {d["id"]: k + 1 for k, d in enumerate(ports)}
    for o in _opts(argv, "-device"):
        if o.startswith("vfio-pci,"):
            d = dict(_kv(o))
            [h] = [h for h in root.findall("devices/hostdev") if str(_host_address(h)) == d["host"]]
            assert int(_guest_address(h).get("bus", "-1"), 16) == index[d["bus"]]
    if p.hotplug_slots:
        for disk in root.findall("devices/disk"):
            assert _guest_address(disk).get("bus") == "0x00"


def _guest_address(el: ET.Element) -> dict[str, str]:
    a = el.find("address")
    return dict(a.attrib) if a is not None else {}


@pytest.mark.parametrize("case", sorted(CASES))
def test_static_bounds_give_the_static_domain(case: str) -> None:
    """A placement whose bounds equal what it has is static: the same XML, byte for byte."""
    p, accel, _ = CASES[case]
    bounded = _dynamic(
        p,
        slots=len(p.cpus),
        slot_nodes=p.cpu_nodes,
        fixed=p.memory_per_node,
        most=p.memory_per_node,
    )
    plan = _plan(p, accel)
    assert libvirt.domain_xml(bounded, plan) == libvirt.domain_xml(p, plan)
    assert libvirt.notes(plan) == libvirt.notes(_plan(bounded, accel))
    assert kubevirt.virtual_machine(bounded, plan, "n", sources=_sources(p)) == (
        kubevirt.virtual_machine(p, plan, "n", sources=_sources(p))
    )


def test_libvirt_notes_what_a_live_change_leaves_to_the_operator() -> None:
    p, accel = DYNAMIC_EXPORT_CASES["dynamic-kvm-two-nodes-1g"]
    said = libvirt.notes(_plan(p, accel))["db0"]
    assert any(
        "vCPUs 4-7" in n and "virsh vcpupin db0 VCPU CPU --live" in n and "add-cpus" in n
        for n in said
    ), said
    grow = [n for n in said if "virsh update-memory-device db0" in n]
    assert len(grow) == 2 and "node 0's pool of 1GiB pages" in grow[0], grow
    q, accel = DYNAMIC_EXPORT_CASES["dynamic-tcg-ram"]
    [_, ram] = libvirt.notes(_plan(q, accel))["t1"]
    assert "node 0 must have the memory free" in ram
    r, accel = CASES["kvm-two-nodes-1g"][:2]
    assert libvirt.notes(_plan(r, accel)) == {}


# -- KubeVirt -----------------------------------------------------------------------------


def _sources(p: Placement) -> kubevirt.Sources:
    """What a user names for ``p``: a claim for each disk KubeVirt cannot take as a hostDisk
    (a block device, a qcow2 image), a kernel image where it boots a kernel directly."""
    claims = {
        d.path: f"{p.name}-disk{i}"
        for i, d in enumerate(p.spec.disks)
        if d.path.startswith("/dev/") or d.path.endswith(".qcow2")
    }
    images = {p.name: f"registry.example/{p.name}-kernel:1"} if p.spec.boot else {}
    return kubevirt.Sources(claims=claims, kernel_images=images)


@pytest.mark.parametrize("case", sorted(CASES))
def test_kubevirt_golden_and_valid(case: str) -> None:
    p, accel, _ = CASES[case]
    if not p.spec.disks and p.spec.boot is None:
        # Nothing to boot from: refused, saying what to add (no golden VM that cannot start).
        with pytest.raises(ExportError, match=f"partition {p.name} has nothing to boot from"):
            kubevirt.export(_plan(p, accel), "node-a", sources=_sources(p))
        return
    result = kubevirt.export(_plan(p, accel), "node-a", sources=_sources(p))
    text = "".join(f"---\n# {n}\n{t}" for n, t in sorted(result.documents.items()))
    _check_golden(f"{case}.kubevirt.yaml", text)
    for t in result.documents.values():
        _kubevirt_valid(yaml.safe_load(t))


def test_kubevirt_schema_check_refuses_unknown_fields() -> None:
    p, accel, _ = CASES["kvm-devices-uefi"]
    vm = kubevirt.virtual_machine(p, _plan(p, accel), "node-a")
    _kubevirt_valid(vm)
    bad = copy.deepcopy(vm)
    bad["spec"]["template"]["spec"]["domain"]["cpu"]["dedicatedCPUPlacement"] = True
    with pytest.raises(AssertionError, match="dedicatedCPUPlacement"):
        _kubevirt_valid(bad)
    wrong_type = copy.deepcopy(vm)
    wrong_type["spec"]["template"]["spec"]["domain"]["cpu"]["cores"] = "2"
    with pytest.raises(AssertionError, match="cores"):
        _kubevirt_valid(wrong_type)


def _vm_domain(vm: dict[str, Any]) -> dict[str, Any]:
    d: dict[str, Any] = vm["spec"]["template"]["spec"]["domain"]
    return d


@pytest.mark.parametrize("case", sorted(CASES))
def test_kubevirt_carries_the_plan(case: str) -> None:
    p, accel, _ = CASES[case]
    sources = _sources(p)
    vm = kubevirt.virtual_machine(p, _plan(p, accel), "node-a", sources=sources)
    dom = _vm_domain(vm)
    # Every disk a volume, in the manifest's order: its claim where one is named, else the
    # image file; the first disk boots unless a kernel does, from the image named for it.
    volumes = {v["name"]: v for v in vm["spec"]["template"]["spec"].get("volumes", [])}
    disks = dom["devices"].get("disks", [])
    assert [d["name"] for d in disks] == [f"disk{i}" for i in range(len(p.spec.disks))]
    for i, disk in enumerate(p.spec.disks):
        v = volumes[f"disk{i}"]
        if disk.path in sources.claims:
            assert v["persistentVolumeClaim"] == {
                "claimName": sources.claims[disk.path],
                "readOnly": disk.readonly,
            }
        else:
            assert v["hostDisk"] == {"path": disk.path, "type": "Disk"}
    boot = dom["firmware"].get("kernelBoot")
    if p.spec.boot is None:
        assert boot is None and (not disks or disks[0]["bootOrder"] == 1)
    else:
        assert boot["container"]["image"] == sources.kernel_images[p.name]
        assert boot["container"]["kernelPath"] == p.spec.boot.kernel
        assert boot["container"].get("initrdPath") == p.spec.boot.initrd
        assert boot.get("kernelArgs") == p.spec.boot.cmdline
        assert all("bootOrder" not in d for d in disks)
    cpu = dom["cpu"]
    assert (cpu["sockets"], cpu["cores"], cpu["threads"]) == (p.sockets, p.cores, p.threads)
    assert cpu["dedicatedCpuPlacement"] is True and cpu["isolateEmulatorThread"] is True
    assert cpu["numa"] == {"guestMappingPassthrough": {}}
    assert _bytes(dom["memory"]["guest"]) == p.memory_bytes
    if p.hugepage_bytes:
        assert _bytes(dom["memory"]["hugepages"]["pageSize"]) == p.hugepage_bytes
    else:
        assert "hugepages" not in dom["memory"]
    assert dom["devices"]["autoattachMemBalloon"] is False
    assert vm["spec"]["template"]["spec"]["nodeSelector"] == {"kubernetes.io/hostname": "node-a"}
    want = [kubevirt.resource_name(d.vendor_device) for d in p.devices]
    assert [h["deviceName"] for h in dom["devices"].get("hostDevices", [])] == want


def _bootable(p: Placement) -> Placement:
    """``p`` with an image file to boot from where it has nothing (KubeVirt refuses that)."""
    if p.spec.disks or p.spec.boot is not None:
        return p
    return replace(p, spec=replace(p.spec, disks=(Disk(f"/srv/{p.name}/root.img"),)))


@pytest.mark.parametrize("case", sorted(DYNAMIC_EXPORT_CASES))
def test_kubevirt_golden_and_valid_dynamic(case: str) -> None:
    p, accel = DYNAMIC_EXPORT_CASES[case]
    p = _bootable(p)
    result = kubevirt.export(_plan(p, accel), "node-a", sources=_sources(p))
    text = "".join(f"---\n# {n}\n{t}" for n, t in sorted(result.documents.items()))
    _check_golden(f"{case}.kubevirt.yaml", text)
    for t in result.documents.values():
        _kubevirt_valid(yaml.safe_load(t))


@pytest.mark.parametrize("case", sorted(DYNAMIC_EXPORT_CASES))
def test_kubevirt_carries_what_it_can_of_a_dynamic_partition(case: str) -> None:
    """vCPUs by whole sockets of one core up to maxSockets, memory up to maxGuest (without
    guestMappingPassthrough, which KubeVirt refuses with it); the rest said in the notes."""
    p, accel = DYNAMIC_EXPORT_CASES[case]
    p = _bootable(p)
    plan = _plan(p, accel)
    dom = _vm_domain(kubevirt.virtual_machine(p, plan, "node-a", sources=_sources(p)))
    notes = " ".join(kubevirt.export(plan, "node-a", sources=_sources(p)).notes[p.name])
    cpu, n = dom["cpu"], len(p.cpus)
    if p.max_vcpus > n or p.spec.cpus_min < n:
        per = cpu["cores"] * cpu["threads"]
        assert cpu["cores"] == 1 and cpu["sockets"] * per == n
        assert cpu["maxSockets"] * per == p.max_vcpus
        assert f"vCPUs {n} of {p.max_vcpus} slots (min_cpus {p.spec.cpus_min})" in notes
        assert "hot-plugs whole sockets" in notes and "no floor there" in notes
    else:
        assert (cpu["sockets"], cpu["cores"], cpu["threads"]) == (p.sockets, p.cores, p.threads)
        assert "maxSockets" not in cpu and "hot-plugs whole sockets" not in notes
    assert _bytes(dom["memory"]["guest"]) == p.memory_bytes
    if p.dynamic_memory:
        assert _bytes(dom["memory"]["maxGuest"]) == p.max_memory_bytes
        assert "numa" not in cpu and "refuses guestMappingPassthrough" in notes
        assert "one virtio-mem device on guest node 0" in notes
    else:
        assert "maxGuest" not in dom["memory"]
        assert cpu["numa"] == {"guestMappingPassthrough": {}}
    if p.hotplug_slots:
        assert f"hotplug_slots {p.hotplug_slots}" in notes
    if p.devices:
        assert "which a VM with host devices cannot make" in notes
    elif p.dynamic_memory:
        assert "only by a live migration" in notes


def test_kubevirt_leaves_out_a_ceiling_it_would_refuse() -> None:
    """KubeVirt asks guest and maxGuest in whole 2Mi blocks (1Gi with 1Gi pages): a partition
    on normal pages whose memory is not is exported with fixed memory, and said so."""
    p, accel = DYNAMIC_EXPORT_CASES["dynamic-tcg-ram"]
    odd = replace(
        p,
        memory_per_node=((0, 192 * MiB + 4 * KiB),),
        fixed_per_node=((0, 128 * MiB + 4 * KiB),),
        max_per_node=((0, 384 * MiB + 4 * KiB),),
    )
    dom = _vm_domain(kubevirt.virtual_machine(odd, _plan(odd, accel), "n"))
    assert "maxGuest" not in dom["memory"] and dom["cpu"]["numa"]
    said = kubevirt.export(_plan(odd, accel), "n", sources=_sources(odd)).notes["t1"]
    assert any("not a multiple of 2MiB" in n and "maxGuest is left out" in n for n in said)


def _bytes(q: str) -> int:
    for suffix, unit in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if q.endswith(suffix):
            return int(q[: -len(suffix)]) * unit
    return int(q)


def test_kubevirt_says_which_devices_it_could_swap() -> None:
    """Two partitions with NICs of one model: KubeVirt may give either the other's, and a
    third function of that model that no partition holds is a candidate too."""
    a, accel, _ = CASES["kvm-devices-uefi"]  # 10de:1eb8 at 82:00.0, 81:00.0, 03:10.2, 81:00.1
    b_dev = a.devices[0].__class__(
        address=PciAddress.parse("0000:c1:00.0"),
        iommu_group=60,
        vendor_device="10de:1eb8",
        driver="nvidia",
        added=False,
        reason="test",
    )
    b = _placement_like(a, "db1", (20, 21), (b_dev,))
    plan = _plan(a, accel)
    plan = plan.__class__(
        accel=plan.accel,
        smt=plan.smt,
        host_cpus=plan.host_cpus,
        host_memory_bytes=plan.host_memory_bytes,
        placements={"db1": b, "fw0": a},
    )
    spare = PciAddress.parse("0000:c2:00.0")
    other = PciAddress.parse("0000:c3:00.0")
    sources = _sources(a)
    result = kubevirt.export(plan, "node-a", {spare: "10de:1eb8", other: "8086:10d3"}, sources)
    db1 = " ".join(result.substitutions["db1"])
    assert "0000:81:00.0 (partition fw0)" in db1 and "0000:c2:00.0 (not in the plan)" in db1
    assert "0000:c3:00.0" not in db1
    # fw0 could get db1's function or the spare for each of its four; its own are no loss.
    assert len(result.substitutions["fw0"]) == 4
    assert all("partition fw0" not in s for s in result.substitutions["fw0"])
    assert all("0000:c1:00.0 (partition db1)" in s for s in result.substitutions["fw0"])
    vm = yaml.safe_load(result.documents["db1.yaml"])
    assert "partition fw0" in vm["metadata"]["annotations"]["partition.local/device-substitution"]
    kv = yaml.safe_load(result.documents["kubevirt-permitted-host-devices.yaml"])
    _kubevirt_valid(kv)
    assert kv["spec"]["configuration"]["permittedHostDevices"]["pciHostDevices"] == [
        {"pciVendorSelector": "10DE:1EB8", "resourceName": "partition.local/pci-10de-1eb8"}
    ]
    # A model of its own: nothing to swap, no annotation.
    alone = kubevirt.export(plan, "node-a", {}, sources)
    solo = _placement_like(a, "solo", (30,), ())
    assert kubevirt.virtual_machine(solo, plan, "n")["metadata"]["annotations"].keys() == {
        "partition.local/planned-cpus"
    }
    assert alone.substitutions["db1"] and alone.notes["db1"]


def _placement_like(
    p: Placement, name: str, cpus: tuple[int, ...], devices: tuple[Any, ...]
) -> Placement:

    return replace(
        p,
        name=name,
        cpus=cpus,
        cores=len(cpus),
        sockets=1,
        threads=1,
        devices=devices,
        cpu_nodes=(),
        spec=replace(p.spec, name=name, cpu_count=len(cpus)),
    )


# -- the verb -----------------------------------------------------------------------------

SITE = """\
version: 1
host: {reserve: {cpus: "0-1", memory: 256MiB}, accel: tcg, isolation: pinned}
partitions:
  fw0:
    cpus: 2
    memory: 64MiB
    devices: [{pci: "0000:41:00.0"}, {pci: "0000:42:00.0"}]
    boot: {kernel: /srv/fw0/vmlinuz, initrd: /srv/fw0/initrd.img, cmdline: console=ttyS0}
  db0:
    cpus: 2
    memory: 64MiB
    numa: [1]
    devices: [{pci: "0000:81:00.0"}]
    disks: [{path: /srv/db0.qcow2}]
"""


# What the SITE needs named to boot under KubeVirt: fw0's kernel, db0's qcow2 image.
BOOTABLE = (
    "--kernel-image",
    "fw0=registry.example/fw0-kernel:1",
    "--pvc",
    "/srv/db0.qcow2=db0-root",
)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_export_verb_on_a_host_tree(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(SITE)
    root = ("--host-root", str(FIXTURE_HOST))
    rc, out, err = _run(capsys, *root, "--json", "plan", str(site))
    assert rc == 0, err
    planned = json.loads(out)["partitions"]

    out_dir = tmp_path / "libvirt"
    rc, out, err = _run(
        capsys, *root, "export", str(site), "--format", "libvirt", "--out", str(out_dir)
    )
    assert rc == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["db0.xml", "fw0.xml"]
    assert out.split() == [str(out_dir / "db0.xml"), str(out_dir / "fw0.xml")]
    _xmllint({p.name: p.read_text() for p in out_dir.iterdir()}, tmp_path)
    for name, want in planned.items():
        root_el = ET.parse(out_dir / f"{name}.xml").getroot()
        pins = [int(a["cpuset"]) for a in _attrs(root_el, "cputune/vcpupin")]
        assert pins == want["cpus"]
        hostdevs = [str(_host_address(h)) for h in root_el.findall("devices/hostdev")]
        assert sorted(hostdevs) == sorted(want["devices"] + want["added_devices"])

    # kubevirt: the fixture says no hostname, so --node is needed, and said so.
    rc, out, err = _run(capsys, *root, "export", str(site), "--format", "kubevirt")
    assert rc == 2 and "--node" in err and out == ""
    rc, out, err = _run(
        capsys, *root, "--json", "export", str(site), "--format", "kubevirt", "--node", "n1",
        *BOOTABLE,
    )  # fmt: skip
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["files"] == ["db0.yaml", "fw0.yaml", "kubevirt-permitted-host-devices.yaml"]
    for text in doc["documents"].values():
        _kubevirt_valid(yaml.safe_load(text))
    # 8086:10d3 is the model of every NIC of this host: KubeVirt could swap any of them.
    swaps = " ".join(doc["substitutions"]["db0"])
    assert "0000:41:00.0 (partition fw0)" in swaps and "0000:01:00.0 (not in the plan)" in swaps
    assert any("kubelet" in n for n in doc["notes"]["fw0"])


def test_export_refuses_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(SITE)
    root = ("--host-root", str(FIXTURE_HOST))
    rc, out, err = _run(capsys, *root, "export", str(site), "--format", "vmware")
    assert rc == 2 and out == "" and "vmware" in err and "libvirt" in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc, out, err = _run(
        capsys, *root, "export", str(site), "--format", "libvirt", "--out", str(blocker / "x")
    )
    assert rc == 2 and "cannot write the export" in err and "Traceback" not in err
    site.write_text(
        SITE.replace("cpus: 2\n    memory: 64MiB\n    numa", "cpus: 7\n    memory: 64MiB\n    numa")
    )
    rc, out, err = _run(capsys, *root, "export", str(site), "--format", "libvirt")
    assert rc == 3 and out == ""


def test_kubevirt_export_that_cannot_boot_is_refused_naming_what_to_add(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Each partition's problem at once, exit 3, no document written."""
    site = tmp_path / "site.yaml"
    site.write_text(SITE.replace("/srv/db0.qcow2}]", "/srv/db0.qcow2}, {path: /dev/sdb}]"))
    argv = ("--host-root", str(FIXTURE_HOST), "export", str(site), "--format", "kubevirt")
    out_dir = tmp_path / "out"
    rc, out, err = _run(capsys, *argv, "--node", "n1", "--out", str(out_dir))
    assert rc == 3 and out == "" and not out_dir.exists()
    assert "partition fw0 boots the kernel /srv/fw0/vmlinuz directly" in err
    assert "add --kernel-image fw0=IMAGE, an image holding /srv/fw0/vmlinuz and " in err
    assert "disk /srv/db0.qcow2: a qcow2 image" in err and "--pvc /srv/db0.qcow2=CLAIM" in err
    assert "disk /dev/sdb: a block device" in err and "add --pvc /dev/sdb=CLAIM" in err
    rc, out, err = _run(capsys, *argv, "--node", "n1", "--json", *BOOTABLE)
    doc = json.loads(out)
    assert rc == 3 and doc["ok"] is False and doc["exit"] == 3
    # With the kernel image and the qcow2's claim named, only the block device is left.
    [problem] = doc["problems"]
    assert problem["message"].startswith("partition db0: disk /dev/sdb: a block device")
    # Named, it boots: the claim and the kernel image are in the VM, valid for KubeVirt.
    rc, out, err = _run(
        capsys, *argv, "--node", "n1", "--json", *BOOTABLE, "--pvc", "/dev/sdb=db0-data"
    )
    assert rc == 0, err
    doc = json.loads(out)
    for text in doc["documents"].values():
        _kubevirt_valid(yaml.safe_load(text))
    db0 = yaml.safe_load(doc["documents"]["db0.yaml"])["spec"]["template"]["spec"]
    assert db0["volumes"] == [
        {"name": "disk0", "persistentVolumeClaim": {"claimName": "db0-root", "readOnly": False}},
        {"name": "disk1", "persistentVolumeClaim": {"claimName": "db0-data", "readOnly": False}},
    ]
    assert db0["domain"]["devices"]["disks"][0]["bootOrder"] == 1
    fw0 = yaml.safe_load(doc["documents"]["fw0.yaml"])["spec"]["template"]["spec"]
    assert fw0["domain"]["firmware"]["kernelBoot"] == {
        "container": {
            "image": "registry.example/fw0-kernel:1",
            "kernelPath": "/srv/fw0/vmlinuz",
            "initrdPath": "/srv/fw0/initrd.img",
        },
        "kernelArgs": "console=ttyS0",
    }


def test_kubevirt_partition_with_nothing_to_boot_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(SITE.replace("    disks: [{path: /srv/db0.qcow2}]\n", ""))
    rc, out, err = _run(
        capsys, "--host-root", str(FIXTURE_HOST), "export", str(site), "--format", "kubevirt",
        "--node", "n1", "--kernel-image", "registry.example/k:1",
    )  # fmt: skip
    assert rc == 3 and out == ""
    assert "partition db0 has nothing to boot from (no boot: and no disks:): add a disk" in err
    assert "fw0" not in err  # the image without NAME= went to every partition with boot:


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--pvc", "/srv/none.img=x"], "/srv/none.img is no disk of"),
        (["--pvc", "/srv/db0.qcow2"], "give PATH=CLAIM"),
        (["--pvc", "/srv/db0.qcow2=DB_root"], "'DB_root' is not a claim name Kubernetes takes"),
        (["--kernel-image", "db0=registry.example/k:1"], "db0 is no partition of"),
        (["--kernel-image", "fw0="], "name a container image"),
        (["--format", "libvirt", "--pvc", "/srv/db0.qcow2=db0"], "are for --format kubevirt"),
    ],
)
def test_kubevirt_sources_that_name_nothing_are_usage_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: list[str], said: str
) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(SITE)
    fmt = [] if "--format" in extra else ["--format", "kubevirt"]
    rc, out, err = _run(
        capsys, "--host-root", str(FIXTURE_HOST), "export", str(site), *fmt, "--node", "n1", *extra
    )
    assert rc == 2 and out == "" and said in err, err
