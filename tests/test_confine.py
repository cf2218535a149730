"""Rule 10 in the manifest and the plan: ``host.confine`` and ``host.allow_unsafe_interrupts``.

Hosts are TreeBuilder trees read back through the real inventory; manifests go
through the real loader.  Interrupt remapping is what ``/proc/interrupts`` shows
(an ``IR-`` irqchip), as on a real machine.
"""

from __future__ import annotations

import textwrap

import pytest
from treebuilder import GiB, MiB, TreeBuilder

from partitioner.errors import PlanError
from partitioner.inventory import scan
from partitioner.inventory.model import Host
from partitioner.kernel.root import HostRoot
from partitioner.manifest.loader import loads
from partitioner.manifest.model import Manifest
from partitioner.planning.planner import plan

REMAPPED = "            CPU0\n 24:    100  IR-PCI-MSI 512000-edge  ahci\n"
NOT_REMAPPED = "            CPU0\n 24:    100  PCI-MSI 512000-edge  ahci\n"


def manifest(text: str) -> Manifest:
    return loads(textwrap.dedent(text), file="site.yaml")


def host(tmp_path_factory: pytest.TempPathFactory, interrupts: str | None) -> Host:
    t = TreeBuilder(tmp_path_factory.mktemp("host"))
    t.cpus(count=8, packages=1, threads=1, nodes=1, memory_per_node=8 * GiB)
    t.node(0, memory_bytes=8 * GiB, free_bytes=6 * GiB, hugepages={2 * MiB: (0, 0)})
    t.kvm()
    t.pci("0000:00:01.0", class_code="060400", driver="pcieport", iommu_group=1, numa_node=0)
    t.pci(
        "0000:01:00.0",
        driver="e1000e",
        iommu_group=2,
        numa_node=0,
        parent="0000:00:01.0",
        netdevs=("enp1s0",),
    )
    if interrupts is not None:
        t.file("/proc/interrupts", interrupts)
    return scan(HostRoot(t.build()))


SITE = """\
version: 1
host:
  reserve: {{cpus: 1, memory: 1GiB}}
  smt: share
{host}
partitions:
  a:
    cpus: 2
    memory: 1GiB
{devices}
"""


def site(host_lines: str = "", devices: bool = True) -> Manifest:
    return manifest(
        SITE.format(
            host=textwrap.indent(host_lines, "  "),
            devices="    devices:\n      - pci: 0000:01:00.0" if devices else "",
        )
    )


def test_confine_is_the_default_and_can_be_switched_off() -> None:
    m = site(devices=False)
    assert m.host.confine is True and m.host.allow_unsafe_interrupts is False
    off = site("confine: false\nallow_unsafe_interrupts: true\n", devices=False)
    assert off.host.confine is False and off.host.allow_unsafe_interrupts is True


def test_confine_must_be_a_boolean() -> None:
    from partitioner.errors import ManifestError

    with pytest.raises(ManifestError) as e:
        site("confine: maybe\n", devices=False)
    assert "host.confine" in str(e.value) or "confine" in str(e.value)


def test_the_plan_warns_on_every_run_when_confinement_is_off(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    h = host(tmp_path_factory, REMAPPED)
    on = plan(site(devices=False), h)
    assert on.confine is True
    assert not any("confine" in n for n in on.notes)
    off = plan(site("confine: false\n", devices=False), h)
    assert off.confine is False
    assert any("host.confine is false" in n and "root" in n for n in off.notes)
    assert off.to_json()["confine"] is False


def test_a_device_without_interrupt_remapping_is_refused(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    h = host(tmp_path_factory, NOT_REMAPPED)
    assert h.interrupt_remapping is False
    with pytest.raises(PlanError) as e:
        plan(site(), h)
    said = "\n".join(map(str, e.value.problems))
    assert "no interrupt remapping" in said
    assert "intremap=off" in said and "firmware" in said
    assert "allow_unsafe_interrupts" in said
    assert e.value.exit_code == 3


def test_allowing_unsafe_interrupts_is_said_on_every_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    h = host(tmp_path_factory, NOT_REMAPPED)
    result = plan(site("allow_unsafe_interrupts: true\n"), h)
    assert "a" in result.placements
    assert any("forge interrupts" in n and "allow_unsafe_interrupts" in n for n in result.notes)


def test_a_host_with_interrupt_remapping_assigns_devices_without_a_word(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    h = host(tmp_path_factory, REMAPPED)
    assert h.interrupt_remapping is True
    result = plan(site(), h)
    assert [str(d.address) for d in result.placements["a"].devices] == ["0000:01:00.0"]
    assert not any("interrupt" in n for n in result.notes)


def test_a_host_that_cannot_tell_is_said_so(tmp_path_factory: pytest.TempPathFactory) -> None:
    h = host(tmp_path_factory, None)
    assert h.interrupt_remapping is None
    result = plan(site(), h)
    assert any("remaps interrupts cannot be told" in n for n in result.notes)
