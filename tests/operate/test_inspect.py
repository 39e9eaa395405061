"""``forge-worker inspect`` through the CLI: JSON shape, text, exit codes, bad input."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest

from tests.support.principals import NOW, HiltRequest, build_hilt_request
from tests.support.worker import Requester, container, delegation, invocation, task_of
from worker.cli import main
from worker.service.app import App
from worker.ucan import CID, Signer, decode_request, encode_container


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (
        "FORGE_WORKER_SERVICE_KEY",
        "FORGE_WORKER_SERVICE_DID",
        "FORGE_WORKER_SERVICE_KEY_FILE",
    ):
        monkeypatch.delenv(var, raising=False)


def _write(tmp_path: Path, data: bytes, name: str = "body") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_json_document(
    tmp_path: Path,
    hilt: HiltRequest,
    principals: dict[str, Signer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    body = encode_container([hilt.invocation, hilt.delegation])
    service = principals["bob"].did
    rc = main(
        ["inspect", _write(tmp_path, body), "--now", str(NOW), "--service-did", service, "--json"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    doc = json.loads(out)
    assert set(doc) == {"tokens", "invocations", "receipts"}
    assert doc["receipts"] == []  # a request holds none
    kinds = {t["kind"] for t in doc["tokens"]}
    assert kinds == {"invocation", "delegation"}
    assert all(set(t) == {"kind", "cid", "iss", "cmd"} for t in doc["tokens"])
    (inv,) = doc["invocations"]
    assert set(inv) == {"cid", "task", "iss", "sub", "aud", "cmd", "args", "valid", "error"}
    assert inv["cid"] == str(CID.dag_cbor(hilt.invocation))
    assert inv["task"].startswith("bafyrei")
    assert inv["valid"] is True and inv["error"] is None
    assert inv["cmd"] == "/customer/add" and inv["aud"] == service
    assert list(inv["args"]["details"]) == ["external_id", "region"]


def test_invalid_invocation_exits_1(
    tmp_path: Path, principals: dict[str, Signer], capsys: pytest.CaptureFixture[str]
) -> None:
    req = build_hilt_request(principals, exp=NOW - 1)
    body = encode_container([req.invocation, req.delegation], header=0x42)
    rc = main(["inspect", _write(tmp_path, body), "--now", str(NOW), "--json"])
    assert rc == 1
    inv = json.loads(capsys.readouterr().out)["invocations"][0]
    assert inv["valid"] is False
    assert inv["error"]["name"] == "Expired"
    # the leeway turns it valid
    assert main(["inspect", _write(tmp_path, body), "--now", str(NOW), "--clock-skew", "60"]) == 0


def test_wrong_audience_only_with_service_did(
    tmp_path: Path,
    hilt: HiltRequest,
    principals: dict[str, Signer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _write(tmp_path, encode_container([hilt.invocation, hilt.delegation]))
    assert main(["inspect", path, "--now", str(NOW)]) == 0
    rc = main(["inspect", path, "--now", str(NOW), "--service-did", principals["carol"].did])
    assert rc == 1
    out = capsys.readouterr().out
    assert "INVALID InvalidAudience" in out


def test_text_output(tmp_path: Path, hilt: HiltRequest, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["inspect", _write(tmp_path, hilt.invocation), "--now", str(NOW)])
    out = capsys.readouterr().out
    assert rc == 1  # its proof is not in the file
    assert "UnavailableProof" in out and "/customer/add" in out


def test_vector_token(vectors: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = vectors / "ucantone" / "tokens" / "valid.self-signed.inv.cbor"
    assert main(["inspect", str(path), "--now", str(NOW), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["invocations"][0]["valid"] is True


@pytest.mark.parametrize("data", [b"", b"\x00garbage", b"B!!!!", b"\x82\x40\xa0"])
def test_undecodable_is_one_line_exit_1(
    tmp_path: Path, data: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["inspect", _write(tmp_path, data), "--json"])
    captured = capsys.readouterr()
    assert rc == 1
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["inspect", str(tmp_path / "nope"), "--json"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "cannot read" in err


def test_directory_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# --- receipts ----------------------------------------------------------------------------

GO = "ucantone-go"
GO_SERVICE = "did:key:z6MkoGmQXc2j7GuHEYrL9NwWLGFDM58iXXwRRKMjhY4Mc1Sb"


def _go_outcome(name: str) -> dict[str, object]:
    """The outcome a Go vector's file name announces: ``receipt_ok`` or ``receipt_err_<Name>``."""
    tag = next(part for part in name.split(".") if part.startswith("receipt_"))
    if tag == "receipt_ok":
        return {"ok": None}
    return {"error": tag.removeprefix("receipt_err_")}


def _go_files(vectors: Path, variant: str) -> list[Path]:
    files = sorted((vectors / GO).glob(f"*.{variant}.*receipt_*.cbor"))
    assert files, f"no {variant} receipts among the Go vectors"
    return files


def test_go_receipts_verify_ok_and_error_alike(
    vectors: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Receipts ucantone issued (responses and bare receipt tokens): every signature verifies
    against its did:key issuer, and an error receipt that verifies is a valid receipt."""
    index = {f["file"]: f for f in json.loads((vectors / GO / "index.json").read_text())["files"]}
    for path in _go_files(vectors, "svc_didkey"):
        assert main(["inspect", str(path), "--json"]) == 0, path.name
        doc = json.loads(capsys.readouterr().out)
        assert doc["invocations"] == []
        [receipt] = doc["receipts"]
        assert set(receipt) == {"cid", "iss", "ran", "out", "valid", "problem"}
        assert receipt["valid"] is True and receipt["problem"] is None, path.name
        assert receipt["iss"] == GO_SERVICE
        assert receipt["cid"] == doc["tokens"][0]["cid"]
        assert receipt["ran"].startswith("bafyrei")
        expected = _go_outcome(path.name)
        if "ok" in expected:
            assert set(receipt["out"]) == {"ok"}
        else:
            assert set(receipt["out"]) == {"error"}
            assert receipt["out"]["error"]["name"] == expected["error"]
            assert receipt["out"]["error"]["message"]
        meta = index.get(path.name, {}).get("expected", {}).get("server_pipeline_receipt")
        if meta:  # where the index records the receipt's task, it is the one reported
            assert receipt["ran"] == meta[0]["ran"]


def test_go_provider_add_ok_receipt_shows_the_subscription_id(
    vectors: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = vectors / GO / "provider_add.plc_tenant.svc_didkey.receipt_ok.response.cbor"
    assert main(["inspect", str(path), "--json"]) == 0
    [receipt] = json.loads(capsys.readouterr().out)["receipts"]
    assert receipt["out"] == {
        "ok": {"id": "bafyreic7weksudmo75ilb3hybsapo7fqjspzbg6ewdazcvpa5mzfs2td4m"}
    }


def test_go_did_web_receipts_verify_with_the_configured_service_key(
    vectors: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """did:web:upload.example signs with the vector service key: it verifies once that key
    and DID are configured (FORGE_WORKER_SERVICE_KEY + FORGE_WORKER_SERVICE_DID), and not
    before, since nothing else resolves a did:web."""
    files = _go_files(vectors, "svc_didweb")
    for path in files:
        assert main(["inspect", str(path), "--json"]) == 1
        [receipt] = json.loads(capsys.readouterr().out)["receipts"]
        assert receipt["iss"] == "did:web:upload.example" and receipt["valid"] is False
        assert receipt["problem"]["name"] == "DIDKeyResolutionError"
    raw = (vectors / GO / "ed25519.service.private.bin").read_bytes()
    monkeypatch.setenv("FORGE_WORKER_SERVICE_KEY", base64.b64encode(raw).decode())
    monkeypatch.setenv("FORGE_WORKER_SERVICE_DID", "did:web:upload.example")
    for path in files:
        assert main(["inspect", str(path), "--json"]) == 0
        [receipt] = json.loads(capsys.readouterr().out)["receipts"]
        assert receipt["valid"] is True and receipt["problem"] is None
    # a key configured for another DID does not make a did:web verify
    monkeypatch.setenv("FORGE_WORKER_SERVICE_DID", "did:web:elsewhere.example")
    assert main(["inspect", str(files[0])]) == 1
    capsys.readouterr()


def _tampered(body: bytes, signature: bytes) -> bytes:
    at = body.index(signature)
    return body[:at] + bytes([signature[0] ^ 1]) + body[at + 1 :]


def test_a_receipt_whose_signature_does_not_verify_exits_1(
    tmp_path: Path, vectors: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = (vectors / GO / "customer_add.hilt.svc_didkey.receipt_ok.response.cbor").read_bytes()
    [receipt] = decode_request(body).receipts
    path = _write(tmp_path, _tampered(body, receipt.signature))
    assert main(["inspect", path, "--json"]) == 1
    [entry] = json.loads(capsys.readouterr().out)["receipts"]
    assert entry["valid"] is False and entry["problem"]["name"] == "InvalidSignature"
    assert entry["out"] == {"ok": {}}  # what it claims is still shown
    # the text says the same, on one line
    assert main(["inspect", path]) == 1
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("receipt ")]
    assert "INVALID InvalidSignature" in line and '{"ok": {}}' in line


def test_service_did_names_who_must_have_issued_the_receipts(
    vectors: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(vectors / GO / "customer_add.hilt.svc_didkey.receipt_ok.response.cbor")
    assert main(["inspect", path, "--service-did", GO_SERVICE]) == 0
    assert main(["inspect", path, "--service-did", "did:web:other.example", "--json"]) == 1
    out = capsys.readouterr().out
    [receipt] = json.loads(out.splitlines()[-1])["receipts"]
    assert receipt["problem"]["name"] == "InvalidIssuer"


def test_receipt_text_is_one_line_each(vectors: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = "provider_add.plc_tenant.svc_didkey.sig_flipped.receipt_err_InvalidSignature"
    # its error message has newlines of its own (ucantone's "Tried these verification methods")
    assert main(["inspect", str(vectors / GO / f"{name}.response.cbor")]) == 0
    out = capsys.readouterr().out
    [line] = [ln for ln in out.splitlines() if ln.startswith("receipt ")]
    assert ": VALID" in line and GO_SERVICE in line and '"name": "InvalidSignature"' in line
    assert "no invocations" not in out


@pytest.mark.integration
async def test_receipts_the_worker_produced_verify(
    worker: App,
    requester: Requester,
    service: Signer,
    agent: Signer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An ok and an error receipt straight from the running worker: both verify (exit 0),
    each shown with its outcome and the task it ran."""
    proof = delegation(service, agent)
    good = invocation(agent, service.did, proofs=[proof])
    refused = invocation(agent, service.did)  # no proof: not authorized
    for name, body, outcome in (
        ("ok", container(good, proof), {"ok": {}}),
        ("refused", container(refused), None),
    ):
        msg, _ = await requester.call(body)
        path = _write(tmp_path, msg.body, name)
        assert await asyncio.to_thread(main, ["inspect", path, "--json"]) == 0
        doc = json.loads(capsys.readouterr().out.splitlines()[-1])
        [receipt] = doc["receipts"]
        assert receipt["valid"] is True and receipt["iss"] == service.did
        assert receipt["ran"] == str(task_of(good if name == "ok" else refused))
        if outcome is not None:
            assert receipt["out"] == outcome
        else:  # an error receipt that verifies is a valid receipt
            assert set(receipt["out"]) == {"error"} and receipt["out"]["error"]["name"]
