"""A HostRoot that plays the kernel's PCI driver core on a TreeBuilder tree.

The code under test writes sysfs attributes exactly as on a live host; this
class answers the way ``drivers/base/bus.c``, ``dd.c`` and ``pci-driver.c`` do:

- ``devices/ADDR/driver_override``: stored; a lone newline clears it
  (reads back ``(null)``).
- ``drivers/X/unbind`` (also reached as ``devices/ADDR/driver/unbind``): the
  device leaves X; ENODEV if it is not bound to X.
- ``drivers/X/bind``: binds if X matches the device (its override names X, or
  no override and X is its native driver); EBUSY if it already has a driver,
  ENODEV if X does not match.
- ``drivers_probe``: binds the device to its override if that driver is loaded,
  else to its native driver if loaded; a bound device is left alone.
- ``/dev/vfio/N`` appears when the first function of group N is bound to
  vfio-pci and goes when the last one leaves, as the vfio core creates and
  frees the group's character device.

Failures are injected per (operation, address): an errno raised by the write,
or a "stall" (the write is accepted but the driver never binds).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from treebuilder import TreeBuilder

from partitioner.inventory import pci_is_bridge
from partitioner.inventory.model import Host, IommuGroup, PciFunction
from partitioner.kernel.root import HostRoot
from partitioner.pci import PciAddress

_ADDR = r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]"
_OVERRIDE = re.compile(rf"^/sys/bus/pci/devices/({_ADDR})/driver_override$")
_DEV_UNBIND = re.compile(rf"^/sys/bus/pci/devices/({_ADDR})/driver/unbind$")
_DRV_OP = re.compile(r"^/sys/bus/pci/drivers/([^/]+)/(bind|unbind)$")


class FakeKernelRoot(HostRoot):
    def __init__(self, tree: TreeBuilder, native: Mapping[str, str] | None = None) -> None:
        super().__init__(tree.root)
        self.tree = tree
        # The driver each function's IDs match (what a probe without override finds).
        self.native: dict[str, str] = dict(native or {})
        for a in self._all_addresses():
            drv = self.readlink_name(f"/sys/bus/pci/devices/{a}/driver")
            if drv is not None and drv != "vfio-pci":
                self.native.setdefault(a, drv)
        self.failures: dict[tuple[str, str], int] = {}
        self.stalled: set[tuple[str, str]] = set()
        self.writes: list[tuple[str, str]] = []
        self.modules_loaded: list[str] = []
        if self.exists("/sys/bus/pci/drivers/vfio-pci"):
            self._vfio_container()
        for a in self._all_addresses():
            if self._driver(a) == "vfio-pci":
                self._group_changed(a)

    # -- test controls ---------------------------------------------------------

    def fail(self, op: str, address: str, code: int) -> None:
        """Make ``op`` ("override", "unbind", "bind", "probe") on ``address`` fail with ``code``."""
        self.failures[(op, address)] = code

    def stall(self, address: str, driver: str) -> None:
        """Accept requests to bind ``address`` to ``driver`` but never bind it (a stuck probe)."""
        self.stalled.add((address, driver))

    def load_module(self, name: str) -> None:
        """What ``modprobe`` does for a PCI driver: its directory appears under drivers/."""
        self.modules_loaded.append(name)
        d = self.path(f"/sys/bus/pci/drivers/{name}")
        d.mkdir(parents=True, exist_ok=True)
        for attr in ("bind", "unbind", "new_id", "remove_id", "uevent"):
            (d / attr).touch()
        if name == "vfio-pci":
            self._vfio_container()
        # A freshly loaded driver probes devices that match it and have none.
        for a in self._all_addresses():
            if self._driver(a) is None and self._matches(a, name):
                self._bind(a, name)

    # -- the kernel's side of write(2) -------------------------------------------

    def write(self, kernel_path: str, value: str) -> None:
        self.writes.append((kernel_path, value))
        text = value.strip()
        if m := _OVERRIDE.match(kernel_path):
            a = m.group(1)
            self._maybe_fail("override", a)
            self.path(kernel_path).write_text((text or "(null)") + "\n")
            return
        if m := _DEV_UNBIND.match(kernel_path):
            a = m.group(1)
            drv = self._driver(a)
            if drv is None:
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", kernel_path)
            self._unbind_store(drv, text)
            return
        if m := _DRV_OP.match(kernel_path):
            drv, op = m.group(1), m.group(2)
            if not self.exists(f"/sys/bus/pci/drivers/{drv}"):
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", kernel_path)
            if op == "unbind":
                self._unbind_store(drv, text)
            else:
                self._bind_store(drv, text)
            return
        if kernel_path == "/sys/bus/pci/drivers_probe":
            self._probe_store(text)
            return
        super().write(kernel_path, value)

    def _maybe_fail(self, op: str, address: str) -> None:
        code = self.failures.get((op, address))
        if code is not None:
            raise OSError(code, os.strerror(code))

    def _unbind_store(self, drv: str, address: str) -> None:
        if not self.exists(f"/sys/bus/pci/devices/{address}") or self._driver(address) != drv:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        self._maybe_fail("unbind", address)
        self.tree.unbind(address)
        if drv == "vfio-pci":
            self._group_changed(address)

    def _bind_store(self, drv: str, address: str) -> None:
        if not self.exists(f"/sys/bus/pci/devices/{address}") or not self._matches(address, drv):
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        if self._driver(address) is not None:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        self._maybe_fail("bind", address)
        self._bind(address, drv)

    def _probe_store(self, address: str) -> None:
        if not self.exists(f"/sys/bus/pci/devices/{address}"):
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        self._maybe_fail("probe", address)
        if self._driver(address) is not None:
            return
        override = self._override(address)
        candidates = [override] if override else [self.native.get(address)]
        for drv in candidates:
            if drv and self.exists(f"/sys/bus/pci/drivers/{drv}"):
                self._bind(address, drv)
                return

    # -- state ---------------------------------------------------------------------

    def _bind(self, address: str, drv: str) -> None:
        if (address, drv) in self.stalled:
            return
        self.tree.bind(address, drv)
        if drv == "vfio-pci":
            self._group_changed(address)

    def _matches(self, address: str, drv: str) -> bool:
        override = self._override(address)
        if override is not None:
            return override == drv
        return self.native.get(address) == drv

    def _driver(self, address: str) -> str | None:
        return self.readlink_name(f"/sys/bus/pci/devices/{address}/driver")

    def _override(self, address: str) -> str | None:
        t = self.read(f"/sys/bus/pci/devices/{address}/driver_override")
        return None if t in (None, "", "(null)") else t

    def _all_addresses(self) -> list[str]:
        return self.listdir("/sys/bus/pci/devices")

    def _group_of(self, address: str) -> str | None:
        return self.readlink_name(f"/sys/bus/pci/devices/{address}/iommu_group")

    def _vfio_container(self) -> None:
        p = self.path("/dev/vfio/vfio")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()

    def _group_changed(self, address: str) -> None:
        g = self._group_of(address)
        if g is None:
            return
        node = self.path(f"/dev/vfio/{g}")
        on_vfio = [
            m
            for m in self.listdir(f"/sys/kernel/iommu_groups/{g}/devices")
            if self._driver(m) == "vfio-pci"
        ]
        if on_vfio:
            node.parent.mkdir(parents=True, exist_ok=True)
            node.touch()
        elif node.exists():
            node.unlink()


def scan_pci(
    root: HostRoot,
    *,
    in_use: Mapping[str, Iterable[str]] | None = None,
    has_iommu: bool | None = None,
) -> Host:
    """A Host holding the PCI side of ``root`` (what vfio reads), ``in_use`` given by the test.

    Reads the tree through ``root`` the way the inventory does, so that the
    tests of vfio do not depend on the CPU and memory parts of a scan.
    """
    pci: dict[PciAddress, PciFunction] = {}
    groups: dict[int, list[PciAddress]] = {}
    for a in root.listdir("/sys/bus/pci/devices"):
        base = f"/sys/bus/pci/devices/{a}"
        addr = PciAddress.parse(a)

        def hexattr(name: str, base: str = base) -> str:
            return (root.read(f"{base}/{name}") or "0x0").removeprefix("0x")

        group_name = root.readlink_name(f"{base}/iommu_group")
        group = int(group_name) if group_name is not None else None
        if group is not None:
            groups.setdefault(group, []).append(addr)
        override = root.read(f"{base}/driver_override")
        real = Path(root.realpath(base))
        chain = [p for p in real.parts[:-1] if re.fullmatch(_ADDR, p)]
        numa = root.read_int(f"{base}/numa_node", -1)
        cls = hexattr("class")
        pci[addr] = PciFunction(
            address=addr,
            vendor=hexattr("vendor"),
            device=hexattr("device"),
            class_code=cls,
            subsystem_vendor=hexattr("subsystem_vendor"),
            subsystem_device=hexattr("subsystem_device"),
            driver=root.readlink_name(f"{base}/driver"),
            driver_override=None if override in (None, "(null)") else override,
            iommu_group=group,
            numa_node=None if numa is None or numa < 0 else numa,
            reset_methods=tuple((root.read(f"{base}/reset_method") or "").split()),
            boot_vga=root.read(f"{base}/boot_vga") == "1",
            is_bridge=pci_is_bridge(root, str(real), cls),
            upstream=tuple(PciAddress.parse(p) for p in chain),
            netdevs=(),
        )
    use = {PciAddress.parse(a): tuple(r) for a, r in (in_use or {}).items()}
    for a, fn in pci.items():
        if fn.boot_vga:
            use[a] = (*use.get(a, ()), "boot VGA device")
    return Host(
        cpus={},
        nodes={},
        pci=pci,
        iommu_groups={g: IommuGroup(g, tuple(sorted(m))) for g, m in groups.items()},
        in_use=use,
        netdevs={},
        has_kvm=False,
        has_iommu=bool(groups) if has_iommu is None else has_iommu,
        hugepage_sizes=(),
    )
