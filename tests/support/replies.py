"""Producers that use RabbitMQ's own reply patterns (a server-named queue, direct reply-to),
and the worker's live connection objects, to show which of them a publish closed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage
from aiormq import spec

from worker.amqp.topology import DIRECT_REPLY_TO
from worker.service.broker import Broker

#: a direct reply-to name RabbitMQ never issued: base64 of an Erlang pid term cut short
FORGED_DIRECT_REPLY = "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAxMTExMTExMQAAAAAAAAAB.bm90aGluZw=="


class DirectReplyTo:
    """A producer on direct reply-to: one channel consumes ``amq.rabbitmq.reply-to`` (no
    ack, as the broker requires) and publishes the requests, ``reply_to`` naming it."""

    def __init__(self, url: str, queue: str) -> None:
        self.url = url
        self.queue = queue
        self.got: dict[str, AbstractIncomingMessage] = {}
        self._changed = asyncio.Event()
        self.connection: aio_pika.abc.AbstractConnection | None = None
        self.channel: aio_pika.abc.AbstractChannel | None = None

    async def __aenter__(self) -> DirectReplyTo:
        self.connection = await aio_pika.connect(self.url)
        self.channel = await self.connection.channel()
        pseudo = await self.channel.declare_queue(DIRECT_REPLY_TO, passive=True)
        await pseudo.consume(self._on, no_ack=True)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self.connection is not None and not self.connection.is_closed:
            await self.connection.close()

    async def _on(self, msg: AbstractIncomingMessage) -> None:
        self.got[str(msg.correlation_id)] = msg
        self._changed.set()

    async def publish(self, body: bytes, correlation_id: str) -> None:
        assert self.channel is not None
        await self.channel.default_exchange.publish(
            aio_pika.Message(body, reply_to=DIRECT_REPLY_TO, correlation_id=correlation_id),
            self.queue,
        )

    async def until(self, correlation_ids: set[str], within: float) -> None:
        async with asyncio.timeout(within):
            while not correlation_ids <= self.got.keys():
                self._changed.clear()
                await self._changed.wait()


async def issued_direct_name(
    url: str,
    on_reply: Callable[[aiormq.abc.DeliveredMessage], Coroutine[Any, Any, None]] | None = None,
) -> tuple[aiormq.abc.AbstractConnection, str]:
    """A direct reply-to name as the broker issues it, and the connection whose channel
    consumes it with ``on_reply`` (close that connection, and the name is stale)."""
    owner = await aiormq.connect(url)
    channel = await owner.channel()
    await channel.basic_consume(DIRECT_REPLY_TO, on_reply or _ignore, no_ack=True)
    probe = f"fwtest.probe.{uuid.uuid4().hex[:8]}"
    await channel.queue_declare(probe, exclusive=True)
    await channel.basic_publish(
        b"", routing_key=probe, properties=spec.Basic.Properties(reply_to=DIRECT_REPLY_TO)
    )
    async with asyncio.timeout(5):
        while True:
            got = await channel.basic_get(probe, no_ack=True)
            if isinstance(got.delivery, spec.Basic.GetOk):
                break
            await asyncio.sleep(0.02)
    name = got.header.properties.reply_to
    assert name is not None and name.startswith(DIRECT_REPLY_TO + ".")
    return owner, name


async def _ignore(_: Any) -> None:
    return None


async def worker_links(broker: Broker) -> tuple[object, object, object]:
    """The worker's live aiormq connection, consuming channel and publishing channel: new
    objects after any reconnect (the robust wrappers around them stay the same)."""
    transport = broker.connection.transport
    assert transport is not None
    consume, publish = broker._consume_channel, broker._publish_channel
    assert consume is not None and publish is not None
    return (
        transport.connection,
        await consume.get_underlay_channel(),
        await publish.get_underlay_channel(),
    )
