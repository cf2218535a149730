"""Run tests/inside/ inside the emulated VT-d server, once, and report one result per module.

The server (the ``numa`` preset unless ``PARTITION_TESTBED_TOPOLOGY`` names
another) is booted once per session; pytest runs there once per module of tests/inside,
each writing a JUnit report to the writable share, and each host-side test
below passes iff every case of its module passed in there.  ``pytest -s`` shows the
inside run live; otherwise its log is in the session's tmp dir (testbed-out*/inside.log)
and its tail in each failure.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import pytest

from partitioner.testbed.initramfs import OUT_DIR
from partitioner.testbed.server import (
    TestbedEmulationFault,
    TestbedHang,
    TestbedServer,
    TestbedTimeout,
)

pytestmark = [pytest.mark.testbed, pytest.mark.qemu]

PROJECT = Path(__file__).resolve().parents[1]
INSIDE = PROJECT / "tests" / "inside"
MODULES = sorted(p.stem for p in INSIDE.glob("test_*.py"))
TOPOLOGY = os.environ.get("PARTITION_TESTBED_TOPOLOGY", "numa")
SLOW_MODULES = (
    "test_inside_apply",
    "test_inside_live",
    "test_inside_walls",
)  # nested guests: after the quick ones
TIMEOUT = float(os.environ.get("PARTITION_TESTBED_TIMEOUT", "2700"))


@dataclass
class CaseResult:
    name: str
    outcome: str  # passed, failed, error, skipped
    text: str = ""


@dataclass
class InsideRun:
    rc: int | None
    log: str
    boot_seconds: float | None
    cases: dict[str, list[CaseResult]] = field(default_factory=dict)  # module stem -> cases
    module_rc: dict[str, int] = field(default_factory=dict)  # module stem -> pytest's exit code
    problem: str = ""  # why the run as a whole failed (boot failure, timeout)


def _module_of(classname: str, name: str) -> str | None:
    for part in [*classname.split("."), *name.split(".")]:
        if part in MODULES:
            return part
    return None


def parse_junit(path: Path) -> dict[str, list[CaseResult]]:
    out: dict[str, list[CaseResult]] = {m: [] for m in MODULES}
    for tc in ET.parse(path).getroot().iter("testcase"):
        module = _module_of(tc.get("classname", ""), tc.get("name", ""))
        if module is None:
            continue
        outcome, text = "passed", ""
        for child in tc:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                text = (child.get("message") or "") + "\n" + (child.text or "")
                break
        out[module].append(CaseResult(tc.get("name", "?"), outcome, text.strip()))
    return out


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (the emulated server shares the host's / as root)"
    if shutil.which("qemu-system-x86_64") is None:
        return "needs qemu-system-x86_64"
    if not list(Path("/boot").glob("vmlinuz-*")) or not Path("/bin/busybox").exists():
        return "needs linux-image-amd64 and busybox-static"
    return None


class _Tee(io.TextIOBase):
    """The inside output to the log file and, under ``pytest -s``, live to the terminal too."""

    def __init__(self, *sinks: TextIO) -> None:
        self.sinks = sinks

    def write(self, s: str) -> int:
        for sink in self.sinks:
            sink.write(s)
            sink.flush()
        return len(s)


@pytest.fixture(scope="session")
def inside_run(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> InsideRun:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("testbed-out")
    log_path = out / "inside.log"
    # Only the modules this session selected (`-k inventory` runs one inside).
    mine = sys.modules[__name__]
    selected = (
        sorted(
            {
                item.callspec.params["module"]
                for item in request.session.items
                if isinstance(item, pytest.Function)
                and item.module is mine
                and hasattr(item, "callspec")
                and "module" in item.callspec.params
            }
        )
        or MODULES
    )
    # One pytest per module, each with its own report: a module that overruns the
    # timeout or crashes pytest takes only its own results with it.  Slow ones last.
    selected.sort(key=lambda m: (m in SLOW_MODULES, m))
    live = request.config.getoption("capture") == "no"
    with log_path.open("w") as log:
        stream = _Tee(log, sys.stderr) if live else log
        rc, problem, boot_seconds = _run_once_more_after_a_fault(
            _boot_and_run, selected, out, stream
        )
    text = log_path.read_text(errors="replace")
    run = InsideRun(rc=rc, log=text, boot_seconds=boot_seconds, problem=str(problem or ""))
    for m in selected:
        if (out / f"{m}.xml").exists():
            run.cases[m] = parse_junit(out / f"{m}.xml")[m]
        rc_text = (out / f"{m}.rc").read_text().strip() if (out / f"{m}.rc").exists() else ""
        if rc_text.isdigit():
            run.module_rc[m] = int(rc_text)
    return run


BootAndRun = Callable[[list[str], Path, TextIO], tuple[int | None, Exception | None, float | None]]


def _run_once_more_after_a_fault(
    boot_and_run: BootAndRun, modules: list[str], out: Path, stream: TextIO
) -> tuple[int | None, Exception | None, float | None]:
    """``boot_and_run`` the modules; if the emulation failed under them (a CPU's timer
    lost, QEMU crashed, the server hung: not the tests' doing), the modules that did not
    finish (no ``out/MODULE.rc``) run once more, on a fresh server.  Any other failure, or
    a second fault, is the result as it stands."""
    rc, problem, boot_seconds = boot_and_run(modules, out, stream)
    left = [m for m in modules if not (out / f"{m}.rc").exists()]
    if isinstance(problem, TestbedEmulationFault) and left:
        stream.write(f"\n--- {problem}\n--- again on a fresh server: {' '.join(left)}\n")
        rc, problem, _ = boot_and_run(left, out, stream)
    return rc, problem, boot_seconds


def _boot_and_run(
    modules: list[str], out: Path, stream: TextIO
) -> tuple[int | None, Exception | None, float | None]:
    """Boot the server, run pytest once per module in it: its exit code, what went wrong (a
    timeout, a boot failure, an emulation fault), the boot time."""
    script = (
        'py="$1"; shift; worst=0; for m in "$@"; do '
        '"$py" -m pytest "tests/inside/$m.py" -p no:cacheprovider -o addopts=-ra '
        f'--junitxml="{OUT_DIR}/$m.xml"; rc=$?; echo $rc > "{OUT_DIR}/$m.rc"; '
        "[ $rc -gt $worst ] && worst=$rc; done; exit $worst"
    )
    # (-o addopts: the project's addopts ignore tests/inside, not in here.)
    argv = ["sh", "-c", script, "inside", sys.executable, *modules]
    with TestbedServer(
        TOPOLOGY, argv, timeout=TIMEOUT, cwd=str(PROJECT), out_dir=out, stream=stream
    ) as tb:
        try:
            return tb.wait(), None, tb.boot_seconds
        except Exception as e:  # every module that did not finish reports it
            return None, e, tb.boot_seconds


def _tail(text: str, n: int = 60) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


@pytest.mark.parametrize("module", MODULES)
def test_inside_module(inside_run: InsideRun, module: str) -> None:
    rc = inside_run.module_rc.get(module)
    if rc is None:
        why = inside_run.problem or "the emulated server ended before this module's pytest did"
        pytest.fail(
            f"{module} did not finish inside: {why}\n--- output inside ---\n{_tail(inside_run.log)}"
        )
    if rc not in (0, 1):
        pytest.fail(
            f"pytest inside exited with {rc} on {module} (interrupted, internal or usage "
            f"error, or nothing collected)\n--- output inside ---\n{_tail(inside_run.log)}"
        )
    cases = inside_run.cases.get(module, [])
    if not cases:
        pytest.fail(
            f"no test case of {module} ran inside (a collection error?)\n"
            f"--- output inside ---\n{_tail(inside_run.log)}"
        )
    bad = [c for c in cases if c.outcome in ("failed", "error")]
    if bad:
        pytest.fail(
            f"{len(bad)} of {len(cases)} cases of {module} failed inside:\n\n"
            + "\n\n".join(f"--- {c.name} ({c.outcome}) ---\n{_tail(c.text, 40)}" for c in bad)
        )
    if all(c.outcome == "skipped" for c in cases):
        pytest.fail(
            f"every case of {module} was skipped inside:\n"
            + "\n".join(f"{c.name}: {c.text.splitlines()[0] if c.text else ''}" for c in cases)
        )


# -- the rerun after an emulation fault, with a stand-in for the server ---------------------


class _Runs:
    """Stands for ``_boot_and_run``: each call finishes the modules it is told to, in
    order, by writing their ``.rc`` (as the server's script does), then ends as given."""

    def __init__(self, *ends: tuple[int, Exception | None]) -> None:
        self.ends = list(ends)  # per call: how many modules finish, and what went wrong
        self.calls: list[list[str]] = []

    def __call__(
        self, modules: list[str], out: Path, stream: TextIO
    ) -> tuple[int | None, Exception | None, float | None]:
        self.calls.append(list(modules))
        finished, problem = self.ends[len(self.calls) - 1]
        for m in modules[:finished]:
            (out / f"{m}.rc").write_text("0\n")
        return (None if problem else 0), problem, 10.0 * len(self.calls)


@pytest.mark.parametrize(
    ("ends", "calls", "problem"),
    [
        # A hang after the first module: the other two run once more, and pass.
        ([(1, TestbedHang("numa", 120, None)), (2, None)], [["a", "b", "c"], ["b", "c"]], None),
        # A fault again on the fresh server: that is the result.
        (
            [(0, TestbedHang("numa", 120, None)), (1, TestbedHang("numa", 120, None))],
            [["a", "b", "c"], ["a", "b", "c"]],
            TestbedHang,
        ),
        # A timeout is not the emulation's fault: nothing runs again.
        ([(1, TestbedTimeout("numa", 1500, True))], [["a", "b", "c"]], TestbedTimeout),
        # A fault after every module finished: nothing is left to run.
        ([(3, TestbedHang("numa", 120, None))], [["a", "b", "c"]], TestbedHang),
    ],
    ids=["fault then pass", "fault twice", "timeout", "fault after the end"],
)
def test_modules_an_emulation_fault_cut_short_run_once_more(
    tmp_path: Path,
    ends: list[tuple[int, Exception | None]],
    calls: list[list[str]],
    problem: type[Exception] | None,
) -> None:
    runs = _Runs(*ends)
    said = io.StringIO()
    rc, got, boot_seconds = _run_once_more_after_a_fault(runs, ["a", "b", "c"], tmp_path, said)
    assert runs.calls == calls
    assert boot_seconds == 10.0  # the first boot's
    if problem is None:
        assert (rc, got) == (0, None)
        assert "again on a fresh server: b c" in said.getvalue()
    else:
        assert rc is None and isinstance(got, problem)
