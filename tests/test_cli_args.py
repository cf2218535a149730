"""Hostile command lines: the arguments class of issue 8's hostile input, and cli.md's rules
for the command line as people type it.

Every case asserts: no traceback, the exit code cli.md gives, and with ``--json`` exactly
one JSON document on stdout.  Some run through a real ``partition`` process (to see the
real stdout and stderr, real argv bytes and a real FIFO); the rest in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from treebuilder import GiB, MiB, TreeBuilder

from partitioner.cli.main import _MODULE_OF, VERB_MODULES, build_parser, main
from partitioner.errors import PreconditionError
from partitioner.manifest.loader import MAX_BYTES
from partitioner.record.model import RunState, State
from partitioner.record.store import StateStore
from partitioner.testbed import initramfs
from partitioner.testbed.initramfs import needs_interpreter, static_busybox

ROOT = Path(__file__).resolve().parents[1]
PARTITION = Path(sys.executable).parent / "partition"
EXAMPLE = ROOT / "partitions" / "demo.yaml"
# Every verb as `partition VERB` names it (testbed's own verbs below it).
VERBS = ["inspect", "snapshot", "validate", "plan", "apply", "status", "map", "start", "stop"]
VERBS += [
    "restart",
    "destroy",
    "audit",
    "console",
    "export",
    "testbed",
    "testbed run",
    "testbed snapshot",
]
VERBS += ["host", "host check", "host setup", "host boot", "host supervise"]

SITE = """\
version: 1
host: {reserve: {cpus: 2, memory: 2GiB}, isolation: pinned}
partitions:
  fw0:
    cpus: 2
    memory: 1GiB
"""


@pytest.fixture(autouse=True)
def own_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every case has its own state, run and log directories, and no inherited host root."""
    for var, name in (
        ("PARTITION_STATE_DIR", "state"),
        ("PARTITION_RUN_DIR", "run"),
        ("PARTITION_LOG_DIR", "log"),
        ("PARTITION_CACHE_DIR", "cache"),
    ):
        monkeypatch.setenv(var, str(tmp_path / name))
    monkeypatch.delenv("PARTITION_HOST_ROOT", raising=False)
    return tmp_path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    t = TreeBuilder(tmp_path / "host")
    t.cpus(count=8, packages=1, threads=2, nodes=1, memory_per_node=16 * GiB)
    t.node(0, memory_bytes=16 * GiB, free_bytes=12 * GiB, hugepages={2 * MiB: (0, 0)})
    t.kvm()
    return t.build()


@pytest.fixture
def site(tmp_path: Path) -> Path:
    p = tmp_path / "site.yaml"
    p.write_text(SITE)
    return p


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``partition ARGV`` in-process; an argparse exit (--help) is returned as its code."""
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return rc, out, err


def one_document(out: str) -> dict[str, Any]:
    """stdout is exactly one JSON document (json.loads refuses anything after it)."""
    doc = json.loads(out)
    assert isinstance(doc, dict)
    return doc


def failure(out: str, rc: int) -> dict[str, Any]:
    doc = one_document(out)
    assert doc["ok"] is False and doc["exit"] == rc, doc
    assert doc["problems"] and all(isinstance(p["message"], str) for p in doc["problems"])
    return doc


def proc(*argv: str | bytes, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """A real ``partition`` process (bytes argv passes through as it is).  The timeout only
    turns a hang into a failure; nothing here measures time."""
    cp = subprocess.run(
        [str(PARTITION), *argv], capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    assert b"Traceback" not in cp.stderr, cp.stderr.decode(errors="replace")
    return cp


# -- global options before or after the verb ---------------------------------------


def test_json_after_the_verb_is_the_same_as_before(tree: Path, site: Path) -> None:
    before = proc("--host-root", str(tree), "--json", "plan", str(site))
    after = proc("plan", str(site), "--json", "--host-root", str(tree))
    middle = proc("--json", "plan", "--host-root", str(tree), str(site))
    assert before.returncode == after.returncode == middle.returncode == 0, after.stderr
    assert json.loads(before.stdout) == json.loads(after.stdout) == json.loads(middle.stdout)
    assert "fw0" in json.loads(before.stdout)["partitions"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--state-dir", "{bad}", "status"],
        ["status", "--state-dir", "{bad}"],
        ["--state-dir", "{bad}", "status", "-v"],  # the verb's parser must not reset it
        ["--state-dir", "{bad}", "status", "--json"],
        ["-q", "--state-dir", "{bad}", "status", "-q", "--json"],
    ],
    ids=["before", "after", "before-with-v-after", "before-json-after", "q-both-sides"],
)
def test_state_dir_is_kept_wherever_it_stands(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str]
) -> None:
    bad = tmp_path / "elsewhere"
    bad.mkdir()
    (bad / "state.json").write_text("[1, 2")
    rc, out, err = run(capsys, *(a.replace("{bad}", str(bad)) for a in argv))
    assert rc == 2 and str(bad / "state.json") in err
    if "--json" in argv:
        assert str(bad / "state.json") in failure(out, 2)["problems"][0]["message"]
    else:
        assert out == ""


def test_host_root_given_before_is_not_undone_by_the_verb(
    capsys: pytest.CaptureFixture[str], tree: Path
) -> None:
    rc, out, _ = run(capsys, "--host-root", str(tree), "inspect", "--json", "-v")
    assert rc == 0 and len(one_document(out)["cpus"]) == 8


def test_empty_host_root_is_not_the_live_host(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "--json", "--host-root", "", "inspect")
    assert rc == 2 and "--host-root" in err
    failure(out, 2)


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_help_says_what_it_does_and_lists_the_global_options(
    capsys: pytest.CaptureFixture[str], verb: str
) -> None:
    rc, out, _ = run(capsys, *verb.split(), "--help")
    assert rc == 0
    paragraphs = out.split("\n\n")
    description = paragraphs[1].strip()
    assert description and not description.startswith(("positional", "options")), out
    for option in ("--host-root DIR", "--state-dir DIR", "--json", "-v", "-q"):
        assert option in out, (verb, option)


def test_verb_parser_import_stays_lazy() -> None:
    """A verb named plainly loads its module alone (a no-op apply stays fast)."""
    code = (
        "import sys; from partitioner.cli.main import main;"
        "main(['--state-dir', sys.argv[1], 'status', '--json']);"
        "print(sorted(m for m in sys.modules if m.startswith('partitioner.cli.')))"
    )
    cp = subprocess.run(
        [sys.executable, "-c", code, "/nonexistent-state"], capture_output=True, text=True
    )
    loaded = cp.stdout.strip().splitlines()[-1]
    assert "partitioner.cli.status" in loaded
    assert "partitioner.cli.testbed" not in loaded and "partitioner.cli.apply" not in loaded


def test_verb_module_table_covers_every_verb() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    assert set(sub.choices) == {v.split()[0] for v in VERBS}  # type: ignore[union-attr]
    assert {_MODULE_OF.get(v, v) for v in sub.choices} == set(VERB_MODULES)  # type: ignore[union-attr]


# -- --json: one document, on failure too --------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["frob"],
        ["--frob", "status"],
        ["status", "--frob"],
        [],
        ["validate"],
        ["plan", "a.yaml", "b.yaml"],
        ["stop", "fw0", "--timeout", "soon"],
        ["testbed"],
        ["testbed", "frob"],
        ["--state-dir"],
    ],
    ids=lambda a: " ".join(a) or "nothing",
)
def test_usage_errors_are_exit_2_and_one_document(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == "" and "partition:" in err
    rc, out, err = run(capsys, "--json", *argv)
    assert rc == 2 and "partition:" in err
    failure(out, 2)


def test_usage_error_under_json_through_a_real_process() -> None:
    cp = proc("plan", "--json", "--no-such-option", "x.yaml")
    assert cp.returncode == 2
    assert failure(cp.stdout.decode(), 2)["problems"][0]["message"]
    assert b"usage:" not in cp.stdout


def verb_failures(tmp_path: Path) -> dict[str, tuple[list[str], int]]:
    """A failing command line of every verb, and the exit code cli.md gives it."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\npartitions:\n  Fw0: {cpus: 0, memory: 4GB}\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    return {
        "inspect": (["--host-root", str(tmp_path / "nothing"), "inspect"], 2),
        "snapshot": (["snapshot", str(a_file)], 2),
        "validate": (["validate", str(bad)], 2),
        "plan": (["plan", str(bad)], 2),
        "apply": (["--host-root", str(tmp_path), "apply", str(bad)], 2),
        "apply-dir": (["apply", str(tmp_path)], 2),
        "status": (["status", "nobody"], 2),
        "start": (["start", "nobody"], 2),
        "stop": (["stop", "nobody"], 2),
        "restart": (["restart", "nobody"], 2),
        "destroy": (["destroy"], 2),
        "destroy-dir": (["destroy", str(tmp_path)], 2),
        "console": (["console", "nobody"], 2),
        "testbed run": (["testbed", "run"], 2),
        "testbed snapshot": (["testbed", "snapshot", "no-such-preset", str(tmp_path / "d")], 2),
    }


@pytest.mark.parametrize(
    "case",
    [
        "inspect",
        "snapshot",
        "validate",
        "plan",
        "apply",
        "apply-dir",
        "status",
        "start",
        "stop",
        "restart",
        "destroy",
        "destroy-dir",
        "console",
        "testbed run",
        "testbed snapshot",
    ],
)
def test_every_verb_failure_is_one_json_document(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, case: str
) -> None:
    argv, code = verb_failures(tmp_path)[case]
    rc, out, err = run(capsys, *argv)
    assert rc == code and err and out == ""
    rc, out, err = run(capsys, *argv, "--json")
    assert rc == code and err
    failure(out, code)


def test_manifest_problems_carry_their_location(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\npartitions:\n  Fw0:\n    cpus: 0\n    memory: 4GB\n")
    for verb in ("validate", "plan"):
        rc, out, _ = run(capsys, "--json", verb, str(bad))
        assert rc == 2
        doc = failure(out, 2)
        located = [p for p in doc["problems"] if p.get("line")]
        assert {p["line"] for p in located} >= {3, 5}
        assert all(p["file"] == str(bad) and p["column"] >= 1 for p in located)


def test_a_verb_without_a_report_gives_a_success_document(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc, out, _ = run(capsys, "--json", "destroy", "--all")
    assert rc == 0 and one_document(out) == {"ok": True, "exit": 0, "reconciled": []}


@pytest.fixture
def stopped_partition(tmp_path: Path) -> str:
    from test_state import record

    rec = record("fw0", state=RunState.STOPPED, pid=None, claims=(), hugepages=(), paths={})
    StateStore(tmp_path / "state").save(State().with_partition(rec))
    return "fw0"


def test_stop_of_a_stopped_partition_gives_a_success_document(
    capsys: pytest.CaptureFixture[str], stopped_partition: str
) -> None:
    rc, out, _err = run(capsys, "stop", stopped_partition, "--json")
    assert rc == 0 and "not running" not in out
    assert one_document(out) == {"ok": True, "exit": 0, "reconciled": []}


def test_console_of_a_partition_that_is_not_running_is_exit_3(
    capsys: pytest.CaptureFixture[str], stopped_partition: str
) -> None:
    rc, out, err = run(capsys, "console", stopped_partition)
    assert rc == 3 and out == "" and "start it first" in err
    assert f"partition start {stopped_partition}" in err


def test_console_refuses_json(capsys: pytest.CaptureFixture[str], stopped_partition: str) -> None:
    rc, out, _err = run(capsys, "--json", "console", stopped_partition)
    assert rc == 2 and "interactive" in failure(out, 2)["problems"][0]["message"]


def test_a_held_lock_is_exit_6_naming_the_holder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    store = StateStore(tmp_path / "state")
    with store.lock("apply from the test"):
        rc, out, err = run(capsys, "destroy", "--all", "--lock-timeout", "0", "--json")
    assert rc == 6 and f"pid {os.getpid()} (apply from the test)" in err
    doc = failure(out, 6)
    # pid, verb and since when (cli.md: "it says which (pid, verb, since when)").
    assert doc["holder"].startswith(f"pid {os.getpid()} (apply from the test) since 20")


# -- hostile arguments --------------------------------------------------------------


def test_nul_in_an_argument_is_usage(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for argv in (
        ["validate", "site\0.yaml"],
        ["--state-dir", f"{tmp_path}\0x", "status"],
        ["--host-root", "/\0", "inspect"],
        ["status", "fw\x000"],
    ):
        rc, out, err = run(capsys, *argv)
        assert rc == 2 and "NUL" in err, argv
        rc, out, err = run(capsys, "--json", *argv)
        assert rc == 2 and "NUL" in failure(out, 2)["problems"][0]["message"]


@pytest.mark.parametrize(
    "argv",
    [
        ["validate", "site.yaml\n"],
        ["status", "fw0\n"],
        ["console", "fw0\nfw1"],
        ["stop", "\n"],
        ["destroy", "\n"],
        ["testbed", "run", "--topology", "small\n", "--", "true"],
    ],
    ids=repr,
)
def test_newlines_in_arguments(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    rc, out, _err = run(capsys, "--json", *argv)
    assert rc == 2
    failure(out, 2)


@pytest.mark.parametrize("value", ["nan", "-1", "inf", "1e300", "-inf"])
@pytest.mark.parametrize(
    "argv",
    [
        ["stop", "fw0", "--timeout"],
        ["restart", "fw0", "--timeout"],
        ["destroy", "--all", "--timeout"],
        ["destroy", "--all", "--lock-timeout"],
        ["start", "fw0", "--lock-timeout"],
        ["apply", "site.yaml", "--stop-timeout"],
        ["testbed", "run", "--timeout"],
        ["testbed", "snapshot", "small", "dir", "--timeout"],
    ],
    ids=lambda a: " ".join(a),
)
def test_seconds_that_are_no_deadline(
    capsys: pytest.CaptureFixture[str], argv: list[str], value: str
) -> None:
    """`nan` makes every deadline unreachable: a wait that never ends.  Refused before the
    verb runs (the state lock is not even taken)."""
    extra = ["--", "true"] if argv[:2] == ["testbed", "run"] else []
    rc, out, err = run(capsys, "--json", *argv[:-1], f"{argv[-1]}={value}", *extra)
    assert rc == 2 and "seconds" in err
    failure(out, 2)


LONG = "a" * 100_000


@pytest.mark.parametrize(
    "argv",
    [
        ["validate", LONG],
        ["plan", LONG],
        ["status", LONG],
        ["--state-dir", LONG, "status"],
        ["--state-dir", LONG, "destroy", "--all"],
        ["--host-root", LONG, "inspect"],
        ["--host-root", "/" + "x/" * 50_000, "inspect"],
        ["testbed", "run", "--topology", LONG + ".yaml", "--", "true"],
    ],
    ids=["validate", "plan", "status", "state-dir", "state-dir-destroy", "host-root",
         "host-root-deep", "topology"],
)  # fmt: skip
def test_arguments_of_100000_characters(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    rc, out, err = run(capsys, "--json", *argv)
    assert rc == 2, err[-300:]
    failure(out, 2)


def test_long_argument_through_a_real_process() -> None:
    cp = proc("--json", "validate", LONG)
    assert cp.returncode == 2
    failure(cp.stdout.decode(), 2)


@pytest.fixture
def loop(tmp_path: Path) -> Path:
    link = tmp_path / "loop"
    link.symlink_to(link)
    return link


@pytest.mark.parametrize("kind", ["file", "nothing", "loop", "fifo"])
def test_host_root_that_is_not_a_tree(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, site: Path, kind: str
) -> None:
    where = tmp_path / kind
    if kind == "file":
        where.write_text("not a tree")
    elif kind == "loop":
        where.symlink_to(where)
    elif kind == "fifo":
        os.mkfifo(where)
    for verb in (["inspect"], ["plan", str(site)], ["snapshot", str(tmp_path / "snap")]):
        rc, out, err = run(capsys, "--host-root", str(where), *verb, "--json")
        assert rc == 2, (verb, err)
        assert str(where) in failure(out, 2)["problems"][0]["message"]
    assert not (tmp_path / "snap").exists()


@pytest.mark.parametrize("kind", ["file", "loop", "under-a-file", "not-creatable", "long"])
@pytest.mark.parametrize(
    "verb",
    [["destroy", "--all"], ["stop", "fw0"], ["start", "fw0"], ["restart", "fw0"], ["apply"]],
    ids=lambda v: v[0],
)
def test_state_dir_that_cannot_be_used_by_a_verb_that_changes_the_host(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, site: Path, kind: str, verb: list[str]
) -> None:
    """Refused as exit 2 naming it, before the lock or anything else is touched.  (The
    manifest of apply fits this machine: a defect here would be found at the lock, which
    comes before any change.)"""
    where = {
        "file": tmp_path / "a-file",
        "loop": tmp_path / "loop",
        "under-a-file": tmp_path / "a-file" / "state",
        "not-creatable": Path("/proc/partition-test-state"),
        "long": tmp_path / LONG[:5000],
    }[kind]
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    argv = [*verb, str(site)] if verb == ["apply"] else verb
    rc, out, err = run(capsys, "--state-dir", str(where), *argv, "--json")
    assert rc == 2, err
    assert "state directory" in failure(out, 2)["problems"][0]["message"]
    assert "state directory" in err and str(where)[:100] in err


@pytest.mark.parametrize("kind", ["file", "loop", "under-a-file"])
def test_state_dir_that_cannot_be_read_by_a_read_only_verb(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, kind: str
) -> None:
    where = {
        "file": tmp_path / "a-file",
        "loop": tmp_path / "loop",
        "under-a-file": tmp_path / "a-file" / "state",
    }[kind]
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for verb in (["status"], ["console", "fw0"], ["status", "fw0"]):
        rc, _out, err = run(capsys, "--state-dir", str(where), *verb)
        assert rc == 2 and str(where) in err, (verb, err)


@pytest.mark.parametrize("verb", ["validate", "plan", "apply", "destroy"])
def test_a_directory_as_the_manifest(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, verb: str
) -> None:
    rc, out, err = run(capsys, "--json", verb, str(tmp_path))
    assert rc == 2 and "directory" in err
    assert failure(out, 2)["problems"][0]["file"] == str(tmp_path)


@pytest.mark.parametrize("verb", ["validate", "plan", "apply", "destroy"])
def test_a_fifo_as_the_manifest_does_not_hang(tmp_path: Path, verb: str) -> None:
    """Opening a FIFO for reading waits for a writer: a real process, a real FIFO."""
    fifo = tmp_path / "site.yaml"
    os.mkfifo(fifo)
    cp = proc("--json", verb, str(fifo))
    assert cp.returncode == 2 and b"FIFO" in cp.stderr
    failure(cp.stdout.decode(), 2)


def test_a_pipe_with_a_writer_is_read_as_a_manifest() -> None:
    """Reading pipes stays possible: `partition validate /dev/stdin < site.yaml` in a pipeline."""
    cp = subprocess.run(
        [str(PARTITION), "validate", "/dev/stdin"],
        input=EXAMPLE.read_bytes(),
        capture_output=True,
        timeout=60,
    )
    assert cp.returncode == 0 and b"valid" in cp.stdout, cp.stderr


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_an_endless_device_as_the_manifest_is_read_only_so_far(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    reads: list[int] = []
    real_read = os.read

    def counting_read(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        reads.append(len(data))
        return data

    monkeypatch.setattr(os, "read", counting_read)
    rc, out, err = run(capsys, "--json", "validate", device)
    assert rc == 2 and "larger than" in err
    failure(out, 2)
    assert sum(reads) == MAX_BYTES + 1


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_an_endless_device_through_a_real_process(device: str) -> None:
    cp = proc("plan", device, "--json")
    assert cp.returncode == 2
    failure(cp.stdout.decode(), 2)


@pytest.mark.parametrize("kind", ["fifo", "zero", "not-utf8", "deep", "directory"])
def test_a_hostile_topology_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "topo.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "zero":
        path = Path("/dev/zero")
    elif kind == "not-utf8":
        path.write_bytes(b"name: \xff\xfe\n")
    elif kind == "deep":
        path.write_text("[" * 100_000)
    else:
        path = tmp_path
    cp = proc("--json", "testbed", "snapshot", str(path), str(tmp_path / "snap"))
    assert cp.returncode == 2, cp.stderr
    failure(cp.stdout.decode(), 2)


def test_arguments_that_are_not_utf8() -> None:
    """argv bytes that are not UTF-8 reach Python as surrogates: named back as they were."""
    cp = proc(b"validate", b"\xff\xfe.yaml")
    assert cp.returncode == 2 and b"\xff\xfe.yaml" in cp.stderr
    cp = proc(b"--json", b"validate", b"\xff\xfe.yaml")
    assert cp.returncode == 2
    assert failure(cp.stdout.decode(), 2)["problems"][0]["file"] == "\udcff\udcfe.yaml"
    cp = proc(b"\xff")
    assert cp.returncode == 2
    cp = proc(b"--json", b"status", b"\xff")
    assert cp.returncode == 2
    failure(cp.stdout.decode(), 2)


def test_a_valid_manifest_whose_name_is_not_utf8(tmp_path: Path) -> None:
    """Printed back as the bytes it was, also where stdout is strict UTF-8 (a UTF-8 locale
    other than C.UTF-8, where Python would otherwise fail to print it)."""
    name = os.fsencode(tmp_path) + b"/\xff.yaml"
    with open(name, "wb") as f:
        f.write(EXAMPLE.read_bytes())
    cp = subprocess.run(
        [os.fsencode(PARTITION), b"validate", name],
        capture_output=True,
        timeout=60,
        env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"},
    )
    assert b"Traceback" not in cp.stderr, cp.stderr
    assert cp.returncode == 0 and cp.stdout.startswith(name + b": valid"), cp.stderr


# -- testbed: a busybox that cannot run in an initramfs -------------------------------


def test_elf_interpreter_is_read_from_the_program_headers() -> None:
    assert needs_interpreter(Path(sys.executable).resolve().read_bytes()[: 1 << 20]) is True
    assert needs_interpreter(b"#!/bin/sh\necho hi\n" * 10) is None
    assert needs_interpreter(b"\x7fELF" + b"\0" * 60) is None


def test_the_installed_busybox_is_static() -> None:
    """The machine (scripts/setup) installs busybox-static; the check must accept it."""
    if not Path(initramfs.BUSYBOX).exists():
        pytest.skip("no busybox here")
    assert needs_interpreter(Path(initramfs.BUSYBOX).read_bytes()) is False
    assert static_busybox() == Path(initramfs.BUSYBOX).read_bytes()


def test_a_dynamic_busybox_is_refused_naming_busybox_static() -> None:
    dynamic = Path("/bin/ls")  # linked as Debian's plain busybox is
    with pytest.raises(PreconditionError) as e:
        static_busybox(dynamic)
    assert e.value.exit_code == 3 and "busybox-static" in str(e.value)
    with pytest.raises(PreconditionError, match="busybox-static"):
        static_busybox("/nonexistent/busybox")


@pytest.mark.skipif(os.geteuid() != 0, reason="the test bed needs root before it looks further")
def test_testbed_with_a_dynamic_busybox_is_exit_3_before_booting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(initramfs, "BUSYBOX", "/bin/ls")
    monkeypatch.chdir(ROOT)
    rc, out, err = run(capsys, "testbed", "run", "--", "true")
    assert rc == 3 and "busybox-static" in err
    rc, out, err = run(capsys, "--json", "testbed", "run", "--", "true")
    assert rc == 3 and "busybox-static" in failure(out, 3)["problems"][0]["message"]
