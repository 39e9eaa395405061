"""``inspect --plc-directory URL``: a did:plc issuer's ``/provider/add`` verified with its
document from a PLC directory (the development one, over real HTTP), as the worker does."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from worker import cli
from worker.produce.plc import Server, Store, serving
from worker.ucan import parse_plc_operation

GO = "ucantone-go"
SERVICE = "did:key:z6MkoGmQXc2j7GuHEYrL9NwWLGFDM58iXXwRRKMjhY4Mc1Sb"
TENANT_1 = "did:plc:xbfubwxudf3oi4jrc3t7wlaw"
NOW = "1800000000"


@pytest.fixture(name="directory")
async def _directory(vectors: Path) -> AsyncIterator[Server]:
    """A development directory that knows tenant-1 (from its vector genesis op), not
    tenant-2."""
    store = Store()
    op = parse_plc_operation((vectors / GO / "plc.tenant-1.genesis_op.signed.json").read_bytes())
    store.add(TENANT_1, op)
    async with serving(store, port=0) as server:
        yield server


async def _inspect(
    capsys: pytest.CaptureFixture[str], path: Path, *extra: str
) -> tuple[int, dict[str, Any]]:
    argv = ["inspect", str(path), "--now", NOW, "--service-did", SERVICE, "--json", *extra]
    code = await asyncio.to_thread(cli.main, argv)
    out = capsys.readouterr().out
    [doc] = [json.loads(line) for line in out.splitlines() if line.startswith('{"tokens"')]
    return code, doc


async def test_a_did_plc_issuer_is_verified_with_its_document(
    directory: Server, vectors: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = vectors / GO / "provider_add.plc_tenant.svc_didkey.request.cbor"
    code, doc = await _inspect(capsys, path)
    [inv] = doc["invocations"]
    assert code == cli.EXIT_CHECK_FAILED and inv["error"]["name"] == "DIDKeyResolutionError"
    code, doc = await _inspect(capsys, path, "--plc-directory", directory.url)
    [inv] = doc["invocations"]
    assert code == cli.EXIT_OK and inv["valid"] is True and inv["iss"] == TENANT_1


async def test_what_the_directory_refuses_is_named(
    directory: Server, vectors: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """tenant-2 was never published: ucantone's verdict (UnknownError, unexpected status:
    404); a forged signature by a known did:plc is still InvalidSignature."""
    unknown = vectors / GO / "provider_add.plc_unregistered.svc_didkey.request.cbor"
    code, doc = await _inspect(capsys, unknown, "--plc-directory", directory.url)
    [inv] = doc["invocations"]
    assert code == cli.EXIT_CHECK_FAILED and inv["error"]["name"] == "UnknownError"
    assert inv["error"]["message"].startswith("unexpected status: 404")
    forged = vectors / GO / "provider_add.plc_tenant.svc_didkey.sig_flipped.request.cbor"
    code, doc = await _inspect(capsys, forged, "--plc-directory", directory.url)
    [inv] = doc["invocations"]
    assert code == cli.EXIT_CHECK_FAILED and inv["error"]["name"] == "InvalidSignature"
