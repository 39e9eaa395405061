"""The bounds of policy evaluation: what patterns cost, the caches bounded in bytes, and
legitimate policies unaffected by either."""

from __future__ import annotations

import gc
import json
import random
import re
import string
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.principals import load_dag_json
from worker.ucan import CID, ValidationError, parse_policy, selector
from worker.ucan import policy as pm
from worker.ucan.bounded import ENTRY_OVERHEAD, SizedLRU, footprint
from worker.ucan.cbor import to_dag_json


def _steps(pol: list[Any], args: Any) -> int:
    """The steps evaluating ``pol`` over ``args`` spends (all statements must hold)."""
    budget = pm._Budget(pm.MAX_POLICY_STEPS)
    for stmt in parse_policy(pol).statements:
        assert pm.holds(stmt, args, budget), stmt.wire
    return pm.MAX_POLICY_STEPS - budget.left


# --- legitimate policies ------------------------------------------------------------------


def test_the_policy_vectors_are_far_from_every_bound(ucantone: Path) -> None:
    doc = load_dag_json(ucantone / "policy.json")
    for case in doc["valid"]:
        for pol in case["policies"]:
            pm.match_policy(parse_policy(pol), case["args"])
            assert _steps(pol, case["args"]) < 200, pol
    for case in doc["invalid"]:
        for pol in case["policies"]:
            with pytest.raises(ValidationError) as info:
                pm.match_policy(parse_policy(pol), case["args"])
            assert info.value.name == "MatchError"
            assert "do not satisfy" in info.value.message  # not refused for its cost


def test_hilt_like_policies_cost_a_few_dozen_steps() -> None:
    args = {"customer": "did:plc:abc", "product": "did:web:hilt.fil-forge.com", "details": {}}
    assert _steps([["like", ".product", "did:web:*"]], args) < 60
    assert _steps([["like", ".customer", "did:{plc,key}:*"]], args) < 120
    # a long but plain pattern compiles (about 9,200 of the 10,000 steps)
    text = "".join(random.Random(3).choice(string.ascii_letters) for _ in range(4096))
    assert _steps([["like", ".x", text]], {"x": text}) < pm.GLOB_MAX_WORK


def test_a_pattern_is_paid_for_once_per_evaluation_and_the_same_cached_or_not() -> None:
    details = {f"k{i}": f"v{i}" for i in range(1000)}
    pol = [["all", ".details", ["like", ".", "v*"]]]
    pm._GLOBS.clear()
    cold = _steps(pol, {"details": details})
    warm = _steps(pol, {"details": details})
    assert cold == warm  # the outcome never depends on what another evaluation cached
    # compiling "v*" (~40 steps) charged once, not once per item: ~4 steps an item
    assert cold < 5 * len(details)


# --- what patterns cost -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        ("{a,b}" * 9, "expands through its {…} alternatives to 512 patterns, more than the 256"),
        ("{a,b}" * 8 + "x" * 30, "to 256 patterns weighing"),
        ("[\x00-\uffff]" * 5, "weighs 10,"),
        ("ab*" * 500, "(2 a character, 16 a star, more for a class)"),
        ("x" * 4097, "is 4097 characters long, more than the 4096"),
        ("{" * 17 + "a", "nests {…} alternatives more than 16 deep"),
    ],
)
def test_refused_patterns_say_why_and_what_to_do(pattern: str, says: str) -> None:
    pm._GLOBS.clear()
    with pytest.raises(pm.PatternRefused) as info:
        pm.like(pattern, "x")
    assert says in str(info.value)
    assert pattern not in pm._GLOBS
    pol = parse_policy([["like", ".x", pattern]])
    with pytest.raises(ValidationError) as err:
        pm.match_policy(pol, {"x": "x"})
    assert err.value.name == "MatchError"
    assert err.value.message.startswith('policy statement ["like", ".x", ')
    assert "cannot be evaluated: like pattern" in err.value.message


def test_the_measure_of_a_pattern_is_what_expanding_it_makes() -> None:
    rnd = random.Random(7)
    for _ in range(300):
        pattern = "".join(rnd.choice("ab*?{},[]!-") for _ in range(rnd.randrange(1, 30)))
        try:
            tree, _ = pm._glob_tree(pattern, 0, 0, in_alt=False)
        except pm.PatternRefused:
            continue
        count, work = pm._measure(tree)
        alternatives = pm._expand(tree)
        assert count == len(alternatives), pattern
        weight = sum(
            pm._STAR_WEIGHT if piece is None else piece[1] for alt in alternatives for piece in alt
        )
        assert work == weight, pattern


# --- the caches ---------------------------------------------------------------------------


def test_sized_lru_keeps_the_recently_used_within_its_bytes() -> None:
    cache: SizedLRU[str, int] = SizedLRU(10_000, max_entry=3000)
    for i in range(10):  # each accounted as 1,000 bytes
        assert cache.put(f"k{i}", i, 1000 - ENTRY_OVERHEAD)
        assert cache.get("k0") == 0  # used all along: never evicted
    assert cache.total == 10_000 and len(cache) == 10
    assert cache.put("big", -1, 2000 - ENTRY_OVERHEAD)  # evicts the two least recent
    assert list(cache._data) == [*(f"k{i}" for i in range(3, 10)), "k0", "big"]
    assert cache.total == 8 * 1000 + 2000
    assert not cache.put("huge", -2, 5000)  # past max_entry: not kept
    assert "huge" not in cache and cache.total == 10_000
    assert cache.put("k0", 0, 10 - ENTRY_OVERHEAD)  # replaced: its old size is given back
    assert cache.total == 9010 and cache["k0"] == 0
    counted: SizedLRU[int, int] = SizedLRU(1 << 30, max_entries=3)
    for i in range(5):
        counted.put(i, i, 1)
    assert list(counted._data) == [2, 3, 4]
    cache.clear()
    assert len(cache) == 0 and cache.total == 0


def test_footprint_is_near_what_tracemalloc_sees() -> None:
    def traced(make: Any) -> tuple[Any, int]:
        gc.collect()
        tracemalloc.start()
        value = make()
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return value, size

    makers: list[Any] = [
        lambda: {"pad": [{} for _ in range(4000)]},
        lambda: [f"s{i}" * 5 for i in range(3000)],
        lambda: parse_policy([["==", f".a{i}.b", [i, "x" * 40]] for i in range(300)]),
    ]
    for make in makers:
        value, seen = traced(make)
        assert seen * 0.7 <= footprint(value) <= seen * 2, (footprint(value), seen)
    assert footprint([{}] * 1000) < 10_000  # one object, counted once
    assert footprint([[i] for i in range(10**5)], limit=10_000) > 10_000  # stops early


def test_the_pattern_cache_is_bounded_by_the_bytes_it_holds() -> None:
    # before: 512 patterns (lru_cache), each up to 256 alternatives of 4 K characters:
    # 30 of them held 540 MiB
    pm._GLOBS.clear()
    cached_re = len(re._cache)  # type: ignore[attr-defined]
    gc.collect()
    tracemalloc.start()
    for i in range(60):  # 256 alternatives each, ~100 KiB compiled: 6 MiB, past the bound
        assert pm.like("{,}" * 8 + f"{i:03}", f"{i:03}")
    gc.collect()
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert pm._GLOBS.total <= pm.GLOB_CACHE_BYTES
    assert 30 <= len(pm._GLOBS) < 60
    assert held <= pm.GLOB_CACHE_BYTES * 1.5
    assert len(re._cache) == cached_re  # type: ignore[attr-defined]  # re's own cache untouched
    pm._GLOBS.clear()


def test_the_selector_cache_is_bounded_by_the_bytes_it_holds() -> None:
    # selectors are parsed (and their parses cached) before any signature is checked:
    # before, 1,024 parses of 1,024-character selectors held ~60 MiB
    selector._PARSED.clear()
    gc.collect()
    tracemalloc.start()
    for i in range(50):  # ~60 KiB each: 3 MiB, three times the bound
        parse_policy([["==", f".k{i:04}" + ".a" * 508, 1]])
    gc.collect()
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert selector._PARSED.total <= selector.SELECTOR_CACHE_BYTES
    assert 10 <= len(selector._PARSED) < 50
    assert held <= selector.SELECTOR_CACHE_BYTES * 1.5
    usual = selector.parse_selector(".details.region")
    assert selector.parse_selector(".details.region") is usual  # still cached
    selector._PARSED.clear()


# --- the rendering of a statement in errors -------------------------------------------------

_leaf = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.text(max_size=300),
    st.binary(max_size=400),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.builds(CID.dag_cbor, st.binary(max_size=4)),
)
_value = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=60) | st.dictionaries(st.text(max_size=250), inner, max_size=30)
    ),
    max_leaves=250,
)


@settings(max_examples=100, deadline=None)
@given(_value)
def test_a_statement_is_shown_as_before_without_rendering_what_is_cut(value: Any) -> None:
    stmt = parse_policy([["==", ".a", value]]).statements[0]
    whole = json.dumps(to_dag_json(stmt.wire), ensure_ascii=False)
    want = whole if len(whole) <= 200 else whole[:199] + "…"
    assert pm._show(stmt) == want
