"""Claim a whole IOMMU group for vfio-pci, and give it back exactly as it was.

The kernel's documented way (Documentation/driver-api/vfio.rst): write
``vfio-pci`` to the function's ``driver_override``, unbind it from its driver,
ask ``/sys/bus/pci/drivers_probe``.  What each function had before (its driver
and its ``driver_override``) is recorded in a :class:`~partitioner.record.model.GroupClaim`, which
the state record keeps, so that :func:`release_group` can put it back even from a
later run.

Every sysfs access goes through :class:`~partitioner.kernel.root.HostRoot`; tests
give a ``FakeKernelRoot`` that plays the kernel's part on a built tree.
"""

from __future__ import annotations

import errno as errno_mod
import logging
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from partitioner.errors import DeviceError
from partitioner.inventory.model import Host
from partitioner.kernel import sysfs
from partitioner.kernel.root import HostRoot
from partitioner.pci import PciAddress
from partitioner.record.model import VFIO_PCI, FunctionRecord, GroupClaim
from partitioner.run import CommandFailed, run
from partitioner.vfio.preview import (
    VIABLE_DRIVERS,
    bridge_blockers,
    group_endpoints,
    group_refusals,
    reset_refusal,
    without_reset,
)

log = logging.getLogger("partitioner.vfio")

DRIVERS_DIR = sysfs.PCI_DRIVERS
DEVICES_DIR = sysfs.PCI_DEVICES
DRIVERS_PROBE = sysfs.PCI_DRIVERS_PROBE


class ClaimFailed(DeviceError):
    """A claim failed halfway and was undone: ``restored`` and ``not_restored`` say how far."""

    def __init__(
        self,
        message: str,
        *,
        address: str = "",
        path: str = "",
        errno: int | None = None,
        restored: Sequence[str] = (),
        not_restored: Sequence[str] = (),
    ) -> None:
        super().__init__(message, address=address, path=path, errno=errno)
        self.restored = list(restored)
        self.not_restored = list(not_restored)


def modprobe(name: str) -> None:
    """Load a kernel module (through the one place that runs processes)."""
    run(["modprobe", name], timeout=60)


# -- refusals (rules 4 and 5 of docs/manifest.md) -----------------------------------


def refusals(
    host: Host,
    group: int,
    *,
    reset_none_ok: Collection[str] | None = None,
    partition: Collection[str] = (),
) -> list[str]:
    """Why ``group`` may not be claimed; empty when it may.

    The group part of the one verdict (:func:`partitioner.vfio.preview.group_refusals`), asked
    again on the host as scanned now.  With ``reset_none_ok`` (the addresses the
    plan accepts without a reset method), an endpoint that nothing resets is refused
    here, before anything is claimed: the reset rule of the verdict
    (:func:`partitioner.vfio.preview.without_reset`), the partition holding this group and
    ``partition`` (the addresses of all its devices).  None leaves the reset question out
    (putting back a claim that was made before).
    """
    why = group_refusals(host, group)
    if reset_none_ok is not None:
        endpoints = [fn.address for fn in group_endpoints(host, group)]
        held = {*endpoints, *(PciAddress.parse(a) for a in partition)}
        no_reset = [a for a in without_reset(host, endpoints, held) if str(a) not in reset_none_ok]
        if no_reset:
            why.append(reset_refusal(no_reset))
    return why


# -- waiting for the kernel ----------------------------------------------------


class _Watch:
    """Wakes a waiter on the kernel's uevents (bind, unbind, add) where it can, else polls.

    Polling with a deadline is the fallback, not a fixed sleep: the condition is
    checked again as soon as an event comes or a short slice passes.
    """

    def __init__(self, root: HostRoot) -> None:
        self._monitor: Any = None
        if root.live:
            try:
                import pyudev

                mon = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
                mon.start()
                self._monitor = mon
            except Exception as e:  # no netlink (a container), not root: poll instead
                log.debug("no uevent monitor (%s); polling", e)

    def close(self) -> None:
        self._monitor = None

    def wait(self, cond: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        slice_s = 0.005
        while True:
            if cond():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return cond()
            if self._monitor is not None:
                # Drain what is pending, then wait for the next event (or a slice).
                self._monitor.poll(timeout=min(left, 0.2))
            else:
                time.sleep(min(left, slice_s))
                slice_s = min(slice_s * 2, 0.1)


@contextmanager
def _watch(root: HostRoot) -> Iterator[_Watch]:
    w = _Watch(root)
    try:
        yield w
    finally:
        w.close()


# -- sysfs writes, with the kernel's refusals made readable --------------------

_LIKELY_CAUSE = {
    errno_mod.EBUSY: "the device is busy: its driver would not let go, or something holds it open",
    errno_mod.ENODEV: "the device or the driver is gone (unplugged, or the driver is not loaded)",
    errno_mod.ENOENT: "the file is missing: the device is gone or the driver is not loaded",
    errno_mod.EINVAL: "the kernel refused the value: the driver does not handle this device",
    errno_mod.EEXIST: "the device is already bound to a driver",
    errno_mod.EACCES: "permission denied: claiming devices needs root",
    errno_mod.EPERM: "permission denied: claiming devices needs root",
    errno_mod.ENOMEM: "the kernel is out of memory",
}


def _write(root: HostRoot, path: str, value: str, *, address: str) -> None:
    log.debug("write %r to %s", value, path)
    try:
        root.write(path, value)
    except OSError as e:
        code = e.errno
        cause = _LIKELY_CAUSE.get(code or 0, e.strerror or "unknown error")
        name = errno_mod.errorcode.get(code or 0, str(code))
        raise DeviceError(
            f"{address}: the kernel refused writing {value.strip() or 'an empty line'!r} "
            f"to {path} ({name}): {cause}",
            address=address,
            path=path,
            errno=code,
        ) from e


def current_driver(root: HostRoot, address: str) -> str | None:
    return root.readlink_name(f"{DEVICES_DIR}/{address}/driver")


def _current_override(root: HostRoot, address: str) -> str | None:
    text = root.read(f"{DEVICES_DIR}/{address}/driver_override")
    # The kernel prints an unset override as "(null)".
    if text is None or text in ("", "(null)"):
        return None
    return text


def record_function(root: HostRoot, address: str) -> FunctionRecord:
    """What the function has now, read from sysfs (fresher than a scan)."""
    if not root.exists(f"{DEVICES_DIR}/{address}"):
        raise DeviceError(
            f"{address}: no such PCI function on this host", address=address, path=DEVICES_DIR
        )
    return FunctionRecord(address, current_driver(root, address), _current_override(root, address))


def _wait_driver(
    root: HostRoot, watch: _Watch, address: str, want: str | None, timeout: float, doing: str
) -> None:
    if not watch.wait(lambda: current_driver(root, address) == want, timeout):
        now = current_driver(root, address)
        raise DeviceError(
            f"{address}: {doing}: after {timeout:g}s it is "
            + (f"bound to {now}" if now else "bound to no driver")
            + f", not {want or 'unbound'}",
            address=address,
            path=f"{DEVICES_DIR}/{address}/driver",
        )


def _unbind(root: HostRoot, watch: _Watch, address: str, timeout: float) -> None:
    drv = current_driver(root, address)
    if drv is None:
        return
    _write(root, f"{DEVICES_DIR}/{address}/driver/unbind", address, address=address)
    _wait_driver(root, watch, address, None, timeout, f"unbinding from {drv}")


def _claim_function(root: HostRoot, watch: _Watch, rec: FunctionRecord, timeout: float) -> None:
    a = rec.address
    # The override first: once unbound, nothing but vfio-pci may take the function.
    _write(root, f"{DEVICES_DIR}/{a}/driver_override", VFIO_PCI, address=a)
    _unbind(root, watch, a, timeout)
    _write(root, DRIVERS_PROBE, a, address=a)
    _wait_driver(root, watch, a, VFIO_PCI, timeout, "binding to vfio-pci")


def _give_back(root: HostRoot, watch: _Watch, rec: FunctionRecord, timeout: float) -> bool:
    """Put one function back as ``rec`` says it was; False if it already was (nothing written)."""
    a = rec.address
    if rec.was_on_vfio:
        return False
    if not root.exists(f"{DEVICES_DIR}/{a}"):
        log.warning("%s is gone from the host (removed or unplugged): nothing to give back", a)
        return False
    now = current_driver(root, a)
    if now == rec.driver and _current_override(root, a) == rec.driver_override:
        return False
    if now is not None and now != rec.driver:
        _unbind(root, watch, a, timeout)
    if _current_override(root, a) != rec.driver_override:
        # A lone newline is how the kernel clears driver_override.
        _write(root, f"{DEVICES_DIR}/{a}/driver_override", rec.driver_override or "\n", address=a)
    if rec.driver is None or current_driver(root, a) == rec.driver:
        return True
    bind = f"{DRIVERS_DIR}/{rec.driver}/bind"
    if root.exists(bind):
        try:
            _write(root, bind, a, address=a)
        except DeviceError:
            # The driver may refuse a direct bind that a probe gets right
            # (another driver matched first); fall through to a probe.
            _write(root, DRIVERS_PROBE, a, address=a)
    else:
        _write(root, DRIVERS_PROBE, a, address=a)
    _wait_driver(root, watch, a, rec.driver, timeout, f"binding back to {rec.driver}")
    return True


# -- the group -----------------------------------------------------------------


def _ensure_vfio_pci(
    root: HostRoot, watch: _Watch, load_module: Callable[[str], None], timeout: float
) -> bool:
    drv = f"{DRIVERS_DIR}/{VFIO_PCI}"
    if root.exists(drv):
        return False
    try:
        load_module(VFIO_PCI)
    except CommandFailed as e:
        said = e.output.strip().splitlines()
        detail = said[-1] if said else f"exited with {e.returncode}"
        raise DeviceError(
            f"could not load the vfio-pci module (modprobe vfio-pci: {detail}); "
            "is the kernel built with VFIO (CONFIG_VFIO_PCI)?",
            path=drv,
        ) from e
    if not watch.wait(lambda: root.exists(drv), timeout):
        raise DeviceError(
            f"vfio-pci was loaded but {drv} did not appear within {timeout:g}s", path=drv
        )
    return True


def claim_group(
    root: HostRoot,
    host: Host,
    group: int,
    *,
    load_module: Callable[[str], None] = modprobe,
    timeout: float = 10.0,
    reset_none_ok: Collection[str] | None = None,
    partition: Collection[str] = (),
) -> GroupClaim:
    """Bind every endpoint of IOMMU group ``group`` to vfio-pci; bridges and ports stay.

    Refuses (DeviceError, changing nothing) a group that :func:`refusals` refuses:
    the host uses an endpoint, it holds the boot VGA device, a member that stays
    with the host blocks it, or (with ``reset_none_ok``) nothing resets an endpoint (no
    reset method, nor its bus within ``partition``) and it is not in ``reset_none_ok``.  If a step fails, what was taken is
    given back, newest first, and the DeviceError says what failed and what
    was restored.
    """
    why = refusals(host, group, reset_none_ok=reset_none_ok, partition=partition)
    if why:
        first = group_endpoints(host, group)
        raise DeviceError(
            f"IOMMU group {group} cannot be claimed: " + "; ".join(why),
            address=str(first[0].address) if first else "",
        )
    endpoints = [str(fn.address) for fn in group_endpoints(host, group)]
    records: list[FunctionRecord] = []
    touched: list[FunctionRecord] = []
    with _watch(root) as watch:
        loaded = _ensure_vfio_pci(root, watch, load_module, timeout)
        try:
            for a in endpoints:
                rec = record_function(root, a)
                records.append(rec)
                if rec.was_on_vfio:
                    continue
                touched.append(rec)
                log.info("claiming %s (%s) for vfio-pci", a, rec.driver or "no driver")
                _claim_function(root, watch, rec, timeout)
            dev = sysfs.dev_vfio(group)
            if not watch.wait(lambda: root.exists(dev), timeout):
                raise DeviceError(
                    f"IOMMU group {group}: every endpoint is on vfio-pci but {dev} did not "
                    f"appear within {timeout:g}s (is devtmpfs mounted on /dev?)",
                    address=endpoints[0],
                    path=dev,
                )
        except DeviceError as e:
            restored, failed = _undo(root, watch, touched, timeout)
            raise _with_undo_report(e, group, restored, failed) from e
    return GroupClaim(group, tuple(records), loaded)


def _undo(
    root: HostRoot, watch: _Watch, touched: Sequence[FunctionRecord], timeout: float
) -> tuple[list[str], list[str]]:
    restored: list[str] = []
    failed: list[str] = []
    for rec in reversed(touched):
        try:
            if _give_back(root, watch, rec, timeout):
                restored.append(f"{rec.address} ({rec.driver or 'no driver'})")
        except DeviceError as e:
            failed.append(f"{rec.address}: {e}")
    return restored, failed


def _with_undo_report(
    e: DeviceError, group: int, restored: Sequence[str], failed: Sequence[str]
) -> DeviceError:
    msg = f"claiming IOMMU group {group} failed: {e}"
    if restored:
        msg += "; given back: " + ", ".join(restored)
    if failed:
        msg += "; NOT given back: " + "; ".join(failed)
    return ClaimFailed(
        msg, address=e.address, path=e.path, errno=e.errno, restored=restored, not_restored=failed
    )


def release_group(root: HostRoot, claim: GroupClaim, *, timeout: float = 10.0) -> None:
    """Give every function of ``claim`` back to what it had, newest first.

    Functions that were on vfio-pci before the claim stay there.  Running it
    again after a release changes nothing.  A function that cannot be given
    back does not stop the others; a DeviceError lists what is left.
    """
    failed: list[str] = []
    first: DeviceError | None = None
    with _watch(root) as watch:
        for rec in reversed(claim.functions):
            try:
                _give_back(root, watch, rec, timeout)
            except DeviceError as e:
                first = first or e
                failed.append(str(e))
    if first is not None:
        raise DeviceError(
            f"IOMMU group {claim.group} was not fully given back: " + "; ".join(failed),
            address=first.address,
            path=first.path,
            errno=first.errno,
        )


def claimed_now(root: HostRoot, claim: GroupClaim) -> list[str]:
    """Functions of ``claim`` that are not on vfio-pci any more (for reconciling a state record)."""
    return [
        f.address
        for f in claim.functions
        if not root.exists(f"{DEVICES_DIR}/{f.address}")
        or current_driver(root, f.address) != VFIO_PCI
    ]


__all__ = [
    "DRIVERS_PROBE",
    "VFIO_PCI",
    "VIABLE_DRIVERS",
    "ClaimFailed",
    "FunctionRecord",
    "GroupClaim",
    "bridge_blockers",
    "claim_group",
    "claimed_now",
    "current_driver",
    "group_endpoints",
    "modprobe",
    "record_function",
    "refusals",
    "release_group",
]
