"""The kernel's SR-IOV on a fake tree: a FakeKernelRoot whose PFs make VFs, and iproute2's VF settings.

What ``drivers/pci/iov.c`` does, as the code under test sees it through sysfs:

- ``sriov_numvfs``: writing N makes VFs 0..N-1 (their device directories beside
  the PF, ``physfn`` back to it, ``virtfnN`` links from it, each VF in an IOMMU
  group of its own); writing 0 removes them (a VF bound to a driver is unbound
  first, as the kernel's device removal does).  A nonzero count asked while
  another nonzero one is set is refused with EBUSY, a count above
  ``sriov_totalvfs`` with ERANGE.  A VF's address is the PF's routing id plus
  ``sriov_offset`` plus index x ``sriov_stride``.
- ``sriov_drivers_autoprobe``: with 1 a new VF is bound to its native driver
  (``vf_driver``) if that driver is loaded; with 0 it is left without a driver.

:meth:`FakeSriovKernel.ip` plays iproute2 on the PF's interface
(``ip -j -d link show dev PF`` with its ``vfinfo_list``, ``ip link set dev PF vf N
...``), with settings the PF's driver refuses (``unsupported``, as igb refuses
``trust``: EOPNOTSUPP after applying what came before it in the message).
Tests put it in place of :func:`partitioner.run.run` for ``partitioner.kernel.vflink``.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fakekernel import FakeKernelRoot
from treebuilder import TreeBuilder

from partitioner.errors import CommandFailed


@dataclass
class _VfState:
    mac: str = "00:00:00:00:00:00"
    vlan: int = 0
    qos: int = 0
    spoofchk: bool = True
    trust: bool = False
    link_state: str = "auto"
    min_tx: int = 0
    max_tx: int = 0


@dataclass
class _Pf:
    address: str
    netdev: str
    total: int
    offset: int
    stride: int
    vf_device: str
    vf_driver: str | None
    unsupported: set[str] = field(default_factory=set)
    vfs: list[_VfState] = field(default_factory=list)


def vf_address_of(pf: str, offset: int, stride: int, index: int) -> str:
    domain, bus, devfn = pf.split(":")
    dev, fn = devfn.split(".")
    rid = (int(bus, 16) << 8 | int(dev, 16) << 3 | int(fn)) + offset + index * stride
    return f"{domain}:{rid >> 8:02x}:{(rid & 0xFF) >> 3:02x}.{rid & 7}"


class FakeSriovKernel(FakeKernelRoot):
    def __init__(self, tree: TreeBuilder) -> None:
        super().__init__(tree)
        self.pfs: dict[str, _Pf] = {}
        self.ip_calls: list[list[str]] = []
        self.numvfs_writes: list[tuple[str, str]] = []

    def add_pf(
        self,
        address: str,
        netdev: str | None,
        *,
        total: int = 8,
        offset: int = 128,
        stride: int = 2,
        vf_device: str = "10ca",
        vf_driver: str | None = "igbvf",
        unsupported: Sequence[str] = (),
    ) -> None:
        """Make the function at ``address`` (built by the tree, with ``netdev``) an SR-IOV PF."""
        self.pfs[address] = _Pf(
            address,
            netdev or "",
            total,
            offset,
            stride,
            vf_device,
            vf_driver,
            set(unsupported),
        )
        d = self.tree.device_path(address)
        for leaf, text in (
            ("sriov_totalvfs", total),
            ("sriov_numvfs", 0),
            ("sriov_offset", offset),
            ("sriov_stride", stride),
            ("sriov_vf_device", vf_device),
            ("sriov_drivers_autoprobe", 1),
        ):
            self.tree.file(f"{d}/{leaf}", f"{text}\n")

    # -- sysfs --------------------------------------------------------------------

    def write(self, kernel_path: str, value: str) -> None:
        head, _, leaf = kernel_path.rpartition("/")
        address = head.rpartition("/")[2]
        if address in self.pfs and head.startswith("/sys/bus/pci/devices/"):
            if leaf == "sriov_numvfs":
                self.writes.append((kernel_path, value))
                self.numvfs_writes.append((address, value.strip()))
                self._set_numvfs(self.pfs[address], value.strip())
                return
            if leaf == "sriov_drivers_autoprobe":
                self.writes.append((kernel_path, value))
                if value.strip() not in ("0", "1"):
                    raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
                self.path(kernel_path).write_text(value.strip() + "\n")
                return
        super().write(kernel_path, value)

    def numvfs(self, pf: str) -> int:
        return int(self.read(f"/sys/bus/pci/devices/{pf}/sriov_numvfs") or "0")

    def vf_addresses(self, pf: str) -> list[str]:
        p = self.pfs[pf]
        return [vf_address_of(pf, p.offset, p.stride, i) for i in range(self.numvfs(pf))]

    def _set_numvfs(self, pf: _Pf, text: str) -> None:
        try:
            n = int(text)
        except ValueError:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL)) from None
        now = self.numvfs(pf.address)
        if n == now:
            return
        if n > pf.total or n < 0:
            raise OSError(errno.ERANGE, os.strerror(errno.ERANGE))
        if n and now:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        if n == 0:
            for i in range(now):
                self._remove_vf(pf, i)
            pf.vfs = []
        else:
            probe = self.read(f"/sys/bus/pci/devices/{pf.address}/sriov_drivers_autoprobe") == "1"
            for i in range(n):
                self._make_vf(pf, i, probe)
            pf.vfs = [_VfState() for _ in range(n)]
        self.path(f"/sys/bus/pci/devices/{pf.address}/sriov_numvfs").write_text(f"{n}\n")

    def _next_group(self) -> int:
        used = [int(g) for g in self.listdir("/sys/kernel/iommu_groups") if g.isdigit()]
        return max(used, default=0) + 1

    def _make_vf(self, pf: _Pf, index: int, probe: bool) -> None:
        a = vf_address_of(pf.address, pf.offset, pf.stride, index)
        d = os.path.dirname(self.tree.device_path(pf.address)) + "/" + a
        t = self.tree
        for leaf, text in (
            ("vendor", "0x8086"),
            ("device", f"0x{pf.vf_device}"),
            ("class", "0x020000"),
            ("subsystem_vendor", "0x8086"),
            ("subsystem_device", "0x0000"),
            ("driver_override", "(null)"),
            ("numa_node", "-1"),
            ("reset_method", "flr"),
            ("reset", ""),
            ("remove", ""),
            (
                "uevent",
                f"PCI_CLASS=20000\nPCI_ID=8086:{pf.vf_device.upper()}\nPCI_SLOT_NAME={a}\n",
            ),
        ):
            t.file(f"{d}/{leaf}", f"{text}\n" if text else "")
        t.link(f"{d}/subsystem", "/sys/bus/pci")
        t.link(f"{d}/physfn", self.tree.device_path(pf.address))
        t.link(f"/sys/bus/pci/devices/{pf.address}/virtfn{index}", d)
        t.link(f"/sys/bus/pci/devices/{a}", d)
        g = self._next_group()
        t.link(f"{d}/iommu_group", f"/sys/kernel/iommu_groups/{g}")
        t.link(f"/sys/kernel/iommu_groups/{g}/devices/{a}", d)
        t.file(f"/sys/kernel/iommu_groups/{g}/type", "DMA\n")
        if pf.vf_driver is not None:
            self.native[a] = pf.vf_driver
            if probe and self.exists(f"/sys/bus/pci/drivers/{pf.vf_driver}"):
                self._bind(a, pf.vf_driver)

    def _remove_vf(self, pf: _Pf, index: int) -> None:
        a = vf_address_of(pf.address, pf.offset, pf.stride, index)
        if self._driver(a) is not None:
            drv = self._driver(a)
            self.tree.unbind(a)
            if drv == "vfio-pci":
                self._group_changed(a)
        g = self._group_of(a)
        d = self.path(self.tree.device_path(a))
        for p in (
            self.path(f"/sys/bus/pci/devices/{pf.address}/virtfn{index}"),
            self.path(f"/sys/bus/pci/devices/{a}"),
        ):
            p.unlink()
        if g is not None:
            grp = self.path(f"/sys/kernel/iommu_groups/{g}")
            (grp / "devices" / a).unlink()
            (grp / "type").unlink()
            (grp / "devices").rmdir()
            grp.rmdir()
        for child in sorted(d.iterdir()):
            child.unlink()
        d.rmdir()
        self.native.pop(a, None)
        # The builder remembers the directories it made: these are gone.
        gone = [str(d)] + ([str(self.path(f"/sys/kernel/iommu_groups/{g}"))] if g else [])
        self.tree._made = {
            m for m in self.tree._made if not any(m == x or m.startswith(x + "/") for x in gone)
        }

    # -- iproute2 ------------------------------------------------------------------

    def ip(self, argv: Sequence[str], **_kw: Any) -> subprocess.CompletedProcess[str]:
        """What ``ip`` prints and does for the commands partitioner.kernel.vflink runs."""
        argv = list(argv)
        self.ip_calls.append(argv)
        if argv[:7] == ["ip", "-j", "-d", "link", "show", "dev", argv[-1]] and len(argv) == 7:
            pf = self._pf_of(argv, argv[-1], "Device does not exist")
            return subprocess.CompletedProcess(argv, 0, json.dumps([self._link_json(pf)]))
        if argv[:4] == ["ip", "link", "set", "dev"] and argv[5] == "vf":
            pf = self._pf_of(argv, argv[4], "Cannot find device")
            index = int(argv[6])
            if index >= len(pf.vfs):
                raise CommandFailed(argv, 2, "RTNETLINK answers: Invalid argument\n")
            vf = pf.vfs[index]
            words = argv[7:]
            while words:
                key, val = words[0], words[1]
                if key in pf.unsupported:
                    raise CommandFailed(argv, 2, "RTNETLINK answers: Operation not supported\n")
                if key == "mac":
                    vf.mac = val
                elif key == "vlan":
                    vf.vlan, vf.qos = int(val), 0
                elif key == "qos":
                    vf.qos = int(val)
                elif key in ("spoofchk", "trust"):
                    setattr(vf, key, val == "on")
                elif key == "state":
                    vf.link_state = val
                elif key == "min_tx_rate":
                    vf.min_tx = int(val)
                elif key == "max_tx_rate":
                    vf.max_tx = int(val)
                else:
                    raise CommandFailed(argv, 255, f'Error: argument "{key}" is wrong\n')
                words = words[2:]
            return subprocess.CompletedProcess(argv, 0, "")
        raise AssertionError(f"the fake ip does not know {argv}")

    def _pf_of(self, argv: list[str], netdev: str, why: str) -> _Pf:
        pf = next((p for p in self.pfs.values() if p.netdev == netdev), None)
        if pf is None:
            raise CommandFailed(argv, 1, f'{why} "{netdev}"\n')
        return pf

    def _link_json(self, pf: _Pf) -> dict[str, Any]:
        return {
            "ifindex": 2,
            "ifname": pf.netdev,
            "address": "52:54:00:12:34:56",
            "parentbus": "pci",
            "parentdev": pf.address,
            "vfinfo_list": [
                {
                    "vf": i,
                    "link_type": "ether",
                    "address": v.mac,
                    "broadcast": "ff:ff:ff:ff:ff:ff",
                    "vlan_list": [{"vlan": v.vlan, **({"qos": v.qos} if v.qos else {})}]
                    if v.vlan
                    else [{}],
                    "rate": {"max_tx": v.max_tx, "min_tx": v.min_tx},
                    "spoofchk": v.spoofchk,
                    "link_state": v.link_state,
                    "trust": v.trust,
                }
                for i, v in enumerate(pf.vfs)
            ],
        }
