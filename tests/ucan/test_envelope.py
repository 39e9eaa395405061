"""Envelopes, Hilt's /customer/add bytes, validation options and receipts."""

from __future__ import annotations

import hashlib

import pytest

from tests.support.principals import CUSTOMER, NOW, PRODUCT, HiltRequest, build_hilt_request
from worker.ucan import (
    CID,
    DecodeError,
    Delegation,
    Invocation,
    Receipt,
    Resolver,
    Signer,
    ValidationError,
    build_receipt,
    check_audience,
    customer_add_args,
    decode,
    decode_token,
    encode,
    encode_invocation,
    task_cid,
    validate_invocation,
    verify_signature,
)
from worker.ucan.envelope import RECEIPT_COMMAND


def _inv(raw: bytes) -> Invocation:
    tok = decode_token(raw)
    assert isinstance(tok, Invocation)
    return tok


def _proofs(*tokens: bytes) -> dict[CID, Delegation]:
    out = {}
    for raw in tokens:
        d = decode_token(raw)
        assert isinstance(d, Delegation)
        out[d.cid] = d
    return out


def test_customer_add_args_use_go_order() -> None:
    raw = customer_add_args(CUSTOMER, PRODUCT, {"region": "us-east-1", "external_id": "ext-123"})
    expected = (
        b"\xa3\x67details\xa2\x6bexternal_id\x67ext-123\x66region\x69us-east-1"
        + b"\x67product\x78\x1a"
        + PRODUCT.encode()
        + b"\x68customer\x78\x20"
        + CUSTOMER.encode()
    )
    assert raw == expected
    assert list(decode(raw)) == ["details", "product", "customer"]
    with_account = customer_add_args(CUSTOMER, PRODUCT, {}, "stripe:cus_1")
    assert with_account[0] == 0xA4
    assert list(decode(with_account)) == ["details", "product", "customer", "externalAccount"]
    assert decode(with_account)["details"] == {}


def test_hilt_invocation_verifies_over_received_bytes(
    hilt: HiltRequest, principals: dict[str, Signer]
) -> None:
    inv = _inv(hilt.invocation)
    assert isinstance(inv, Invocation) and not isinstance(inv, Receipt)
    assert inv.args_raw == hilt.args_raw
    assert list(inv.args["details"]) == ["external_id", "region"]
    # the signed span is the SigPayload as received: canonical re-encoding would differ
    assert hilt.invocation.endswith(inv.payload_raw)
    assert inv.payload_raw == hilt.invocation[67:]
    assert encode(decode(inv.payload_raw)) != inv.payload_raw
    verify_signature(inv, Resolver())
    assert inv.cid == CID.dag_cbor(hilt.invocation)
    task = (
        b"\xa4\x63cmd\x6d/customer/add\x63sub\x78\x38"
        + principals["bob"].did.encode()
        + b"\x64args"
        + hilt.args_raw
        + b"\x65nonce\x50"
        + hilt.nonce
    )
    assert inv.task_cid == CID(b"\x01\x71\x12\x20" + hashlib.sha256(task).digest())
    assert inv.task_cid == task_cid("/customer/add", inv.sub or "", hilt.args_raw, hilt.nonce)
    assert inv.task_cid != task_cid("/customer/add", inv.sub or "", encode(inv.args), hilt.nonce)
    validate_invocation(inv, _proofs(hilt.delegation), now=NOW)
    check_audience(inv, principals["bob"].did)
    with pytest.raises(ValidationError) as info:
        check_audience(inv, principals["carol"].did)
    assert info.value.name == "InvalidAudience"


def test_tampered_args_fail_the_signature(hilt: HiltRequest) -> None:
    tampered = hilt.invocation.replace(b"us-east-1", b"us-west-1")
    inv = _inv(tampered)
    with pytest.raises(ValidationError) as info:
        validate_invocation(inv, _proofs(hilt.delegation), now=NOW)
    assert info.value.name == "InvalidSignature"


def test_clock_skew(principals: dict[str, Signer]) -> None:
    req = build_hilt_request(principals, exp=NOW)
    inv = _inv(req.invocation)
    proofs = _proofs(req.delegation)
    with pytest.raises(ValidationError, match="Expired"):
        validate_invocation(inv, proofs, now=NOW)
    validate_invocation(inv, proofs, now=NOW, clock_skew=1)
    validate_invocation(inv, proofs, now=NOW + 59, clock_skew=60)
    with pytest.raises(ValidationError, match="Expired"):
        validate_invocation(inv, proofs, now=NOW + 60, clock_skew=60)


def test_not_before_with_skew(principals: dict[str, Signer]) -> None:
    from worker.ucan import encode_delegation

    hilt, service = principals["alice"], principals["bob"]
    dlg = encode_delegation(
        service, aud=hilt.did, sub=service.did, cmd="/customer", exp=None, nbf=NOW + 10
    )
    inv = _inv(
        encode_invocation(
            hilt,
            sub=service.did,
            cmd="/customer/add",
            args_raw=b"\xa0",
            exp=None,
            prf=[CID.dag_cbor(dlg)],
        )
    )
    with pytest.raises(ValidationError) as info:
        validate_invocation(inv, _proofs(dlg), now=NOW + 10)
    assert info.value.name == "TooEarly"
    validate_invocation(inv, _proofs(dlg), now=NOW + 11)
    validate_invocation(inv, _proofs(dlg), now=NOW + 1, clock_skew=10)
    with pytest.raises(ValidationError, match="TooEarly"):
        validate_invocation(inv, _proofs(dlg), now=NOW, clock_skew=10)


def test_policy_on_customer_args(principals: dict[str, Signer]) -> None:
    pol = [["==", ".details.region", "us-east-1"], ["like", ".customer", "did:plc:*"]]
    ok = build_hilt_request(principals, pol=pol)
    validate_invocation(_inv(ok.invocation), _proofs(ok.delegation), now=NOW)
    bad = build_hilt_request(principals, pol=pol, details={"region": "eu-west-1"})
    with pytest.raises(ValidationError) as info:
        validate_invocation(_inv(bad.invocation), _proofs(bad.delegation), now=NOW)
    assert info.value.name == "MatchError"
    assert "region" in info.value.message


def test_unrelated_command_is_impossible_attenuation(principals: dict[str, Signer]) -> None:
    from worker.ucan import encode_delegation

    hilt, service = principals["alice"], principals["bob"]
    dlg = encode_delegation(service, aud=hilt.did, sub=service.did, cmd="/provider", exp=None)
    dlg2 = encode_delegation(hilt, aud=hilt.did, sub=service.did, cmd="/customer", exp=None)
    inv = _inv(
        encode_invocation(
            hilt,
            sub=service.did,
            cmd="/customer/add",
            args_raw=b"\xa0",
            exp=None,
            prf=[CID.dag_cbor(dlg), CID.dag_cbor(dlg2)],
        )
    )
    with pytest.raises(ValidationError) as info:
        validate_invocation(inv, _proofs(dlg, dlg2), now=NOW)
    assert info.value.name == "ImpossibleAttenuation"


def test_final_tags_are_accepted(principals: dict[str, Signer]) -> None:
    alice = principals["alice"]
    inv = encode_invocation(alice, sub=alice.did, cmd="/x", args_raw=b"\xa0", exp=None)
    sig_payload = inv[67:]
    final = sig_payload.replace(b"\x73ucan/inv@1.0.0-rc.1", b"\x6eucan/inv@1.0.0")
    token = b"\x82\x58\x40" + alice.sign(final) + final
    tok = _inv(token)
    assert tok.tag == "ucan/inv@1.0.0"
    validate_invocation(tok, {}, now=NOW)


def test_other_varsig_headers_are_refused(principals: dict[str, Signer]) -> None:
    alice = principals["alice"]
    inv = encode_invocation(alice, sub=alice.did, cmd="/x", args_raw=b"\xa0", exp=None)
    ed25519 = bytes.fromhex("3401ed01ed011371")
    # ECDSA over P-256 (ec01, p256-pub 0x1200): ucantone has no verifier for it
    p256 = inv.replace(ed25519, bytes.fromhex("3401ec0180241271"))
    with pytest.raises(DecodeError, match=r"3401ec0180241271.*ECDSA"):
        decode_token(p256)
    absentee = inv.replace(b"\x48" + ed25519, bytes.fromhex("46340180a00371"))
    with pytest.raises(DecodeError, match=r"340180a00371.*absentee"):
        decode_token(absentee)
    # the secp256k1 header is read; the header is signed, so swapping it breaks the signature
    # (the validator never compares the header with the key type: it tries the keys)
    secp = _inv(inv.replace(ed25519, bytes.fromhex("3401ec01e7011271")))
    assert secp.header == bytes.fromhex("3401ec01e7011271")
    with pytest.raises(ValidationError, match="InvalidSignature"):
        validate_invocation(secp, {}, now=NOW)
    with pytest.raises(DecodeError, match="unsupported tag"):
        decode_token(inv.replace(b"ucan/inv@1.0.0-rc.1", b"ucan/xyz@1.0.0-rc.1"))


def test_size_limit(hilt: HiltRequest) -> None:
    with pytest.raises(DecodeError, match="exceeds"):
        decode_token(hilt.invocation, max_size=100)


def test_receipt_shape(principals: dict[str, Signer], hilt: HiltRequest) -> None:
    service = principals["bob"]
    ran = decode_token(hilt.invocation)
    assert isinstance(ran, Invocation)
    raw = build_receipt(service, ran=ran.task_cid, iat=NOW, nonce=b"\x01" * 16)
    rcpt = decode_token(raw)
    assert isinstance(rcpt, Receipt)
    assert (rcpt.iss, rcpt.sub, rcpt.aud) == (service.did, service.did, None)
    assert rcpt.cmd == RECEIPT_COMMAND
    assert rcpt.exp is None and rcpt.iat == NOW and rcpt.prf == ()
    assert rcpt.ran == ran.task_cid and rcpt.ok == {} and rcpt.error is None
    assert rcpt.args_raw == encode(rcpt.args)
    assert encode(decode(rcpt.payload_raw)) == rcpt.payload_raw  # canonical throughout
    assert b"aud" not in rcpt.payload_raw
    verify_signature(rcpt, Resolver())
    err = decode_token(
        build_receipt(
            service, ran=ran.task_cid, error=("Expired", "too late"), iat=NOW, exp=NOW + 30
        )
    )
    assert isinstance(err, Receipt)
    assert err.error == {"name": "Expired", "message": "too late"}
    assert err.ok is None and err.exp == NOW + 30
    assert len(err.nonce) == 16
    assert err.args_raw.startswith(b"\xa2\x63out\xa1\x65error\xa2\x64name")


def test_receipt_with_audience_is_an_invocation(principals: dict[str, Signer]) -> None:
    bob = principals["bob"]
    raw = encode_invocation(
        bob,
        sub=bob.did,
        aud=bob.did,
        cmd=RECEIPT_COMMAND,
        args_raw=encode({"out": {"ok": {}}, "ran": CID.dag_cbor(b"x")}),
        exp=None,
    )
    tok = decode_token(raw)
    assert isinstance(tok, Invocation) and not isinstance(tok, Receipt)


def test_did_web_signer_resolves_through_static_keys(principals: dict[str, Signer]) -> None:
    web = principals["bob"].with_did("did:web:upload.example")
    raw = encode_invocation(web, sub=web.did, cmd="/x", args_raw=b"\xa0", exp=None)
    inv = _inv(raw)
    assert inv.iss == "did:web:upload.example"
    with pytest.raises(ValidationError, match="DIDKeyResolutionError"):
        verify_signature(inv, Resolver())
    verify_signature(inv, Resolver({web.did: [web.public_key]}))
    with pytest.raises(ValidationError, match="InvalidSignature"):
        verify_signature(inv, Resolver({web.did: [principals["carol"].public_key]}))
