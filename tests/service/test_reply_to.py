"""Responses on the reply queues producers actually use (issue 21), on the real RabbitMQ:
a server-named queue (``amq.gen-…``, RabbitMQ's RPC tutorial), direct reply-to
(``amq.rabbitmq.reply-to``), and forged or stale direct reply-to names, which cost the
worker nothing but its separate direct reply-to publisher."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractIncomingMessage
from aiormq import spec

from tests.security.helpers import Collector
from tests.support.replies import (
    FORGED_DIRECT_REPLY,
    DirectReplyTo,
    issued_direct_name,
    worker_links,
)
from tests.support.worker import Requester, container, delegation, invocation
from worker.amqp import topology
from worker.client import SignedRequest, verify_response
from worker.config import Settings
from worker.log import get_logger
from worker.service import store
from worker.service.app import App
from worker.service.broker import Broker, Outgoing
from worker.service.consumer import Consumer
from worker.service.metrics import Metrics
from worker.ucan import Invocation, Signer, decode_token

pytestmark = pytest.mark.integration


def _request(service: Signer, agent: Signer) -> tuple[bytes, SignedRequest]:
    """A delegated ``/customer/add`` as Hilt sends it, and what a producer checks it by."""
    dlg = delegation(service, agent)
    inv = invocation(agent, service.did, proofs=[dlg])
    token = decode_token(inv)
    assert isinstance(token, Invocation)
    body = container(inv, dlg)
    return body, SignedRequest(inv, token.cid, token.task_cid, body, token.exp)


# --- what the broker does (RabbitMQ 3.10.8): the facts the design rests on ----------------


async def test_what_rabbitmq_does_with_direct_reply_to_names(amqp_url: str) -> None:
    """A forged name closes the publisher's whole connection (541 INTERNAL_ERROR); a stale
    one is confirmed and dropped; ``mandatory`` to a live one is delivered *and* returned
    NO_ROUTE, so the worker publishes to these names without ``mandatory``."""
    got: list[bytes] = []
    arrived = asyncio.Event()
    owner, live = await issued_direct_name(amqp_url, _collect(got, arrived))
    stale_owner, stale = await issued_direct_name(amqp_url)
    await stale_owner.close()
    publisher = await aiormq.connect(amqp_url)
    try:
        ch = await publisher.channel(publisher_confirms=True, on_return_raises=False)
        returned: Any = await ch.basic_publish(b"m", routing_key=live, mandatory=True)
        assert isinstance(returned, aiormq.abc.DeliveredMessage)
        assert isinstance(returned.delivery, spec.Basic.Return)
        assert returned.delivery.reply_code == 312  # NO_ROUTE ...
        await asyncio.wait_for(arrived.wait(), 5)  # ... and delivered all the same

        for name in (stale, "amq.rabbitmq.reply-to.x", topology.DIRECT_REPLY_TO):
            assert isinstance(await ch.basic_publish(b"s", routing_key=name), spec.Basic.Ack)

        other = await publisher.channel()
        with pytest.raises(aiormq.exceptions.ConnectionInternalError):
            await ch.basic_publish(b"f", routing_key=FORGED_DIRECT_REPLY)
        assert publisher.is_closed and other.is_closed  # the whole connection
        assert got == [b"m"]
    finally:
        if not publisher.is_closed:
            await publisher.close()
        await owner.close()


def _collect(into: list[bytes], arrived: asyncio.Event) -> Any:
    async def on(message: aiormq.abc.DeliveredMessage) -> None:
        into.append(message.body)
        arrived.set()

    return on


# --- server-named queues: answered there ----------------------------------------------------


async def test_a_server_named_reply_queue_is_answered_there(
    worker: App, amqp_url: str, service: Signer, agent: Signer
) -> None:
    """RabbitMQ's RPC tutorial, as the README's Go snippet does it: an exclusive queue with
    an empty name (the broker names it ``amq.gen-…``), its name in ``reply_to``."""
    body, request = _request(service, agent)
    conn = await aio_pika.connect(amqp_url)
    try:
        ch = await conn.channel()
        replies = await ch.declare_queue("", exclusive=True)
        assert replies.name.startswith("amq.gen-")
        got: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        await replies.consume(got.put, no_ack=True)
        cid = str(request.cid)
        await ch.default_exchange.publish(
            aio_pika.Message(body, reply_to=replies.name, correlation_id=cid), worker.settings.queue
        )
        msg = await asyncio.wait_for(got.get(), 15)
        assert msg.correlation_id == cid
        assert msg.content_type == topology.CONTENT_TYPE
        outcome = verify_response(request, msg.body, service_did=service.did)
        assert outcome.ok == {}
    finally:
        await conn.close()
    assert worker.consumer is not None and worker.consumer.outcomes["retried"] == 0


async def test_a_missing_server_named_queue_is_retried_like_any_missing_queue(
    worker: App, requester: Requester, service: Signer
) -> None:
    """A name in ``amq.gen-…`` that no queue has: the mandatory publish is returned, and
    the request goes to a retry tier, as for any reply queue that is not there."""
    assert worker.consumer is not None
    links = await worker_links(_broker(worker))
    await requester.publish(invocation(service, service.did), reply_to="amq.gen-gone" + "0" * 10)
    await asyncio.wait_for(worker.consumer.wait_for("retried"), 10)
    assert await worker_links(_broker(worker)) == links


# --- direct reply-to: answered through the isolated publisher -------------------------------


async def test_direct_reply_to_is_answered_on_a_connection_of_its_own(
    worker: App, amqp_url: str, service: Signer, agent: Signer
) -> None:
    broker = _broker(worker)
    assert broker.direct.opened == 0  # opened when first needed
    body, request = _request(service, agent)
    async with DirectReplyTo(amqp_url, worker.settings.queue) as producer:
        await producer.publish(body, str(request.cid))
        await producer.until({str(request.cid)}, 15)
        msg = producer.got[str(request.cid)]
        assert verify_response(request, msg.body, service_did=service.did).ok == {}
    assert broker.direct.connection is not None
    (connection, *_) = await worker_links(broker)
    assert broker.direct.connection is not connection
    assert broker.direct.opened == 1 and broker.direct.refused == 0


async def test_a_stale_direct_reply_to_name_is_acked_and_its_response_dropped(
    worker: App, requester: Requester, amqp_url: str, service: Signer
) -> None:
    """Direct reply-to is at most once: the producer's channel is gone, the broker confirms
    the response and drops it. The request is not retried (the effect is stored; a resend
    is answered from the ledger)."""
    assert worker.consumer is not None
    owner, name = await issued_direct_name(amqp_url)
    await owner.close()
    await requester.publish(invocation(service, service.did), reply_to=name)
    await asyncio.wait_for(worker.consumer.wait_for("ok"), 10)
    await _idle(worker)
    assert worker.consumer.outcomes["retried"] == 0
    assert _broker(worker).direct.refused == 0


async def test_after_a_forged_direct_reply_to_name_everyone_else_is_answered_at_once(
    worker: App, amqp_url: str, service: Signer, agent: Signer
) -> None:
    """The forged name closes the direct reply-to publisher's connection, nothing else: the
    requests published after it are all answered within a second, on their queue and by
    direct reply-to, and the worker's consuming and publishing channels and its connection
    are the same objects as before."""
    assert worker.consumer is not None
    broker = _broker(worker)
    before = await worker_links(broker)
    collector = Collector()
    conn = await aio_pika.connect(amqp_url)
    async with DirectReplyTo(amqp_url, worker.settings.queue) as producer:
        ch = await conn.channel()
        replies = await ch.declare_queue("", exclusive=True)
        await collector.consume(ch, replies.name)
        # the direct publisher is open before the forged name arrives
        warm, _ = _request(service, agent)
        await producer.publish(warm, "warm")
        await producer.until({"warm"}, 15)

        forged, _ = _request(service, agent)
        await ch.default_exchange.publish(
            aio_pika.Message(forged, reply_to=FORGED_DIRECT_REPLY, correlation_id="forged"),
            worker.settings.queue,
        )
        start = time.monotonic()
        publishes = []
        for i in range(20):
            body, _ = _request(service, agent)
            msg = aio_pika.Message(body, reply_to=replies.name, correlation_id=f"q{i}")
            publishes.append(ch.default_exchange.publish(msg, worker.settings.queue))
        for i in range(5):
            body, _ = _request(service, agent)
            publishes.append(producer.publish(body, f"d{i}"))
        await asyncio.gather(*publishes)
        await collector.until({replies.name: 20}, 1.0)
        await producer.until({f"d{i}" for i in range(5)}, 1.0)
        elapsed = time.monotonic() - start
    await conn.close()
    await asyncio.wait_for(worker.consumer.wait_for("ok", 27), 10)
    assert elapsed < 1.0
    assert await worker_links(broker) == before
    assert broker.connected
    assert broker.direct.refused == 1 and broker.direct.opened >= 2
    assert worker.consumer.outcomes["retried"] == 0
    assert "forged" not in producer.got


async def test_a_forged_name_fails_alone_among_direct_replies_of_one_batch(
    worker_settings: Settings, service: Signer, agent: Signer, amqp_url: str
) -> None:
    """One batch, one write of responses: [direct, forged, direct, queue, direct]. The
    broker closes the direct publisher at the forged name; every other response arrives,
    the forged one's request is acked (refused: nothing to retry), none is retried."""
    pool = await store.create_pool(worker_settings.database_url)
    async with pool.acquire() as conn:
        await store.migrate(conn)
    broker = await Broker.connect(worker_settings)
    try:
        await broker.declare_topology()
        consumer = Consumer(
            worker_settings, broker, pool, service, Metrics(), get_logger(test="direct")
        )
        async with DirectReplyTo(amqp_url, worker_settings.queue) as producer:
            assert producer.channel is not None
            replies = await producer.channel.declare_queue("", exclusive=True)
            got: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
            await replies.consume(got.put, no_ack=True)
            reply_tos = ["direct", FORGED_DIRECT_REPLY, "direct", replies.name, "direct"]
            for i, reply_to in enumerate(reply_tos):
                body, _ = _request(service, agent)
                if reply_to == "direct":
                    await producer.publish(body, str(i))
                else:
                    await producer.channel.default_exchange.publish(
                        aio_pika.Message(body, reply_to=reply_to, correlation_id=str(i)),
                        worker_settings.queue,
                    )
            assert broker.inbox is not None
            for _ in reply_tos:
                delivery = await broker.inbox.get(no_ack=False, fail=True, timeout=5)
                assert delivery is not None
                consumer.deliver(delivery)
            batch = [consumer._buffer.popleft() for _ in reply_tos]
            await consumer.process(batch)
            await producer.until({"0", "2", "4"}, 5)
            assert (await asyncio.wait_for(got.get(), 5)).correlation_id == "3"
            assert "1" not in producer.got
        assert consumer.outcomes["ok"] == 5 and consumer.outcomes["retried"] == 0
        assert all(item.settled and item.failure is None for item in batch)
        assert broker.direct.refused == 1
    finally:
        await broker.close()
        await pool.close()


async def test_the_direct_publisher_reports_each_outcome(
    worker_settings: Settings, amqp_url: str
) -> None:
    """Confirmed for a live and a stale name (at most once: confirmed is not delivered),
    refused for the forged one, lost once closed."""
    broker = Broker(await aio_pika.connect_robust(amqp_url), worker_settings)
    owner, stale = await issued_direct_name(amqp_url)
    await owner.close()
    try:
        owner2, live = await issued_direct_name(amqp_url)
        try:
            outs = [
                Outgoing(routing_key=key, body=b"x", correlation_id=key[-8:])
                for key in (live, FORGED_DIRECT_REPLY, stale, live)
            ]
            results = await broker._publish_direct(outs, 5.0)
        finally:
            await owner2.close()
        assert [r if r is None else r.kind for r in results] == [None, "refused", None, None]
        assert broker.direct.opened == 3  # the first, one for the forged name alone, one after
        await broker.direct.close()
        (lost,) = await broker._publish_direct(outs[:1], 5.0)
        assert lost is not None and lost.kind == "lost"
    finally:
        await broker.close()


def _broker(worker: App) -> Broker:
    assert worker.broker is not None
    return worker.broker


async def _idle(worker: App) -> None:
    assert worker.consumer is not None
    async with asyncio.timeout(10):
        await worker.consumer.idle.wait()
