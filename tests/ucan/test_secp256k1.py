"""secp256k1 as ucantone does it: the keys and signatures of shared/vectors/ucantone-go, the
low-S and range rules, invalid points, and tokens signed with the secp256k1 varsig header."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import VECTORS
from worker.ucan import (
    DecodeError,
    Delegation,
    Invocation,
    PublicKey,
    Resolver,
    Signer,
    ValidationError,
    create_genesis_op,
    decode_request,
    decode_token,
    did_key_public,
    encode_container,
    encode_delegation,
    encode_invocation,
    validate_invocation,
    verify_signature,
)
from worker.ucan.keys import SECP256K1_N

GO = VECTORS / "ucantone-go"
NOW = 1800000000
SECP_HEADER = bytes.fromhex("3401ec01e7011271")


def _keys(kind: str) -> list[dict[str, Any]]:
    path = GO / "keys.json"
    if not path.exists():  # the `vectors` fixture reports the absence
        return [{"label": "missing"}]
    return list(json.loads(path.read_text())[kind])


def _label(key: dict[str, Any]) -> str:
    return str(key["label"])


def _high_s(sig: bytes) -> bytes:
    return sig[:32] + (SECP256K1_N - int.from_bytes(sig[32:], "big")).to_bytes(32, "big")


@pytest.mark.parametrize("key", _keys("secp256k1"), ids=_label)
def test_secp256k1_keys_as_ucantone(vectors: Path, key: dict[str, Any]) -> None:
    private = bytes.fromhex(key["private_key_hex"])
    assert private.startswith(b"\x81\x26")
    fmt = key["private_key_format"]
    assert fmt == key["private_key_formatsig"] and fmt.startswith("M")
    signer = Signer.parse(fmt)
    assert signer.kind == "secp256k1"
    assert Signer.parse(fmt[1:]).key_did == signer.key_did  # without the multibase prefix
    label = key["label"].removeprefix("vector-")
    assert (GO / f"secp256k1.{label}.private.bin").read_bytes() == private
    assert "M" + signer.export() == fmt
    assert base64.b64decode(signer.export()) == private
    assert private[2:] == bytes.fromhex(key["secret_scalar_hex"])
    assert hashlib.sha256(key["label"].encode()).digest() == private[2:]
    pub = signer.public_key
    assert pub.kind == "secp256k1"
    assert pub.raw.hex() == key["public_key_hex"]
    assert pub.multicodec.hex() == key["public_key_tagged_hex"]
    assert signer.did == signer.key_did == pub.did_key == key["did_key"]
    assert key["did_key"].startswith("did:key:zQ3s")
    assert pub.multibase == key["did_key"].removeprefix("did:key:")
    assert did_key_public(key["did_key"]) == pub
    assert PublicKey.from_multibase(pub.multibase) == pub
    assert signer.varsig_header == SECP_HEADER


@pytest.mark.parametrize("key", _keys("ed25519"), ids=_label)
def test_ed25519_keys_as_ucantone(vectors: Path, key: dict[str, Any]) -> None:
    fmt = key["private_key_format"]
    signer = Signer.parse(fmt)
    assert signer.kind == "ed25519"
    assert "M" + signer.export() == fmt
    assert base64.b64decode(signer.export()).hex() == key["private_key_hex"]
    label = key["label"].removeprefix("vector-")
    assert (GO / f"ed25519.{label}.private.bin").read_bytes().hex() == key["private_key_hex"]
    assert signer.did == signer.public_key.did_key == key["did_key"]
    assert did_key_public(key["did_key"]) == signer.public_key
    assert signer.varsig_header == bytes.fromhex("3401ed01ed011371")


@pytest.mark.parametrize("key", _keys("secp256k1"), ids=_label)
def test_secp256k1_signatures_byte_for_byte(vectors: Path, key: dict[str, Any]) -> None:
    signer = Signer.parse(key["private_key_format"])
    label = key["label"].removeprefix("vector-")
    resolver = Resolver()
    assert set(key["signatures_hex"]) == {"a1000", "empty", "testy"}
    for name, want_hex in key["signatures_hex"].items():
        msg = (GO / f"msg.{name}.bin").read_bytes()
        want = (GO / f"secp256k1.{label}.sig.{name}.bin").read_bytes()
        assert want.hex() == want_hex
        assert signer.sign(msg) == want  # RFC 6979, low-S, r‖s
        assert signer.public_key.verify(msg, want)
        assert resolver.verify(signer.did, msg, want)
        # the high-S twin is a valid ECDSA signature that ucantone refuses
        assert not signer.public_key.verify(msg, _high_s(want))
        flipped = bytes([want[0] ^ 1]) + want[1:]
        assert not signer.public_key.verify(msg, flipped)
        assert not signer.public_key.verify(msg + b"!", want)
        assert not signer.public_key.verify(msg, want[:63])


def test_signing_is_always_low_s() -> None:
    signer = Signer.generate("secp256k1")
    for i in range(64):
        sig = signer.sign(bytes([i]) * i)
        assert len(sig) == 64
        assert int.from_bytes(sig[32:], "big") <= SECP256K1_N // 2
        assert signer.sign(bytes([i]) * i) == sig  # deterministic


def test_r_and_s_outside_the_range_are_refused() -> None:
    signer = Signer.generate("secp256k1")
    key = signer.public_key
    sig = signer.sign(b"m")
    r, s = sig[:32], sig[32:]
    n = SECP256K1_N.to_bytes(32, "big")
    half = (SECP256K1_N // 2).to_bytes(32, "big")
    above_half = (SECP256K1_N // 2 + 1).to_bytes(32, "big")
    for bad in (bytes(32) + s, r + bytes(32), n + s, r + n, b"\xff" * 32 + s, r + b"\xff" * 32,
                r + above_half, b"", sig + b"\x00"):  # fmt: skip
        assert not key.verify(b"m", bad)
    assert not key.verify(b"m", r + half)  # in range, but not the signature
    assert key.verify(b"m", sig)


def test_cross_check_with_the_independent_probe(vectors: Path) -> None:
    probe = json.loads((GO / "keys.json").read_text())["crosscheck_plc_probe_tenant"]
    secret = hashlib.sha256(probe["label"].encode()).digest()
    signer = Signer(secret, kind="secp256k1")
    assert signer.key_did == probe["did_key"]
    assert signer.sign(b"testy").hex() == probe["sig_testy_hex"]
    op = create_genesis_op(signer)
    assert op.sig == probe["genesis_sig"]
    assert op.did == probe["did_plc"]
    assert str(op.cid) == probe["op_cid"]


def _point_not_on_curve() -> bytes:
    p = 2**256 - 2**32 - 977
    x = 1
    while pow(x**3 + 7, (p - 1) // 2, p) == 1:  # x³ + 7 a square: x is on the curve
        x += 1
    return b"\x02" + x.to_bytes(32, "big")


@pytest.mark.parametrize(
    "raw",
    [
        _point_not_on_curve(),
        b"\x02" + bytes(32),
        b"\x02" + (2**256 - 2**32 - 977).to_bytes(32, "big"),  # x = p
        b"\x04" + bytes.fromhex("dcb14f12fc67f666873509b32f3c06a57df53d314e0be5c0c2c9b81eab3a199b"),
        b"\x05" + b"\x01" * 32,
        b"\x02" + b"\x01" * 31,
        b"",
    ],
)
def test_invalid_points_are_refused(raw: bytes) -> None:
    with pytest.raises(DecodeError, match="cannot use public key"):
        PublicKey.from_raw("secp256k1", raw)
    with pytest.raises(DecodeError, match="cannot use public key"):
        PublicKey.from_multicodec(b"\xe7\x01" + raw)


@pytest.mark.parametrize(
    "secret", [bytes(32), SECP256K1_N.to_bytes(32, "big"), b"\xff" * 32, b"\x01" * 31]
)
def test_bad_secp256k1_scalars_are_refused_without_echo(secret: bytes) -> None:
    text = base64.b64encode(b"\x81\x26" + secret).decode()
    with pytest.raises(DecodeError, match="cannot load key") as info:
        Signer.parse(text)
    assert text not in str(info.value) and secret.hex() not in str(info.value)


def test_secp256k1_signer_hides_its_key_and_acts_as_another_did() -> None:
    signer = Signer.generate("secp256k1")
    plc = signer.with_did("did:plc:xbfubwxudf3oi4jrc3t7wlaw")
    text = repr(signer) + repr(plc) + repr(signer.public_key)
    assert signer.export() not in text
    assert base64.b64decode(signer.export())[2:].hex() not in text
    assert "secp256k1" in repr(signer) and plc.did in repr(plc)
    assert plc.key_did == signer.key_did and plc.kind == "secp256k1"
    assert plc.sign(b"x") == signer.sign(b"x")
    assert Signer.parse(plc.export()).key_did == signer.key_did
    with pytest.raises(DecodeError, match="unknown kind"):
        Signer.generate("p256")  # type: ignore[arg-type]


def test_tokens_signed_with_secp256k1_take_the_fast_path_and_validate() -> None:
    from worker.ucan import envelope

    issuer, service = Signer.generate("secp256k1"), Signer.generate()
    dlg = encode_delegation(service, aud=issuer.did, sub=service.did, cmd="/x", exp=None)
    inv_raw = encode_invocation(
        issuer, sub=service.did, aud=service.did, cmd="/x", args_raw=b"\xa0", exp=NOW + 1,
        prf=[decode_token(dlg).cid],
    )  # fmt: skip
    assert inv_raw[71:79] == SECP_HEADER
    assert inv_raw.startswith(envelope._SIG_PAYLOAD_HEADS, 67)
    inv = decode_token(inv_raw)
    assert isinstance(inv, Invocation) and inv.header == SECP_HEADER
    assert envelope._decode_envelope(inv_raw)[1] == SECP_HEADER
    req = decode_request(encode_container([inv_raw, dlg]))
    validate_invocation(req.invocations[0], req.delegations, now=NOW)
    # a secp256k1 delegation too
    dlg2 = decode_token(
        encode_delegation(issuer, aud=service.did, sub=issuer.did, cmd="/", exp=None)
    )
    assert isinstance(dlg2, Delegation)
    verify_signature(dlg2, Resolver())


def test_did_key_issuer_invalid_signature_message_is_ucantones() -> None:
    issuer = Signer.generate("secp256k1")
    raw = encode_invocation(issuer, sub=issuer.did, cmd="/x", args_raw=b"\xa0", exp=None)
    tampered = decode_token(raw[:3] + bytes([raw[3] ^ 1]) + raw[4:])
    with pytest.raises(ValidationError) as info:
        validate_invocation(tampered, {}, now=NOW)  # type: ignore[arg-type]
    ident = issuer.did.removeprefix("did:key:")
    assert info.value.name == "InvalidSignature"
    assert info.value.message == (
        f'proof "{tampered.cid}" does not have a valid signature from "{issuer.did}"\n'
        "  ℹ️ Tried these verification methods:\n"
        f"    - {issuer.did}#{ident}: signature mismatch"
    )


def test_undecodable_did_key_is_unknown_error() -> None:
    alice = Signer.generate()
    p256 = "did:key:zDnaerDaTF5BXEavCrfRZEk316dpbLsfPDZ3WJ5hRTPFU2169"
    raw = encode_invocation(alice.with_did(p256), sub=p256, cmd="/x", args_raw=b"\xa0", exp=None)
    with pytest.raises(ValidationError) as info:
        validate_invocation(decode_token(raw), {}, now=NOW)  # type: ignore[arg-type]
    assert info.value.name == "UnknownError"
    assert "neither ed25519-pub nor secp256k1-pub" in info.value.message
