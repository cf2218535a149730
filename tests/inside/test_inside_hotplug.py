"""A NIC hot-plugged into a CONFINED partition's QEMU and back, inside the emulated VT-d server.

Run by tests/test_inside.py (``pytest tests/test_inside.py -k hotplug``).  A confined
partition (its own uid, chrooted into the empty ``RUN_DIR/NAME/root``) is started with no
device but with a spare PCIe root port (``hp0``; an argv tweak here until the argv helper
lays out ``hotplug_slots``), through the project's own ``launch``.  Then, as the engine's
attach will:

1. the NIC's IOMMU group is claimed for vfio-pci (``vfio.claim.claim_group``);
2. ``device_add vfio-pci`` BEFORE the device is exposed is refused: the control, what a
   chrooted QEMU meets without guest/jail.py;
3. ``expose_device`` makes ``dev/vfio/{vfio,N}`` and ``sys/bus/pci/devices/ADDR/iommu_group``
   in the QEMU's root; ``device_add`` now realizes the device, and the nested guest lists
   it (its console reports its PCI functions whenever they change);
4. ``device_del``, ``DEVICE_DELETED`` awaited, the guest no longer lists it,
   ``withdraw_device`` leaves the root empty, the group is given back to e1000e.

Everything the QEMU does by path around ``device_add`` is traced with strace (when there
is one) and kept in the testbed's output (``hotplug-strace.txt``): the paths vfio-pci
reaches, read back from the kernel rather than from QEMU's source.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from guestimage import guest_kernel

from partitioner.engine.confine import free_user
from partitioner.guest import launch as launch_mod
from partitioner.guest.argv import Jail, guest_paths, qemu_argv
from partitioner.guest.caps import probe_qemu
from partitioner.guest.jail import expose_device, exposed, nodev, withdraw_device
from partitioner.guest.launch import launch, powerdown
from partitioner.guest.qmp import Qmp, QmpCommandError
from partitioner.inventory.model import Host
from partitioner.kernel.root import HostRoot
from partitioner.manifest.loader import load
from partitioner.planning.confine import memlock_bytes
from partitioner.planning.files import checked_plan
from partitioner.record.model import State
from partitioner.testbed import guestimage
from partitioner.vfio.claim import claim_group, current_driver, release_group

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or not os.path.isdir("/sys/kernel/iommu_groups/0"),
        reason="runs inside the emulated VT-d server (root, IOMMU groups)",
    ),
    pytest.mark.usefixtures("nic_drivers"),
]

ROOT = HostRoot("/")
NAME = "hot"
NIC_ID = "8086:10d3"
PORT = ["-device", "pcie-root-port,id=hp0,chassis=30,port=0x1e"]
BOOT_TIMEOUT = 700.0  # a TCG guest inside a TCG server on shared cores: minutes
PLUG_TIMEOUT = 300.0

# The test guest, and beside its boot-time report a watcher that prints the guest's PCI
# functions again whenever they change (shell builtins only: a fork costs under TCG twice).
WATCH = r"""( seen=""; while :; do
    now=""
    for d in /sys/bus/pci/devices/*; do
      [ -e "$d/vendor" ] || continue
      read v < "$d/vendor"; read i < "$d/device"
      now="$now ${v#0x}:${i#0x}@${d##*/}"
    done
    [ "$now" = "$seen" ] || echo "GUEST-PCI-NOW$now"
    seen=$now; sleep 2
  done ) &
echo GUEST-READY
"""


def lone_e1000e(host: Host) -> tuple[str, int, int]:
    """A NIC alone in its IOMMU group, on a NUMA node, free: (address, group, node)."""
    for g in sorted(host.iommu_groups):
        ends = [host.pci[a] for a in host.iommu_groups[g].members if not host.pci[a].is_bridge]
        if (
            len(ends) == 1
            and ends[0].id == NIC_ID
            and ends[0].driver == "e1000e"
            and ends[0].numa_node is not None
            and ends[0].address not in host.in_use
        ):
            return str(ends[0].address), g, ends[0].numa_node
    raise AssertionError("no e1000e alone in its IOMMU group on a NUMA node")


def console_lines(log: Path, prefix: str) -> list[str]:
    text = log.read_text(errors="replace").replace("\r", "") if log.exists() else ""
    return [ln for ln in text.splitlines() if ln.startswith(prefix)]


def wait_for(log: Path, what: str, cond: Any, timeout: float) -> list[str]:
    """The console's ``GUEST-PCI-NOW`` lines once ``cond(last line)`` holds."""
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = console_lines(log, "GUEST-PCI-NOW")
        if lines and cond(lines[-1]):
            return lines
        time.sleep(1)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no console log)"
    raise AssertionError(f"{what}: not seen on the guest's console in {timeout:g}s:\n{tail}")


def device_del(socket: Path, dev_id: str, timeout: float) -> dict[str, Any]:
    """``device_del`` and QEMU's ``DEVICE_DELETED`` for ``dev_id`` (the guest ejected it)."""
    from qemu.qmp import QMPClient

    async def run() -> dict[str, Any]:
        client = QMPClient("hotplug-test")
        await client.connect(str(socket))
        try:
            with client.listener("DEVICE_DELETED") as listener:
                await client.execute("device_del", {"id": dev_id})
                while True:
                    event: dict[str, Any] = dict(await asyncio.wait_for(listener.get(), timeout))
                    if event.get("data", {}).get("device") == dev_id:
                        return event
        finally:
            await client.disconnect()

    return asyncio.run(run())


class Strace:
    """strace on every thread of a process, file system calls only, to a file."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        if shutil.which("strace") is None:
            return
        argv = ["strace", "-f", "-qq", "-tt", "-e", "trace=%file", "-o", str(out), "-p", str(pid)]
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE)
        time.sleep(3)  # attached to every thread before anything is asked of QEMU

    def stop(self) -> str:
        if self.proc is None:
            return ""
        self.proc.send_signal(signal.SIGINT)  # detaches; QEMU runs on
        self.proc.wait(timeout=60)
        return self.out.read_text(errors="replace") if self.out.exists() else ""


def vfio_descriptors(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if "/dev/vfio/" in link:
            out.append(link)
    return sorted(out)


@pytest.fixture
def tmp() -> Iterator[Path]:
    # On the server's /tmp (a tmpfs without nodev, as the run directory must be for this).
    d = Path(tempfile.mkdtemp(prefix="partition-hotplug-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_nic_hot_plugged_into_a_confined_partition_and_back(
    tmp: Path, testbed_out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from partitioner.inventory import scan

    host = scan(ROOT)
    address, group, node = lone_e1000e(host)
    assert not nodev(tmp), f"{tmp} is mounted nodev: no device node could be opened there"

    # The guest: the project's test image, with its PCI watcher.
    assert "echo GUEST-READY\n" in guestimage.INIT
    monkeypatch.setattr(guestimage, "INIT", guestimage.INIT.replace("echo GUEST-READY\n", WATCH))
    initrd = guestimage.build_guest_initramfs(tmp / "img")
    manifest = tmp / "site.yaml"
    manifest.write_text(
        "version: 1\n"
        "host:\n  accel: tcg\n  smt: share\n  confine: true\n"
        f"partitions:\n  {NAME}:\n"
        f"    cpus: 1\n    memory: 128MiB\n    hugepages: 2MiB\n    numa: {node}\n"
        f"    boot:\n      kernel: {guest_kernel()}\n      initrd: {initrd}\n"
        "      cmdline: console=ttyS0 quiet panic=-1\n"
    )
    plan = checked_plan(load(manifest), host, {})
    p = plan.placements[NAME]
    assert plan.confine and not p.devices

    # Confined as apply starts it: a uid of the range; the locked-memory limit counts the
    # guest's memory once more, which VFIO pins once a device is plugged.
    uid = free_user(State(), ROOT, NAME)
    jail = Jail(uid=uid, gid=uid, memlock_bytes=memlock_bytes(p, plan.accel) + p.memory_bytes)
    paths = guest_paths(tmp / "run", tmp / "log", NAME)
    monkeypatch.setattr(launch_mod, "qemu_argv", lambda *a, **k: [*qemu_argv(*a, **k), *PORT])
    guest = launch(p, plan, paths, probe_qemu(), root=ROOT, timeout=BOOT_TIMEOUT, jail=jail)
    claim = None
    try:
        pid = guest.pid
        assert os.readlink(f"/proc/{pid}/root") == str(paths.chroot)
        assert os.listdir(paths.chroot) == []
        boot = wait_for(paths.console_log, "the guest's PCI list", lambda _: True, BOOT_TIMEOUT)
        assert NIC_ID not in boot[-1], boot[-1]

        claim = claim_group(ROOT, host, group)
        assert current_driver(ROOT, address) == "vfio-pci"
        add = {"driver": "vfio-pci", "host": address, "bus": "hp0", "id": "hostdev0"}
        trace = Strace(pid, tmp / "strace.txt")

        # The control: chrooted, QEMU finds no such device.
        with (
            Qmp(paths.qmp, timeout=60, partition=NAME) as qmp,
            pytest.raises(QmpCommandError) as no,
        ):
            qmp.execute("device_add", add)
        refused = str(no.value)

        expose_device(ROOT, paths.chroot, uid, address, group)
        assert exposed(paths.chroot) == {address: group}
        with Qmp(paths.qmp, timeout=120, partition=NAME) as qmp:
            qmp.execute("device_add", add)
            peripherals = {
                d["name"] for d in qmp.execute("qom-list", {"path": "/machine/peripheral"})
            }
        traced = trace.stop()
        assert traced or trace.proc is None, "strace is there but traced nothing"
        (testbed_out / "hotplug-strace.txt").write_text(
            f"device_add before expose_device: {refused}\n\n{traced}"
        )
        assert "hostdev0" in peripherals
        assert "no such host device" in refused, refused
        held = vfio_descriptors(pid)
        chroot_vfio = f"{paths.chroot}/dev/vfio"
        assert f"{chroot_vfio}/{group}" in held and f"{chroot_vfio}/vfio" in held, held
        plugged = wait_for(
            paths.console_log, "the NIC in the guest", lambda ln: NIC_ID in ln, PLUG_TIMEOUT
        )
        if traced:
            # What vfio-pci reached by path is what guest/jail.py exposes, and nothing else.
            sysfsdev = f"/sys/bus/pci/devices/{address}"
            needed = {sysfsdev, f"{sysfsdev}/iommu_group", f"/dev/vfio/{group}", "/dev/vfio/vfio"}
            # realpath(SYSFSDEV/subsystem), "is it an mdev": a readlink of every component.
            realpath = {f"{sysfsdev}/subsystem", *map(str, Path(sysfsdev).parents)} - {"/"}
            touched = set(re.findall(r'^\d+ +[0-9:.]+ \w+\((?:AT_FDCWD, )?"([^"]+)"', traced, re.M))
            assert needed <= touched, (needed - touched, traced)
            assert touched <= needed | realpath, (touched - needed - realpath, traced)

        # Taken out: the guest ejects it, QEMU says DEVICE_DELETED and closes the group.
        event = device_del(paths.qmp, "hostdev0", PLUG_TIMEOUT)
        assert event["data"]["device"] == "hostdev0"
        gone = wait_for(
            paths.console_log, "the NIC gone from the guest", lambda ln: NIC_ID not in ln, 120
        )
        assert vfio_descriptors(pid) == []
        withdraw_device(ROOT, paths.chroot, address, group)
        assert os.listdir(paths.chroot) == []
        release_group(ROOT, claim)
        claim = None
        assert current_driver(ROOT, address) == "e1000e"
        (testbed_out / "hotplug-console.txt").write_text(
            "\n".join([*boot[-1:], *plugged[len(boot) :], *gone[len(plugged) :]]) + "\n"
        )
    finally:
        powerdown(paths, guest.pid, timeout=5, root=ROOT)
        if claim is not None:
            release_group(ROOT, claim)
