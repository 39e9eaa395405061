"""The UCAN policy language as ucantone evaluates it (see ucan-wire §2.3–2.4).

Differences from the spec that ucantone has and this module keeps: ``any`` over an empty
collection is false; ``like`` is a gobwas glob (``?``, ``[...]`` and ``{a,b}`` are special
too); ordering works on integers only; equality is typed (``1`` ≠ ``1.0`` ≠ ``true``).
"""

from __future__ import annotations

import operator
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from worker.ucan.bounded import SizedLRU, footprint
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


def equal(a: Any, b: Any, budget: _Budget | None = None) -> bool:
    """Typed deep equality: values of different types are never equal.

    With ``budget``, a step is spent for each item of every list and map compared, and
    per KiB of text or bytes, before comparing them.
    """
    ta, tb = type(a), type(b)
    if ta is tuple:
        a, ta = list(a), list
    if tb is tuple:
        b, tb = list(b), list
    if ta is not tb:
        return False
    if ta is list:
        if len(a) != len(b):
            return False
        if budget is not None:
            budget.spend(len(a))
        return all(equal(x, y, budget) for x, y in zip(a, b, strict=True))
    if ta is dict:
        if len(a) != len(b):
            return False
        if budget is not None:
            budget.spend(len(a))
        return a.keys() == b.keys() and all(equal(a[k], b[k], budget) for k in a)
    if budget is not None and (ta is str or ta is bytes):
        budget.spend(min(len(a), len(b)) >> 10)
    return bool(a == b)


# --- like: gobwas globs -------------------------------------------------------------------
#
# A pattern is parsed into a tree (linear in its length), its ``{a,b}`` alternatives are
# expanded into flat alternatives, and each alternative is compiled into regexes of
# fixed-length segments between ``*``s. Expansion multiplies: 8 groups of two make 256
# alternatives, each a copy of the whole pattern. So what expanding and compiling will
# cost is computed from the tree first (alternatives × weighted pieces), refused past
# GLOB_MAX_WORK, and charged to the evaluation's step budget before any of it is done.
# A step is about a microsecond of CPU on the reference machine (bench/policy_bench.py).

#: most patterns one ``like`` pattern may expand to through ``{a,b}`` alternatives, and
#: the deepest nesting of alternatives; a pattern beyond either is refused
GLOB_MAX_EXPANSIONS: Final = 256
GLOB_MAX_NESTING: Final = 16
#: the longest ``like`` pattern compiled; a longer one is refused
GLOB_MAX_LENGTH: Final = 4096
#: most steps expanding and compiling one pattern may take (measured, about 1 µs a step):
#: its weighted pieces over all its alternatives (a character or ``?`` 2, a ``*`` 16 as it
#: starts a segment compiled on its own, a class 4 + its length + 1 per 32 characters of
#: the ranges it spans + 100 when it holds a character past U+00FF), 16 per alternative,
#: and a step per 4 characters of the pattern for parsing it. A pattern costing more is
#: refused; none can cost more than a whole evaluation may. A 4 KiB pattern of plain
#: characters weighs about 9,200; 8 ``{a,b}`` groups alone (256 alternatives of 8
#: characters), about 8,200; ``did:web:*``, 50.
GLOB_MAX_WORK: Final = 10_000
#: the memory compiled patterns may hold in the cache (by ``sys.getsizeof`` of the
#: compiled regexes, their sources and the objects around them)
GLOB_CACHE_BYTES: Final = 4 << 20
#: saturation of the counts while measuring a pattern (Python ints would not overflow,
#: but 4,096 characters of ``{a,b}`` would make numbers of thousands of digits)
_SAT: Final = 1 << 40
#: the weights above: what re takes to compile a character (~1.2 µs) and its share of
#: parsing; a new segment (~16 µs a regex, however short); an alternative (one segment
#: at least, and its objects)
_CHAR_WEIGHT: Final = 2
_STAR_WEIGHT: Final = 16
_ALT_WEIGHT: Final = 16


class PatternRefused(ValueError):
    """A ``like`` pattern past this service's bounds (not a gobwas error: gobwas would
    compile it); the invocation is refused (``MatchError``) even under ``not``."""


#: a pattern piece: (one-character regex, weight to compile, cost to test one character
#: of the text, 0 for a plain character); or a star (None); or alternatives (a list)
_Piece = tuple[str, int, int]
_Item = _Piece | None | list[list[Any]]


@dataclass(frozen=True, slots=True)
class _Glob:
    """One alternative of a pattern: fixed-length segments separated by ``*``."""

    segments: tuple[tuple[re.Pattern[str], int], ...]  # (matcher, length in characters)
    anchored_start: bool  # no ``*`` before the first segment
    anchored_end: bool  # no ``*`` after the last segment


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A compiled pattern and what using it costs, in steps."""

    globs: tuple[_Glob, ...] | None  # None: malformed, matches nothing (as in ucantone)
    charge: int  # parsing, expanding and compiling it: charged once per evaluation
    scan: int  # matching: per character of the text, in 1/256 steps
    fixed: int  # matching: per call, in 1/256 steps (besides two steps per alternative)

    def match_cost(self, n: int) -> int:
        """The steps one match against a text of ``n`` characters may take."""
        if self.globs is None:
            return 1
        return 2 * len(self.globs) + ((n * self.scan + self.fixed) >> 8)


_GLOBS: Final[SizedLRU[str, _Compiled]] = SizedLRU(GLOB_CACHE_BYTES)

# re.compile keeps every pattern it compiles in a process-wide cache of 512 entries; the
# segments of delegated patterns must not fill it (they are kept in _GLOBS, bounded)
_re_compile: Final[Callable[[str, int], re.Pattern[str]]] = getattr(
    getattr(re, "_compiler", None), "compile", re.compile
)
#: as an int: the compiler tests flags many times, and a RegexFlag makes each test an
#: enum operation (a third of the compile time of a short regex)
_DOTALL: Final = int(re.DOTALL)


def _compiled(pattern: str, budget: _Budget | None) -> _Compiled:
    """The pattern compiled, its cost charged to ``budget`` before the work is done.

    Raises:
        PatternRefused: the pattern is past the bounds above.
        _OverBudget: the budget cannot pay for it.
    """
    if budget is not None:
        done = budget.patterns.get(pattern)
        if done is not None:  # paid for in this evaluation already
            return done
    found = _GLOBS.get(pattern)
    if found is not None:
        if budget is not None:
            budget.spend(found.charge)
            budget.patterns[pattern] = found
        return found
    n = len(pattern)
    if n > GLOB_MAX_LENGTH:
        raise PatternRefused(
            f"like pattern {_head(pattern)} is {n} characters long, more than the "
            f'{GLOB_MAX_LENGTH} this service compiles; write it shorter, or as an "or" of '
            'simpler "like" statements'
        )
    parse = n >> 2
    if budget is not None:
        budget.spend(parse)
    tree, _ = _glob_tree(pattern, 0, 0, in_alt=False)
    count, work = _measure(tree)
    work = min(work + _ALT_WEIGHT * count, _SAT)
    if count > GLOB_MAX_EXPANSIONS:
        raise PatternRefused(
            f"like pattern {_head(pattern)} expands through its {{…}} alternatives to "
            f"{_num(count)} patterns, more than the {GLOB_MAX_EXPANSIONS} this service "
            'compiles; write it with fewer alternatives, or as an "or" of simpler '
            '"like" statements'
        )
    if parse + work > GLOB_MAX_WORK:
        what = (
            f"expands through its {{…}} alternatives to {count} patterns weighing "
            f"{_num(parse + work)} in all"
            if count > 1
            else f"weighs {_num(parse + work)}"
        )
        raise PatternRefused(
            f"like pattern {_head(pattern)} {what} (2 a character, 16 a star, more for a "
            f"class), more than the {GLOB_MAX_WORK:,} this service compiles; write it "
            'shorter or with fewer alternatives, or as an "or" of simpler "like" statements'
        )
    if budget is not None:
        budget.spend(work)
    made = _compile(tree, parse + work)
    _GLOBS.put(pattern, made, footprint(made.globs) + sys.getsizeof(pattern))
    if budget is not None:
        budget.patterns[pattern] = made
    return made


def _head(pattern: str) -> str:
    return repr(pattern) if len(pattern) <= 40 else repr(pattern[:40]) + "…"


def _num(n: int) -> str:
    return f"more than {_SAT:,}" if n >= _SAT else f"{n:,}"


def _glob_tree(p: str, i: int, depth: int, *, in_alt: bool) -> tuple[list[_Item], int]:
    """Parse a pattern the way gobwas reads it: ``\\`` escapes, ``?`` one character,
    ``[...]`` and ``[!...]`` classes, ``{a,b}`` alternatives, ``*`` any run. Linear in the
    pattern; nothing is expanded."""
    if depth > GLOB_MAX_NESTING:
        raise PatternRefused(
            f"like pattern {_head(p)} nests {{…}} alternatives more than "
            f"{GLOB_MAX_NESTING} deep, more than this service compiles"
        )
    seq: list[_Item] = []
    n = len(p)
    while i < n:
        c = p[i]
        if c == "\\" and i + 1 < n:
            seq.append((re.escape(p[i + 1]), _CHAR_WEIGHT, 0))
            i += 2
        elif c == "*":
            seq.append(None)
            i += 1
        elif c == "?":
            seq.append((".", _CHAR_WEIGHT, 1))
            i += 1
        elif c == "[":
            piece, i = _glob_class(p, i)
            seq.append(piece)
        elif c == "{":
            options: list[list[Any]] = []
            i += 1
            while True:
                part, i = _glob_tree(p, i, depth + 1, in_alt=True)
                options.append(part)
                if i >= n or p[i] == "}":
                    i += 1
                    break
                i += 1  # the comma
            seq.append(options)
        elif in_alt and c in ",}":
            return seq, i
        else:
            seq.append((re.escape(c), _CHAR_WEIGHT, 0))
            i += 1
    return seq, i


def _glob_class(p: str, i: int) -> tuple[_Piece, int]:
    """``[...]`` or ``[!...]`` at ``i`` as a one-character regex; a lone ``[`` is literal.

    Its weight is what ``re`` takes to compile it: ranges are filled in one character at
    a time up to U+FFFF (``[\\x00-\\uffff]`` takes ~1.7 ms), and a class holding a
    character past U+00FF builds a table of the whole BMP (~0.1 ms). Testing a character
    against it takes one lookup in that table, and one comparison per character or range
    past U+FFFF, which ``re`` keeps in a list.
    """
    close = p.find("]", i + 2)
    if close < 0:
        return (re.escape("["), _CHAR_WEIGHT, 0), i + 1
    body = p[i + 1 : close]
    neg = body.startswith("!")
    if neg:
        body = body[1:]
    cls = "".join(re.escape(ch) if ch != "-" else "-" for ch in body)
    weight = 4 + len(body)
    span = 0
    for j in range(1, len(body) - 1):
        if body[j] == "-":
            lo, hi = ord(body[j - 1]), min(ord(body[j + 1]), 0xFFFF)
            span += max(0, hi - lo + 1)
    weight += span >> 5
    probe = 1
    if body and max(body) > "\xff":
        weight += 100
        probe += sum(ch > "\uffff" for ch in body)
    return (f"[{'^' if neg else ''}{cls}]", weight, probe), close + 1


def _measure(seq: list[_Item]) -> tuple[int, int]:
    """How many alternatives ``seq`` expands to, and the weight of all their pieces."""
    count, work = 1, 0
    for item in seq:
        if item is None:
            work += _STAR_WEIGHT * count
        elif type(item) is tuple:
            work += item[1] * count
        else:
            assert isinstance(item, list)
            alts = weight = 0
            for option in item:
                c, w = _measure(option)
                alts += c
                weight += w
            work = min(work * alts + count * weight, _SAT)
            count = min(count * alts, _SAT)
        work = min(work, _SAT)
    return count, work


def _expand(seq: list[_Item]) -> list[list[_Piece | None]]:
    """Every alternative of ``seq`` as a flat list of pieces (stars as None)."""
    out: list[list[_Piece | None]] = [[]]
    for item in seq:
        if item is None or type(item) is tuple:
            for alt in out:
                alt.append(item)
        else:
            assert isinstance(item, list)
            options = [alt for option in item for alt in _expand(option)]
            out = [alt + more for alt in out for more in options]
    return out


def _compile(tree: list[_Item], charge: int) -> _Compiled:
    try:
        with warnings.catch_warnings():
            # a class such as ``[?--]`` (a ``-`` kept for ranges next to another) makes re
            # warn of a possible future set syntax; the reading is today's, and a pattern
            # from a delegation must not write to stderr or raise where warnings are errors
            warnings.simplefilter("ignore", FutureWarning)
            made = [_glob_compile(alt) for alt in _expand(tree)]
    except (re.error, RecursionError, OverflowError):
        return _Compiled(None, charge, 0, 0)
    return _Compiled(
        tuple(g for g, _, _ in made), charge, sum(s for _, s, _ in made), sum(f for *_, f in made)
    )


def _glob_compile(pieces: list[_Piece | None]) -> tuple[_Glob, int, int]:
    """One alternative as a :class:`_Glob`, and its matching cost: per character of the
    text and per call, in 1/256 steps (see :meth:`_Compiled.match_cost`)."""
    runs: list[list[_Piece]] = [[]]
    for piece in pieces:
        if piece is None:
            if runs[-1] or len(runs) == 1:
                runs.append([])
        else:
            runs[-1].append(piece)
    starred = len(runs) > 1
    first, last = bool(runs[0]) or not starred, bool(runs[-1]) or not starred
    kept = [run for run in runs if run or not starred]
    segments = tuple(
        (_re_compile("".join(r for r, _, _ in run), _DOTALL), len(run)) for run in kept
    )
    # a segment matched in place costs a test per piece; one searched for (between stars)
    # may be tried at every position of the text: a plain string is found in linear time
    # (~8 ns a character at worst), one with ``?`` or classes may test all its pieces at
    # each position (~0.5-3 ns a test)
    scan = fixed = 0
    for k, run in enumerate(kept):
        tests = sum(max(probe, 1) for _, _, probe in run)
        fixed += tests
        in_place = (k == 0 and first) or (k == len(kept) - 1 and last)
        if not in_place:
            scan += 2 if not any(probe for _, _, probe in run) else tests
    return _Glob(segments, first, last), scan, fixed


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


def _like(pattern: str, text: str, budget: _Budget | None) -> bool:
    made = _compiled(pattern, budget)
    if made.globs is None:
        return False
    if budget is not None:
        budget.spend(made.match_cost(len(text)))
    return any(_glob_match(g, text) for g in made.globs)


def like(pattern: str, text: str) -> bool:
    """gobwas/glob matching of ``text`` against ``pattern`` (whole string), in linear time
    per alternative and segment.

    A malformed pattern (e.g. ``[z-a]``) matches nothing, as a pattern gobwas cannot
    compile fails the statement in ucantone.

    Raises:
        PatternRefused: the pattern is past this service's bounds (longer than
            :data:`GLOB_MAX_LENGTH`, more than :data:`GLOB_MAX_EXPANSIONS` alternatives,
            nested deeper than :data:`GLOB_MAX_NESTING`, costing more than
            :data:`GLOB_MAX_WORK` to compile).
    """
    return _like(pattern, text, None)


def _is_int(v: Any) -> bool:
    return type(v) is int


#: what evaluating one invocation's policies may cost, in steps of about a microsecond of
#: CPU: a step per statement evaluated, per selector segment applied and per item a
#: selector walks, per item of a list or map compared or quantified over, per KiB of text
#: selected; compiling a ``like`` pattern (its weighted pieces, see GLOB_MAX_WORK) once per
#: evaluation, and matching it (per alternative, and per character of the text it may
#: scan). ucantone has no bound; without one, a 15 KB policy over a 10 KB list took 9 s
#: (it is quadratic), and 30 ``like`` patterns of 8 ``{a,b}`` groups took 23 s.
#: Each cost is charged before it is paid; past the budget the policy does not hold
#: (MatchError). Real policies cost a few dozen steps; the most any policy can make one
#: invocation cost is about 10 ms of CPU (bench/policy_bench.py).
MAX_POLICY_STEPS: Final = 10_000


class _OverBudget(Exception):
    """The policy costs more than :data:`MAX_POLICY_STEPS` to evaluate."""


class _Budget:
    __slots__ = ("left", "patterns")

    def __init__(self, steps: int) -> None:
        self.left = steps
        #: the patterns compiled (and paid for) in this evaluation
        self.patterns: dict[str, _Compiled] = {}

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
        PatternRefused: a ``like`` pattern is past this service's bounds.
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
        got = select(stmt.selector, value, budget.spend)
    except ResolutionError:
        return False
    if op == "like":
        return type(got) is str and _like(stmt.value, got, budget)
    if op == "==":
        return equal(got, stmt.value, budget)
    if op == "!=":
        return not equal(got, stmt.value, budget)
    if op in _ORDER:
        want = stmt.value
        return _is_int(got) and _is_int(want) and bool(_ORDER[op](got, want))
    budget.spend(_cost(got))
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
            saying that evaluation exceeded ``max_steps``, or that a ``like`` pattern is
            past this service's bounds (refused even under ``not``: ucantone would
            evaluate it, this service will not pay for it).
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
        except PatternRefused as exc:
            raise ValidationError(
                "MatchError", f"policy statement {_show(stmt)} cannot be evaluated: {exc}"
            ) from None
        if not ok:
            raise ValidationError(
                "MatchError", f"invocation arguments do not satisfy policy statement {_show(stmt)}"
            )


def _show(stmt: Statement) -> str:
    """The statement as DAG-JSON, cut to 200 characters; what is past the cut is not
    rendered at all (a failing statement holding a 900 KB list took 120 ms to render,
    for every invocation refused by it)."""
    import json

    from worker.ucan.cbor import to_dag_json

    try:
        text = json.dumps(to_dag_json(_clip(stmt.wire, [_SHOW_NODES])), ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(_clip(stmt.wire, [_SHOW_NODES]))
    return text if len(text) <= 200 else text[:199] + "…"


#: values rendered by _show: each renders as a character at least, so the first 200 of a
#: walk in document order fill the 200 characters shown
_SHOW_NODES: Final = 200


def _clip(value: Any, left: list[int]) -> Any:
    """A copy of ``value`` holding its first ``left[0]`` values in document order, with
    text cut to 200 characters and bytes to 153 (their base64 is 204 characters)."""
    left[0] -= 1
    t = type(value)
    if t is list or t is tuple:
        out: list[Any] = []
        for v in value:
            if left[0] <= 0:
                break
            out.append(_clip(v, left))
        return out
    if t is dict:
        kept: dict[Any, Any] = {}
        for k, v in value.items():
            if left[0] <= 0:
                break
            left[0] -= 1
            kept[k[:200] if type(k) is str else k] = _clip(v, left)
        return kept
    if t is str:
        return value[:200]
    if t is bytes:
        return value[:153]
    return value
