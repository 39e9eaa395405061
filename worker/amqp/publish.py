"""Publishing with confirms, and the one place that names how a publish failed."""

from __future__ import annotations

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel

from worker.amqp import guard
from worker.errors import Transient


class PublishFailed(Transient):
    """The broker did not confirm a publish (nack, return, timeout or lost channel).

    ``kind`` says which: ``returned`` (no queue took it), ``nacked`` (the broker refused
    it, e.g. a full queue with ``reject-publish``), ``timeout`` (no confirm in time),
    ``lost`` (the channel or connection went away) or ``unencodable`` (never sent: a
    property or header that cannot be written; sending it again fails the same way); only
    after ``returned``, ``nacked`` and ``unencodable`` is it certain the broker did not
    keep the message.
    """

    def __init__(self, message: str, *, kind: str = "lost") -> None:
        super().__init__(message)
        self.kind = kind


async def publish_confirmed(
    channel: AbstractChannel,
    message: aio_pika.Message,
    routing_key: str,
    *,
    timeout: float,  # noqa: ASYNC109 - the confirm's own deadline
) -> None:
    """Publish ``message`` through the default exchange, ``mandatory``, and wait for its
    publisher confirm.

    Raises:
        PublishFailed: with ``kind`` returned, nacked, timeout or lost.
    """
    try:
        await channel.default_exchange.publish(
            message, routing_key, mandatory=True, timeout=timeout
        )
    except (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
        raise as_publish_failed(exc, routing_key, timeout) from None


def as_publish_failed(exc: BaseException, routing_key: str, timeout: float) -> PublishFailed:
    """The one place that names how a publish failed (see :class:`PublishFailed`)."""
    where = f"cannot publish to {routing_key!r}"
    if isinstance(exc, PublishFailed):
        return exc
    if isinstance(exc, guard.ENCODE_ERRORS):  # (Unencodable is a ValueError)
        return PublishFailed(f"{where}: {exc}", kind="unencodable")
    if isinstance(exc, aiormq.exceptions.PublishError):
        return PublishFailed(
            f"{where}: returned by the broker ({_reply_text(exc)})", kind="returned"
        )
    if isinstance(exc, aiormq.exceptions.DeliveryError):
        return PublishFailed(f"{where}: nacked", kind="nacked")
    if isinstance(exc, TimeoutError):
        return PublishFailed(f"{where}: no confirm within {timeout:g} s", kind="timeout")
    return PublishFailed(f"{where}: {type(exc).__name__}", kind="lost")


def _reply_text(exc: aiormq.exceptions.PublishError) -> str:
    returned = getattr(exc, "message", None)
    frame = getattr(returned, "delivery", None)
    text = getattr(frame, "reply_text", None)
    return str(text) if text else "unroutable"
