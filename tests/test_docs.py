"""The user's documentation is in the repository and in step with the code.

docs/manifest.md documents every field of the schema and no field the schema lacks,
except the planned ones it marks "not yet available"; docs/cli-reference.md names
every verb and option of the parser; the example of docs/manifest.md loads; links
between the documents resolve inside the repository, and no user-facing file points
outside it.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from partitioner.cli.main import build_parser
from partitioner.manifest.loader import loads, schema

ROOT = Path(__file__).resolve().parent.parent
MANIFEST_MD = ROOT / "docs" / "manifest.md"
CLI_MD = ROOT / "docs" / "cli-reference.md"
NOT_YET = "**Not yet available.**"

# The fields the reference announces before the schema has them, and only those.
PLANNED_FIELDS = {
    "host.sriov",
    "partitions.NAME.min_cpus",
    "partitions.NAME.max_cpus",
    "partitions.NAME.min_memory",
    "partitions.NAME.max_memory",
    "partitions.NAME.hotplug_slots",
    "partitions.NAME.devices[].vf",
}
PLANNED_VERBS: set[str] = set()


# -- the manifest ----------------------------------------------------------------------------


def schema_fields(node: Any, path: str = "", root: Any = None) -> Iterator[str]:
    """Every property of the schema as a path: ``host.reserve.cpus``, ``partitions.NAME.cpus``,
    ``partitions.NAME.disks[].path``."""
    root = node if root is None else root
    if not isinstance(node, dict):
        return
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        yield from schema_fields(root["$defs"][ref.removeprefix("#/$defs/")], path, root)
    for name, sub in node.get("properties", {}).items():
        here = f"{path}.{name}" if path else name
        yield here
        yield from schema_fields(sub, here, root)
    if isinstance(node.get("additionalProperties"), dict):
        yield from schema_fields(node["additionalProperties"], f"{path}.NAME", root)
    if isinstance(node.get("items"), dict):
        yield from schema_fields(node["items"], f"{path}[]", root)
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in node.get(key, []):
            yield from schema_fields(sub, path, root)


def documented_fields(text: str) -> dict[str, bool]:
    """The fields of the tables under "## Fields", by path, each with whether it is marked
    not yet available.  A table's fields are relative to the `path` its heading names."""
    fields: dict[str, bool] = {}
    section = text.split("\n## Fields\n", 1)[1].split("\n## ", 1)[0]
    prefix = ""
    for line in section.splitlines():
        if line.startswith("### "):
            named = re.findall(r"`([^`]+)`", line)
            prefix = named[-1] if named else ""
        elif line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            for name in re.findall(r"`([^`]+)`", cells[0]):
                path = f"{prefix}.{name}" if prefix else name
                assert path not in fields, f"docs/manifest.md documents {path} twice"
                fields[path] = cells[1].startswith(NOT_YET)
    return fields


def test_the_manifest_reference_documents_every_field_of_the_schema_and_no_other() -> None:
    in_schema = set(schema_fields(schema()))
    documented = documented_fields(MANIFEST_MD.read_text())
    assert {"host.reserve.cpus", "partitions.NAME.cpus", "partitions.NAME.devices[].pci"} <= (
        in_schema & set(documented)
    )
    missing = sorted(in_schema - set(documented))
    assert missing == [], f"fields of the schema that docs/manifest.md does not document: {missing}"
    unknown = sorted(f for f, planned in documented.items() if not planned and f not in in_schema)
    assert unknown == [], (
        f"docs/manifest.md documents fields the schema lacks: {unknown} "
        f"(mark a planned one {NOT_YET!r})"
    )
    marked = {f for f, planned in documented.items() if planned}
    arrived = sorted(marked & in_schema)
    assert arrived == [], f"{arrived} are in the schema now: remove their {NOT_YET!r} mark"
    assert marked == PLANNED_FIELDS - in_schema, (
        "only the planned fields may be marked not yet available"
    )


def test_the_in_step_check_names_a_field_missing_from_either_side() -> None:
    text = MANIFEST_MD.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `host.smt` |"))
    without = documented_fields(text.replace(row + "\n", ""))
    assert "host.smt" in set(schema_fields(schema())) - set(without)
    extra = text.replace(row, row + "\n| `host.frobnicate` | a field nobody implemented. |")
    documented = documented_fields(extra)
    assert documented["host.frobnicate"] is False
    assert "host.frobnicate" not in set(schema_fields(schema()))


def test_the_example_of_the_manifest_reference_is_a_valid_manifest() -> None:
    text = MANIFEST_MD.read_text()
    example = text.split("## Example\n", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    manifest = loads(example, file="docs/manifest.md")
    assert sorted(manifest.partitions) == ["fw0"]


# -- the command line ------------------------------------------------------------------------


def _verbs(parser: argparse.ArgumentParser, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                verb = f"{prefix} {name}".strip()
                nested = list(_verbs(sub, verb))
                if not nested:  # a group such as `host` is documented by its verbs
                    yield verb, sub
                yield from nested


def test_the_cli_reference_names_every_verb_and_option_and_no_other_verb() -> None:
    text = CLI_MD.read_text()
    rows = re.findall(r"^\| `partition ([a-z ]+?)(?: [A-Z\[\-].*?)?`.*?\|(.*)\|$", text, re.M)
    documented = {verb.strip(): meaning.strip().startswith(NOT_YET) for verb, meaning in rows}
    verbs = dict(_verbs(build_parser()))
    assert {"plan", "apply", "host setup", "testbed run"} <= set(verbs)
    missing = sorted(set(verbs) - set(documented))
    assert missing == [], f"verbs that docs/cli-reference.md does not document: {missing}"
    unknown = sorted(v for v, planned in documented.items() if not planned and v not in verbs)
    assert unknown == [], f"docs/cli-reference.md documents verbs the command lacks: {unknown}"
    assert {v for v, planned in documented.items() if planned} == PLANNED_VERBS - set(verbs)
    for verb, parser in verbs.items():
        for action in parser._actions:
            if action.help == argparse.SUPPRESS:
                continue  # an internal option, not shown by --help either
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert f"{option}" in text, f"docs/cli-reference.md: {verb} {option}"


# -- links -----------------------------------------------------------------------------------


def user_facing_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for top in ("docs", "schemas", "partitioner", "ansible"):
        if (ROOT / top).is_dir():
            files += [
                p
                for p in sorted((ROOT / top).rglob("*"))
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
            ]
    return files


def test_no_user_facing_file_points_outside_the_repository() -> None:
    files = user_facing_files()
    assert ROOT / "partitioner" / "cli" / "main.py" in files
    outside = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in files
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if "../shared" in line
    ]
    assert outside == [], f"these point at ../shared, which a clone does not have: {outside}"


@pytest.mark.parametrize(
    "doc", ["README.md", "docs/manifest.md", "docs/cli-reference.md", "docs/cli.md"]
)
def test_the_links_of_the_documentation_resolve_inside_the_repository(doc: str) -> None:
    path = ROOT / doc
    prose = re.sub(r"`[^`]*`", "", re.sub(r"```.*?```", "", path.read_text(), flags=re.S))
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose)
    assert links or doc == "docs/cli.md"
    local = [link for link in links if "://" not in link]
    broken = [
        link
        for link in local
        if not (path.parent / link).exists() or ROOT not in (path.parent / link).resolve().parents
    ]
    assert broken == [], f"{doc}: links that lead nowhere in the repository: {broken}"
