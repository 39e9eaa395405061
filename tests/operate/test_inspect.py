"""``forge-worker inspect`` through the CLI: JSON shape, text, exit codes, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.principals import NOW, HiltRequest, build_hilt_request
from worker.cli import main
from worker.ucan import CID, Signer, encode_container


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
    assert set(doc) == {"tokens", "invocations"}
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
