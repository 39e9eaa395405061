"""Many confirmed publishes in one write: the receipts of a batch, on aiormq's channel.

aiormq's ``basic_publish`` costs about 50 µs of CPU a message here (a lock, a frame buffer
slot, a drain and two futures each); a batch's receipts written as one frame buffer with
one confirmation future each cost about 19 µs (measured with 100 publishes of 800 bytes on
this machine's RabbitMQ; see bench/README.md). That is the largest single saving the
worker's hot path has.

It works on aiormq's channel state the way ``basic_publish`` itself does, under the same
lock: the next delivery tags, a confirmation future per tag in ``confirmations`` (which
the channel resolves on ``basic.ack``/``basic.nack``, fails with ``PublishError`` on
``basic.return`` via ``message_id_delivery_tag``, and rejects when the channel closes),
and the frames on the connection's write queue. :func:`supported` checks that those are
there; the broker falls back to one ``basic_publish`` per message when they are not (a
future aiormq), so nothing depends on them silently.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any, Final

from aiormq import spec
from aiormq.abc import ChannelFrame
from aiormq.exceptions import PublishError

from worker.amqp import guard

#: the aiormq channel attributes the one-write path uses
_NEEDED: Final = (
    "lock",
    "delivery_tag",
    "confirmations",
    "message_id_delivery_tag",
    "write_queue",
    "number",
    "publisher_confirms",
    "create_future",
    "_split_body",
)


def supported(channel: Any) -> bool:
    """Whether ``channel`` (an aiormq channel with publisher confirms) has what
    :func:`publish_batch` needs."""
    return all(hasattr(channel, name) for name in _NEEDED) and bool(channel.publisher_confirms)


async def publish_batch(
    channel: Any,
    messages: Sequence[tuple[str, bytes, spec.Basic.Properties]],
    *,
    timeout: float,  # noqa: ASYNC109 - the confirms' own deadline
    mandatory: bool = True,
) -> list[BaseException | None]:
    """Publish ``(routing_key, body, properties)`` through the default exchange, each
    ``mandatory`` (unless told otherwise), in one write; wait up to ``timeout`` s for every
    confirm.

    Returns, per message in order, None when the broker confirmed it, else the exception:
    aiormq's ``PublishError`` (returned), ``DeliveryError`` (nacked), ``TimeoutError`` (no
    confirm in time), :class:`worker.amqp.guard.Unencodable` (never sent: a property or
    header that cannot be written, checked message by message so that it fails alone) or
    whatever the closing channel failed it with.

    Properties without a ``message_id`` get a random one (aiormq matches a returned
    message to its delivery tag by it).
    """
    if not messages:
        return []
    results: list[BaseException | None] = [None] * len(messages)
    tags: list[tuple[int, str]] = []
    futures: list[asyncio.Future[Any] | None] = [None] * len(messages)
    frame_max = frame_size(channel)
    async with channel.lock:
        first = channel.delivery_tag
        try:
            payloads: list[bytes] = []
            for i, (routing_key, body, properties) in enumerate(messages):
                if not properties.message_id:
                    properties.message_id = os.urandom(16).hex()
                try:
                    # each message on its own: one that cannot be written fails alone
                    payloads.append(
                        guard.encode_publish(
                            channel.number,
                            routing_key,
                            properties,
                            channel._split_body(body),
                            frame_max=frame_max,
                            mandatory=mandatory,
                        )
                    )
                except guard.Unencodable as exc:
                    results[i] = exc
                    continue
                channel.delivery_tag += 1
                tag = channel.delivery_tag
                future = channel.create_future()
                channel.confirmations[tag] = future
                channel.message_id_delivery_tag[properties.message_id] = tag
                tags.append((tag, properties.message_id))
                futures[i] = future
            if payloads:
                await channel.write_queue.put(
                    ChannelFrame(payload=b"".join(payloads), should_close=False)
                )
        except BaseException:
            # nothing reached the broker: give the sequence numbers back, as aiormq does
            _forget(channel, tags)
            for f in futures:
                if f is not None:
                    f.cancel()
            channel.delivery_tag = first
            raise
    waiting = [f for f in futures if f is not None]
    if not waiting:
        return results
    try:
        _, pending = await asyncio.wait(waiting, timeout=timeout)
    finally:
        _forget_message_ids(channel, tags)
    for i, future in enumerate(futures):
        if future is not None:  # (None: unencodable, its result is set)
            results[i] = _outcome(future, pending)
    return results


async def publish_each(
    channel: Any,
    messages: Sequence[tuple[str, bytes, spec.Basic.Properties]],
    *,
    timeout: float,  # noqa: ASYNC109 - the confirms' own deadline
    mandatory: bool = True,
) -> list[BaseException | None]:
    """What :func:`publish_batch` does, with one ``basic_publish`` a message: the fallback
    when the one-write path is not :func:`supported`. A message that cannot be written
    fails alone, before anything is sent."""
    frame_max = frame_size(channel)

    async def one(key: str, body: bytes, props: spec.Basic.Properties) -> None:
        problem = guard.check_properties(props, frame_max=frame_max)
        if problem is not None or not guard.shortstr_ok(key):
            raise guard.Unencodable(problem or "the routing key is over 255 bytes")
        await channel.basic_publish(
            body,
            exchange="",
            routing_key=key,
            properties=props,
            mandatory=mandatory,
            timeout=timeout,
        )

    each = await asyncio.gather(*(one(*m) for m in messages), return_exceptions=True)
    return [r if isinstance(r, BaseException) else None for r in each]


def _outcome(
    future: asyncio.Future[Any], pending: set[asyncio.Future[Any]]
) -> BaseException | None:
    """None for a confirmed publish, else what became of it."""
    if future in pending:
        future.cancel()  # (aiormq ignores a late confirm of a cancelled future)
        return TimeoutError()
    if future.cancelled():
        return asyncio.CancelledError()
    if future.exception() is not None:
        return future.exception()
    if isinstance(future.result(), spec.Basic.Ack):
        return None
    returned = future.result()  # a returned message, on a channel that does not raise
    return PublishError(returned, returned.delivery)


def frame_size(channel: Any) -> int:
    """The frame_max the channel's connection negotiated (RabbitMQ's default if unknown)."""
    tune = getattr(getattr(channel, "connection", None), "connection_tune", None)
    size = getattr(tune, "frame_max", None)
    return size if isinstance(size, int) and size > 0 else guard.DEFAULT_FRAME_MAX


def _forget(channel: Any, tags: list[tuple[int, str]]) -> None:
    for tag, _ in tags:
        channel.confirmations.pop(tag, None)
    _forget_message_ids(channel, tags)


def _forget_message_ids(channel: Any, tags: list[tuple[int, str]]) -> None:
    index = channel.message_id_delivery_tag
    for tag, message_id in tags:
        if index.get(message_id) == tag:
            del index[message_id]
