"""Authorization attacks: each gets ucantone's error name (or the project's) and writes nothing.

Unit tests drive ``validate_invocation`` + ``check_audience`` (and the command's own checks)
directly; the end-to-end ones go through the real worker and prove no row was written.
"""

from __future__ import annotations

import asyncio
import re
import time
import warnings
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.security.helpers import NOW, customer_did, dlg, inv, old_glob_regex
from tests.support.worker import Requester
from worker import commands
from worker.commands import CommandError, Context
from worker.service.app import App
from worker.ucan import (
    CID,
    Delegation,
    Invocation,
    Receipt,
    Resolver,
    Signer,
    ValidationError,
    build_receipt,
    check_audience,
    customer_add_args,
    decode_request,
    decode_token,
    encode,
    encode_container,
    validate_invocation,
)
from worker.ucan.policy import PatternRefused, like
from worker.ucan.validate import MAX_PROOFS


@pytest.fixture(scope="module")
def service() -> Signer:
    return Signer.generate()


@pytest.fixture(scope="module")
def hilt() -> Signer:
    return Signer.generate()


@pytest.fixture(scope="module")
def mallory() -> Signer:
    return Signer.generate()


def refused(
    invocation: bytes,
    proofs: list[bytes],
    service_did: str,
    *,
    now: int = NOW,
    clock_skew: int = 0,
    resolver: Resolver | None = None,
) -> ValidationError | CommandError | None:
    """What the worker's pipeline says about one invocation: audience, then ucantone's
    validation, then the command's own checks. None when it would be executed."""
    tok = decode_token(invocation)
    assert isinstance(tok, Invocation)
    delegations: dict[CID, Delegation] = {}
    for p in proofs:
        d = decode_token(p)
        assert isinstance(d, Delegation)
        delegations[d.cid] = d
    try:
        check_audience(tok, service_did)
        validate_invocation(
            tok, delegations, now=now, clock_skew=clock_skew, resolver=resolver or Resolver()
        )
        handler = commands.lookup(tok.cmd)
        if handler is None:
            raise CommandError("HandlerNotFound", tok.cmd)
        handler.prepare(tok, Context(service_did))
    except (ValidationError, CommandError) as exc:
        return exc
    return None


def name_of(invocation: bytes, proofs: list[bytes], service_did: str, **kw: Any) -> str | None:
    err = refused(invocation, proofs, service_did, **kw)
    return None if err is None else err.name


# --- chains ---------------------------------------------------------------------------------


def test_the_honest_chain_passes(service: Signer, hilt: Signer) -> None:
    d = dlg(service, hilt, sub=service.did)
    assert name_of(inv(hilt, service.did, [d]), [d], service.did) is None


def test_forged_root_not_issued_by_the_subject(
    service: Signer, hilt: Signer, mallory: Signer
) -> None:
    # mallory delegates the service's subject to herself: the chain does not start at sub
    forged = dlg(mallory, mallory, sub=service.did)
    assert name_of(inv(mallory, service.did, [forged]), [forged], service.did) == "InvalidAudience"
    # mallory signs a root that claims to come from the service: the signature gives it away
    claims_service = dlg(mallory.with_did(service.did), mallory, sub=service.did)
    err = refused(inv(mallory, service.did, [claims_service]), [claims_service], service.did)
    assert err is not None and err.name == "InvalidSignature"


def test_a_chain_that_skips_a_link(service: Signer, hilt: Signer, mallory: Signer) -> None:
    carol = Signer.generate()
    d1 = dlg(service, hilt, sub=service.did)  # service -> hilt
    d3 = dlg(carol, mallory, sub=service.did)  # carol -> mallory; hilt -> carol missing
    assert name_of(inv(mallory, service.did, [d1, d3]), [d1, d3], service.did) == (
        "InvalidAudience"
    )
    # the invoker is not the last audience either
    assert name_of(inv(mallory, service.did, [d1]), [d1], service.did) == "InvalidAudience"


def test_a_missing_proof_is_unavailable(service: Signer, hilt: Signer) -> None:
    d = dlg(service, hilt, sub=service.did)
    assert name_of(inv(hilt, service.did, [d]), [], service.did) == "UnavailableProof"


def test_cycles_are_walked_only_as_far_as_the_bound(service: Signer, hilt: Signer) -> None:
    carol = Signer.generate()
    root = dlg(service, hilt, sub=service.did)
    there = dlg(hilt, carol, sub=service.did)
    back = dlg(carol, hilt, sub=service.did)
    proofs = [root, there, back]
    # a short aligned cycle is a chain like any other (as in ucantone)
    short = [root, there, back, there, back]
    assert name_of(inv(hilt, service.did, short), proofs, service.did) is None
    # a misaligned repeat is refused
    assert name_of(inv(hilt, service.did, [root, root]), proofs, service.did) == "InvalidAudience"
    # an aligned cycle past the bound is refused before any link is walked
    long = [root] + [there, back] * (MAX_PROOFS // 2)
    assert len(long) == MAX_PROOFS + 1
    err = refused(inv(hilt, service.did, long), proofs, service.did)
    assert err is not None and err.name == "InvalidClaim"
    assert f"at most {MAX_PROOFS}" in err.message


def test_an_overlong_chain_is_bounded_and_refused(service: Signer) -> None:
    # MAX_PROOFS links, each a fresh principal: accepted; one more: refused
    signers = [service] + [Signer.generate() for _ in range(MAX_PROOFS + 1)]
    chain = [dlg(signers[i], signers[i + 1], sub=service.did) for i in range(MAX_PROOFS + 1)]
    at_limit = inv(signers[MAX_PROOFS], service.did, chain[:MAX_PROOFS])
    assert name_of(at_limit, chain, service.did) is None
    over = inv(signers[MAX_PROOFS + 1], service.did, chain)
    assert name_of(over, chain, service.did) == "InvalidClaim"
    # thousands of links (as many as a message holds) cost no more than the count
    links = [CID.dag_cbor(i.to_bytes(4, "big")) for i in range(20_000)]
    huge = inv(service, service.did, prf=links)
    start = time.perf_counter()
    assert name_of(huge, [], service.did) == "InvalidClaim"
    assert time.perf_counter() - start < 0.5


def test_a_powerline_delegation_cannot_be_the_root(service: Signer, hilt: Signer) -> None:
    powerline = dlg(service, hilt, sub=None)
    assert name_of(inv(hilt, service.did, [powerline]), [powerline], service.did) == (
        "InvalidClaim"
    )
    # below a proper root a powerline link is fine (ucantone)
    carol = Signer.generate()
    root = dlg(service, hilt, sub=service.did)
    below = dlg(hilt, carol, sub=None)
    assert name_of(inv(carol, service.did, [root, below]), [root, below], service.did) is None


def test_subject_confusion(service: Signer, hilt: Signer, mallory: Signer) -> None:
    # a delegation of another subject in the chain
    root = dlg(service, hilt, sub=service.did)
    other = dlg(hilt, mallory, sub=mallory.did)
    assert name_of(inv(mallory, service.did, [root, other]), [root, other], service.did) == (
        "InvalidSubject"
    )
    # mallory is her own subject and addresses the service: UCAN-valid, but the command
    # only acts for the service as subject
    own = dlg(mallory, hilt, sub=mallory.did)
    confused = inv(hilt, service.did, [own], sub=mallory.did, aud=service.did)
    assert name_of(confused, [own], service.did) == "InvalidCustomerSubject"
    self_issued = inv(mallory, service.did, sub=mallory.did, aud=service.did)
    assert name_of(self_issued, [], service.did) == "InvalidCustomerSubject"


def test_wrong_audience(service: Signer, hilt: Signer) -> None:
    d = dlg(service, hilt, sub=service.did)
    elsewhere = inv(hilt, service.did, [d], aud="did:web:someone-else.example")
    assert name_of(elsewhere, [d], service.did) == "InvalidAudience"
    # and the container decoder keeps it, so the worker can skip it (ucantone's server does)
    req = decode_request(encode_container([elsewhere, d]))
    assert [i.audience for i in req.invocations] == ["did:web:someone-else.example"]


@pytest.mark.parametrize(
    ("which", "offset", "skew", "expected"),
    [
        ("inv-exp", 0, 0, "Expired"),  # exp == now is expired (exp <= now)
        ("inv-exp", 1, 0, None),
        ("inv-exp", -30, 0, "Expired"),
        ("inv-exp", -30, 60, None),  # inside the leeway
        ("inv-exp", -60, 60, "Expired"),  # exp + skew == now
        ("dlg-exp", 0, 0, "Expired"),
        ("dlg-exp", -30, 60, None),
        ("dlg-exp", -3600, 60, "Expired"),
        ("dlg-nbf", 0, 0, "TooEarly"),  # nbf == now is too early (now <= nbf)
        ("dlg-nbf", -1, 0, None),
        ("dlg-nbf", 30, 0, "TooEarly"),
        ("dlg-nbf", 30, 60, None),
        ("dlg-nbf", 60, 60, "TooEarly"),
        ("dlg-nbf", 3600, 60, "TooEarly"),
    ],
)
def test_time_bounds_with_and_without_skew(
    service: Signer, hilt: Signer, which: str, offset: int, skew: int, expected: str | None
) -> None:
    t = NOW + offset
    d = dlg(
        service,
        hilt,
        sub=service.did,
        exp=t if which == "dlg-exp" else None,
        nbf=t if which == "dlg-nbf" else None,
    )
    i = inv(hilt, service.did, [d], exp=t if which == "inv-exp" else NOW + 300)
    assert name_of(i, [d], service.did, clock_skew=skew) == expected


def test_a_delegation_for_another_command(service: Signer, hilt: Signer) -> None:
    remove = dlg(service, hilt, sub=service.did, cmd="/customer/remove")
    assert name_of(inv(hilt, service.did, [remove]), [remove], service.did) == "UnknownError"
    carol = Signer.generate()
    add = dlg(hilt, carol, sub=service.did, cmd="/customer/add")
    assert name_of(inv(carol, service.did, [remove, add]), [remove, add], service.did) == (
        "ImpossibleAttenuation"
    )
    # /cust is not a segment prefix of /customer/add
    cust = dlg(service, hilt, sub=service.did, cmd="/cust")
    assert name_of(inv(hilt, service.did, [cust]), [cust], service.did) == "UnknownError"
    # while /customer covers it, and / covers everything
    for granted in ("/customer", "/"):
        d = dlg(service, hilt, sub=service.did, cmd=granted)
        assert name_of(inv(hilt, service.did, [d]), [d], service.did) is None


def test_self_issued_by_the_service_but_signed_by_another_key(
    service: Signer, mallory: Signer
) -> None:
    impostor = mallory.with_did(service.did)
    err = refused(inv(impostor, service.did), [], service.did)
    assert err is not None and err.name == "InvalidSignature"
    # the same when the service is a did:web resolved through its configured key
    web = service.with_did("did:web:upload.example")
    resolver = Resolver({web.did: [service.public_key]})
    assert name_of(inv(web, web.did), [], web.did, resolver=resolver) is None
    forged = inv(mallory.with_did(web.did), web.did)
    assert name_of(forged, [], web.did, resolver=resolver) == "InvalidSignature"
    # and a did:web nobody configured cannot be resolved at all
    assert name_of(forged, [], web.did) == "DIDKeyResolutionError"


def test_receipts_and_delegations_are_not_invocations(service: Signer, hilt: Signer) -> None:
    d = dlg(service, hilt, sub=service.did)
    task = decode_token(inv(hilt, service.did, [d]))
    assert isinstance(task, Invocation)
    receipt = build_receipt(service, ran=task.task_cid, iat=NOW)
    for body in (d, receipt, encode_container([d, receipt])):
        req = decode_request(body)
        assert req.invocations == []  # nothing for the dispatcher to execute
    assert isinstance(decode_request(receipt).receipts[0], Receipt)
    # a receipt-shaped token with an audience is an invocation of /ucan/assert/receipt,
    # which no handler serves
    assert commands.lookup("/ucan/assert/receipt") is None


# --- policies -------------------------------------------------------------------------------


def with_policy(
    service: Signer, hilt: Signer, pol: list[Any], args: dict[str, Any] | bytes
) -> str | None:
    d = dlg(service, hilt, sub=service.did, pol=pol)
    raw = args if isinstance(args, bytes) else encode(args)
    tok = decode_token(inv(hilt, service.did, [d], args_raw=raw))
    assert isinstance(tok, Invocation)
    proof = decode_token(d)
    assert isinstance(proof, Delegation)
    try:
        validate_invocation(tok, {proof.cid: proof}, now=NOW)
    except ValidationError as exc:
        return exc.name
    return None


ARGS = {"customer": "did:plc:abc", "product": "did:web:p", "details": {"n": "1"}}


@pytest.mark.parametrize(
    ("statement", "args", "passes"),
    [
        # a selector on a missing field fails the statement, even for != and not-equal-null
        (["==", ".externalAccount", None], ARGS, False),
        (["!=", ".externalAccount", "stripe:evil"], ARGS, False),
        (["!=", ".product", "did:web:evil"], {"customer": "did:plc:abc"}, False),
        # ... while an optional selector yields null, as the delegator chose
        (["==", ".externalAccount?", None], ARGS, True),
        (["==", ".details.n", "1"], ARGS, True),
        # type confusion: typed equality and integer-only ordering
        (["==", ".details.n", 1], ARGS, False),
        (["==", ".n", 1], {"n": "1"}, False),
        (["==", ".n", 1], {"n": [1]}, False),
        (["==", ".n", 1], {"n": True}, False),
        (["==", ".n", 1], {"n": 1.0}, False),
        (["==", ".n", [1]], {"n": [1]}, True),
        ([">", ".n", 5], {"n": "9"}, False),
        ([">", ".n", 5], {"n": [9]}, False),
        ([">", ".n", 5], {"n": 9}, True),
        (["<", ".n", 5], {"n": None}, False),
        # quantifiers over what is not a collection
        (["all", ".n", ["==", ".", 1]], {"n": 1}, False),
        (["any", ".n", ["==", ".", 1]], {"n": []}, False),
        (["all", ".n", ["==", ".", 1]], {"n": {"a": 1, "b": 2}}, False),
        # a list where text is expected does not slip through like
        (["like", ".customer", "did:plc:*"], {"customer": ["did:plc:x"]}, False),
        (["like", ".customer", "did:plc:*"], {"customer": "did:plc:x"}, True),
        # glob metacharacters in the args are data, not pattern
        (["like", ".customer", "did:plc:abc"], {"customer": "did:plc:ab?"}, False),
        (["like", ".customer", "did:plc:abc"], {"customer": "did:plc:*"}, False),
        (["like", ".customer", "did:plc:abc"], {"customer": "did:plc:[a-c]bc"}, False),
        # gobwas metacharacters in the pattern (ucantone's reading, not the spec's)
        (["like", ".customer", "did:plc:???"], {"customer": "did:plc:abc"}, True),
        (["like", ".customer", "did:plc:???"], {"customer": "did:plc:abcd"}, False),
        (["like", ".customer", "did:{plc,web}:*"], {"customer": "did:web:x"}, True),
        (["like", ".customer", "did:{plc,web}:*"], {"customer": "did:key:x"}, False),
        (["like", ".customer", "did:plc:[a-c]*"], {"customer": "did:plc:dx"}, False),
        (["like", ".customer", "did:plc:[!a-c]*"], {"customer": "did:plc:dx"}, True),
        (["like", ".customer", "did:plc:\\*"], {"customer": "did:plc:x"}, False),
        (["like", ".customer", "did:plc:\\*"], {"customer": "did:plc:*"}, True),
        # a malformed class matches nothing (gobwas would not compile it) instead of raising
        (["like", ".customer", "did:plc:[z-a]"], {"customer": "did:plc:q"}, False),
        (["like", ".customer", "[!]"], {"customer": "x"}, False),
        (["like", ".customer", "{" * 5000], {"customer": "x"}, False),
        # not of a failing selector is true: the delegator's statement, not a bypass
        (["not", ["==", ".missing", 1]], ARGS, True),
    ],
)
def test_policy_bypass_attempts(
    service: Signer, hilt: Signer, statement: list[Any], args: dict[str, Any], passes: bool
) -> None:
    got = with_policy(service, hilt, [statement], args)
    assert got == (None if passes else "MatchError"), statement


def test_policies_of_every_link_apply(service: Signer, hilt: Signer) -> None:
    carol = Signer.generate()
    root = dlg(service, hilt, sub=service.did, pol=[["like", ".customer", "did:plc:*"]])
    narrower = dlg(hilt, carol, sub=service.did, pol=[["==", ".product", "did:web:only"]])
    args = customer_add_args("did:plc:abc", "did:web:other", {})
    i = inv(carol, service.did, [root, narrower], args_raw=args)
    assert name_of(i, [root, narrower], service.did) == "MatchError"


def test_like_is_linear_on_hostile_patterns() -> None:
    # as a regex, ``.*a.*a…b`` backtracks exponentially (7 stars on 60 chars: seconds)
    text = "a" * 200_000
    start = time.perf_counter()
    for k in (6, 12, 40):
        assert not like("*a" * k + "b", text)
        assert like("*a" * k, text)
    assert not like("{a,b}" * 6 + "*" + "?" * 10 + "c", text)  # 64 alternatives
    with pytest.raises(PatternRefused, match="256 patterns weighing"):
        like("{a,b}" * 8 + "*" + "?" * 10 + "c", text)  # too costly to compile: refused
    with pytest.raises(PatternRefused, match="512 patterns"):
        like("{a,b}" * 9, "ab")  # 512: past the bound, refused (not "no match": see below)
    assert time.perf_counter() - start < 2.0


_glob_chars = st.sampled_from(list("ab*?[]{},!-\\"))


@settings(max_examples=300, deadline=None)
@given(st.text(_glob_chars, max_size=10), st.text(st.sampled_from("ab-*?[]{},!\\\n"), max_size=8))
def test_like_agrees_with_the_regex_reading(pattern: str, text: str) -> None:
    try:
        with warnings.catch_warnings():
            # a class such as ``[?--]`` makes re warn of a possible future set syntax: the
            # oracle is today's reading, which is the one being compared against
            warnings.simplefilter("ignore", FutureWarning)
            oracle = re.compile(old_glob_regex(pattern)[0], re.DOTALL)
    except (re.error, RecursionError):
        assert not like(pattern, text)  # what did not compile matches nothing
        return
    assert like(pattern, text) == (oracle.fullmatch(text) is not None), (pattern, text)


def test_a_class_re_would_warn_about_neither_warns_nor_raises() -> None:
    # ``--`` in a class makes re emit a FutureWarning (an error under pytest's filters): a
    # pattern from a delegation must neither write to stderr nor escape as an exception
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not like("[b--]x", "-x")  # a range from b down to -: bad, matches nothing
        assert like("[--b]y", "ay")  # from - up to b
        assert not like("[--b]y", "cy")


# --- sizes ----------------------------------------------------------------------------------


def test_args_bigger_than_the_limit(service: Signer) -> None:
    from worker.ucan import DecodeError

    big = customer_add_args(customer_did(), "did:web:p", {"k": "x" * (1 << 20)})
    token = inv(service, service.did, args_raw=big)
    with pytest.raises(DecodeError, match="exceeds"):
        decode_request(token)
    with pytest.raises(DecodeError, match="exceeds"):
        decode_request(encode_container([token]))


def test_a_container_of_8192_invocations(service: Signer) -> None:
    from worker.ucan import DecodeError
    from worker.ucan.container import MAX_TOKENS

    tokens = [inv(service, service.did, nonce=i.to_bytes(4, "big")) for i in range(MAX_TOKENS)]
    body = encode_container(tokens)
    assert len(body) > 1 << 20
    with pytest.raises(DecodeError, match="exceeds"):
        decode_request(body)  # the default limit refuses it before decoding
    start = time.perf_counter()
    req = decode_request(body, max_size=len(body))
    assert len(req.invocations) == MAX_TOKENS
    resolver = Resolver()
    for tok in req.invocations:
        validate_invocation(tok, {}, now=NOW, resolver=resolver)
    assert time.perf_counter() - start < 10.0
    more = encode({"ctn-v1": sorted([*tokens, inv(service, service.did)])})
    with pytest.raises(DecodeError, match="more than 8192"):
        decode_request(more, max_size=len(more))


# --- end to end: through the real worker, nothing is written -----------------------------


async def _count(database_url: str, sql: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def _updated_at(database_url: str, customer: str) -> Any:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval(
            "SELECT updated_at FROM public.customer WHERE customer = $1", customer
        )
    finally:
        await conn.close()


@pytest.mark.integration
async def test_attacks_through_the_worker_get_error_receipts_and_write_nothing(
    worker: App, requester: Requester, database_url: str
) -> None:
    service = worker.key.signer if worker.key else None
    assert service is not None
    now = int(time.time())
    hilt, mallory, carol = Signer.generate(), Signer.generate(), Signer.generate()
    root = dlg(service, hilt, sub=service.did)
    forged = dlg(mallory, mallory, sub=service.did)
    powerline = dlg(service, hilt, sub=None)
    other_cmd = dlg(service, hilt, sub=service.did, cmd="/customer/remove")
    expired = dlg(service, hilt, sub=service.did, exp=now - 3600)
    early = dlg(service, hilt, sub=service.did, nbf=now + 3600)
    typed = dlg(service, hilt, sub=service.did, pol=[["==", ".details.n", 1]])
    redos = dlg(service, hilt, sub=service.did, pol=[["like", ".customer", "*a" * 30 + "b"]])
    bad_glob = dlg(service, hilt, sub=service.did, pol=[["like", ".customer", "[z-a]"]])
    own = dlg(mallory, hilt, sub=mallory.did)
    there, back = dlg(hilt, carol, sub=service.did), dlg(carol, hilt, sub=service.did)
    long = [root] + [there, back] * (MAX_PROOFS // 2)
    exp = now + 300
    a_args = customer_add_args("did:plc:" + "a" * 5000, "did:web:p", {})
    n_args = customer_add_args(customer_did(), "did:web:p", {"n": "1"})
    cases: dict[str, tuple[str, bytes]] = {
        "forged root": ("InvalidAudience", encode_container([inv(mallory, service.did, [forged], exp=exp), forged])),
        "powerline root": ("InvalidClaim", encode_container([inv(hilt, service.did, [powerline], exp=exp), powerline])),
        "overlong chain": ("InvalidClaim", encode_container([inv(hilt, service.did, long, exp=exp), root, there, back])),
        "another command": ("UnknownError", encode_container([inv(hilt, service.did, [other_cmd], exp=exp), other_cmd])),
        "expired proof": ("Expired", encode_container([inv(hilt, service.did, [expired], exp=exp), expired])),
        "proof not yet valid": ("TooEarly", encode_container([inv(hilt, service.did, [early], exp=exp), early])),
        "type confusion": ("MatchError", encode_container([inv(hilt, service.did, [typed], exp=exp, args_raw=n_args), typed])),
        "redos pattern": ("MatchError", encode_container([inv(hilt, service.did, [redos], exp=exp, args_raw=a_args), redos])),
        "malformed glob": ("MatchError", encode_container([inv(hilt, service.did, [bad_glob], exp=exp), bad_glob])),
        "own subject": ("InvalidCustomerSubject", encode_container([inv(hilt, service.did, [own], sub=mallory.did, exp=exp), own])),
        "impostor": ("InvalidSignature", inv(mallory.with_did(service.did), service.did, exp=exp)),
        "skipped link": ("InvalidAudience", encode_container([inv(mallory, service.did, [root], exp=exp), root])),
    }  # fmt: skip
    for what, (expected, body) in cases.items():
        _, receipts = await requester.call(body)
        assert len(receipts) == 1, what
        err = receipts[0].error
        assert err is not None and err["name"] == expected, (what, err)
    # a delegation or a receipt where an invocation belongs: nothing to execute, an empty answer
    ran = decode_token(inv(hilt, service.did, [root], exp=exp))
    assert isinstance(ran, Invocation)
    reply_to = await requester.reply_queue()
    for body in (root, build_receipt(service, ran=ran.task_cid, iat=now)):
        await requester.publish(body, reply_to=reply_to)
    assert worker.consumer is not None
    await worker.consumer.wait_for("skipped", 2)
    for _ in range(2):
        assert (await requester.next(reply_to)).body == encode_container([])
    assert await _count(database_url, "SELECT count(*) FROM public.customer") == 0
    assert await _count(database_url, "SELECT count(*) FROM forge_worker.receipts") == 0


@pytest.mark.integration
async def test_a_replayed_task_is_answered_from_the_ledger_not_executed(
    worker: App, requester: Requester, database_url: str
) -> None:
    assert worker.key is not None and worker.consumer is not None
    service = worker.key.signer
    hilt = Signer.generate()
    root = dlg(service, hilt, sub=service.did)
    customer = customer_did()
    args = customer_add_args(customer, "did:web:p", {"k": "v"})
    nonce = b"\x01" * 16
    first = inv(hilt, service.did, [root], args_raw=args, nonce=nonce, exp=int(time.time()) + 60)
    answer, receipts = await requester.call(encode_container([first, root]))
    assert receipts[0].ok == {}
    written = await _updated_at(database_url, customer)
    assert written is not None
    # an hour later the invocation has expired: the replay is still answered, from the ledger
    worker.consumer.clock = lambda: time.time() + 3600
    again, _ = await requester.call(encode_container([first, root]))
    assert again.body == answer.body
    # the same task in a new envelope (a fresh expiry, so another invocation CID)
    twin = inv(hilt, service.did, [root], args_raw=args, nonce=nonce, exp=int(time.time()) + 7200)
    assert decode_token(twin).cid != decode_token(first).cid
    twin_answer, _ = await requester.call(encode_container([twin, root]))
    assert twin_answer.body == answer.body
    assert await _updated_at(database_url, customer) == written  # never touched again
    assert await _count(database_url, "SELECT count(*) FROM forge_worker.receipts") == 1
    # the answer can reach the queue before the worker settles and counts the message
    await asyncio.wait_for(worker.consumer.wait_for("duplicate", 2), timeout=10)
    assert worker.consumer.outcomes["duplicate"] == 2
    # while a task never seen before, expired, is refused
    late = inv(hilt, service.did, [root], exp=int(time.time()) + 60)
    _, receipts = await requester.call(encode_container([late, root]))
    assert receipts[0].error is not None and receipts[0].error["name"] == "Expired"


def test_policy_evaluation_is_bounded(service: Signer, hilt: Signer) -> None:
    from worker.ucan.policy import MAX_POLICY_STEPS

    # quadratic: every statement walks the whole list (unbounded, 9 s; a 1 MiB message: hours)
    pol = [["all", ".l", ["==", ".", 1]]] * 1000
    start = time.perf_counter()
    assert with_policy(service, hilt, pol, {"l": [1] * 10_000}) == "MatchError"
    assert time.perf_counter() - start < 1.0
    # the same shape within the budget still holds
    assert with_policy(service, hilt, pol[:3], {"l": [1] * 1000}) is None
    # a realistic policy over a large details map is far from the bound
    details = {f"k{i}": f"v{i}" for i in range(1000)}
    real = [["like", ".customer", "did:plc:*"], ["all", ".details", ["like", ".", "v*"]]]
    args = {"customer": "did:plc:x", "product": "did:web:p", "details": details}
    assert with_policy(service, hilt, real, args) is None
    assert MAX_POLICY_STEPS > 2 * 1000 + 10
