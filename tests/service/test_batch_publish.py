"""Publishing a batch in one write (worker/service/batch_publish.py) with the real RabbitMQ: every
message confirmed or failed with its own reason, nothing left behind in aiormq's channel
state, and the same outcomes on the fallback path of one ``basic_publish`` a message."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import pytest

from tests.support.proxy import Proxy
from tests.support.worker import QueueCleanup
from worker.config import Settings
from worker.service import batch_publish
from worker.service.broker import Broker, Outgoing

pytestmark = pytest.mark.integration


@pytest.fixture(params=["one-write", "per-message"])
async def broker(
    request: pytest.FixtureRequest,
    worker_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Broker]:
    """A connected broker, publishing through the one-write path or (as with an aiormq
    that lacks what it needs) through one ``basic_publish`` per message."""
    if request.param == "per-message":
        monkeypatch.setattr(batch_publish, "supported", lambda _channel: False)
    b = await Broker.connect(worker_settings)
    await b.declare_topology()
    yield b
    await b.close()


async def _underlay(broker: Broker) -> Any:
    ch = broker._publish_channel
    assert ch is not None
    return await ch.get_underlay_channel()


async def _drain(url: str, queue: str, n: int) -> list[aio_pika.abc.AbstractIncomingMessage]:
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        q = await ch.declare_queue(queue, passive=True)
        got: list[aio_pika.abc.AbstractIncomingMessage] = []
        async with asyncio.timeout(10):
            while len(got) < n:
                msg = await q.get(no_ack=True, fail=False)
                if msg is None:
                    await asyncio.sleep(0.02)
                    continue
                got.append(msg)
        assert await q.get(no_ack=True, fail=False) is None, "more messages than published"
        return got
    finally:
        await conn.close()


async def test_a_batch_is_confirmed_in_order_with_bodies_and_properties_intact(
    broker: Broker, worker_settings: Settings
) -> None:
    q = worker_settings.receipt_queue
    when = datetime(2026, 11, 25, 1, 2, 3, tzinfo=UTC)
    outs = [
        Outgoing(
            routing_key=q,
            body=os.urandom(size),
            headers={"x-n": i, "x-text": f"t{i}"},
            correlation_id=f"c{i}",
            reply_to="somewhere",
            message_id=f"m{i}" if i % 2 else None,
            timestamp=when,
            content_type="application/vnd.ipld.dag-cbor",
            type="receipt",
            app_id="forge-worker",
        )
        # bodies beyond frame_max (128 KiB) go in several body frames
        for i, size in enumerate([0, 1, 900, 300_000, 5])
    ]
    assert await broker.publish_many(outs) == [None] * len(outs)
    got = await _drain(worker_settings.amqp_url, q, len(outs))
    assert [m.body for m in got] == [o.body for o in outs]
    for out, msg in zip(outs, got, strict=True):
        assert msg.correlation_id == out.correlation_id
        headers = dict(msg.headers)
        headers.pop("x-delivery-count", None)  # (the quorum queue's own)
        assert headers == out.headers
        assert msg.reply_to == "somewhere"
        assert msg.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert msg.timestamp == when.replace(tzinfo=None) or msg.timestamp == when
        assert msg.content_type == out.content_type
        assert msg.type == "receipt" and msg.app_id == "forge-worker"
        assert msg.message_id  # given, or a random one (returns are matched by it)
        if out.message_id is not None:
            assert msg.message_id == out.message_id
    underlay = await _underlay(broker)
    assert underlay.message_id_delivery_tag == {}, "message ids of confirmed publishes kept"
    assert not [t for t, f in underlay.confirmations.items() if not f.done()]


async def test_an_unroutable_message_fails_alone_as_returned(
    broker: Broker, worker_settings: Settings
) -> None:
    q = worker_settings.receipt_queue
    outs = [
        Outgoing(routing_key=q, body=b"a"),
        Outgoing(routing_key=f"{worker_settings.queue}.no-such-queue", body=b"b"),
        Outgoing(routing_key=q, body=b"c"),
    ]
    ok1, returned, ok2 = await broker.publish_many(outs)
    assert ok1 is None and ok2 is None
    assert returned is not None and returned.kind == "returned"
    assert "no-such-queue" in str(returned)
    assert [m.body for m in await _drain(worker_settings.amqp_url, q, 2)] == [b"a", b"c"]
    assert (await _underlay(broker)).message_id_delivery_tag == {}


async def test_messages_a_full_queue_refuses_are_nacked(
    broker: Broker, worker_settings: Settings, queue_cleanup: QueueCleanup
) -> None:
    full = f"{worker_settings.queue}.full"
    queue_cleanup.track(dataclasses.replace(worker_settings, queue=full))
    conn = await aio_pika.connect(worker_settings.amqp_url)
    try:
        ch = await conn.channel()
        await ch.declare_queue(
            full,
            durable=True,
            # (a classic queue: a quorum queue applies its limit a little late)
            arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
        )
    finally:
        await conn.close()
    results = await broker.publish_many([Outgoing(routing_key=full, body=b"x")] * 3)
    assert results[0] is None
    assert [r.kind if r else None for r in results[1:]] == ["nacked", "nacked"]


@pytest.fixture
async def proxied(worker_settings: Settings) -> AsyncIterator[tuple[Proxy, Broker]]:
    """A broker connected through the fault proxy."""
    port = urlsplit(worker_settings.amqp_url).port
    assert port is not None
    async with Proxy(port) as proxy:
        url = proxy.url(worker_settings.amqp_url)
        b = await Broker.connect(dataclasses.replace(worker_settings, amqp_url=url))
        try:
            yield proxy, b
        finally:
            proxy.delay(0)
            await b.close()


async def test_no_confirm_in_time_is_a_timeout_for_each(
    proxied: tuple[Proxy, Broker], worker_settings: Settings
) -> None:
    proxy, b = proxied
    proxy.delay(1.0)  # every chunk either way waits a second
    outs = [Outgoing(routing_key=worker_settings.receipt_queue, body=b"x")] * 2
    results = await b.publish_many(outs, confirm_within=0.3)
    assert [r.kind if r else None for r in results] == ["timeout", "timeout"]
    assert (await _underlay(b)).message_id_delivery_tag == {}


async def test_a_connection_lost_before_the_confirms_fails_each_as_lost(
    proxied: tuple[Proxy, Broker], worker_settings: Settings
) -> None:
    proxy, b = proxied
    underlay = await _underlay(b)
    proxy.delay(1.0)  # the confirms are held back...
    outs = [Outgoing(routing_key=worker_settings.receipt_queue, body=b"x")] * 3
    pending = asyncio.ensure_future(b.publish_many(outs, confirm_within=10))
    async with asyncio.timeout(5):
        while len(underlay.confirmations) < 3:  # noqa: ASYNC110 - aiormq has no event for it
            await asyncio.sleep(0.01)
    assert proxy.cut() == 1  # ...and the connection goes while they are awaited
    results = await pending
    assert all(r is not None and r.kind == "lost" for r in results), results


async def test_the_locked_aiormq_takes_the_one_write_path(worker_settings: Settings) -> None:
    # an aiormq upgrade that moves what batch_publish relies on must be noticed here, not
    # only as a slower worker
    b = await Broker.connect(worker_settings)
    try:
        assert batch_publish.supported(await _underlay(b))
    finally:
        await b.close()
