"""The one ``ioctl(2)`` plumbing the cffi bindings share (``guest/kvm.py``, ``partitioner/vfio/ioctl.py``).

ABI mode (no compiler at run time): each binding declares its own structures,
as its kernel header lays them out, and gets here an FFI that also declares
libc's ``ioctl``, the C library the interpreter already uses (opened on first
call, so that importing a binding loads nothing), and the request numbers
computed the way ``<asm-generic/ioctl.h>`` does.  The request numbers and
structures stay with the binding that uses them.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import cffi

# <asm-generic/ioctl.h>: dir(2 bits) << 30 | size(14) << 16 | type(8) << 8 | nr(8).
IOC_NRSHIFT = 0
IOC_TYPESHIFT = 8
IOC_SIZESHIFT = 16
IOC_DIRSHIFT = 30
IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2


def IOC(direction: int, type_: int, nr: int, size: int) -> int:
    return (
        (direction << IOC_DIRSHIFT)
        | (type_ << IOC_TYPESHIFT)
        | (nr << IOC_NRSHIFT)
        | (size << IOC_SIZESHIFT)
    )


def IO(type_: int, nr: int) -> int:
    return IOC(IOC_NONE, type_, nr, 0)


def errname(code: int) -> str:
    """``ENOTTY`` for 25: the name the kernel's headers give an errno."""
    return errno.errorcode.get(code, str(code))


def describe(code: int) -> str:
    """``ENOTTY (Inappropriate ioctl for device)``: how a kernel's refusal is shown."""
    return f"{errname(code)} ({os.strerror(code)})"


class Binding:
    """One binding's FFI (its own structures plus ``ioctl``) and the C library's ``ioctl``."""

    def __init__(self, cdef: str) -> None:
        self._cdef = cdef
        self._ffi: cffi.FFI | None = None
        self._libc: Any = None

    @property
    def ffi(self) -> cffi.FFI:
        """The FFI, made on first use: cffi parses the declarations with pycparser, which
        costs every command that merely imports a binding a noticeable part of its start."""
        if self._ffi is None:
            import cffi

            ffi = cffi.FFI()
            ffi.cdef(self._cdef + "\nint ioctl(int fd, unsigned long request, ...);\n")
            self._ffi = ffi
        return self._ffi

    def ioctl(self, fd: int, request: int, arg: Any) -> int:
        """The kernel's answer as it is: negative on failure, with the cause in :attr:`errno`.

        ``arg`` is already a cdata (a pointer, or an integer cast to the type the
        request takes): a variadic call cannot guess it."""
        if self._libc is None:
            # None: the C library the interpreter already uses.
            self._libc = self.ffi.dlopen(None)
        ret: int = self._libc.ioctl(fd, request, arg)
        return ret

    @property
    def errno(self) -> int:
        """The errno the last failed :meth:`ioctl` of this thread left."""
        code: int = self.ffi.errno
        return code
