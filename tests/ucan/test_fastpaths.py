"""The shortcuts of the protocol core give exactly what the reference paths give.

Each shortcut (links read as plain tags, the envelope read by slicing, containers split by
slicing, encoders that write bytes directly, base32, the delegation cache) is compared with
the path it stands in for, on valid, mutated and hostile input: same values, same errors.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import cbor2
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.principals import KEYS, NOW, build_hilt_request
from worker.ucan import (
    CID,
    DecodeError,
    Delegation,
    Invocation,
    Receipt,
    Resolver,
    Signer,
    build_receipt,
    cbor,
    container,
    decode_request,
    decode_token,
    encode_container,
    encode_delegation,
    envelope,
    verify_signature,
)
from worker.ucan.cid import b32encode, wrap
from worker.ucan.receipt import receipt_args

_SIGNERS = {name: Signer.parse(key) for name, key in KEYS.items()}
_REQ = build_hilt_request(_SIGNERS)
_RECEIPT = build_receipt(_SIGNERS["bob"], ran=CID.dag_cbor(b"task"), ok={"n": 1}, iat=NOW)
_TOKENS = [_REQ.invocation, _REQ.delegation, _RECEIPT]
_LINK = CID.dag_cbor(b"x")


def _outcome(fn: Callable[[bytes], Any], data: bytes) -> tuple[str, str]:
    """What ``fn`` gives for ``data``, typed: ``repr`` tells ``True`` from ``1``."""
    try:
        return "ok", repr(fn(data))
    except DecodeError as exc:
        return "error", str(exc)


def _strict(data: bytes) -> Any:
    return cbor._decode_strict(data, cbor.MAX_DEPTH)


@contextmanager
def _reference() -> Iterator[None]:
    """Every shortcut of the decoders switched off, and an empty delegation cache."""
    patched: list[tuple[Any, str, Any]] = [
        (cbor, "decode", lambda data, *, max_depth=64: cbor._decode_strict(data, max_depth)),
        (envelope, "_decode_envelope", lambda raw: envelope._split(cbor.decode(raw))),
        (container, "_split_container", lambda data: None),
    ]
    saved = [(module, name, vars(module)[name]) for module, name, _ in patched]
    envelope._DELEGATIONS.clear()
    for module, name, fn in patched:
        vars(module)[name] = fn
    try:
        yield
    finally:
        for module, name, fn in saved:
            vars(module)[name] = fn
        envelope._DELEGATIONS.clear()


def _request_outcome(body: bytes) -> tuple[str, str]:
    def describe(data: bytes) -> Any:
        req = decode_request(data)
        return (req.tokens, req.dropped, list(req.delegations), req.receipts, req.invocations)

    return _outcome(describe, body)


def _same_as_reference(data: bytes) -> None:
    """``cbor.decode``, ``decode_token`` and ``decode_request`` as the reference paths."""
    envelope._DELEGATIONS.clear()
    got = (_outcome(cbor.decode, data), _outcome(decode_token, data), _request_outcome(data))
    envelope._DELEGATIONS.clear()
    with _reference():
        want = (_outcome(_strict, data), _outcome(decode_token, data), _request_outcome(data))
    assert got == want


def _mutations(data: bytes, rng: random.Random, n: int) -> Iterator[bytes]:
    for _ in range(n):
        b = bytearray(data)
        kind = rng.randrange(5)
        i = rng.randrange(len(b))
        if kind == 0:
            b[i] = rng.randrange(256)
        elif kind == 1:
            b[i] ^= 1 << rng.randrange(8)
        elif kind == 2:
            del b[i:]
        elif kind == 3:
            b.insert(i, rng.randrange(256))
        else:
            del b[i]
        yield bytes(b)


# -- cbor.decode: links as tags, then CIDs ------------------------------------------------


def test_decode_of_real_tokens_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    want = {t: _strict(t) for t in _TOKENS}

    def refuse(data: bytes, max_depth: int) -> Any:
        raise AssertionError("the strict path was taken")

    monkeypatch.setattr(cbor, "_decode_strict", refuse)
    for token in _TOKENS:
        assert repr(cbor.decode(token)) == repr(want[token])


_L = cbor.encode(_LINK).hex()  # d82a5825 00 cid


@pytest.mark.parametrize(
    "hexdata",
    [
        "d82a4101",  # link without 0x00 prefix
        "d82a4400017112",  # truncated cid
        "81d82a4400017112",
        "d82b4100",  # other tag
        "81d82b4100",
        "a161611b00000000000000ff",  # non-minimal integer, no tags
        "a1416101",  # a bytes key, no tags
        "82" + _L + "1801",  # a link, then a non-minimal integer
        "82" + _L + "f7",  # a link, then undefined
        "82" + _L + "f0",  # a link, then a simple value
        "82" + _L + "f97e00",  # a link, then NaN
        "82" + _L + "fb7ff0000000000000",  # a link, then Infinity as float64
        "82" + _L + "fb3ff8000000000000",  # a link, then a float
        "82" + _L + "d82b4100",  # a link, then another tag
        "a1" + _L + "01",  # a link as a map key
        "a14161" + _L,  # a bytes key for a link
        "a24161" + _L + "616101",
        "a2616101" + "4161" + _L,
        "d82a" + _L,  # a link of a link
        _L,  # a link alone
        "81" + _L + "00",  # a link, then trailing bytes
        "81" + _L[:-2],  # a truncated link
        "81d82a58260001711220" + "00" * 32,  # a link longer than its bytes
        "81d82a4f0001551208" + "00" * 6,  # a raw sha2-256 CID with a short digest
        "81d82a4b00015500080000000000000000"[:-2],
        "81d82a4c000155000800000000000000" + "00",  # a CIDv1 that parses
        "81d82a45000155000100",
        "81d82a4300007100",  # a CID of version 0 in long form
        "c249010000000000000000",  # bignum
        "d9010280",  # set
        "81fb3ff8000000000000",  # a float
        "81fb7ff0000000000000",  # Infinity as float64
        "f0",
        "",
    ],
)
def test_decode_gives_what_the_strict_path_gives(hexdata: str) -> None:
    data = bytes.fromhex(hexdata)
    assert _outcome(cbor.decode, data) == _outcome(_strict, data)


def test_depth_bound_is_the_same_with_links() -> None:
    link = cbor.encode(_LINK)
    for depth in range(58, 68):
        for leaf in (link, b"\x01", b"\xa1\x61a" + link):
            data = b"\x81" * depth + leaf
            assert _outcome(cbor.decode, data) == _outcome(_strict, data), depth


def test_large_inputs_go_to_the_strict_path_once(monkeypatch: pytest.MonkeyPatch) -> None:
    data = cbor.encode([_LINK, "x" * (cbor._FAST_MAX + 1)])
    calls: list[int] = []
    strict = cbor._decode_strict

    def counting(data: bytes, max_depth: int) -> Any:
        calls.append(len(data))
        return strict(data, max_depth)

    monkeypatch.setattr(cbor, "_decode_strict", counting)
    assert cbor.decode(data)[0] == _LINK
    assert calls == [len(data)]


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 64), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.just(_LINK)
    | st.sampled_from([cbor2.undefined, cbor2.CBORSimpleValue(0), cbor2.CBORTag(43, b"")])
    | st.builds(lambda b: cbor2.CBORTag(42, b), st.binary(max_size=40))
)


def _to_wire(value: Any) -> Any:
    if type(value) is CID:
        return cbor2.CBORTag(42, b"\0" + value.raw)
    if type(value) is list:
        return [_to_wire(v) for v in value]
    if type(value) is dict:
        return {k: _to_wire(v) for k, v in value.items()}
    return value


_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=4) | st.binary(max_size=2), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(_VALUES, st.sampled_from([False, True]))
def test_decode_of_any_value_is_the_strict_decode(value: Any, canonical: bool) -> None:
    try:
        data = cbor2.dumps(_to_wire(value), canonical=canonical)
    except (cbor2.CBOREncodeError, TypeError, ValueError):
        return
    assert _outcome(cbor.decode, data) == _outcome(_strict, data)
    for mutated in _mutations(data, random.Random(data), 5):
        assert _outcome(cbor.decode, mutated) == _outcome(_strict, mutated)


# -- tokens and requests: envelope and container by slicing ---------------------------------


def test_tokens_and_requests_decode_as_the_reference_paths() -> None:
    bodies = [
        *_TOKENS,
        encode_container(_TOKENS),
        encode_container([_REQ.invocation, _REQ.delegation], header=0x45),
        encode_container([]),
        encode_container([b"\x82", b"", _REQ.invocation]),
    ]
    for body in bodies:
        _same_as_reference(body)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(range(4)), st.randoms(use_true_random=False))
def test_mutated_tokens_and_requests_decode_as_the_reference_paths(
    which: int, rng: random.Random
) -> None:
    body = [*_TOKENS, encode_container(_TOKENS)][which]
    for mutated in _mutations(body, rng, 8):
        _same_as_reference(mutated)


def _token(payload: bytes, tag: bytes = b"ucan/inv@1.0.0-rc.1") -> bytes:
    sig_payload = b"\xa2\x61h\x48" + bytes.fromhex("3401ed01ed011371") + cbor.head(3, len(tag))
    return b"\x82\x58\x40" + bytes(64) + sig_payload + tag + payload


def test_envelope_shortcut_keeps_the_depth_bound_and_errors() -> None:
    base = cbor2.loads(_REQ.invocation)[1]["ucan/inv@1.0.0-rc.1"]
    for depth in range(58, 66):
        payload = dict(base, args={"a": cbor2.loads(b"\x81" * depth + b"\x01")})
        _same_as_reference(_token(cbor2.dumps(payload)))
    for wire in (b"\x01", b"\xf6", b"\x80", b"\xa0", b"", b"\xa0\x00", b"\xa1\x01\x01"):
        _same_as_reference(_token(wire))
        _same_as_reference(_token(wire, b"ucan/xyz@1.0.0-rc.1"))
        _same_as_reference(_token(wire, b"ucan/dlg@1.0.0"))


def test_envelope_shortcut_is_taken_for_real_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    split = envelope._split

    def whole(value: Any) -> Any:
        raise AssertionError("the token was decoded whole")

    monkeypatch.setattr(envelope, "_split", whole)
    envelope._DELEGATIONS.clear()
    for token in _TOKENS:
        monkeypatch.setattr(envelope, "_split", whole)
        got = envelope._decode_envelope(token)
        monkeypatch.setattr(envelope, "_split", split)
        assert got == split(cbor._decode_strict(token, cbor.MAX_DEPTH))


def test_decoded_invocation_equals_one_built_by_its_constructor() -> None:
    inv = decode_token(_REQ.invocation)
    assert type(inv) is Invocation
    values = {f.name: getattr(inv, f.name) for f in dataclasses.fields(Invocation)}
    built = Invocation(**values)
    assert inv == built and repr(inv) == repr(built) and hash(inv.cid) == hash(built.cid)
    assert dataclasses.replace(inv, cmd="/x").cmd == "/x"
    with pytest.raises(dataclasses.FrozenInstanceError):
        inv.cmd = "/x"  # type: ignore[misc]


@pytest.mark.parametrize(
    "hexdata",
    [
        "a166" + b"ctn-v1".hex() + "80",
        "a166" + b"ctn-v1".hex() + "9800",  # non-minimal count
        "a166" + b"ctn-v1".hex() + "81580141",  # non-minimal length
        "a166" + b"ctn-v1".hex() + "8159000541" + "00" * 4,  # non-minimal 2-byte length
        "a166" + b"ctn-v1".hex() + "815a00000005" + "00" * 5,  # non-minimal 4-byte length
        "a166" + b"ctn-v1".hex() + "82590100" + "00" * 256 + "40",  # 256 bytes, then none
        "a166" + b"ctn-v1".hex() + "8141",  # truncated
        "a166" + b"ctn-v1".hex() + "814100",  # trailing byte
        "a166" + b"ctn-v1".hex() + "810a",  # not bytes
        "a166" + b"ctn-v1".hex() + "8159",
        "a166" + b"ctn-v1".hex() + "815900",
        "a166" + b"ctn-v1".hex() + "815a0000",
        "a166" + b"ctn-v1".hex() + "815b0000000000000001ff",
        "a166" + b"ctn-v1".hex() + "9b0000000000000001" + "40",
        "a166" + b"ctn-v1".hex() + "992001" + "40" * 0x2001,  # over MAX_TOKENS
        "a166" + b"ctn-v1".hex() + "992000" + "40" * 0x2000,
        "a166" + b"ctn-v1".hex() + "9a00002000" + "40" * 0x2000,  # non-minimal count
        "a166" + b"ctn-v1".hex() + "99ffff" + "40" * 10,
        "a166" + b"ctn-v1".hex(),
        "a166" + b"ctn-v2".hex() + "80",
        "a266" + b"ctn-v1".hex() + "8063" + b"abc".hex() + "80",
    ],
)
def test_container_shortcut_gives_what_the_decoder_gives(hexdata: str) -> None:
    _same_as_reference(bytes.fromhex(hexdata))


@pytest.mark.parametrize("size", [0, 1, 23, 24, 255, 256, 65535, 65536])
def test_container_shortcut_reads_every_length(size: int) -> None:
    tokens = [os.urandom(size), b"", os.urandom(30)]
    body = encode_container(tokens)
    assert container._split_container(body) == sorted(set(tokens))
    _same_as_reference(body)


# -- encoders --------------------------------------------------------------------------------


def _head_reference(major: int, n: int) -> bytes:
    m = major << 5
    if n < 24:
        return bytes((m | n,))
    if n < 0x100:
        return bytes((m | 24, n))
    if n < 0x10000:
        return bytes((m | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((m | 26,)) + n.to_bytes(4, "big")
    return bytes((m | 27,)) + n.to_bytes(8, "big")


def test_head_table_is_the_formula() -> None:
    values = [*range(0x300), 0xFFFF, 0x10000, 0xFFFFFFFF, 0x100000000, (1 << 64) - 1]
    for major in range(8):
        for n in values:
            assert cbor.head(major, n) == _head_reference(major, n)
            assert envelope._head_size(n) == len(_head_reference(major, n))
    for major, n in ((0, -1), (8, 1), (-1, 1)):
        with pytest.raises(ValueError):
            _head_reference(major, n)
        with pytest.raises(ValueError):
            cbor.head(major, n)


@settings(max_examples=100)
@given(st.lists(st.binary(max_size=300), max_size=30))
def test_encode_container_is_the_canonical_encoding(tokens: list[bytes]) -> None:
    want = cbor.encode({container.CONTAINER_KEY: sorted(set(tokens))})
    assert encode_container(tokens) == want
    assert encode_container(tokens, header=0x40) == b"\x40" + want


def test_encode_container_of_long_tokens() -> None:
    tokens = [os.urandom(70_000), os.urandom(300), b""]
    assert encode_container(tokens) == cbor.encode({"ctn-v1": sorted(tokens)})


@pytest.mark.parametrize("exp", [None, NOW + 30, -5, 1 << 40])
@pytest.mark.parametrize("iat", [NOW, 0, 23, -1])
@pytest.mark.parametrize(
    ("ok", "error"), [(None, None), ({"n": [1, _LINK]}, None), (None, ("Expired", "late"))]
)
def test_build_receipt_writes_what_the_generic_encoder_writes(
    exp: int | None, iat: int, ok: Any, error: tuple[str, str] | None
) -> None:
    service = _SIGNERS["bob"].with_did("did:web:upload.example")
    ran = CID.dag_cbor(b"task")
    nonce = bytes(range(16))
    got = build_receipt(service, ran=ran, ok=ok, error=error, iat=iat, exp=exp, nonce=nonce)
    want = envelope._invocation(
        service, sub=service.did, cmd=envelope.RECEIPT_COMMAND,
        args_raw=receipt_args(ran=ran, ok=ok, error=error),
        aud=None, exp=exp, iat=iat, nonce=nonce, prf=(), meta=None, cause=None,
    )  # fmt: skip
    assert got == want
    assert isinstance(decode_token(got), Receipt)


def test_build_receipt_errors_in_the_same_order() -> None:
    service, ran = _SIGNERS["bob"], CID.dag_cbor(b"task")
    with pytest.raises(DecodeError, match="unsupported type"):
        build_receipt(service, ran=ran, ok={"x": {1, 2}}, iat=1 << 70, exp=1 << 70)
    with pytest.raises(DecodeError, match=str(1 << 70)):
        build_receipt(service, ran=ran, iat=1 << 71, exp=1 << 70)
    none_iat: Any = None  # outside the signature: still written without iat, as before
    assert b"iat" not in build_receipt(service, ran=ran, iat=none_iat)


def test_signer_signs_as_pynacl() -> None:
    signer = _SIGNERS["alice"]
    key = nacl.signing.SigningKey(base64.b64decode(KEYS["alice"])[2:])
    for msg in (b"", b"x", os.urandom(500)):
        assert signer.sign(msg) == key.sign(msg).signature
    assert signer.with_did("did:web:x").sign(b"m") == key.sign(b"m").signature


# -- CIDs --------------------------------------------------------------------------------------


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_b32encode_is_base64_b32encode(data: bytes) -> None:
    assert b32encode(data) == base64.b32encode(data).decode().lower().rstrip("=")


def test_b32encode_every_length() -> None:
    rng = random.Random(7)
    for n in range(300):
        for _ in range(5):
            data = rng.randbytes(n)
            assert b32encode(data) == base64.b32encode(data).decode().lower().rstrip("=")
    for data in (b"\xff" * 37, bytes(37), b"\x01\x71\x12\x20" + b"\xff" * 32):
        assert b32encode(data) == base64.b32encode(data).decode().lower().rstrip("=")


def test_cid_text_and_wrapped_cids() -> None:
    cid = CID.dag_cbor(b"hello")
    text = str(cid)
    assert text == "b" + base64.b32encode(cid.raw).decode().lower().rstrip("=")
    assert CID.parse(text) == cid and str(CID.parse(text)) == text
    plain = CID(cid.raw)
    for made in (wrap(cid.raw), cid, CID.raw_sha256(b"hello")):
        assert type(made) is CID and hash(made) == hash(made.raw)
        with pytest.raises(AttributeError):
            made.raw = b""
    assert wrap(cid.raw) == plain and hash(wrap(cid.raw)) == hash(plain)
    assert str(wrap(cid.raw)) == str(plain) == text
    v0 = CID.from_bytes(b"\x12\x20" + bytes(32))
    assert str(v0).startswith("Qm")


# -- the delegation cache -----------------------------------------------------------------------


def _verified(raw: bytes) -> Any:
    """Decode a token and check its signature, as validation does (which fills the cache)."""
    token = decode_token(raw)
    verify_signature(token, Resolver())
    return token


def test_delegation_cache_gives_what_a_fresh_decode_gives() -> None:
    envelope._DELEGATIONS.clear()
    first = _verified(_REQ.delegation)
    assert isinstance(first, Delegation)
    assert envelope._DELEGATIONS[_REQ.delegation] is first
    as_bytearray: Any = bytearray(_REQ.delegation)
    again = decode_token(as_bytearray)
    assert again is first
    envelope._DELEGATIONS.clear()
    fresh = decode_token(_REQ.delegation)
    assert fresh == first and fresh is not first
    with pytest.raises(DecodeError, match="exceeds the limit"):
        decode_token(_REQ.delegation, max_size=len(_REQ.delegation) - 1)


def test_delegation_cache_misses_other_bytes() -> None:
    envelope._DELEGATIONS.clear()
    _verified(_REQ.delegation)
    flipped = bytearray(_REQ.delegation)
    flipped[-1] ^= 1  # inside the nonce: another valid delegation
    other = decode_token(bytes(flipped))
    assert isinstance(other, Delegation)
    assert other.nonce != decode_token(_REQ.delegation).nonce
    assert other.cid != CID.dag_cbor(_REQ.delegation)


def test_delegation_cache_is_bounded_and_keeps_what_is_used() -> None:
    envelope._DELEGATIONS.clear()
    alice, bob = _SIGNERS["alice"], _SIGNERS["bob"]
    hot = _verified(_REQ.delegation)
    for i in range(envelope._DELEGATIONS_MAX + 10):
        _verified(encode_delegation(alice, aud=bob.did, sub=alice.did, cmd=f"/c/{i}", exp=None))
        assert _verified(_REQ.delegation) is hot  # used all along: never evicted
    assert len(envelope._DELEGATIONS) == envelope._DELEGATIONS_MAX
    assert envelope._DELEGATIONS.total <= envelope._DELEGATIONS_MAX_FOOTPRINT
    big = encode_delegation(
        alice, aud=bob.did, sub=alice.did, cmd="/big", exp=None, meta={"pad": "x" * 5000}
    )
    assert isinstance(_verified(big), Delegation)
    assert big not in envelope._DELEGATIONS
    envelope._DELEGATIONS.clear()


def test_cached_delegation_is_read_only() -> None:
    dlg = decode_token(_REQ.delegation)
    assert isinstance(dlg, Delegation)
    with pytest.raises(dataclasses.FrozenInstanceError):
        dlg.cmd = "/"  # type: ignore[misc]
    assert isinstance(dlg.pol.statements, tuple)


def test_request_results_do_not_share_lists() -> None:
    a = decode_request(encode_container([_REQ.invocation, _REQ.delegation]))
    b = decode_request(encode_container([_REQ.invocation, _REQ.delegation]))
    assert a.tokens is not b.tokens and a.delegations is not b.delegations
    assert a.delegations == b.delegations
