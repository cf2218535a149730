"""The lock (constraints.txt) that tests and CI install from agrees with pyproject.toml."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def _pins(text: str) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version and " " not in line, (
            f"constraints.txt:{n}: {raw!r} is not NAME==VERSION: the lock holds exact versions"
        )
        key = canonicalize_name(name)
        assert key not in pins, f"constraints.txt:{n}: {name} is pinned twice"
        pins[key] = Version(version)
    return pins


def _requirements(pyproject: dict[str, object]) -> list[Requirement]:
    project = pyproject["project"]
    assert isinstance(project, dict)
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project.get("optional-dependencies", {}).values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def disagreements(pyproject: dict[str, object], lock: str) -> list[str]:
    pins = _pins(lock)
    out = []
    for req in _requirements(pyproject):
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None:
            out.append(f"{req.name} is in pyproject.toml but not in constraints.txt")
        elif not req.specifier.contains(pinned, prereleases=True):
            out.append(f"constraints.txt pins {req.name}=={pinned}, outside {req}")
    return out


def test_the_lock_pins_every_dependency_within_pyprojects_ranges() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    problems = disagreements(pyproject, (ROOT / "constraints.txt").read_text())
    assert problems == [], "; ".join(problems) + ": run scripts/lock"


@pytest.mark.parametrize(
    ("lock", "problem"),
    [
        ("pyyaml==6.0.4\n", "jsonschema is in pyproject.toml but not in constraints.txt"),
        ("pyyaml==5.4\njsonschema==4.20\n", "constraints.txt pins pyyaml==5.4, outside pyyaml>=6"),
    ],
)
def test_a_lock_that_disagrees_is_named(lock: str, problem: str) -> None:
    pyproject = {"project": {"dependencies": ["pyyaml>=6", "jsonschema>=4.18"]}}
    assert disagreements(pyproject, lock) == [problem]


def test_a_lock_line_that_is_not_exact_is_refused() -> None:
    with pytest.raises(AssertionError, match="is not NAME==VERSION"):
        _pins("pyyaml>=6\n")


def test_ci_and_the_test_command_install_from_the_lock() -> None:
    setup = (ROOT / "scripts" / "setup").read_text()
    assert "-c constraints.txt" in setup
