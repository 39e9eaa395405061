"""Postgres: the asyncpg pool, forward-only migrations, the receipt ledger and first arrivals."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

import asyncpg
from structlog.typing import FilteringBoundLogger

from worker.config import Settings
from worker.errors import Unreachable

SCHEMA: Final = "forge_worker"
#: taken by each migration's transaction, so concurrent workers apply each migration once
MIGRATION_LOCK: Final = 0x466F726765  # "Forge"
_MIGRATION_FILE: Final = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

#: errors that mean "the database is not there right now" rather than "this row is wrong"
CONNECTION_ERRORS: Final[tuple[type[BaseException], ...]] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.InterfaceError,
)

_CREATE_RECORD: Final = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
"""
_APPLIED: Final = f"SELECT version FROM {SCHEMA}.schema_migrations"
_IS_APPLIED: Final = f"SELECT true FROM {SCHEMA}.schema_migrations WHERE version = $1"
_RECORD: Final = f"INSERT INTO {SCHEMA}.schema_migrations (version, name) VALUES ($1, $2)"

SELECT_RECEIPTS: Final = f"""
SELECT task_cid, receipt, created_at FROM {SCHEMA}.receipts WHERE task_cid = ANY($1::text[])
"""
#: a batch's write, one statement: insert the receipts of tasks not in the ledger, apply
#: the commands' effects to the tasks that insert took (CTEs that read ``claimed``, see
#: ``worker.commands``), and return the receipts the ledger held before. The query reads
#: the snapshot the statement started from, so it never sees the rows its own CTE inserts
#: (a task is one or the other). One statement is one transaction: no BEGIN or COMMIT.
#: ``arrived(task_cid, first_seen_at)`` gives effects the recorded first arrival of a task
#: (only retried, redelivered and replayed ones have one; Postgres evaluates it only for an
#: effect that reads it).
_CLAIM_HEAD: Final = f"""
WITH claimed AS (
    INSERT INTO {SCHEMA}.receipts (task_cid, invocation_cid, receipt)
    SELECT t, i, r FROM unnest($1::text[], $2::text[], $3::bytea[]) AS u(t, i, r) ORDER BY t
    ON CONFLICT (task_cid) DO NOTHING
    RETURNING task_cid
),
arrived AS (
    SELECT u.t AS task_cid, a.first_seen_at
    FROM unnest($1::text[], $2::text[]) AS u(t, i)
    JOIN {SCHEMA}.arrivals AS a ON a.invocation_cid = u.i
)"""
_CLAIM_TAIL: Final = f"""
SELECT task_cid, NULL::bytea AS receipt, NULL::timestamptz AS created_at FROM claimed
UNION ALL
SELECT task_cid, receipt, created_at FROM {SCHEMA}.receipts WHERE task_cid = ANY($1::text[])
"""
INSERT_ARRIVALS: Final = f"""
INSERT INTO {SCHEMA}.arrivals (invocation_cid, first_seen_at)
SELECT c, a FROM unnest($1::text[], $2::timestamptz[]) AS u(c, a) ORDER BY c
ON CONFLICT (invocation_cid) DO NOTHING
"""
#: how long a first arrival is kept: the time bounds of a retried or replayed invocation are
#: checked as of it, so it must outlive the retry tiers (13 minutes by default) and the time
#: an operator may take to replay a dead letter; 30 days, after which a replay is timed as of
#: the replay (and an expired invocation is refused ``Expired``)
ARRIVALS_KEPT: Final = timedelta(days=30)
PRUNE_ARRIVALS: Final = f"""
DELETE FROM {SCHEMA}.arrivals WHERE first_seen_at < now() - $1::interval
"""
SELECT_ARRIVALS: Final = f"""
SELECT invocation_cid, first_seen_at FROM {SCHEMA}.arrivals WHERE invocation_cid = ANY($1::text[])
"""


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered SQL file."""

    version: int
    name: str
    path: Path


def migrations_dir() -> Path:
    """``schemas/migrations`` of the checkout, or the copy packed into the wheel."""
    here = Path(__file__).resolve().parents[1]  # the worker package
    for candidate in (here.parent / "schemas" / "migrations", here / "_schemas" / "migrations"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("cannot find schemas/migrations beside the worker package")


def discover(directory: Path | None = None) -> list[Migration]:
    """Every ``NNNN_name.sql`` in ``directory``, in order.

    Raises:
        ValueError: two files share a number.
    """
    found: dict[int, Migration] = {}
    for path in sorted((directory or migrations_dir()).iterdir()):
        m = _MIGRATION_FILE.match(path.name)
        if not m:
            continue
        version = int(m.group(1))
        if version in found:
            raise ValueError(f"cannot order migrations: {path.name!r} reuses number {version}")
        found[version] = Migration(version, m.group(2), path)
    return [found[v] for v in sorted(found)]


async def migrate(conn: asyncpg.Connection, directory: Path | None = None) -> list[Migration]:
    """Apply pending migrations, each in its own transaction, under an advisory lock.

    Returns the migrations applied by this call (empty when the database was current).

    The lock is a transaction-level one (``pg_advisory_xact_lock``) taken at the start of
    each transaction, and every statement runs inside one of those transactions: behind
    PgBouncer in transaction pooling mode a session-level lock would be taken on one server
    connection and released (or not) on another, and a statement outside a transaction may
    run on any of them. A second worker starting at the same moment waits on the lock, then
    finds the migration recorded and skips it.
    """
    pending = discover(directory)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(_CREATE_RECORD)
        applied = {r["version"] for r in await conn.fetch(_APPLIED)}
    done: list[Migration] = []
    for mig in pending:
        if mig.version in applied:
            continue
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            if await conn.fetchval(_IS_APPLIED, mig.version):
                continue  # another worker applied it while this one waited for the lock
            await conn.execute(mig.path.read_text(encoding="utf-8"))
            await conn.execute(_RECORD, mig.version, mig.name)
        done.append(mig)
    return done


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset: nothing beyond what asyncpg always does on release (roll back an
    open transaction). Its default also sends ``RESET ALL``, ``UNLISTEN *``, ``CLOSE ALL``
    and unlocks advisory locks: one more round trip for every batch, to undo session state
    the worker never sets (its only locks are transaction-level ones, released at commit).
    Behind PgBouncer in transaction pooling mode there is no session to reset at all: the
    next transaction may run on another server connection."""


#: asyncpg's cache of named prepared statements per connection (its default); 0 behind a
#: transaction pooler, see :func:`statement_cache_size`
STATEMENT_CACHE: Final = 100


def statement_cache_size(pooler: str) -> int:
    """asyncpg's ``statement_cache_size`` for ``FORGE_WORKER_DATABASE_POOLER``.

    Behind PgBouncer in transaction pooling mode (before 1.21 it knows nothing of prepared
    statements; Debian 12 ships 1.18) a named statement prepared in one transaction is
    looked for on whichever server connection runs the next one: "prepared statement
    __asyncpg_stmt_1__ does not exist". With 0, asyncpg (0.32 here) prepares every
    statement unnamed and parses it again with its Bind (Parse, Describe, Flush; then
    Parse, Bind, Execute, Sync), so nothing relies on a statement outliving PgBouncer's
    transaction. The price: a second round trip, and a parse and plan, a statement.
    """
    return 0 if pooler == "pgbouncer" else STATEMENT_CACHE


async def connect(database_url: str, *, pooler: str = "none") -> asyncpg.Connection:
    """One connection (migrations, the operators' tools); :class:`Unreachable` when the
    database cannot be reached."""
    try:
        conn: asyncpg.Connection = await asyncpg.connect(
            database_url, timeout=10, statement_cache_size=statement_cache_size(pooler)
        )
    except (*CONNECTION_ERRORS, asyncpg.exceptions.PostgresError) as exc:
        raise Unreachable(f"cannot reach the database: {_describe(exc)}") from None
    return conn


async def create_pool(
    database_url: str, *, pooler: str = "none", min_size: int = 1, max_size: int = 8
) -> asyncpg.Pool:
    """An asyncpg pool; a database that cannot be reached raises :class:`Unreachable`.

    ``pooler`` is ``FORGE_WORKER_DATABASE_POOLER``: ``pgbouncer`` turns asyncpg's cache of
    named prepared statements off (:func:`statement_cache_size`).
    """
    try:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            database_url,
            min_size=min_size,
            max_size=max_size,
            timeout=10,
            command_timeout=30,
            reset=_keep_session,
            statement_cache_size=statement_cache_size(pooler),
        )
    except (*CONNECTION_ERRORS, asyncpg.exceptions.InvalidCatalogNameError) as exc:
        raise Unreachable(f"cannot reach the database: {_describe(exc)}") from None
    except asyncpg.exceptions.InvalidAuthorizationSpecificationError as exc:
        raise Unreachable(f"cannot log in to the database: {_describe(exc)}") from None
    return pool


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def stored_receipts(
    conn: asyncpg.Connection, task_cids: Iterable[str]
) -> dict[str, tuple[bytes, datetime]]:
    """Task CID -> (stored receipt bytes, when stored) for those already in the ledger."""
    rows = await conn.fetch(SELECT_RECEIPTS, list(task_cids))
    return {r["task_cid"]: (bytes(r["receipt"]), r["created_at"]) for r in rows}


def claim_statement(effects: Sequence[tuple[Sequence[str], Sequence[object]]]) -> str:
    """The statement of :func:`claim_receipts` with ``effects`` as CTEs, numbered after the
    ledger's three parameters. Each effect is ``(statements, arguments)``: SQL with ``{0}``…
    placeholders for its arguments, shared by the effect's statements."""
    parts = [_CLAIM_HEAD]
    n = 3
    for k, (statements, args) in enumerate(effects):
        placeholders = [f"${n + i + 1}" for i in range(len(args))]
        for j, sql in enumerate(statements):
            parts.append(f",\neffect_{k}_{j} AS ({sql.format(*placeholders)})")
        n += len(args)
    parts.append(_CLAIM_TAIL)
    return "".join(parts)


async def claim_receipts(
    conn: asyncpg.Connection,
    rows: Sequence[tuple[str, str, bytes]],
    effects: Sequence[tuple[Sequence[str], Sequence[object]]] = (),
) -> tuple[set[str], dict[str, tuple[bytes, datetime]]]:
    """Insert (task CID, invocation CID, receipt) rows and apply ``effects`` to the tasks
    inserted, in one statement (one round trip, atomic without a transaction).

    Returns the task CIDs inserted, and task CID -> (receipt bytes, when stored) for those
    the ledger already held. A task that is in neither was stored by a transaction that
    committed after this statement began (another worker): :func:`stored_receipts` reads it.
    """
    if not rows:
        return set(), {}
    tasks, invs, receipts = zip(*rows, strict=True)
    query = claim_statement(effects)
    args: list[object] = [list(tasks), list(invs), list(receipts)]
    for _, more in effects:
        args.extend(more)
    got = await conn.fetch(query, *args)
    inserted = {r["task_cid"] for r in got if r["receipt"] is None}
    held = {
        r["task_cid"]: (bytes(r["receipt"]), r["created_at"])
        for r in got
        if r["receipt"] is not None
    }
    return inserted, held


async def record_arrivals(conn: asyncpg.Connection, arrivals: dict[str, datetime]) -> None:
    """Remember when invocations were first seen; an earlier record is kept."""
    if arrivals:
        items = sorted(arrivals.items())
        await conn.execute(INSERT_ARRIVALS, [c for c, _ in items], [a for _, a in items])


async def first_arrivals(
    conn: asyncpg.Connection, invocation_cids: Iterable[str]
) -> dict[str, datetime]:
    """Invocation CID -> first arrival, for those recorded."""
    rows = await conn.fetch(SELECT_ARRIVALS, list(invocation_cids))
    return {r["invocation_cid"]: r["first_seen_at"] for r in rows}


async def prune_arrivals(pool: asyncpg.Pool, kept: timedelta = ARRIVALS_KEPT) -> int:
    """Delete first arrivals older than ``kept``; returns how many."""
    async with pool.acquire() as conn:
        status: str = await conn.execute(PRUNE_ARRIVALS, kept)
    return int(status.rsplit(" ", 1)[-1])


async def ping(pool: asyncpg.Pool, within: float = 2.0) -> bool:
    """True when a connection from ``pool`` answers ``SELECT 1`` within ``within`` seconds."""
    try:
        async with asyncio.timeout(within):
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
        return True
    except Exception:
        return False


#: seconds between pings of a lost database (doubling up to the second value)
PING_EVERY: Final = (0.25, 5.0)


class DatabaseWatch:
    """Whether the database is thought reachable; when a batch finds it lost, one watcher
    pings it until it answers, and batches :meth:`hold` for it meanwhile (their deliveries
    fill the prefetch window, so the rest of the inbox waits where it is)."""

    def __init__(self, pool: asyncpg.Pool, log: FilteringBoundLogger) -> None:
        self._pool = pool
        self._log = log
        self.up = asyncio.Event()
        self.up.set()
        self.watch: asyncio.Task[None] | None = None

    def lost(self, why: str) -> None:
        """Note a lost database (once: one watcher pings it)."""
        if not self.up.is_set():
            return
        self.up.clear()
        self._log.warning("database_lost", error=why)
        self.watch = asyncio.create_task(self._watch(), name="forge-worker-db")

    async def _watch(self) -> None:
        delay, most = PING_EVERY
        while not await ping(self._pool):
            await asyncio.sleep(delay)
            delay = min(delay * 2, most)
        self._log.info("database_back")
        self.up.set()

    async def hold(self, seconds: float) -> bool:
        """True at once while the database is up; else wait for it up to ``seconds``."""
        if self.up.is_set():
            return True
        try:
            async with asyncio.timeout(seconds):
                await self.up.wait()
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Stop pinging."""
        if self.watch is not None:
            self.watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watch


async def _migrate_once(database_url: str, pooler: str) -> list[Migration]:
    conn = await connect(database_url, pooler=pooler)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


def migrate_main(args: argparse.Namespace, settings: Settings) -> int:
    """``forge-worker migrate``: apply pending migrations and exit."""
    from worker import log

    log.configure(settings.log_format)
    logger = log.get_logger()
    applied = asyncio.run(_migrate_once(settings.database_url, settings.database_pooler))
    for mig in applied:
        logger.info("migration_applied", version=mig.version, name=mig.name)
    logger.info("migrations_current", applied=len(applied))
    return 0
