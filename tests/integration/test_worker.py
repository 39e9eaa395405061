"""The worker end to end on the real RabbitMQ and Postgres: requests in, receipts out."""

from __future__ import annotations

import json
import time
import uuid

import asyncpg
import pytest

from tests.integration.conftest import (
    Requester,
    container,
    delegation,
    invocation,
    receipts_of,
    task_of,
)
from worker import topology
from worker.app import App
from worker.ucan import Signer

pytestmark = pytest.mark.integration


async def customer_row(database_url: str, customer: str) -> asyncpg.Record | None:
    conn = await asyncpg.connect(database_url)
    try:
        row: asyncpg.Record | None = await conn.fetchrow(
            "SELECT * FROM public.customer WHERE customer = $1", customer
        )
        return row
    finally:
        await conn.close()


async def count(database_url: str, sql: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def test_delegated_invocation_upserts_and_answers_ok(
    worker: App, requester: Requester, service: Signer, agent: Signer, database_url: str
) -> None:
    dlg = delegation(service, agent)
    customer = "did:plc:delegated0000000000000001"
    inv = invocation(agent, service.did, customer=customer, proofs=[dlg])
    msg, receipts = await requester.call(container(inv, dlg), correlation_id="corr-1")

    assert msg.correlation_id == "corr-1"
    assert msg.content_type == topology.CONTENT_TYPE
    assert len(receipts) == 1
    rcpt = receipts[0]
    assert rcpt.error is None and rcpt.ok == {}
    assert rcpt.ran == task_of(inv)
    assert rcpt.iss == rcpt.sub == service.did and rcpt.aud is None
    row = await customer_row(database_url, customer)
    assert row is not None
    assert row["product"] == "did:web:hilt.fil-forge.com"
    assert json.loads(row["details"]) == {"external_id": "c-1", "region": "eu"}
    assert row["inserted_at"] is not None and row["updated_at"] is not None
    assert await count(database_url, "SELECT count(*) FROM forge_worker.receipts") == 1
    assert worker.metrics.messages.labels("ok")._value.get() == 1


async def test_self_issued_invocation(
    worker: App, requester: Requester, service: Signer, database_url: str
) -> None:
    customer = "did:plc:selfissued000000000000001"
    inv = invocation(service, service.did, customer=customer)
    _, receipts = await requester.call(inv)  # a bare token, not a container
    assert [r.ok for r in receipts] == [{}]
    assert await customer_row(database_url, customer) is not None


async def test_duplicate_delivery_answers_byte_identically_without_a_second_write(
    worker: App, requester: Requester, service: Signer, agent: Signer, database_url: str
) -> None:
    dlg = delegation(service, agent)
    customer = "did:plc:duplicate0000000000000001"
    body = container(invocation(agent, service.did, customer=customer, proofs=[dlg]), dlg)
    first, _ = await requester.call(body)
    before = await customer_row(database_url, customer)
    second, _ = await requester.call(body)
    after = await customer_row(database_url, customer)

    assert second.body == first.body
    assert before is not None and after is not None
    assert after["updated_at"] == before["updated_at"]  # not executed again
    assert await count(database_url, "SELECT count(*) FROM forge_worker.receipts") == 1
    assert worker.metrics.duplicates._value.get() == 1


async def test_default_receipt_queue_and_message_id_as_correlation(
    worker: App, requester: Requester, service: Signer
) -> None:
    await requester.listen(worker.settings.receipt_queue)
    mid = await requester.publish(
        invocation(service, service.did), message_id="mid-" + uuid.uuid4().hex
    )
    msg = await requester.next(worker.settings.receipt_queue)
    assert msg.correlation_id == mid
    assert len(receipts_of(msg.body)) == 1


async def test_undecodable_request_is_dead_lettered_with_its_reason(
    worker: App, requester: Requester, queue_name: str
) -> None:
    dlq = topology.dead_letter_name(queue_name)
    await requester.listen(dlq)
    reply_to = await requester.reply_queue()
    await requester.publish(b"\xa1not cbor at all", reply_to=reply_to, correlation_id="bad-1")
    dead = await requester.next(dlq)
    assert dead.body == b"\xa1not cbor at all"
    headers = dead.headers or {}
    assert headers[topology.H_REASON] == "undecodable"
    assert headers[topology.H_ERROR]
    assert dead.reply_to == reply_to and dead.correlation_id == "bad-1"
    assert requester.pending(reply_to) == 0


async def test_expired_invocation_gets_an_error_receipt_not_stored(
    worker: App, requester: Requester, service: Signer, database_url: str
) -> None:
    inv = invocation(service, service.did, exp=int(time.time()) - 3600)
    _, receipts = await requester.call(inv)
    assert receipts[0].error is not None and receipts[0].error["name"] == "Expired"
    assert await count(database_url, "SELECT count(*) FROM forge_worker.receipts") == 0
    assert await count(database_url, "SELECT count(*) FROM public.customer") == 0
