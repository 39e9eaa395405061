"""What a holder of any delegation can make one invocation's policy cost.

A holder can extend its own chain with links of any policy, so every cost of evaluating a
policy must be charged to the evaluation's step budget before it is paid. These tests
assert the bound structurally (what was refused, what was never compiled, what was
charged), not by wall-clock time; bench/policy_bench.py measures the times.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator
from typing import Any

import pytest

from tests.security.helpers import NOW, dlg, inv
from worker.ucan import (
    Delegation,
    Invocation,
    Signer,
    ValidationError,
    cbor,
    decode_token,
    validate_invocation,
)
from worker.ucan import policy as policy_module
from worker.ucan.policy import GLOB_MAX_WORK, MAX_POLICY_STEPS


@pytest.fixture(scope="module")
def service() -> Signer:
    return Signer.generate()


@pytest.fixture(scope="module")
def holder() -> Signer:
    return Signer.generate()


@pytest.fixture
def compiles(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The regexes compiled for ``like`` patterns while the test runs (the cache empty)."""
    seen: list[str] = []
    real = policy_module._re_compile

    def counting(source: str, flags: int) -> Any:
        seen.append(source)
        return real(source, flags)

    monkeypatch.setattr(policy_module, "_re_compile", counting)
    policy_module._GLOBS.clear()
    yield seen
    policy_module._GLOBS.clear()


def attack_pattern(rnd: random.Random, size: int = 4096, groups: int = 8) -> str:
    """A ``size``-character pattern of ``groups`` ``{a,b}`` groups among random letters:
    256 alternatives of ~4,000 characters each."""
    per = (size - groups * 5) // (groups + 1)
    words = []
    for _ in range(groups):
        words.append("".join(rnd.choice(string.ascii_lowercase) for _ in range(per)))
        words.append("{a,b}")
    out = "".join(words)
    return out + "".join(rnd.choice(string.ascii_lowercase) for _ in range(size - len(out)))


def validate(
    service: Signer, holder: Signer, pol: list[Any], args: dict[str, Any]
) -> ValidationError | None:
    """Validate an invocation by ``holder`` under a delegation from the service with ``pol``."""
    d = dlg(service, holder, sub=service.did, pol=pol)
    i = inv(holder, service.did, [d], args_raw=cbor.encode(args))
    delegation, invocation = decode_token(d), decode_token(i)
    assert isinstance(delegation, Delegation) and isinstance(invocation, Invocation)
    try:
        validate_invocation(invocation, {delegation.cid: delegation}, now=NOW)
    except ValidationError as exc:
        return exc
    return None


def test_thirty_not_like_statements_over_costly_patterns_are_refused_before_compiling(
    service: Signer, holder: Signer, compiles: list[str]
) -> None:
    # issue 20's attack: before, this policy held (none of the patterns matches "hello",
    # so every "not like" is true) after 23.5 s of CPU on the event loop, and it left
    # 7,680 compiled regexes of ~4 K characters (540 MiB) in the pattern cache
    rnd = random.Random(20)
    pol = [["not", ["like", ".x", attack_pattern(rnd)]] for _ in range(30)]
    err = validate(service, holder, pol, {"x": "hello"})
    assert err is not None and err.name == "MatchError", err
    assert "cannot be evaluated" in err.message
    assert "256 patterns weighing" in err.message
    assert f"more than the {GLOB_MAX_WORK:,} this service compiles" in err.message
    assert '"or" of simpler "like" statements' in err.message  # what to do instead
    assert compiles == []  # refused from its measure, before any expansion or compile
    assert len(policy_module._GLOBS) == 0


def test_a_refused_pattern_fails_closed_even_under_not_or_or(
    service: Signer, holder: Signer
) -> None:
    costly = "{a,b}" * 8 + "x" * 20  # 256 alternatives of 28 characters
    for pol in (
        [["not", ["like", ".x", costly]]],
        [["or", [["like", ".x", costly], ["==", ".y", 1]]]],
        [["not", ["like", ".x", "{a,b}" * 9]]],  # 512 alternatives
        [["not", ["like", ".x", "*" * 5000]]],  # longer than GLOB_MAX_LENGTH
        [["not", ["like", ".x", "{" * 20 + "a"]]],  # nested deeper than GLOB_MAX_NESTING
    ):
        err = validate(service, holder, pol, {"x": "hello", "y": 2})
        assert err is not None and err.name == "MatchError", pol
        assert "cannot be evaluated" in err.message, err.message
    # a pattern gobwas itself would not compile still matches nothing, as in ucantone
    assert validate(service, holder, [["not", ["like", ".x", "[z-a]"]]], {"x": "q"}) is None


def test_compiling_is_charged_to_the_budget_before_it_is_done(compiles: list[str]) -> None:
    # under the pattern cap, but not payable from what is left of the budget: refused
    # as over budget, and nothing was compiled
    pattern = "".join(random.Random(1).choice("abc") for _ in range(4000))  # ~9,000
    pol = policy_module.parse_policy([["like", ".x", pattern]])
    with pytest.raises(ValidationError, match="exceeds 5000 steps"):
        policy_module.match_policy(pol, {"x": "abc"}, max_steps=5000)
    assert compiles == []
    policy_module.match_policy(pol, {"x": pattern}, max_steps=MAX_POLICY_STEPS)
    assert len(compiles) == 1


def test_a_scan_is_charged_before_it_runs(
    service: Signer, holder: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a segment of 1,000 wildcards between stars tries 1,000 characters at each of the
    # 900,000 positions of the text (1.6 s before, charged as one step per KiB)
    matched: list[str] = []
    real = policy_module._glob_match

    def counting(g: Any, text: str) -> bool:
        matched.append(text)
        return real(g, text)

    monkeypatch.setattr(policy_module, "_glob_match", counting)
    pol = [["like", ".x", "*" + "?" * 1000 + "b*"]]
    err = validate(service, holder, pol, {"x": "a" * 900_000})
    assert err is not None and f"exceeds {MAX_POLICY_STEPS} steps" in err.message
    assert matched == []
    # the same pattern over a short text is cheap and matches
    assert validate(service, holder, pol, {"x": "a" * 1000 + "b"}) is None


def test_selectors_are_charged_as_they_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.ucan import selector

    walked: list[int] = []
    real = selector._iterate

    def counting(v: Any) -> list[Any]:
        walked.append(len(v))
        return real(v)

    monkeypatch.setattr(selector, "_iterate", counting)
    args = {"l": [[1] * 1000 for _ in range(1000)]}  # .l[][] flattens a million items
    pol = policy_module.parse_policy([["any", ".l[][]", ["==", ".", 2]]])
    with pytest.raises(ValidationError, match="exceeds"):
        policy_module.match_policy(pol, args)
    # stopped after the budget's worth of lists, not after flattening all of them
    assert sum(walked) <= MAX_POLICY_STEPS + 1000


def test_deep_equality_is_charged_as_it_walks(service: Signer, holder: Signer) -> None:
    # 30 statements comparing 10 copies of 10 lists of 1,000 items: 3 million comparisons
    # (0.44 s before, and the policy held), charged as 30 × 10 × 10 steps (the items of
    # .l and the lists in each copy); now each item compared is a step
    v = [[i % 24 for i in range(1000)] for _ in range(10)]
    pol = [["all", ".l", ["==", ".", v]]] * 30
    err = validate(service, holder, pol, {"l": [v] * 10})
    assert err is not None and f"exceeds {MAX_POLICY_STEPS} steps" in err.message
    # a comparison of 4,000 items is within the budget and holds
    w = [[i % 24 for i in range(400)] for _ in range(10)]
    assert validate(service, holder, [["all", ".l", ["==", ".", w]]], {"l": [w]}) is None


def test_a_failing_statement_is_rendered_without_walking_all_of_it(
    service: Signer, holder: Signer
) -> None:
    # the error names the statement, cut to 200 characters: rendering it whole took
    # 120 ms for a 900 KB list, for every invocation the statement refused
    big = [i % 24 for i in range(900_000)]
    pol = policy_module.parse_policy([["==", ".a", big]])
    with pytest.raises(ValidationError) as info:
        policy_module.match_policy(pol, {"a": 1})
    assert info.value.message.endswith("…")
    assert len(info.value.message) < 300


def test_what_any_delegation_can_cost_is_bounded_in_steps() -> None:
    """The hostile shapes of bench/policy_bench.py and more: each is refused, by a charge
    that did not fit in the budget (before its work was done) or a refused pattern."""
    rnd = random.Random(5)
    shapes: list[tuple[list[Any], dict[str, Any]]] = [
        ([["not", ["like", ".x", attack_pattern(rnd)]] for _ in range(30)], {"x": "hello"}),
        ([["like", ".x", "{a,b}" * 8 + "[\x00-\uffff]" * 100]], {"x": "hello"}),
        ([["like", ".x", "[\x00-\uffff]" * 5]], {"x": "hello"}),  # 10,500: over the cap
        ([["like", ".x", "*" + "?" * 4000 + "b*"]], {"x": "a" * 900_000}),
        ([["like", ".x", "*" + "{?,[a]}" * 8 + "?" * 16 + "b*"]], {"x": "a" * 900_000}),
        ([["any", ".l[][]", ["==", ".", 2]]] * 30, {"l": [[1] * 900 for _ in range(1000)]}),
        ([["==", ".a", 1]] * 6000, {"a": 1}),
        (
            [["like", ".x", f"*{i:04}*"] for i in range(600)],
            {"x": "".join(f"{i:04}" for i in range(600)) * 4},
        ),
    ]
    for pol, args in shapes:
        budget = policy_module._Budget(MAX_POLICY_STEPS)
        refused = False
        try:
            for stmt in policy_module.parse_policy(pol).statements:
                if not policy_module.holds(stmt, args, budget):
                    break
        except (policy_module._OverBudget, policy_module.PatternRefused):
            refused = True
        assert refused, str(pol)[:80]
