"""Keys in ucantone's format, did:key, CID text forms."""

from __future__ import annotations

import base64

import pytest

from tests.support.principals import DIDS, KEYS
from worker.ucan import CID, DecodeError, Resolver, Signer
from worker.ucan.keys import did_key_public


def test_key_formats() -> None:
    key = KEYS["alice"]
    plain = Signer.parse(key)
    assert plain.did == DIDS["alice"] == plain.key_did
    assert Signer.parse("M" + key).did == plain.did
    assert plain.export() == key
    assert Signer.parse(plain.export()).public_key == plain.public_key


@pytest.mark.parametrize(
    "bad",
    [
        "not base64!",
        base64.b64encode(b"\x80\x26" + b"\x01" * 31).decode(),
        base64.b64encode(b"\xed\x01" + b"\x01" * 32).decode(),
        KEYS["alice"].rstrip("="),
    ],
)
def test_bad_keys_are_refused_without_echo(bad: str) -> None:
    with pytest.raises(DecodeError) as info:
        Signer.parse(bad)
    assert bad not in str(info.value)
    assert str(info.value).startswith("cannot load key")


def test_repr_hides_the_key() -> None:
    s = Signer.parse(KEYS["bob"])
    text = repr(s) + repr(s.with_did("did:web:x.example"))
    assert KEYS["bob"] not in text and "did:web:x.example" in text
    assert s.with_did("did:web:x.example").key_did == DIDS["bob"]


def test_sign_and_verify() -> None:
    s = Signer.generate()
    sig = s.sign(b"msg")
    assert len(sig) == 64
    r = Resolver()
    assert r.verify(s.did, b"msg", sig)
    assert not r.verify(s.did, b"msg!", sig)
    assert not r.verify("did:web:nobody.example", b"msg", sig)
    assert did_key_public(s.did) == s.public_key
    secp = "did:key:zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme"
    assert did_key_public(secp).kind == "secp256k1"
    assert did_key_public(secp).did_key == secp
    with pytest.raises(DecodeError, match="neither ed25519-pub nor secp256k1-pub"):
        did_key_public("did:key:zDnaerDaTF5BXEavCrfRZEk316dpbLsfPDZ3WJ5hRTPFU2169")  # P-256


def test_cid_text_forms() -> None:
    cid = CID.dag_cbor(b"x")
    text = str(cid)
    assert text.startswith("bafyrei")
    assert CID.parse(text) == cid
    from worker.ucan.cid import b58encode

    assert CID.parse("z" + b58encode(cid.raw)) == cid
    a, b = sorted([CID.dag_cbor(b"b"), CID.dag_cbor(b"a")])
    assert a.raw < b.raw
    assert len({cid, CID(cid.raw)}) == 1
    with pytest.raises(DecodeError):
        CID.parse("xyz")
    with pytest.raises(DecodeError):
        CID.parse("b!!")
