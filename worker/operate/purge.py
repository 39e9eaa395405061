"""Purge: delete selected dead letters, each with its audit row, after the operator agreed."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from worker.operate.audit import AuditLog, operator
from worker.operate.deadletters import DeadLetter, Selection, describe
from worker.operate.replay import MoveResult
from worker.operate.scan import scanning


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
    async with scanning(connection, dead_letter_queue) as scan:
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
