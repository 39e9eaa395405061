"""Policy selectors (jq-like paths) with ucantone's parsing rules and resolution semantics."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from worker.ucan.bounded import SizedLRU, footprint
from worker.ucan.errors import DecodeError

_FIELD: Final = re.compile(r"[^\W\d]\w*[\w$-]*|_[\w$-]*", re.UNICODE)
_FIELD_FULL: Final = re.compile(r"(?:[^\W\d]|_)[\w$-]*", re.UNICODE)
_INT: Final = re.compile(r"-?\d+")
#: longest selector accepted (real ones are a few segments): selectors are parsed, and
#: their parses cached, before any signature is checked; a 500 KB one took 0.6 s and
#: left 22 MiB in the cache
MAX_SELECTOR_LENGTH: Final = 1024
#: the memory parsed selectors may hold in the cache: entries were counted (1,024) but a
#: 1,024-character selector of 512 fields parses to ~60 KiB, so 1,024 of them held 60 MiB;
#: a usual one (``.details.region``) takes ~700 bytes
SELECTOR_CACHE_BYTES: Final = 1 << 20


class ResolutionError(Exception):
    """A selector does not resolve against a value (the statement then fails)."""


@dataclass(frozen=True, slots=True)
class Segment:
    """One step of a selector."""

    #: "field", "index", "slice" or "iterate"
    kind: str
    key: str = ""
    index: int = 0
    start: int | None = None
    end: int | None = None
    optional: bool = False


@dataclass(frozen=True, slots=True)
class Selector:
    """A parsed selector; ``text`` is its source."""

    text: str
    segments: tuple[Segment, ...]


def parse_selector(text: str) -> Selector:
    """Parse a selector such as ``.``, ``.a.b``, ``.["k"]``, ``.[0]``, ``.[1:]``, ``.[]?``.

    Raises:
        DecodeError: not a selector.
    """
    return _parse(text)


_PARSED: Final[SizedLRU[str, Selector]] = SizedLRU(SELECTOR_CACHE_BYTES)


def _parse(text: str) -> Selector:
    """:func:`_parse_uncached`, kept in a cache bounded by the memory the parses hold."""
    found = _PARSED.get(text) if type(text) is str else None
    if found is not None:
        return found
    sel = _parse_uncached(text)
    _PARSED.put(text, sel, footprint(sel) + sys.getsizeof(text))
    return sel


def _parse_uncached(text: str) -> Selector:
    if isinstance(text, str) and len(text) > MAX_SELECTOR_LENGTH:
        raise DecodeError(
            f"cannot parse selector {text[:40]!r}...: longer than {MAX_SELECTOR_LENGTH}"
        )
    if not isinstance(text, str) or not text.startswith("."):
        raise DecodeError(f"cannot parse selector {text!r}: must start with '.'")
    if text == ".":
        return Selector(text, ())
    segs: list[Segment] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == ".":
            i += 1
            if i < n and text[i] == "[":
                continue
            m = _FIELD_FULL.match(text, i)
            if not m:
                raise DecodeError(f"cannot parse selector {text!r}: bad field at {i}")
            i = m.end()
            seg = Segment("field", key=m.group())
        elif c == "[":
            close, seg = _bracket(text, i)
            i = close + 1
        else:
            raise DecodeError(f"cannot parse selector {text!r}: unexpected {c!r} at {i}")
        if i < n and text[i] == "?":
            seg = Segment(seg.kind, seg.key, seg.index, seg.start, seg.end, True)
            i += 1
        segs.append(seg)
    return Selector(text, tuple(segs))


def _bracket(text: str, i: int) -> tuple[int, Segment]:
    if text.startswith("[]", i):
        return i + 1, Segment("iterate")
    if text.startswith('["', i):
        j = i + 2
        while j < len(text):
            if text[j] == "\\":
                j += 2
                continue
            if text[j] == '"':
                break
            j += 1
        if j >= len(text) or not text.startswith('"]', j):
            raise DecodeError(f"cannot parse selector {text!r}: unterminated quoted key")
        try:
            key = json.loads(text[i + 1 : j + 1])
        except ValueError as exc:
            raise DecodeError(f"cannot parse selector {text!r}: bad quoted key") from exc
        return j + 1, Segment("field", key=key)
    close = text.find("]", i)
    if close < 0:
        raise DecodeError(f"cannot parse selector {text!r:.80}: missing ']'")
    inner = text[i + 1 : close]
    if ":" in inner:
        a, _, b = inner.partition(":")
        if (a and not _INT.fullmatch(a)) or (b and not _INT.fullmatch(b)):
            raise DecodeError(f"cannot parse selector {text!r:.80}: bad slice {inner!r:.40}")
        return close, Segment("slice", start=_index(a, text), end=_index(b, text))
    if not _INT.fullmatch(inner):
        raise DecodeError(f"cannot parse selector {text!r:.80}: bad index {inner!r:.40}")
    index = _index(inner, text)
    assert index is not None
    return close, Segment("index", index=index)


def _index(digits: str, text: str) -> int | None:
    """An index or slice bound; past 64 bits it is refused (Go's strconv would refuse it,
    and Python's int() raises ValueError on thousands of digits)."""
    if not digits:
        return None
    if len(digits.lstrip("-")) > 19 or not -(1 << 63) <= (value := int(digits)) < (1 << 63):
        raise DecodeError(f"cannot parse selector {text!r:.80}: index out of 64-bit range")
    return value


def _step(seg: Segment, value: Any) -> Any:
    kind = seg.kind
    if kind == "field":
        if type(value) is dict and seg.key in value:
            return value[seg.key]
        raise ResolutionError(f"cannot select field {seg.key!r} of {_kind(value)}")
    if kind == "index":
        if type(value) in (list, str, bytes):
            n = len(value)
            idx = seg.index + n if seg.index < 0 else seg.index
            if 0 <= idx < n:
                return value[idx]
            raise ResolutionError(f"index {seg.index} out of bounds")
        raise ResolutionError(f"cannot index {_kind(value)}")
    if kind == "slice":
        if type(value) in (list, str, bytes):
            return value[seg.start : seg.end]
        raise ResolutionError(f"cannot slice {_kind(value)}")
    raise ResolutionError("bad segment")  # pragma: no cover


def _iterate(value: Any) -> list[Any]:
    if type(value) is list:
        return list(value)
    if type(value) is dict:
        return list(value.values())
    raise ResolutionError(f"cannot iterate over {_kind(value)}")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def select(selector: Selector | str, value: Any, spend: Callable[[int], None] | None = None) -> Any:
    """Resolve ``selector`` against ``value``.

    An iterator (``[]``) makes the result the list of what it yields. A failing segment
    marked ``?`` yields ``None``.

    Args:
        selector: the selector, parsed or not.
        value: what it selects from.
        spend: called with the steps each stretch of the walk takes, before it is walked:
            one per value a segment is applied to, one per item an iterator or a slice
            yields (per KiB of a sliced text); it may raise to stop the walk.

    Raises:
        ResolutionError: the selector does not resolve.
    """
    sel = _parse(selector) if isinstance(selector, str) else selector
    many = False
    cur: list[Any] = [value]
    for seg in sel.segments:
        if spend is not None:
            spend(len(cur))
        nxt: list[Any] = []
        if seg.kind == "iterate":
            for v in cur:
                if spend is not None and type(v) in (list, dict):
                    spend(len(v))
                try:
                    nxt.extend(_iterate(v))
                except ResolutionError:
                    if not seg.optional:
                        raise
                    if not many:
                        return None
            many = True
        else:
            for v in cur:
                if spend is not None and seg.kind == "slice" and type(v) in (list, str, bytes):
                    n = len(range(len(v))[seg.start : seg.end])
                    spend(n if type(v) is list else n >> 10)
                try:
                    nxt.append(_step(seg, v))
                except ResolutionError:
                    if not seg.optional:
                        raise
                    if not many:
                        return None
        cur = nxt
    return cur if many else cur[0]
