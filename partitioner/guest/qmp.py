"""The one place that talks to QEMU: a small synchronous face on the QEMU project's ``qemu.qmp``.

``qemu.qmp`` is asyncio; the partitioner is a short-lived synchronous CLI.  A
:class:`Qmp` owns a private event loop and runs each call to completion on it,
with a deadline.  Every failure of the library (and a deadline passed) comes
out as :class:`~partitioner.errors.GuestError` naming the partition::

    qemu.qmp error               -> GuestError
    ConnectError                    "cannot connect to QMP socket ..."
    ExecuteError                    "QEMU refused CMD: DESC" (.error_class kept)
    ExecInterruptedError, EOF       "QEMU went away during CMD"
    asyncio.TimeoutError            "QEMU did not answer CMD within N s"
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError

from partitioner.errors import GuestError

log = logging.getLogger("partitioner.guest.qmp")

T = TypeVar("T")


class QmpCommandError(GuestError):
    """QEMU answered a command with an error (``error_class`` as QMP names it)."""

    def __init__(self, message: str, *, partition: str, command: str, error_class: str) -> None:
        self.command = command
        self.error_class = error_class
        super().__init__(message, partition=partition)


class Qmp:
    """A QMP session on a UNIX socket.  Use as a context manager, or connect()/close()."""

    def __init__(
        self, socket_path: Path | str, *, timeout: float = 10.0, partition: str = ""
    ) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self.partition = partition
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: QMPClient | None = None

    def __enter__(self) -> Qmp:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def connect(self) -> None:
        if self._client is not None:
            return
        self._loop = asyncio.new_event_loop()
        client = QMPClient(self.partition or None)
        try:
            self._run(client.connect(self.socket_path), "connect")
        except GuestError:
            # A connect cut short by the deadline leaves the library's tasks pending.
            with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError):
                self._loop.run_until_complete(asyncio.wait_for(client.disconnect(), 1.0))
            self._loop.close()
            self._loop = None
            raise
        self._client = client

    def execute(self, cmd: str, args: Mapping[str, object] | None = None) -> Any:
        """Run one QMP command and give its ``return`` value (usually a dict or a list)."""
        if self._client is None:
            self.connect()
        assert self._client is not None
        return self._run(self._client.execute(cmd, args), cmd)

    def close(self) -> None:
        client, loop = self._client, self._loop
        self._client, self._loop = None, None
        if loop is None:
            return
        try:
            if client is not None:
                # After `quit` QEMU hangs up first; the library then reports the EOF here.
                loop.run_until_complete(asyncio.wait_for(client.disconnect(), self.timeout))
        except (TimeoutError, QMPError, OSError, EOFError) as e:
            log.debug("QMP disconnect from %s: %s", self.socket_path, e)
        finally:
            loop.close()

    # -- the commands the partitioner uses -----------------------------------

    def vcpu_threads(self) -> dict[int, int]:
        """cpu-index -> host thread id of every vCPU."""
        cpus = self.execute("query-cpus-fast")
        return {int(c["cpu-index"]): int(c["thread-id"]) for c in cpus}

    def iothread_threads(self) -> dict[str, int]:
        """iothread id -> host thread id."""
        return {str(t["id"]): int(t["thread-id"]) for t in self.execute("query-iothreads")}

    def status(self) -> str:
        """QEMU's run state: ``prelaunch``, ``running``, ``paused``, ``shutdown``..."""
        return str(self.execute("query-status")["status"])

    def cont(self) -> None:
        self.execute("cont")

    def system_powerdown(self) -> None:
        self.execute("system_powerdown")

    def quit(self) -> None:
        try:
            self.execute("quit")
        except GuestError as e:
            # QEMU may close the socket before its reply reaches us: it is quitting all the same.
            log.debug("QMP quit on %s: %s", self.socket_path, e)

    # -- plumbing --------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T], what: str) -> T:
        assert self._loop is not None
        who = f"partition {self.partition}" if self.partition else self.socket_path
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, self.timeout))
        except ExecuteError as e:
            raise QmpCommandError(
                f"QEMU of {who} refused {what}: {e}",
                partition=self.partition,
                command=what,
                error_class=e.error_class,
            ) from e
        except ConnectError as e:
            raise GuestError(
                f"cannot connect to the QMP socket {self.socket_path} of {who}: {e}",
                partition=self.partition,
            ) from e
        except (ExecInterruptedError, EOFError) as e:
            raise GuestError(
                f"QEMU of {who} went away during {what}", partition=self.partition
            ) from e
        except TimeoutError as e:
            raise GuestError(
                f"QEMU of {who} did not answer {what} within {self.timeout:g} s",
                partition=self.partition,
            ) from e
        except (QMPError, OSError) as e:
            raise GuestError(f"QMP {what} with {who} failed: {e}", partition=self.partition) from e
