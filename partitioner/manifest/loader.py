"""Reading a site manifest: YAML with locations, the JSON Schema, then the checks a schema cannot say.

``load(path)`` and ``loads(text)`` return a :class:`~partitioner.manifest.model.Manifest`
or raise :class:`~partitioner.errors.ManifestError` carrying every problem
found, each at its ``FILE:LINE:COLUMN``.  Nothing here looks at the host: paths
are not checked for existence, CPU numbers not against the machine (that is
``plan``'s business).

A file that cannot be read (missing, a directory, no permission) is a
ManifestError too, with one problem at line 0, so that every caller gets the
manifest's troubles in one shape.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.resources
import itertools
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from partitioner.cpuset import MAX_CPUS, CpuListSyntaxError, CpuSet
from partitioner.errors import MAX_PROBLEMS, ManifestError, Problem
from partitioner.gcpause import collector_paused
from partitioner.manifest.model import (
    NOWHERE,
    Boot,
    DeviceSpec,
    Disk,
    HostSpec,
    Location,
    Manifest,
    PartitionSpec,
    SriovSpec,
    VfSettings,
)
from partitioner.manifest.yamlnodes import Document, PathKey, Pos, decode, dotted, parse
from partitioner.pci import PciAddress, PciAddressSyntaxError
from partitioner.units import (
    GiB,
    KiB,
    MiB,
    SizeSyntaxError,
    format_size,
    parse_size,
    virtio_mem_block,
)
from partitioner.userfiles import read_named

if TYPE_CHECKING:
    import jsonschema
    from jsonschema.exceptions import ValidationError

# A manifest is a few KiB; this refuses a wrong file (a disk image, a log) before parsing it.
MAX_BYTES = 1024 * 1024
# The manifest path that means standard input (cli.md), and the file name its problems carry.
STDIN = "-"
STDIN_NAME = "<stdin>"

DEFAULT_RESERVE_MEMORY = 1 * GiB
DEFAULT_HUGEPAGES = "2MiB"
PAGE_BYTES = 4 * KiB
_HUGEPAGE_BYTES = {"2MiB": 2 * MiB, "1GiB": 1 * GiB, "none": None}
# The kernel's NR_CPUS tops out at 8192 (CpuSet's bound); checked here first to say it in
# the manifest's words, before a list like "0-99999999999" reaches the parser.
MAX_CPU = MAX_CPUS - 1

_SCALARS = (str, int, bool, type(None))


@functools.cache
def schema() -> dict[str, Any]:
    """The site manifest's JSON Schema, as shipped inside the package."""
    text = importlib.resources.files("partitioner").joinpath("site.schema.json").read_text("utf-8")
    return cast(dict[str, Any], json.loads(text))


def schema_defs(name: str) -> Any:
    return schema()["$defs"][name]


def _size_hint(text: str) -> str:
    m = re.match(r"^\s*([0-9]+)\s*([kKmMgGtT])[bB]?\s*$", text)
    if not m:
        return ""
    # The manifest does not guess between 10^9 and 2^30; it says which spelling means what.
    return f": decimal units are refused, write {m.group(1)}{m.group(2).upper()}iB for binary"


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    # Imported on first use: jsonschema is most of a quick verb's start-up time, and a
    # document known to be valid (below) does not need it.
    import jsonschema

    return jsonschema.Draft202012Validator(schema())


# -- documents known to pass the schema ---------------------------------------------------
#
# `partition apply` reads the same manifest again and again; checking it against the
# schema costs more than the rest of a no-op apply.  A document that passed is
# remembered by the hash of its parsed content and of the schema, so the same document
# under the same schema is not checked twice.  Only passes are remembered, never
# failures, and the checks that need no schema (units, overlaps, names) always run.


def _validity_cache() -> Path:
    return Path(os.environ.get("PARTITION_CACHE_DIR") or "/var/cache/partition") / "valid"


@functools.cache
def _schema_digest() -> bytes:
    return hashlib.sha256(json.dumps(schema(), sort_keys=True).encode()).digest()


def _validity_key(root: Any) -> str:
    h = hashlib.sha256(_schema_digest())
    h.update(json.dumps(root, sort_keys=True, default=repr).encode())
    return h.hexdigest()


# What a partition's entry may be is the same schema for every partition, and a large site
# repeats a few kinds of entry many times (1,000 partitions of `{cpus: 2, memory: 1GiB}`):
# the schema is asked once per distinct entry (and once per name), not once per partition.
# Only a pass is taken from there; any problem sends the whole document through the full
# check, so problems are found and reported exactly as before.
_PARTITIONS_KEYWORDS = frozenset({"description", "type", "propertyNames", "additionalProperties"})


def _frozen(value: Any) -> str:
    """A twin of a partition's YAML value that tells apart what the schema tells apart (1, True
    and "1"; null and "null"; key order aside): its JSON with sorted keys.  The manifest's YAML
    gives text keys only and no fractions (``manifest.yamlnodes``), so JSON says it all, and
    json's C encoder writes it for little per partition."""
    return json.dumps(value, sort_keys=True)


def _passes_once_per_kind(root: Any) -> bool:
    """True when ``root`` passes the schema, shown with each distinct partition entry checked
    once; False when that cannot be shown (a problem somewhere, or a schema this shortcut does
    not cover): then the full check decides."""
    partitions = root.get("partitions") if isinstance(root, dict) else None
    rule = schema()["properties"]["partitions"]
    if not isinstance(partitions, dict) or len(partitions) < 2 or set(rule) - _PARTITIONS_KEYWORDS:
        return False
    import jsonschema

    kinds: dict[str, str] = {}
    for name, value in partitions.items():
        kinds.setdefault(_frozen(value), name)
    if len(kinds) == len(partitions):
        return False
    one_each = dict(root)
    one_each["partitions"] = {name: partitions[name] for name in kinds.values()}
    if next(_validator().iter_errors(one_each), None) is not None:
        return False
    names_rule = rule.get("propertyNames", True)
    if isinstance(names_rule, dict) and set(names_rule) <= {"pattern", "patternErrorMessage"}:
        # A pattern alone is what jsonschema's `pattern` does (re.search, on text; the names
        # are keys, text), asked without building a validator step per name.
        pattern = re.compile(names_rule.get("pattern", ""))
        return all(not isinstance(n, str) or pattern.search(n) for n in partitions)
    names = {"type": "object", "propertyNames": names_rule}
    return jsonschema.Draft202012Validator(names).is_valid(dict.fromkeys(partitions))


def _known_valid(key: str) -> bool:
    return (_validity_cache() / key).is_file()


def _remember_valid(key: str) -> None:
    # A cache that cannot be written (a user without rights to it) only costs time.
    try:
        cache = _validity_cache()
        cache.mkdir(parents=True, exist_ok=True)
        (cache / key).touch()
    except OSError:
        pass


def load(path: str | Path) -> Manifest:
    """Read and check the manifest at ``path`` (``-``: standard input)."""
    data, file = read_manifest(path)
    return loads(data, file)


def read_manifest(path: str | Path) -> tuple[bytes, str]:
    """The bytes of the manifest at ``path`` (at most one more than :data:`MAX_BYTES`), and
    the name its problems are located by: the path, or ``<stdin>`` for ``-``.

    Standard input is read once per process: a verb that needs the text twice (``host
    setup`` copies it into the machine) gets the same bytes the second time."""
    if str(path) == STDIN:
        return _stdin_bytes(), STDIN_NAME
    file = str(path)
    try:
        return read_named(path, MAX_BYTES + 1), file
    except OSError as e:
        reason = e.strerror or str(e)
        raise ManifestError([Problem(file, 0, 0, f"cannot read the manifest: {reason}")]) from None


# (the stream read, its bytes): keyed by the stream, so that a new standard input is read anew.
_stdin_read: list[tuple[object, bytes]] = []


def _stdin_bytes() -> bytes:
    stream = sys.stdin
    for seen, data in _stdin_read:
        if seen is stream:
            return data
    buffer = getattr(stream, "buffer", None)
    if stream is None or buffer is None:
        raise ManifestError(
            [Problem(STDIN_NAME, 0, 0, "cannot read the manifest: standard input is closed")]
        )
    try:
        data = bytes(buffer.read(MAX_BYTES + 1))
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ManifestError(
            [Problem(STDIN_NAME, 0, 0, f"cannot read the manifest from standard input: {reason}")]
        ) from None
    _stdin_read[:] = [(stream, data)]
    return data


@collector_paused()
def loads(text: str | bytes, file: str = "<manifest>") -> Manifest:
    """Check the manifest in ``text`` (``file`` names it in problems)."""
    if len(text) > MAX_BYTES:
        raise ManifestError(
            [
                Problem(
                    file,
                    0,
                    0,
                    f"the manifest is larger than {MAX_BYTES // MiB}MiB, the most this reads: "
                    "is this the right file?",
                )
            ]
        )
    if isinstance(text, bytes):
        text = decode(text, file)
    doc = parse(text, file)
    if doc is None or doc.root is None:
        raise ManifestError(
            [Problem(file, 1, 1, "the manifest is empty: it needs at least `version: 1`")]
        )
    if not isinstance(doc.root, dict):
        kind = "a list" if isinstance(doc.root, list) else f"the single value `{doc.root}`"
        raise ManifestError(
            [
                Problem(
                    file,
                    1,
                    1,
                    f"the manifest is {kind}: it must be a mapping of `version`, `host` "
                    "and `partitions`",
                )
            ]
        )
    checker = _Checker(doc)
    checker.check_schema()
    if not checker.full():
        checker.check_semantics()
    if checker.problems:
        raise ManifestError(checker.problems, incomplete=checker.incomplete)
    return checker.build()


# -- messages for schema errors ---------------------------------------------------------------


def _shown(value: Any) -> str:
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = str(value)
    if not text.isprintable():
        # A newline or NUL in a name would break the message it is shown in: escaped.
        text = json.dumps(text)[1:-1]
    return f"`{text if len(text) <= 40 else text[:37] + '...'}`"


_TYPE_NAMES = {
    "object": "a mapping",
    "array": "a list",
    "string": "text",
    "integer": "a whole number",
    "boolean": "true or false",
    "null": "nothing",
}


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def _type_message(error: ValidationError) -> str:
    wanted: Any = error.validator_value
    names = [wanted] if isinstance(wanted, str) else list(wanted)
    expected = " or ".join(_TYPE_NAMES.get(n, n) for n in names if n != "null")
    message = f"expected {expected}, not {_shown(error.instance)}"
    if (
        "boolean" in names
        and isinstance(error.instance, str)
        and error.instance.lower() in ("yes", "no", "on", "off", "y", "n")
    ):
        message += " (yes, no, on and off are text in a manifest, not booleans)"
    return message


class _CpuOwners:
    """Who took each CPU first, for the overlap check.

    Lists are compared as bits: a partition that shares nothing costs a few machine
    words whatever its list names, each CPU gets its owner once, and only CPUs that are
    shared (each one a problem reported, and problems are bounded) are looked at one by
    one.  Thousands of partitions that all name every CPU stay linear in the file.
    """

    def __init__(self) -> None:
        self.taken = 0
        self.owner: dict[int, tuple[str, PathKey]] = {}

    def shared(self, cpus: int) -> dict[tuple[str, PathKey], list[int]]:
        """The CPUs of ``cpus`` already taken, by whom."""
        out: dict[tuple[str, PathKey], list[int]] = {}
        common = cpus & self.taken
        if common:
            for cpu in CpuSet.from_bits(common):
                out.setdefault(self.owner[cpu], []).append(cpu)
        return out

    def take(self, cpus: int, owner: tuple[str, PathKey]) -> None:
        new = cpus & ~self.taken
        if new:
            self.owner.update(dict.fromkeys(CpuSet.from_bits(new), owner))
            self.taken |= new


class _Checker:
    """Collects every problem of one document, then builds the Manifest from it."""

    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.problems: list[Problem] = list(doc.problems)
        # Paths the schema already complained about: the semantic checks leave them alone,
        # so that one mistake gives one message.
        self.bad: set[PathKey] = set(doc.unreadable)
        self.incomplete = doc.incomplete
        self.locations: dict[Pos, Location] = {}

    def full(self) -> bool:
        """Whether more than MAX_PROBLEMS are collected: the checks stop there (and say so)."""
        if len(self.problems) > MAX_PROBLEMS:
            self.incomplete = True
        return self.incomplete

    # -- reporting ----------------------------------------------------------------------------

    def report(self, pos: Pos, message: str, path: PathKey, *, spoils: bool = True) -> None:
        """``spoils``: the node at ``path`` and all below it are left out of the later checks;
        a mapping that only lacks a key, or whose name is wrong, still has its values checked."""
        self.problems.append(Problem(self.doc.file, pos.line, pos.column, message, dotted(path)))
        if spoils:
            self.bad.add(path)

    def is_bad(self, path: PathKey) -> bool:
        return any(path[:i] in self.bad for i in range(len(path) + 1))

    def get(self, path: PathKey) -> Any:
        node: Any = self.doc.root
        for part in path:
            if isinstance(node, dict) and isinstance(part, str):
                node = node.get(part)
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                return None
        return node

    # -- the schema ---------------------------------------------------------------------------

    def check_schema(self) -> None:
        key = _validity_key(self.doc.root)
        if _known_valid(key):
            return
        if _passes_once_per_kind(self.doc.root):
            _remember_valid(key)
            return
        # Errors come lazily: taking no more than can be shown bounds the work of a file
        # with a hundred thousand of them.
        errors = list(itertools.islice(_validator().iter_errors(self.doc.root), MAX_PROBLEMS + 1))
        if not errors:
            _remember_valid(key)
        if len(errors) > MAX_PROBLEMS:
            self.incomplete = True
        typed = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
        seen: set[tuple[PathKey, str]] = set()
        for error in sorted(errors, key=lambda e: (list(map(str, e.absolute_path)), e.message)):
            path: PathKey = tuple(error.absolute_path)
            # A value of the wrong kind trips every other keyword too; its kind is the news.
            unreadable = any(path[:i] in self.doc.unreadable for i in range(len(path) + 1))
            if (error.validator != "type" and path in typed) or unreadable:
                continue
            # A missing key or a wrong name spoils nothing below: the cross-references of
            # what is there are still checked (every problem in one run).
            spoils = error.validator != "required" and "propertyNames" not in error.schema_path
            for pos, where, message in self.explain(error):
                if (where, message) not in seen:
                    seen.add((where, message))
                    self.report(pos, message, where, spoils=spoils)

    def explain(self, error: ValidationError) -> Iterator[tuple[Pos, PathKey, str]]:
        path: PathKey = tuple(error.absolute_path)
        name = dotted(path) or "the manifest"
        schema: Mapping[str, Any] = error.schema if isinstance(error.schema, Mapping) else {}
        kind = error.validator
        wanted: Any = error.validator_value
        if kind == "additionalProperties" and isinstance(error.instance, dict):
            known = [str(k) for k in schema.get("properties", {})]
            extra = [k for k in error.instance if k not in known]
            for key in extra:
                where = (*path, key)
                hint = _did_you_mean(key, known) or (
                    f"; expected one of: {', '.join(known)}" if known else ""
                )
                yield self.doc.where(where), where, f"{name}: unknown key `{key}`{hint}"
            return
        if "propertyNames" in error.relative_schema_path or "propertyNames" in (error.schema_path):
            where = (*path, str(error.instance))
            message = schema.get("patternErrorMessage") or error.message
            yield (
                self.doc.where(where),
                where,
                f"{dotted(where)}: {message}, not {_shown(error.instance)}",
            )
            return
        if kind == "required" and isinstance(error.instance, dict):
            missing = [k for k in wanted if k not in error.instance]
            custom = schema.get("errorMessage")
            for key in missing:
                message = f"{name}: {custom}" if custom else f"{name} needs `{key}`"
                yield self.doc.where(path), path, message
            return
        custom = schema.get("patternErrorMessage") if kind == "pattern" else None
        custom = custom or schema.get("errorMessage")
        if custom:
            scalar = isinstance(error.instance, _SCALARS)
            tail = f", not {_shown(error.instance)}" if scalar else ""
            if schema == schema_defs("size") and isinstance(error.instance, str):
                tail += _size_hint(error.instance)
            yield self.doc.where_value(path), path, f"{name}: {custom}{tail}"
            return
        if kind in ("oneOf", "anyOf") and error.context:
            from jsonschema.exceptions import best_match

            best = best_match(error.context)
            yield from self.explain(best)
            return
        if kind == "type":
            message = _type_message(error)
        elif kind == "enum":
            choices = [str(c) for c in wanted]
            message = f"expected one of {', '.join(choices)}, not {_shown(error.instance)}"
            if isinstance(error.instance, str):
                message += _did_you_mean(error.instance, choices)
        elif kind == "const":
            message = f"expected {wanted}, not {_shown(error.instance)}"
        elif kind == "minimum":
            message = f"expected at least {wanted}, not {_shown(error.instance)}"
        elif kind == "maximum":
            message = f"expected at most {wanted}, not {_shown(error.instance)}"
        elif kind == "minLength":
            message = "expected some text, not an empty one"
        elif kind == "minItems":
            message = f"expected at least {wanted} item(s)"
        elif kind == "uniqueItems":
            message = "expected each item once, but some are repeated"
        else:
            message = error.message
        yield self.doc.where_value(path), path, f"{name}: {message}"

    # -- what the schema cannot say -----------------------------------------------------------

    def check_semantics(self) -> None:
        self.sriov_checks()
        host_list = self.cpu_list(("host", "reserve", "cpus"))
        if self.get(("host", "reserve", "memory")) is not None:
            self.size(("host", "reserve", "memory"), allow_zero=True)
        partitions = self.get(("partitions",))
        if not isinstance(partitions, dict):
            return
        owners = _CpuOwners()
        if host_list is not None:
            owners.take(host_list, ("the host's reserve", ("host", "reserve", "cpus")))
        devices: dict[tuple[str, str], PathKey] = {}
        disks: dict[str, tuple[PathKey, bool]] = {}
        # File order, so that "already named" points back up the file.
        for name in sorted(partitions, key=lambda n: self.doc.where(("partitions", n)).line):
            if self.full():
                return
            base: PathKey = ("partitions", name)
            if not isinstance(partitions[name], dict):
                continue
            memory = self.memory(base)
            path = (*base, "cpus")
            cpus = self.cpu_list(path)
            if cpus is not None:
                self.overlaps(name, path, owners.shared(cpus))
                owners.take(cpus, (f"partition {name}", path))
            self.cpu_bounds(base, cpus)
            self.memory_bounds(base, memory)
            self.device_names(name, base, devices)
            self.disk_paths(name, base, disks)

    def cpu_list(self, path: PathKey) -> int | None:
        """The CPUs of a `cpus:` list as bits (CPU n is bit n), or None (reported) if none."""
        text = self.get(path)
        if not isinstance(text, str) or self.is_bad(path):
            return None
        too_big = [int(n) for n in re.findall(r"[0-9]+", text) if int(n) > MAX_CPU]
        if too_big:
            self.report(
                self.doc.where_value(path),
                f"{dotted(path)}: CPU {too_big[0]} is beyond the largest CPU number Linux "
                f"supports ({MAX_CPU})",
                path,
            )
            return None
        try:
            cpus = CpuSet.parse_bits(text)
        except CpuListSyntaxError as e:
            self.report(self.doc.where_value(path), f"{dotted(path)}: {e}", path)
            return None
        if not cpus:
            self.report(self.doc.where_value(path), f"{dotted(path)}: names no CPU", path)
            return None
        return cpus

    def overlaps(
        self, name: str, path: PathKey, taken: Mapping[tuple[str, PathKey], list[int]]
    ) -> None:
        for (owner, owner_path), common in taken.items():
            line = self.doc.where_value(owner_path).line
            self.report(
                self.doc.where_value(path),
                f"{dotted(path)}: partition {name} and {owner} (line {line}) both take "
                f"CPU{'s' if len(common) > 1 else ''} {CpuSet(common)}: a CPU has one owner",
                path,
            )

    def size(self, path: PathKey, *, allow_zero: bool = False) -> int | None:
        text = self.get(path)
        if not isinstance(text, str) or self.is_bad(path):
            return None
        try:
            n = parse_size(text)
        except (SizeSyntaxError, ValueError) as e:
            self.report(self.doc.where_value(path), f"{dotted(path)}: {e}", path)
            return None
        if n == 0 and not allow_zero:
            self.report(self.doc.where_value(path), f"{dotted(path)}: must be more than 0", path)
            return None
        return n

    def page_bytes(self, base: PathKey) -> int | None:
        """The page size a partition's memory is backed by (4KiB for `hugepages: none`), or None
        when its `hugepages:` is wrong (reported by the schema)."""
        hugepages = self.get((*base, "hugepages"))
        if hugepages is None:
            hugepages = DEFAULT_HUGEPAGES
        if not isinstance(hugepages, str) or hugepages not in _HUGEPAGE_BYTES:
            return None
        if self.is_bad((*base, "hugepages")):
            return None
        return _HUGEPAGE_BYTES[hugepages] or PAGE_BYTES

    def memory(self, base: PathKey, key: str = "memory") -> int | None:
        """The size at ``key`` (`memory`, `min_memory`, `max_memory`) when it is a whole number
        of the partition's pages; None (reported) when not, or when it is left out."""
        path = (*base, key)
        n = self.size(path)
        if n is None:
            return None
        hugepages = self.get((*base, "hugepages"))
        if hugepages is None:
            hugepages = DEFAULT_HUGEPAGES
        page = _HUGEPAGE_BYTES.get(hugepages) if isinstance(hugepages, str) else None
        if page is not None and not self.is_bad((*base, "hugepages")) and n % page:
            lower, upper = n // page * page, (n // page + 1) * page
            choices = (
                f"{format_size(lower)} or {format_size(upper)}" if lower else format_size(upper)
            )
            self.report(
                self.doc.where_value(path),
                f"{dotted(path)}: {format_size(n)} is not a whole number of "
                f"{hugepages} hugepages: use {choices}, or another `hugepages:` size",
                path,
            )
        elif n % PAGE_BYTES:
            self.report(
                self.doc.where_value(path),
                f"{dotted(path)}: {format_size(n)} is not a multiple of the 4KiB page size",
                path,
            )
        else:
            return n
        return None

    def cpu_bounds(self, base: PathKey, listed: int | None) -> None:
        """min_cpus <= cpus <= max_cpus (rule 11), each problem at the bound that is wrong.  An
        explicit list counts its CPUs."""
        cpus = self.get((*base, "cpus"))
        if self.is_bad((*base, "cpus")):
            return
        if isinstance(cpus, int) and not isinstance(cpus, bool):
            count = cpus
        elif listed is not None:
            count = listed.bit_count()
        else:
            return
        shown = f"cpus ({count})" if isinstance(cpus, int) else f"cpus ({count}: {cpus})"
        low, high = (*base, "min_cpus"), (*base, "max_cpus")
        n = self.get(low)
        if isinstance(n, int) and not isinstance(n, bool) and not self.is_bad(low) and n > count:
            self.report(
                self.doc.where_value(low),
                f"{dotted(low)}: {n} is more than {shown}: a partition's vCPUs stay within "
                f"min_cpus <= cpus <= max_cpus (rule 11); lower min_cpus to {count} or less, "
                "or leave it out (it defaults to cpus)",
                low,
            )
        n = self.get(high)
        if isinstance(n, int) and not isinstance(n, bool) and not self.is_bad(high) and n < count:
            self.report(
                self.doc.where_value(high),
                f"{dotted(high)}: {n} is less than {shown}: a partition's vCPUs stay within "
                f"min_cpus <= cpus <= max_cpus (rule 11); raise max_cpus to {count} or more, "
                "or leave it out (it defaults to cpus)",
                high,
            )

    def memory_bounds(self, base: PathKey, memory: int | None) -> None:
        """min_memory <= memory <= max_memory (rule 11), and what lies above min_memory a whole
        number of virtio-mem blocks; each problem at the bound that is wrong."""
        low = self.memory(base, "min_memory")
        high = self.memory(base, "max_memory")
        page = self.page_bytes(base)
        if memory is None:
            return
        block = virtio_mem_block(page)
        if low is not None:
            path = (*base, "min_memory")
            diff = memory - low
            if diff < 0:
                self.report(
                    self.doc.where_value(path),
                    f"{dotted(path)}: {format_size(low)} is more than memory "
                    f"({format_size(memory)}): a partition's memory stays within min_memory <= "
                    "memory <= max_memory (rule 11); lower min_memory, or leave it out (it "
                    "defaults to memory)",
                    path,
                )
            elif page is not None and diff % block:
                raised = memory - diff // block * block
                lowered = memory - (diff // block + 1) * block
                choices = [format_size(v) for v in (lowered, raised) if v > 0]
                self.report(
                    self.doc.where_value(path),
                    f"{dotted(path)}: memory {format_size(memory)} is {format_size(diff)} above "
                    f"min_memory {format_size(low)}, not a whole number of {format_size(block)} "
                    "blocks: the memory above min_memory is plugged live by virtio-mem in "
                    f"blocks of {format_size(block)} (the larger of the page size and 2MiB) on "
                    f"each of the partition's nodes; use min_memory {' or '.join(choices)}",
                    path,
                )
        if high is not None:
            path = (*base, "max_memory")
            diff = high - memory
            if diff < 0:
                self.report(
                    self.doc.where_value(path),
                    f"{dotted(path)}: {format_size(high)} is less than memory "
                    f"({format_size(memory)}): a partition's memory stays within min_memory <= "
                    "memory <= max_memory (rule 11); raise max_memory, or leave it out (it "
                    "defaults to memory)",
                    path,
                )
            elif page is not None and diff % block:
                lowered = memory + diff // block * block
                raised = memory + (diff // block + 1) * block
                self.report(
                    self.doc.where_value(path),
                    f"{dotted(path)}: max_memory {format_size(high)} is {format_size(diff)} "
                    f"above memory {format_size(memory)}, not a whole number of "
                    f"{format_size(block)} blocks: the memory above min_memory is plugged live "
                    f"by virtio-mem in blocks of {format_size(block)} (the larger of the page "
                    "size and 2MiB) on each of the partition's nodes; use max_memory "
                    f"{format_size(lowered)} or {format_size(raised)}",
                    path,
                )

    def device_names(self, name: str, base: PathKey, seen: dict[tuple[str, str], PathKey]) -> None:
        devices = self.get((*base, "devices"))
        if not isinstance(devices, list):
            return
        for i, device in enumerate(devices):
            path: PathKey = (*base, "devices", i)
            if not isinstance(device, dict) or self.is_bad(path):
                continue
            key: tuple[str, str] | None = None
            if isinstance(device.get("pci"), str) and not self.is_bad((*path, "pci")):
                try:
                    key = ("pci", str(PciAddress.parse(device["pci"])))
                except PciAddressSyntaxError as e:
                    self.report(self.doc.where_value((*path, "pci")), f"{dotted(path)}: {e}", path)
                    continue
            elif isinstance(device.get("netdev"), str) and not self.is_bad((*path, "netdev")):
                key = ("netdev", device["netdev"])
            if key is None:
                continue
            if key in seen:
                first = seen[key]
                owner = first[1]
                line = self.doc.where_value(first).line
                within = "named again" if owner == name else f"already named by partition {owner}"
                self.report(
                    self.doc.where_value(path),
                    f"{dotted(path)}: {key[0]} {key[1]} is {within} (line {line}): "
                    "a device belongs to one partition, once",
                    path,
                )
            else:
                seen[key] = path

    def disk_paths(self, name: str, base: PathKey, seen: dict[str, tuple[PathKey, bool]]) -> None:
        """Nothing is shared between partitions (docs/manifest.md), but an image that nobody writes
        can be: two readers of one file are safe, a writer and anyone else are not."""
        disks = self.get((*base, "disks"))
        if not isinstance(disks, list):
            return
        for i, disk in enumerate(disks):
            path: PathKey = (*base, "disks", i)
            if not isinstance(disk, dict) or self.is_bad(path):
                continue
            file, readonly = disk.get("path"), disk.get("readonly", False)
            if not isinstance(file, str) or not isinstance(readonly, bool):
                continue
            key = os.path.normpath(file)
            if key not in seen:
                seen[key] = (path, readonly)
                continue
            first, first_readonly = seen[key]
            if readonly and first_readonly:
                continue
            owner = "this partition" if first[1] == name else f"partition {first[1]}"
            line = self.doc.where_value(first).line
            self.report(
                self.doc.where_value((*path, "path")),
                f"{dotted(path)}: {file} is also a disk of {owner} (line {line}): "
                "a disk that is written belongs to one partition; share it only with "
                "`readonly: true` everywhere",
                path,
            )

    # -- the values ---------------------------------------------------------------------------

    def location(self, path: PathKey) -> Location:
        return self._located(self.doc.where(path))

    def value_location(self, path: PathKey) -> Location:
        return self._located(self.doc.where_value(path))

    def _located(self, pos: Pos) -> Location:
        """One Location per place: a partition's fields left out all stand where its name does."""
        got = self.locations.get(pos)
        if got is None:
            got = self.locations[pos] = Location(self.doc.file, pos.line, pos.column)
        return got

    def build(self) -> Manifest:
        root = self.doc.root
        host = root.get("host") or {}
        reserve = host.get("reserve") or {}
        reserve_cpus = reserve.get("cpus")
        host_spec = HostSpec(
            reserve_cpu_count=reserve_cpus if isinstance(reserve_cpus, int) else None,
            reserve_cpu_list=CpuSet.parse(reserve_cpus) if isinstance(reserve_cpus, str) else None,
            reserve_memory_bytes=(
                parse_size(reserve["memory"]) if "memory" in reserve else DEFAULT_RESERVE_MEMORY
            ),
            smt=host.get("smt", "isolate"),
            accel=host.get("accel", "kvm"),
            isolation=host.get("isolation", "full"),
            confine=bool(host.get("confine", True)),
            allow_unsafe_interrupts=bool(host.get("allow_unsafe_interrupts", False)),
            reserve_memory_where=self.value_location(("host", "reserve", "memory"))
            if "memory" in reserve
            else self.location(("host",))
            if "host" in root
            else Location(self.doc.file, 1, 1),
            reserve_cpus_where=self.value_location(("host", "reserve", "cpus"))
            if "cpus" in reserve
            else NOWHERE,
            sriov=self.sriov_specs(host.get("sriov") or []),
        )
        partitions = root.get("partitions") or {}
        specs = {name: self.partition(name, partitions[name]) for name in sorted(partitions)}
        return Manifest(file=self.doc.file, host=host_spec, partitions=specs)

    def partition(self, name: str, p: dict[str, Any]) -> PartitionSpec:
        base: PathKey = ("partitions", name)
        cpus = p["cpus"]
        cpu_list = CpuSet.parse(cpus) if isinstance(cpus, str) else None
        numa = p.get("numa", "auto")
        boot = p.get("boot")
        return PartitionSpec(
            name=name,
            cpu_count=len(cpu_list) if cpu_list is not None else cpus,
            cpu_list=cpu_list,
            memory_bytes=parse_size(p["memory"]),
            hugepage_bytes=_HUGEPAGE_BYTES[p.get("hugepages", DEFAULT_HUGEPAGES)],
            numa="auto"
            if numa == "auto"
            else tuple(sorted([numa] if isinstance(numa, int) else numa)),
            devices=tuple(
                self.device(d, (*base, "devices", i)) for i, d in enumerate(p.get("devices") or [])
            ),
            boot=Boot(
                boot["kernel"],
                boot.get("initrd"),
                boot.get("cmdline"),
                kernel_where=self.value_location((*base, "boot", "kernel")),
                initrd_where=self.value_location((*base, "boot", "initrd")),
            )
            if boot
            else None,
            disks=tuple(
                Disk(
                    d["path"],
                    d.get("readonly", False),
                    where=self.value_location((*base, "disks", i, "path")),
                )
                for i, d in enumerate(p.get("disks") or [])
            ),
            firmware=p.get("firmware", "bios"),
            autostart=p.get("autostart", True),
            order=p.get("order", 0),
            on_crash=p.get("on_crash", "restart"),
            where=self.location(base),
            firmware_where=self.value_location((*base, "firmware"))
            if "firmware" in p
            else self.location(base),
            cpus_where=self.value_location((*base, "cpus")),
            memory_where=self.value_location((*base, "memory")),
            hugepages_where=self.value_location((*base, "hugepages"))
            if "hugepages" in p
            else self.value_location((*base, "memory")),
            numa_where=self.value_location((*base, "numa")) if "numa" in p else self.location(base),
            min_cpus=p.get("min_cpus"),
            max_cpus=p.get("max_cpus"),
            min_memory_bytes=parse_size(p["min_memory"]) if "min_memory" in p else None,
            max_memory_bytes=parse_size(p["max_memory"]) if "max_memory" in p else None,
            hotplug_slots=p.get("hotplug_slots", 0),
            min_cpus_where=self._where_if(p, base, "min_cpus"),
            max_cpus_where=self._where_if(p, base, "max_cpus"),
            min_memory_where=self._where_if(p, base, "min_memory"),
            max_memory_where=self._where_if(p, base, "max_memory"),
            hotplug_slots_where=self._where_if(p, base, "hotplug_slots"),
        )

    def _where_if(self, p: dict[str, Any], base: PathKey, key: str) -> Location:
        """Where ``key``'s value stands, or NOWHERE when it is left out (``field_where`` then
        answers with the field it defaults to)."""
        return self.value_location((*base, key)) if key in p else NOWHERE

    def device(self, d: dict[str, Any], path: PathKey) -> DeviceSpec:
        kind: Literal["pci", "id", "netdev", "vf"]
        if "pci" in d:
            kind, value = "pci", str(PciAddress.parse(d["pci"]))
        elif "id" in d:
            kind, value = "id", d["id"].lower()
        elif "vf" in d:
            kind, value = "vf", pf_name(d["vf"])
        else:
            kind, value = "netdev", d["netdev"]
        return DeviceSpec(
            kind=kind,
            value=value,
            count=d.get("count", 1),
            required=d.get("required", True),
            reset_none_ok=d.get("reset") == "none-ok",
            rom=d.get("rom"),
            primary_display=d.get("primary_display", False),
            where=self.location(path),
            vf_index=d.get("index"),
            vf_settings=vf_settings(d),
        )

    # -- SR-IOV: host.sriov and the devices' `vf:` ---------------------------------------------

    def sriov_specs(self, entries: list[dict[str, Any]]) -> tuple[SriovSpec, ...]:
        return tuple(
            SriovSpec(
                pf=str(PciAddress.parse(e["pf"])) if "pf" in e else None,
                netdev=e.get("netdev"),
                vfs=e["vfs"],
                where=self.location(("host", "sriov", i)),
            )
            for i, e in enumerate(entries)
        )

    def sriov_pfs(self) -> dict[str, tuple[PathKey, int | None]]:
        """The PFs of host.sriov by the name a device's `vf:` gives them: (entry, its vfs)."""
        pfs: dict[str, tuple[PathKey, int | None]] = {}
        entries = self.get(("host", "sriov"))
        for i, e in enumerate(entries if isinstance(entries, list) else []):
            path: PathKey = ("host", "sriov", i)
            if not isinstance(e, dict) or self.is_bad(path):
                continue
            name: str | None = None
            if isinstance(e.get("pf"), str) and not self.is_bad((*path, "pf")):
                try:
                    name = str(PciAddress.parse(e["pf"]))
                except PciAddressSyntaxError as err:
                    self.report(self.doc.where_value((*path, "pf")), f"{dotted(path)}: {err}", path)
                    continue
            elif isinstance(e.get("netdev"), str) and not self.is_bad((*path, "netdev")):
                name = e["netdev"]
            if name is None:
                continue
            vfs = e.get("vfs")
            good = (
                isinstance(vfs, int)
                and not isinstance(vfs, bool)
                and not self.is_bad((*path, "vfs"))
            )
            if name in pfs:
                line = self.doc.where(pfs[name][0]).line
                self.report(
                    self.doc.where(path),
                    f"{dotted(path)}: the PF {name} is listed again (line {line}): host.sriov "
                    "has one entry per PF",
                    path,
                )
                continue
            pfs[name] = (path, vfs if good else None)
        return pfs

    def sriov_checks(self) -> None:
        """What the schema cannot say of SR-IOV: each `vf:` names a PF of host.sriov, and the
        PF's VFs suffice for what the partitions ask (a fixed `index:` once, below its `vfs`);
        a VF's MAC address is unicast, not zero and one VF's; `qos` goes with a `vlan`, and
        `min_tx_rate` is at most `max_tx_rate`.  A PF itself stays with the host."""
        pfs = self.sriov_pfs()
        # The names of host.sriov entries already found wrong (None: one that names none).
        entries = self.get(("host", "sriov"))
        unsure: set[str | None] = set()
        if self.is_bad(("host", "sriov")) or self.is_bad(("host",)):
            unsure.add(None)
        for i, e in enumerate(entries if isinstance(entries, list) else []):
            if self.is_bad(("host", "sriov", i)):
                given = [e.get(k) for k in ("pf", "netdev")] if isinstance(e, dict) else []
                named = [pf_name(v) for v in given if isinstance(v, str)]
                unsure.update(named or [None])
        partitions = self.get(("partitions",))
        if not isinstance(partitions, dict):
            return
        asked: dict[str, list[PathKey]] = {}
        indices: dict[tuple[str, int], PathKey] = {}
        macs: dict[str, PathKey] = {}
        for name in sorted(partitions, key=lambda n: self.doc.where(("partitions", n)).line):
            devices = self.get(("partitions", name, "devices"))
            for i, d in enumerate(devices if isinstance(devices, list) else []):
                path: PathKey = ("partitions", name, "devices", i)
                if not isinstance(d, dict) or self.is_bad(path):
                    continue
                self.pf_taken_whole(d, path, pfs)
                if not isinstance(d.get("vf"), str) or self.is_bad((*path, "vf")):
                    continue
                pf = pf_name(d["vf"])
                if pf not in pfs and (pf in unsure or None in unsure):
                    continue  # its entry in host.sriov is wrong already: said once, there
                if pf not in pfs:
                    listed = ", ".join(sorted(pfs)) or "none"
                    self.report(
                        self.doc.where_value((*path, "vf")),
                        f"{dotted(path)}: vf {pf} names no PF of host.sriov (it lists: {listed}): "
                        f"add it there with its `vfs:`, or name a PF as host.sriov names it",
                        path,
                    )
                    continue
                entry, vfs = pfs[pf]
                asked.setdefault(pf, []).append(path)
                self.vf_index(path, d.get("index"), pf, entry, vfs, indices)
                self.vf_settings_checks(path, d, macs)
        for pf, paths in asked.items():
            entry, vfs = pfs[pf]
            if vfs is not None and len(paths) > vfs:
                who = sorted({str(p[1]) for p in paths})
                self.report(
                    self.doc.where(paths[vfs]),
                    f"{dotted(paths[vfs])}: {len(paths)} devices ask for a VF of {pf} "
                    f"(partition{'s' if len(who) > 1 else ''} {', '.join(who)}) but host.sriov "
                    f"gives it {vfs} (line {self.doc.where(entry).line}): raise its `vfs:` or "
                    "ask for fewer",
                    paths[vfs],
                )

    def pf_taken_whole(
        self, d: dict[str, Any], path: PathKey, pfs: Mapping[str, tuple[PathKey, int | None]]
    ) -> None:
        """A PF of host.sriov named by `pci:` or `netdev:`: the PF stays with the host."""
        for key in ("pci", "netdev"):
            value = d.get(key)
            if not isinstance(value, str) or self.is_bad((*path, key)):
                continue
            named = pf_name(value) if key == "pci" else value
            if named in pfs:
                line = self.doc.where(pfs[named][0]).line
                self.report(
                    self.doc.where_value((*path, key)),
                    f"{dotted(path)}: {named} is a PF of host.sriov (line {line}), which stays "
                    f"with the host: take a virtual function of it with `vf: {named}`",
                    path,
                )

    def vf_index(
        self,
        path: PathKey,
        index: Any,
        pf: str,
        entry: PathKey,
        vfs: int | None,
        seen: dict[tuple[str, int], PathKey],
    ) -> None:
        at = (*path, "index")
        if not isinstance(index, int) or isinstance(index, bool) or self.is_bad(at):
            return
        line = self.doc.where(entry).line
        if vfs is not None and index >= vfs:
            self.report(
                self.doc.where_value(at),
                f"{dotted(at)}: VF {index} of {pf}, but host.sriov gives it {vfs} VF"
                f"{'s' if vfs > 1 else ''} (line {line}), numbered 0 to {vfs - 1}",
                at,
            )
        elif (pf, index) in seen:
            first = seen[(pf, index)]
            self.report(
                self.doc.where_value(at),
                f"{dotted(at)}: VF {index} of {pf} is already asked for by "
                f"{dotted(first)} (line {self.doc.where_value((*first, 'index')).line}): a VF "
                "belongs to one partition, once",
                at,
            )
        else:
            seen[(pf, index)] = path

    def vf_settings_checks(
        self, path: PathKey, d: dict[str, Any], macs: dict[str, PathKey]
    ) -> None:
        at = (*path, "mac")
        mac = d.get("mac")
        if isinstance(mac, str) and not self.is_bad(at):
            mac = mac.lower()
            why = ""
            if mac == "00:00:00:00:00:00":
                why = "is all zeros, which means no address"
            elif int(mac[:2], 16) & 1:
                why = "is a multicast address (the first byte is odd): a VF's MAC must be unicast"
            if why:
                self.report(self.doc.where_value(at), f"{dotted(at)}: {mac} {why}", at)
            elif mac in macs:
                first = macs[mac]
                self.report(
                    self.doc.where_value(at),
                    f"{dotted(at)}: {mac} is already the MAC of {dotted(first)} (line "
                    f"{self.doc.where_value(first).line}): two VFs with one address confuse "
                    "every switch",
                    at,
                )
            else:
                macs[mac] = at
        at = (*path, "qos")
        if "qos" in d and "vlan" not in d and not self.is_bad(at):
            self.report(
                self.doc.where(at),
                f"{dotted(at)}: a priority of the VLAN tag, but this VF has no `vlan:`: add "
                "one, or leave qos out",
                at,
            )
        low, high = d.get("min_tx_rate"), d.get("max_tx_rate")
        at = (*path, "min_tx_rate")
        if (
            isinstance(low, int)
            and isinstance(high, int)
            and low > high
            and not self.is_bad(at)
            and not self.is_bad((*path, "max_tx_rate"))
        ):
            self.report(
                self.doc.where_value(at),
                f"{dotted(at)}: {low} Mbit/s guaranteed is more than the max_tx_rate of "
                f"{high} Mbit/s (line {self.doc.where_value((*path, 'max_tx_rate')).line})",
                at,
            )


# The keys of a `vf:` device that are its settings (VfSettings), in the manifest's words.
_VF_SETTINGS = (
    "mac",
    "vlan",
    "qos",
    "spoofchk",
    "trust",
    "link_state",
    "min_tx_rate",
    "max_tx_rate",
)


def pf_name(text: str) -> str:
    """A PF as a device's `vf:` or host.sriov names it: a full PCI address, or an interface."""
    try:
        return str(PciAddress.parse(text))
    except PciAddressSyntaxError:
        return text


def vf_settings(d: Mapping[str, Any]) -> VfSettings | None:
    """A `vf:` device's settings; None when it gives none (the VF is left as it is)."""
    if "vf" not in d or not any(k in d for k in _VF_SETTINGS):
        return None
    mac = d.get("mac")
    return VfSettings(
        mac=None if mac is None else mac.lower(),
        vlan=d.get("vlan"),
        qos=d.get("qos"),
        spoofchk=d.get("spoofchk", True),
        trust=d.get("trust", False),
        link_state=d.get("link_state"),
        min_tx_rate=d.get("min_tx_rate"),
        max_tx_rate=d.get("max_tx_rate"),
    )
