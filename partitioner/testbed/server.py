"""Boot an emulated VT-d server, run one command in it, and always take it down again.

Channels between the host and the emulated server:

- ttyS0, the kernel's console, goes to a log file (``console.log`` in the run
  directory); its tail is shown when the server does not come up.
- ttyS1 carries the command's stdout and stderr, through QEMU's stdout, to
  ``stream``.  The command's stdin is ``/dev/null``.
- The control share (9p tag ``tbctl``, ``/run/testbed`` inside) brings the job
  script in and the ``started`` and ``rc`` files out.
- The output share (9p tag ``tbout``, ``$TESTBED_OUT`` = ``/run/testbed-out``
  inside) is a writable directory for the command's files.

QEMU runs in its own session, so a Ctrl-C reaches only this process, which
then ends QEMU; so do a timeout and any exception.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TextIO

from partitioner.errors import GuestError, PreconditionError, UsageError
from partitioner.run import spawn
from partitioner.testbed.initramfs import (
    HEARTBEAT,
    OUT_DIR,
    TIMER_CHECK_SECONDS,
    TIMERLESS,
    bootable_kernel,
    default_kernel,
    initramfs_for,
)
from partitioner.testbed.qemu import choose_qemu
from partitioner.testbed.topology import Share, Topology, kernel_cmdline, load_topology, qemu_args

QEMU = "qemu-system-x86_64"
# Private (tmpfs) inside the emulated server: the host's files under them are not seen.
PRIVATE_DIRS = ("/tmp", "/run", "/var", "/proc", "/sys", "/dev")
# Of those, the ones a checkout (or its virtual environment) may sit in: a directory below
# them that the command needs is shared on its own and mounted over the tmpfs, at its path.
SHAREABLE_DIRS = ("/tmp", "/run", "/var")
# The 9p options of such a share: read-only like the host's root, and as cacheable.
_HIDDEN_MOUNT_OPTS = "trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Boots of one server, at most, when a boot hangs or /init finds a CPU whose timer does not tick.
BOOTS = 3
# Seconds without kernel output that make a boot count as hung (a boot under TCG prints
# every second or so until /init runs the command).
BOOT_SILENCE = 60.0
# Seconds without the server's heartbeat (a count /init writes every second while the
# command runs) that make it count as hung: its emulated CPUs stopped, all of them.
HANG_SECONDS = 120.0
# What the emulated server's kernel prints when a CPU's timer stopped after the boot:
# RCU's grace periods then never end, and the command would hang until its timeout.
LOST_TIMER = "Possible timer handling issue on cpu="


class TestbedTimeout(GuestError):
    """The command did not finish in time; the emulated server was ended."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(
        self, topology: str, timeout: float, booted: bool, log_path: Path | None = None
    ) -> None:
        self.timeout = timeout
        self.booted = booted
        self.log_path = log_path
        what = "the command" if booted else "the emulated server's boot"
        where = f"; its kernel log: {log_path}" if log_path else ""
        super().__init__(
            f"testbed {topology}: {what} did not finish within {timeout:g}s; "
            f"the emulated server was stopped (raise --timeout if the command is just slow){where}",
            partition=f"testbed:{topology}",
        )


class TestbedEmulationFault(GuestError):
    """The emulation failed under the command (QEMU's fault, not the command's).

    Seen under TCG on a loaded host: a CPU that loses its timer, a QEMU that
    crashes.  What the command did is lost; running it again on a fresh
    server is the remedy.
    """

    __test__ = False  # not a pytest test class, whatever its name


def _stopped_under_the_command(topology: str, what: str, log_path: Path | None) -> str:
    """The words of a fault found while the command ran, after which the server was ended."""
    where = f"; its kernel log: {log_path}" if log_path else ""
    return f"testbed {topology}: {what}; the server was stopped (run the command again){where}"


class TestbedTimerFault(TestbedEmulationFault):
    """A CPU of the emulated server stopped taking timer interrupts while the command ran.

    The server was stopped at once rather than left to hang.
    """

    def __init__(self, topology: str, line: str, log_path: Path | None) -> None:
        self.line = line
        self.log_path = log_path
        super().__init__(
            _stopped_under_the_command(
                topology,
                "a CPU of the emulated server stopped taking timer interrupts while the "
                f"command ran ({line.strip()}), a fault of the emulation",
                log_path,
            ),
            partition=f"testbed:{topology}",
        )


class TestbedHang(TestbedEmulationFault):
    """The emulated server stopped answering while the command ran: its heartbeat stopped.

    The server was stopped at once rather than left to hang until the timeout.
    """

    def __init__(self, topology: str, seconds: float, log_path: Path | None) -> None:
        self.seconds = seconds
        self.log_path = log_path
        super().__init__(
            _stopped_under_the_command(
                topology,
                "the emulated server stopped answering while the command ran (no heartbeat "
                f"for {seconds:g}s), a fault of the emulation unless the command stopped "
                "every CPU",
                log_path,
            ),
            partition=f"testbed:{topology}",
        )


class TestbedBootFailure(GuestError):
    """QEMU or the emulated server's kernel stopped before the command could run (or report)."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, topology: str, reason: str, log_tail: str, log_path: Path | None) -> None:
        self.reason = reason
        self.log_tail = log_tail
        self.log_path = log_path
        where = f" (whole kernel log: {log_path})" if log_path else ""
        super().__init__(
            f"testbed {topology}: {reason}{where}" + (f"\n{log_tail}" if log_tail else ""),
            partition=f"testbed:{topology}",
        )


class TestbedQemuCrash(TestbedBootFailure, TestbedEmulationFault):
    """QEMU itself died of a signal nobody sent it (a crash of the emulator)."""

    def __init__(self, topology: str, signame: str, log_tail: str, log_path: Path | None) -> None:
        self.signame = signame
        super().__init__(
            topology,
            f"QEMU, which emulates the server, died of {signame} before the command "
            "reported its exit status: a crash of the emulator (or a signal from outside), "
            "not the command's doing; run it again",
            log_tail,
            log_path,
        )


def _signame(returncode: int) -> str:
    """The signal a process that ended with ``returncode`` (negative) died of, by name."""
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def hidden_shares(paths: Sequence[str]) -> list[Share]:
    """The shares that make ``paths`` visible inside: for each path below a private directory
    (``/tmp/ci/clone/tests``), its top directory there (``/tmp/ci``), once.

    Raises GuestError for a path the emulated server cannot be shown (``/proc/...``, or a
    private directory itself, which must stay a writable tmpfs inside).
    """
    shares: list[Share] = []
    for path in paths:
        p = Path(path)
        hidden = next((Path(d) for d in PRIVATE_DIRS if p.is_relative_to(d)), None)
        if hidden is None:
            continue
        if str(hidden) not in SHAREABLE_DIRS or p == hidden:
            raise PreconditionError(
                f"testbed: {path} is not visible inside the emulated server, which has its own "
                f"{hidden}; run from (or pass cwd=) a directory below /tmp, /var or /run, or "
                "anywhere else"
            )
        top = str(hidden / p.relative_to(hidden).parts[0])
        if all(s.path != top for s in shares):
            shares.append(Share(f"tbhidden{len(shares)}", top, readonly=True))
    return shares


def job_script(
    argv: Sequence[str], cwd: str, env: Mapping[str, str], mounts: Sequence[Share] = ()
) -> str:
    """The shell script the emulated server runs (inside the chroot): a clean env, cwd, argv.

    ``mounts``: shares of directories the private tmpfs mounts hide, mounted at their paths.
    """
    if not argv:
        raise ValueError("empty command")
    assigns = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(env.items()))
    mount_lines = "".join(
        f"mkdir -p {shlex.quote(m.path)} && mount -t 9p -o {_HIDDEN_MOUNT_OPTS} {m.tag} "
        f"{shlex.quote(m.path)} || {{ echo {shlex.quote(f'testbed: cannot mount {m.path}')} >&2; exit 125; }}\n"
        for m in mounts
    )
    return (
        "# written by partition testbed\n"
        + mount_lines
        + f"cd {shlex.quote(cwd)} || {{ echo {shlex.quote(f'testbed: no directory {cwd} inside the emulated server')} >&2; exit 125; }}\n"
        f"exec /usr/bin/env -i {assigns} {shlex.join(argv)}\n"
    )


def guest_env(topo: Topology, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        "PATH": GUEST_PATH,
        "HOME": "/root",
        "USER": "root",
        "LOGNAME": "root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        # The host's tree is read-only in there: do not try to write bytecode into it.
        "PYTHONDONTWRITEBYTECODE": "1",
        "TESTBED": topo.name,
        "TESTBED_OUT": OUT_DIR,
    }
    env.update(extra or {})
    return env


class TestbedServer:
    """One boot of an emulated server running one command.

    ``with TestbedServer(topo, argv) as tb: rc = tb.wait()``; leaving the block
    (normally, by an exception, or by KeyboardInterrupt) ends QEMU if it still
    runs and removes the run directory unless ``keep`` is set or the server
    failed (a boot failure or a timeout: the error names the kernel log kept).
    ``timeout`` counts from QEMU's start, the boot included.
    """

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(
        self,
        topology: Topology | str,
        argv: Sequence[str],
        *,
        timeout: float = 900,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        out_dir: Path | None = None,
        stream: TextIO | None = sys.stdout,
        progress: TextIO | None = sys.stderr,
        kernel: str | os.PathLike[str] | None = None,
        keep: bool = False,
        append: Sequence[str] = (),
        boot_silence: float = BOOT_SILENCE,
        hang_seconds: float = HANG_SECONDS,
    ) -> None:
        self.topology = load_topology(topology) if isinstance(topology, str) else topology
        self.argv = list(argv)
        if not self.argv:
            raise GuestError(
                "testbed: no command to run", partition=f"testbed:{self.topology.name}"
            )
        self.timeout = timeout
        self.cwd = cwd or os.getcwd()
        self.env = guest_env(self.topology, env)
        self.out_dir = out_dir
        self.stream = stream
        self.progress = progress
        self.kernel = Path(kernel) if kernel else None
        self.keep = keep
        # Kernel arguments after the topology's own: what `host setup` compiles for a site.
        self.append = [a for arg in append for a in shlex.split(arg)]
        self.run_dir: Path | None = None
        self.qemu: str | None = None  # the QEMU binary chosen at start
        self.console_log: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.boot_seconds: float | None = None  # from QEMU's start to the command's start
        self.total_seconds: float | None = None
        self._pump: threading.Thread | None = None
        self._qemu_argv: list[str] = []
        self._boots = 0
        self._console_seen = 0  # bytes of the kernel log already searched for LOST_TIMER
        self.boot_silence = boot_silence
        self._console_size, self._console_moved = -1, 0.0  # the boot's progress, for boot_silence
        self.hang_seconds = hang_seconds
        self._beat, self._beat_moved = "", 0.0  # the last heartbeat read, and when it changed
        self._t0 = 0.0
        self._failed = False

    # -- lifecycle -------------------------------------------------------------

    def __enter__(self) -> TestbedServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        if os.geteuid() != 0:
            # 9p with security_model=none serves the host's files with the rights of
            # QEMU's user: only root sees (and owns) them all, as the guest's root expects.
            raise PreconditionError("partition testbed needs root: run it as root")
        # The checkout (and the Python running this) may sit under /tmp, /var or /run, which
        # are private inside: those directories are shared on their own.
        hidden = hidden_shares([self.cwd, sys.prefix])
        # The QEMU that has every device the topology uses, asked, never judged by version.
        self.qemu = choose_qemu(self.topology.name, self.topology.qemu_devices())
        kernel = self.kernel or default_kernel()
        initrd = initramfs_for(kernel)
        self.run_dir = Path(tempfile.mkdtemp(prefix="partition-testbed-"))
        ctl = self.run_dir / "ctl"
        ctl.mkdir()
        out = self.out_dir or self.run_dir / "out"
        out.mkdir(parents=True, exist_ok=True)
        (ctl / "job").write_text(job_script(self.argv, self.cwd, self.env, hidden))
        self.console_log = self.run_dir / "console.log"
        self._qemu_argv = qemu_args(
            self.topology,
            kernel=str(bootable_kernel(kernel)),
            initrd=str(initrd),
            cmdline=kernel_cmdline(self.topology, self.append),
            console_log=str(self.console_log),
            shares=[
                Share("hostroot", "/", readonly=True),
                Share("tbctl", str(ctl), readonly=False),
                Share("tbout", str(out.resolve()), readonly=False),
                *hidden,
            ],
            qemu=self.qemu,
        )
        self._say(f"booting emulated server ({self.topology.describe()}) with {self.qemu}...")
        self._t0 = time.monotonic()
        self._spawn()

    def _spawn(self) -> None:
        assert self.run_dir is not None
        self._boots += 1
        self._console_seen = 0
        self._console_size, self._console_moved = -1, time.monotonic()
        with open(self.run_dir / "qemu.err", "wb") as qemu_err:
            self.proc = spawn(
                self._qemu_argv,
                stdout=subprocess.PIPE,
                stderr=qemu_err.fileno(),
                stdin=subprocess.DEVNULL,
                new_session=True,
                die_with_parent=True,
            )
        self._pump = threading.Thread(target=self._copy_output, daemon=True)
        self._pump.start()

    def wait(self) -> int:
        """Until the command ends: its exit code.  Raises TestbedTimeout or TestbedBootFailure."""
        assert self.proc is not None and self.run_dir is not None
        ctl = self.run_dir / "ctl"
        ticker = self.progress is not None and self.progress.isatty()
        last_tick = 0
        deadline = self._t0 + self.timeout
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=0.25)
            now = time.monotonic()
            if self.boot_seconds is None and (ctl / "started").exists():
                self.boot_seconds = now - self._t0
                if ticker:
                    self._write_progress("\r\033[K")
                self._say(
                    f"emulated server up after {self.boot_seconds:.1f}s; running: {shlex.join(self.argv)}"
                )
            if self.proc.returncode is not None:
                if what := self._timerless(ctl):
                    self._boot_again(what)
                    continue
                if self._boots < BOOTS and (what := self._crashed_booting(ctl)):
                    self._boot_again(what)
                    continue
                break
            if self.boot_seconds is None and (what := self._silent_boot(now)):
                self._boot_again(what)
                continue
            if self.boot_seconds is not None and (line := self._lost_timer()):
                self._kill()
                self._failed = True
                raise TestbedTimerFault(self.topology.name, line, self.console_log)
            if self.boot_seconds is not None and self._hung(ctl, now):
                self._kill()
                self._failed = True
                raise TestbedHang(self.topology.name, self.hang_seconds, self.console_log)
            if now >= deadline:
                self._kill()
                self._failed = True
                raise TestbedTimeout(
                    self.topology.name,
                    self.timeout,
                    self.boot_seconds is not None,
                    self.console_log,
                )
            if ticker and self.boot_seconds is None and int(now - self._t0) != last_tick:
                last_tick = int(now - self._t0)
                self._write_progress(f"\r  booting... {last_tick}s")
        self.total_seconds = time.monotonic() - self._t0
        if self._pump is not None:
            self._pump.join(timeout=10)
        rc_text = (ctl / "rc").read_text().strip() if (ctl / "rc").exists() else ""
        if rc_text.isdigit():
            return int(rc_text)
        if ticker and self.boot_seconds is None:
            self._write_progress("\r\033[K")
        stderr = "\n".join(
            ln
            for ln in (self.run_dir / "qemu.err").read_text(errors="replace").splitlines()
            # NICs with no network behind them are what the testbed wants.
            if not ln.endswith("has no peer")
        )
        if self.boot_seconds is None:
            reason = (
                f"the emulated server did not come up (QEMU exited with {self.proc.returncode})"
            )
        else:
            reason = f"the emulated server stopped before the command reported its exit status (QEMU exited with {self.proc.returncode})"
        tail = "\n".join((stderr.strip().splitlines() + self.console_tail(30))[-40:])
        self._failed = True
        if self.proc.returncode < 0:  # a signal: only _kill sends one, and it raises first
            raise TestbedQemuCrash(
                self.topology.name, _signame(self.proc.returncode), tail, self.console_log
            )
        raise TestbedBootFailure(self.topology.name, reason, tail, self.console_log)

    def close(self) -> None:
        """End QEMU if it still runs, and remove the run directory (unless ``keep``)."""
        self._kill()
        if self._pump is not None:
            self._pump.join(timeout=5)
        if self.proc is not None and self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()
        # After a failure the run directory stays: the error names its kernel log.
        if self.run_dir is not None and not self.keep and not self._failed:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def console_tail(self, n: int) -> list[str]:
        if self.console_log is None:
            return []
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return []
        return [ln.rstrip("\r") for ln in text.splitlines()[-n:]]

    # -- helpers ---------------------------------------------------------------

    def _timerless(self, ctl: Path) -> str:
        """What /init's timer check found wrong, if it powered the server off for that."""
        marker = ctl / TIMERLESS
        if not marker.exists():
            return ""
        cpus = marker.read_text(errors="replace").split()
        marker.unlink()
        return (
            f"CPU {', '.join(cpus)} of the emulated server did not run or took no timer interrupts "
            f"in {TIMER_CHECK_SECONDS}s (a fault of the emulation)"
        )

    def _crashed_booting(self, ctl: Path) -> str:
        """Why a QEMU that ended before the command started is booted again: it died of a
        signal (the emulator's own crash; every signal the testbed sends raises first)."""
        assert self.proc is not None and self.proc.returncode is not None
        if self.boot_seconds is not None or self.proc.returncode >= 0 or (ctl / "started").exists():
            return ""
        return (
            f"QEMU, which emulates the server, died of {_signame(self.proc.returncode)} "
            "during the boot (a crash of the emulator)"
        )

    def _hung(self, ctl: Path, now: float) -> bool:
        """Whether the heartbeat has not changed for ``hang_seconds`` (counted from the
        command's start until the first beat is seen)."""
        try:
            beat = (ctl / HEARTBEAT).read_text(errors="replace")
        except OSError:
            beat = ""
        if beat != self._beat or not self._beat_moved:
            self._beat, self._beat_moved = beat, now
            return False
        return now - self._beat_moved >= self.hang_seconds

    def _silent_boot(self, now: float) -> str:
        """Why the boot is taken for hung: no kernel output for ``boot_silence`` seconds."""
        assert self.console_log is not None
        try:
            size = self.console_log.stat().st_size
        except OSError:
            size = 0
        if size != self._console_size:
            self._console_size, self._console_moved = size, now
            return ""
        if now - self._console_moved < self.boot_silence:
            return ""
        self._kill()
        return (
            f"the emulated server's boot stopped: no kernel output for {self.boot_silence:g}s "
            "(a fault of the emulation)"
        )

    def _boot_again(self, what: str) -> None:
        """After a boot that failed for the emulation's sake: boot a fresh server, if boots remain."""
        assert self.run_dir is not None and self.console_log is not None
        if self._boots >= BOOTS:
            self._failed = True
            raise TestbedBootFailure(
                self.topology.name,
                f"{what}, in each of {BOOTS} boots; run it again (a host less loaded "
                "makes such faults rarer)",
                "\n".join(self.console_tail(20)),
                self.console_log,
            )
        self._say(f"{what}; booting it again")
        if self._pump is not None:
            self._pump.join(timeout=10)
        # The faulty boot's kernel log stays beside the new one.
        self.console_log.replace(self.run_dir / f"console-boot{self._boots}.log")
        self._spawn()

    def _lost_timer(self) -> str:
        """The kernel's line naming a CPU whose timer stopped, if the log has one by now."""
        if self.console_log is None:
            return ""
        try:
            with self.console_log.open("rb") as f:
                f.seek(self._console_seen)
                new = f.read()
        except OSError:
            return ""
        # Only whole lines: a line cut by a write in progress is read again next time.
        end = new.rfind(b"\n") + 1
        self._console_seen += end
        for ln in new[:end].decode(errors="replace").splitlines():
            if LOST_TIMER in ln:
                return ln.rstrip("\r")
        return ""

    def _kill(self) -> None:
        p = self.proc
        if p is None or p.returncode is not None:
            return
        # SIGINT would be ignored if QEMU is wedged in TCG; SIGTERM ends it at once,
        # SIGKILL is for a QEMU that does not even do that.
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
            try:
                p.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue

    def _copy_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        src = self.proc.stdout
        dest = self.stream
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            try:
                chunk = os.read(src.fileno(), 65536)
            except (OSError, ValueError):
                return
            if dest is None:
                if not chunk:
                    return
                continue
            try:
                dest.write(decoder.decode(chunk, final=not chunk))
                dest.flush()
            except (OSError, ValueError):
                # The reader went away (a closed pipe): keep draining so QEMU never blocks.
                dest = None
            if not chunk:
                return

    def _say(self, text: str) -> None:
        self._write_progress(f"testbed: {text}\n")

    def _write_progress(self, text: str) -> None:
        if self.progress is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self.progress.write(text)
            self.progress.flush()


def once_more_after_a_fault(run: Callable[[], int], progress: TextIO | None, again: str) -> int:
    """``run()``, and if the emulation failed under it (``TestbedEmulationFault``), once
    more on a fresh server, for a command that may run twice (it only reads the server,
    or everything it changed went with the first server).  ``again`` says what is done
    again; a second fault, or any other failure, is raised."""
    try:
        return run()
    except TestbedEmulationFault as e:
        if progress is not None:
            print(f"partition: {e}\ntestbed: {again} on a fresh server", file=progress)
    return run()


def run_in_testbed(
    topology: Topology | str,
    argv: Sequence[str],
    *,
    timeout: float = 900,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    out_dir: Path | None = None,
    stream: TextIO | None = sys.stdout,
    progress: TextIO | None = sys.stderr,
) -> int:
    """Boot ``topology``, run ``argv`` in it as root, stream its output; its exit code.

    ``cwd`` (default: the current directory) is the same path inside, where the
    host's filesystem is mounted read-only.  ``out_dir`` (on the host) is
    writable inside as ``$TESTBED_OUT``.
    """
    with TestbedServer(
        topology,
        argv,
        timeout=timeout,
        cwd=cwd,
        env=env,
        out_dir=out_dir,
        stream=stream,
        progress=progress,
    ) as tb:
        return tb.wait()


def snapshot_testbed(
    topology: Topology | str,
    dest: Path,
    *,
    timeout: float = 900,
    progress: TextIO | None = sys.stderr,
) -> None:
    """Boot ``topology`` and save its ``/sys`` and ``/proc`` into ``dest`` as ``partition snapshot`` does."""
    topo = load_topology(topology) if isinstance(topology, str) else topology
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix="partition-testbed-snap-") as tmp:
        out = Path(tmp)
        project = str(Path(__file__).resolve().parents[2])
        buf = io.StringIO()
        # Written to the server's tmpfs and carried out as one tar: creating each of
        # the tree's files and links over 9p under TCG costs minutes.
        script = (
            '"$0" -m partitioner.cli.main snapshot /tmp/snap '
            f'&& tar -C /tmp -cf "{OUT_DIR}/snap.tar" snap'
        )
        rc = once_more_after_a_fault(
            lambda: run_in_testbed(
                topo,
                ["sh", "-c", script, sys.executable],
                timeout=timeout,
                cwd=project,
                env={"PYTHONPATH": project},
                out_dir=out,
                stream=buf,
                progress=progress,
            ),
            progress,
            "the snapshot only reads the server: taking it again",
        )
        if rc != 0:
            raise GuestError(
                f"testbed {topo.name}: partition snapshot exited with {rc} inside the emulated server"
                + (f":\n{_tail(buf.getvalue())}" if buf.getvalue().strip() else ""),
                partition=f"testbed:{topo.name}",
            )
        if dest.exists() and any(dest.iterdir()):
            raise UsageError(
                f"testbed snapshot: {dest} exists and is not empty: name a new or empty directory"
            )
        unpacked = out / "unpacked"
        with tarfile.open(out / "snap.tar") as tar:
            # "tar" filter: no absolute names or escapes; sysfs's relative links are kept.
            tar.extractall(unpacked, filter="tar")
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copytree(unpacked / "snap", dest, symlinks=True, dirs_exist_ok=True)


def _tail(text: str, n: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-n:])
