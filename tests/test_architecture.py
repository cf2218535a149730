"""The layout docs/architecture.md describes is the tree's: every package and module it names
exists and every package is named; no two modules import each other, directly or round
about; the apply engine's context is typed; the facts kept in one place stay there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "partitioner"
DOC = ROOT / "docs" / "architecture.md"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every project module ``path`` imports, at the top or inside a function, except
    under ``if TYPE_CHECKING:`` (never run)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in known:
                out.add(node.module)
            out.update(
                f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known
            )
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(u: str, path: list[str]) -> None:
        state[u] = 1
        path.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                found.append([*path[path.index(v) :], v])
            elif not state.get(v):
                visit(v, path)
        path.pop()
        state[u] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m, [])
    return found


def test_no_module_imports_itself_round_about() -> None:
    mods = _modules()
    known = set(mods)
    # A package's __init__ importing its own modules is how a package is built, not a cycle.
    graph = {
        m: {d for d in _imports(p, known) if not d.startswith(m + ".")} for m, p in mods.items()
    }
    assert cycles(graph) == []


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_architecture_doc_names_every_package_and_only_real_files() -> None:
    text = DOC.read_text()
    packages = sorted(p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    for name in packages:
        assert f"| `{name}/` |" in text, f"docs/architecture.md has no row for {name}/"
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    for row in rows:
        folder = re.match(r"\| `(\w+)/` \|", row)
        base = PKG / folder.group(1) if folder else PKG
        holds = row.split("|")[2]
        for f in re.findall(r"`(\w+\.py)`", holds):
            assert (base / f).is_file(), f"docs/architecture.md names {base / f}, which is missing"
    for name in sorted(p.name for p in PKG.glob("*.py") if p.name != "__init__.py"):
        assert f"`{name}`" in text, f"docs/architecture.md does not say what {name} is"
    for pkg in [p for p in packages if p != "cli"]:  # cli/: one module per verb, named so
        for p in sorted((PKG / pkg).glob("*.py")):
            if p.name != "__init__.py":
                assert f"`{p.name}`" in text or f"{pkg}/{p.name}" in text, (
                    f"docs/architecture.md does not say what {pkg}/{p.name} is"
                )


def test_the_apply_engine_hands_its_steps_a_typed_context() -> None:
    for p in PKG.rglob("*.py"):
        text = p.read_text()
        assert not re.search(r"\bctx: Any\b", text), p
        assert 'getattr(ctx, "' not in text, p


@pytest.mark.parametrize(
    ("pattern", "home"),
    [
        (r"^(?:KiB|MiB|GiB|TiB)\s*=", "units.py"),
        (r"""["'](?:/proc/\w|/sys/\w)""", "kernel/sysfs.py"),
        (r"def \w*kernel\w*size\w*\(", "units.py"),
        (r"^class (?:FunctionRecord|GroupClaim)\b", "record/model.py"),
    ],
)
def test_a_fact_kept_in_one_place_is_defined_only_there(pattern: str, home: str) -> None:
    rx = re.compile(pattern, re.MULTILINE)
    # The emulated server's init and the boot-time scripts are shell text for another
    # machine, not paths read here; reader.py and root.py classify paths by their prefix.
    outside = {
        "testbed",
        "boot/setup.py",
        "inventory/reader.py",
        "inventory/snapshot.py",
        "kernel/root.py",
    }
    found = []
    for p in PKG.rglob("*.py"):
        rel = str(p.relative_to(PKG))
        if rel == home or any(rel == o or rel.startswith(o + "/") for o in outside):
            continue
        if rx.search(p.read_text()):
            found.append(rel)
    assert found == [], f"defined outside {home}: {found}"


def test_a_module_over_600_lines_is_one_concept_said_so_in_the_doc() -> None:
    text = DOC.read_text().split("## Modules over about 600 lines", 1)[1]
    for p in sorted(PKG.rglob("*.py")):
        rel = str(p.relative_to(PKG))
        if len(p.read_text().splitlines()) > 650:  # "about 600"
            assert f"`{rel}`" in text, (
                f"{rel} is long: split it, or say in the doc why it is one concept"
            )
