"""Containers in every form, bare tokens, and the bounds on them."""

from __future__ import annotations

import base64
import gzip

import pytest

from tests.support.principals import HiltRequest
from worker.ucan import CID, DecodeError, decode, decode_request, encode_container
from worker.ucan import container as ctn

ALL_HEADERS = [
    None,
    ctn.RAW,
    ctn.BASE64,
    ctn.BASE64URL,
    ctn.GZIP,
    ctn.GZIP_BASE64,
    ctn.GZIP_BASE64URL,
    ctn.SPEC_GZIP,
    ctn.SPEC_GZIP_BASE64,
    ctn.SPEC_GZIP_BASE64URL,
]


@pytest.mark.parametrize("header", ALL_HEADERS)
def test_every_form_round_trips(hilt: HiltRequest, header: int | None) -> None:
    body = encode_container([hilt.invocation, hilt.delegation], header=header)
    if header is not None:
        assert body[0] == header
    req = decode_request(body)
    assert [i.raw for i in req.invocations] == [hilt.invocation]
    assert list(req.delegations) == [CID.dag_cbor(hilt.delegation)]
    assert not req.dropped and not req.receipts


def test_raw_container_is_sorted_deduplicated_canonical(hilt: HiltRequest) -> None:
    body = encode_container([hilt.invocation, hilt.delegation, hilt.invocation])
    assert body[:9] == b"\xa1\x66ctn-v1\x82"
    assert decode(body)["ctn-v1"] == sorted([hilt.invocation, hilt.delegation])


def test_base64_forms_are_trimmed(hilt: HiltRequest) -> None:
    for header in (ctn.BASE64, ctn.GZIP_BASE64URL):
        body = encode_container([hilt.invocation], header=header)
        req = decode_request(b"  \n" + body + b"\r\n")
        assert len(req.invocations) == 1


def test_ucantone_base64url_without_padding(hilt: HiltRequest) -> None:
    data = encode_container([hilt.invocation])
    body = b"C" + base64.urlsafe_b64encode(data).rstrip(b"=")
    assert decode_request(body).invocations[0].raw == hilt.invocation


def test_bare_token(hilt: HiltRequest) -> None:
    req = decode_request(hilt.invocation)
    assert [i.raw for i in req.invocations] == [hilt.invocation]
    assert decode_request(hilt.delegation).delegations


def test_unreadable_tokens_are_dropped_with_a_reason(hilt: HiltRequest) -> None:
    req = decode_request(encode_container([hilt.invocation, b"\x82\x40\xa0", b"junk"]))
    assert len(req.invocations) == 1
    assert len(req.dropped) == 2
    assert all(d.startswith("token ") for d in req.dropped)


def test_gzip_is_bounded() -> None:
    bomb = gzip.compress(b"\x00" * (4 << 20))
    assert len(bomb) < 10_000
    with pytest.raises(DecodeError, match="limit"):
        decode_request(b"\x44" + bomb)
    with pytest.raises(DecodeError, match="limit"):
        ctn.gunzip(bomb, max_size=1 << 20)
    assert ctn.gunzip(gzip.compress(b"abc"), max_size=3) == b"abc"
    with pytest.raises(DecodeError, match="trailing"):
        ctn.gunzip(gzip.compress(b"abc") + b"junk", max_size=1000)
    with pytest.raises(DecodeError, match="truncated"):
        ctn.gunzip(gzip.compress(b"abc" * 100)[:-10], max_size=1000)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", "empty"),
        (b"\x00\x01", "header byte 0x00"),
        (b"B!!!notbase64", "base64"),
        (b"D" + b"not gzip", "gzip"),
        (b"\xa1\x61x\x80", "ctn-v1"),
        (b"\xa1\x66ctn-v1\x81\x01", "byte strings"),
    ],
)
def test_bad_bodies(body: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode_request(body)


def test_size_limit(hilt: HiltRequest) -> None:
    body = encode_container([hilt.invocation])
    with pytest.raises(DecodeError, match="exceeds"):
        decode_request(body, max_size=len(body) - 1)
    assert decode_request(body, max_size=len(body)).invocations
