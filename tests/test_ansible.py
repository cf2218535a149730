"""The Ansible collection (ansible/collections/ansible_collections/partition/site).

Three layers, all with ansible-core from PyPI (the dev extra):

- unit tests: each module run in-process (ansible's ``patch_module_args``) against
  the real ``partition`` command on this machine's real /sys and /proc, with
  state, run and log directories of the test's own;
- ``ansible-test sanity`` over the collection (pylint, validate-modules, yamllint,
  ansible-doc, compile, import... every test it has that needs no container);
- a playbook run against localhost (connection local) that applies a TCG site
  for real, is idempotent the second time, and removes it (marker ``qemu``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
COLLECTIONS = REPO / "ansible" / "collections"
COLLECTION = COLLECTIONS / "ansible_collections" / "partition" / "site"
PLAYBOOK = REPO / "ansible" / "playbooks" / "site.yml"
BIN = Path(sys.executable).parent

ansible = pytest.importorskip(
    "ansible", reason="ansible-core is a dev dependency: pip install -e '.[dev]'"
)
sys.path.insert(0, str(COLLECTIONS))

from ansible.module_utils.testing import patch_module_args  # noqa: E402
from ansible_collections.partition.site.plugins.modules import (  # noqa: E402
    partition_facts,
    partition_site,
)


def _partition() -> str:
    exe = BIN / "partition"
    if not exe.exists():
        pytest.skip("the partition command is not installed in this environment")
    return str(exe)


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("STATE", "RUN", "LOG"):
        monkeypatch.setenv(f"PARTITION_{name}_DIR", str(tmp_path / name.lower()))
    return tmp_path


def _site(where: Path, cpus: str = '"1"', memory: str = "64MiB") -> Path:
    path = where / "site.yaml"
    path.write_text(
        "version: 1\n"
        'host: {reserve: {cpus: "0", memory: 256MiB}, accel: tcg, isolation: pinned, smt: share}\n'
        "partitions:\n"
        f"  an1:\n    cpus: {cpus}\n    memory: {memory}\n    hugepages: none\n"
        "    boot: {kernel: /boot/vmlinuz, cmdline: console=ttyS0}\n"
    )
    return path


@pytest.fixture
def result(capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    def run(module: Any, args: dict[str, Any]) -> dict[str, Any]:
        with patch_module_args(args), pytest.raises(SystemExit):
            module.main()
        out = capsys.readouterr().out
        doc: dict[str, Any] = json.loads(out)
        return doc

    yield run


def _needs_two_cpus() -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs: one for the host, one for the partition")


def test_check_mode_plans_and_diff_shows_the_actions(dirs: Path, result: Any) -> None:
    _needs_two_cpus()
    site = _site(dirs)
    doc = result(
        partition_site,
        {
            "site": str(site),
            "executable": _partition(),
            "_ansible_check_mode": True,
            "_ansible_diff": True,
        },
    )
    assert doc["changed"] is True, doc
    kinds = [a["action"] for a in doc["actions"]]
    assert "start" in " ".join(kinds), kinds
    assert doc["plan"]["an1"]["cpus"] == [1]
    assert doc["diff"]["prepared"].startswith("apply would:\n")
    assert "an1" in doc["diff"]["prepared"]
    # Check mode changed nothing: no state record, no QEMU.
    assert not (dirs / "state" / "state.json").exists()


def test_absent_on_a_host_without_the_site_changes_nothing(dirs: Path, result: Any) -> None:
    site = _site(dirs)
    for check in (True, False):
        doc = result(
            partition_site,
            {
                "site": str(site),
                "state": "absent",
                "executable": _partition(),
                "_ansible_check_mode": check,
            },
        )
        assert doc["changed"] is False and doc["actions"] == [], doc


@pytest.mark.parametrize(
    ("change", "rc", "words"),
    [
        ("cpus: nine", 2, "cpus"),  # not valid: cli.md's exit 2
        ("cpus: 64", 3, "CPU"),  # valid, does not fit this host: exit 3
    ],
)
def test_failures_carry_partitions_exit_code_and_message(
    dirs: Path, result: Any, change: str, rc: int, words: str
) -> None:
    site = _site(dirs)
    site.write_text(site.read_text().replace('cpus: "1"', change))
    doc = result(partition_site, {"site": str(site), "executable": _partition()})
    assert doc["failed"] is True and doc["rc"] == rc, doc
    assert words in doc["msg"] and f"exit {rc}" in doc["msg"], doc["msg"]
    assert "Traceback" not in doc["msg"]


def test_a_missing_command_is_a_clear_failure(dirs: Path, result: Any) -> None:
    doc = result(partition_site, {"site": str(_site(dirs)), "executable": "/nonexistent/partition"})
    assert doc["failed"] is True and "partition" in doc["msg"]


def test_facts_are_inspect_json(dirs: Path, result: Any) -> None:
    exe = _partition()
    doc = result(partition_facts, {"executable": exe})
    host = doc["ansible_facts"]["partition_host"]
    direct = json.loads(
        subprocess.run(
            [exe, "--json", "inspect"], capture_output=True, text=True, check=True
        ).stdout
    )
    assert doc["changed"] is False
    assert [c["cpu"] for c in host["cpus"]] == [c["cpu"] for c in direct["cpus"]]
    assert [n["node"] for n in host["numa_nodes"]] == [n["node"] for n in direct["numa_nodes"]]
    assert [f["address"] for f in host["pci"]] == [f["address"] for f in direct["pci"]]


# -- ansible-test sanity ---------------------------------------------------------------


def _ansible_test_home() -> Path:
    """ansible-test keeps its sanity virtual environments under ~/.ansible/test: a home of
    the project's own (in the git-ignored .cache) keeps them between runs, with the offline
    get-pip stand-in where ansible-test looks for its cached download."""
    import ansible_test

    home = REPO / ".cache" / "ansible-test-home"
    reqs = Path(ansible_test.__file__).parent / "_internal" / "python_requirements.py"
    m = re.search(r"pip='([0-9.]+)'", reqs.read_text())
    assert m, f"no pip version in {reqs}"
    cache = home / ".ansible" / "test" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    shutil.copy(
        REPO / "ansible" / "ansible-test" / "get_pip_offline.py",
        cache / f"get_pip_{m[1].replace('.', '_')}.py",
    )
    return home


def test_ansible_test_sanity() -> None:
    if shutil.which("ansible-test", path=str(BIN)) is None:
        pytest.skip("ansible-test is not installed (ansible-core)")
    if shutil.which("git") is None:
        pytest.skip("ansible-test needs git")
    env = {**os.environ, "HOME": str(_ansible_test_home()), "PATH": f"{BIN}:{os.environ['PATH']}"}
    cp = subprocess.run(
        [
            str(BIN / "ansible-test"),
            "sanity",
            "--python",
            f"{sys.version_info[0]}.{sys.version_info[1]}",
            "--color",
            "no",
        ],
        cwd=COLLECTION,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    ran = re.findall(r'Running sanity test "([^"]+)"', cp.stdout + cp.stderr)
    assert cp.returncode == 0, (cp.stdout + cp.stderr)[-6000:]
    for test in ("compile", "import", "pylint", "validate-modules", "yamllint", "ansible-doc"):
        assert test in ran, f"sanity test {test} did not run: {ran}"


# -- a playbook, for real ----------------------------------------------------------------


def _recap(out: str) -> dict[str, int]:
    m = re.search(r"^localhost\s*:\s*(.*)$", out, re.M)
    assert m, out
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m[1])}


@pytest.mark.qemu
def test_playbook_applies_idempotently_and_removes(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CPU affinity, hugepage pools)")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    _needs_two_cpus()
    from guestimage import build_guest_initramfs, guest_kernel

    kernel, initrd = guest_kernel(), build_guest_initramfs(tmp_path / "img")
    site = tmp_path / "site.yaml"
    site.write_text(
        "version: 1\n"
        'host: {reserve: {cpus: "0", memory: 1GiB}, accel: tcg, isolation: pinned, smt: share}\n'
        "partitions:\n  pb1:\n"
        '    cpus: "1"\n    memory: 128MiB\n    hugepages: none\n'
        f"    boot: {{kernel: {kernel}, initrd: {initrd}, cmdline: console=ttyS0 quiet panic=-1}}\n"
    )
    env = {
        **os.environ,
        "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-local"),
        "ANSIBLE_REMOTE_TEMP": str(tmp_path / "ansible-remote"),
        "PARTITION_STATE_DIR": str(tmp_path / "state"),
        "PARTITION_RUN_DIR": str(tmp_path / "run"),
        "PARTITION_LOG_DIR": str(tmp_path / "log"),
    }

    def play(state: str, *extra: str) -> tuple[dict[str, int], str]:
        cp = subprocess.run(
            [
                str(BIN / "ansible-playbook"),
                "-i", "localhost,", "-c", "local",
                "-e", f"target=localhost site={site} state={state}",
                "-e", f"partition_executable={BIN / 'partition'}",
                "-e", f"ansible_python_interpreter={sys.executable}",
                *extra,
                str(PLAYBOOK),
            ],
            env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert cp.returncode == 0, cp.stdout[-4000:] + cp.stderr[-2000:]
        return _recap(cp.stdout), cp.stdout

    def status() -> dict[str, Any]:
        cp = subprocess.run(
            [str(BIN / "partition"), "--json", "status"], env=env, capture_output=True, text=True
        )
        assert cp.returncode == 0, cp.stderr
        doc: dict[str, Any] = json.loads(cp.stdout)["partitions"]
        return doc

    try:
        recap, out = play("present", "--check", "--diff")
        assert recap["changed"] == 1 and "apply would:" in out, out
        assert status() == {}, "check mode started something"
        recap, _ = play("present")
        assert recap["changed"] == 1 and recap["failed"] == 0
        st = status()["pb1"]
        assert st["state"] == "running" and st["cpus"] == [1]
        recap, _ = play("present")
        assert recap["changed"] == 0 and recap["failed"] == 0, "not idempotent"
        recap, out = play("absent", "--check", "--diff")
        assert recap["changed"] == 1 and "destroy would:" in out
        assert status()["pb1"]["state"] == "running"
        recap, _ = play("absent")
        assert recap["changed"] == 1
        assert "pb1" not in status()
        # absent on a host without the site is no change: test_absent_on_a_host_without_...
    finally:
        if (tmp_path / "state" / "state.json").exists():
            subprocess.run(
                [str(BIN / "partition"), "destroy", "--all", "--timeout", "5"],
                env=env,
                capture_output=True,
            )
