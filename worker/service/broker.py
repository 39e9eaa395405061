"""RabbitMQ: the robust connection, the worker's topology, and publishing with confirms."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aiormq import spec

from worker.amqp import guard, topology
from worker.amqp.publish import PublishFailed, as_publish_failed
from worker.config import Settings
from worker.errors import ConfigError, Unreachable
from worker.service import batch_publish
from worker.service.direct_reply import DirectReplies

#: seconds to wait for the broker to confirm one publish before calling it transient
PUBLISH_TIMEOUT: Final = 10.0
CONNECT_TIMEOUT: Final = 10.0


#: seconds between reconnect attempts after the broker connection is lost
RECONNECT_INTERVAL: Final = 1.0


class Delivery:
    """One delivered message, read straight off aiormq's frame: the attributes the worker
    uses, named as on an aio-pika ``IncomingMessage`` (which tests may hand in instead)."""

    __slots__ = ("body", "channel", "delivery_tag", "properties", "redelivered")

    def __init__(self, message: aiormq.abc.DeliveredMessage) -> None:
        self.body: bytes = message.body
        self.channel: Any = message.channel
        delivery = message.delivery
        assert isinstance(delivery, (spec.Basic.Deliver, spec.Basic.GetOk))
        self.delivery_tag: int | None = delivery.delivery_tag
        self.redelivered: bool | None = delivery.redelivered
        self.properties: spec.Basic.Properties = message.header.properties

    @property
    def headers(self) -> dict[str, Any]:
        return self.properties.headers or {}

    @property
    def reply_to(self) -> str | None:
        return self.properties.reply_to

    @property
    def correlation_id(self) -> str | None:
        return self.properties.correlation_id

    @property
    def message_id(self) -> str | None:
        return self.properties.message_id

    @property
    def timestamp(self) -> datetime | None:
        return self.properties.timestamp

    @property
    def content_type(self) -> str | None:
        return self.properties.content_type

    @property
    def content_encoding(self) -> str | None:
        return self.properties.content_encoding

    @property
    def type(self) -> str | None:
        return self.properties.message_type

    @property
    def app_id(self) -> str | None:
        return self.properties.app_id


#: a delivery as the consumer sees it
Incoming = Delivery | AbstractIncomingMessage


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish through the default exchange."""

    routing_key: str
    body: bytes
    headers: Mapping[str, Any] = field(default_factory=dict)
    correlation_id: str | None = None
    reply_to: str | None = None
    message_id: str | None = None
    timestamp: datetime | None = None
    content_type: str | None = None
    content_encoding: str | None = None
    type: str | None = None
    app_id: str | None = None

    def properties(self) -> spec.Basic.Properties:
        """The AMQP properties it is published with (persistent)."""
        return spec.Basic.Properties(
            content_type=self.content_type,
            content_encoding=self.content_encoding,
            headers=dict(self.headers) if self.headers else None,
            delivery_mode=2,  # persistent
            correlation_id=self.correlation_id,
            reply_to=self.reply_to,
            message_id=self.message_id,
            timestamp=self.timestamp,
            message_type=self.type,
            app_id=self.app_id,
        )


def copy_of(msg: Incoming, routing_key: str, headers: Mapping[str, Any]) -> Outgoing:
    """A copy of ``msg`` for ``routing_key`` keeping its properties, with ``headers`` added."""
    merged = dict(msg.headers or {})
    # the worker's own records are written by the worker alone: a publisher's versions of
    # them (a reason, a time, kept properties) are dropped, never carried into a copy
    for name in topology.WORKER_RECORDS:
        merged.pop(name, None)
    merged.update(headers)
    # the broker's own death history is not ours to forward: it would grow with each hop
    merged.pop("x-death", None)
    for name in ("x-first-death-exchange", "x-first-death-queue", "x-first-death-reason"):
        merged.pop(name, None)
    for name in ("x-last-death-exchange", "x-last-death-queue", "x-last-death-reason"):
        merged.pop(name, None)
    merged.pop("x-delivery-count", None)
    return Outgoing(
        routing_key=routing_key,
        body=msg.body,
        headers=merged,
        correlation_id=msg.correlation_id,
        reply_to=msg.reply_to,
        message_id=msg.message_id,
        timestamp=msg.timestamp,
        content_type=msg.content_type,
        content_encoding=msg.content_encoding,
        type=msg.type,
        app_id=msg.app_id,
    )


#: the short-string properties a copy carries over, by their :class:`Outgoing` names
_COPIED_PROPERTIES: Final = (
    "correlation_id",
    "reply_to",
    "message_id",
    "content_type",
    "content_encoding",
    "type",
    "app_id",
)


def safe_copy_of(
    msg: Incoming, routing_key: str, headers: Mapping[str, Any], *, frame_max: int
) -> Outgoing:
    """A copy of ``msg`` that can always be written, for a dead letter whose
    :func:`copy_of` cannot be (see :func:`worker.amqp.guard.encode_publish`).

    A property over 255 bytes in UTF-8 is left out and kept, as a long string, under
    :data:`~worker.amqp.topology.H_ORIGINAL_PROPERTIES`; if the publisher's headers still cannot
    be written (a value pamqp cannot encode, or more than one frame), they are left out and
    :data:`~worker.amqp.topology.H_DROPPED_HEADERS` says why. The body is kept as it is, so the
    dead letter stays inspectable (``dlq show``) and can be replayed.
    """
    kept: dict[str, str] = {}
    originals: dict[str, str] = {}
    for name in _COPIED_PROPERTIES:
        value = getattr(msg, name)
        if value is None:
            continue
        if guard.shortstr_ok(value):
            kept[name] = value
        else:
            originals[name] = value[:1024]
    ours: dict[str, Any] = dict(headers)
    if originals:
        ours[topology.H_ORIGINAL_PROPERTIES] = originals
    theirs = copy_of(msg, routing_key, {}).headers
    out = Outgoing(
        routing_key=routing_key,
        body=msg.body,
        headers={**theirs, **ours},
        timestamp=msg.timestamp,
        **kept,
    )
    problem = guard.check_properties(out.properties(), frame_max=frame_max)
    if problem is not None:
        ours[topology.H_DROPPED_HEADERS] = f"{len(theirs)} publisher headers left out: {problem}"
        out = Outgoing(
            routing_key=routing_key, body=msg.body, headers=ours, timestamp=msg.timestamp, **kept
        )
    return out


def queue_declarations(settings: Settings) -> list[tuple[str, dict[str, object]]]:
    """(name, arguments) of every queue the worker declares, inbox first."""
    q = settings.queue
    decl: list[tuple[str, dict[str, object]]] = [
        (q, topology.inbox_arguments(q, settings.delivery_limit)),
        (topology.dead_letter_name(q), topology.plain_quorum_arguments()),
    ]
    decl += [
        (topology.retry_name(q, d), topology.retry_arguments(q, d)) for d in settings.retry_delays
    ]
    decl.append((settings.receipt_queue, topology.plain_quorum_arguments()))
    return decl


class Broker:
    """The worker's connection: a consuming channel and a confirming publishing channel;
    and, apart from it, the publisher of responses to direct reply-to names."""

    def __init__(self, connection: AbstractRobustConnection, settings: Settings) -> None:
        self.connection = connection
        self.settings = settings
        #: responses to direct reply-to names, on a connection of their own (opened when
        #: first needed): a forged name closes that one, never this one
        self.direct = DirectReplies(
            settings.amqp_url, connection_name=f"forge-worker {settings.queue} direct-reply"
        )
        self._consume_channel: AbstractRobustChannel | None = None
        self._publish_channel: AbstractRobustChannel | None = None
        self.inbox: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._on_delivery: Callable[[Delivery], None] | None = None
        self._resubscribing: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, settings: Settings) -> Broker:
        """Connect (robustly: it reconnects by itself later) and open the channels.

        Raises:
            Unreachable: the broker cannot be reached or refuses the login.
        """
        try:
            conn = await aio_pika.connect_robust(
                settings.amqp_url,
                timeout=CONNECT_TIMEOUT,
                # aio-pika waits 5 s between reconnects by default: an idle worker then
                # stays away for 5 s after every broker cut
                reconnect_interval=RECONNECT_INTERVAL,
                client_properties={"connection_name": f"forge-worker {settings.queue}"},
            )
        except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
            raise Unreachable(f"cannot reach the broker: {type(exc).__name__}: {exc}") from None
        broker = cls(conn, settings)
        try:
            broker._consume_channel = await conn.channel()
            broker._publish_channel = await conn.channel(
                publisher_confirms=True, on_return_raises=True
            )
        except BaseException:
            await conn.close()
            raise
        return broker

    async def declare_topology(self) -> None:
        """Declare every queue (idempotent: an identical declaration is a no-op).

        Raises:
            ConfigError: a queue exists with other arguments (the broker refused it).
        """
        assert self._consume_channel is not None
        for name, arguments in queue_declarations(self.settings):
            # a probe channel per queue: a refused declaration closes the channel it ran on
            ch = await self.connection.channel()
            try:
                await ch.declare_queue(name, durable=True, arguments=arguments)
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise ConfigError(
                    f"cannot declare queue {name!r}: it exists with other arguments ({exc}); "
                    "delete it or use another FORGE_WORKER_QUEUE"
                ) from None
            finally:
                if not ch.is_closed:
                    await ch.close()
        q = self.settings.queue
        self.inbox = await self._consume_channel.declare_queue(
            q, durable=True, arguments=topology.inbox_arguments(q, self.settings.delivery_limit)
        )

    async def start_consuming(self, callback: Callable[[Delivery], None], prefetch: int) -> None:
        """Consume the inbox: ``callback`` gets each delivery, in order, on the event loop.

        The consumer is registered on the live aiormq channel under the robust one, and
        each delivery is handed over as a light :class:`Delivery` instead of an aio-pika
        ``IncomingMessage`` in a task of its own (measured: 38 instead of 56 µs of CPU a
        message). So this broker keeps it subscribed itself: again on the new channel
        after a reconnect, and after a server-side cancel (the inbox deleted, say) once the
        inbox can be declared again, every ``RECONNECT_INTERVAL`` s until then.
        """
        assert self._consume_channel is not None and self.inbox is not None
        self._on_delivery = callback
        await self._consume_channel.set_qos(prefetch_count=prefetch)  # (re-applied on reopen)
        self._consume_channel.reopen_callbacks.add(self._on_reopen)
        await self._subscribe()

    async def _subscribe(self) -> None:
        assert self._consume_channel is not None and self._on_delivery is not None
        underlay = await self._consume_channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(self._on_cancelled)
        ok = await underlay.basic_consume(
            self.settings.queue, self._deliver, no_ack=False, consumer_tag=self._consumer_tag
        )
        self._consumer_tag = ok.consumer_tag

    async def _deliver(self, message: aiormq.abc.DeliveredMessage) -> None:
        if self._on_delivery is not None:
            self._on_delivery(Delivery(message))

    async def _on_reopen(self, *_: object) -> None:
        # the channel was re-opened (after a reconnect): our consumer went with the old one
        if self._on_delivery is not None:
            self._keep_subscribed(after=0.0)

    def _on_cancelled(self, frame: spec.Basic.Cancel) -> None:
        # the broker cancelled us (the inbox deleted, say): not at once, the broker is
        # busy with whatever caused it; meanwhile readiness names the lost consumer
        if self._on_delivery is not None and frame.consumer_tag == self._consumer_tag:
            self._keep_subscribed(after=RECONNECT_INTERVAL)

    def _keep_subscribed(self, *, after: float) -> None:
        """Subscribe again in ``after`` s, retrying until it works or consuming stops (one
        task at most)."""
        if self._resubscribing is None or self._resubscribing.done():
            self._resubscribing = asyncio.create_task(
                self._resubscribe(after), name="forge-worker-resubscribe"
            )

    async def _resubscribe(self, after: float) -> None:
        q = self.settings.queue
        await asyncio.sleep(after)
        while self._on_delivery is not None:
            try:
                # the inbox may be gone (a server-side cancel): declare it as at start-up, on
                # a channel of its own (a refused declaration closes the channel it ran on)
                probe = await self.connection.channel()
                try:
                    await probe.declare_queue(
                        q,
                        durable=True,
                        arguments=topology.inbox_arguments(q, self.settings.delivery_limit),
                    )
                finally:
                    if not probe.is_closed:
                        await probe.close()
                if self._stopped():
                    return
                await self._subscribe()
                return
            except Exception:  # (the broker away, the queue refused): try again
                await asyncio.sleep(RECONNECT_INTERVAL)

    def _stopped(self) -> bool:
        return self._on_delivery is None

    async def stop_consuming(self) -> None:
        """Cancel the consumer: no new deliveries; unacked ones stay ours until settled."""
        self._on_delivery = None
        if self._resubscribing is not None:
            self._resubscribing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._resubscribing
        ch = self._consume_channel
        if ch is not None and self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            ch.reopen_callbacks.discard(self._on_reopen)
            # a dead channel has cancelled it already
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    underlay = await ch.get_underlay_channel()
                    await underlay.basic_cancel(tag)

    @property
    def frame_max(self) -> int:
        """The largest frame the connection may send (negotiated with the broker)."""
        transport = self.connection.transport
        tune = getattr(getattr(transport, "connection", None), "connection_tune", None)
        size = getattr(tune, "frame_max", None)
        return size if isinstance(size, int) and size > 0 else guard.DEFAULT_FRAME_MAX

    def unencodable(self, out: Outgoing) -> str | None:
        """Why ``out`` cannot be written (see :func:`worker.amqp.guard.encode_publish`), or
        None when it can."""
        if not guard.shortstr_ok(out.routing_key):
            return f"the routing key is {len(out.routing_key.encode())} bytes in UTF-8"
        return guard.check_properties(out.properties(), frame_max=self.frame_max)

    @property
    def connected(self) -> bool:
        """The connection and both channels are open."""
        return not self.connection.is_closed and all(
            ch is not None and not ch.is_closed
            for ch in (self._consume_channel, self._publish_channel)
        )

    def consumer_registered(self) -> bool:
        """Our consumer is registered on the live channel (not cancelled, not reconnecting)."""
        ch = self._consume_channel
        if self._consumer_tag is None or ch is None or ch.is_closed or not self.connected:
            return False
        # the live aiormq channel (aio-pika's public ``.channel`` is deprecated and warns);
        # after a server-side cancel or a reconnect our tag is missing from it until
        # _resubscribe has subscribed again
        underlay = getattr(getattr(ch, "_channel", None), "channel", None)
        return self._consumer_tag in getattr(underlay, "consumers", {})

    async def publish_many(
        self, outs: Sequence[Outgoing], *, confirm_within: float = PUBLISH_TIMEOUT
    ) -> list[PublishFailed | None]:
        """Publish each persistent and ``mandatory``, together, and wait for every confirm.

        The worker's hot path (a batch's receipts): the frames go in one write onto the live
        aiormq channel under the robust one (:mod:`worker.service.batch_publish`), with the AMQP
        properties built directly rather than through aio-pika ``Message`` objects. Messages
        for direct reply-to names go through :attr:`direct` instead, not ``mandatory``
        (:mod:`worker.service.direct_reply`), at the same time.

        Returns:
            Per message, in order: None once the broker confirmed it, else how it failed
            (:class:`PublishFailed`; after ``timeout`` or ``lost`` whether the broker kept
            it is unknown; ``refused``: a direct reply-to name the broker refuses).
        """
        direct = [i for i, out in enumerate(outs) if topology.is_direct_reply_to(out.routing_key)]
        if not direct:
            return await self._publish_queues(outs, confirm_within)
        to_direct = set(direct)
        queued = [out for i, out in enumerate(outs) if i not in to_direct]
        answers = await asyncio.gather(
            self._publish_queues(queued, confirm_within),
            self._publish_direct([outs[i] for i in direct], confirm_within),
        )
        of_queues, of_direct = iter(answers[0]), iter(answers[1])
        return [next(of_direct if i in to_direct else of_queues) for i in range(len(outs))]

    async def _publish_queues(
        self, outs: Sequence[Outgoing], confirm_within: float
    ) -> list[PublishFailed | None]:
        if not outs:
            return []
        ch = self._publish_channel
        assert ch is not None
        messages = [(out.routing_key, out.body, out.properties()) for out in outs]
        results: list[BaseException | None]
        try:
            if ch.is_closed:
                raise aiormq.exceptions.ChannelInvalidStateError("publishing channel closed")
            async with asyncio.timeout(confirm_within):
                underlay = await ch.get_underlay_channel()
            if batch_publish.supported(underlay):
                results = await batch_publish.publish_batch(
                    underlay, messages, timeout=confirm_within
                )
            else:
                results = await batch_publish.publish_each(
                    underlay, messages, timeout=confirm_within
                )
        except (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            results = [exc] * len(outs)
        return [
            None if exc is None else as_publish_failed(exc, out.routing_key, confirm_within)
            for out, exc in zip(outs, results, strict=True)
        ]

    async def _publish_direct(
        self, outs: Sequence[Outgoing], confirm_within: float
    ) -> list[PublishFailed | None]:
        messages = [(out.routing_key, out.body, out.properties()) for out in outs]
        results = await self.direct.publish(messages, timeout=confirm_within)
        return [
            None if exc is None else as_publish_failed(exc, out.routing_key, confirm_within)
            for out, exc in zip(outs, results, strict=True)
        ]

    async def close(self) -> None:
        """Close the connections (their channels with them)."""
        await self.direct.close()
        if not self.connection.is_closed:
            await self.connection.close()
