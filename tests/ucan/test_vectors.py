"""ucantone's own fixtures and the ucan-wg container vectors."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import VECTORS
from tests.support.principals import DIDS, load_dag_json
from worker.ucan import (
    CID,
    Delegation,
    Invocation,
    Signer,
    ValidationError,
    decode,
    decode_request,
    decode_token,
    encode_container,
    encode_delegation,
    parse_policy,
    parse_selector,
    select,
    validate_invocation,
)
from worker.ucan.cbor import from_dag_json
from worker.ucan.container import unwrap
from worker.ucan.policy import holds
from worker.ucan.selector import ResolutionError


def _cases(group: str) -> list[dict[str, Any]]:
    path = VECTORS / "ucantone" / "validator-invocations.json"
    if not path.exists():  # the `vectors` fixture reports the absence
        return [{"name": "missing"}]
    return list(from_dag_json(json.loads(path.read_text()))[group])


def _check(case: dict[str, Any]) -> str | None:
    inv = decode_token(case["invocation"])
    assert isinstance(inv, Invocation)
    proofs = {}
    for raw in case["proofs"]:
        d = decode_token(raw)
        assert isinstance(d, Delegation)
        proofs[d.cid] = d
    try:
        validate_invocation(inv, proofs, now=case["time"], clock_skew=0)
    except ValidationError as exc:
        assert exc.message
        return exc.name
    return None


@pytest.mark.parametrize("case", _cases("valid"), ids=lambda c: c["name"])
def test_validator_valid_cases(vectors: Path, case: dict[str, Any]) -> None:
    assert case["time"] == 1767225600
    assert _check(case) is None


@pytest.mark.parametrize("case", _cases("invalid"), ids=lambda c: c["name"])
def test_validator_invalid_cases(vectors: Path, case: dict[str, Any]) -> None:
    assert _check(case) == case["error"]["name"]


def test_there_are_twenty_validator_cases(vectors: Path) -> None:
    assert len(_cases("valid")) == 7
    assert len(_cases("invalid")) == 13


def test_every_token_decodes_with_its_cid(ucantone: Path) -> None:
    index = json.loads((ucantone / "tokens" / "index.json").read_text())
    assert len(index) > 20
    for entry in index:
        raw = (ucantone / entry["file"]).read_bytes()
        tok = decode_token(raw)
        assert str(tok.cid) == entry["cid"], entry["file"]
        assert tok.cid == CID.parse(entry["cid"])
        assert tok.tag == entry["tag"]
        assert tok.raw == raw
        assert isinstance(tok, Delegation) == entry["role"].startswith("prf")
        if isinstance(tok, Invocation) and "task_cid_derived" in entry:
            assert str(tok.task_cid) == entry["task_cid_derived"]


def test_token_files_validate_as_indexed(ucantone: Path) -> None:
    index = json.loads((ucantone / "tokens" / "index.json").read_text())
    cases: dict[str, dict[str, Any]] = {}
    for entry in index:
        c = cases.setdefault(entry["case"], {"proofs": {}, "entry": None})
        tok = decode_token((ucantone / entry["file"]).read_bytes())
        if entry["role"] == "inv":
            c["inv"], c["entry"] = tok, entry
        else:
            c["proofs"][tok.cid] = tok
    assert len(cases) == 20
    for name, c in cases.items():
        got = None
        try:
            validate_invocation(c["inv"], c["proofs"], now=c["entry"]["validation_time"])
        except ValidationError as exc:
            got = exc.name
        assert got == c["entry"]["expected_error"], name


def test_delegation_fixture_rebuilt_byte_for_byte(ucantone: Path) -> None:
    doc = json.loads((ucantone / "delegation.json").read_text())
    assert doc["valid"]
    for case in doc["valid"]:
        p = case["envelope"]["payload"]
        issuer = next(
            Signer.parse(k) for k in doc["principals"].values() if Signer.parse(k).did == p["iss"]
        )
        token = encode_delegation(
            issuer,
            aud=p["aud"],
            sub=p["sub"],
            cmd=p["cmd"],
            pol=p["pol"],
            exp=p["exp"],
            nonce=base64.b64decode(p["nonce"]),
        )
        assert token == base64.b64decode(case["token"])
        dlg = decode_token(token)
        assert str(dlg.cid) == case["cid"]
        assert dlg.signature == base64.b64decode(case["envelope"]["signature"])


def test_fixture_principals_match_their_dids(principals: dict[str, Signer]) -> None:
    for name, did in DIDS.items():
        assert principals[name].did == did


def _policy_cases(ucantone: Path, group: str) -> list[tuple[Any, Any]]:
    doc = load_dag_json(ucantone / "policy.json")
    return [(case["args"], pol) for case in doc[group] for pol in case["policies"]]


def test_policy_fixture_valid(ucantone: Path) -> None:
    cases = _policy_cases(ucantone, "valid")
    assert cases
    for args, pol in cases:
        policy = parse_policy(pol)
        assert all(holds(s, args) for s in policy.statements), pol


def test_policy_fixture_invalid(ucantone: Path) -> None:
    cases = _policy_cases(ucantone, "invalid")
    assert cases
    for args, pol in cases:
        policy = parse_policy(pol)
        assert not all(holds(s, args) for s in policy.statements), pol


def test_selector_fixture(ucantone: Path) -> None:
    doc = load_dag_json(ucantone / "selector-supported.json")
    for case in doc["pass"]:
        assert select(parse_selector(case["selector"]), case["input"]) == case["output"], case
    for case in doc["null"]:
        assert select(case["selector"], case["input"]) is None, case
    for case in doc["fail"]:
        with pytest.raises(ResolutionError):
            select(case["selector"], case["input"])


CONTAINER_FILES = {
    "Bytes": 0x40,
    "Base64StdPadding": 0x42,
    "Base64URL": 0x43,
    "BytesGzipped": 0x4D,
    "Base64StdPaddingGzipped": 0x4F,
    "Base64URLGzipped": 0x50,
}


def test_ucan_wg_containers_outer_layer(vectors: Path) -> None:
    inner = {}
    for name, header in CONTAINER_FILES.items():
        body = (vectors / "ucan-wg-container" / name).read_bytes()
        assert body[0] == header
        value = decode(unwrap(body))
        assert list(value) == ["ctn-v1"]
        inner[name] = value["ctn-v1"]
        assert len(inner[name]) == 10
        # every token is refused (pre-v1 varsig header) and the reason names the header
        req = decode_request(body)
        assert not req.tokens
        assert len(req.dropped) == 10
        assert all("varsig" in d for d in req.dropped)
        # our encoder writes the same form back, tokens sorted bytewise
        again = encode_container(inner[name], header=header)
        assert again[0] == header
        assert decode(unwrap(again))["ctn-v1"] == sorted(inner[name])
