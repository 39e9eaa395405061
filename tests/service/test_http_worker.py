"""``/readyz`` against the real PostgreSQL: it turns 503, naming the database, when the
database is cut, and comes back when it returns; ``/metrics`` carries polled queue depths."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import pytest

from tests.support.proxy import Proxy
from worker.amqp import topology
from worker.config import Settings
from worker.service import store
from worker.service.depth import DepthPoller
from worker.service.http import serve_http
from worker.service.metrics import Metrics

pytestmark = pytest.mark.integration


class PoolProbes:
    """Probes as the worker answers them, with a real database pool behind the database one."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    def broker_connected(self) -> bool:
        return True

    def consumer_registered(self) -> bool:
        return True

    async def database_reachable(self) -> bool:
        try:
            async with asyncio.timeout(1.0), self.pool.acquire() as conn:
                return bool(await conn.fetchval("SELECT 1") == 1)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return False

    def key_loaded(self) -> bool:
        return True

    def deliveries_settling(self) -> bool:
        return True


async def get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.fixture
async def proxied_pool(database_url: str) -> AsyncIterator[tuple[Proxy, asyncpg.Pool]]:
    port = urlsplit(database_url).port
    assert port is not None
    async with Proxy(port) as proxy:
        pool = await store.create_pool(proxy.url(database_url), min_size=1, max_size=2)
        try:
            yield proxy, pool
        finally:
            pool.terminate()


async def test_readyz_turns_503_naming_the_database_when_it_is_cut(proxied_pool) -> None:
    proxy, pool = proxied_pool
    metrics = Metrics()
    async with serve_http("127.0.0.1", 0, metrics, PoolProbes(pool)) as srv:
        status, body = await get(srv.port, "/readyz")
        assert status == 200, body

        proxy.refuse()
        proxy.cut()
        status, body = await get(srv.port, "/readyz")
        doc = json.loads(body)
        assert status == 503
        assert doc["failed"] == ["database"]
        assert doc["checks"]["database"]["ok"] is False
        assert all(doc["checks"][c]["ok"] for c in ("broker", "consumer", "key"))
        assert metrics.registry.get_sample_value("forge_worker_ready") == 0
        status, body = await get(srv.port, "/metrics")
        assert b'forge_worker_ready_check{check="database"} 0.0' in body

        proxy.accept()
        status, body = await get(srv.port, "/readyz")
        assert status == 200, body
        assert metrics.registry.get_sample_value("forge_worker_ready") == 1


async def test_readyz_turns_503_when_the_database_is_dropped(admin_dsn, database_url) -> None:
    pool = await store.create_pool(database_url, min_size=1, max_size=1)
    try:
        async with serve_http("127.0.0.1", 0, Metrics(), PoolProbes(pool)) as srv:
            assert (await get(srv.port, "/readyz"))[0] == 200
            admin = await asyncpg.connect(admin_dsn)
            name = urlsplit(database_url).path.lstrip("/")
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            await admin.close()
            status, body = await get(srv.port, "/readyz")
            assert status == 503 and json.loads(body)["failed"] == ["database"]
    finally:
        pool.terminate()


async def test_metrics_carry_polled_queue_depths(
    amqp: aio_pika.abc.AbstractRobustConnection, amqp_url: str, queue_name: str
) -> None:
    settings = Settings(amqp_url=amqp_url, queue=queue_name)
    ch = await amqp.channel()
    dlq = topology.dead_letter_name(queue_name)
    await ch.declare_queue(queue_name, durable=True, arguments=topology.inbox_arguments(queue_name))
    await ch.declare_queue(dlq, durable=True, arguments=topology.plain_quorum_arguments())
    for i in range(2):
        await ch.default_exchange.publish(aio_pika.Message(b"%d" % i), routing_key=dlq)
    metrics = Metrics()

    class Ready(PoolProbes):
        async def database_reachable(self) -> bool:
            return True

    async with (
        DepthPoller.for_settings(amqp, settings, metrics, interval=3600) as poller,
        serve_http("127.0.0.1", 0, metrics, Ready(None)) as srv,
    ):
        await poller.wait_rounds(1)
        status, body = await get(srv.port, "/metrics")
    assert status == 200
    assert f'forge_worker_queue_depth{{queue="{dlq}"}} 2.0'.encode() in body
    assert f'forge_worker_queue_consumers{{queue="{queue_name}"}} 0.0'.encode() in body
    # retry tiers were never declared here: no series rather than a made-up zero
    assert topology.retry_name(queue_name, 1).encode() not in body
    await ch.close()
