"""What users install is what is tested: the wheel that ``pip install .`` builds.

The wheel is built once per run from a copy of the source tree as a fresh clone has
it (no ``build/`` or ``*.egg-info`` left by an earlier build to fill gaps), with the
setuptools of the lock and no network.  It must hold every file of the tree's
packages, byte for byte; the ``partition`` it installs into a fresh virtual
environment (which cannot see this tree) must answer every verb's ``--help``, import
every module, ``validate`` and ``plan`` the examples as the tree does, and ``apply``
and ``destroy`` a site under TCG.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from guestimage import build_guest_initramfs, guest_kernel
from procs import qemus_naming

from partitioner.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
TESTBED_NUMA = ROOT / "tests" / "fixtures" / "hosts" / "testbed-numa"
# What a clone does not have: left by tools, never part of the product.
NOT_IN_A_CLONE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".*_cache", ".cache"
)


# -- the check -----------------------------------------------------------------------------


def product_packages(tree: Path) -> list[str]:
    """The top-level Python packages of the source tree: its directories with an __init__.py
    (tests/, bench/ and scripts/ have none)."""
    return sorted(d.name for d in tree.iterdir() if (d / "__init__.py").is_file())


def product_files(tree: Path) -> dict[str, Path]:
    """Every file of the tree's packages (links followed, as the wheel carries what they
    point to), by its path in the wheel."""
    files: dict[str, Path] = {}
    for package in product_packages(tree):
        for dirpath, dirnames, filenames in os.walk(tree / package, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in filenames:
                if name.endswith(".pyc"):
                    continue
                path = Path(dirpath, name)
                files[path.relative_to(tree).as_posix()] = path
    return files


def wheel_problems(tree: Path, wheel: Path) -> list[str]:
    """What the wheel lacks of the source tree: each file of its packages missing or
    different, and the ``partition`` command.  Empty when the wheel is complete."""
    problems: list[str] = []
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for name, path in sorted(product_files(tree).items()):
            if name not in names:
                problems.append(f"{name} is not in the wheel")
            elif z.read(name) != path.read_bytes():
                problems.append(f"{name} in the wheel differs from the tree's")
        entry_points = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        text = z.read(entry_points[0]).decode() if entry_points else ""
        if not re.search(r"^partition = partitioner\.cli\.main:main$", text, re.M):
            problems.append("the wheel installs no `partition` command (entry_points.txt)")
    return problems


# -- building and installing -----------------------------------------------------------------


def clone_of_the_tree(dest: Path) -> Path:
    shutil.copytree(ROOT, dest, symlinks=True, ignore=NOT_IN_A_CLONE)
    return dest


def build_wheel(tree: Path, out: Path) -> Path:
    """``pip wheel`` of ``tree`` with this environment's setuptools (the lock's version)."""
    cp = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"),
            *("--no-index", "--disable-pip-version-check", "-q", "-w", str(out), str(tree)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cp.returncode == 0, f"building the wheel failed:\n{cp.stdout}{cp.stderr}"
    (wheel,) = out.glob("partition-*.whl")
    return wheel


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    return build_wheel(clone_of_the_tree(base / "tree"), base / "dist")


@dataclass(frozen=True)
class Installed:
    """A fresh virtual environment holding the wheel and its dependencies, nothing else."""

    venv: Path
    cwd: Path

    @property
    def partition(self) -> Path:
        return self.venv / "bin" / "partition"

    @property
    def env(self) -> dict[str, str]:
        # Nothing that would lead its Python to this tree or to the operator's settings.
        return {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PYTHON", "PARTITION_", "VIRTUAL_ENV"))
        }

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.partition), *args],
            env={**self.env, **(env or {})},
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="session")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("installed")
    venv = base / "venv"
    # No pip of its own (ensurepip costs seconds): this environment's pip installs into it.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    cp = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install"),
            *("--disable-pip-version-check", "-q", "-c", str(ROOT / "constraints.txt"), str(wheel)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cp.returncode == 0, f"installing the wheel failed:\n{cp.stdout}{cp.stderr}"
    cwd = base / "elsewhere"
    cwd.mkdir()
    return Installed(venv, cwd)


def tree_partition(*args: str) -> subprocess.CompletedProcess[str]:
    """The same command from the source tree (the editable install the other tests use)."""
    return subprocess.run(
        [sys.executable, "-m", "partitioner.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


# -- the wheel holds the tree ------------------------------------------------------------------


def test_the_wheel_holds_every_module_and_data_file_of_the_tree(wheel: Path) -> None:
    files = product_files(ROOT)
    # Not a check of nothing: the packages, their subpackages and the data files read
    # at run time are among what is compared.
    assert "partitioner" in product_packages(ROOT)
    for name in (
        "partitioner/cli/main.py",
        "partitioner/isolation/__init__.py",
        "partitioner/site.schema.json",
        "partitioner/testbed/presets/numa.yaml",
    ):
        assert name in files
    problems = wheel_problems(ROOT, wheel)
    assert problems == [], "; ".join(problems) + ": see [tool.setuptools] in pyproject.toml"


def _without(wheel: Path, dest: Path, *left_out: str) -> Path:
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(dest, "w") as out:
        for item in src.infolist():
            if item.filename not in left_out:
                out.writestr(item, src.read(item))
    return dest


def test_a_module_or_data_file_left_out_of_the_wheel_is_named(wheel: Path, tmp_path: Path) -> None:
    short = _without(
        wheel,
        tmp_path / wheel.name,
        "partitioner/isolation/__init__.py",
        "partitioner/testbed/presets/small.yaml",
    )
    assert wheel_problems(ROOT, short) == [
        "partitioner/isolation/__init__.py is not in the wheel",
        "partitioner/testbed/presets/small.yaml is not in the wheel",
    ]


def test_a_hand_written_package_list_that_forgets_one_fails_the_check(tmp_path: Path) -> None:
    """The way the wheel once lost ``partitioner.isolation``: a list of packages by hand."""
    tree = clone_of_the_tree(tmp_path / "tree")
    pyproject = tree / "pyproject.toml"
    text = pyproject.read_text()
    found = re.search(r"^\[tool\.setuptools\.packages\.find\]\n(?:[^\[\n].*\n)*", text, re.M)
    assert found, "pyproject.toml finds its packages with [tool.setuptools.packages.find]"
    listed = [p for p in sorted(product_files(tree)) if p.endswith("/__init__.py")]
    by_hand = [
        p.removesuffix("/__init__.py").replace("/", ".")
        for p in listed
        if not p.startswith("partitioner/isolation/")
    ]
    pyproject.write_text(
        text.replace(found.group(0), f"[tool.setuptools]\npackages = {json.dumps(by_hand)}\n\n")
    )
    problems = wheel_problems(tree, build_wheel(tree, tmp_path / "dist"))
    isolation = sorted(p for p in product_files(tree) if p.startswith("partitioner/isolation/"))
    assert problems == [f"{p} is not in the wheel" for p in isolation]


# -- the installed package works -------------------------------------------------------------


def _verbs(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield " ".join((*prefix, name))
                yield from _verbs(sub, (*prefix, name))


def test_every_verb_of_the_installed_partition_answers_help(installed: Installed) -> None:
    verbs = list(_verbs(build_parser()))
    assert {"plan", "apply", "host setup", "testbed run"} <= set(verbs)
    top = installed.run("--help")
    assert top.returncode == 0, top.stderr
    for verb in verbs:
        cp = installed.run(*verb.split(), "--help")
        assert cp.returncode == 0, f"partition {verb} --help: exit {cp.returncode}\n{cp.stderr}"
        assert cp.stdout.startswith(f"usage: partition {verb}"), cp.stdout[:200]


def test_every_module_of_the_installed_package_imports_from_the_environment(
    installed: Installed,
) -> None:
    script = (
        "import importlib, json, pkgutil, sys\n"
        "out = {}\n"
        "for top in sys.argv[1:]:\n"
        "    pkg = importlib.import_module(top)\n"
        "    out[top] = pkg.__file__\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, top + '.'):\n"
        "        out[m.name] = importlib.import_module(m.name).__file__\n"
        "print(json.dumps(out))\n"
    )
    packages = product_packages(ROOT)
    cp = subprocess.run(
        [str(installed.venv / "bin" / "python"), "-c", script, *packages],
        env=installed.env,
        cwd=installed.cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cp.returncode == 0, cp.stderr
    modules: dict[str, str] = json.loads(cp.stdout)
    expected = {
        name.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for name in product_files(ROOT)
        if name.endswith(".py")
    }
    assert set(modules) == expected
    outside = {m: f for m, f in modules.items() if not f.startswith(str(installed.venv) + "/")}
    assert outside == {}, "imported from outside the installed environment"


def test_the_installed_partition_validates_and_plans_the_examples_as_the_tree_does(
    installed: Installed,
) -> None:
    examples = sorted((ROOT / "partitions").glob("*.yaml"))
    assert examples
    for example in examples:
        cp = installed.run("validate", str(example))
        assert cp.returncode == 0, f"{example.name}: {cp.stderr}"
    demo = ROOT / "partitions" / "demo.yaml"
    args = ("--json", "--host-root", str(TESTBED_NUMA), "plan", str(demo))
    mine, tree = installed.run(*args), tree_partition(*args)
    assert mine.returncode == 0, mine.stderr
    assert mine.stdout == tree.stdout
    assert set(json.loads(mine.stdout)["partitions"]) == {"fw0", "lan0"}
    text = installed.run("--host-root", str(TESTBED_NUMA), "plan", str(demo))
    assert text.returncode == 0, text.stderr
    assert "0000:81:00.0" in text.stdout
    # A manifest error is reported from the installed schema, with where it is.
    bad = installed.cwd / "bad.yaml"
    bad.write_text("version: 1\nhost:\n  smt: sometimes\n")
    cp = installed.run("validate", str(bad))
    assert cp.returncode == 2
    assert f"{bad}:3:" in cp.stderr


def _qemus_under(run_dir: Path) -> list[int]:
    return qemus_naming(run_dir)


@pytest.mark.qemu
def test_the_installed_partition_applies_and_destroys_a_tcg_site(
    installed: Installed, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CPU affinity)")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs: one for the host, one for the partition")
    kernel, initrd = guest_kernel(), build_guest_initramfs(tmp_path / "img")
    env = {
        "PARTITION_STATE_DIR": str(tmp_path / "state"),
        "PARTITION_RUN_DIR": str(tmp_path / "run"),
        "PARTITION_LOG_DIR": str(tmp_path / "log"),
    }
    site = tmp_path / "site.yaml"
    # isolation: pinned: this machine's other processes are its operator's, not ours.
    site.write_text(
        'version: 1\nhost:\n  reserve:\n    cpus: "0"\n    memory: 1GiB\n  accel: tcg\n'
        "  isolation: pinned\npartitions:\n  p1:\n"
        '    cpus: "1"\n    memory: 128MiB\n    hugepages: none\n'
        f"    boot:\n      kernel: {kernel}\n      initrd: {initrd}\n"
        "      cmdline: console=ttyS0 quiet panic=-1\n"
    )
    try:
        cp = installed.run("apply", str(site), env=env, timeout=300)
        assert cp.returncode == 0, cp.stderr
        status = installed.run("--json", "status", env=env)
        assert status.returncode == 0, status.stderr
        p1 = json.loads(status.stdout)["partitions"]["p1"]
        assert p1["state"] == "running" and p1["cpus"] == [1]
        assert _qemus_under(tmp_path / "run") == [p1["pid"]]
        cp = installed.run("destroy", str(site), "--timeout", "5", env=env, timeout=300)
        assert cp.returncode == 0, cp.stderr
        deadline = time.monotonic() + 10
        while _qemus_under(tmp_path / "run") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _qemus_under(tmp_path / "run") == []
        after = installed.run("--json", "status", env=env)
        assert json.loads(after.stdout)["partitions"] == {}
    finally:
        for pid in _qemus_under(tmp_path / "run"):
            os.kill(pid, signal.SIGKILL)
