"""/provider/add as the Go code made it (shared/vectors/ucantone-go): every request decoded
with its CIDs and validated to ucantone's verdict, name and message (did:plc issuers through
a resolved document and a failed resolution), every receipt rebuilt byte for byte, and
sprue's subscription ids."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import VECTORS
from worker.ucan import (
    CID,
    Invocation,
    Receipt,
    Resolver,
    Signer,
    ValidationError,
    build_receipt,
    cbor,
    decode_request,
    decode_token,
    encode_container,
    parse_plc_document,
    validate_invocation,
    verify_signature,
)

GO = VECTORS / "ucantone-go"
NOW = 1800000000
TENANT_1 = "did:plc:xbfubwxudf3oi4jrc3t7wlaw"
TENANT_2 = "did:plc:6rk72l4hge635a2cdqmq7hz2"
SERVICE_WEB = "did:web:upload.example"


@cache
def _index() -> dict[str, dict[str, Any]]:
    path = GO / "index.json"
    if not path.exists():  # the `vectors` fixture reports the absence
        return {}
    return {e["file"]: e for e in json.loads(path.read_text())["files"]}


def _files(suffix: str, prefix: str = "") -> list[str]:
    names = [f for f in _index() if f.endswith(suffix) and f.startswith(prefix)]
    return names or ["missing"]


@cache
def _service() -> Signer:
    keys = json.loads((GO / "keys.json").read_text())["ed25519"]
    return Signer.parse(
        next(k for k in keys if k["label"] == "vector-service")["private_key_format"]
    )


def _resolver() -> Resolver:
    """sprue's wiring: its did:web with the service key, did:key, and did:plc through the
    directory stand-in (tenant-1 served, everything else 404), resolved before validation."""
    doc = parse_plc_document((GO / "plc.tenant-1.did_document.json").read_bytes(), TENANT_1)
    static = Resolver({SERVICE_WEB: [_service().public_key]})
    return static.with_documents({TENANT_1: doc}, {TENANT_2: "unexpected status: 404"})


def _verdict(inv: Invocation, proofs: Any, resolver: Resolver) -> dict[str, str]:
    try:
        validate_invocation(inv, proofs, now=NOW, resolver=resolver)
    except ValidationError as exc:
        return {"verdict": "reject", "error_name": exc.name, "error_message": exc.message}
    return {"verdict": "accept"}


@pytest.mark.parametrize("name", _files(".request.cbor"))
def test_requests_decode_and_validate_as_ucantone(vectors: Path, name: str) -> None:
    entry = _index()[name]
    req = decode_request((GO / name).read_bytes())
    assert not req.dropped and len(req.invocations) == 1
    inv = req.invocations[0]
    assert str(inv.cid) == entry["cids"]["invocation"]
    assert str(inv.task_cid) == entry["cids"]["task"]
    info = entry["info"]
    assert (inv.iss, inv.sub, inv.aud, inv.cmd) == (
        info["iss"],
        info["sub"],
        info["aud"],
        info["cmd"],
    )
    assert inv.exp == info["exp"] and inv.nonce.hex() == info["nonce_hex"]
    assert inv.args_raw.hex() == info["args_hex"]
    if "varsig_header_hex" in info:
        assert inv.header.hex() == info["varsig_header_hex"]
        assert inv.signature.hex() == info["signature_hex"]
    token = (GO / name.replace(".request.cbor", ".invocation.cbor")).read_bytes()
    assert decode_token(token).cid == inv.cid
    want = entry["expected"]["validator"]
    assert _verdict(inv, req.delegations, _resolver()) == want
    # the same through a fresh view of a resolver that has seen other requests
    assert _verdict(inv, req.delegations, _resolver()) == want


def test_verdicts_summary_is_what_the_index_says(vectors: Path) -> None:
    verdicts = json.loads((GO / "verdicts.json").read_text())
    resolver = _resolver()
    for name, want in verdicts.items():
        req = decode_request((GO / f"{name}.request.cbor").read_bytes())
        assert _verdict(req.invocations[0], req.delegations, resolver) == want["validator"], name
    assert {v["validator"]["verdict"] for v in verdicts.values()} == {"accept", "reject"}


def test_unresolved_plc_issuer_is_not_looked_up(vectors: Path) -> None:
    """Without the batch's documents the did:plc issuer has no key: nothing is fetched here."""
    req = decode_request((GO / "provider_add.plc_tenant.svc_didkey.request.cbor").read_bytes())
    with pytest.raises(ValidationError) as info:
        validate_invocation(req.invocations[0], {}, now=NOW, resolver=Resolver())
    assert info.value.name == "DIDKeyResolutionError"


def _receipt_args(entry: dict[str, Any]) -> dict[str, Any]:
    exp = entry["expected"]
    if exp["result"] == "ok":
        return {"ok": cbor.decode(bytes.fromhex(exp["out_ok_hex"]))}
    return {"error": (exp["error_name"], exp["error_message"])}


@pytest.mark.parametrize("name", _files(".receipt.cbor") + _files(".response.cbor"))
def test_receipts_rebuilt_byte_for_byte(vectors: Path, name: str) -> None:
    entry = _index()[name]
    raw = (GO / name).read_bytes()
    info = entry["info"]
    if name.endswith(".response.cbor"):
        req = decode_request(raw)
        assert len(req.receipts) == 1 and not req.invocations
        rcpt = req.receipts[0]
    else:
        tok = decode_token(raw)
        assert isinstance(tok, Receipt)
        rcpt = tok
    assert str(rcpt.cid) == entry["cids"]["receipt"]
    assert str(rcpt.ran) == entry["cids"]["ran_task"]
    # the /customer/add receipt's index entry names no issuer: it is the service's did:key
    assert rcpt.iss == rcpt.sub == info.get("iss", _service().did) and rcpt.aud is None
    assert rcpt.iat == info["iat"] == NOW and rcpt.exp is None
    assert rcpt.nonce.hex() == info["nonce_hex"]
    exp = entry["expected"]
    if exp["result"] == "ok":
        assert cbor.encode(rcpt.ok).hex() == exp["out_ok_hex"]
        if "unpacked_ok_id" in exp:
            assert rcpt.ok == {"id": exp["unpacked_ok_id"]}
    else:
        assert rcpt.error == {"name": exp["error_name"], "message": exp["error_message"]}
    service = _service() if rcpt.iss != SERVICE_WEB else _service().with_did(SERVICE_WEB)
    rebuilt = build_receipt(
        service,
        ran=rcpt.ran,
        iat=info["iat"],
        nonce=bytes.fromhex(info["nonce_hex"]),
        **_receipt_args(entry),
    )
    assert rebuilt == rcpt.raw
    if name.endswith(".response.cbor"):
        assert encode_container([rebuilt]) == raw
    verify_signature(rcpt, Resolver({SERVICE_WEB: [_service().public_key]}))


def test_every_request_has_its_receipts(vectors: Path) -> None:
    """Each server_pipeline_receipt outcome is one of the receipt files, same task and out."""
    outs = {}
    for name, e in _index().items():
        if name.endswith(".receipt.cbor"):
            outs[
                (
                    e["cids"]["ran_task"],
                    e["expected"].get("out_ok_hex") or e["expected"]["out_err_hex"],
                )
            ] = name
    for name, e in _index().items():
        if name.endswith(".request.cbor") and name.startswith("provider_add"):
            for r in e["expected"]["server_pipeline_receipt"]:
                assert (r["ran"], r.get("out_ok_hex") or r["out_err_hex"]) in outs, name


def test_subscription_ids_are_cids_of_the_consumer_map(vectors: Path) -> None:
    """sprue's subscription id: CIDv1 dag-cbor sha2-256 of {"consumer": <space DID>}."""
    ids = json.loads((GO / "subscription_ids.json").read_text())
    assert len(ids) == 4
    for did, want in ids.items():
        assert str(CID.dag_cbor(cbor.encode({"consumer": did}))) == want
    # the id in the OK receipts is space-1's
    ok = _index()["provider_add.plc_tenant.svc_didkey.receipt_ok.receipt.cbor"]
    assert (
        ok["expected"]["unpacked_ok_id"]
        == ids["did:key:z6MkvuWMaELgHeTh83vFWL4uerFcmxNfZ2JAYy2kMkCATpQt"]
    )


def test_high_s_and_flipped_requests_keep_the_task(vectors: Path) -> None:
    base = "provider_add.plc_tenant.svc_didkey"
    tasks = set()
    sigs = []
    for variant in ("", ".high_s", ".sig_flipped"):
        inv = decode_request((GO / f"{base}{variant}.request.cbor").read_bytes()).invocations[0]
        tasks.add(inv.task_cid)
        sigs.append(inv.signature)
    assert len(tasks) == 1 and len(set(sigs)) == 3
    n = int("FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141", 16)
    assert int.from_bytes(sigs[1][32:], "big") == n - int.from_bytes(sigs[0][32:], "big")
