"""Ask the host's KVM itself what it offers: ``KVM_CHECK_EXTENSION`` and friends, bound with cffi.

ABI mode, through the ``ioctl`` plumbing ``partitioner/vfio/ioctl.py`` shares
(``partitioner/kernel/ioctl.py``): the request numbers are computed the way
``<asm-generic/ioctl.h>`` does and the one structure is declared as
``linux/kvm.h`` lays it out.  What is asked:

- ``KVM_CAP_X86_DISABLE_EXITS``: which exits KVM lets a VM keep in the guest
  (``HLT``, ``MWAIT``, ``PAUSE``, C-states).  QEMU's ``-overcommit cpu-pm=on``
  asks for them; without ``HLT`` it would change nothing but what the guest is
  told, so it is given only when KVM offers ``HLT``.  KVM withholds ``MWAIT``
  when the CPU's MWAIT is not safe to hand over (errata, no ``mwait`` in the
  host), and everything on kernels that predate the capability (4.16).
- ``KVM_CAP_MAX_VCPUS``: the most vCPUs one VM may have.
- whether a vCPU accepts the ``IA32_ARCH_CAPABILITIES`` value KVM itself
  reports (``KVM_GET_MSRS`` on /dev/kvm, then ``KVM_SET_MSRS`` on a vCPU): a
  KVM that is itself nested in some hypervisors refuses it, and QEMU's ``-cpu
  host`` then aborts with "failed to set MSR 0x10a" (this test machine does).

Each answer is read live; nothing here changes the host (the probe VM is closed
before returning).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from partitioner.kernel import sysfs
from partitioner.kernel.ioctl import IOC, IOC_READ, IOC_WRITE, Binding

_binding = Binding(
    """
struct kvm_msr_entry {
    uint32_t index;
    uint32_t reserved;
    uint64_t data;
};
struct kvm_msrs_1 {
    uint32_t nmsrs;
    uint32_t pad;
    struct kvm_msr_entry entries[1];
};
"""
)
_ioctl = _binding.ioctl

KVMIO = 0xAE
_KVM_MSRS_HEADER = 8  # sizeof(struct kvm_msrs): the size the request number encodes
KVM_GET_API_VERSION = IOC(0, KVMIO, 0x00, 0)
KVM_CREATE_VM = IOC(0, KVMIO, 0x01, 0)
KVM_CHECK_EXTENSION = IOC(0, KVMIO, 0x03, 0)
KVM_CREATE_VCPU = IOC(0, KVMIO, 0x41, 0)
KVM_GET_MSRS = IOC(IOC_READ | IOC_WRITE, KVMIO, 0x88, _KVM_MSRS_HEADER)
KVM_SET_MSRS = IOC(IOC_WRITE, KVMIO, 0x89, _KVM_MSRS_HEADER)

KVM_API_VERSION = 12
KVM_CAP_NR_VCPUS = 9
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_GET_MSR_FEATURES = 121
KVM_CAP_X86_DISABLE_EXITS = 143

KVM_X86_DISABLE_EXITS_MWAIT = 1 << 0
KVM_X86_DISABLE_EXITS_HLT = 1 << 1
KVM_X86_DISABLE_EXITS_PAUSE = 1 << 2
KVM_X86_DISABLE_EXITS_CSTATE = 1 << 3
_EXIT_NAMES = (
    (KVM_X86_DISABLE_EXITS_MWAIT, "mwait"),
    (KVM_X86_DISABLE_EXITS_HLT, "hlt"),
    (KVM_X86_DISABLE_EXITS_PAUSE, "pause"),
    (KVM_X86_DISABLE_EXITS_CSTATE, "cstate"),
)

MSR_IA32_ARCH_CAPABILITIES = 0x10A
KVM_PATH = sysfs.DEV_KVM


@dataclass(frozen=True)
class KvmCaps:
    """What this host's KVM answered; ``error`` says why it could not be asked."""

    available: bool
    disable_exits: int = 0  # KVM_X86_DISABLE_EXITS_* bits KVM offers
    max_vcpus: int = 0
    # False: a vCPU refuses the IA32_ARCH_CAPABILITIES value KVM reports (QEMU's -cpu host
    # aborts); None: not asked (no MSR feature support, or the probe VM could not be made).
    arch_capabilities_settable: bool | None = None
    error: str = ""

    @property
    def can_keep_hlt(self) -> bool:
        return bool(self.disable_exits & KVM_X86_DISABLE_EXITS_HLT)

    @property
    def exit_names(self) -> list[str]:
        return [name for bit, name in _EXIT_NAMES if self.disable_exits & bit]

    def to_json(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "disable_exits": self.exit_names,
            "max_vcpus": self.max_vcpus,
            "arch_capabilities_settable": self.arch_capabilities_settable,
            "error": self.error,
        }


def _check(fd: int, cap: int) -> int:
    ret: int = _ioctl(fd, KVM_CHECK_EXTENSION, _binding.ffi.cast("unsigned long", cap))
    return max(ret, 0)  # KVM answers 0 for "no", never an error, for an unknown capability


def probe_kvm(path: str = KVM_PATH) -> KvmCaps:
    """Ask the KVM behind ``path``; a host without it answers ``available=False`` and why."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return KvmCaps(available=False, error=f"{path}: {e.strerror}")
    try:
        version: int = _ioctl(fd, KVM_GET_API_VERSION, _binding.ffi.cast("unsigned long", 0))
        if version != KVM_API_VERSION:
            return KvmCaps(available=False, error=f"{path}: KVM API version {version}, not 12")
        max_vcpus = _check(fd, KVM_CAP_MAX_VCPUS) or _check(fd, KVM_CAP_NR_VCPUS) or 4
        return KvmCaps(
            available=True,
            disable_exits=_check(fd, KVM_CAP_X86_DISABLE_EXITS),
            max_vcpus=max_vcpus,
            arch_capabilities_settable=_arch_capabilities_settable(fd),
        )
    finally:
        os.close(fd)


def _arch_capabilities_settable(kvm_fd: int) -> bool | None:
    """Set, on a fresh vCPU, the IA32_ARCH_CAPABILITIES value KVM reports as supported: what
    QEMU's ``-cpu host`` does first.  None when KVM does not report the MSR at all."""
    if not _check(kvm_fd, KVM_CAP_GET_MSR_FEATURES):
        return None
    msrs = _binding.ffi.new("struct kvm_msrs_1 *")
    msrs.nmsrs = 1
    msrs.entries[0].index = MSR_IA32_ARCH_CAPABILITIES
    if _ioctl(kvm_fd, KVM_GET_MSRS, msrs) != 1:
        return None  # the host CPU has no such MSR: -cpu host does not set it
    value = int(msrs.entries[0].data)
    vm = _ioctl(kvm_fd, KVM_CREATE_VM, _binding.ffi.cast("unsigned long", 0))
    if vm < 0:
        return None
    try:
        vcpu = _ioctl(vm, KVM_CREATE_VCPU, _binding.ffi.cast("unsigned long", 0))
        if vcpu < 0:
            return None
        try:
            msrs.nmsrs = 1
            msrs.entries[0].index = MSR_IA32_ARCH_CAPABILITIES
            msrs.entries[0].data = value
            return bool(_ioctl(vcpu, KVM_SET_MSRS, msrs) == 1)
        finally:
            os.close(vcpu)
    finally:
        os.close(vm)
