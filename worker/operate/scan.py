"""Reading a queue with ``basic.get`` and handing back what is not settled.

The broker has no management plugin, so a queue is read as AMQP 0.9.1 allows: ``basic.get``
with manual acknowledgement. A scan takes at most as many messages as the queue held when it
started (so messages that a running worker dead-letters again while a replay is going on are
not chased forever), keeps every message it does not settle unacknowledged, and hands them
all back with one ``basic.nack(multiple, requeue)`` at the end; a killed scan's messages come
back when its channel dies. A quorum queue appends returned messages to its tail in their
order, so a scan of the whole queue leaves the order as it was, and a partial one
(``--limit``) moves what it read behind the rest. Returns land asynchronously, so a scan
waits (a few seconds at most) until the queue shows them again before it finishes. Two scans
at once each see only what the other is not holding: nothing is lost, a listing may just be
short while a replay runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Final

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from worker.amqp.connect import BROKER_TIMEOUT
from worker.amqp.queues import queue_depths


async def get_message(queue: aio_pika.abc.AbstractQueue) -> AbstractIncomingMessage | None:
    """``basic.get`` with manual ack, bounded by :data:`BROKER_TIMEOUT`.

    The bound is ``asyncio.timeout`` rather than aiormq's own ``timeout=``, which uses
    ``asyncio.wait_for``: on Python 3.11 that can swallow a cancellation (Ctrl-C) that
    lands just as the answer arrives, and the scan would carry on.
    """
    async with asyncio.timeout(BROKER_TIMEOUT):
        return await queue.get(no_ack=False, fail=False, timeout=None)


@dataclass(slots=True)
class Scan:
    """Messages taken from a queue with manual ack; whatever is not settled goes back."""

    channel: aio_pika.abc.AbstractChannel
    queue: aio_pika.abc.AbstractQueue
    snapshot: int
    held: list[AbstractIncomingMessage] = field(default_factory=list)
    #: messages this scan acked (moved or deleted)
    settled: int = 0

    async def messages(self) -> AsyncIterator[AbstractIncomingMessage]:
        """At most ``snapshot`` messages, the queue's head first."""
        for _ in range(self.snapshot):
            msg = await get_message(self.queue)
            if msg is None:
                return
            yield msg

    async def ack(self, msg: AbstractIncomingMessage) -> None:
        """Settle ``msg`` for good."""
        # shielded: a cancellation (Ctrl-C) must not leave the ack half-sent
        await asyncio.shield(msg.ack())
        self.settled += 1

    async def give_back(self) -> None:
        """Return every held message to the queue's head, in order (``nack`` with requeue:
        from RabbitMQ 4.3 it does not count as a failed delivery, unlike ``reject``)."""
        held, self.held = self.held, []
        if not held or self.channel.is_closed:
            return  # a closed channel has returned them already
        last = max(held, key=lambda m: m.delivery_tag or 0)
        await last.nack(multiple=True, requeue=True)


#: how long a scan waits, at the end, for the messages it returned to be ready again
SETTLE_TIMEOUT: Final = 5.0


async def _settled(connection: AbstractConnection, queue: str, expected: int) -> None:
    """Wait (bounded) until ``queue`` shows ``expected`` ready messages again.

    A quorum queue applies returns asynchronously (a Raft command after the nack or the
    channel close), so a command run right after this one could otherwise see a short
    queue. Best effort: another reader holding messages just makes this wait time out.
    """
    with contextlib.suppress(Exception):
        async with asyncio.timeout(SETTLE_TIMEOUT):
            while True:
                depth = (await queue_depths(connection, [queue]))[queue]
                if depth is None or depth.ready >= expected:
                    return
                await asyncio.sleep(0.02)  # no event tells a client that a return landed


@contextlib.asynccontextmanager
async def scanning(
    connection: AbstractConnection, queue: str, *, confirms: bool = False
) -> AsyncIterator[Scan]:
    """A scan of ``queue`` on a channel of its own (with publisher confirms if asked).

    On the way out every held message is returned and, unless the connection is gone,
    the scan waits until the queue shows them again.
    """
    depth = (await queue_depths(connection, [queue]))[queue]
    if depth is None:
        raise LookupError(f"cannot read {queue!r}: no such queue")
    channel = await connection.channel(publisher_confirms=confirms, on_return_raises=confirms)
    scan: Scan | None = None
    try:
        q = await channel.get_queue(queue, ensure=False)
        scan = Scan(channel=channel, queue=q, snapshot=depth.ready)
        try:
            yield scan
        finally:
            await scan.give_back()
    finally:
        if not channel.is_closed:
            await channel.close()
        if scan is not None and not connection.is_closed:
            await _settled(connection, queue, depth.ready - scan.settled)
