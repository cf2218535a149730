"""Reading a file the user named on the command line, in bounded time and memory.

A manifest or topology path may name anything: a directory, a FIFO nobody writes
to (``open`` alone would wait for a writer forever), ``/dev/zero`` (``read`` would
never end).  :func:`read_named` opens without waiting, refuses what cannot hold
text, and reads at most ``limit`` bytes; every refusal is an ``OSError`` whose
``strerror`` says what the path is, so callers keep one ``except OSError``.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def read_named(path: str | os.PathLike[str], limit: int) -> bytes:
    """At most ``limit`` bytes of the file at ``path``.

    A pipe (``<(command)``, ``/dev/stdin`` in a pipeline) is read as it is written;
    one that no process holds open for writing reads as nothing and is refused.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    fd = os.open(Path(path), flags)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "it is a directory, not a file", str(path))
        # Opened without waiting for a writer; the reads wait as reading a file does.
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        got = 0
        while got < limit:
            chunk = os.read(fd, min(limit - got, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got == 0 and stat.S_ISFIFO(st.st_mode):
            raise OSError(
                errno.ENODATA, "it is a FIFO (named pipe) that nothing writes to", str(path)
            )
        return b"".join(chunks)
    finally:
        os.close(fd)
