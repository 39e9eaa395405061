"""Operator tools over AMQP only: queue status, dead letters (list, show, replay, purge), and
the depth poller that feeds the queue gauges of ``/metrics``.

The broker has no management plugin, so everything here speaks AMQP 0.9.1:

* **Depth** is a passive ``queue.declare`` (ready messages and consumers). A missing queue
  closes the channel with a 404, so each probe runs on a raw channel of its own that nothing
  else shares.
* **Reading the dead-letter queue** is ``basic.get`` with manual acknowledgement: a scan
  takes at most as many messages as the queue held when it started (so messages that a
  running worker dead-letters again while a replay is going on are not chased forever),
  keeps every message it does not settle unacknowledged, and hands them all back with one
  ``basic.nack(multiple, requeue)`` at the end; a killed scan's messages come back when its
  channel dies. A quorum queue appends returned messages to its tail in their order, so a
  scan of the whole queue leaves the order as it was, and a partial one (``--limit``)
  moves what it read behind the rest. Returns land asynchronously, so a scan waits (a few
  seconds at most) until the queue shows them again before it finishes. Two scans at once
  each see only what the other is not holding: nothing is lost, a listing may just be
  short while a replay runs.
* **Replay** is confirm-then-ack: the copy is published to the inbox (default exchange,
  ``mandatory``, publisher confirms), its audit row is written, and only then is the dead
  letter acked. Killed at any point, a message is in the dead-letter queue, in the inbox,
  or in both (a duplicate the worker's receipt ledger answers); never in neither.

**Dead-letter id**: the message's ``message_id`` when it has one; otherwise ``h:`` and the
first 16 hex digits of SHA-256 over the body, a NUL byte and the first-death time in unix
seconds (empty when unknown). Stable across listings; the same id can name several copies
(the broker's at-least-once dead-lettering may duplicate), and ``--id`` selects them all.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import getpass
import hashlib
import json
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import aio_pika
import aiormq
import asyncpg
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, AbstractMessage

from worker.amqp import topology
from worker.amqp.connect import BROKER_TIMEOUT, connect, redact
from worker.amqp.queues import queue_depths
from worker.config import Settings
from worker.errors import Unreachable

EXIT_OK: Final = 0
EXIT_CHECK_FAILED: Final = 1
EXIT_USAGE: Final = 2

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


INSERT_AUDIT: Final = """
INSERT INTO forge_worker.audit (action, message_id, invocation_cids, detail)
VALUES ($1, $2, $3::text[], $4::jsonb)
"""


# --------------------------------------------------------------------------- describing


@dataclass(frozen=True, slots=True)
class InvocationSummary:
    """What an operator needs to know about one invocation inside a dead letter."""

    cid: str
    iss: str
    cmd: str
    sub: str | None
    customer: str | None
    args: object = None

    def to_json(self, *, args: bool = False) -> dict[str, object]:
        out: dict[str, object] = {
            "cid": self.cid,
            "iss": self.iss,
            "sub": self.sub,
            "cmd": self.cmd,
            "customer": self.customer,
        }
        if args:
            out["args"] = self.args
        return out


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message in the dead-letter queue, decoded for people."""

    id: str
    reason: str
    first_death_at: datetime | None
    attempts: int | None
    origin_queue: str | None
    error: str | None
    message_id: str | None
    correlation_id: str | None
    reply_to: str | None
    timestamp: datetime | None
    replay_count: int
    size: int
    invocations: tuple[InvocationSummary, ...]
    decode_error: str | None
    headers: Mapping[str, Any] = field(repr=False)
    body: bytes = field(repr=False)

    @property
    def invocation_cids(self) -> list[str]:
        return [i.cid for i in self.invocations]

    def to_json(self, *, full: bool = False) -> dict[str, object]:
        """A JSON-ready dict; ``full`` adds headers, arguments and the body (base64)."""
        out: dict[str, object] = {
            "id": self.id,
            "reason": self.reason,
            "first_death_at": _iso(self.first_death_at),
            "attempts": self.attempts,
            "origin_queue": self.origin_queue,
            "error": self.error,
            "message_id": self.message_id,
            "correlation_id": self.correlation_id,
            "reply_to": self.reply_to,
            "timestamp": _iso(self.timestamp),
            "replay_count": self.replay_count,
            "size": self.size,
            "invocation_cids": self.invocation_cids,
            "issuers": _unique(i.iss for i in self.invocations),
            "commands": _unique(i.cmd for i in self.invocations),
            "customers": _unique(i.customer for i in self.invocations if i.customer),
            "invocations": [i.to_json(args=full) for i in self.invocations],
            "decode_error": self.decode_error,
        }
        if full:
            out["headers"] = _json_safe(dict(self.headers))
            out["body_base64"] = base64.b64encode(self.body).decode("ascii")
        return out


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _json_safe(value: object) -> object:
    """Header values as JSON: datetimes as ISO 8601, bytes as base64, the rest as is."""
    if isinstance(value, datetime):
        return _iso(value if value.tzinfo else value.replace(tzinfo=UTC))
    if isinstance(value, bytes | bytearray | memoryview):
        return {"base64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _dag_json(value: object, cid_type: type) -> object:
    """Decoded DAG-CBOR as DAG-JSON: bytes as ``{"/": {"bytes": ...}}``, links as ``{"/": cid}``."""
    if isinstance(value, bytes):
        return {"/": {"bytes": base64.b64encode(value).decode("ascii").rstrip("=")}}
    if isinstance(value, cid_type):
        return {"/": str(value)}
    if isinstance(value, Mapping):
        return {str(k): _dag_json(v, cid_type) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_dag_json(v, cid_type) for v in value]
    return value


def _as_datetime(value: object) -> datetime | None:
    """A header's time: unix seconds (int, float or text) or a timestamp, as aware UTC."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, bool):
        return None
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, bytes | str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _as_text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _x_deaths(headers: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    deaths = headers.get("x-death")
    if not isinstance(deaths, list | tuple):
        return []
    return [d for d in deaths if isinstance(d, Mapping)]


def death_reason(headers: Mapping[str, Any]) -> str:
    """Why a message was dead-lettered: the worker's own header, else the broker's.

    The broker's reasons are ``rejected``, ``expired``, ``maxlen`` and ``delivery_limit``;
    the latest death is the one that put the message in the dead-letter queue.
    """
    for value in (
        headers.get(topology.H_REASON),
        headers.get("x-last-death-reason"),
        next((d.get("reason") for d in _x_deaths(headers)), None),
        headers.get("x-first-death-reason"),
    ):
        text = _as_text(value)
        if text:
            return text
    return "unknown"


def first_death_time(headers: Mapping[str, Any]) -> datetime | None:
    """When the message was first dead-lettered: the worker's header, else the earliest
    ``x-death`` time (each entry's time is the first for its queue and reason)."""
    own = _as_datetime(headers.get(topology.H_DEAD_LETTERED_AT))
    if own is not None:
        return own
    times = [t for t in (_as_datetime(d.get("time")) for d in _x_deaths(headers)) if t]
    return min(times) if times else None


def dead_letter_id(message_id: str | None, body: bytes, first_death: datetime | None) -> str:
    """The stable id of a dead letter (see the module docstring)."""
    if message_id:
        return message_id
    when = b"" if first_death is None else str(int(first_death.timestamp())).encode()
    return "h:" + hashlib.sha256(body + b"\0" + when).hexdigest()[:16]


def summarise_body(
    body: bytes, *, max_size: int = 1 << 20
) -> tuple[list[InvocationSummary], str | None]:
    """The invocations in a request body, or why none could be read."""
    from worker.ucan import CID, DecodeError, decode_request

    try:
        request = decode_request(body, max_size=max_size)
    except DecodeError as exc:
        return [], str(exc) or "cannot decode the body"
    except Exception as exc:  # a dead letter is often one that broke the decoder
        return [], f"cannot decode the body: {type(exc).__name__}: {exc}"
    out: list[InvocationSummary] = []
    for inv in request.invocations:
        args = inv.args
        customer = args.get("customer") if isinstance(args, Mapping) else None
        args_json = _dag_json(args, CID)
        out.append(
            InvocationSummary(
                cid=str(inv.cid),
                iss=inv.iss,
                cmd=inv.cmd,
                sub=inv.sub,
                customer=customer if isinstance(customer, str) else None,
                args=args_json,
            )
        )
    return out, None


def describe(message: AbstractMessage, *, max_size: int = 1 << 20) -> DeadLetter:
    """Decode one dead letter's headers, properties and body."""
    headers: Mapping[str, Any] = message.headers or {}
    first = first_death_time(headers)
    invocations, error = summarise_body(message.body, max_size=max_size)
    timestamp = message.timestamp
    if timestamp is not None and timestamp.tzinfo is None:
        timestamp = timestamp.replace(tzinfo=UTC)
    return DeadLetter(
        id=dead_letter_id(message.message_id, message.body, first),
        reason=death_reason(headers),
        first_death_at=first,
        attempts=_as_int(headers.get(topology.H_ATTEMPT)),
        origin_queue=_as_text(headers.get(topology.H_ORIGIN_QUEUE))
        or _as_text(headers.get("x-first-death-queue")),
        error=_as_text(headers.get(topology.H_ERROR)),
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        timestamp=timestamp,
        replay_count=_as_int(headers.get(topology.H_REPLAY_COUNT)) or 0,
        size=len(message.body),
        invocations=tuple(invocations),
        decode_error=error,
        headers=dict(headers),
        body=message.body,
    )


# --------------------------------------------------------------------------- selecting


def _norm_reason(reason: str) -> str:
    return reason.strip().lower().replace("_", "-")


def parse_since(raw: str) -> datetime:
    """``--since``: unix seconds or ISO 8601 (UTC when no offset is given).

    Raises:
        ValueError: neither.
    """
    text = raw.strip()
    try:
        return datetime.fromtimestamp(float(text), UTC)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"expected unix seconds or ISO 8601, got {raw!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters a command acts on; empty filters select every one.

    ``reason`` matches case-insensitively with ``_`` and ``-`` alike, so ``delivery-limit``
    selects the broker's ``delivery_limit`` too. ``since`` excludes dead letters whose
    first-death time is unknown.
    """

    ids: frozenset[str] = frozenset()
    reason: str | None = None
    since: datetime | None = None
    limit: int | None = None

    @property
    def filtered(self) -> bool:
        return bool(self.ids) or self.reason is not None or self.since is not None

    def matches(self, dl: DeadLetter) -> bool:
        if self.ids and dl.id not in self.ids:
            return False
        if self.reason is not None and _norm_reason(dl.reason) != _norm_reason(self.reason):
            return False
        return self.since is None or (
            dl.first_death_at is not None and dl.first_death_at >= self.since
        )

    def full(self, taken: int) -> bool:
        return self.limit is not None and taken >= self.limit


# --------------------------------------------------------------------------- broker access


async def _get(queue: aio_pika.abc.AbstractQueue) -> AbstractIncomingMessage | None:
    """``basic.get`` with manual ack, bounded by :data:`BROKER_TIMEOUT`.

    The bound is ``asyncio.timeout`` rather than aiormq's own ``timeout=``, which uses
    ``asyncio.wait_for``: on Python 3.11 that can swallow a cancellation (Ctrl-C) that
    lands just as the answer arrives, and the scan would carry on.
    """
    async with asyncio.timeout(BROKER_TIMEOUT):
        return await queue.get(no_ack=False, fail=False, timeout=None)


@dataclass(slots=True)
class _Scan:
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
            msg = await _get(self.queue)
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
async def _scanning(
    connection: AbstractConnection, queue: str, *, confirms: bool = False
) -> AsyncIterator[_Scan]:
    """A scan of ``queue`` on a channel of its own (with publisher confirms if asked).

    On the way out every held message is returned and, unless the connection is gone,
    the scan waits until the queue shows them again.
    """
    depth = (await queue_depths(connection, [queue]))[queue]
    if depth is None:
        raise LookupError(f"cannot read {queue!r}: no such queue")
    channel = await connection.channel(publisher_confirms=confirms, on_return_raises=confirms)
    scan: _Scan | None = None
    try:
        q = await channel.get_queue(queue, ensure=False)
        scan = _Scan(channel=channel, queue=q, snapshot=depth.ready)
        try:
            yield scan
        finally:
            await scan.give_back()
    finally:
        if not channel.is_closed:
            await channel.close()
        if scan is not None and not connection.is_closed:
            await _settled(connection, queue, depth.ready - scan.settled)


# --------------------------------------------------------------------------- status


@dataclass(frozen=True, slots=True)
class QueueStatus:
    """One row of ``forge-worker status``."""

    name: str
    role: str
    exists: bool
    ready: int | None
    consumers: int | None
    #: seconds since the oldest message's first death (dead-letter queue, with a peek)
    oldest_age_seconds: float | None = None
    #: messages in a retry tier are never older than its delay
    max_age_seconds: float | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "role": self.role,
            "exists": self.exists,
            "ready": self.ready,
            "consumers": self.consumers,
            "oldest_age_seconds": self.oldest_age_seconds,
            "max_age_seconds": self.max_age_seconds,
        }


def worker_queues(settings: Settings) -> list[tuple[str, str, float | None]]:
    """(name, role, upper bound of a message's age there) of every queue the worker uses."""
    out: list[tuple[str, str, float | None]] = [(settings.queue, "inbox", None)]
    for delay in settings.retry_delays:
        out.append((topology.retry_name(settings.queue, delay), "retry", float(delay)))
    out.append((topology.dead_letter_name(settings.queue), "dead-letter", None))
    out.append((settings.receipt_queue, "receipts", None))
    return out


#: a dead-letter queue up to this many messages is read whole for its oldest age
OLDEST_SCAN_LIMIT: Final = 1000


async def oldest_dead_letter_age(
    connection: AbstractConnection, queue: str, *, now: datetime, limit: int = OLDEST_SCAN_LIMIT
) -> float | None:
    """Seconds since the earliest first death among the dead letters of ``queue``.

    AMQP 0.9.1 cannot browse a queue, so this reads it like ``dlq list`` does (``basic.get``,
    then everything handed back): each message is marked redelivered and its
    ``x-delivery-count`` grows by one (on RabbitMQ 4.0-4.2 every return counts toward a
    delivery limit, which the dead-letter queue must not have). Up to ``limit`` messages the
    whole queue is read, which keeps its order; a longer queue is judged by its first
    ``limit`` messages only, and those go behind the rest (returns join a quorum queue's
    tail), so the figure is a lower bound there.
    """
    oldest: datetime | None = None
    async with _scanning(connection, queue) as scan:
        for _ in range(min(scan.snapshot, limit)):
            msg = await _get(scan.queue)
            if msg is None:
                break
            scan.held.append(msg)
            first = first_death_time(msg.headers or {})
            if first is None and msg.timestamp is not None:
                ts = msg.timestamp
                first = ts if ts.tzinfo else ts.replace(tzinfo=UTC)
            if first is not None and (oldest is None or first < oldest):
                oldest = first
    return None if oldest is None else max(0.0, (now - oldest).total_seconds())


async def gather_status(
    connection: AbstractConnection, settings: Settings, *, peek: bool = True
) -> list[QueueStatus]:
    """Depth and consumers of every worker queue, plus the dead-letter queue's oldest age."""
    queues = worker_queues(settings)
    depths = await queue_depths(connection, [name for name, _, _ in queues])
    rows: list[QueueStatus] = []
    for name, role, bound in queues:
        depth = depths[name]
        oldest: float | None = None
        if peek and role == "dead-letter" and depth is not None and depth.ready > 0:
            with contextlib.suppress(LookupError):
                oldest = await oldest_dead_letter_age(connection, name, now=datetime.now(UTC))
        rows.append(
            QueueStatus(
                name=name,
                role=role,
                exists=depth is not None,
                ready=None if depth is None else depth.ready,
                consumers=None if depth is None else depth.consumers,
                oldest_age_seconds=oldest,
                max_age_seconds=bound,
            )
        )
    return rows


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def format_status(rows: Sequence[QueueStatus]) -> str:
    """The readable table of ``forge-worker status``."""
    table = [("QUEUE", "ROLE", "READY", "CONSUMERS", "OLDEST")]
    for r in rows:
        if not r.exists:
            table.append((r.name, r.role, "missing", "-", "-"))
            continue
        oldest = _age(r.oldest_age_seconds)
        if r.oldest_age_seconds is None and r.max_age_seconds is not None and r.ready:
            oldest = "<=" + _age(r.max_age_seconds)
        table.append((r.name, r.role, str(r.ready), str(r.consumers), oldest))
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    lines = []
    for row in table:
        cells = [
            row[0].ljust(widths[0]),
            row[1].ljust(widths[1]),
            row[2].rjust(widths[2]),
            row[3].rjust(widths[3]),
            row[4],
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    connection = await connect(settings.amqp_url)
    try:
        rows = await gather_status(connection, settings, peek=not getattr(args, "no_peek", False))
    except (OSError, TimeoutError, aiormq.exceptions.AMQPConnectionError) as exc:
        raise Unreachable(f"lost the broker at {redact(settings.amqp_url)}: {exc}") from None
    finally:
        await connection.close()
    if args.json:
        print(json.dumps({"queues": [r.to_json() for r in rows]}))
    else:
        print(format_status(rows))
    return EXIT_OK


def status_main(args: argparse.Namespace, settings: Settings) -> int:
    """``forge-worker status [--json]``: depth, consumers and age of the worker's queues."""
    return asyncio.run(_status(args, settings))


# --------------------------------------------------------------------------- replay


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
    headers[topology.H_REPLAY_COUNT] = (_as_int(old.get(topology.H_REPLAY_COUNT)) or 0) + 1
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


def operator() -> str:
    """``user@host`` of whoever runs the command (for the audit trail)."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


class AuditLog:
    """Rows in ``forge_worker.audit``, one per message an operator replayed or purged."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, database_url: str) -> AsyncIterator[AuditLog]:
        """Connect; a database that cannot be reached raises :class:`Unreachable`."""
        try:
            conn = await asyncpg.connect(database_url, timeout=10)
        except (OSError, TimeoutError, asyncpg.exceptions.PostgresError) as exc:
            raise Unreachable(f"cannot reach the database: {exc}") from None
        except asyncpg.exceptions.InterfaceError as exc:
            raise Unreachable(f"cannot reach the database: {exc}") from None
        try:
            yield cls(conn)
        finally:
            await conn.close()

    async def record(self, action: str, dl: DeadLetter, detail: Mapping[str, object]) -> None:
        row: dict[str, object] = {
            "id": dl.id,
            "reason": dl.reason,
            "first_death_at": _iso(dl.first_death_at),
        }
        row.update(detail)
        await self._conn.execute(
            INSERT_AUDIT, action, dl.message_id, dl.invocation_cids, json.dumps(row)
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
    async with _scanning(connection, dead_letter_queue, confirms=True) as scan:
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
    scan: _Scan,
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


async def purge(
    connection: AbstractConnection,
    *,
    dead_letter_queue: str,
    selection: Selection,
    audit: AuditLog | None,
    confirm: Callable[[list[DeadLetter]], Any] | None = None,
    by: str | None = None,
    max_size: int = 1 << 20,
) -> MoveResult:
    """Delete selected dead letters: audit row, then ack.

    The selected messages are held (unacknowledged) while ``confirm`` (sync or async) is
    asked, so what is deleted is exactly what was shown; a false answer returns them all.
    """
    who = by or operator()
    result = MoveResult()
    async with _scanning(connection, dead_letter_queue) as scan:
        chosen: list[tuple[AbstractIncomingMessage, DeadLetter]] = []
        async for msg in scan.messages():
            result.scanned += 1
            dl = describe(msg, max_size=max_size)
            if not selection.matches(dl):
                scan.held.append(msg)
                continue
            chosen.append((msg, dl))
            if selection.full(len(chosen)):
                break  # enough: leave the rest of the queue alone
        result.selected = [dl for _, dl in chosen]
        answer = True if confirm is None or not chosen else confirm(result.selected)
        if asyncio.iscoroutine(answer):
            answer = await answer
        if not answer:
            scan.held.extend(m for m, _ in chosen)
            return result
        for i, (msg, dl) in enumerate(chosen):
            try:
                if audit is not None:
                    await audit.record(
                        "purge",
                        dl,
                        {
                            "from": dead_letter_queue,
                            "by": who,
                            "size": dl.size,
                            "body_sha256": hashlib.sha256(dl.body).hexdigest(),
                            "correlation_id": dl.correlation_id,
                            "error": dl.error,
                        },
                    )
            except BaseException:
                scan.held.extend(m for m, _ in chosen[i:])
                raise
            await scan.ack(msg)
            result.done += 1
    return result


async def read_dead_letters(
    connection: AbstractConnection,
    dead_letter_queue: str,
    *,
    selection: Selection | None = None,
    max_size: int = 1 << 20,
) -> list[DeadLetter]:
    """The dead letters (those ``selection`` picks), read and all put back."""
    sel = selection or Selection()
    out: list[DeadLetter] = []
    async with _scanning(connection, dead_letter_queue) as scan:
        async for msg in scan.messages():
            scan.held.append(msg)
            dl = describe(msg, max_size=max_size)
            if sel.matches(dl):
                out.append(dl)
                if sel.full(len(out)):
                    break
    return out


# --------------------------------------------------------------------------- dlq command


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def format_dead_letters(dls: Sequence[DeadLetter]) -> str:
    """The readable listing: one line per dead letter, one indented line per invocation."""
    if not dls:
        return "no dead letters"
    header = ("ID", "REASON", "FIRST DEATH", "ATTEMPTS", "REPLAYS", "ERROR")
    rows = [header]
    for dl in dls:
        error = dl.error or dl.decode_error or ""
        rows.append(
            (
                dl.id,
                dl.reason,
                _when(dl.first_death_at),
                "-" if dl.attempts is None else str(dl.attempts),
                str(dl.replay_count),
                error if len(error) <= 60 else error[:57] + "...",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines: list[str] = []
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            continue
        for inv in dls[n - 1].invocations:
            customer = f" customer={inv.customer}" if inv.customer else ""
            lines.append(f"    {inv.cid} {inv.cmd} iss={inv.iss}{customer}")
    return "\n".join(lines)


def _show_text(dl: DeadLetter, copies: int) -> str:
    doc = dl.to_json(full=True)
    lines = [f"{k}: {json.dumps(v) if not isinstance(v, str) else v}" for k, v in doc.items()]
    if copies > 1:
        lines.append(f"copies: {copies} messages share this id")
    return "\n".join(lines)


def _selection(args: argparse.Namespace) -> Selection | str:
    """The selection the flags ask for, or a usage error."""
    ids = frozenset(getattr(args, "id", None) or [])
    reason = getattr(args, "reason", None)
    since_raw = getattr(args, "since", None)
    limit = getattr(args, "limit", None)
    if limit is not None and limit <= 0:
        return f"--limit must be positive, got {limit}"
    try:
        since = parse_since(since_raw) if since_raw is not None else None
    except ValueError as exc:
        return f"--since: {exc}"
    sel = Selection(ids=ids, reason=reason, since=since, limit=limit)
    if getattr(args, "all", False) and sel.filtered:
        return "--all selects every dead letter: drop --id/--reason/--since, or drop --all"
    if args.dlq_command in ("replay", "purge") and not (
        getattr(args, "all", False) or sel.filtered
    ):
        return f"dlq {args.dlq_command}: say which dead letters: --all, --id, --reason or --since"
    return sel


def _ask(prompt: str) -> bool:
    print(prompt, end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


async def _dlq(args: argparse.Namespace, settings: Settings) -> int:
    sel = _selection(args)
    if isinstance(sel, str):
        print(f"forge-worker: {sel}", file=sys.stderr)
        return EXIT_USAGE
    action: str = args.dlq_command
    interactive = sys.stdin.isatty()
    if action == "purge" and not (args.yes or args.all) and not interactive:
        print(
            "forge-worker: dlq purge: refusing to delete without confirmation on a "
            "non-interactive input; add --yes (or --all)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    dlq = topology.dead_letter_name(settings.queue)
    size = settings.max_message_size
    connection = await connect(settings.amqp_url)
    try:
        async with contextlib.AsyncExitStack() as stack:
            audit: AuditLog | None = None
            if action in ("replay", "purge") and not getattr(args, "dry_run", False):
                # before anything moves: a replay without its audit trail is not allowed
                audit = await stack.enter_async_context(AuditLog.open(settings.database_url))
            try:
                return await _dlq_action(args, settings, connection, sel, audit, dlq, size)
            except LookupError as exc:
                print(f"forge-worker: {exc}", file=sys.stderr)
                return EXIT_CHECK_FAILED
            except ReplayFailed as exc:
                print(f"forge-worker: {exc}", file=sys.stderr)
                return EXIT_CHECK_FAILED
    except (OSError, TimeoutError, aiormq.exceptions.AMQPConnectionError) as exc:
        raise Unreachable(f"lost the broker at {redact(settings.amqp_url)}: {exc}") from None
    except (asyncpg.exceptions.PostgresError, asyncpg.exceptions.InterfaceError) as exc:
        raise Unreachable(f"cannot write the audit trail: {exc}") from None
    finally:
        await connection.close()


async def _dlq_action(
    args: argparse.Namespace,
    settings: Settings,
    connection: AbstractConnection,
    sel: Selection,
    audit: AuditLog | None,
    dlq: str,
    size: int,
) -> int:
    action: str = args.dlq_command
    as_json: bool = args.json
    if action == "list":
        dls = await read_dead_letters(connection, dlq, selection=sel, max_size=size)
        if as_json:
            doc = {"queue": dlq, "count": len(dls), "dead_letters": [d.to_json() for d in dls]}
            print(json.dumps(doc))
        else:
            print(format_dead_letters(dls))
        return EXIT_OK
    if action == "show":
        found = await read_dead_letters(
            connection, dlq, selection=Selection(ids=frozenset([args.id])), max_size=size
        )
        if not found:
            print(f"forge-worker: no dead letter {args.id!r} in {dlq!r}", file=sys.stderr)
            return EXIT_CHECK_FAILED
        if as_json:
            print(json.dumps({**found[0].to_json(full=True), "copies": len(found)}))
        else:
            print(_show_text(found[0], len(found)))
        return EXIT_OK
    if action == "replay":
        dry: bool = args.dry_run
        result = await replay(
            connection,
            dead_letter_queue=dlq,
            inbox=settings.queue,
            selection=sel,
            audit=audit,
            dry_run=dry,
            rate=args.rate,
            max_size=size,
            on_moved=None if as_json else lambda d: print(f"replayed {d.id} ({d.reason})"),
        )
        if as_json:
            print(
                json.dumps(
                    {
                        "action": "replay",
                        "dry_run": dry,
                        "from": dlq,
                        "to": settings.queue,
                        "scanned": result.scanned,
                        "selected": len(result.selected),
                        "replayed": result.done,
                        "dead_letters": [d.to_json() for d in result.selected],
                    }
                )
            )
        elif dry:
            print(format_dead_letters(result.selected))
            print(
                f"dry run: would replay {len(result.selected)} of {result.scanned} into "
                f"{settings.queue}"
            )
        else:
            print(f"replayed {result.done} of {result.scanned} into {settings.queue}")
        return EXIT_OK
    # purge
    ask_first = not (args.yes or args.all)

    async def confirm(dls: list[DeadLetter]) -> bool:
        print(format_dead_letters(dls), file=sys.stderr)
        prompt = f"delete these {len(dls)} dead letters from {dlq}? [y/N] "
        return await asyncio.to_thread(_ask, prompt)

    result = await purge(
        connection,
        dead_letter_queue=dlq,
        selection=sel,
        audit=audit,
        confirm=confirm if ask_first else None,
        max_size=size,
    )
    if as_json:
        print(
            json.dumps(
                {
                    "action": "purge",
                    "from": dlq,
                    "scanned": result.scanned,
                    "selected": len(result.selected),
                    "purged": result.done,
                    "dead_letters": [d.to_json() for d in result.selected],
                }
            )
        )
    else:
        print(f"purged {result.done} of {result.scanned} from {dlq}")
    if result.selected and not result.done:
        return EXIT_CHECK_FAILED  # the operator said no
    return EXIT_OK


def dlq_main(args: argparse.Namespace, settings: Settings) -> int:
    """``forge-worker dlq list|show|replay|purge``."""
    return asyncio.run(_dlq(args, settings))
