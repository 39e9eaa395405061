"""Caches filled from what anyone can publish stay within their bytes (issue 20, item 5).

Decoding happens before any signature check, and anyone can self-sign a delegation: a
cache bounded by its entry count is not bounded when an entry can be ~70× the bytes that
made it. Each test feeds the worst input it can and checks the accounted size against
the bound and against what tracemalloc sees.
"""

from __future__ import annotations

import base64
import gc
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

from tests.security.helpers import NOW, dlg, inv
from worker.ucan import (
    CID,
    Delegation,
    Invocation,
    Resolver,
    Signer,
    ValidationError,
    cbor,
    decode_token,
    encode_delegation,
    envelope,
    validate_invocation,
    verify_signature,
)
from worker.ucan import cid as cid_module
from worker.ucan.cid import b32encode, uvarint

#: a 4 KiB delegation of empty maps decodes to ~280 KiB
_PAD: list[dict[str, Any]] = [{}] * 3700


@pytest.fixture(autouse=True)
def empty_cache() -> Iterator[None]:
    envelope._DELEGATIONS.clear()
    yield
    envelope._DELEGATIONS.clear()


def _held(fill: Any) -> int:
    """What stays allocated after ``fill()`` (its result dropped), by tracemalloc."""
    gc.collect()
    tracemalloc.start()
    try:
        fill()
        gc.collect()
        return tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def test_an_unverified_delegation_is_not_cached() -> None:
    mallory = Signer.generate()
    raw = encode_delegation(mallory, aud=mallory.did, sub=mallory.did, cmd="/c", exp=None)
    token = decode_token(raw)
    assert raw not in envelope._DELEGATIONS  # decoded: not kept
    forged = bytearray(raw)
    forged[10] ^= 1  # inside the signature
    bad = decode_token(bytes(forged))
    with pytest.raises(ValidationError, match="valid signature"):
        verify_signature(bad, Resolver())
    assert bytes(forged) not in envelope._DELEGATIONS
    unknown = decode_token(
        encode_delegation(
            mallory.with_did("did:web:x"), aud=mallory.did, sub=None, cmd="/", exp=None
        )
    )
    with pytest.raises(ValidationError, match="unable to resolve"):
        verify_signature(unknown, Resolver())
    assert unknown.raw not in envelope._DELEGATIONS
    verify_signature(token, Resolver())
    assert envelope._DELEGATIONS[raw] is token  # kept once its signature verified
    assert decode_token(raw) is token


def test_self_signed_delegations_of_empty_maps_stay_within_the_cache_bound() -> None:
    # before: each was cached when decoded (1,024 of them), so four messages of them
    # left 278 MiB resident; signed or not, they now fill at most the cache's bytes
    mallory = Signer.generate()
    resolver = Resolver()
    tokens = [
        encode_delegation(
            mallory, aud=mallory.did, sub=mallory.did, cmd=f"/c/{i}", exp=None, meta={"pad": _PAD}
        )
        for i in range(60)
    ]
    # and some whose decoded size is just under an entry's bound (~230 KiB from 5 KiB)
    tokens += [
        encode_delegation(
            mallory, aud=mallory.did, sub=mallory.did, cmd=f"/n/{i}", exp=None,
            pol=[["not", ["==", ".", None]]] * 300,
        )
        for i in range(60)
    ]  # fmt: skip
    assert all(len(t) <= envelope._DELEGATIONS_MAX_BYTES + 2048 for t in tokens)

    def fill() -> None:
        for raw in tokens:
            verify_signature(decode_token(raw), resolver)

    held = _held(fill)
    assert held <= 6 << 20, held  # 1.5 × the 4 MiB bound; ~30 MiB before
    assert envelope._DELEGATIONS.total <= envelope._DELEGATIONS_MAX_FOOTPRINT
    # what is kept is accounted for at about what it holds
    kept = len(envelope._DELEGATIONS)
    assert kept > 0
    assert envelope._DELEGATIONS.total >= held * 0.6, (envelope._DELEGATIONS.total, held)


def test_a_busy_proof_survives_a_flood_of_verified_ones() -> None:
    service, hilt, mallory = Signer.generate(), Signer.generate(), Signer.generate()
    root = dlg(service, hilt, sub=service.did)
    resolver = Resolver()
    proof = decode_token(root)
    assert isinstance(proof, Delegation)
    verify_signature(proof, resolver)  # kept from now on
    for i in range(200):
        junk = encode_delegation(
            mallory, aud=mallory.did, sub=mallory.did, cmd=f"/j/{i}", exp=None, meta={"pad": _PAD}
        )
        verify_signature(decode_token(junk), resolver)
        invocation = decode_token(inv(hilt, service.did, [root]))
        again = decode_token(root)
        assert isinstance(invocation, Invocation) and isinstance(again, Delegation)
        validate_invocation(invocation, {again.cid: again}, now=NOW, resolver=resolver)
        assert again is proof  # decoded once, from the cache ever since


def test_long_cids_are_written_in_linear_time_and_not_planned_in_the_cache() -> None:
    # a link of 16,000 bytes named in an error (UnavailableProof) took 74 ms to write and
    # left a plan of ~n log n bits in a cache of 64 lengths; 1 MB took minutes
    data = bytes(range(256)) * 4000  # 1 MB
    assert b32encode(data) == base64.b32encode(data).decode().rstrip("=").lower()
    plans = cid_module._b32_plan.cache_info().currsize
    for n in (129, 5000, 20_000):
        assert b32encode(b"\x01" * n) == base64.b32encode(b"\x01" * n).decode().rstrip("=").lower()
    assert cid_module._b32_plan.cache_info().currsize == plans
    # through validation: anyone can self-sign an invocation naming such a link
    mallory = Signer.generate()
    link = CID.from_bytes(b"\x01\x71\x12" + uvarint(100_000) + bytes(100_000))
    token = decode_token(inv(mallory, mallory.did, prf=[link]))
    assert isinstance(token, Invocation)
    with pytest.raises(ValidationError, match="could not be resolved"):
        validate_invocation(token, {}, now=NOW)
    assert cid_module._b32_plan.cache_info().currsize == plans


def test_the_text_encoding_cache_keeps_only_short_texts() -> None:
    # encode_text is called with each invocation's sub (up to 2,048 characters) before
    # any signature is checked, and with every receipt's error message
    cbor._encode_text_cached.cache_clear()
    for i in range(100):
        assert cbor.encode_text(f"did:key:{i}" + "\U0001f600" * 2000).startswith(b"\x79")
    assert cbor._encode_text_cached.cache_info().currsize == 0
    cbor.encode_text("did:web:hilt.fil-forge.com")
    assert cbor._encode_text_cached.cache_info().currsize == 1


def test_the_did_cache_keeps_only_short_dids() -> None:
    # issuers are resolved before any signature is checked: 4,096 issuers of 2,048
    # characters (up to 8 KiB each) were kept
    resolver = Resolver()
    for i in range(50):
        assert not resolver.can_resolve(f"did:key:z{i}" + "\U0001f600" * 2000)
    assert len(resolver._cache) == 0
    hilt = Signer.generate()
    assert resolver.can_resolve(hilt.did) and hilt.did in resolver._cache
