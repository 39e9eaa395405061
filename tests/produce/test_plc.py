"""``plc serve`` and ``plc create`` over real HTTP: the development directory takes the
genesis operation ucantone POSTs and serves the directory's document byte for byte; unknown,
malformed and forged DIDs are refused as the directory refuses them; ``--data`` survives a
restart; ``plc create`` registers a did:plc as Hilt does."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from worker import cli
from worker.errors import ConfigError
from worker.produce.plc import DID_DOCUMENT_TYPE, MAX_BODY, Server, Store, serving
from worker.ucan import (
    PlcOperation,
    Signer,
    create_genesis_op,
    parse_plc_operation,
    render_plc_document,
)

TENANT_1 = "did:plc:xbfubwxudf3oi4jrc3t7wlaw"
TENANT_2 = "did:plc:6rk72l4hge635a2cdqmq7hz2"


@pytest.fixture(name="go")
def _go(vectors: Path) -> Path:
    return vectors / "ucantone-go"


@pytest.fixture(name="directory")
async def _directory() -> AsyncIterator[Server]:
    async with serving(Store(), port=0) as server:
        yield server


async def _request(
    method: str, url: str, body: bytes | None = None, **headers: str
) -> tuple[int, str, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, data=body, headers=headers) as response,
    ):
        return response.status, response.headers.get("Content-Type", ""), await response.read()


async def test_the_vector_genesis_op_gives_the_directorys_document(
    directory: Server, go: Path
) -> None:
    """The body ucantone's DirectoryClient.Update POSTs for tenant-1 is stored (200 OK, as
    the reference server answers) and GET serves plc.tenant-1.did_document.json byte for
    byte as application/did+ld+json; /data is plc.tenant-1.data.json byte for byte."""
    body = (go / "plc.tenant-1.genesis_op.signed.json").read_bytes()
    status, _, answer = await _request(
        "POST", f"{directory.url}/{TENANT_1}", body, **{"Content-Type": "application/json"}
    )
    assert (status, answer) == (200, b"OK")
    status, kind, document = await _request("GET", f"{directory.url}/{TENANT_1}")
    assert status == 200 and kind == DID_DOCUMENT_TYPE
    assert document == (go / "plc.tenant-1.did_document.json").read_bytes()
    status, _, data = await _request("GET", f"{directory.url}/{TENANT_1}/data")
    assert (status, data) == (200, (go / "plc.tenant-1.data.json").read_bytes())
    # the operation itself, as /log/last and /log give it
    _, _, last = await _request("GET", f"{directory.url}/{TENANT_1}/log/last")
    assert parse_plc_operation(last) == parse_plc_operation(body)
    _, _, log = await _request("GET", f"{directory.url}/{TENANT_1}/log")
    assert [parse_plc_operation(json.dumps(v).encode()) for v in json.loads(log)] == [
        parse_plc_operation(body)
    ]
    # posting it again changes nothing
    status, _, _ = await _request("POST", f"{directory.url}/{TENANT_1}", body)
    assert status == 200 and len(directory.store) == 1


async def test_an_unknown_did_is_404_json(directory: Server) -> None:
    """tenant-2 was never published: the reference server's 404 and message."""
    for path in (TENANT_2, f"{TENANT_2}/data", f"{TENANT_2}/log/last"):
        status, kind, body = await _request("GET", f"{directory.url}/{path}")
        assert status == 404 and kind.startswith("application/json")
        assert body == b'{"message":"DID not registered: did:plc:6rk72l4hge635a2cdqmq7hz2"}'


@pytest.mark.parametrize(
    "did",
    [
        "did:plc:BADBADBADBADBADBADBADBAD",
        "did:plc:short",
        "did:key:z6MkvuWMaELgHeTh83vFWL4uerFcmxNfZ2JAYy2kMkCATpQt",
        "not-a-did",
    ],
)
async def test_a_malformed_did_is_400(directory: Server, go: Path, did: str) -> None:
    for method, body in (
        ("GET", None),
        ("POST", (go / "plc.tenant-1.genesis_op.signed.json").read_bytes()),
    ):
        status, _, answer = await _request(method, f"{directory.url}/{did}", body)
        assert status == 400, (method, did)
        message = json.loads(answer)["message"]
        assert message.startswith("invalid DID") and did[:20] in message
    assert len(directory.store) == 0


def _forged_signature(go: Path) -> tuple[str, bytes]:
    """tenant-1's operation re-signed by tenant-2's key: a well-formed operation whose DID
    is its own hash, but whose sig is not by its rotation key."""
    op = parse_plc_operation((go / "plc.tenant-1.genesis_op.signed.json").read_bytes())
    other = Signer.parse(
        base64.b64encode((go / "secp256k1.tenant-2.private.bin").read_bytes()).decode()
    )
    sig = base64.urlsafe_b64encode(other.sign(op.unsigned_cbor)).rstrip(b"=").decode()
    forged = PlcOperation(
        op.rotation_keys, op.verification_methods, op.also_known_as, op.services, None, sig
    )
    return forged.did, forged.to_dag_json()


async def test_forged_operations_are_refused_with_a_clear_message(
    directory: Server, go: Path
) -> None:
    tenant_1 = (go / "plc.tenant-1.genesis_op.signed.json").read_bytes()
    forged_did, forged = _forged_signature(go)
    doc = json.loads(tenant_1)
    cases: list[tuple[str, bytes, str]] = [
        # a real operation posted under another DID: the DID is not its hash
        (TENANT_2, tenant_1, f"the operation's hash gives {TENANT_1}, not {TENANT_2}"),
        # signed by a key that is not its rotation key
        (forged_did, forged, "sig does not verify with any of its rotation keys"),
        # a signature that is not one
        (
            TENANT_1,
            json.dumps(doc | {"sig": doc["sig"][:-4] + "AAAA"}).encode(),
            "sig does not verify",
        ),
        # not an operation
        (TENANT_1, b"{not json", "invalid JSON"),
        (TENANT_1, json.dumps(doc | {"type": "create"}).encode(), "type is"),
        (TENANT_1, json.dumps(doc | {"prev": "bafyreib"}).encode(), "genesis operations only"),
        (
            TENANT_1,
            json.dumps(
                doc | {"rotationKeys": ["did:key:z6MkvuWMaELgHeTh83vFWL4uerFcmxNfZ2JAYy2kMkCATpQt"]}
            ).encode(),
            "not a secp256k1 did:key",
        ),
    ]
    for did, body, fragment in cases:
        status, kind, answer = await _request("POST", f"{directory.url}/{did}", body)
        assert status == 400 and kind.startswith("application/json"), (fragment, answer)
        assert fragment in json.loads(answer)["message"], answer
    # too large: refused before it is read
    status, _, answer = await _request("POST", f"{directory.url}/{TENANT_1}", b" " * (MAX_BODY + 1))
    assert status == 413 and "bytes" in json.loads(answer)["message"]
    assert len(directory.store) == 0
    for did in (TENANT_1, TENANT_2, forged_did):
        status, _, _ = await _request("GET", f"{directory.url}/{did}")
        assert status == 404


async def test_data_survives_a_restart(tmp_path: Path, go: Path) -> None:
    data = tmp_path / "plc.json"
    body = (go / "plc.tenant-1.genesis_op.signed.json").read_bytes()
    async with serving(Store.load(data), port=0) as server:
        assert (await _request("POST", f"{server.url}/{TENANT_1}", body))[0] == 200
    saved = json.loads(data.read_text())
    assert [e["did"] for e in saved["operations"]] == [TENANT_1]
    async with serving(Store.load(data), port=0) as server:
        status, _, document = await _request("GET", f"{server.url}/{TENANT_1}")
        assert (status, document) == (200, (go / "plc.tenant-1.did_document.json").read_bytes())
    # what it reloads is checked again: an operation edited in the file is refused at start
    saved["operations"][0]["operation"]["verificationMethods"]["hilt"] = (
        "did:key:zQ3shcHTg7dhUXMkVAmjgXybiPcU1qwcisNqm1ffrhrzpJ6zq"
    )
    data.write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"operations\[0\]: .*sig does not verify"):
        Store.load(data)
    data.write_text("[]")
    with pytest.raises(ConfigError, match="not written by plc serve"):
        Store.load(data)
    with pytest.raises(ConfigError, match="does not exist"):
        Store.load(tmp_path / "missing-dir" / "plc.json")


# --- plc create --------------------------------------------------------------------------


def _key_file(tmp_path: Path, signer: Signer) -> str:
    path = tmp_path / f"{signer.kind}.json"
    path.write_text(json.dumps({"did": signer.did, "key": signer.export()}))
    return str(path)


async def test_plc_create_registers_the_did_hilt_would(
    directory: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tenant = Signer.generate("secp256k1")
    key = _key_file(tmp_path, tenant)
    argv = ["plc", "create", "--key", key, "--directory", directory.url]
    assert await asyncio.to_thread(cli.main, [*argv, "--json"]) == cli.EXIT_OK
    # the in-process directory logs to the same stdout: the command's document has "ok"
    [doc] = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if '"ok"' in ln]
    op = create_genesis_op(tenant)
    assert doc == {
        "did": op.did,
        "key_did": tenant.did,
        "directory": directory.url,
        "op_cid": str(op.cid),
        "ok": True,
        "error": None,
    }
    status, _, document = await _request("GET", f"{directory.url}/{op.did}")
    assert status == 200 and document == render_plc_document(op.did, op)
    method = json.loads(document)["verificationMethod"]
    assert [(m["id"], m["publicKeyMultibase"]) for m in method] == [
        (f"{op.did}#hilt", tenant.did.removeprefix("did:key:"))
    ]
    # again, in text: the DID alone on stdout (TENANT=$(...)), a note on stderr
    assert await asyncio.to_thread(cli.main, argv) == cli.EXIT_OK
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1] == op.did and "provision --as" in captured.err
    assert "plc create" not in captured.out
    assert tenant.export() not in captured.out + captured.err
    assert len(directory.store) == 1


async def test_plc_create_takes_the_directory_from_the_environment(
    directory: Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FORGE_WORKER_PLC_DIRECTORY", directory.url + "/")
    key = _key_file(tmp_path, Signer.generate("secp256k1"))
    assert await asyncio.to_thread(cli.main, ["plc", "create", "--key", key]) == cli.EXIT_OK
    # the in-process directory logs to the same stdout: the DID is the last line
    did = capsys.readouterr().out.splitlines()[-1]
    assert directory.store.get(did) is not None


def test_plc_create_refuses_an_ed25519_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = _key_file(tmp_path, Signer.generate())
    argv = ["plc", "create", "--key", key, "--directory", "http://127.0.0.1:9"]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "secp256k1" in err and "ed25519" in err and "keygen --type secp256k1" in err


async def test_plc_create_when_the_directory_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory that answers 400 (as the reference server does for an operation it will
    not take): exit 1, its message, and the JSON names the refusal."""

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"message": "Proposed prev does not match"}, status=400)

    app = web.Application()
    app.router.add_post("/{did}", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        key = _key_file(tmp_path, Signer.generate("secp256k1"))
        argv = ["plc", "create", "--key", key, "--directory", url]
        assert await asyncio.to_thread(cli.main, argv) == cli.EXIT_CHECK_FAILED
        err = capsys.readouterr().err
        assert "error DirectoryRefused" in err and "400 Proposed prev does not match" in err
        assert await asyncio.to_thread(cli.main, [*argv, "--json"]) == cli.EXIT_CHECK_FAILED
        doc = json.loads(capsys.readouterr().out)
        assert doc["ok"] is False and doc["error"] == {
            "name": "DirectoryRefused",
            "status": 400,
            "message": "Proposed prev does not match",
        }
    finally:
        await runner.cleanup()


def test_plc_create_unreachable_directory_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = _key_file(tmp_path, Signer.generate("secp256k1"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["plc", "create", "--key", key, "--directory", f"http://127.0.0.1:{port}"]
    assert cli.main(argv) == cli.EXIT_UNREACHABLE
    assert "cannot reach the PLC directory" in capsys.readouterr().err
    assert cli.main(["plc", "create", "--key", key, "--directory", "ftp://x"]) == cli.EXIT_USAGE


def test_help_says_development_only(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["plc", "--help"], ["plc", "serve", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        text = " ".join(capsys.readouterr().out.split())
        assert "for development only" in text and "https://plc.directory" in text


# --- plc serve, the command --------------------------------------------------------------


def _start(data: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``forge-worker plc serve --port 0 --data FILE`` as a process; its URL from its log."""
    seen = len(log.read_text().splitlines()) if log.exists() else 0
    env = {**os.environ, "FORGE_WORKER_LOG_FORMAT": "json"}
    with log.open("ab") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker.cli",
                "plc",
                "serve",
                "--port",
                "0",
                "--data",
                str(data),
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
    for _ in range(400):
        for line in log.read_text().splitlines()[seen:]:
            event = json.loads(line)
            if event.get("event") == "plc_directory_serving":
                return proc, str(event["url"])
        if proc.poll() is not None:
            pytest.fail(f"plc serve exited {proc.returncode}: {log.read_text()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("plc serve did not say where it listens")


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=20)


async def test_plc_serve_command_logs_each_request_and_keeps_its_data(
    tmp_path: Path, go: Path
) -> None:
    data, log = tmp_path / "plc.json", tmp_path / "serve.log"
    proc, url = _start(data, log)
    try:
        body = (go / "plc.tenant-1.genesis_op.signed.json").read_bytes()
        assert (await _request("POST", f"{url}/{TENANT_1}", body))[0] == 200
        assert (await _request("GET", f"{url}/{TENANT_2}"))[0] == 404
    finally:
        assert _stop(proc) == 0
    events: list[dict[str, Any]] = [json.loads(line) for line in log.read_text().splitlines()]
    requests = [e for e in events if e["event"] == "plc_request"]
    assert [(e["method"], e["status"], e["did"]) for e in requests] == [
        ("POST", 200, TENANT_1),
        ("GET", 404, TENANT_2),
    ]
    serving_line = next(e for e in events if e["event"] == "plc_directory_serving")
    assert "development only" in serving_line["note"]
    assert events[-1]["event"] == "plc_directory_stopped"
    # a new process on the same file serves what the first one took
    proc, url = _start(data, log)
    try:
        status, _, document = await _request("GET", f"{url}/{TENANT_1}")
        assert (status, document) == (200, (go / "plc.tenant-1.did_document.json").read_bytes())
    finally:
        assert _stop(proc) == 0
