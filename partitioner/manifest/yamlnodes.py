"""YAML read into plain values, with the line and column of every value and every key.

The manifest is read with a loader of its own rather than PyYAML's SafeLoader,
because YAML 1.1 (what PyYAML implements) turns text people write in a site
manifest into surprising values:

* ``81:00.0`` (a PCI address written unquoted) is a sexagesimal float,
  ``0o7``/``07`` octal, ``0x1f`` hex, ``1_000`` an integer;
* ``no``, ``yes``, ``on``, ``off``, ``y``, ``n`` are booleans, so a partition
  called ``no`` or ``autostart: yes`` mean something nobody intended;
* ``2026-11-20`` is a date.

Here a plain scalar is a boolean only when it is ``true`` or ``false`` (any
case YAML 1.2 allows), null only when it is empty, ``~`` or ``null``, an
integer only when it is decimal digits with an optional sign, and text
otherwise (YAML 1.2's core schema, without floats: no field of the manifest is
a fraction).  Mapping keys are always text, as written.

Other choices, all reported as located :class:`~partitioner.errors.Problem`:
aliases (``*name``) are refused, which also rules out "billion laughs"
expansion; duplicate keys are an error, not "the last one wins"; tags other
than the standard ``!!str``/``!!int``/``!!bool``/``!!null``/``!!seq``/``!!map``
are refused; nesting deeper than :data:`MAX_DEPTH` is refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import yaml
from yaml.composer import Composer
from yaml.events import AliasEvent, StreamEndEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import BaseResolver
from yaml.scanner import Scanner

from partitioner.errors import MAX_PROBLEMS, ManifestError, Problem

# Far deeper than any manifest (which is five levels deep); keeps the
# recursive composer and the converters below clear of Python's recursion limit.
MAX_DEPTH = 64

# Decimal digits only; 30 keeps int() clear of Python's limit on long digit strings.
_INT_RE = re.compile(r"^[-+]?[0-9]{1,30}$")
_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_NULL_RE = re.compile(r"^(?:~|null|Null|NULL|)$")

_TAG = "tag:yaml.org,2002:"
_STR, _INT, _BOOL, _NULL = _TAG + "str", _TAG + "int", _TAG + "bool", _TAG + "null"
_SEQ, _MAP = _TAG + "seq", _TAG + "map"
_ALIAS = " alias"  # not a tag anyone can write: YAML tags have no spaces

PathKey = tuple[str | int, ...]


class Pos(NamedTuple):
    """A place in the file, 1-based.  A tuple: a manifest has one for every key and every
    value, and a tuple of two numbers is the cheapest value Python makes."""

    line: int
    column: int


@dataclass
class Document:
    """The YAML document as plain values (dict, list, str, int, bool, None).

    ``values[path]`` is where the value at ``path`` starts; ``keys[path]`` is
    where the key that leads to it stands (absent for list items and the root).
    ``problems`` are the ones that did not stop the reading (duplicate keys,
    aliases, tags): the document is still usable for further checks.
    """

    file: str
    root: Any
    values: dict[PathKey, Pos] = field(default_factory=dict)
    keys: dict[PathKey, Pos] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    unreadable: set[PathKey] = field(default_factory=set)  # values refused above (alias, tag)
    incomplete: bool = False  # more problems than MAX_PROBLEMS: the rest are not kept

    def where(self, path: PathKey) -> Pos:
        """The key of ``path`` if it has one (what a reader looks for), else its value."""
        return self.keys.get(path) or self.values.get(path) or Pos(1, 1)

    def where_value(self, path: PathKey) -> Pos:
        return self.values.get(path) or self.where(path)


class _Resolver(BaseResolver):
    pass


_Resolver.add_implicit_resolver(_BOOL, _BOOL_RE, list("tTfF"))
_Resolver.add_implicit_resolver(_NULL, _NULL_RE, ["~", "n", "N", ""])
_Resolver.add_implicit_resolver(_INT, _INT_RE, list("-+0123456789"))


class _TooDeep(Exception):
    def __init__(self, mark: Any) -> None:
        self.mark = mark


class _Composing(Composer):
    """PyYAML's composer, refusing aliases and deep nesting, over whichever parser is mixed in."""

    depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self.check_event(AliasEvent):  # type: ignore[attr-defined]
            # Stands in for the alias, so the converter refuses it where it stands and the rest
            # of the file is still checked.  The anchored node is never shared: no expansion.
            event = self.get_event()  # type: ignore[attr-defined]
            return ScalarNode(_ALIAS, event.anchor, event.start_mark, event.end_mark)
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _TooDeep(self.peek_event().start_mark)  # type: ignore[attr-defined]
            node: Node | None = super().compose_node(parent, index)
            assert node is not None  # only a missing document composes to None
            return node
        finally:
            self.depth -= 1


class _PyLoader(Reader, Scanner, Parser, _Composing, _Resolver):
    """PyYAML's pure-Python reading stages with the resolver above."""

    def __init__(self, text: str) -> None:
        Reader.__init__(self, text)
        Scanner.__init__(self)
        Parser.__init__(self)
        Composer.__init__(self)
        _Resolver.__init__(self)


_CParser: Any = getattr(getattr(yaml, "_yaml", None), "CParser", None)
# libyaml scans and parses some 30 times faster than the pure-Python stages (a 1MiB file in
# about a second instead of half a minute); the composing and every check stay the same.
HAVE_LIBYAML: bool = _CParser is not None and bool(getattr(yaml, "__with_libyaml__", False))
# Which parser compose() uses by default; tests run the manifest checks under both.
USE_LIBYAML: bool = HAVE_LIBYAML

if HAVE_LIBYAML:

    class _CLoader(_Composing, _CParser, _Resolver):  # type: ignore[misc]
        def __init__(self, text: str) -> None:
            _CParser.__init__(self, text)
            Composer.__init__(self)
            _Resolver.__init__(self)

    class _CComposer(_CParser, _Resolver):  # type: ignore[misc]
        """libyaml's own composer, with the resolver above: the node graph at C speed."""

        def __init__(self, text: str) -> None:
            _CParser.__init__(self, text)
            _Resolver.__init__(self)


class _Retry(Exception):
    """The quick reading met what only the composer above reports as the project does."""


def _compose_quickly(text: str) -> Node | None:
    """The document's node graph from libyaml's composer; :class:`_Retry` for anything but a
    plain document (an error, a second document).  Its graph is the one :func:`compose` makes
    but for what :class:`_Composing` refuses (aliases, nesting past MAX_DEPTH), which the
    converter's quick reading finds and hands back to :func:`compose`."""
    loader = _CComposer(text)
    try:
        node: Node | None = loader.get_single_node()
        return node
    except Exception:  # said by compose(), as it says it
        raise _Retry from None
    finally:
        loader.dispose()


def _line_col(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def decode(data: bytes, file: str) -> str:
    """UTF-8 text (a BOM is allowed), or a ManifestError that says where it stops being text."""
    nul = data.find(b"\x00")
    if nul >= 0:
        line, col = _line_col(data[:nul].decode("utf-8", "replace"), nul)
        raise ManifestError(
            [Problem(file, line, col, "this is a binary file, not a YAML manifest (NUL byte)")]
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        prefix = data[: e.start].decode("utf-8-sig", "replace")
        line, col = _line_col(prefix, len(prefix))
        raise ManifestError(
            [Problem(file, line, col, "the manifest is not UTF-8 text (a binary file?)")]
        ) from None


_LINE_BREAK = re.compile(r"\r\n|[\r\n\x85\u2028\u2029]")  # what YAML counts as a new line


def _tab_problems(text: str, file: str) -> list[Problem]:
    out = []
    for n, line in enumerate(_LINE_BREAK.split(text), 1):
        indent = line[: len(line) - len(line.lstrip(" \t"))]
        if "\t" in indent and line.strip():
            out.append(
                Problem(
                    file,
                    n,
                    indent.index("\t") + 1,
                    "a tab indents this line: YAML indents with spaces only",
                )
            )
    return out


def _at_tab(text: str, mark: Any) -> bool:
    lines = _LINE_BREAK.split(text)
    line = lines[mark.line] if mark.line < len(lines) else ""
    return mark.column < len(line) and line[mark.column] == "\t"


def _yaml_error(e: yaml.YAMLError, text: str, file: str, *, fast: bool) -> list[Problem]:
    if isinstance(e, yaml.reader.ReaderError):
        # libyaml counts UTF-8 bytes, the Python reader characters.
        index = len(text.encode()[: e.position].decode("utf-8", "ignore")) if fast else e.position
        line, col = _line_col(text, index)
        code = e.character if isinstance(e.character, int) else ord(str(e.character)[:1] or "?")
        return [
            Problem(
                file, line, col, f"character U+{code:04X} is not allowed in YAML (a binary file?)"
            )
        ]
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        problem = e.problem or "invalid YAML"
        if mark is not None and _at_tab(text, mark):
            tabs = _tab_problems(text, file)
            if tabs:
                return tabs
            problem = "a tab here: YAML separates and indents with spaces only"
        elif e.context:
            cm = e.context_mark
            where = f" (line {cm.line + 1})" if cm is not None and cm is not mark else ""
            problem = f"{problem}, {e.context}{where}"
        if mark is None:
            return [Problem(file, 0, 0, f"invalid YAML: {problem}")]
        return [Problem(file, mark.line + 1, mark.column + 1, f"invalid YAML: {problem}")]
    return [Problem(file, 0, 0, f"invalid YAML: {e}")]


def compose(text: str, file: str, *, fast: bool | None = None) -> Node | None:
    """The single document's node graph, or None for a file with no document at all.

    ``fast``: parse with libyaml (default: when PyYAML was built with it).  The two parsers
    agree on what a manifest means; their wording of a syntax error differs, and libyaml
    accepts a tab between `key:` and its value, as YAML allows, where PyYAML refuses it.
    """
    fast = USE_LIBYAML if fast is None else fast
    loader: Any = None
    try:
        loader = _CLoader(text) if fast else _PyLoader(text)
        loader.get_event()  # the stream start
        if loader.check_event(StreamEndEvent):
            return None
        node: Node = loader.compose_document()
        if not loader.check_event(StreamEndEvent):
            m = loader.peek_event().start_mark
            raise ManifestError(
                [
                    Problem(
                        file,
                        m.line + 1,
                        m.column + 1,
                        "a second YAML document starts here: a manifest is one document",
                    )
                ]
            )
        return node
    except _TooDeep as e:
        raise ManifestError(
            [
                Problem(
                    file,
                    e.mark.line + 1,
                    e.mark.column + 1,
                    f"nested more than {MAX_DEPTH} levels deep: this is not a manifest",
                )
            ]
        ) from None
    except yaml.YAMLError as e:
        if fast and "nesting depth" in str(getattr(e, "problem", "")):
            # libyaml scans ahead and can stop at a nesting limit of its own (1000 levels,
            # worded its own way) before the composer sees level MAX_DEPTH + 1.  The depth
            # rule is the project's: such a text is read again by the pure-Python stages,
            # which have no limit of their own, so the composer's refusal is the one said.
            loader.dispose()
            loader = None
            return compose(text, file, fast=False)
        raise ManifestError(_yaml_error(e, text, file, fast=fast)) from None
    finally:
        if loader is not None:
            loader.dispose()


def _tag(tag: str) -> str:
    return "!!" + tag.removeprefix(_TAG) if tag.startswith(_TAG) else tag


def _pos(node: Node) -> Pos:
    return Pos(node.start_mark.line + 1, node.start_mark.column + 1)


class _Converter:
    def __init__(self, doc: Document, *, quick: bool = False) -> None:
        self.doc = doc
        # The quick reading (of libyaml's composer's graph, see parse): every node is met once
        # unless an alias shares it, which compose() would have refused where it stands.
        self.met: set[int] | None = set() if quick else None

    def _meet(self, node: Node, path: PathKey, children: bool) -> None:
        """In the quick reading, hand over to compose() what only it reports as the project
        does: an alias (a node met twice), a node deeper than MAX_DEPTH (the root is at depth
        1, a mapping's keys one below it)."""
        met = self.met
        if met is None:
            return
        if id(node) in met or (children and len(path) + 2 > MAX_DEPTH):
            raise _Retry
        met.add(id(node))

    def problem(self, node: Node, message: str, path: PathKey, *, refused: bool = True) -> None:
        """``refused``: the value at ``path`` is not what was written, so later checks skip it."""
        if refused:
            self.doc.unreadable.add(path)
        if len(self.doc.problems) > MAX_PROBLEMS:
            self.doc.incomplete = True  # one more than is shown is kept: there are more
            return
        p = _pos(node)
        self.doc.problems.append(Problem(self.doc.file, p.line, p.column, message, dotted(path)))

    def convert(self, node: Node, path: PathKey) -> Any:
        self._meet(node, path, not isinstance(node, ScalarNode) and bool(node.value))
        self.doc.values[path] = _pos(node)
        if isinstance(node, MappingNode):
            return self.mapping(node, path)
        if isinstance(node, SequenceNode):
            if node.tag != _SEQ:
                self.problem(node, f"YAML tag {_tag(node.tag)} is not used in a manifest", path)
            return [self.convert(item, (*path, i)) for i, item in enumerate(node.value)]
        assert isinstance(node, ScalarNode)
        return self.scalar(node, path)

    def scalar(self, node: ScalarNode, path: PathKey) -> Any:
        text: str = node.value
        if node.tag == _ALIAS:
            self.problem(
                node, f"alias *{text} is not allowed in a manifest: write the value out", path
            )
            return None
        if node.tag == _STR:
            return text
        if node.tag == _NULL and _NULL_RE.match(text):
            return None
        if node.tag == _BOOL and _BOOL_RE.match(text):
            return text.lower() == "true"
        if node.tag == _INT and _INT_RE.match(text):
            return int(text)
        if node.tag in (_NULL, _BOOL, _INT):
            self.problem(node, f"{text!r} is not a valid {_tag(node.tag)}", path)
        else:
            self.problem(node, f"YAML tag {_tag(node.tag)} is not used in a manifest", path)
        return text

    def mapping(self, node: MappingNode, path: PathKey) -> dict[str, Any]:
        if node.tag != _MAP:
            self.problem(node, f"YAML tag {_tag(node.tag)} is not used in a manifest", path)
        out: dict[str, Any] = {}
        first: dict[str, Pos] = {}
        quick = self.met is not None
        for key_node, value_node in node.value:
            if quick:
                if not isinstance(key_node, ScalarNode) or key_node.value in first:
                    # Refused without reading what is inside or below, where an anchor
                    # could hide from the count of aliases: compose() reads it.
                    raise _Retry
                self._meet(key_node, path, False)
            if isinstance(key_node, ScalarNode) and key_node.tag == _ALIAS:
                message = f"alias *{key_node.value} is not allowed in a manifest: write the key out"
                self.problem(key_node, message, path, refused=False)
                continue
            if not isinstance(key_node, ScalarNode):
                self.problem(
                    key_node,
                    "a key must be a plain name, not a list or mapping",
                    path,
                    refused=False,
                )
                continue
            # Keys are names as written: `no:` is the name "no", `08:` the name "08".
            key: str = key_node.value
            where = _pos(key_node)
            if key in first:
                self.problem(
                    key_node,
                    f"duplicate key `{key}` (first at line {first[key].line}): "
                    "each key may appear once",
                    (*path, key),
                    refused=False,
                )
                continue
            first[key] = where
            self.doc.keys[(*path, key)] = where
            out[key] = self.convert(value_node, (*path, key))
        return out


def dotted(path: PathKey | Iterator[str | int]) -> str:
    """``("partitions", "fw0", "devices", 1)`` -> ``partitions.fw0.devices[1]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            # A key with a newline or NUL in it is shown escaped, so a message stays one line.
            shown = part if part.isprintable() else json.dumps(part)[1:-1]
            out += ("." if out else "") + shown
    return out


def parse(text: str, file: str, *, fast: bool | None = None) -> Document | None:
    """The document with its locations; None for an empty file.  Unreadable YAML raises ManifestError.

    With libyaml, the graph comes from libyaml's composer first (twice as fast as composing
    its events in Python, which a site of thousands of partitions feels), and is the same
    graph; whatever it cannot say as :func:`compose` does (errors, aliases, nesting, the
    refused keys under which an anchor could hide) sends the text through :func:`compose`.
    """
    if HAVE_LIBYAML and (USE_LIBYAML if fast is None else fast):
        try:
            quick = _compose_quickly(text)
            if quick is None:
                return None
            doc = Document(file, None)
            doc.root = _Converter(doc, quick=True).convert(quick, ())
            return doc
        except _Retry:
            pass
    node = compose(text, file, fast=fast)
    if node is None:
        return None
    doc = Document(file, None)
    doc.root = _Converter(doc).convert(node, ())
    return doc
