"""Restart on crash (``on_crash``): a small supervisor of the project's own.

A partition's QEMU is started by ``apply`` (or ``start``) in a session of its
own and outlives the command, so no init system is its parent; the same
watcher must work under systemd, under another init and inside the test bed.
The supervisor therefore watches the state record rather than owning the
processes (docs/decisions.md, "Restart on crash"):

- every ``poll`` seconds it takes the state lock without waiting (a command
  that holds it, ``stop`` or ``destroy`` say, is changing the record on
  purpose: the round is skipped), and looks for partitions the record says
  are ``running`` whose QEMU is gone;
- such a partition crashed.  With ``on_crash: stop`` it is left ``failed``,
  holding its CPUs, memory and devices.  With ``restart`` it is started
  again through the same action as ``partition start`` (same placement: the
  same CPUs, pinned; the same pages; the same devices, still on vfio-pci),
  unless it already crashed ``max_crashes`` times within ``window_s``
  seconds: then it is left ``failed``, and says why;
- what happened is kept in ``supervisor.json`` beside the record (restarts,
  the last exit reason, why it was given up), which ``status`` shows.

``partition host boot`` runs it in the foreground after starting the site
(the systemd unit, or the command for another init); ``partition host
supervise`` runs it alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from partitioner.errors import BusyError, PartitionError, StateError
from partitioner.kernel.root import HostRoot
from partitioner.record.model import PartitionRecord, RunState, State
from partitioner.record.store import StateStore

log = logging.getLogger("partitioner.boot.supervisor")

HISTORY_FILE = "supervisor.json"
MAX_CRASHES = 5  # docs/manifest.md, on_crash: 5 crashes in 10 minutes leave it failed
WINDOW_S = 600.0


@dataclass
class History:
    """One partition's crashes, as the supervisor saw them."""

    crashes: list[float] = field(default_factory=list)  # time.time() of each, within the window
    restarts: int = 0
    last_exit: str | None = None  # why its QEMU ended the last time it crashed
    last_exit_at: float | None = None
    gave_up: str | None = None  # why it was left failed, None while it is restarted

    def to_json(self) -> dict[str, Any]:
        return {
            "crashes": self.crashes,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "last_exit_at": self.last_exit_at,
            "gave_up": self.gave_up,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> History:
        return cls(
            crashes=[float(t) for t in d.get("crashes", [])],
            restarts=int(d.get("restarts", 0)),
            last_exit=d.get("last_exit"),
            last_exit_at=d.get("last_exit_at"),
            gave_up=d.get("gave_up"),
        )


def load_history(state_dir: Path) -> dict[str, History]:
    try:
        doc = json.loads((state_dir / HISTORY_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict):
        return {}
    return {str(n): History.from_json(h) for n, h in doc.items() if isinstance(h, dict)}


def save_history(state_dir: Path, history: Mapping[str, History]) -> None:
    """Written aside and renamed: a reader never sees half a file."""
    path = state_dir / HISTORY_FILE
    tmp = path.with_name(f".{HISTORY_FILE}.tmp")
    doc = {n: h.to_json() for n, h in sorted(history.items())}
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def status_fields(state_dir: Path, name: str) -> dict[str, Any]:
    """What ``status`` shows of a partition's crashes."""
    h = load_history(state_dir).get(name)
    if h is None:
        return {"restarts": 0, "last_exit": None, "failed_reason": None}
    return {"restarts": h.restarts, "last_exit": h.last_exit, "failed_reason": h.gave_up}


def exit_reason(pid: int, output: Path | None) -> str:
    """Why QEMU ``pid`` ended: its exit status when it is this process's child (a QEMU this
    supervisor restarted), else QEMU's own last words in its output file, if any."""
    status = None
    with contextlib.suppress(ChildProcessError, OSError):
        # WNOWAIT: look without reaping, the launcher's own bookkeeping reaps it.
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None:
            if info.si_code == os.CLD_EXITED:
                status = f"exited with status {info.si_status}"
            else:
                try:
                    name = signal.Signals(info.si_status).name
                except ValueError:
                    name = f"signal {info.si_status}"
                status = f"killed by {name}"
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
    words = ""
    if output is not None:
        with contextlib.suppress(OSError):
            lines = [ln.strip() for ln in output.read_text(errors="replace").splitlines()]
            words = next((ln for ln in reversed(lines) if ln), "")
    if status and words:
        return f"QEMU (pid {pid}) {status}: {words}"
    if status:
        return f"QEMU (pid {pid}) {status}"
    if words:
        return f"QEMU (pid {pid}) ended without being asked: {words}"
    return f"QEMU (pid {pid}) ended without being asked"


@dataclass(frozen=True)
class Event:
    partition: str
    kind: str  # "restarted", "failed", "restart-failed", "steered"
    detail: str


Restarter = Callable[[StateStore, State, str], State]


class Supervisor:
    def __init__(
        self,
        root: HostRoot,
        store: StateStore,
        restart: Restarter,
        *,
        max_crashes: int = MAX_CRASHES,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self.store = store
        self.restart = restart
        self.max_crashes = max_crashes
        self.window_s = window_s
        self.clock = clock

    def step(self) -> list[Event]:
        """One look at the record; what it did."""
        from partitioner.guest.launch import is_running

        try:
            with self.store.lock("supervise", 0.0):
                state = self.store.load()
                history = load_history(self.store.dir)
                events: list[Event] = []
                crashed: list[PartitionRecord] = []
                for name, rec in sorted(state.partitions.items()):
                    if rec.state is not RunState.RUNNING or rec.pid is None:
                        continue
                    if is_running(self.root, rec.pid, name):
                        h = history.get(name)
                        if h is not None and h.gave_up is not None:
                            # Started again by hand after it was given up: a fresh count.
                            history[name] = replace(h, gave_up=None, crashes=[])
                        continue
                    crashed.append(rec)
                # Why each ended, before anything reaps it.
                reasons = {
                    rec.name: exit_reason(
                        rec.pid or 0,
                        Path(rec.paths["output"]) if "output" in rec.paths else None,
                    )
                    for rec in crashed
                }
                if crashed:
                    # What every verb that changes the host does first: the record settled
                    # with the host (the dead QEMU's run directory, intents under way).
                    from partitioner.record.reconcile import reconcile_store

                    state = reconcile_store(self.store, self.root).state
                for rec in crashed:
                    state, event = self._crashed(state, rec, reasons[rec.name], history)
                    events.append(event)
                events.extend(self._steer())
                if events or history != load_history(self.store.dir):
                    save_history(self.store.dir, history)
                return events
        except BusyError:
            return []

    def _steer(self) -> list[Event]:
        """The partitions' device interrupts asked for since ``apply``, onto their CPUs."""
        from partitioner.isolation.runtime import steer_device_irqs

        return [
            Event(name, "steered", f"interrupt {m.irq} ({m.owner}) from CPUs {m.old} to {m.new}")
            for name, m in steer_device_irqs(self.root, self.store.dir)
        ]

    def _crashed(
        self, state: State, rec: PartitionRecord, reason: str, history: dict[str, History]
    ) -> tuple[State, Event]:
        now = self.clock()
        h = history.setdefault(rec.name, History())
        h.crashes = [t for t in h.crashes if now - t < self.window_s] + [now]
        h.last_exit, h.last_exit_at = reason, now
        log.warning("partition %s: %s", rec.name, reason)
        give_up = None
        if rec.placement.spec.on_crash == "stop":
            give_up = f"on_crash: stop ({reason})"
        elif len(h.crashes) > self.max_crashes:
            give_up = (
                f"crashed {len(h.crashes)} times within {self.window_s / 60:g} minutes "
                f"(more than {self.max_crashes}); last: {reason}"
            )
        if give_up is None:
            try:
                state = self.restart(self.store, state, rec.name)
            except PartitionError as e:
                give_up = f"could not be started again: {e}"
            else:
                h.restarts += 1
                h.gave_up = None
                return state, Event(rec.name, "restarted", reason)
        # Left failed, still holding its CPUs, memory and devices (on_crash, docs/manifest.md).
        now_rec = state.partitions.get(rec.name, rec)
        failed = replace(now_rec, state=RunState.FAILED, pid=None, vcpu_threads={}, started_at=None)
        state = state.with_partition(failed)
        self.store.save(state)
        h.gave_up = give_up
        return state, Event(rec.name, "failed", give_up)

    def run(self, poll: float = 0.5, until: Callable[[], bool] = lambda: False) -> None:
        """Watch until ``until()`` says stop (or for ever); SIGTERM ends it cleanly."""
        stop = False

        def leave(_signum: int, _frame: object) -> None:
            nonlocal stop
            stop = True

        previous = signal.signal(signal.SIGTERM, leave)
        try:
            while not stop and not until():
                try:
                    for e in self.step():
                        level = logging.INFO if e.kind == "steered" else logging.WARNING
                        log.log(level, "partition %s %s: %s", e.partition, e.kind, e.detail)
                except StateError as e:
                    # A record that cannot be read now (being replaced by hand, a full
                    # disk) is said and looked at again; the guests run on meanwhile.
                    log.warning("cannot read the state record: %s", e)
                    time.sleep(max(poll, 5.0))
                time.sleep(poll)
        finally:
            signal.signal(signal.SIGTERM, previous)
