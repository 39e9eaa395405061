"""``/provider/add`` and ``/space/info`` through the worker: real RabbitMQ, real Postgres, and
a PLC directory of the tests' own over real HTTP (tests/support/directory.py).

The requests are the ucantone-go vectors: bytes made by the real Go code as Hilt's
``ProvisionSpace`` sends them, signed by the tenant's did:plc with secp256k1.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection

from tests.conftest import VECTORS
from tests.support.directory import StandInDirectory, document_json
from tests.support.worker import QueueCleanup, Requester, receipts_of
from worker.amqp import topology
from worker.config import Secret, Settings
from worker.service.app import App, running
from worker.ucan import (
    CID,
    Receipt,
    Signer,
    cbor,
    decode_token,
    encode,
    encode_container,
    encode_delegation,
    encode_invocation,
)

pytestmark = pytest.mark.integration

GO = VECTORS / "ucantone-go"
TENANT = "did:plc:xbfubwxudf3oi4jrc3t7wlaw"
UNREGISTERED = "did:plc:6rk72l4hge635a2cdqmq7hz2"
SPACE_1_ID = "bafyreic7weksudmo75ilb3hybsapo7fqjspzbg6ewdazcvpa5mzfs2td4m"
PROVIDER_ADD = "/provider/add"


def _keys() -> dict[str, Any]:
    return {k["label"]: k for kind in ("ed25519", "secp256k1") for k in json.loads((GO / "keys.json").read_text())[kind]}  # fmt: skip


def _key(label: str) -> Signer:
    raw = (GO / f"{label.split('.')[0]}.{label.split('.')[1]}.private.bin").read_bytes()
    return Signer.parse(base64.b64encode(raw).decode())


def vector(name: str) -> bytes:
    return (GO / name).read_bytes()


def out_of(receipt: Receipt) -> bytes:
    """The ``out`` bytes of a receipt's args (``{out: ..., ran: ...}``)."""
    args = receipt.args_raw
    head, ran = b"\xa2\x63out", b"\x63ran" + cbor.encode_link(receipt.ran)
    assert args.startswith(head) and args.endswith(ran)
    return args[len(head) : -len(ran)]


def expected_out(file: str) -> bytes:
    """The ``out`` bytes of the receipt ucantone's server gave: for a request, its
    pipeline's receipt; for a receipt file, that receipt's."""
    for entry in json.loads((GO / "index.json").read_text())["files"]:
        if entry["file"] == file:
            expected = entry["expected"]
            if "server_pipeline_receipt" in expected:
                (expected,) = expected["server_pipeline_receipt"]
            if "out_ok_hex" in expected:  # the value inside {ok: ...} or {error: ...}
                return b"\xa1\x62ok" + bytes.fromhex(expected["out_ok_hex"])
            return b"\xa1\x65error" + bytes.fromhex(expected["out_err_hex"])
    raise AssertionError(f"no vector {file}")


SERVICE = _key("ed25519.service")
TENANT_KEY = _key("secp256k1.tenant-1").with_did(TENANT)
SPACE_1 = _key("ed25519.space-1")


@pytest.fixture(name="settings")
def _settings(
    worker_settings: Settings, directory: StandInDirectory, queue_cleanup: QueueCleanup
) -> Settings:
    directory.serve(TENANT, vector("plc.tenant-1.did_document.json"))
    return queue_cleanup.track(
        dataclasses.replace(
            worker_settings,
            service_key=Secret(SERVICE.export()),
            plc_directory=directory.url,
            retry_delays=(1, 2),
        )
    )


@pytest.fixture(name="app")
async def _app(settings: Settings, amqp: AbstractRobustConnection) -> AsyncIterator[App]:
    async with running(settings) as app:
        yield app


@pytest.fixture(name="requester_")
async def _requester(
    amqp: AbstractRobustConnection, settings: Settings
) -> AsyncIterator[Requester]:
    r = Requester(amqp, settings)
    yield r
    if r.channel is not None and not r.channel.is_closed:
        await r.channel.close()


async def add_customer(database_url: str, customer: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO public.customer (customer, product, inserted_at) "
            "VALUES ($1, 'did:web:hilt.fil-forge.com', now())",
            customer,
        )
    finally:
        await conn.close()


async def rows(database_url: str, table: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(database_url)
    try:
        return [dict(r) for r in await conn.fetch(f"SELECT * FROM public.{table} ORDER BY 1, 2")]
    finally:
        await conn.close()


def provision(
    space: str, *, provider: str | None = None, signer: Signer = TENANT_KEY, exp: int | None = None
) -> bytes:
    """A ``/provider/add`` as Hilt signs it (issuer = subject = the account, no proofs)."""
    return encode_container(
        [
            encode_invocation(
                signer,
                sub=signer.did,
                aud=SERVICE.did,
                cmd=PROVIDER_ADD,
                args_raw=encode({"consumer": space, "provider": provider or SERVICE.did}),
                exp=int(time.time()) + 300 if exp is None else exp,
            )
        ]
    )


async def answer(requester: Requester, body: bytes) -> Receipt:
    _, receipts = await requester.call(body)
    (receipt,) = receipts
    assert receipt.iss == SERVICE.did and receipt.aud is None
    return receipt


async def test_hilts_provision_space_is_answered_as_ucantone_does_and_writes_sprues_rows(
    app: App, requester_: Requester, database_url: str
) -> None:
    await add_customer(database_url, TENANT)
    request = "provider_add.plc_tenant.svc_didkey.request.cbor"
    receipt = await answer(requester_, vector(request))
    assert receipt.ok == {"id": SPACE_1_ID}
    assert out_of(receipt) == expected_out(request)  # the Go server's out, byte for byte
    task = str(receipt.ran)
    assert await rows(database_url, "subscription") == [
        {
            "subscription": SPACE_1_ID,
            "provider": SERVICE.did,
            "customer": TENANT,
            "cause": task,
            "inserted_at": (await rows(database_url, "subscription"))[0]["inserted_at"],
        }
    ]
    (consumer,) = await rows(database_url, "consumer")
    assert (consumer["consumer"], consumer["customer"], consumer["cause"]) == (
        SPACE_1.did,
        TENANT,
        task,
    )
    # redelivered: the stored receipt, byte for byte, and no second effect
    again = await answer(requester_, vector(request))
    assert again.raw == receipt.raw
    assert len(await rows(database_url, "consumer")) == 1


@pytest.mark.parametrize(
    ("request_file", "name"),
    [
        ("provider_add.plc_tenant.svc_didkey.request.cbor", "AccountPlanMissing"),
        ("provider_add.didkey_secp256k1_issuer.svc_didkey.request.cbor", "InvalidAccount"),
        ("provider_add.plc_tenant.svc_didkey.sig_flipped.request.cbor", "InvalidSignature"),
        ("provider_add.plc_tenant.svc_didkey.high_s.request.cbor", "InvalidSignature"),
        ("provider_add.plc_unregistered.svc_didkey.request.cbor", "UnknownError"),
    ],
)
async def test_every_refusal_of_the_vectors(
    app: App, requester_: Requester, database_url: str, request_file: str, name: str
) -> None:
    receipt_file = {
        "AccountPlanMissing": "provider_add.plc_tenant.svc_didkey.receipt_err_AccountPlanMissing.receipt.cbor"
    }.get(name, request_file)
    """No customer row: the tenant's own request is AccountPlanMissing, the rest fail
    before that check. Every name is ucantone's; nothing is written."""
    receipt = await answer(requester_, vector(request_file))
    assert receipt.error is not None and receipt.error["name"] == name
    if name != "UnknownError":  # (ours names the DID and the directory's answer too)
        assert out_of(receipt) == expected_out(receipt_file)
    else:
        message = str(receipt.error["message"])
        assert message.startswith("unexpected status: 404")
        assert UNREGISTERED in message and "DID not registered" in message
    for table in ("subscription", "consumer"):
        assert await rows(database_url, table) == []
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM forge_worker.receipts") == 0
    finally:
        await conn.close()


async def test_provider_not_allowed_and_consumer_exists(
    app: App, requester_: Requester, database_url: str
) -> None:
    await add_customer(database_url, TENANT)
    other = Signer.generate().did
    refused = await answer(requester_, provision(other, provider="did:web:other.example"))
    assert refused.error == {"name": "ProviderNotAllowed", "message": "provider not allowed"}
    first = await answer(requester_, provision(other))
    assert first.ok == {"id": str(CID.dag_cbor(encode({"consumer": other})))}
    # the same space again, by another task: sprue's ConsumerExists, and nothing changes
    second = await answer(requester_, provision(other))
    assert second.error == {
        "name": "ConsumerExists",
        "message": "adding consumer: consumer already exists",
    }
    (consumer,) = await rows(database_url, "consumer")
    assert consumer["cause"] == str(first.ran)


async def test_two_tasks_for_one_space_in_one_batch_provision_it_once(
    app: App, requester_: Requester, database_url: str
) -> None:
    await add_customer(database_url, TENANT)
    space = Signer.generate().did
    reply_to = await requester_.reply_queue()
    for _ in range(5):
        await requester_.publish(provision(space), reply_to=reply_to)
    names = []
    for _ in range(5):
        (receipt,) = receipts_of((await requester_.next(reply_to)).body)
        names.append("ok" if receipt.error is None else receipt.error["name"])
    assert sorted(names) == ["ConsumerExists"] * 4 + ["ok"]
    assert len(await rows(database_url, "consumer")) == 1


async def test_without_a_plan_when_the_operator_allows_it(
    settings: Settings, requester_: Requester, database_url: str, amqp: AbstractRobustConnection
) -> None:
    async with running(dataclasses.replace(settings, allow_provision_without_plan=True)):
        receipt = await answer(
            requester_, vector("provider_add.plc_tenant.svc_didkey.request.cbor")
        )
    assert receipt.ok == {"id": SPACE_1_ID}


async def test_a_did_web_service_answers_the_vector_signed_with_its_did_key(
    settings: Settings, requester_: Requester, database_url: str, amqp: AbstractRobustConnection
) -> None:
    request = "provider_add.plc_tenant.svc_didweb.request.cbor"
    async with running(dataclasses.replace(settings, service_did="did:web:upload.example")):
        await add_customer(database_url, TENANT)
        _, (receipt,) = await requester_.call(vector(request))
    assert receipt.iss == "did:web:upload.example" and receipt.ok == {"id": SPACE_1_ID}
    assert out_of(receipt) == expected_out(request)


async def test_space_info_lists_the_providers_or_says_unknown_space(
    app: App, requester_: Requester, database_url: str
) -> None:
    await add_customer(database_url, TENANT)
    await answer(requester_, vector("provider_add.plc_tenant.svc_didkey.request.cbor"))

    def info(signer: Signer, space: str, proofs: tuple[bytes, ...] = ()) -> bytes:
        inv = encode_invocation(
            signer,
            sub=space,
            aud=SERVICE.did,
            cmd="/space/info",
            args_raw=b"\xa0",
            exp=int(time.time()) + 300,
            prf=[decode_token(p).cid for p in proofs],
        )
        return encode_container([inv, *proofs])

    ok = await answer(requester_, info(SPACE_1, SPACE_1.did))
    assert ok.ok == {"providers": [SERVICE.did]}
    # a read: asked again, answered again (a new receipt), never stored
    again = await answer(requester_, info(SPACE_1, SPACE_1.did))
    assert again.ok == ok.ok and again.raw != ok.raw
    # an agent the space delegated /space/info to
    agent = Signer.generate()
    grant = encode_delegation(SPACE_1, aud=agent.did, sub=SPACE_1.did, cmd="/space/info", exp=None)
    assert (await answer(requester_, info(agent, SPACE_1.did, (grant,)))).ok == ok.ok
    # one without a delegation is refused by the validator
    stranger = await answer(requester_, info(agent, SPACE_1.did))
    assert stranger.error is not None and stranger.error["name"] == "InvalidClaim"
    empty = Signer.generate()
    unknown = await answer(requester_, info(empty, empty.did))
    assert unknown.error is not None and unknown.error["name"] == "UnknownSpace"
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM forge_worker.receipts") == 1
    finally:
        await conn.close()


async def test_one_get_per_did_within_the_ttl_under_concurrent_load(
    app: App, requester_: Requester, database_url: str, directory: StandInDirectory
) -> None:
    await add_customer(database_url, TENANT)
    directory.hang.clear()  # every batch waits on the same first request
    reply_to = await requester_.reply_queue()
    for _ in range(60):
        await requester_.publish(provision(Signer.generate().did), reply_to=reply_to)
    await asyncio.wait_for(directory.asked(TENANT), timeout=10)
    directory.hang.set()
    for _ in range(60):
        (receipt,) = receipts_of((await requester_.next(reply_to)).body)
        assert receipt.error is None
    assert directory.gets[TENANT] == 1
    assert len(await rows(database_url, "consumer")) == 60


async def test_a_directory_down_for_ten_seconds_delays_provisioning_and_fails_none(
    app: App, requester_: Requester, database_url: str, directory: StandInDirectory
) -> None:
    """The directory answers 503 for 10 s while 200 provisionings wait: none is answered
    with an error, none is dead-lettered, all succeed once it is back."""
    await add_customer(database_url, TENANT)
    assert app.consumer is not None
    directory.down = True
    reply_to = await requester_.reply_queue()
    started = time.monotonic()
    for _ in range(200):
        await requester_.publish(provision(Signer.generate().did), reply_to=reply_to)
    await asyncio.wait_for(directory.asked(TENANT, 3), timeout=20)  # asked, and again
    assert requester_.pending(reply_to) == 0
    await asyncio.sleep(max(0.0, 10 - (time.monotonic() - started)))  # the outage itself
    directory.down = False
    names = []
    for _ in range(200):
        (receipt,) = receipts_of((await requester_.next(reply_to, within=60)).body)
        names.append("ok" if receipt.error is None else receipt.error["name"])
    assert names == ["ok"] * 200
    assert app.consumer.outcomes["dead_lettered"] == 0
    assert len(await rows(database_url, "consumer")) == 200


async def test_a_directory_away_longer_than_the_hold_goes_through_the_retry_tiers(
    app: App, requester_: Requester, database_url: str, directory: StandInDirectory
) -> None:
    await add_customer(database_url, TENANT)
    assert app.consumer is not None
    app.consumer.directory_hold = 0.3
    directory.down = True
    reply_to = await requester_.reply_queue()
    await requester_.publish(provision(Signer.generate().did), reply_to=reply_to)
    await asyncio.wait_for(app.consumer.wait_for("retried"), timeout=20)
    assert requester_.pending(reply_to) == 0  # never an error receipt
    directory.down = False
    (receipt,) = receipts_of((await requester_.next(reply_to, within=30)).body)
    assert receipt.error is None
    assert app.consumer.outcomes["dead_lettered"] == 0


@pytest.mark.parametrize(
    "hostile",
    [
        b"{" * 100_000,  # deeply nested
        b'{"id": "' + b"x" * 200_000 + b'"}',  # huge
        b"not json",
        b'{"id": 1, "verificationMethod": "nope"}',  # wrong types
        document_json(TENANT, {f"k{i}": "zQ3s" for i in range(10_000)}),  # 10k methods
        b'{"@context": ["https://example.com/evil"], "id": "' + TENANT.encode() + b'"}',
        document_json("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", {"hilt": "zQ3s"}),  # another DID
    ],
    ids=["nested", "huge", "not-json", "wrong-types", "10k-methods", "context", "other-did"],
)
async def test_hostile_documents_are_refused_cleanly(
    app: App, requester_: Requester, directory: StandInDirectory, hostile: bytes
) -> None:
    directory.answers[TENANT] = (200, hostile)
    receipt = await answer(requester_, vector("provider_add.plc_tenant.svc_didkey.request.cbor"))
    assert receipt.error is not None and receipt.error["name"] == "UnknownError"
    message = str(receipt.error["message"])
    assert TENANT in message and len(message) < 1000 and "\n" not in message
    assert app.consumer is not None and app.consumer.outcomes["dead_lettered"] == 0
    # and the worker serves the next one
    del directory.answers[TENANT]
    receipt = await answer(requester_, vector("provider_add.plc_tenant.svc_didkey.request.cbor"))
    assert receipt.error is not None and receipt.error["name"] == "AccountPlanMissing"
    assert directory.gets[TENANT] == 2  # the failure was not kept: asked again


async def test_an_invalid_plc_identifier_is_refused_without_a_request(
    app: App, requester_: Requester, directory: StandInDirectory
) -> None:
    bad = _key("secp256k1.tenant-1").with_did("did:plc:UPPERCASE0000000000000000")
    receipt = await answer(requester_, provision(Signer.generate().did, signer=bad))
    assert receipt.error is not None and receipt.error["name"] == "UnknownError"
    assert "identifier must be 24 characters" in str(receipt.error["message"])
    assert sum(directory.gets.values()) == 0


def test_the_vector_keys_are_the_ones_the_index_names() -> None:
    keys = _keys()
    assert SERVICE.did == keys["vector-service"]["did_key"]
    assert SPACE_1.did == keys["vector-space-1"]["did_key"]
    assert Path(GO / "plc.tenant-1.did_document.json").exists()
    assert topology.CONTENT_TYPE == "application/vnd.ipld.dag-cbor"


async def test_a_message_names_at_most_sixteen_did_plc_issuers_for_the_directory(
    app: App, requester_: Requester, directory: StandInDirectory
) -> None:
    """A container of many did:plc invocations must not make the worker send the directory
    a request for each: 16 are resolved, the rest refused by name without a request."""
    key = _key("secp256k1.tenant-1")
    dids = [
        f"did:plc:{'abcdefghijklmnopqrstuvwx'[:22]}{chr(97 + i // 26)}{chr(97 + i % 26)}"
        for i in range(20)
    ]
    invocations = [
        encode_invocation(
            key.with_did(did),
            sub=did,
            aud=SERVICE.did,
            cmd=PROVIDER_ADD,
            args_raw=encode({"consumer": Signer.generate().did, "provider": SERVICE.did}),
            exp=int(time.time()) + 300,
        )
        for did in dids
    ]
    _, receipts = await requester_.call(encode_container(invocations))
    assert len(receipts) == 20
    assert all(r.error is not None and r.error["name"] == "UnknownError" for r in receipts)
    capped = [r for r in receipts if "at most 16 did:plc issuers" in str(r.error["message"])]  # type: ignore[index]
    assert len(capped) == 4
    assert sum(directory.gets.values()) == 16
