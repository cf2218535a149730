"""State records of any shape, read by every verb: exit 2 naming the file, never a traceback.

Each bad record is written where ``PARTITION_STATE_DIR`` points and every verb
that reads the record (``status``, ``plan``, ``apply --dry-run``, ``destroy
--all``, ``start``, ``stop``) is run against it as a separate process, as a user
would.  A lock held by another command is exit 6 naming the holder.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_state import a_state

from partitioner.cli.main import main
from partitioner.record.codec import state_to_json
from partitioner.record.store import StateStore

REPO = Path(__file__).resolve().parent.parent


def _good() -> dict[str, Any]:
    doc: dict[str, Any] = state_to_json(a_state())
    return doc


def _mutate(change: Callable[[dict[str, Any]], object]) -> bytes:
    doc = _good()
    change(doc)
    return json.dumps(doc).encode()


def _fw0(doc: dict[str, Any]) -> dict[str, Any]:
    part: dict[str, Any] = doc["partitions"]["fw0"]
    return part


BAD: dict[str, bytes] = {
    "empty file": b"",
    "garbage": b"\xff\xfe\x00 not json at all",
    "truncated": json.dumps(_good()).encode()[:300],
    "deep nesting": b"[" * 200_000 + b"]" * 200_000,
    "deep nesting in a partition": _mutate(
        lambda d: d["partitions"].__setitem__("fw0", json.loads("[" * 900 + "]" * 900))
    ),
    "a list for the record": b"[]",
    "a number for the record": b"42",
    "no version": _mutate(lambda d: d.pop("version")),
    "a list of partitions": _mutate(lambda d: d.__setitem__("partitions", [1, 2])),
    "a partition that is a list": _mutate(lambda d: d["partitions"].__setitem__("fw0", [])),
    "a partition with no state": _mutate(lambda d: _fw0(d).pop("state")),
    "a partition with no placement": _mutate(lambda d: _fw0(d).pop("placement")),
    "an unknown run state": _mutate(lambda d: _fw0(d).__setitem__("state", "dancing")),
    "cpus as a string": _mutate(lambda d: _fw0(d)["placement"].__setitem__("cpus", "1-3")),
    "a negative CPU": _mutate(lambda d: _fw0(d)["placement"].__setitem__("cpus", [-1])),
    "a CPU that is a float": _mutate(lambda d: _fw0(d)["placement"].__setitem__("cpus", [1.5])),
    "a pid that is text": _mutate(lambda d: _fw0(d).__setitem__("pid", "4242; rm -rf /")),
    "a negative pid": _mutate(lambda d: _fw0(d).__setitem__("pid", -1)),
    "negative hugepages": _mutate(
        lambda d: _fw0(d).__setitem__(
            "hugepages", [{"node": 0, "size_bytes": 2097152, "pages": -5}]
        )
    ),
    "a hugepage grant that is a string": _mutate(lambda d: _fw0(d).__setitem__("hugepages", "x")),
    "a hugepage intent with an unknown op": _mutate(
        lambda d: _fw0(d).__setitem__(
            "pool_intents",
            [{"node": 0, "size_bytes": 2097152, "op": "steal", "before": 0, "target": 9}],
        )
    ),
    "a claim with no group": _mutate(lambda d: _fw0(d)["claims"][0].pop("group")),
    "a claim of a bad PCI address": _mutate(
        lambda d: _fw0(d)["claims"][0]["functions"][0].__setitem__("address", "../../x")
    ),
    "a run directory outside its partition": _mutate(
        lambda d: _fw0(d).__setitem__("paths", {"dir": "/etc", "pidfile": "/etc/qemu.pid"})
    ),
    "a pidfile outside the run directory": _mutate(
        lambda d: _fw0(d).__setitem__(
            "paths", {"dir": "/run/partition/fw0", "pidfile": "/var/run/sshd.pid"}
        )
    ),
    "a partition name that climbs": _mutate(
        lambda d: d["partitions"].__setitem__("../../etc", d["partitions"].pop("fw0"))
    ),
    "a site that is a list": _mutate(lambda d: d.__setitem__("site", [1])),
    "a site with a negative memory": _mutate(
        lambda d: d["site"].__setitem__("host_memory_bytes", -1)
    ),
    "vcpu threads as a list": _mutate(lambda d: _fw0(d).__setitem__("vcpu_threads", [1, 2])),
}

VERBS: dict[str, list[str]] = {
    "status": ["status"],
    "status-json": ["--json", "status"],
    "plan": ["plan", "{manifest}"],
    "apply-dry-run": ["apply", "--dry-run", "{manifest}"],
    "destroy": ["destroy", "--all", "--lock-timeout", "5"],
    "start": ["start", "fw0", "--lock-timeout", "5"],
    "stop": ["stop", "fw0", "--lock-timeout", "5"],
}


def _partition(state_dir: Path, manifest: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``partition ARGS`` with its own state, run and log directories, as a user runs it.

    In this process (``main`` is the whole command line: parsing, the verb, the exit
    code and the message): two hundred runs as separate processes would cost minutes.
    """
    argv = [a.replace("{manifest}", str(manifest)) for a in args]
    env = {
        "PARTITION_STATE_DIR": str(state_dir),
        "PARTITION_RUN_DIR": str(state_dir.parent / "run"),
        "PARTITION_LOG_DIR": str(state_dir.parent / "log"),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 2
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def test_one_bad_record_as_a_separate_process(tmp_path: Path, manifest: Path) -> None:
    # The in-process runs above stand for this: the same answer from a real process.
    (tmp_path / "state").mkdir()
    record = tmp_path / "state" / "state.json"
    record.write_bytes(BAD["a list for the record"])
    env = {**os.environ, "PARTITION_STATE_DIR": str(tmp_path / "state")}
    cp = subprocess.run(
        [sys.executable, "-m", "partitioner.cli.main", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    _assert_refused(cp, record)


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\0" * 64)
    m = tmp_path / "site.yaml"
    m.write_text(
        'version: 1\nhost:\n  reserve: {cpus: "0", memory: 256MiB}\n  accel: tcg\n'
        '  isolation: pinned\npartitions:\n  fw0:\n    cpus: "1"\n    memory: 64MiB\n'
        f"    boot: {{kernel: {kernel}}}\n"
    )
    return m


def _assert_refused(cp: subprocess.CompletedProcess[str], named: Path, code: int = 2) -> None:
    assert cp.returncode == code, (cp.returncode, cp.stdout, cp.stderr)
    assert "Traceback" not in cp.stderr and "unexpected failure" not in cp.stderr, cp.stderr
    assert str(named) in cp.stderr, cp.stderr


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_record_is_exit_2_naming_it_for_every_verb(
    case: str, tmp_path: Path, manifest: Path
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    record = state_dir / "state.json"
    record.write_bytes(BAD[case])
    for verb, args in VERBS.items():
        cp = _partition(state_dir, manifest, *args)
        _assert_refused(cp, record)
        # It says what to do, and the record is left as it was for the operator to look at.
        assert "move" in cp.stderr and "aside" in cp.stderr, (verb, cp.stderr)
        assert record.read_bytes() == BAD[case], verb
        if "--json" in args:
            # One JSON document on stdout, on failure too (cli.md).
            doc = json.loads(cp.stdout)
            assert (doc["ok"], doc["exit"]) == (False, 2), doc


def test_the_good_record_these_are_made_from_is_read(tmp_path: Path) -> None:
    # Every case above is one change away from this record, which loads: so each
    # refusal is the change's doing.
    store = StateStore(tmp_path)
    (tmp_path / "state.json").write_text(json.dumps(_good()))
    assert store.load() == a_state()


def test_a_state_record_that_is_a_directory_or_unreadable(tmp_path: Path, manifest: Path) -> None:
    state_dir = tmp_path / "state"
    (state_dir / "state.json").mkdir(parents=True)
    for args in VERBS.values():
        _assert_refused(_partition(state_dir, manifest, *args), state_dir / "state.json")


def test_a_state_directory_that_is_a_file(tmp_path: Path, manifest: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.write_text("not a directory")
    for verb, args in VERBS.items():
        cp = _partition(state_dir, manifest, *args)
        assert cp.returncode == 2, (verb, cp.stderr)
        assert "Traceback" not in cp.stderr
        assert str(state_dir) in cp.stderr, (verb, cp.stderr)


def test_a_held_lock_is_exit_6_naming_pid_verb_and_since(tmp_path: Path, manifest: Path) -> None:
    state_dir = tmp_path / "state"
    store = StateStore(state_dir)
    with store.lock("apply from the test"):
        for args in (
            ["destroy", "--all", "--lock-timeout", "0.2"],
            ["start", "fw0", "--lock-timeout", "0.2"],
            ["apply", "--lock-timeout", "0.2", "{manifest}"],
        ):
            cp = _partition(state_dir, manifest, *args)
            assert cp.returncode == 6, cp.stderr
            assert f"pid {os.getpid()} (apply from the test) since 20" in cp.stderr, cp.stderr


def test_start_or_stop_of_a_name_not_in_the_record_is_exit_2(
    tmp_path: Path, manifest: Path
) -> None:
    state_dir = tmp_path / "state"
    for args in (["start", "nosuch"], ["stop", "nosuch"], ["restart", "nosuch"]):
        cp = _partition(state_dir, manifest, *args)
        assert cp.returncode == 2, cp.stderr
        assert "no partition nosuch has been applied here" in cp.stderr
        assert "Traceback" not in cp.stderr


def test_a_state_record_that_is_a_link_to_nothing(tmp_path: Path, manifest: Path) -> None:
    # The record on a filesystem that is not mounted: not "no partitions", which would
    # let apply claim again what runs.
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    record = state_dir / "state.json"
    record.symlink_to(tmp_path / "unmounted" / "state.json")
    for verb, args in VERBS.items():
        cp = _partition(state_dir, manifest, *args)
        _assert_refused(cp, record)
        assert "does not exist" in cp.stderr, (verb, cp.stderr)
    assert record.is_symlink() and not (tmp_path / "unmounted").exists()
