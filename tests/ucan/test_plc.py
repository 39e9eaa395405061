"""did:plc: genesis operations and documents as the Go code and the directory make them, the
identifier rule, and hostile documents refused quickly in one DecodeError line."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import VECTORS
from worker.ucan import (
    DecodeError,
    DidDocument,
    Invocation,
    PlcOperation,
    PublicKey,
    Resolver,
    Signer,
    ValidationError,
    VerificationMethod,
    create_genesis_op,
    decode_token,
    encode_invocation,
    parse_plc_document,
    parse_plc_operation,
    plc_did_problem,
    render_plc_document,
    validate_invocation,
    verify_genesis_op,
)
from worker.ucan.plc import MAX_DOCUMENT_SIZE, MAX_METHODS

GO = VECTORS / "ucantone-go"
TENANT_1 = "did:plc:xbfubwxudf3oi4jrc3t7wlaw"
NOW = 1800000000


def _tenant(label: str) -> Signer:
    keys = json.loads((GO / "keys.json").read_text())["secp256k1"]
    return Signer.parse(next(k for k in keys if k["label"] == label)["private_key_format"])


@pytest.mark.parametrize("tenant", ["tenant-1", "tenant-2"])
def test_genesis_ops_as_hilt_builds_them(vectors: Path, tenant: str) -> None:
    want = json.loads((GO / "plc.json").read_text())[f"vector-{tenant}"]
    signer = _tenant(f"vector-{tenant}")
    op = create_genesis_op(signer)
    assert op.rotation_keys == (signer.key_did,) == (want["rotation_key"],)
    assert op.verification_methods == (("hilt", signer.key_did),)
    assert op.also_known_as == () and op.services == () and op.prev is None
    assert op.unsigned_cbor == (GO / f"plc.{tenant}.genesis_op.unsigned.cbor").read_bytes()
    assert op.signed_cbor == (GO / f"plc.{tenant}.genesis_op.signed.cbor").read_bytes()
    assert op.sig == want["sig"]
    assert op.did == want["did"]
    assert str(op.cid) == want["op_cid"]
    dag_json = (GO / f"plc.{tenant}.genesis_op.signed.json").read_bytes()
    assert op.to_dag_json() == dag_json
    # the directory's side: read the POSTed body back, check it, store it
    parsed = parse_plc_operation(dag_json)
    assert parsed == op
    verify_genesis_op(parsed, want["did"])
    assert plc_did_problem(op.did) is None


def test_document_rendered_as_the_directory_serves_it(vectors: Path) -> None:
    op = create_genesis_op(_tenant("vector-tenant-1"))
    served = (GO / "plc.tenant-1.did_document.json").read_bytes()
    rendered = render_plc_document(TENANT_1, op)
    assert rendered == served
    assert list(json.loads(rendered)) == list(json.loads(served))  # same key order
    doc = parse_plc_document(rendered, TENANT_1)
    assert doc.keys == (_tenant("vector-tenant-1").public_key,)
    assert doc.methods[0].id == f"{TENANT_1}#hilt"
    assert doc.invocation is None and doc.delegation is None
    # what ucantone re-encodes from it still reads (v1.1 context, no alsoKnownAs or service)
    again = (GO / "plc.tenant-1.did_document.ucantone_reencoded.json").read_bytes()
    assert parse_plc_document(again, TENANT_1).keys == doc.keys


def test_genesis_op_refusals() -> None:
    signer = Signer.generate("secp256k1")
    op = create_genesis_op(signer)
    verify_genesis_op(op, op.did)
    other = create_genesis_op(Signer.generate("secp256k1"))
    with pytest.raises(DecodeError, match="hash gives"):
        verify_genesis_op(op, other.did)
    forged = PlcOperation(op.rotation_keys, op.verification_methods, ("at://x",), sig=op.sig)
    with pytest.raises(DecodeError, match="does not verify"):
        verify_genesis_op(forged, forged.did)
    stolen = PlcOperation(other.rotation_keys, op.verification_methods, sig=op.sig)
    with pytest.raises(DecodeError, match="does not verify"):
        verify_genesis_op(stolen, stolen.did)
    with pytest.raises(DecodeError, match="prev is not null"):
        verify_genesis_op(PlcOperation(op.rotation_keys, (), prev=str(op.cid), sig=op.sig), op.did)
    ed = Signer.generate()
    with pytest.raises(DecodeError, match="not a secp256k1 did:key"):
        verify_genesis_op(PlcOperation((ed.did,), (), sig=op.sig), op.did)
    with pytest.raises(DecodeError, match="not a secp256k1 did:key"):
        verify_genesis_op(PlcOperation(op.rotation_keys, (("hilt", ed.did),), sig=op.sig), op.did)
    with pytest.raises(DecodeError, match="base64url"):
        verify_genesis_op(PlcOperation(op.rotation_keys, (), sig=(op.sig or "") + "="), op.did)
    with pytest.raises(DecodeError, match="identifier must be 24"):
        verify_genesis_op(op, "did:plc:abc")
    with pytest.raises(DecodeError, match="rotation keys are secp256k1"):
        create_genesis_op(ed)
    # a high-S twin of the signature is refused, as the directory refuses it
    n = int("FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141", 16)
    sig = op.signature
    twin = sig[:32] + (n - int.from_bytes(sig[32:], "big")).to_bytes(32, "big")
    high = base64.urlsafe_b64encode(twin).rstrip(b"=").decode()
    high_op = PlcOperation(op.rotation_keys, op.verification_methods, sig=high)
    with pytest.raises(DecodeError, match="does not verify"):
        verify_genesis_op(high_op, high_op.did)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"[]", "not a JSON object"),
        (b'{"type": "plc_tombstone"}', "type is"),
        (b'{"type": "plc_operation", "rotationKeys": []}', "rotationKeys"),
        (
            b'{"type": "plc_operation", "rotationKeys": ["did:key:z"], "verificationMethods": {"a": 1}}',
            "verificationMethods",
        ),
        (b'{"type": "plc_operation", "extra": 1}', "unknown field"),
        (b"{", "invalid JSON"),
    ],
)
def test_bad_operations_are_refused(body: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        parse_plc_operation(body)


@pytest.mark.parametrize(
    ("did", "problem"),
    [
        (TENANT_1, None),
        ("did:plc:6rk72l4hge635a2cdqmq7hz2", None),
        ("did:plc:xbfubwxudf3oi4jrc3t7wla", "identifier must be 24 characters, got 23"),
        ("did:plc:xbfubwxudf3oi4jrc3t7wlaww", "identifier must be 24 characters, got 25"),
        ("did:plc:", "identifier must be 24 characters, got 0"),
        (
            "did:plc:Xbfubwxudf3oi4jrc3t7wlaw",
            "identifier is not base32 (lowercase, no padding): illegal base32 data at input byte 0",
        ),
        (
            "did:plc:xbfubwxudf3oi4jrc3t7wla1",
            "identifier is not base32 (lowercase, no padding): illegal base32 data at input byte 23",
        ),
        (
            "did:plc:xbfubwxudf3oi4jrc3t7wl=w",
            "identifier is not base32 (lowercase, no padding): illegal base32 data at input byte 22",
        ),
        # 23 characters but 24 bytes, as Go counts them; then 'é' is not base32
        (
            "did:plc:xbfubwxudf3oi4jrc3t7wlé",
            "identifier is not base32 (lowercase, no padding): illegal base32 data at input byte 22",
        ),
        (
            "did:key:zQ3shuLEhYfNyAz4ms4FfYwc3mUeiUxEvgUmcBhQETcWFh5hy",
            "unsupported DID method in did:key:zQ3shuLEhYfNyAz4ms4FfYwc3mUeiUxEvgUmcBhQETcWFh5hy: expected plc",
        ),
        ("plc:xbfubwxudf3oi4jrc3t7wlaw", "must start with 'did:'"),
    ],
)
def test_plc_identifier_rule(did: str, problem: str | None) -> None:
    assert plc_did_problem(did) == problem


def test_malformed_plc_issuer_is_refused_without_resolution() -> None:
    """Neither a document nor a failure for it is looked at: ucantone's plc.Parse text,
    UnknownError."""
    signer = Signer.generate("secp256k1")
    bad = "did:plc:TOOSHORT"
    inv = decode_token(
        encode_invocation(signer.with_did(bad), sub=bad, cmd="/x", args_raw=b"\xa0", exp=None)
    )
    doc = DidDocument(bad, (VerificationMethod.multikey(f"{bad}#hilt", signer.public_key),))
    resolver = Resolver().with_documents({bad: doc}, {bad: "unexpected status: 404"})
    with pytest.raises(ValidationError) as info:
        validate_invocation(inv, {}, now=NOW, resolver=resolver)  # type: ignore[arg-type]
    assert (info.value.name, info.value.message) == (
        "UnknownError",
        "identifier must be 24 characters, got 8",
    )


def _doc(methods: Any = None, **extra: Any) -> dict[str, Any]:
    signer = (
        _tenant("vector-tenant-1") if (GO / "keys.json").exists() else Signer.generate("secp256k1")
    )
    vm = {"id": f"{TENANT_1}#hilt", "type": "Multikey", "controller": TENANT_1,
          "publicKeyMultibase": signer.public_key.multibase}  # fmt: skip
    doc = {"@context": ["https://www.w3.org/ns/did/v1"], "id": TENANT_1, "alsoKnownAs": [],
           "verificationMethod": [vm] if methods is None else methods, "service": []}  # fmt: skip
    doc.update(extra)
    return doc


def _bytes(doc: Any) -> bytes:
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"x" * (MAX_DOCUMENT_SIZE + 1), "exceeds the limit"),
        (b"[" * 5000 + b"]" * 5000, "nested deeper"),
        (b'{"a":' * 20 + b"1" + b"}" * 20, "nested deeper"),
        (b"{", "invalid JSON"),
        (b'{"id": NaN}', "invalid JSON"),
        (b"\xff\xfe{}", "invalid JSON"),
        (b"[]", "not a JSON object"),
        (b"null", "not a JSON object"),
    ],
)
def test_hostile_documents_are_refused(data: bytes, match: str) -> None:
    start = time.process_time()
    with pytest.raises(DecodeError, match=match) as info:
        parse_plc_document(data, TENANT_1)
    assert time.process_time() - start < 0.5
    assert "\n" not in str(info.value) and str(info.value).startswith("cannot parse DID document")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"@context": "https://example.com"}, "@context must list"),
        ({"@context": []}, "@context must list"),
        ({"@context": None}, "@context must list"),
        ({"@context": ["https://www.w3.org/ns/did/v1", 5]}, "@context must be text"),
        ({"id": 5}, "is not a DID"),
        ({"id": "plc:x"}, "is not a DID"),
        ({"id": "did:plc:6rk72l4hge635a2cdqmq7hz2"}, "is not"),
        ({"controller": 5}, "controller"),
        ({"alsoKnownAs": "at://x"}, "alsoKnownAs"),
        ({"service": [1]}, "service"),
        ({"verificationMethod": {"id": "x"}}, "verificationMethod must be a list"),
        ({"verificationMethod": [5]}, "is not an object"),
        ({"verificationMethod": [{"type": "Multikey"}]}, "no text id"),
        ({"verificationMethod": [{"id": "x"}]}, "no text type"),
        ({"verificationMethod": [{"id": "x", "type": 7}]}, "no text type"),
        ({"verificationMethod": [{"id": "x", "type": "T", "controller": 1}]}, "controller"),
        ({"verificationMethod": [{"id": "x", "type": "T", "expires": "tomorrow"}]}, "RFC 3339"),
        (
            {"verificationMethod": [{"id": "x", "type": "A"}, {"id": "x", "type": "B"}]},
            "conflicting definitions",
        ),
        ({"verificationMethod": [{"id": "x", "type": "A"}] * (MAX_METHODS + 1)}, "more than"),
        ({"verificationMethod": [1] * 10_000}, "more than"),
        ({"capabilityInvocation": "x"}, "capabilityInvocation"),
        ({"authentication": [5]}, "authentication"),
    ],
)
def test_wrong_documents_are_refused(change: dict[str, Any], match: str) -> None:
    data = _bytes(_doc(**change))
    start = time.process_time()
    with pytest.raises(DecodeError, match=match) as info:
        parse_plc_document(data, TENANT_1)
    assert time.process_time() - start < 0.5
    assert "\n" not in str(info.value)


def test_ten_thousand_methods_are_refused_quickly() -> None:
    vm = {"id": "#k", "type": "X"}
    huge = _bytes(_doc([vm] * 10_000))
    assert len(huge) > MAX_DOCUMENT_SIZE
    small = json.dumps(_doc([{}] * 10_000), separators=(",", ":")).encode()
    assert len(small) < MAX_DOCUMENT_SIZE
    for data in (huge, small):
        start = time.process_time()
        with pytest.raises(DecodeError):
            parse_plc_document(data, TENANT_1)
        assert time.process_time() - start < 0.1


def test_fuzzed_documents_raise_only_decode_error() -> None:
    import random

    rng = random.Random(7)
    base = _bytes(_doc())
    for _ in range(2000):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            parse_plc_document(bytes(data), TENANT_1)
        except DecodeError as exc:
            assert "\n" not in str(exc)


def _validate_with(doc: dict[str, Any], signer: Signer, now: int = NOW) -> None:
    parsed = parse_plc_document(_bytes(doc), TENANT_1)
    raw = encode_invocation(
        signer.with_did(TENANT_1), sub=TENANT_1, cmd="/x", args_raw=b"\xa0", exp=None
    )
    inv = decode_token(raw)
    validate_invocation(inv, {}, now=now, resolver=Resolver().with_documents({TENANT_1: parsed}))  # type: ignore[arg-type]


def test_every_method_is_tried_in_order(vectors: Path) -> None:
    tenant = _tenant("vector-tenant-1")
    other = Signer.generate("secp256k1")
    ed = Signer.generate()
    vms = [
        {
            "id": f"{TENANT_1}#atproto",
            "type": "Multikey",
            "publicKeyMultibase": other.public_key.multibase,
        },
        {
            "id": f"{TENANT_1}#old",
            "type": "EcdsaSecp256k1VerificationKey2019",
            "publicKeyMultibase": tenant.public_key.multibase,
        },
        {"id": f"{TENANT_1}#ed", "type": "Multikey", "publicKeyMultibase": ed.public_key.multibase},
        {
            "id": f"{TENANT_1}#hilt",
            "type": "Multikey",
            "publicKeyMultibase": tenant.public_key.multibase,
        },
    ]
    _validate_with(_doc(vms), tenant)  # the fourth verifies
    _validate_with(_doc(vms), ed)  # an Ed25519 Multikey is a key too
    with pytest.raises(ValidationError) as info:
        _validate_with(_doc(vms), Signer.generate("secp256k1"))
    assert info.value.name == "InvalidSignature"
    assert info.value.message.splitlines()[1:] == [
        "  ℹ️ Tried these verification methods:",
        f"    - {TENANT_1}#atproto: signature mismatch",
        f"    - {TENANT_1}#old: unsupported verification method type",
        f"    - {TENANT_1}#ed: signature mismatch",
        f"    - {TENANT_1}#hilt: signature mismatch",
    ]


def test_methods_expired_revoked_or_undecodable(vectors: Path) -> None:
    tenant = _tenant("vector-tenant-1")
    mk = tenant.public_key.multibase
    expired = {"id": f"{TENANT_1}#hilt", "type": "Multikey", "publicKeyMultibase": mk,
               "expires": "2027-01-15T08:00:00Z"}  # fmt: skip
    _validate_with(_doc([expired]), tenant, now=1700000000)
    with pytest.raises(ValidationError, match=r"#hilt: expired"):
        _validate_with(_doc([expired]), tenant, now=NOW)
    revoked = dict(expired, expires=None, revoked="2026-01-01T00:00:00.5+01:00")
    with pytest.raises(ValidationError, match=r"#hilt: revoked"):
        _validate_with(_doc([revoked]), tenant, now=NOW)
    # a Multikey whose key does not decode stops the validation, as ucantone's DeriveVerifier
    broken = {
        "id": f"{TENANT_1}#bad",
        "type": "Multikey",
        "publicKeyMultibase": "zDnaerDaTF5BXEavCrfRZEk316dpbLsfPDZ3WJ5hRTPFU2169",
    }
    with pytest.raises(ValidationError) as info:
        _validate_with(_doc([broken, dict(expired, expires=None)]), tenant)
    assert info.value.name == "UnknownError"
    missing = {"id": f"{TENANT_1}#none", "type": "Multikey"}
    with pytest.raises(ValidationError, match="missing publicKeyMultibase"):
        _validate_with(_doc([missing]), tenant)
    # reached after a match, it is never looked at
    _validate_with(_doc([dict(expired, expires=None), broken]), tenant)


def test_declared_capability_invocation_restricts(vectors: Path) -> None:
    tenant = _tenant("vector-tenant-1")
    vm = _doc()["verificationMethod"][0]
    _validate_with(_doc(capabilityInvocation=[vm["id"]]), tenant)
    _validate_with(_doc(capabilityInvocation=None), tenant)  # null: not declared
    with pytest.raises(ValidationError, match="InvalidSignature"):
        _validate_with(_doc(capabilityInvocation=[]), tenant)  # declared empty: nothing
    with pytest.raises(ValidationError, match="InvalidSignature"):
        _validate_with(_doc(capabilityInvocation=["#other"]), tenant)
    # an embedded method counts for the relationship
    _validate_with(_doc([], capabilityInvocation=[vm]), tenant)
    # the delegation relationship does not endorse invocations
    with pytest.raises(ValidationError, match="InvalidSignature"):
        _validate_with(_doc(capabilityInvocation=[], capabilityDelegation=[vm["id"]]), tenant)


def test_plc_delegations_are_not_remembered(vectors: Path) -> None:
    """A did:plc's keys can rotate: its delegations are verified with each batch's document."""
    resolver = Resolver()
    resolver.remember(b"cid-1", TENANT_1)
    resolver.remember(b"cid-2", "did:key:z6Mk")
    assert not resolver.seen(b"cid-1") and resolver.seen(b"cid-2")
    view = resolver.with_documents({})
    assert view.seen(b"cid-2")  # the view shares the cache
    view.remember(b"cid-3")
    assert resolver.seen(b"cid-3")


def test_resolution_failures_reach_the_error_unwrapped() -> None:
    signer = Signer.generate("secp256k1")
    did = "did:plc:6rk72l4hge635a2cdqmq7hz2"
    inv = decode_token(
        encode_invocation(signer.with_did(did), sub=did, cmd="/x", args_raw=b"\xa0", exp=None)
    )
    assert isinstance(inv, Invocation)
    for text in ("unexpected status: 404", "parsing DID document JSON: unexpected EOF"):
        with pytest.raises(ValidationError) as info:
            validate_invocation(
                inv, {}, now=NOW, resolver=Resolver().with_documents({}, {did: text})
            )
        assert (info.value.name, info.value.message) == ("UnknownError", text)


def test_static_keys_of_either_kind_and_raw_ed25519() -> None:
    ed, secp = Signer.generate(), Signer.generate("secp256k1")
    web = "did:web:upload.example"
    cases: list[list[PublicKey | bytes]] = [
        [ed.public_key],
        [ed.public_key.raw],
        [secp.public_key],
        [secp.public_key, ed.public_key.raw],
    ]
    for static in cases:
        resolver = Resolver({web: static})
        signer = ed if ed.public_key in resolver.keys(web) else secp
        assert resolver.verify(web, b"m", signer.sign(b"m"))
    with pytest.raises(DecodeError, match="32 bytes"):
        Resolver({web: [secp.public_key.raw]})
