"""``partition console NAME``: the terminal on the partition's serial console; ``Ctrl-]`` detaches.

QEMU serves the console on a UNIX socket and also copies it into the
console log file (chardev ``logfile=``), so the log keeps recording while
someone is attached and after they leave.
"""

from __future__ import annotations

import argparse
import contextlib
import errno as errno_mod
import os
import selectors
import socket
import sys
import termios
import tty
from collections.abc import Iterator
from typing import Any

from partitioner.cli.common import Context
from partitioner.errors import PreconditionError, UsageError
from partitioner.record.model import RunState
from partitioner.record.reconcile import reconcile
from partitioner.record.store import StateStore

DETACH = b"\x1d"  # Ctrl-], as telnet and virsh console use


def register(sub: Any) -> None:
    p = sub.add_parser("console", help="attach the terminal to a partition's serial console")
    p.add_argument("name", metavar="NAME", help="the partition")
    p.set_defaults(func=run)


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def relay(sock: socket.socket, in_fd: int, out_fd: int) -> str:
    """Copy bytes both ways until Ctrl-] on input, end of input, or the console closes.

    Returns why it stopped: ``"detached"``, ``"input closed"`` or ``"console closed"``.
    """
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(in_fd, selectors.EVENT_READ)
    try:
        while True:
            for key, _ in sel.select():
                if key.fileobj is sock:
                    data = sock.recv(65536)
                    if not data:
                        return "console closed"
                    _write_all(out_fd, data)
                else:
                    data = os.read(in_fd, 4096)
                    if not data:
                        return "input closed"
                    head, hit, _ = data.partition(DETACH)
                    if head:
                        sock.sendall(head)
                    if hit:
                        return "detached"
    finally:
        sel.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def run(args: argparse.Namespace, ctx: Context) -> int:
    if ctx.json:
        raise UsageError(
            "partition console is interactive and has no JSON report; leave out --json"
        )
    store = StateStore(ctx.state_dir)
    state = reconcile(store.load(), ctx.root()).state
    rec = state.partitions.get(args.name)
    if rec is None:
        raise UsageError(f"no partition {args.name} has been applied here")
    if rec.state is not RunState.RUNNING or "console" not in rec.paths:
        raise PreconditionError(
            f"partition {args.name} is {rec.state.value}: start it first with "
            f"`partition start {args.name}` (its past console output is in "
            f"{rec.paths.get('console_log', 'the log directory')})"
        )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(rec.paths["console"])
    except OSError as e:
        sock.close()
        hint = ""
        if e.errno in (errno_mod.ECONNREFUSED, errno_mod.EAGAIN):
            hint = " (another console may be attached: QEMU serves one at a time)"
        raise PreconditionError(
            f"cannot attach to the console of {args.name} at {rec.paths['console']}: "
            f"{e.strerror}{hint}"
        ) from e
    in_fd, out_fd = sys.stdin.fileno(), sys.stdout.fileno()
    ctx.info(f"partition: attached to {args.name}'s console; Ctrl-] detaches")
    with sock, _raw(in_fd):
        why = relay(sock, in_fd, out_fd)
    ctx.info(f"\npartition: {why}")
    return 0
