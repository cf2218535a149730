"""The test bed's QEMU: chosen by the devices each binary lists, never by its version.

The real binaries are asked where they are: Debian 12's QEMU 7.2 (no igb) and the
QEMU scripts/setup unpacks beside it (igb).  Stand-in binaries (small shell
scripts that answer ``-device help``) show that the answer, not the version,
decides.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from partitioner.testbed import qemu as tbqemu
from partitioner.testbed.qemu import QemuLacksDevices, choose_qemu, device_models
from partitioner.testbed.server import TestbedServer
from partitioner.testbed.topology import load_topology, qemu_args

SYSTEM = shutil.which("qemu-system-x86_64")
SIDE = tbqemu.SIDE_BY_SIDE[0]


def fake_qemu(tmp_path: Path, name: str, devices: list[str], version: str) -> str:
    """A binary that answers ``-device help`` with ``devices`` and ``--version`` with ``version``."""
    p = tmp_path / name
    lines = "".join(f"echo 'name \"{d}\", bus PCI'\n" for d in devices)
    p.write_text(
        "#!/bin/sh\n"
        f'case "$*" in *--version*) echo "QEMU emulator version {version}"; exit 0;; esac\n'
        'case "$*" in *"-device help"*) ;; *) exit 1;; esac\n' + lines
    )
    p.chmod(0o755)
    return str(p)


BASE = ["intel-iommu", "pcie-root-port", "virtio-9p-pci", "e1000e"]


def test_the_sriov_preset_needs_igb_and_the_others_do_not() -> None:
    sriov = load_topology("sriov")
    assert sriov.has_sriov and "igb" in sriov.qemu_devices()
    for name in ("small", "numa"):
        t = load_topology(name)
        assert not t.has_sriov and "igb" not in t.qemu_devices()
    # What qemu_args puts on the command line is what qemu_devices says it needs.
    argv = qemu_args(sriov, kernel="k", initrd="i", cmdline="", console_log="c")
    used = {argv[i + 1].split(",")[0] for i, a in enumerate(argv) if a == "-device"}
    assert used == set(sriov.qemu_devices()) - {"virtio-9p-pci"}  # no shares given here
    assert "igb,id=d0f0,bus=rp0,addr=0x0.0" in argv


def test_the_device_list_decides_not_the_version(tmp_path: Path) -> None:
    old_with_igb = fake_qemu(tmp_path, "old", [*BASE, "igb"], "7.2.0")
    new_without = fake_qemu(tmp_path, "new", BASE, "99.0.0")
    want = load_topology("sriov").qemu_devices()
    assert choose_qemu("sriov", want, [new_without, old_with_igb]) == old_with_igb
    # A topology both can build takes the first.
    assert choose_qemu("small", BASE, [new_without, old_with_igb]) == new_without


def test_no_qemu_with_igb_refuses_the_preset_naming_what_was_asked(tmp_path: Path) -> None:
    a = fake_qemu(tmp_path, "a", BASE, "10.0.0")
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\necho no such thing >&2\nexit 3\n")
    broken.chmod(0o755)
    with pytest.raises(QemuLacksDevices) as ei:
        choose_qemu("sriov", load_topology("sriov").qemu_devices(), [a, str(broken)])
    text = str(ei.value)
    assert "igb" in ei.value.missing and f"{a} (lacks igb)" in text
    assert str(broken) in text and "did not answer" in text
    assert "scripts/setup" in text and "PARTITION_TESTBED_QEMU" in text
    assert ei.value.exit_code == 3  # a PreconditionError: the machine lacks something


def test_the_server_refuses_the_preset_before_booting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the test bed needs root before it looks for a QEMU")
    monkeypatch.setattr(tbqemu, "SIDE_BY_SIDE", ())
    monkeypatch.setenv("PARTITION_TESTBED_QEMU", fake_qemu(tmp_path, "q", BASE, "10.0.0"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no system QEMU either
    with pytest.raises(QemuLacksDevices), TestbedServer("sriov", ["true"], progress=None):
        pass


def test_named_qemus_come_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    q = fake_qemu(tmp_path, "q", [*BASE, "igb"], "8.0.0")
    monkeypatch.setenv("PARTITION_TESTBED_QEMU", f"{q}:{tmp_path}/absent")
    paths = tbqemu.candidate_paths()
    assert paths[0] == q and f"{tmp_path}/absent" not in paths


@pytest.mark.qemu
@pytest.mark.skipif(SYSTEM is None, reason="needs qemu-system-x86_64")
def test_the_real_qemus() -> None:
    """The system's QEMU boots the presets it can; the sriov preset takes the one with igb."""
    assert SYSTEM is not None
    system = os.path.abspath(SYSTEM)
    for name in ("small", "numa"):
        assert choose_qemu(name, load_topology(name).qemu_devices()) == system
    sriov = load_topology("sriov").qemu_devices()
    if "igb" in device_models(system):
        assert choose_qemu("sriov", sriov) == system
    elif Path(SIDE).exists():
        assert "igb" in device_models(SIDE)
        assert choose_qemu("sriov", sriov) == SIDE
    else:
        with pytest.raises(QemuLacksDevices):
            choose_qemu("sriov", sriov)
