"""Hostile request bodies: every input ends in a DecodeError or a value, in bounded time and
memory, and nothing past the decoder (validation, the command's checks) raises anything else.

Extends tests/ucan/test_fuzz.py (random bytes and a few random mutations of four bodies)
with a real Hilt-style request cut at every offset, spliced, bit-flipped at every byte,
absurd declared lengths measured with tracemalloc, nesting, huge and duplicate maps, the
values DAG-CBOR forbids placed inside a signed token, trailing bytes, oversized bodies and
gzip bombs in every gzip form.
"""

from __future__ import annotations

import base64
import functools
import gzip
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.security.helpers import NOW, dlg, inv
from worker import commands
from worker.commands import CommandError, Context
from worker.ucan import (
    DecodeError,
    Delegation,
    Invocation,
    Request,
    Resolver,
    Signer,
    ValidationError,
    check_audience,
    decode,
    decode_request,
    decode_token,
    encode_container,
    validate_invocation,
)
from worker.ucan import container as ctn
from worker.ucan.cbor import MAX_SIZE, encode_map_raw, encode_text, head
from worker.ucan.envelope import _sign

SERVICE = Signer.generate()
HILT = Signer.generate()
ROOT = dlg(SERVICE, HILT, sub=SERVICE.did, pol=[["like", ".customer", "did:plc:*"]])
INVOCATION = inv(HILT, SERVICE.did, [ROOT], customer="did:plc:li7co67qxxjdhfwum4ivdlay")
#: what Hilt publishes: raw ctn-v1 holding the invocation and its delegation
BODY = encode_container([INVOCATION, ROOT])
GZIP_HEADERS = (ctn.GZIP, ctn.GZIP_BASE64, ctn.GZIP_BASE64URL)
SPEC_GZIP_HEADERS = (ctn.SPEC_GZIP, ctn.SPEC_GZIP_BASE64, ctn.SPEC_GZIP_BASE64URL)
RESOLVER = Resolver()


def pipeline(body: bytes, *, max_size: int = MAX_SIZE) -> Request | None:
    """Decode, then every step the worker takes on each invocation, allowing only the errors
    the worker answers (DecodeError: dead-letter; ValidationError/CommandError: receipt)."""
    try:
        req = decode_request(body, max_size=max_size)
    except DecodeError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("cannot")
        return None
    for tok in req.invocations:
        try:
            check_audience(tok, SERVICE.did)
            validate_invocation(tok, req.delegations, now=NOW, clock_skew=60, resolver=RESOLVER)
            handler = commands.lookup(tok.cmd)
            if handler is not None:
                handler.prepare(tok, Context(SERVICE.did))
        except (ValidationError, CommandError) as exc:
            assert exc.name and exc.message
    return req


@contextmanager
def bounded(seconds: float = 0.5, peak_bytes: int = 4 << 20) -> Iterator[None]:
    """The block allocates at most ``peak_bytes`` (tracemalloc) within ``seconds``."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < seconds, f"took {elapsed:.2f}s"
    assert peak < peak_bytes, f"allocated {peak} bytes"


def test_the_real_request_is_valid() -> None:
    req = pipeline(BODY)
    assert req is not None and len(req.invocations) == 1 and len(req.delegations) == 1
    validate_invocation(req.invocations[0], req.delegations, now=NOW)


# --- mutations of the real request, exhaustively -----------------------------------------


@pytest.mark.parametrize("form", [None, ctn.RAW, ctn.BASE64, ctn.BASE64URL, *GZIP_HEADERS])
def test_truncated_at_every_offset(form: int | None) -> None:
    body = BODY if form is None else encode_container([INVOCATION, ROOT], header=form)
    start = time.perf_counter()
    for cut in range(len(body)):
        assert pipeline(body[:cut]) is None or form in (ctn.BASE64, ctn.BASE64URL), cut
    assert time.perf_counter() - start < 5.0


def test_a_bit_flipped_at_every_byte() -> None:
    # every byte, one bit each (rotating): a decode error, a dropped token, or a refusal
    for i in range(len(BODY)):
        body = bytearray(BODY)
        body[i] ^= 1 << (i % 8)
        req = pipeline(bytes(body))
        if req is not None and req.invocations:
            tok = req.invocations[0]
            if tok.raw != INVOCATION:
                with pytest.raises((ValidationError, CommandError)):
                    validate_invocation(tok, req.delegations, now=NOW, resolver=RESOLVER)
                    handler = commands.lookup(tok.cmd)
                    assert handler is not None
                    handler.prepare(tok, Context(SERVICE.did))


@settings(max_examples=300, deadline=2000)
@given(st.integers(0, len(BODY)), st.integers(0, len(BODY)), st.integers(0, len(BODY)))
def test_splices_of_the_request_with_itself(a: int, b: int, c: int) -> None:
    pipeline(BODY[:a] + BODY[b:c])
    pipeline(BODY[b:c] + BODY[:a])


_TOKENS = [INVOCATION, ROOT]


@settings(max_examples=300, deadline=2000)
@given(st.sampled_from(_TOKENS), st.data())
def test_mutated_tokens_inside_a_well_formed_container(token: bytes, data: st.DataObject) -> None:
    raw = bytearray(token)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "dup"]))
        if op == "flip":
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            raw[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del raw[max(i, 1) :]
        elif op == "insert":
            raw.insert(i, data.draw(st.integers(0, 255)))
        else:
            j = data.draw(st.integers(i, len(raw)))
            raw[j:j] = raw[i:j]
    others = [t for t in _TOKENS if t != token]
    pipeline(encode_container([bytes(raw), *others]))


# --- absurd declared lengths: no allocation, no time --------------------------------------

_HUGE = (1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)


@pytest.mark.parametrize("n", _HUGE)
@pytest.mark.parametrize("major", [2, 3, 4, 5], ids=["bytes", "text", "array", "map"])
def test_absurd_declared_lengths(major: int, n: int) -> None:
    item = head(major, n) + b"\x00" * 16
    bodies = [
        item,  # bare value
        b"\xa1\x66ctn-v1" + item,  # the container's token list
        b"\xa1\x66ctn-v1\x81" + item,  # a token
        b"\x82" + item,  # a token's signature
        b"\x82\x40" + item,  # a token's payload
        b"\x82\x40\xa2\x61h" + item,  # the varsig header
        ROOT[:-17] + item,  # the nonce of a real delegation
    ]
    with bounded(seconds=0.5, peak_bytes=1 << 20):
        for body in bodies:
            assert pipeline(body) is None
            with pytest.raises(DecodeError):
                decode(body)


# --- nesting, width, duplicates -----------------------------------------------------------


def _signed(payload: dict[str, bytes], tag: str = "ucan/inv@1.0.0-rc.1") -> bytes:
    """A token signed by HILT whose payload fields are the given raw CBOR (anything goes)."""
    return _sign(HILT, tag, encode_map_raw(payload))


def _inv_fields(**raw: bytes) -> dict[str, bytes]:
    fields = {
        "aud": encode_text(SERVICE.did),
        "cmd": encode_text("/customer/add"),
        "exp": cbor2.dumps(NOW + 300),
        "iss": encode_text(HILT.did),
        "prf": b"\x80",
        "sub": encode_text(SERVICE.did),
        "args": b"\xa0",
        "nonce": b"\x50" + bytes(16),
    }
    fields.update(raw)
    return fields


@pytest.mark.parametrize("depth", [65, 1000, 100_000])
def test_deep_nesting_in_args_and_container(depth: int) -> None:
    deep = b"\x81" * depth + b"\x01"
    with bounded(seconds=1.0, peak_bytes=16 << 20):
        assert pipeline(deep) is None
        assert pipeline(b"\xa1\x66ctn-v1\x81" + deep) is None
        token = _signed(_inv_fields(args=b"\xa1\x61a" + deep))
        assert pipeline(token) is None
        req = pipeline(encode_container([token, INVOCATION, ROOT]))
        assert req is not None and len(req.dropped) == 1 and len(req.invocations) == 1


def test_policy_nested_past_its_bound_drops_the_delegation() -> None:
    stmt: list[Any] = ["==", ".customer", "x"]
    for _ in range(40):
        stmt = ["not", stmt]
    deep = dlg(SERVICE, HILT, sub=SERVICE.did)  # a well-formed one, then the nested policy
    del deep
    pol = cbor2.dumps([stmt])
    fields = {
        "aud": encode_text(HILT.did),
        "cmd": encode_text("/customer/add"),
        "exp": b"\xf6",
        "iss": encode_text(SERVICE.did),
        "pol": pol,
        "sub": encode_text(SERVICE.did),
        "nonce": b"\x40",
    }
    token = _sign(SERVICE, "ucan/dlg@1.0.0-rc.1", encode_map_raw(fields))
    with pytest.raises(DecodeError, match="nested too deeply"):
        decode_token(token)
    req = pipeline(encode_container([token, INVOCATION]))
    assert req is not None and req.delegations == {} and len(req.dropped) == 1


def test_a_huge_map_in_args_is_a_value_in_bounded_time() -> None:
    entries = {f"k{i}": "" for i in range(60_000)}
    args = cbor2.dumps({"customer": "did:plc:x", "product": "did:web:p", "details": entries})
    token = _signed(_inv_fields(args=args))
    assert len(token) < MAX_SIZE
    with bounded(seconds=3.0, peak_bytes=64 << 20):
        req = pipeline(token)
    assert req is not None and len(req.invocations) == 1
    # a map that declares more entries than the message holds
    short = head(5, 60_000) + b"\x61a\x01"
    assert pipeline(_signed(_inv_fields(args=short))) is None


def test_duplicate_keys() -> None:
    assert pipeline(b"\xa2\x66ctn-v1\x80\x66ctn-v1\x80") is None
    # a signed payload with 'iss' twice (the second would make the service the issuer)
    payload = _inv_fields()
    raw = encode_map_raw(payload)
    raw = head(5, len(payload) + 1) + raw[1:] + encode_text("iss") + encode_text(SERVICE.did)
    twice = _sign(HILT, "ucan/inv@1.0.0-rc.1", raw)
    assert pipeline(twice) is None
    req = pipeline(encode_container([twice, INVOCATION, ROOT]))
    assert req is not None and [i.raw for i in req.invocations] == [INVOCATION]
    # and in args
    args = b"\xa2\x61a\x01\x61a\x02"
    assert pipeline(_signed(_inv_fields(args=args))) is None


_FORBIDDEN = {
    "invalid utf-8": b"\x62\xc3\x28",
    "float32": b"\xfa\x3f\xc0\x00\x00",
    "NaN": b"\xf9\x7e\x00",
    "Infinity": b"\xfb\x7f\xf0\x00\x00\x00\x00\x00\x00",
    "undefined": b"\xf7",
    "simple value": b"\xf0",
    "simple value 255": b"\xf8\xff",
    "tag 0": b"\xc0\x74" + b"2013-03-21T20:04:00Z",
    "tag 1": b"\xc1\x01",
    "bignum": b"\xc2\x49\x01" + bytes(8),
    "tag 43": b"\xd8\x2b\x41\x00",
    "tag 55799": b"\xd9\xd9\xf7\x01",
    "indefinite text": b"\x7f\x61a\xff",
    "break": b"\xff",
    "non-minimal int": b"\x18\x01",
    "bad link": b"\xd8\x2a\x44\x00\x01\x71\x12",
}


@pytest.mark.parametrize("value", list(_FORBIDDEN.values()), ids=list(_FORBIDDEN))
@pytest.mark.parametrize("field", ["args", "exp", "iss", "nonce", "meta"])
def test_values_dag_cbor_forbids_inside_a_signed_token(field: str, value: bytes) -> None:
    raw = b"\xa1\x61a" + value if field in ("args", "meta") else value
    token = _signed(_inv_fields(**{field: raw}))
    assert pipeline(token) is None  # a bare token: DecodeError
    req = pipeline(encode_container([token, INVOCATION, ROOT]))
    assert req is not None and len(req.dropped) == 1 and len(req.invocations) == 1


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["aud", "cmd", "exp", "iss", "prf", "sub", "args", "nonce", "meta", "cause"]),
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(1 << 64), (1 << 64) - 1)
        | st.text(max_size=10)
        | st.binary(max_size=10)
        | st.sampled_from(["did:", "did:key:z", SERVICE.did, "/", "/customer/add", "did:web:x"]),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
        max_leaves=10,
    ),
)
def test_signed_tokens_with_fields_of_any_type(field: str, value: Any) -> None:
    # validly signed, so validation runs on whatever the decoder let through
    token = _signed(_inv_fields(**{field: cbor2.dumps(value)}))
    pipeline(token)
    pipeline(encode_container([token, ROOT]))


# --- trailing bytes, oversized bodies -----------------------------------------------------


def test_trailing_bytes() -> None:
    assert pipeline(BODY + b"\x00") is None
    assert pipeline(INVOCATION + b"\x00") is None
    req = pipeline(encode_container([INVOCATION + b"\x00", ROOT]))
    assert req is not None and req.invocations == [] and len(req.dropped) == 1
    for header in (ctn.BASE64, ctn.BASE64URL):
        body = encode_container([INVOCATION, ROOT], header=header)
        assert pipeline(body + b"AAAA") is None


@pytest.mark.parametrize("form", [None, ctn.RAW, ctn.BASE64, *GZIP_HEADERS])
def test_oversized_bodies_are_refused_before_decoding(form: int | None) -> None:
    limit = 64 << 10
    tokens = [inv(SERVICE, SERVICE.did, nonce=i.to_bytes(4, "big")) for i in range(400)]
    body = encode_container(tokens, header=form)
    assert len(tokens) * len(tokens[0]) > limit
    if len(body) <= limit:  # compressed below the limit: the inflated size is what is bounded
        with pytest.raises(DecodeError, match="inflates beyond"):
            decode_request(body, max_size=limit)
        return
    # just over the limit: refused by its length, before any decoding
    over = body[: limit + 1]
    with bounded(seconds=0.05, peak_bytes=16 << 10), pytest.raises(DecodeError, match="exceeds"):
        decode_request(over, max_size=limit)
    big = b"\xa1" + b"\x00" * (16 << 20)
    with bounded(seconds=0.05, peak_bytes=16 << 10), pytest.raises(DecodeError, match="exceeds"):
        decode_request(big, max_size=limit)


# --- gzip bombs in every gzip form ---------------------------------------------------------


def _wrap(header: int, compressed: bytes) -> bytes:
    if header in (ctn.GZIP_BASE64, ctn.SPEC_GZIP_BASE64):
        return bytes((header,)) + base64.b64encode(compressed)
    if header in (ctn.GZIP_BASE64URL, ctn.SPEC_GZIP_BASE64URL):
        return bytes((header,)) + base64.urlsafe_b64encode(compressed).rstrip(b"=")
    return bytes((header,)) + compressed


@functools.cache
def _bomb(prefix: bytes, zeros: int) -> bytes:
    """gzip of ``prefix`` and ``zeros`` zero bytes, built in chunks (never held inflated)."""
    c = zlib.compressobj(9, wbits=31)
    out = [c.compress(prefix)]
    chunk = bytes(1 << 20)
    for _ in range(zeros >> 20):
        out.append(c.compress(chunk))
    out.append(c.flush())
    return b"".join(out)


@pytest.mark.parametrize("header", GZIP_HEADERS + SPEC_GZIP_HEADERS)
def test_gzip_bombs_are_bounded(header: int) -> None:
    bomb = _bomb(b"\xa1", 256 << 20)  # 256 MiB of zeros in about 250 KB
    assert len(bomb) < 300_000
    body = _wrap(header, bomb)
    with bounded(seconds=1.0, peak_bytes=4 * MAX_SIZE), pytest.raises(DecodeError, match="inflat"):
        decode_request(body)
    # a bomb that starts as the real request
    body = _wrap(header, _bomb(BODY, 64 << 20))
    with bounded(seconds=1.0, peak_bytes=4 * MAX_SIZE), pytest.raises(DecodeError, match="inflat"):
        decode_request(body)
    # the real request in this form still decodes
    req = pipeline(_wrap(header, gzip.compress(BODY)))
    assert req is not None and len(req.invocations) == 1


@pytest.mark.parametrize("header", GZIP_HEADERS)
def test_gzip_trailing_members_are_refused(header: int) -> None:
    # Go's gzip reader reads concatenated members as one stream; reading only the first
    # would accept what ucantone rejects
    body = _wrap(header, gzip.compress(BODY) + gzip.compress(b"\x00"))
    assert pipeline(body) is None
    body = _wrap(header, gzip.compress(BODY) + b"garbage")
    assert pipeline(body) is None


@settings(max_examples=200, deadline=2000)
@given(st.sampled_from(GZIP_HEADERS + SPEC_GZIP_HEADERS), st.binary(max_size=64), st.data())
def test_mutated_gzip_streams(header: int, tail: bytes, data: st.DataObject) -> None:
    raw = bytearray(gzip.compress(BODY))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= 1 << data.draw(st.integers(0, 7))
    pipeline(_wrap(header, bytes(raw)))
    pipeline(_wrap(header, bytes(raw[: data.draw(st.integers(0, len(raw)))]) + tail))


def test_invocation_and_delegation_kinds_survive_the_pipeline() -> None:
    # the fixtures themselves: one invocation, one delegation
    assert isinstance(decode_token(INVOCATION), Invocation)
    assert isinstance(decode_token(ROOT), Delegation)


@pytest.mark.parametrize("field", ["iss", "aud", "sub", "cmd"])
def test_huge_dids_and_commands_are_not_echoed(field: str) -> None:
    # a 500 KB issuer used to come back twice in a signed error receipt and a log line
    value = ("/" if field == "cmd" else "did:key:z") + "x" * 500_000
    token = _signed(_inv_fields(**{field: encode_text(value)}))
    with pytest.raises(DecodeError, match="longer than") as info:
        decode_token(token)
    assert len(str(info.value)) < 200
    req = pipeline(encode_container([token, INVOCATION, ROOT]))
    assert req is not None and [i.raw for i in req.invocations] == [INVOCATION]
    assert all(len(reason) < 300 for reason in req.dropped)
    # a real DID and command are far below the bound
    assert len(SERVICE.did) < 100 and len("/customer/add") < 100


def _dlg_token(nonce: int, *, pol: bytes = b"\x80", meta: bytes | None = None) -> bytes:
    """A delegation signed by a random key (decoding comes before any signature check)."""
    fields = {
        "aud": encode_text(HILT.did),
        "cmd": encode_text("/customer/add"),
        "exp": b"\xf6",
        "iss": encode_text(HILT.did),
        "pol": pol,
        "sub": encode_text(SERVICE.did),
        "nonce": b"\x44" + nonce.to_bytes(4, "big"),
    }
    if meta is not None:
        fields["meta"] = meta
    return _sign(HILT, "ucan/dlg@1.0.0-rc.1", encode_map_raw(fields))


def test_large_unverified_delegations_are_not_retained() -> None:
    # 240 KB of small meta entries decode to ~3 MiB of objects; none may outlive its message
    meta = cbor2.dumps({f"k{j:06d}": j for j in range(20_000)})
    tokens = [_dlg_token(i, meta=meta) for i in range(16)]
    tracemalloc.start()
    try:
        for token in tokens:
            req = pipeline(encode_container([token]))
            assert req is not None and len(req.delegations) == 1
        del req
        retained, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert retained < 4 << 20, f"{retained} bytes retained"


def test_huge_selectors_are_refused_fast_and_not_retained() -> None:
    tokens = [
        _dlg_token(i, pol=cbor2.dumps([["==", ".a" * 250_000 + f".b{i}", 1]])) for i in range(8)
    ]
    with bounded(seconds=0.5, peak_bytes=8 << 20):
        for token in tokens:
            with pytest.raises(DecodeError, match="longer than") as info:
                decode_token(token)
            assert len(str(info.value)) < 200


def test_huge_like_patterns_are_refused_and_not_cached() -> None:
    from worker.ucan.policy import _GLOBS, GLOB_MAX_LENGTH, PatternRefused, like

    before = len(_GLOBS)
    pattern = "*" + "a" * GLOB_MAX_LENGTH
    with pytest.raises(PatternRefused, match="characters long"):
        like(pattern, "a" * (GLOB_MAX_LENGTH + 1))
    assert len(_GLOBS) == before
    assert like(pattern[:-1], "a" * GLOB_MAX_LENGTH)
