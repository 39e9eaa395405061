"""The UCAN policy language as ucantone evaluates it (see ucan-wire §2.3–2.4).

Differences from the spec that ucantone has and this module keeps: ``any`` over an empty
collection is false; ``like`` is a gobwas glob (``?``, ``[...]`` and ``{a,b}`` are special
too); ordering works on integers only; equality is typed (``1`` ≠ ``1.0`` ≠ ``true``).
"""

from __future__ import annotations

import operator
import re
import warnings
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


#: most patterns one ``like`` pattern may expand to through ``{a,b}`` alternatives, and
#: the deepest nesting of alternatives; beyond either the pattern is refused (no match)
GLOB_MAX_EXPANSIONS: Final = 256
GLOB_MAX_NESTING: Final = 16
#: the longest ``like`` pattern compiled (and cached); a longer one matches nothing
GLOB_MAX_LENGTH: Final = 4096
_STAR: Final = None


class _BadGlob(Exception):
    """A pattern gobwas would not compile, or one past this module's bounds."""


@dataclass(frozen=True, slots=True)
class _Glob:
    """One alternative of a pattern: fixed-length segments separated by ``*``."""

    segments: tuple[tuple[re.Pattern[str], int], ...]  # (matcher, length in characters)
    anchored_start: bool  # no ``*`` before the first segment
    anchored_end: bool  # no ``*`` after the last segment


@lru_cache(maxsize=512)
def _glob(pattern: str) -> tuple[_Glob, ...] | None:
    """The pattern's alternatives, or None when it is malformed (it then matches nothing)."""
    try:
        variants, _ = _glob_parse(pattern, 0, 0, in_alt=False)
        with warnings.catch_warnings():
            # a class such as ``[?--]`` (a ``-`` kept for ranges next to another) makes re
            # warn of a possible future set syntax; the reading is today's, and a pattern
            # from a delegation must not write to stderr or raise where warnings are errors
            warnings.simplefilter("ignore", FutureWarning)
            return tuple(_glob_compile(v) for v in variants)
    except (_BadGlob, re.error, RecursionError, OverflowError):
        return None


def _glob_parse(p: str, i: int, depth: int, *, in_alt: bool) -> tuple[list[list[str | None]], int]:
    """Expand ``{a,b}`` alternatives into flat sequences of pieces: a one-character regex, or
    ``_STAR``. The same reading as gobwas: ``\\`` escapes, ``?`` one character, ``[...]`` and
    ``[!...]`` classes, ``{a,b}`` alternatives, ``*`` any run."""
    if depth > GLOB_MAX_NESTING:
        raise _BadGlob("alternatives nested too deeply")
    out: list[list[str | None]] = [[]]
    n = len(p)
    while i < n:
        c = p[i]
        piece: str | None
        if c == "\\" and i + 1 < n:
            piece, i = re.escape(p[i + 1]), i + 2
        elif c == "*":
            piece, i = _STAR, i + 1
        elif c == "?":
            piece, i = ".", i + 1
        elif c == "[":
            piece, i = _glob_class(p, i)
        elif c == "{":
            alts: list[list[str | None]] = []
            i += 1
            while True:
                part, i = _glob_parse(p, i, depth + 1, in_alt=True)
                alts.extend(part)
                if len(alts) > GLOB_MAX_EXPANSIONS:
                    raise _BadGlob("too many alternatives")
                if i >= n or p[i] == "}":
                    i += 1
                    break
                i += 1  # the comma
            if len(out) * len(alts) > GLOB_MAX_EXPANSIONS:
                raise _BadGlob("too many alternatives")
            out = [seq + alt for seq in out for alt in alts]
            continue
        elif in_alt and c in ",}":
            return out, i
        else:
            piece, i = re.escape(c), i + 1
        for seq in out:
            seq.append(piece)
    return out, i


def _glob_class(p: str, i: int) -> tuple[str, int]:
    """``[...]`` or ``[!...]`` at ``i`` as a one-character regex; a lone ``[`` is literal."""
    close = p.find("]", i + 2)
    if close < 0:
        return re.escape("["), i + 1
    body = p[i + 1 : close]
    neg = body.startswith("!")
    if neg:
        body = body[1:]
    cls = "".join(re.escape(ch) if ch != "-" else "-" for ch in body)
    return f"[{'^' if neg else ''}{cls}]", close + 1


def _glob_compile(pieces: list[str | None]) -> _Glob:
    runs: list[list[str]] = [[]]
    for piece in pieces:
        if piece is _STAR:
            if runs[-1] or len(runs) == 1:
                runs.append([])
        else:
            runs[-1].append(piece)
    starred = len(runs) > 1
    first, last = bool(runs[0]) or not starred, bool(runs[-1]) or not starred
    segments = tuple(
        (re.compile("".join(run), re.DOTALL), len(run)) for run in runs if run or not starred
    )
    return _Glob(segments, anchored_start=first, anchored_end=last)


def _glob_match(g: _Glob, text: str) -> bool:
    """Leftmost-first matching of fixed-length segments: linear in the text per segment,
    never backtracking across ``*`` (a regex ``.*a.*a…`` would be exponential)."""
    segs = list(g.segments)
    if not segs:  # only stars
        return True
    if g.anchored_start and g.anchored_end and len(segs) == 1:
        matcher, length = segs[0]
        return len(text) == length and matcher.fullmatch(text) is not None
    pos, end = 0, len(text)
    if g.anchored_end:
        matcher, length = segs.pop()
        if end - length < 0 or matcher.fullmatch(text, end - length) is None:
            return False
        end -= length
    if g.anchored_start:
        matcher, length = segs.pop(0)
        if length > end or matcher.match(text, 0, length) is None:
            return False
        pos = length
    for matcher, _length in segs:
        m = matcher.search(text, pos, end)
        if m is None:
            return False
        pos = m.end()
    return pos <= end


def like(pattern: str, text: str) -> bool:
    """gobwas/glob matching of ``text`` against ``pattern`` (whole string), in linear time.

    A malformed pattern (e.g. ``[z-a]``) matches nothing, as a pattern gobwas cannot
    compile fails the statement in ucantone.
    """
    if len(pattern) > GLOB_MAX_LENGTH:
        return False
    variants = _glob(pattern)
    return variants is not None and any(_glob_match(g, text) for g in variants)


def _is_int(v: Any) -> bool:
    return type(v) is int


#: what evaluating one invocation's policies may cost: a step per statement evaluated plus
#: one per item of a selected list or map (and per KiB of selected text). ucantone has no
#: bound; without one, a 15 KB policy over a 10 KB list took 9 s (it is quadratic).
#: Past it the policy does not hold (MatchError). Real policies cost a few dozen steps;
#: 10,000 is about 10 ms, so a message of ~3,000 small invocations stays within tens of s.
MAX_POLICY_STEPS: Final = 10_000


class _OverBudget(Exception):
    """The policy costs more than :data:`MAX_POLICY_STEPS` to evaluate."""


class _Budget:
    __slots__ = ("left",)

    def __init__(self, steps: int) -> None:
        self.left = steps

    def spend(self, steps: int) -> None:
        self.left -= steps
        if self.left < 0:
            raise _OverBudget


def _cost(value: Any) -> int:
    t = type(value)
    if t is list or t is dict:
        return len(value)
    if t is str or t is bytes:
        return len(value) >> 10
    return 0


def holds(stmt: Statement, value: Any, budget: _Budget | None = None) -> bool:
    """Whether ``stmt`` holds for ``value``; a selector that does not resolve makes it false.

    Raises:
        _OverBudget: evaluation exceeded ``budget`` (unbounded when None).
    """
    if budget is None:
        budget = _Budget(1 << 62)
    budget.spend(1)
    op = stmt.op
    if op == "and":
        return all(holds(c, value, budget) for c in stmt.children)
    if op == "or":
        return not stmt.children or any(holds(c, value, budget) for c in stmt.children)
    if op == "not":
        return not holds(stmt.children[0], value, budget)
    assert stmt.selector is not None
    try:
        got = select(stmt.selector, value)
    except ResolutionError:
        return False
    budget.spend(_cost(got))
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
        return all(holds(inner, v, budget) for v in items)
    return any(holds(inner, v, budget) for v in items)


def match_policy(policy: Policy, args: Any, *, max_steps: int = MAX_POLICY_STEPS) -> None:
    """Check every statement against ``args``.

    Raises:
        ValidationError: ``MatchError`` naming the first statement that does not hold, or
            saying that evaluation exceeded ``max_steps``.
    """
    budget = _Budget(max_steps)
    for stmt in policy.statements:
        try:
            ok = holds(stmt, args, budget)
        except _OverBudget:
            raise ValidationError(
                "MatchError",
                f"policy evaluation exceeds {max_steps} steps at statement {_show(stmt)}",
            ) from None
        if not ok:
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
