"""Reading back JSON the project wrote (the state record, a placement): every value's shape checked.

A file on disk may have been edited, truncated or written by something else, so
each reader says exactly which value is wrong; a ``ValueError`` from here is
turned into the record's "damaged" error by its one reader.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def nat(v: Any, what: str) -> int:
    """A whole number >= 0 (``True`` and ``1.5`` are not numbers of pages)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{what} is {v!r}, not a whole number")
    if v < 0:
        raise ValueError(f"{what} is {v}, below 0")
    return v


def obj(v: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise ValueError(f"{what} is a {type(v).__name__}, not an object")
    return v


def seq(v: Any, what: str) -> list[Any]:
    if not isinstance(v, list):
        raise ValueError(f"{what} is a {type(v).__name__}, not a list")
    return v
