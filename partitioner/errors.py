"""The one exception tree of the project.

Only the CLI turns these into text and exit codes (``exit_code`` below, as
``docs/cli.md`` documents them).  Every exception the product raises on purpose
is in this tree, with the module that defines it where that is not this one;
each carries the fields named in brackets::

    PartitionError                 1  unexpected, or not classified
     +-- CommandFailed             1  a command the partitioner ran failed (.argv, .returncode, .output)
     +-- UsageError                2  bad arguments
     +-- ManifestError             2  the manifest is not valid (.problems: located Problems)
     +-- HostReadError             2  a --host-root tree that cannot be read as a host (.path)
     +-- TopologyError             2  a test-bed topology file that cannot be used (.source, .problems)
     |                                  (testbed/topology.py)
     +-- PlanError                 3  valid manifest that does not fit this host (.problems:
     |                                  PlanProblems, each located at its field, with the host's part)
     |    +-- ExportError             ... or whose export would not start (what to add)
     +-- PreconditionError         3  the request does not fit the host as it is now
     |    +-- VfsInUse                a PF's VF count cannot change: VFs in use (.pf, .users)
     |    |                             (engine/sriov.py)
     |    +-- QemuLacksDevices        no QEMU here has a test-bed topology's devices (.missing,
     |                                  .tried) (testbed/qemu.py)
     +-- DeviceError               4  claiming / releasing a PCI function failed (.address, .path, .errno)
     |    +-- ClaimFailed             ... and was undone (.restored, .not_restored) (vfio/claim.py)
     |    +-- VfLinkError             a VF's settings could not be set or read through its PF
     |                                  (kernel/vflink.py)
     +-- GuestError                4  QEMU could not be started or driven (.partition)
     |    +-- VMLaunchFailure         QEMU exited while starting (.exitcode, .command, .output)
     |    +-- HugepageError           a node's hugepage pool cannot be raised (.node, .size_bytes, ...)
     |    +-- QmpCommandError         QEMU refused a QMP command (.command, .error_class) (guest/qmp.py)
     |    +-- LiveChangeError         a running guest's CPUs, memory or devices could not be
     |         |                        changed live (guest/live.py); each says why, what to do
     |         +-- CpuHotplugError       a vCPU slot could not be plugged or unplugged (.index)
     |         |    +-- CpuUnplugTimeout    ... the guest did not give it back in time (.timeout)
     |         +-- MemoryResizeError     a virtio-mem device could not be resized (.node, .requested)
     |         |    +-- MemoryResizeTimeout ... the guest did not take or give back the memory in
     |         |                              time (.timeout, .reached: its size then)
     |         +-- DeviceHotplugError    a device could not be attached or detached (.device_id)
     |              +-- DeviceDetachTimeout ... the guest did not release it in time (.timeout)
     |    +-- TestbedTimeout          the emulated server's command ran out of time (.timeout, .booted)
     |    +-- TestbedBootFailure      the emulated server did not boot (.reason, .log_tail)
     |    +-- TestbedEmulationFault   the emulation itself failed; run it again (testbed/server.py)
     |         +-- TestbedTimerFault, TestbedHang, TestbedQemuCrash (also a TestbedBootFailure)
     +-- StateError                2  the state directory or record cannot be used (.path)
     |    +-- BusyError            6  another partition command holds the site (.holder)
     +-- ApplyFailed               4  apply failed and was rolled back (.cause)
     |    +-- RollbackIncomplete   5  ... and could not put everything back (.leftover)
     +-- SetupIncomplete           5  host setup wrote its files but could not activate them
                                        (.leftover) (cli/host.py)

The value parsers raise ``ValueError`` subclasses (``CpuListSyntaxError`` in
cpuset.py, ``SizeSyntaxError`` in units.py, ``PciAddressSyntaxError`` in pci.py):
they are not errors of their own; the loader turns them into located Problems.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass


class PartitionError(Exception):
    """Root of every error this project raises on purpose."""

    exit_code = 1


class CommandFailed(PartitionError):
    """A command exited non-zero (or could not be started); carries what it said.

    Raised by :mod:`partitioner.run`, the one place that starts processes.
    """

    def __init__(self, argv: Sequence[str], returncode: int | None, output: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output
        tail = "\n".join(output.strip().splitlines()[-10:])
        super().__init__(
            f"{shlex.join(argv)} exited with {returncode}" + (f":\n{tail}" if tail else "")
        )


class UsageError(PartitionError):
    exit_code = 2


@dataclass(frozen=True, order=True)
class Problem:
    """One located problem in a manifest: ``FILE:LINE:COL: message``.

    ``line`` and ``column`` are 1-based; 0 means "the whole file".  ``path``
    is the JSON path of the offending node (``partitions.fw0.cpus``), used to
    sort problems that share a line.
    """

    file: str
    line: int
    column: int
    message: str
    path: str = ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


# The most problems one ManifestError carries.  A reader fixes a handful at a time; a
# hostile file (a MiB of bad names) would otherwise hold hundreds of thousands of them,
# and the checks stop collecting here, so their memory and time stay bounded too.
MAX_PROBLEMS = 100


class ManifestError(PartitionError):
    """``incomplete``: checking stopped at :data:`MAX_PROBLEMS`; there are more."""

    exit_code = 2

    def __init__(self, problems: Sequence[Problem], *, incomplete: bool = False) -> None:
        ordered = sorted(problems, key=lambda p: (p.file, p.line, p.column, p.path, p.message))
        self.incomplete = incomplete or len(ordered) > MAX_PROBLEMS
        self.problems = ordered[:MAX_PROBLEMS]
        super().__init__("\n".join(str(p) for p in self.problems))


class HostReadError(PartitionError):
    """The host tree cannot be read as a host (missing /sys, garbage files)."""

    exit_code = 2

    def __init__(self, message: str, path: str = "") -> None:
        self.path = path
        super().__init__(message)


@dataclass(frozen=True)
class HostResources:
    """The host's part in a plan problem: CPUs and who holds them, a node, a PCI function and its
    IOMMU group.  Empty values are not involved (``docs/cli-reference.md``'s ``host`` object)."""

    cpus: tuple[int, ...] = ()
    held_by: str = ""  # who holds ``cpus`` (or the function): a partition, "the host", or several
    node: int | None = None
    address: str = ""
    iommu_group: int | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.cpus:
            out["cpus"] = list(self.cpus)
        if self.held_by:
            out["held_by"] = self.held_by
        if self.node is not None:
            out["node"] = self.node
        if self.address:
            out["address"] = self.address
        if self.iommu_group is not None:
            out["iommu_group"] = self.iommu_group
        return out


NO_HOST = HostResources()


@dataclass(frozen=True)
class PlanProblem:
    """One reason a valid manifest does not fit the host, located at the field it is about.

    ``str()`` is the line a person reads: ``FILE:LINE:COL: message`` when located (``line`` 0:
    not located, the message alone).  ``partition`` is empty for a problem of the site as a
    whole; ``field`` is the partition's key it is about (``cpus``, ``devices[0]``), or the
    dotted path of a host field (``host.reserve.memory``).
    """

    message: str
    file: str = ""
    line: int = 0
    column: int = 0
    partition: str = ""
    field: str = ""
    host: HostResources = NO_HOST

    def __str__(self) -> str:
        if self.line:
            return f"{self.file}:{self.line}:{self.column}: {self.message}"
        return self.message

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"message": self.message}
        if self.line:
            out.update(file=self.file, line=self.line, column=self.column)
        if self.partition:
            out["partition"] = self.partition
        if self.field:
            out["field"] = self.field
        host = self.host.to_json()
        if host:
            out["host"] = host
        return out


class PlanError(PartitionError):
    """The manifest is valid but does not fit the host.  Every reason is kept, as a
    :class:`PlanProblem` (a plain string is taken as an unlocated one)."""

    exit_code = 3

    def __init__(self, problems: Sequence[PlanProblem | str]) -> None:
        self.problems = [p if isinstance(p, PlanProblem) else PlanProblem(p) for p in problems]
        super().__init__("\n".join(str(p) for p in self.problems))


class ExportError(PlanError):
    """The plan fits, but the documents for another manager would describe a guest that
    cannot start there (a KubeVirt VM with nothing to boot): each problem says what to add."""


class PreconditionError(PartitionError):
    """The request does not fit the host as it is now (docs/cli-reference.md's exit 3): a partition
    that is not running for ``console``, a tool the machine lacks.  It says what to do."""

    exit_code = 3


class DeviceError(PartitionError):
    """A PCI function could not be claimed or given back.

    ``path`` is the sysfs file the kernel refused (if any), ``errno`` its error.
    """

    exit_code = 4

    def __init__(
        self, message: str, *, address: str = "", path: str = "", errno: int | None = None
    ) -> None:
        self.address = address
        self.path = path
        self.errno = errno
        super().__init__(message)


class GuestError(PartitionError):
    exit_code = 4

    def __init__(self, message: str, *, partition: str = "") -> None:
        self.partition = partition
        super().__init__(message)


class VMLaunchFailure(GuestError):
    """QEMU exited (or never answered QMP) while being started."""

    def __init__(
        self, *, partition: str, exitcode: int | None, command: Sequence[str], output: str
    ) -> None:
        self.exitcode = exitcode
        self.command = list(command)
        self.output = output
        tail = "\n".join(output.strip().splitlines()[-10:])
        super().__init__(
            f"QEMU for partition {partition} exited with code {exitcode} while starting"
            + (f":\n{tail}" if tail else ""),
            partition=partition,
        )


class HugepageError(GuestError):
    """The kernel could not give a node's hugepage pool the pages a partition needs.

    ``wanted`` is the pool size asked for, ``got`` what the kernel reached, ``original`` the
    size it was put back to.
    """

    def __init__(
        self, message: str, *, node: int, size_bytes: int, wanted: int, got: int, original: int
    ) -> None:
        self.node = node
        self.size_bytes = size_bytes
        self.wanted = wanted
        self.got = got
        self.original = original
        super().__init__(message)


class LiveChangeError(GuestError):
    """A running partition's CPUs, memory or devices could not be changed live."""


class CpuHotplugError(LiveChangeError):
    """vCPU slot ``index`` could not be plugged or unplugged."""

    def __init__(self, message: str, *, partition: str = "", index: int) -> None:
        self.index = index
        super().__init__(message, partition=partition)


class CpuUnplugTimeout(CpuHotplugError):
    """The guest did not give vCPU ``index`` back within ``timeout`` seconds."""

    def __init__(self, message: str, *, partition: str = "", index: int, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(message, partition=partition, index=index)


class MemoryResizeError(LiveChangeError):
    """The virtio-mem device of host node ``node`` could not be set to ``requested`` bytes."""

    def __init__(self, message: str, *, partition: str = "", node: int, requested: int) -> None:
        self.node = node
        self.requested = requested
        super().__init__(message, partition=partition)


class MemoryResizeTimeout(MemoryResizeError):
    """The guest did not plug or unplug up to ``requested`` within ``timeout`` seconds;
    ``reached`` is the device's size then (the request stays with the guest)."""

    def __init__(
        self,
        message: str,
        *,
        partition: str = "",
        node: int,
        requested: int,
        reached: int,
        timeout: float,
    ) -> None:
        self.reached = reached
        self.timeout = timeout
        super().__init__(message, partition=partition, node=node, requested=requested)


class DeviceHotplugError(LiveChangeError):
    """Device ``device_id`` could not be attached or detached."""

    def __init__(self, message: str, *, partition: str = "", device_id: str) -> None:
        self.device_id = device_id
        super().__init__(message, partition=partition)


class DeviceDetachTimeout(DeviceHotplugError):
    """The guest did not release device ``device_id`` within ``timeout`` seconds."""

    def __init__(
        self, message: str, *, partition: str = "", device_id: str, timeout: float
    ) -> None:
        self.timeout = timeout
        super().__init__(message, partition=partition, device_id=device_id)


class StateError(PartitionError):
    exit_code = 2

    def __init__(self, message: str, *, path: str = "") -> None:
        self.path = path
        super().__init__(message)


class BusyError(StateError):
    """Another ``partition`` command holds the site's lock: ``holder`` says which (pid, verb, since)."""

    exit_code = 6

    def __init__(self, message: str, *, path: str = "", holder: str = "") -> None:
        self.holder = holder
        super().__init__(message, path=path)


class ApplyFailed(PartitionError):
    """An action failed; the actions done before it were undone."""

    exit_code = 4

    def __init__(self, message: str, *, cause: BaseException | None = None) -> None:
        self.cause = cause
        super().__init__(message)


class RollbackIncomplete(ApplyFailed):
    """An action failed and undoing the earlier ones failed too: ``leftover`` names what is left."""

    exit_code = 5

    def __init__(
        self, message: str, *, cause: BaseException | None = None, leftover: Sequence[str] = ()
    ) -> None:
        self.leftover = list(leftover)
        super().__init__(message, cause=cause)
