"""The worker behind PgBouncer in transaction pooling mode (the Debian package, started by
the test in front of the local Postgres): migrations, requests answered and rows written, a
redelivered request answered from the ledger; and the two traps it avoids, named prepared
statements and a session-level migration lock."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import aio_pika
import asyncpg
import pytest

from tests.support import pgbouncer as bouncer
from tests.support.worker import Requester, container, delegation, invocation, receipts_of
from worker.config import Settings
from worker.service import store
from worker.service.app import running
from worker.ucan import Signer

pytestmark = pytest.mark.integration


@pytest.fixture
async def bouncer_url(database_url: str) -> AsyncIterator[str]:
    """The test's database through its own PgBouncer (transaction pooling, 2 servers)."""
    async with bouncer.pgbouncer(database_url) as url:
        yield url


async def fetchval(database_url: str, sql: str) -> object:
    conn = await asyncpg.connect(database_url)  # Postgres itself, to check
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def test_the_worker_runs_behind_pgbouncer_in_transaction_pooling_mode(
    worker_settings: Settings,
    bouncer_url: str,
    database_url: str,
    requester: Requester,
    amqp: aio_pika.abc.AbstractRobustConnection,
    service: Signer,
    agent: Signer,
) -> None:
    print(bouncer.version())
    settings = dataclasses.replace(
        worker_settings, database_url=bouncer_url, database_pooler="pgbouncer"
    )
    dlg = delegation(service, agent)
    bodies = [container(invocation(agent, service.did, proofs=[dlg]), dlg) for _ in range(60)]

    async with running(settings) as app:
        versions = await fetchval(
            database_url,
            "SELECT array_agg(version ORDER BY version) FROM forge_worker.schema_migrations",
        )
        assert versions == [m.version for m in store.discover()]
        # all at once: several batches in flight, over two server connections
        reply_to = await requester.reply_queue()
        for i, body in enumerate(bodies):
            await requester.publish(body, reply_to=reply_to, correlation_id=str(i))
        answers: dict[str, bytes] = {}
        for _ in bodies:
            msg = await requester.next(reply_to)
            answers[str(msg.correlation_id)] = msg.body
        assert sorted(answers, key=int) == [str(i) for i in range(len(bodies))]
        assert all(receipts_of(b)[0].ok == {} for b in answers.values())
        assert app.metrics.messages.labels("ok")._value.get() == len(bodies)
        assert app.metrics.duplicates._value.get() == 0
    assert await fetchval(database_url, "SELECT count(*) FROM public.customer") == len(bodies)
    assert await fetchval(database_url, "SELECT count(*) FROM forge_worker.receipts") == 60

    # the first request again, redelivered by the broker (taken, then given back unacked)
    again = await requester.reply_queue()
    await requester.publish(bodies[0], reply_to=again, correlation_id="again")
    ch = await amqp.channel()
    inbox = await ch.declare_queue(settings.queue, passive=True)
    taken = await inbox.get(no_ack=False, timeout=10)
    assert taken is not None and not taken.redelivered
    await ch.close()  # unacked: back in the inbox, marked redelivered

    async with running(settings) as app:  # (migrations again: nothing to apply)
        msg = await requester.next(again)
        assert msg.body == answers["0"]  # the stored receipt, byte for byte
        assert app.metrics.duplicates._value.get() == 1
        assert app.metrics.messages.labels("duplicate")._value.get() == 1
    # a redelivery is answered in a transaction that records its first arrival
    assert await fetchval(database_url, "SELECT count(*) FROM forge_worker.arrivals") == 1
    assert await fetchval(database_url, "SELECT count(*) FROM public.customer") == len(bodies)


async def test_migrations_run_concurrently_through_pgbouncer_apply_each_once(
    bouncer_url: str, database_url: str
) -> None:
    """Each migration's transaction takes a transaction-level lock. A session-level one
    would be taken on one server connection and released on another (or not at all)."""
    conns = [await store.connect(bouncer_url, pooler="pgbouncer") for _ in range(4)]
    try:
        results = await asyncio.gather(*(store.migrate(c) for c in conns))
        assert await store.migrate(conns[0]) == []
    finally:
        for c in conns:
            await c.close()
    expected = [m.version for m in store.discover()]
    assert sorted(m.version for r in results for m in r) == expected
    count = await fetchval(database_url, "SELECT count(*) FROM forge_worker.schema_migrations")
    assert count == len(expected)
    # no lock left behind on a server connection PgBouncer keeps
    held = await fetchval(database_url, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
    assert held == 0


async def _hammer(pool: asyncpg.Pool, clients: int = 8, rounds: int = 25) -> list[str]:
    """Concurrent statements of several shapes on ``pool``: the errors met."""
    errors: list[str] = []

    async def client(i: int) -> None:
        for k in range(rounds):
            try:
                async with pool.acquire() as conn:
                    assert await conn.fetchval("SELECT $1::int + 1", i) == i + 1
                    assert await conn.fetchval("SELECT $1::text || 'x'", str(k)) == f"{k}x"
            except asyncpg.PostgresError as exc:
                errors.append(type(exc).__name__)

    await asyncio.gather(*(client(i) for i in range(clients)))
    return errors


async def test_named_prepared_statements_break_behind_pgbouncer_and_the_pooler_setting_avoids_them(
    bouncer_url: str,
) -> None:
    pool = await store.create_pool(bouncer_url, pooler="none", max_size=8)
    try:
        trapped = await _hammer(pool)
    finally:
        await pool.close()
    assert "InvalidSQLStatementNameError" in trapped  # prepared statement ... does not exist

    pool = await store.create_pool(bouncer_url, pooler="pgbouncer", max_size=8)
    try:
        assert await _hammer(pool) == []
    finally:
        await pool.close()
