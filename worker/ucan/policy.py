"""The UCAN policy language as ucantone evaluates it (see ucan-wire §2.3–2.4).

Differences from the spec that ucantone has and this module keeps: ``any`` over an empty
collection is false; ``like`` is a gobwas glob (``?``, ``[...]`` and ``{a,b}`` are special
too); ordering works on integers only; equality is typed (``1`` ≠ ``1.0`` ≠ ``true``).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

from worker.ucan.errors import DecodeError, ValidationError
from worker.ucan.selector import ResolutionError, Selector, parse_selector, select

_COMPARE: Final = frozenset(("==", "!=", ">", ">=", "<", "<="))
_QUANT: Final = frozenset(("all", "any"))
_ORDER: Final = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


@dataclass(frozen=True, slots=True)
class Statement:
    """One policy statement; ``wire`` is its decoded wire form."""

    op: str
    selector: Selector | None
    value: Any
    children: tuple[Statement, ...]
    wire: Any


@dataclass(frozen=True, slots=True)
class Policy:
    """A list of statements, all of which must hold."""

    statements: tuple[Statement, ...]

    @property
    def wire(self) -> list[Any]:
        """The policy in its wire form (a list of statements), for encoding."""
        return [s.wire for s in self.statements]


def parse_policy(value: object) -> Policy:
    """Parse a decoded policy (an array of statements).

    Raises:
        DecodeError: not a well-formed policy.
    """
    if isinstance(value, Policy):
        return value
    if type(value) not in (list, tuple):
        raise DecodeError("cannot parse policy: must be an array of statements")
    assert isinstance(value, list | tuple)
    return Policy(tuple(_statement(s, 0) for s in value))


def _statement(s: Any, depth: int) -> Statement:
    if depth > 32:
        raise DecodeError("cannot parse policy: nested too deeply")
    if type(s) not in (list, tuple) or not s or type(s[0]) is not str:
        raise DecodeError(f"cannot parse policy statement {s!r:.80}: must be [op, ...]")
    op = s[0]
    wire = list(s)
    if op in _COMPARE or op == "like":
        if len(s) != 3 or type(s[1]) is not str:
            raise DecodeError(
                f"cannot parse policy statement {op!r}: expected [op, selector, value]"
            )
        if op == "like" and type(s[2]) is not str:
            raise DecodeError("cannot parse policy statement 'like': pattern must be text")
        return Statement(op, parse_selector(s[1]), s[2], (), wire)
    if op in ("and", "or"):
        if len(s) != 2 or type(s[1]) not in (list, tuple):
            raise DecodeError(f"cannot parse policy statement {op!r}: expected [op, [statements]]")
        return Statement(op, None, None, tuple(_statement(c, depth + 1) for c in s[1]), wire)
    if op == "not":
        if len(s) != 2:
            raise DecodeError("cannot parse policy statement 'not': expected [op, statement]")
        return Statement(op, None, None, (_statement(s[1], depth + 1),), wire)
    if op in _QUANT:
        if len(s) != 3 or type(s[1]) is not str:
            raise DecodeError(
                f"cannot parse policy statement {op!r}: expected [op, selector, statement]"
            )
        return Statement(op, parse_selector(s[1]), None, (_statement(s[2], depth + 1),), wire)
    raise DecodeError(f"cannot parse policy statement: unknown operator {op!r:.40}")


def equal(a: Any, b: Any) -> bool:
    """Typed deep equality: values of different types are never equal."""
    ta, tb = type(a), type(b)
    if ta is tuple:
        a, ta = list(a), list
    if tb is tuple:
        b, tb = list(b), list
    if ta is not tb:
        return False
    if ta is list:
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    if ta is dict:
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    return bool(a == b)


@lru_cache(maxsize=512)
def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(_glob_regex(pattern, 0)[0], re.DOTALL)


def _glob_regex(p: str, i: int, in_alt: bool = False) -> tuple[str, int]:
    out: list[str] = []
    n = len(p)
    while i < n:
        c = p[i]
        if c == "\\" and i + 1 < n:
            out.append(re.escape(p[i + 1]))
            i += 2
        elif c == "*":
            out.append(".*")
            i += 1
        elif c == "?":
            out.append(".")
            i += 1
        elif c == "[":
            close = p.find("]", i + 2)
            if close < 0:
                out.append(re.escape(c))
                i += 1
                continue
            body = p[i + 1 : close]
            neg = body.startswith("!")
            if neg:
                body = body[1:]
            cls = "".join(re.escape(ch) if ch != "-" else "-" for ch in body)
            out.append(f"[{'^' if neg else ''}{cls}]")
            i = close + 1
        elif c == "{":
            alts: list[str] = []
            i += 1
            while True:
                part, i = _glob_regex(p, i, True)
                alts.append(part)
                if i >= n or p[i] == "}":
                    i += 1
                    break
                i += 1  # the comma
            out.append("(?:" + "|".join(alts) + ")")
        elif in_alt and c in ",}":
            return "".join(out), i
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out), i


def like(pattern: str, text: str) -> bool:
    """gobwas/glob matching of ``text`` against ``pattern`` (whole string)."""
    return _glob(pattern).fullmatch(text) is not None


def _is_int(v: Any) -> bool:
    return type(v) is int


def holds(stmt: Statement, value: Any) -> bool:
    """Whether ``stmt`` holds for ``value``; a selector that does not resolve makes it false."""
    op = stmt.op
    if op == "and":
        return all(holds(c, value) for c in stmt.children)
    if op == "or":
        return not stmt.children or any(holds(c, value) for c in stmt.children)
    if op == "not":
        return not holds(stmt.children[0], value)
    assert stmt.selector is not None
    try:
        got = select(stmt.selector, value)
    except ResolutionError:
        return False
    if op == "==":
        return equal(got, stmt.value)
    if op == "!=":
        return not equal(got, stmt.value)
    if op in _ORDER:
        want = stmt.value
        return _is_int(got) and _is_int(want) and bool(_ORDER[op](got, want))
    if op == "like":
        return type(got) is str and like(stmt.value, got)
    items: list[Any]
    if type(got) is list:
        items = got
    elif type(got) is dict:
        items = list(got.values())
    else:
        return False
    inner = stmt.children[0]
    if op == "all":
        return all(holds(inner, v) for v in items)
    return any(holds(inner, v) for v in items)


def match_policy(policy: Policy, args: Any) -> None:
    """Check every statement against ``args``.

    Raises:
        ValidationError: ``MatchError`` naming the first statement that does not hold.
    """
    for stmt in policy.statements:
        if not holds(stmt, args):
            raise ValidationError(
                "MatchError", f"invocation arguments do not satisfy policy statement {_show(stmt)}"
            )


def _show(stmt: Statement) -> str:
    import json

    from worker.ucan.cbor import to_dag_json

    try:
        text = json.dumps(to_dag_json(stmt.wire), ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(stmt.wire)
    return text if len(text) <= 200 else text[:199] + "…"
