"""What only this machine can answer about a plan: the files a manifest hands to QEMU
(kernel, initrd, disks, firmware) exist and can be read, and its KVM takes each
partition's vCPU count.

The planner is pure (it reads nothing); this is the separate step that ``plan``
and ``apply`` run after it, on this machine, where QEMU will open them.  Under
``--host-root`` the plan is for another machine: ``plan`` then says what it
would miss here as notes, and holds nothing against it.  A missing or unreadable
file, or more vCPUs than KVM allows one VM, is a precondition of the host that
is missing: exit 3 with the others (docs/decisions.md).

Each problem starts with the ``FILE:LINE:COL`` of the manifest entry that names
the file or the partition.  Nothing is read from the files: they are opened
(without blocking, so a FIFO cannot hang the check) and closed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import replace

from partitioner.errors import PlanError, PlanProblem
from partitioner.inventory.model import Host
from partitioner.manifest.model import Location, Manifest
from partitioner.planning.model import Plan, RunningPartition
from partitioner.planning.work import located


def _problem(where: Location, what: str, path: str, why: str) -> PlanProblem:
    # `what` is the field's path, `partitions.NAME.FIELD...`: the problem's partition and field.
    _, name, field = what.split(":")[0].split(".", 2)
    return PlanProblem(
        f"{what} {path}: {why}",
        file=where.file if where.line else "",
        line=where.line,
        column=where.column,
        partition=name,
        field=field,
    )


def _check(
    path: str, *, what: str, where: Location, write: bool, block_ok: bool
) -> PlanProblem | None:
    """None when QEMU will be able to open ``path`` as it will; else why not."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return _problem(where, what, path, "no such file on this machine")
    except NotADirectoryError:
        return _problem(where, what, path, "a part of the path is not a directory")
    except OSError as e:
        return _problem(where, what, path, f"cannot be looked at ({e.strerror or e})")
    if stat.S_ISDIR(st.st_mode):
        return _problem(where, what, path, "is a directory, not a file")
    if not (stat.S_ISREG(st.st_mode) or (block_ok and stat.S_ISBLK(st.st_mode))):
        kinds = "a regular file or a block device" if block_ok else "a regular file"
        return _problem(where, what, path, f"is not {kinds}")
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except OSError as e:
        mode = "read and written" if write else "read"
        hint = " (or mark the disk `readonly: true`)" if write else ""
        return _problem(where, what, path, f"cannot be {mode} ({e.strerror or e}){hint}")
    os.close(fd)
    return None


def file_problems(manifest: Manifest) -> list[PlanProblem]:
    """Every file of every partition that QEMU could not open, located in the manifest."""
    from partitioner.guest.caps import OVMF_CANDIDATES

    out: list[PlanProblem] = []
    for spec in manifest.partitions.values():
        checks: list[PlanProblem | None] = []
        if spec.boot is not None:
            checks.append(
                _check(
                    spec.boot.kernel,
                    what=f"partitions.{spec.name}.boot.kernel",
                    where=spec.boot.kernel_where,
                    write=False,
                    block_ok=False,
                )
            )
            if spec.boot.initrd is not None:
                checks.append(
                    _check(
                        spec.boot.initrd,
                        what=f"partitions.{spec.name}.boot.initrd",
                        where=spec.boot.initrd_where,
                        write=False,
                        block_ok=False,
                    )
                )
        for i, disk in enumerate(spec.disks):
            checks.append(
                _check(
                    disk.path,
                    what=f"partitions.{spec.name}.disks[{i}].path",
                    where=disk.where,
                    write=not disk.readonly,
                    block_ok=True,
                )
            )
        if spec.firmware == "uefi":
            found = [
                (code, vars_)
                for code, vars_ in OVMF_CANDIDATES
                if os.path.isfile(code) and os.path.isfile(vars_)
            ]
            if not found:
                checks.append(
                    located(
                        spec,
                        "firmware",
                        f"partitions.{spec.name}.firmware is uefi but no OVMF "
                        f"firmware is installed (looked for {OVMF_CANDIDATES[0][0]} and the other "
                        "usual places): install it with `apt-get install ovmf` (Debian, Ubuntu) or "
                        "`dnf install edk2-ovmf`",
                    )
                )
            else:
                code, vars_ = found[0]
                for path, what in ((code, "UEFI code"), (vars_, "UEFI variable template")):
                    checks.append(
                        _check(
                            path,
                            what=f"partitions.{spec.name}.firmware: the {what}",
                            where=spec.firmware_where,
                            write=False,
                            block_ok=False,
                        )
                    )
        out.extend(c for c in checks if c is not None)
    return out


def kvm_limit(manifest: Manifest, *, here: bool) -> tuple[list[PlanProblem], list[str]]:
    """(problems, notes): each partition with more vCPUs than this machine's KVM lets one VM
    have, asked as ``guest/kvm.py`` asks the other KVM answers.  ``here`` False: the plan is
    for another machine, whose KVM cannot be asked from here; a note says so, as the
    dedicated-CPU settings do (``cpu-pm``), and apply on that machine refuses."""
    from partitioner.guest.kvm import probe_kvm
    from partitioner.planning.planner import kvm_vcpu_problems

    if manifest.host.accel != "kvm" or not manifest.partitions:
        return [], []
    not_checked = "the vCPU counts were not checked against KVM's limit (KVM_CAP_MAX_VCPUS)"
    if not here:
        most = max(manifest.partitions.values(), key=lambda p: p.cpu_count)
        return [], [
            f"{not_checked}: the plan is for another machine (--host-root), whose KVM is not "
            f"asked from here; apply there refuses a partition with more vCPUs than its KVM "
            f"allows (the most here: {most.name}, {most.cpu_count})"
        ]
    kvm = probe_kvm()
    if not kvm.available:
        return [], [f"{not_checked}: KVM cannot be asked ({kvm.error})"]
    return kvm_vcpu_problems(manifest, kvm.max_vcpus), []


def checked_plan(
    manifest: Manifest,
    host: Host,
    running: Mapping[str, RunningPartition] | None = None,
    *,
    here: bool = True,
) -> Plan:
    """The plan (the pure planner), then KVM's vCPU limit and the files: every problem of
    all, or the plan.

    What ``plan`` and ``apply`` run, so that both refuse the same manifests.  ``here``
    False leaves out what only this machine can answer: a plan for another machine
    (``--host-root``) cannot know its files or its KVM, and says so instead (the files:
    its caller; KVM: a note of the plan).
    """
    from partitioner.planning.planner import plan

    problems, notes = kvm_limit(manifest, here=here)
    if here:
        problems += file_problems(manifest)
    try:
        result = plan(manifest, host, running)
    except PlanError as e:
        raise PlanError([*e.problems, *problems]) from None
    if problems:
        raise PlanError(problems)
    return replace(result, notes=(*result.notes, *notes)) if notes else result
