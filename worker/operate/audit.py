"""The operators' audit trail: a row in ``forge_worker.audit`` per message replayed or purged."""

from __future__ import annotations

import contextlib
import getpass
import json
import socket
from collections.abc import AsyncIterator, Mapping
from typing import Final

import asyncpg

from worker.errors import Unreachable
from worker.operate.deadletters import DeadLetter, iso

INSERT_AUDIT: Final = """
INSERT INTO forge_worker.audit (action, message_id, invocation_cids, detail)
VALUES ($1, $2, $3::text[], $4::jsonb)
"""


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
        """Connect; a database that cannot be reached raises :class:`Unreachable`.

        No named prepared statements (``statement_cache_size=0``): the URL may name
        PgBouncer in transaction pooling mode, where the next insert may run on another
        server connection; an operator's command writes a few rows, so the cache buys
        nothing anyway."""
        try:
            conn = await asyncpg.connect(database_url, timeout=10, statement_cache_size=0)
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
            "first_death_at": iso(dl.first_death_at),
        }
        row.update(detail)
        await self._conn.execute(
            INSERT_AUDIT, action, dl.message_id, dl.invocation_cids, json.dumps(row)
        )
