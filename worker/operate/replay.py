"""Replay: dead letters back to the inbox, confirm-then-ack, paced.

The copy is published to the inbox (default exchange, ``mandatory``, publisher confirms),
its audit row is written, and only then is the dead letter acked. Killed at any point, a
message is in the dead-letter queue, in the inbox, or in both (a duplicate the worker's
receipt ledger answers); never in neither.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, AbstractMessage

from worker.amqp import topology
from worker.amqp.connect import BROKER_TIMEOUT
from worker.amqp.queues import queue_depths
from worker.operate.audit import AuditLog, operator
from worker.operate.deadletters import DeadLetter, Selection, as_int, describe
from worker.operate.scan import Scan, scanning

#: the broker's dead-lettering history of a replayed message, kept under a non-``x-`` name
H_REPLAY_OF_DEATH: Final = "forge-replay-of-death"
#: who replayed the message (user@host of the operator)
H_REPLAYED_BY: Final = "forge-replayed-by"

#: headers about a message's last death, which a replay moves under H_REPLAY_OF_DEATH
_DEATH_HEADERS: Final = frozenset(
    {
        "x-death",
        topology.H_ATTEMPT,
        topology.H_REASON,
        topology.H_ERROR,
        topology.H_DEAD_LETTERED_AT,
        topology.H_ORIGIN_QUEUE,
    }
)
_BROKER_HEADER_PREFIXES: Final = ("x-first-death-", "x-last-death-")


def replay_copy(message: AbstractMessage, *, now: datetime, by: str) -> aio_pika.Message:
    """The message to publish to the inbox for a dead letter.

    Keeps the body and the properties the worker and the upstream rely on (``message_id``,
    ``correlation_id``, ``reply_to``, ``timestamp``, content type and encoding, ``type``,
    ``app_id``) and every header that is not about the last death, including the worker's
    first arrival (time bounds are checked as of it).

    Moves the headers about the last death under :data:`H_REPLAY_OF_DEATH`, for the
    record: the broker's ``x-death``, ``x-first-death-*`` and ``x-last-death-*`` (RabbitMQ 4
    ignores client-set ones, and stale ones mislead), and the worker's attempt, reason,
    error, origin queue and dead-lettered-at. So the replayed message gets a fresh retry
    budget, and if it dies again its dead letter tells the new reason, not the old one.
    The broker's delivery counts are dropped. Adds :data:`~worker.amqp.topology.H_REPLAY_COUNT`,
    :data:`~worker.amqp.topology.H_REPLAYED_AT` and :data:`H_REPLAYED_BY`.

    ``user_id`` is dropped: the broker rejects a publish whose ``user_id`` is not the
    publishing user's. ``expiration`` is dropped: a replay must not vanish again on a stale
    per-message TTL. A message without ``message_id`` gets a random one from aiormq (it
    tracks returns by it), so its dead-letter id changes on replay.
    """
    old: Mapping[str, Any] = message.headers or {}
    headers: dict[str, Any] = {}
    death: dict[str, Any] = {}
    for key, value in old.items():
        if key in ("x-delivery-count", "x-acquired-count"):
            continue
        if key in _DEATH_HEADERS or key.startswith(_BROKER_HEADER_PREFIXES):
            death[key] = value
        elif key != H_REPLAY_OF_DEATH:
            headers[key] = value
    if death:
        headers[H_REPLAY_OF_DEATH] = death
    headers[topology.H_REPLAY_COUNT] = (as_int(old.get(topology.H_REPLAY_COUNT)) or 0) + 1
    headers[topology.H_REPLAYED_AT] = int(now.timestamp())
    headers[H_REPLAYED_BY] = by
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


class Pacer:
    """At most ``rate`` events a second, spaced evenly (no bursts)."""

    def __init__(
        self,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"expected a positive rate, got {rate!r}")
        self._interval = 1.0 / rate
        self._clock = clock
        self._sleep = sleep
        self._next: float | None = None

    async def wait(self) -> None:
        now = self._clock()
        if self._next is not None and self._next > now:
            await self._sleep(self._next - now)  # the rate limit itself, not a poll
            now = self._next
        self._next = now + self._interval


class ReplayFailed(Exception):
    """The inbox did not take a copy; the dead letter stays where it was."""


@dataclass(slots=True)
class MoveResult:
    """What a replay or purge did (or, with ``dry_run``, would do)."""

    selected: list[DeadLetter] = field(default_factory=list)
    scanned: int = 0
    done: int = 0


async def replay(
    connection: AbstractConnection,
    *,
    dead_letter_queue: str,
    inbox: str,
    selection: Selection,
    audit: AuditLog | None,
    dry_run: bool = False,
    rate: float | None = None,
    by: str | None = None,
    max_size: int = 1 << 20,
    on_moved: Callable[[DeadLetter], None] | None = None,
) -> MoveResult:
    """Move selected dead letters back to ``inbox``: publish, confirm, audit, then ack.

    Raises:
        LookupError: the dead-letter queue or the inbox does not exist.
        ReplayFailed: the broker returned or refused a copy; that message and every one
            not yet moved stay in the dead-letter queue.
    """
    if (await queue_depths(connection, [inbox]))[inbox] is None:
        raise LookupError(f"cannot replay into {inbox!r}: no such queue")
    who = by or operator()
    pacer = Pacer(rate) if rate else None
    result = MoveResult()
    async with scanning(connection, dead_letter_queue, confirms=True) as scan:
        async for msg in scan.messages():
            result.scanned += 1
            dl = describe(msg, max_size=max_size)
            if not selection.matches(dl):
                scan.held.append(msg)
                continue
            result.selected.append(dl)
            if dry_run:
                scan.held.append(msg)
            else:
                if pacer is not None:
                    await pacer.wait()
                await _move(scan, msg, dl, inbox=inbox, by=who, audit=audit)
                result.done += 1
                if on_moved is not None:
                    on_moved(dl)
            if selection.full(len(result.selected)):
                break  # enough: leave the rest of the queue alone
    return result


async def _move(
    scan: Scan,
    msg: AbstractIncomingMessage,
    dl: DeadLetter,
    *,
    inbox: str,
    by: str,
    audit: AuditLog | None,
) -> None:
    """One replay: publish the copy (confirmed, mandatory), write its audit row, ack."""
    copy = replay_copy(msg, now=datetime.now(UTC), by=by)
    try:
        await scan.channel.default_exchange.publish(
            copy, routing_key=inbox, mandatory=True, timeout=BROKER_TIMEOUT
        )
    except aiormq.exceptions.DeliveryError as exc:
        scan.held.append(msg)
        raise ReplayFailed(f"cannot replay {dl.id!r} into {inbox!r}: {exc}") from None
    try:
        if audit is not None:
            await audit.record(
                "replay",
                dl,
                {
                    "from": scan.queue.name,
                    "to": inbox,
                    "by": by,
                    "replay_count": copy.headers.get(topology.H_REPLAY_COUNT),
                    "correlation_id": dl.correlation_id,
                    "error": dl.error,
                },
            )
    except BaseException:
        # the copy is in the inbox already: keep the dead letter too (a duplicate the
        # ledger absorbs) rather than a move with no audit row
        scan.held.append(msg)
        raise
    await scan.ack(msg)
