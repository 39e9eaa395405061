"""Delivery guarantees: batches, transient failures through the retry tiers, the dead-letter
queue, time bounds as of the first arrival, and recovery after a server-side cancel."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection

from tests.support.worker import (
    QueueCleanup,
    Requester,
    cid_of,
    container,
    delegation,
    invocation,
    receipts_of,
    task_of,
)
from worker.amqp import topology
from worker.config import Settings
from worker.log import get_logger
from worker.service import store
from worker.service.app import App, running
from worker.service.broker import Broker
from worker.service.consumer import Consumer
from worker.service.metrics import Metrics
from worker.ucan import Resolver, Signer, verify_signature

pytestmark = pytest.mark.integration


@asynccontextmanager
async def renamed_customer_table(database_url: str) -> AsyncIterator[None]:
    """The customer table is away (every upsert fails) until the block ends."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("ALTER TABLE public.customer RENAME TO customer_away")
        yield
    finally:
        await conn.execute("ALTER TABLE IF EXISTS public.customer_away RENAME TO customer")
        await conn.close()


async def fetch(database_url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return rows
    finally:
        await conn.close()


@asynccontextmanager
async def manual_consumer(settings: Settings, service: Signer) -> AsyncIterator[Consumer]:
    """A consumer whose batches the test takes and processes itself (deterministic batches)."""
    pool = await store.create_pool(settings.database_url)
    async with pool.acquire() as conn:
        await store.migrate(conn)
    broker = await Broker.connect(settings)
    try:
        await broker.declare_topology()
        yield Consumer(settings, broker, pool, service, Metrics(), get_logger(test="manual"))
    finally:
        await broker.close()
        await pool.close()


async def take(consumer: Consumer, n: int) -> None:
    """Hand ``n`` messages of the inbox to ``consumer`` as deliveries (basic.get, unacked)."""
    assert consumer.broker.inbox is not None
    for _ in range(n):
        msg = await consumer.broker.inbox.get(no_ack=False, fail=True, timeout=5)
        assert msg is not None
        consumer.deliver(msg)


async def test_a_batch_applies_one_customer_in_message_order_and_a_bad_row_fails_alone(
    worker_settings: Settings,
    requester: Requester,
    service: Signer,
    database_url: str,
    amqp: AbstractRobustConnection,
) -> None:
    async with manual_consumer(worker_settings, service) as consumer:
        conn = await asyncpg.connect(database_url)
        await conn.execute(
            "ALTER TABLE public.customer ADD CONSTRAINT test_forbidden "
            "CHECK (product <> 'did:web:forbidden.example')"
        )
        await conn.close()
        x, y, z = (f"did:plc:batch{c}00000000000000000001" for c in "xyz")
        bodies = [
            invocation(
                service, service.did, customer=x, product="did:web:p1", external_account="acct-1"
            ),
            invocation(service, service.did, customer=x, product="did:web:p2"),
            invocation(service, service.did, customer=z, product="did:web:forbidden.example"),
            invocation(service, service.did, customer=y, product="did:web:p3"),
        ]
        reply_to = await requester.reply_queue()
        for body in bodies:
            await requester.publish(body, reply_to=reply_to)
        await take(consumer, len(bodies))
        batch = await consumer.next_batch()
        assert len(batch) == len(bodies)
        await consumer.process(batch)

        answered = [receipts_of((await requester.next(reply_to)).body) for _ in range(3)]
        assert {r[0].ran for r in answered} == {
            task_of(b) for b in (bodies[0], bodies[1], bodies[3])
        }
        assert all(r[0].ok == {} for r in answered)
        rows = {
            r["customer"]: r
            for r in await fetch(database_url, "SELECT * FROM public.customer ORDER BY customer")
        }
        assert rows[x]["product"] == "did:web:p2"  # the later message wins
        assert rows[x]["external_account"] == "acct-1"  # kept: the later one did not give it
        assert rows[y]["product"] == "did:web:p3"
        assert z not in rows
        assert consumer.outcomes["retried"] == 1  # only the bad row, sent to the first tier
        assert consumer.outcomes["ok"] == 3


async def test_one_batch_same_customer_twice_in_one_transaction(
    worker_settings: Settings, requester: Requester, service: Signer, database_url: str
) -> None:
    async with manual_consumer(worker_settings, service) as consumer:
        x = "did:plc:batchsame0000000000000001"
        bodies = [
            invocation(
                service, service.did, customer=x, product="did:web:a", external_account="e1"
            ),
            invocation(service, service.did, customer=x, product="did:web:b", details={"k": "v"}),
        ]
        for body in bodies:
            await requester.publish(body)
        await take(consumer, 2)
        batch = await consumer.next_batch()
        assert len(batch) == 2
        await consumer.process(batch)
        [row] = await fetch(database_url, "SELECT * FROM public.customer")
        assert (row["product"], row["external_account"]) == ("did:web:b", "e1")
        stored = await fetch(database_url, "SELECT task_cid FROM forge_worker.receipts")
        assert {r["task_cid"] for r in stored} == {str(task_of(b)) for b in bodies}


async def test_a_transient_database_failure_is_retried_and_then_succeeds(
    worker: App, requester: Requester, service: Signer, database_url: str, queue_name: str
) -> None:
    assert worker.consumer is not None
    customer = "did:plc:transient00000000000000001"
    reply_to = await requester.reply_queue()
    async with renamed_customer_table(database_url):
        await requester.publish(
            invocation(service, service.did, customer=customer), reply_to=reply_to
        )
        await worker.consumer.wait_for("retried")
        assert requester.pending(reply_to) == 0
    msg = await requester.next(reply_to)
    assert [r.ok for r in receipts_of(msg.body)] == [{}]
    assert len(await fetch(database_url, "SELECT 1 FROM public.customer")) == 1
    assert worker.consumer.outcomes["dead_lettered"] == 0


async def test_retries_exhausted_go_to_the_dead_letter_queue_with_their_history(
    worker: App, requester: Requester, service: Signer, database_url: str, queue_name: str
) -> None:
    assert worker.consumer is not None
    dlq = topology.dead_letter_name(queue_name)
    await requester.listen(dlq)
    async with renamed_customer_table(database_url):
        started = int(time.time())
        mid = await requester.publish(invocation(service, service.did), correlation_id="c-9")
        dead = await requester.next(dlq, within=30)
    headers = dead.headers or {}
    assert headers[topology.H_REASON] == "retries-exhausted"
    assert headers[topology.H_ATTEMPT] == len(worker.settings.retry_delays) + 1
    assert "customer" in str(headers[topology.H_ERROR])
    dead_at = headers[topology.H_DEAD_LETTERED_AT]
    assert isinstance(dead_at, int) and started - 1 <= dead_at <= started + 30
    assert topology.H_FIRST_ARRIVAL not in headers  # the worker's record is in the database
    [arrival] = await fetch(database_url, "SELECT first_seen_at FROM forge_worker.arrivals")
    assert started - 1 <= arrival["first_seen_at"].timestamp() <= started + 5
    assert dead.message_id == mid and dead.correlation_id == "c-9"
    assert worker.consumer.outcomes["retried"] == len(worker.settings.retry_delays)


async def test_a_retried_invocation_is_timed_as_of_its_first_arrival(
    worker_settings: Settings,
    queue_cleanup: QueueCleanup,
    requester: Requester,
    service: Signer,
    database_url: str,
    amqp: AbstractRobustConnection,
) -> None:
    settings = queue_cleanup.track(
        dataclasses.replace(worker_settings, clock_skew=0, retry_delays=(3,))
    )
    exp = int(time.time()) + 2
    body = invocation(service, service.did, exp=exp)
    async with running(settings) as app:
        assert app.consumer is not None
        reply_to = await requester.reply_queue()
        async with renamed_customer_table(database_url):
            await requester.publish(body, reply_to=reply_to)
            await app.consumer.wait_for("retried")
        msg = await requester.next(reply_to)
        # it expired while waiting in the retry tier, but was valid when it first arrived
        assert time.time() > exp
        [receipt] = receipts_of(msg.body)
        assert receipt.ok == {}, receipt.error
        arrivals = await fetch(database_url, "SELECT invocation_cid FROM forge_worker.arrivals")
        assert len(arrivals) == 1


async def test_consumer_comes_back_after_a_server_side_cancel(
    worker: App, requester: Requester, service: Signer, amqp: AbstractRobustConnection
) -> None:
    ch = await amqp.channel()
    await ch.queue_delete(worker.settings.queue, if_unused=False, if_empty=False)
    await ch.close()
    # the broker cancels our consumer; the robust channel re-declares and re-consumes.
    # aio-pika signals neither, so the readiness fact is polled (as /readyz would be)
    async with asyncio.timeout(30):
        while worker.health.consumer_registered():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        while not worker.health.consumer_registered():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    _, receipts = await requester.call(invocation(service, service.did), within=30)
    assert [r.ok for r in receipts] == [{}]


async def test_health_facts(worker: App) -> None:
    assert worker.health.broker_connected()
    assert worker.health.consumer_registered()
    assert worker.health.key_loaded()
    assert await worker.health.database_reachable()
    assert await worker.health.ready()
    worker.request_stop()
    assert not worker.health.consumer_registered()  # a stopping worker is not ready


async def test_a_redelivered_message_records_its_first_arrival(
    worker_settings: Settings, requester: Requester, service: Signer, database_url: str
) -> None:
    async with manual_consumer(worker_settings, service) as consumer:
        assert consumer.broker.inbox is not None
        body = invocation(service, service.did)
        await requester.publish(body)
        first = await consumer.broker.inbox.get(no_ack=False, fail=True, timeout=5)
        assert first is not None and not first.redelivered
        await first.nack(requeue=True)  # as if a worker had died holding it
        await take(consumer, 1)
        batch = await consumer.next_batch()
        assert batch[0].msg.redelivered
        await consumer.process(batch)
        rows = await fetch(database_url, "SELECT invocation_cid FROM forge_worker.arrivals")
        assert [r["invocation_cid"] for r in rows] == [str(cid_of(body))]
        assert consumer.outcomes["ok"] == 1


async def test_a_did_web_service_signs_with_its_key_and_accepts_its_delegations(
    worker_settings: Settings,
    queue_cleanup: QueueCleanup,
    requester: Requester,
    service: Signer,
    agent: Signer,
    amqp: AbstractRobustConnection,
) -> None:
    web = service.with_did("did:web:upload.example")
    settings = dataclasses.replace(worker_settings, service_did=web.did)
    async with running(settings) as app:
        assert app.service_did == "did:web:upload.example"
        dlg = delegation(web, agent)
        _, receipts = await requester.call(container(invocation(agent, web.did, proofs=[dlg]), dlg))
        [receipt] = receipts
        assert receipt.ok == {}, receipt.error
        assert receipt.iss == "did:web:upload.example"
        # the receipt verifies with the service key published for did:web
        verify_signature(receipt, Resolver({web.did: [service.public_key]}))


async def test_a_returned_response_is_retried_and_then_sent_with_the_stored_bytes(
    worker: App,
    requester: Requester,
    service: Signer,
    database_url: str,
    queue_cleanup: QueueCleanup,
) -> None:
    assert worker.consumer is not None
    reply_to = f"{worker.settings.queue}.late-reply"
    queue_cleanup.names.add(reply_to)
    body = invocation(service, service.did)
    await requester.publish(body, reply_to=reply_to)  # no such queue: the broker returns it
    await worker.consumer.wait_for("retried")
    [stored] = await fetch(database_url, "SELECT receipt FROM forge_worker.receipts")

    ch = await requester.conn.channel()
    await ch.declare_queue(reply_to, durable=True, arguments={"x-queue-type": "quorum"})
    await ch.close()
    msg = await requester.next(reply_to)
    [receipt] = receipts_of(msg.body)
    assert receipt.raw == bytes(stored["receipt"])  # executed once, answered from the ledger
    assert receipt.ran == task_of(body)
    # the receipt can reach the queue before the worker settles and counts the message
    await asyncio.wait_for(worker.consumer.wait_for("duplicate"), timeout=10)
    assert worker.consumer.outcomes["duplicate"] == 1


async def test_a_batch_whose_settling_fails_is_given_back_and_answered_again(
    worker: App, requester: Requester, service: Signer
) -> None:
    """Whatever goes wrong while a batch is settled, its deliveries are given back to the
    queue: an unsettled delivery tag would hold back every later ack, fill the prefetch
    window and stop the worker."""
    consumer = worker.consumer
    assert consumer is not None
    real_report = consumer._report
    failed: list[int] = []

    def report_once(item: Any) -> None:
        if not failed:
            failed.append(1)
            raise RuntimeError("a bug while settling")
        real_report(item)

    consumer._report = report_once  # type: ignore[method-assign]
    reply_to = await requester.reply_queue()
    bodies = [invocation(service, service.did) for _ in range(5)]
    for body in bodies:
        await requester.publish(body, reply_to=reply_to)
    wanted, ran = {task_of(b) for b in bodies}, set[Any]()
    while not wanted <= ran:  # (the given-back batch was answered before it failed)
        ran.update(r.ran for r in receipts_of((await requester.next(reply_to)).body))
    # the given-back deliveries came again and were answered from the ledger
    await asyncio.wait_for(consumer.wait_for("duplicate"), timeout=10)
    await asyncio.wait_for(consumer.idle.wait(), timeout=10)
    assert failed == [1]
    assert consumer.stalled_for() == 0.0 and consumer._acks.unsettled() == 0


async def test_readiness_turns_false_while_deliveries_stop_being_settled(
    worker: App, requester: Requester, service: Signer
) -> None:
    from worker.service.http import check_readiness

    consumer = worker.consumer
    assert consumer is not None
    real_settle = consumer._settle
    entered, release = asyncio.Event(), asyncio.Event()

    async def stuck_settle(batch: Any) -> None:
        entered.set()
        await release.wait()
        await real_settle(batch)

    consumer._settle = stuck_settle  # type: ignore[method-assign]
    reply_to = await requester.reply_queue()
    await requester.publish(invocation(service, service.did), reply_to=reply_to)
    await asyncio.wait_for(entered.wait(), timeout=10)
    assert (await check_readiness(worker.health)).ready  # pending, but not for long
    # as if the stall had lasted longer than the readiness bound
    tracker_clock = consumer._acks._clock
    consumer._acks._clock = lambda: tracker_clock() + worker.health.stall_after + 1
    readiness = await check_readiness(worker.health)
    assert readiness.failed == ["progress"]
    release.set()
    await requester.next(reply_to)
    await asyncio.wait_for(consumer.idle.wait(), timeout=10)
    assert (await check_readiness(worker.health)).ready


@pytest.mark.parametrize("how", ["attempt-header", "missing-reply-queue"])
async def test_refused_work_writes_nothing(
    worker: App, requester: Requester, service: Signer, database_url: str, how: str
) -> None:
    """300 expired invocations in one message, with a publisher-set attempt header or a
    reply_to naming a missing queue (a retry): each answered Expired, no row anywhere. Before
    the fix each wrote its own first-arrival row."""
    assert worker.consumer is not None
    past = int(time.time()) - 600
    body = container(*(invocation(service, service.did, exp=past) for _ in range(300)))
    if how == "attempt-header":
        reply_to = await requester.reply_queue()
        await requester.publish(body, reply_to=reply_to, headers={topology.H_ATTEMPT: 1})
        receipts = receipts_of((await requester.next(reply_to)).body)
        assert len(receipts) == 300
        assert {r.error["name"] for r in receipts if r.error} == {"Expired"}
    else:
        await requester.publish(body, reply_to=f"{worker.settings.queue}.nobody-listens")
        await worker.consumer.wait_for("retried")
        await asyncio.wait_for(worker.consumer.idle.wait(), timeout=10)
    for table in ("arrivals", "receipts"):
        assert await fetch(database_url, f"SELECT 1 FROM forge_worker.{table}") == []


async def test_the_proofs_of_a_late_invocation_are_found_without_a_scan(
    worker: App, requester: Requester, service: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-checking time bounds found each invocation's proofs by scanning the batch's jobs
    with dataclass equality: quadratic, 2.5 s for one 1 MiB message inside an open
    transaction. Each job now carries its proofs."""
    from worker.service import jobs

    compared = 0
    real_eq = jobs.Job.__eq__

    def counting_eq(self: Any, other: Any) -> Any:
        nonlocal compared
        compared += 1
        return real_eq(self, other)

    monkeypatch.setattr(jobs.Job, "__eq__", counting_eq)
    past = int(time.time()) - 600
    body = container(*(invocation(service, service.did, exp=past) for _ in range(500)))
    reply_to = await requester.reply_queue()
    # an attempt header makes the worker re-check time bounds as of first arrivals
    await requester.publish(body, reply_to=reply_to, headers={topology.H_ATTEMPT: 1})
    assert len(receipts_of((await requester.next(reply_to)).body)) == 500
    assert compared == 0


async def test_first_arrivals_older_than_thirty_days_are_pruned(database_url: str) -> None:
    pool = await store.create_pool(database_url)
    try:
        async with pool.acquire() as conn:
            await store.migrate(conn)
            await conn.execute(
                "INSERT INTO forge_worker.arrivals VALUES ('old', now() - interval '31 days'),"
                " ('recent', now() - interval '29 days')"
            )
        assert await store.prune_arrivals(pool) == 1
        rows = await pool.fetch("SELECT invocation_cid FROM forge_worker.arrivals")
        assert [r["invocation_cid"] for r in rows] == ["recent"]
    finally:
        await pool.close()


async def test_a_publishers_version_of_the_workers_records_is_never_carried(
    worker: App, requester: Requester, queue_name: str
) -> None:
    """A reason, a time or kept properties in a publisher's headers are dropped from the
    dead letter the worker makes; only the worker's own are there."""
    dlq = topology.dead_letter_name(queue_name)
    await requester.listen(dlq)
    forged = {
        topology.H_REASON: "forged",
        topology.H_DEAD_LETTERED_AT: 1,
        topology.H_FIRST_ARRIVAL: 1,
        topology.H_ORIGINAL_PROPERTIES: {"correlation_id": "forged"},
        topology.H_DROPPED_HEADERS: "forged",
        "x-app": "kept",
    }
    started = int(time.time())
    await requester.publish(b"\xa1junk", headers=forged)
    headers = (await requester.next(dlq)).headers or {}
    assert headers[topology.H_REASON] == "undecodable"
    dead_at = headers[topology.H_DEAD_LETTERED_AT]
    assert isinstance(dead_at, int) and dead_at >= started - 1
    for name in (topology.H_FIRST_ARRIVAL, topology.H_ORIGINAL_PROPERTIES):
        assert name not in headers
    assert topology.H_DROPPED_HEADERS not in headers and headers["x-app"] == "kept"
