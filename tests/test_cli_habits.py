"""The command line's habits (docs/cli.md, "Habits"): a misspelled verb answered with the
nearest one, ``-`` for a manifest on standard input, what ``-v`` and ``-q`` change, notes on
stderr, and ``"ok": true, "exit": 0`` in every success document."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_cli_args import own_dirs, run  # noqa: F401  (own_dirs: an autouse fixture)
from test_hostboot import snapshot_tree, target_root

ROOT = Path(__file__).resolve().parents[1]
PARTITION = Path(sys.executable).parent / "partition"
FIXTURE = ROOT / "tests" / "fixtures" / "hosts" / "testbed-numa"
DEMO = ROOT / "partitions" / "demo.yaml"
# A manifest whose one problem is at line 3, column 15.
BAD = "version: 1\npartitions:\n  fw0: {cpus: 0, memory: 1GiB}\n"


def stdin_of(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    """Standard input holding ``text``, as a pipe gives it (bytes under a text stream)."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))


# -- a misspelled verb ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "nearest"),
    [
        (["plna", "site.yaml"], "plan"),
        (["inpsect"], "inspect"),
        (["valdiate", "x"], "validate"),
        (["host", "chek"], "check"),
        (["testbed", "snapshto"], "snapshot"),
    ],
)
def test_a_misspelled_verb_names_the_nearest(
    capsys: pytest.CaptureFixture[str], argv: list[str], nearest: str
) -> None:
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    assert f"unknown verb {argv[-1] if argv[0] in ('host', 'testbed') else argv[0]!r}" in err
    assert f"did you mean {nearest}" in err
    rc, out, _ = run(capsys, "--json", *argv)
    doc = json.loads(out)
    assert rc == 2 and doc["ok"] is False and doc["exit"] == 2
    assert f"did you mean {nearest}" in doc["problems"][0]["message"]


def test_a_word_that_is_no_verb_lists_the_verbs(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "xyzzy")
    assert rc == 2 and "did you mean" not in err
    assert "unknown verb 'xyzzy'" in err and "inspect, snapshot, validate, plan" in err


# -- `-` reads the manifest from standard input ----------------------------------------------


def test_plan_and_validate_read_standard_input_in_a_real_process(tmp_path: Path) -> None:
    """Through a pipe into a real ``partition``: the same plan as from the file."""
    from_file = subprocess.run(
        [str(PARTITION), "--host-root", str(FIXTURE), "--json", "plan", str(DEMO)],
        capture_output=True,
        check=False,
    )
    from_stdin = subprocess.run(
        [str(PARTITION), "--host-root", str(FIXTURE), "--json", "plan", "-"],
        input=DEMO.read_bytes(),
        capture_output=True,
        check=False,
    )
    assert from_file.returncode == from_stdin.returncode == 0, from_stdin.stderr
    piped, filed = (json.loads(r.stdout)["partitions"] for r in (from_stdin, from_file))
    # The placements are the same; the spec each carries says where it was read from.
    for name in filed:
        assert piped[name].pop("spec")["where"][0] == "<stdin>"
        assert filed[name].pop("spec")["where"][0] == str(DEMO)
    assert piped == filed
    bad = subprocess.run(
        [str(PARTITION), "validate", "-"], input=BAD.encode(), capture_output=True, check=False
    )
    assert bad.returncode == 2 and b"<stdin>:3:15: partitions.fw0.cpus" in bad.stderr


# Every verb that takes a manifest FILE, each given `-` and a manifest with one problem.
FILE_VERBS: dict[str, list[str]] = {
    "validate": ["validate", "-"],
    "plan": ["--host-root", str(FIXTURE), "plan", "-"],
    "apply": ["apply", "-", "--dry-run"],
    "destroy": ["destroy", "-", "--dry-run"],
    "export": ["--host-root", str(FIXTURE), "export", "-", "--format", "libvirt"],
    "host check": ["--host-root", str(FIXTURE), "host", "check", "-", "--no-probe"],
    "host setup": ["--host-root", str(FIXTURE), "host", "setup", "-", "--dry-run"],
    "host boot": ["host", "boot", "-", "--no-supervise"],
}


@pytest.mark.parametrize("verb", sorted(FILE_VERBS))
def test_every_verb_taking_a_manifest_reads_dash_as_standard_input(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, verb: str
) -> None:
    stdin_of(monkeypatch, BAD)
    rc, out, err = run(capsys, *FILE_VERBS[verb])
    assert rc == 2 and out == ""
    assert "<stdin>:3:15: partitions.fw0.cpus" in err
    stdin_of(monkeypatch, BAD)
    rc, out, _ = run(capsys, "--json", *FILE_VERBS[verb])
    problem = json.loads(out)["problems"][0]
    assert rc == 2 and (problem["file"], problem["line"], problem["column"]) == ("<stdin>", 3, 15)


def test_closed_standard_input_is_a_manifest_problem(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", None)
    rc, _, err = run(capsys, "validate", "-")
    assert rc == 2 and "<stdin>:0:0: cannot read the manifest: standard input is closed" in err


def test_host_setup_from_standard_input_copies_what_it_read(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``host setup`` reads the manifest twice (to plan it, to copy it into the machine):
    standard input, read once, gives the same text both times."""
    t = snapshot_tree(tmp_path)
    target = target_root(tmp_path)
    stdin_of(monkeypatch, DEMO.read_text())
    rc, out, err = run(
        capsys, "--host-root", str(t.root), "host", "setup", "-", "--root", str(target)
    )
    assert rc == 0, err
    assert (target / "etc/partition/site.yaml").read_text() == DEMO.read_text()
    assert "partition host check /etc/partition/site.yaml" in out


# -- what -v and -q change; notes go to stderr -----------------------------------------------


def test_plan_notes_go_to_stderr_and_q_silences_them(capsys: pytest.CaptureFixture[str]) -> None:
    """The demo on the fixture has notes (a function added with its slot, files not checked
    on this machine): on stderr, never in the report on stdout; -q drops them."""
    rc, out, err = run(capsys, "--host-root", str(FIXTURE), "plan", str(DEMO))
    assert rc == 0 and "note" not in out
    assert "partition: note: lan0: 0000:42:00.1 (8086:10d3) added" in err
    assert "host facts from" not in err
    rc, quiet_out, quiet_err = run(capsys, "--host-root", str(FIXTURE), "plan", str(DEMO), "-q")
    assert rc == 0 and quiet_out == out and quiet_err == ""


def test_v_says_where_the_facts_come_from(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "-v", "--host-root", str(FIXTURE), "inspect")
    assert rc == 0
    assert f"partition: host facts from the host tree {FIXTURE} (--host-root)" in err
    rc, plain_out, plain_err = run(capsys, "--host-root", str(FIXTURE), "inspect")
    assert plain_out == out and "host facts" not in plain_err
    # -v and -q add up: -v -q is the default.
    rc, _, err = run(capsys, "-v", "--host-root", str(FIXTURE), "inspect", "-q")
    assert err == plain_err


def test_inspect_notes_go_to_stderr(capsys: pytest.CaptureFixture[str], hwloc_trees: Any) -> None:
    """A corpus tree with a note (its NUMA distances are odd): on stderr, not in the table."""
    root = hwloc_trees["16amd64-4n4c-cgroup-distance-merge"]
    rc, out, err = run(capsys, "--host-root", str(root), "inspect")
    assert rc == 0 and "note:" not in out
    assert "partition: note: " in err
    rc, _, err = run(capsys, "--host-root", str(root), "inspect", "-q")
    assert rc == 0 and err == ""


# -- "ok": true, "exit": 0 in every success document -----------------------------------------


def _head(doc: dict[str, Any]) -> tuple[Any, Any]:
    return doc.get("ok"), doc.get("exit")


def test_every_success_document_says_ok_and_exit(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(DEMO.read_text())
    host = ("--host-root", str(FIXTURE))
    cases = {
        "inspect": [*host, "inspect"],
        "plan": [*host, "plan", str(site)],
        "export": [*host, "export", str(site), "--format", "libvirt"],
        "snapshot": [*host, "snapshot", str(tmp_path / "snap")],
        "status": ["status"],
        "validate": ["validate", str(site)],
        "destroy": ["destroy", "--all"],
        "apply --dry-run": ["apply", str(tmp_path / "empty.yaml"), "--dry-run"],
    }
    (tmp_path / "empty.yaml").write_text("version: 1\nhost: {accel: tcg}\npartitions: {}\n")
    for name, argv in cases.items():
        rc, out, err = run(capsys, "--json", *argv)
        assert rc == 0, (name, err)
        doc = json.loads(out)
        assert _head(doc) == (True, 0), (name, doc)
        assert list(doc)[:2] == ["ok", "exit"], name
