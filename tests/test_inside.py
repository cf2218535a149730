"""Run tests/inside/ inside the emulated VT-d server, once, and report one result per module.

The server (the ``numa`` preset unless ``PARTITION_TESTBED_TOPOLOGY`` names
another) is booted once per session; pytest runs there once per module of tests/inside,
each writing a JUnit report to the writable share, and each host-side test
below passes iff every case of its module passed in there.

The SR-IOV modules (:data:`SRIOV_MODULES`) need a topology with an SR-IOV NIC
(QEMU's igb), which Debian 12's QEMU 7.2 cannot build: when the suite's topology
has none, they run on a boot of their own of the ``sriov`` preset
(``PARTITION_TESTBED_SRIOV_TOPOLOGY``), with the QEMU that has igb (scripts/setup
unpacks one under /opt).  That boot is the boot-time proof too: the server is
booted with the kernel arguments ``partition host setup`` compiles for
tests/manifests/hostboot-sriov.yaml (against the snapshot of the ``sriov`` server,
tests/fixtures/hosts/testbed-sriov), whose other files are put in
``$TESTBED_OUT/sriov-boot``; test_inside_sriov_boot runs the compiled SR-IOV script
as udev would when the PF's driver binds it and checks the result, then puts the
PF back for test_inside_sriov (``partition apply`` of the same site, its nested
guests, and SIGKILL at each SR-IOV kill point).  The preset is small (3 vCPUs):
its boot takes about 10 s, the two modules about 11 minutes (the two nested
guests' boot, TCG inside TCG, is most of it); the suite keeps its one long boot on QEMU 7.2 (what
users run) and adds this short one, rather than putting igb into the ``numa``
preset and the whole suite on the newer QEMU.  Without a QEMU that has igb, the
SR-IOV modules are skipped, saying so.  ``pytest -s`` shows the
inside run live; otherwise its log is in the session's tmp dir (testbed-out*/inside.log)
and its tail in each failure.
"""

from __future__ import annotations

import compileall
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import pytest
from guestimage import SHARED_KERNEL

from partitioner.errors import GuestError
from partitioner.testbed import guestimage
from partitioner.testbed.initramfs import OUT_DIR, bootable_kernel
from partitioner.testbed.qemu import QemuLacksDevices, choose_qemu
from partitioner.testbed.server import (
    TestbedEmulationFault,
    TestbedHang,
    TestbedServer,
    TestbedTimeout,
)
from partitioner.testbed.topology import load_topology

pytestmark = [pytest.mark.testbed, pytest.mark.qemu]

PROJECT = Path(__file__).resolve().parents[1]
INSIDE = PROJECT / "tests" / "inside"
MODULES = sorted(p.stem for p in INSIDE.glob("test_*.py"))
TOPOLOGY = os.environ.get("PARTITION_TESTBED_TOPOLOGY", "numa")
SRIOV_TOPOLOGY = os.environ.get("PARTITION_TESTBED_SRIOV_TOPOLOGY", "sriov")
# Need an SR-IOV NIC: run where the topology has one, in this order (the boot-time proof
# first, on the PF as the boot left it).
SRIOV_MODULES = ("test_inside_sriov_boot", "test_inside_sriov")
SRIOV_SITE = PROJECT / "tests" / "manifests" / "hostboot-sriov.yaml"
SRIOV_SNAPSHOT = PROJECT / "tests" / "fixtures" / "hosts" / "testbed-sriov"
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
    skipped: dict[str, str] = field(default_factory=dict)  # module stem -> why it did not run


def topology_of(module: str, suite: str = TOPOLOGY, sriov: str = SRIOV_TOPOLOGY) -> str:
    """The topology a module runs on: the suite's, but an SR-IOV module needs an SR-IOV NIC."""
    if module in SRIOV_MODULES and not load_topology(suite).has_sriov:
        return sriov
    return suite


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
    selected.sort(
        key=lambda m: (m in SLOW_MODULES, SRIOV_MODULES.index(m) if m in SRIOV_MODULES else -1, m)
    )
    live = request.config.getoption("capture") == "no"
    # The server sees the project read-only, without writing bytecode: every module it has
    # no up-to-date .pyc for is compiled again by each command it runs, which under TCG in
    # TCG costs a second or more a command.  Compiled here, once, at the host's speed.
    for tree in ("partitioner", "tests"):
        compileall.compile_dir(PROJECT / tree, quiet=2, workers=1)
    _share_guest_kernel(out)
    by_topology: dict[str, list[str]] = {}
    for m in selected:
        by_topology.setdefault(topology_of(m), []).append(m)
    logs: list[str] = []
    rcs: list[int | None] = []
    problems: list[str] = []
    boot_seconds: float | None = None
    skipped: dict[str, str] = {}
    for topology, modules in by_topology.items():
        topo = load_topology(topology)
        try:
            choose_qemu(topo.name, topo.qemu_devices())
        except QemuLacksDevices as e:
            if topology == TOPOLOGY:
                raise
            skipped.update(dict.fromkeys(modules, str(e)))
            continue
        log_path = out / ("inside.log" if topology == TOPOLOGY else f"inside-{topo.name}.log")
        append = sriov_boot_files(out) if topo.has_sriov else []
        with log_path.open("w") as log:
            stream = _Tee(log, sys.stderr) if live else log
            rc, problem, seconds = _run_once_more_after_a_fault(
                functools.partial(_boot_and_run, topology=topology, append=append),
                modules,
                out,
                stream,
            )
        logs.append(log_path.read_text(errors="replace"))
        rcs.append(rc)
        if problem:
            problems.append(f"{topology}: {problem}")
        if topology == TOPOLOGY or boot_seconds is None:
            boot_seconds = seconds  # the suite topology's boot, which is the one that counts
    worst = None if None in rcs else max(rcs, default=0)
    run = InsideRun(
        rc=worst,
        log="\n".join(logs),
        boot_seconds=boot_seconds,
        problem="\n".join(problems),
        skipped=skipped,
    )
    for m in selected:
        if (out / f"{m}.xml").exists():
            run.cases[m] = parse_junit(out / f"{m}.xml")[m]
        rc_text = (out / f"{m}.rc").read_text().strip() if (out / f"{m}.rc").exists() else ""
        if rc_text.isdigit():
            run.module_rc[m] = int(rc_text)
    return run


def sriov_boot_files(out: Path) -> list[str]:
    """What ``partition host setup`` compiles for the SR-IOV site on the ``sriov`` server (its
    snapshot), as ``--dry-run --json`` says it, put in ``out/sriov-boot/setup.json`` for the
    boot-time proof inside; its kernel arguments, to boot the server with."""
    cp = subprocess.run(
        [
            sys.executable, "-m", "partitioner.cli.main", "--host-root", str(SRIOV_SNAPSHOT),
            "--json", "host", "setup", str(SRIOV_SITE), "--dry-run",
            "--root", str(out / "sriov-target"),
        ],
        capture_output=True, text=True, cwd=PROJECT, timeout=300,
    )  # fmt: skip
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)
    (out / "sriov-boot").mkdir(exist_ok=True)
    (out / "sriov-boot" / "setup.json").write_text(cp.stdout)
    args: list[str] = doc["kernel_args"]
    return args


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


def _share_guest_kernel(out: Path) -> None:
    """The nested guests' kernel as an uncompressed ELF image (booted through QEMU's PVH
    entry), unpacked here at the host's speed and left in the shared output directory, where
    tests/guestimage.py finds it: a bzImage unpacks itself inside the guest, minutes under
    TCG inside TCG.  A kernel without PVH is left as it is."""
    try:
        kernel = guestimage.guest_kernel()
    except GuestError:
        return  # the modules that need a guest skip, saying why
    elf = bootable_kernel(kernel)
    if elf != kernel:
        out.chmod(0o755)
        shutil.copyfile(elf, out / SHARED_KERNEL)
        (out / SHARED_KERNEL).chmod(0o644)


def _boot_and_run(
    modules: list[str],
    out: Path,
    stream: TextIO,
    *,
    topology: str = TOPOLOGY,
    append: Sequence[str] = (),
) -> tuple[int | None, Exception | None, float | None]:
    """Boot the server, run pytest once per module in it: its exit code, what went wrong (a
    timeout, a boot failure, an emulation fault), the boot time."""
    script = (
        'py="$1"; shift; worst=0; for m in "$@"; do '
        # No hypothesis plugin: the modules inside do not use it, and its start is seconds there.
        '"$py" -m pytest "tests/inside/$m.py" -p no:cacheprovider -p no:hypothesispytest '
        "-o addopts=-ra "
        f'--junitxml="{OUT_DIR}/$m.xml"; rc=$?; echo $rc > "{OUT_DIR}/$m.rc"; '
        "[ $rc -gt $worst ] && worst=$rc; done; exit $worst"
    )
    # (-o addopts: the project's addopts ignore tests/inside, not in here.)
    argv = ["sh", "-c", script, "inside", sys.executable, *modules]
    with TestbedServer(
        topology,
        argv,
        timeout=TIMEOUT,
        cwd=str(PROJECT),
        out_dir=out,
        stream=stream,
        append=append,
    ) as tb:
        try:
            return tb.wait(), None, tb.boot_seconds
        except Exception as e:  # every module that did not finish reports it
            return None, e, tb.boot_seconds


def _tail(text: str, n: int = 60) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


@pytest.mark.parametrize("module", MODULES)
def test_inside_module(inside_run: InsideRun, module: str) -> None:
    if module in inside_run.skipped:
        pytest.skip(inside_run.skipped[module])
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


def test_the_sriov_module_runs_where_there_is_an_sriov_nic() -> None:
    assert topology_of("test_inside_sriov", "numa") == "sriov"
    assert topology_of("test_inside_sriov_boot", "numa") == "sriov"
    assert topology_of("test_inside_sriov", "sriov") == "sriov"
    assert topology_of("test_inside_vfio", "numa") == "numa"
    assert set(SRIOV_MODULES) <= set(MODULES)


def test_the_sriov_boot_is_booted_with_what_host_setup_compiled(tmp_path: Path) -> None:
    args = sriov_boot_files(tmp_path)
    assert "intel_iommu=on" in args
    doc = json.loads((tmp_path / "sriov-boot" / "setup.json").read_text())
    paths = {f["path"] for f in doc["files"]}
    assert {"/etc/partition/sriov-vfs", "/etc/udev/rules.d/70-partition-sriov.rules"} <= paths
    assert [pf["pf"] for pf in doc["sriov"]] == ["0000:01:00.0"]


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
