"""Queue depths by passive declares: the operators' ``status`` and the service's gauges."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import aiormq
from aio_pika.abc import AbstractConnection

from worker.amqp.connect import BROKER_TIMEOUT


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """A passive declare's answer: ready messages (unacked ones excluded) and consumers."""

    ready: int
    consumers: int


async def queue_depths(
    connection: AbstractConnection, names: Sequence[str]
) -> dict[str, QueueDepth | None]:
    """Depth and consumers of each queue (``None``: it does not exist), by passive declares.

    Each declare runs on a raw channel of this call's own: a missing queue closes its
    channel, and a robust channel would reopen and re-declare behind our back.
    """
    transport = connection.transport
    if transport is None:
        raise aiormq.exceptions.ConnectionClosed(320, "not connected")
    out: dict[str, QueueDepth | None] = {}
    channel: aiormq.abc.AbstractChannel | None = None
    try:
        for name in names:
            if channel is None or channel.is_closed:
                channel = await transport.connection.channel()
            try:
                # asyncio.timeout rather than aiormq's own timeout=, which uses wait_for:
                # on Python 3.11 that can swallow a cancellation landing with the answer
                async with asyncio.timeout(BROKER_TIMEOUT):
                    ok = await channel.queue_declare(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                out[name] = None
                continue
            out[name] = QueueDepth(ready=ok.message_count or 0, consumers=ok.consumer_count or 0)
    finally:
        if channel is not None and not channel.is_closed:
            await channel.close()
    return out
