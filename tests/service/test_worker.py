"""The worker end to end on the real RabbitMQ and Postgres: requests in, receipts out."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import asyncpg
import pytest

from tests.support.worker import (
    Requester,
    container,
    delegation,
    invocation,
    receipts_of,
    task_of,
)
from worker.amqp import topology
from worker.service.app import App
from worker.ucan import Signer, build_receipt, encode, encode_container

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


async def test_a_task_another_worker_stores_meanwhile_is_answered_with_its_receipt(
    worker: App, requester: Requester, service: Signer, agent: Signer, database_url: str
) -> None:
    """Two workers got the same task: the one whose ledger insert waited on the other's
    row answers with the other's stored receipt, byte for byte, and applies nothing."""
    dlg = delegation(service, agent)
    customer = "did:plc:racing0000000000000000001"
    inv = invocation(agent, service.did, customer=customer, proofs=[dlg])
    theirs = build_receipt(service, ran=task_of(inv), iat=int(time.time()) - 5)
    other = await asyncpg.connect(database_url)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute(
            "INSERT INTO forge_worker.receipts (task_cid, invocation_cid, receipt)"
            " VALUES ($1, 'stored-by-another-worker', $2)",
            str(task_of(inv)),
            theirs,
        )
        reply_to = await requester.reply_queue()
        await requester.publish(container(inv, dlg), reply_to=reply_to)
        # the worker's insert now waits on that row (Postgres shows it, it has no event)
        while not await count(  # noqa: ASYNC110
            database_url,
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'",
        ):
            await asyncio.sleep(0.01)
        await tx.commit()
    finally:
        await other.close()
    msg = await requester.next(reply_to)

    assert msg.body == container(theirs)
    assert await customer_row(database_url, customer) is None  # the other one's to apply
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


def tampered(token: bytes) -> bytes:
    """``token`` with one bit of its signature flipped (envelope ``82 58 40 <sig>``)."""
    assert token[:3] == b"\x82\x58\x40"
    return token[:3] + bytes([token[3] ^ 1]) + token[4:]


async def error_of(requester: Requester, body: bytes) -> tuple[str, str]:
    _, receipts = await requester.call(body)
    assert len(receipts) == 1
    err = receipts[0].error
    assert err is not None, "expected an error receipt"
    return err["name"], err["message"]


async def test_error_classes_get_signed_error_receipts_and_change_nothing(
    worker: App, requester: Requester, service: Signer, agent: Signer, database_url: str
) -> None:
    dlg = delegation(service, agent)
    other_policy = delegation(service, agent, pol=[["==", ".product", "did:web:other.example"]])
    cases = {
        "InvalidSignature": container(tampered(invocation(agent, service.did, proofs=[dlg])), dlg),
        "UnavailableProof": invocation(agent, service.did, proofs=[dlg]),  # proof not sent
        "MatchError": container(
            invocation(agent, service.did, proofs=[other_policy]), other_policy
        ),
        "HandlerNotFound": invocation(service, service.did, cmd="/customer/remove"),
        "MalformedArguments": invocation(
            service, service.did, args_raw=encode({"customer": 5, "product": "did:web:p"})
        ),
        "InvalidCustomerSubject": invocation(agent, service.did, sub=agent.did),
        "Expired": invocation(service, service.did, exp=int(time.time()) - 600),
    }
    for expected, body in cases.items():
        name, message = await error_of(requester, body)
        assert name == expected, (expected, name, message)
        assert message
    assert await count(database_url, "SELECT count(*) FROM public.customer") == 0
    assert await count(database_url, "SELECT count(*) FROM forge_worker.receipts") == 0


async def test_several_invocations_in_one_container_each_get_a_receipt(
    worker: App, requester: Requester, service: Signer, agent: Signer, database_url: str
) -> None:
    dlg = delegation(service, agent)
    good = [invocation(agent, service.did, proofs=[dlg]) for _ in range(2)]
    expired = invocation(agent, service.did, proofs=[dlg], exp=int(time.time()) - 600)
    _, receipts = await requester.call(container(*good, expired, dlg))
    by_task = {r.ran: r for r in receipts}
    assert set(by_task) == {task_of(t) for t in (*good, expired)}
    assert all(by_task[task_of(t)].ok == {} for t in good)
    err = by_task[task_of(expired)].error
    assert err is not None and err["name"] == "Expired"
    assert await count(database_url, "SELECT count(*) FROM public.customer") == 2


async def test_a_request_with_nothing_for_this_service_gets_an_empty_container_at_once(
    worker: App, requester: Requester, service: Signer, database_url: str
) -> None:
    """As ucantone's server answers: the producer learns at once that nothing will come."""
    assert worker.consumer is not None
    reply_to = await requester.reply_queue()
    elsewhere = invocation(service, service.did, aud="did:web:someone-else.example")
    await requester.publish(elsewhere, reply_to=reply_to, correlation_id="elsewhere")
    response = await requester.next(reply_to, within=1.0)
    assert response.body == encode_container([]) == b"\xa1fctn-v1\x80"
    assert response.correlation_id == "elsewhere"
    assert response.content_type == "application/vnd.ipld.dag-cbor"
    assert worker.consumer.outcomes["skipped"] == 1
    assert await count(database_url, "SELECT count(*) FROM public.customer") == 0
    assert await count(database_url, "SELECT count(*) FROM forge_worker.receipts") == 0
    # in a container with one for this service: only that one is answered
    mine = invocation(service, service.did)
    _, receipts = await requester.call(container(elsewhere, mine))
    assert [r.ran for r in receipts] == [task_of(mine)]


async def test_upsert_replaces_product_and_details_and_keeps_the_rest(
    worker: App, requester: Requester, service: Signer, database_url: str
) -> None:
    customer = "did:plc:upsert00000000000000000001"
    first = invocation(
        service, service.did, customer=customer, product="did:web:p1", external_account="stripe:1"
    )
    await requester.call(first)
    before = await customer_row(database_url, customer)
    second = invocation(service, service.did, customer=customer, product="did:web:p2", details={})
    _, receipts = await requester.call(second)
    assert receipts[0].ok == {}
    after = await customer_row(database_url, customer)
    assert before is not None and after is not None
    assert after["product"] == "did:web:p2"
    assert after["details"] is None  # an empty map is stored as NULL
    assert after["external_account"] == "stripe:1"  # kept when absent
    assert after["inserted_at"] == before["inserted_at"]
    assert after["updated_at"] > before["updated_at"]
    third = invocation(service, service.did, customer=customer, external_account="stripe:2")
    await requester.call(third)
    last = await customer_row(database_url, customer)
    assert last is not None and last["external_account"] == "stripe:2"  # replaced when given


async def test_a_container_whose_tokens_are_all_unreadable_is_dead_lettered(
    worker: App, requester: Requester, queue_name: str
) -> None:
    dlq = topology.dead_letter_name(queue_name)
    await requester.listen(dlq)
    body = container(b"\x82\x00garbage", b"\x01\x02")
    await requester.publish(body)
    dead = await requester.next(dlq)
    assert dead.body == body
    headers = dead.headers or {}
    assert headers[topology.H_REASON] == "undecodable"
    assert "token 0" in str(headers[topology.H_ERROR])


async def test_invalid_invocations_are_answered_while_the_database_is_away(
    worker: App, requester: Requester, service: Signer, agent: Signer, database_url: str
) -> None:
    assert worker.consumer is not None
    conn = await asyncpg.connect(database_url)
    await conn.execute("ALTER SCHEMA forge_worker RENAME TO forge_worker_away")
    try:
        name, _ = await error_of(requester, invocation(service, service.did, cmd="/nope"))
        assert name == "HandlerNotFound"
        name, _ = await error_of(requester, tampered(invocation(service, service.did)))
        assert name == "InvalidSignature"
    finally:
        await conn.execute("ALTER SCHEMA forge_worker_away RENAME TO forge_worker")
        await conn.close()
    assert worker.consumer.outcomes["retried"] == 0


async def test_a_request_over_the_size_limit_is_dead_lettered_undecoded(
    worker: App, requester: Requester, queue_name: str
) -> None:
    dlq = topology.dead_letter_name(queue_name)
    await requester.listen(dlq)
    body = b"\x40" + b"\x00" * worker.settings.max_message_size
    await requester.publish(body)
    dead = await requester.next(dlq)
    assert dead.body == body
    assert (dead.headers or {})[topology.H_REASON] == "undecodable"


async def test_an_invocation_expired_twenty_seconds_ago_is_refused_by_default(
    worker: App, requester: Requester, service: Signer, database_url: str
) -> None:
    """No leeway by default (ucantone's rule): Hilt has stopped waiting 30 s after signing,
    so executing later would write a row nobody asks for any more."""
    assert worker.settings.clock_skew == 0
    late = invocation(service, service.did, exp=int(time.time()) - 20)
    _, receipts = await requester.call(late)
    assert receipts[0].error is not None and receipts[0].error["name"] == "Expired"
    for table in ("public.customer", "forge_worker.receipts", "forge_worker.arrivals"):
        assert await count(database_url, f"SELECT count(*) FROM {table}") == 0
