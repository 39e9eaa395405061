"""``forge-worker status``: depth and consumers of the worker's queues, the oldest dead letter,
and a verdict line (ready / no consumer / dead letters waiting / missing).

Depth is a passive ``queue.declare`` (ready messages and consumers), on a raw channel of its
own: a missing queue closes the channel with a 404.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import aiormq
from aio_pika.abc import AbstractConnection

from worker.amqp import topology
from worker.amqp.connect import connect, redact
from worker.amqp.queues import queue_depths
from worker.config import Settings
from worker.errors import EXIT_OK, Unreachable
from worker.operate.deadletters import first_death_time
from worker.operate.scan import get_message, scanning


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


#: the inbox when FORGE_WORKER_QUEUE is not set (``dlq list`` then needs no --queue)
DEFAULT_QUEUE: Final = "ucan.invocations"

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
    async with scanning(connection, queue) as scan:
        for _ in range(min(scan.snapshot, limit)):
            msg = await get_message(scan.queue)
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


@dataclass(frozen=True, slots=True)
class Verdict:
    """The one line ``status`` ends with, for a person to read at a glance.

    ``state`` is the most urgent that holds, in this order: ``missing`` (the inbox or the
    dead-letter queue does not exist: no worker ever declared them, or the queue name is
    wrong), ``no-consumer`` (nothing is being processed at all; new requests pile up),
    ``dead-letters`` (requests that failed wait for an operator; the rest flows), ``ready``.
    The message names the others that hold too.
    """

    state: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"state": self.state, "message": self.message}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def verdict(rows: Sequence[QueueStatus], queue: str) -> Verdict:
    """The verdict on the worker's queues (see :class:`Verdict`) for inbox ``queue``."""
    by_role = {r.role: r for r in rows if r.role in ("inbox", "dead-letter")}
    inbox, dlq = by_role.get("inbox"), by_role.get("dead-letter")
    if inbox is None or dlq is None or not (inbox.exists and dlq.exists):
        missing = [r.name for r in (inbox, dlq) if r is not None and not r.exists]
        return Verdict(
            "missing",
            f"missing: {' and '.join(missing) or 'the inbox'} not found (a worker declares "
            "its queues when it starts: has one run with this FORGE_WORKER_QUEUE?)",
        )
    dead = dlq.ready or 0
    look = "forge-worker dlq list" + ("" if queue == DEFAULT_QUEUE else f" --queue {queue}")
    dead_part = f"{_plural(dead, 'dead letter')} waiting: {look}"
    if not inbox.consumers:
        waiting = f" ({_plural(inbox.ready or 0, 'request')} waiting)" if inbox.ready else ""
        return Verdict(
            "no-consumer",
            f"no consumer on the inbox{waiting}: start forge-worker run"
            + (f"; {dead_part}" if dead else ""),
        )
    if dead:
        return Verdict("dead-letters", dead_part)
    return Verdict(
        "ready", f"ready: {_plural(inbox.consumers, 'consumer')} on the inbox, no dead letters"
    )


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
    found = verdict(rows, settings.queue)
    if args.json:
        print(json.dumps({"queues": [r.to_json() for r in rows], "verdict": found.to_json()}))
    else:
        print(format_status(rows))
        print()
        print(found.message)
    return EXIT_OK


def status_main(args: argparse.Namespace, settings: Settings) -> int:
    """``forge-worker status [--json]``: depth, consumers and age of the worker's queues."""
    return asyncio.run(_status(args, settings))
