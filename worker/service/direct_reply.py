"""Responses to RabbitMQ's direct reply-to names, on a connection that holds nothing else.

A direct reply-to name (``amq.rabbitmq.reply-to.<channel>.<key>``) is not a queue: the broker
decodes a channel from it and hands the message to that channel's consumer. What RabbitMQ
3.10.8 does with one, measured with publisher confirms (README, "Direct reply-to"):

- a name whose channel part does not decode (anything after the prefix holding a ``.``
  that is not a channel id the broker issued, including a well-formed one of a node it does
  not know) makes the broker close the publisher's **whole connection**, 541
  INTERNAL_ERROR: every channel on it, consumers included;
- a stale name (its channel closed), a wrong key, a name without a ``.`` after the prefix:
  acked and dropped, or returned 312 NO_ROUTE when ``mandatory``;
- a live name with ``mandatory``: delivered *and* returned NO_ROUTE (the router finds no
  queue). So these responses are published without ``mandatory``, and a confirm means the
  broker took the message, not that anyone got it: at most once, as RabbitMQ documents.

So the worker publishes to these names on a connection of their own (:class:`DirectReplies`),
opened when first needed and opened again for the next publish after it died; the
consumers' connection never sees a direct reply-to name. Its writes are serialized (one
batch's responses in one write, then their confirms), so when the broker closes it, the
name that did it is among that write's unconfirmed responses, and the write is alone on
the connection. Each unconfirmed one is then sent again alone, on a fresh connection: a
name that closes the publisher again, alone, is refused (:class:`PublishFailed` of kind
``refused``: nobody can receive it, at any attempt); the others reach their consumers,
perhaps twice (the broker may have delivered one whose confirm the close cut off; the
producer gets the same bytes with the same correlation id again).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, Final

import aiormq
from aiormq import spec

from worker import log
from worker.amqp.publish import PublishFailed
from worker.service import batch_publish

#: seconds to open the connection and its channel
CONNECT_TIMEOUT: Final = 10.0
#: the :class:`PublishFailed` kind of a name the broker refuses
REFUSED: Final = "refused"

Message = tuple[str, bytes, spec.Basic.Properties]


def closed_by_broker(exc: BaseException | None) -> bool:
    """Whether a publish failed because the broker closed its channel or connection (rather
    than a lost socket, a timeout, a nack or a return)."""
    return isinstance(exc, (aiormq.exceptions.ConnectionClosed, aiormq.exceptions.ChannelClosed))


class DirectReplies:
    """Publishes to direct reply-to names on a connection of its own (module docstring)."""

    def __init__(self, url: str, *, connection_name: str) -> None:
        self.url = url
        self.connection_name = connection_name
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None
        #: one write and its confirms at a time: a close is then pinned on that write
        self._lock = asyncio.Lock()
        self._closed = False
        #: connections opened so far: the first, and one after each that died
        self.opened = 0
        #: names refused so far
        self.refused = 0
        self.log = log.get_logger(component="direct_reply")

    async def publish(
        self,
        messages: Sequence[Message],
        *,
        timeout: float,  # noqa: ASYNC109 - the confirms' own deadline
    ) -> list[BaseException | None]:
        """Publish ``(routing_key, body, properties)`` through the default exchange, not
        ``mandatory``, in one write, and wait up to ``timeout`` s for the confirms.

        Returns:
            Per message, in order: None once the broker confirmed it (which says nothing of
            delivery: a stale name is confirmed and dropped), a :class:`PublishFailed` of
            kind ``refused`` for a name the broker closes the publisher for, else the
            exception it failed with (lost connection, timeout), as
            :func:`worker.service.batch_publish.publish_batch` gives them.
        """
        async with self._lock:
            results = await self._write(messages, timeout)
            for i, result in enumerate(results):
                if not closed_by_broker(result):
                    continue
                # the broker closed the publisher on a name of this write that it had not
                # confirmed: send each of those alone, so only the culprit is refused
                key, _, properties = messages[i]
                (alone,) = await self._write([messages[i]], timeout)
                if closed_by_broker(alone):
                    self.refused += 1
                    why = _describe(alone)
                    # the request is acked all the same (worker/service/consumer.py)
                    self.log.warning(
                        "reply_refused",
                        reply_to=key,
                        correlation_id=properties.correlation_id,
                        error=why,
                    )
                    alone = PublishFailed(
                        f"cannot publish to {key!r}: the broker closed the publisher's "
                        f"connection for it ({why})",
                        kind=REFUSED,
                    )
                results[i] = alone
            return results

    async def _write(self, messages: Sequence[Message], timeout: float) -> list[Any]:  # noqa: ASYNC109
        try:
            channel = await self._open()
            if batch_publish.supported(channel):
                return await batch_publish.publish_batch(
                    channel, messages, timeout=timeout, mandatory=False
                )
            return await batch_publish.publish_each(
                channel, messages, timeout=timeout, mandatory=False
            )
        except (aiormq.exceptions.AMQPError, OSError, RuntimeError) as exc:
            # (OSError: lost, refused or unreachable, and TimeoutError)
            return [exc] * len(messages)

    async def _open(self) -> aiormq.abc.AbstractChannel:
        """The live channel, or a new connection and channel when there is none."""
        channel, connection = self._channel, self._connection
        live = connection is not None and not connection.is_closed
        if channel is not None and live and not channel.is_closed:
            return channel
        if self._closed:
            raise aiormq.exceptions.ChannelInvalidStateError("the direct reply publisher is closed")
        await self._drop()
        async with asyncio.timeout(CONNECT_TIMEOUT):
            connection = await aiormq.connect(
                self.url, client_properties={"connection_name": self.connection_name}
            )
            try:
                channel = await connection.channel(publisher_confirms=True)
            except BaseException:
                with contextlib.suppress(Exception):
                    await connection.close()
                raise
        self._connection, self._channel = connection, channel
        self.opened += 1
        self.log.info("direct_reply_publisher_opened", connections=self.opened)
        return channel

    async def _drop(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                await connection.close()

    @property
    def connection(self) -> aiormq.abc.AbstractConnection | None:
        """The connection in use (None before the first publish or after it died)."""
        return self._connection

    async def close(self) -> None:
        """Close the connection; later publishes fail (as a lost connection)."""
        self._closed = True
        await self._drop()


def _describe(exc: BaseException | None) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__
