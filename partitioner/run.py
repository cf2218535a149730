"""The one place that starts processes: argv lists only (never a shell), logged at debug level."""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from partitioner.errors import CommandFailed

log = logging.getLogger("partitioner.run")

__all__ = ["CommandFailed", "run", "spawn"]


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = None,
    input: str | bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run to completion, stdout and stderr captured together as text."""
    log.debug("run: %s", shlex.join(argv))
    try:
        cp = subprocess.run(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            input=input.decode() if isinstance(input, bytes) else input,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            check=False,
        )
    except FileNotFoundError as e:
        raise CommandFailed(argv, None, f"{argv[0]}: not found ({e.strerror})") from e
    except subprocess.TimeoutExpired as e:
        out = e.output if isinstance(e.output, str) else (e.output or b"").decode(errors="replace")
        raise CommandFailed(argv, None, f"timed out after {timeout}s\n{out}") from e
    if check and cp.returncode != 0:
        raise CommandFailed(argv, cp.returncode, cp.stdout)
    return cp


def spawn(
    argv: Sequence[str],
    *,
    stdout: int | None = subprocess.DEVNULL,
    stderr: int | None = subprocess.STDOUT,
    stdin: int | None = subprocess.DEVNULL,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    new_session: bool = True,
    pass_fds: Sequence[int] = (),
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a long-lived process (QEMU); the caller owns it and must wait for it or end it.

    ``die_with_parent``: the kernel sends it SIGKILL when the thread that started it ends,
    however that thread ends (SIGKILL included), through util-linux's ``setpriv``, which
    sets that and then becomes the program (same pid).  For a process that has no use
    without its caller (the test bed's server), never for a guest, which outlives ``apply``.
    """
    log.debug("spawn: %s", shlex.join(argv))
    argv = list(argv)
    if die_with_parent:
        program, setpriv = shutil.which(argv[0]), shutil.which("setpriv")
        if program is None:
            raise CommandFailed(argv, None, f"{argv[0]}: not found")
        if setpriv is None:
            log.warning("setpriv (util-linux) not found: %s will outlive a killed caller", argv[0])
        else:
            argv = [setpriv, "--pdeathsig", "KILL", "--", program, *argv[1:]]
    try:
        return subprocess.Popen(
            argv,
            stdout=stdout,
            stderr=stderr,
            stdin=stdin,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=new_session,
            pass_fds=tuple(pass_fds),
        )
    except FileNotFoundError as e:
        raise CommandFailed(argv, None, f"{argv[0]}: not found ({e.strerror})") from e
