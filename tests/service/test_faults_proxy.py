"""The fault proxy with the real clients and services: what a cut, a refusal and a delay
look like to aio-pika and asyncpg, so the worker's fault tests inject real faults."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import pytest

from tests.support.proxy import Proxy

pytestmark = pytest.mark.integration


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


async def test_robust_amqp_connection_comes_back_after_a_cut(
    amqp_url: str, queue_name: str, amqp: aio_pika.abc.AbstractRobustConnection
) -> None:
    async with Proxy(_port(amqp_url)) as proxy:
        conn = await aio_pika.connect_robust(proxy.url(amqp_url), reconnect_interval=0.2)
        try:
            reconnected = asyncio.Event()
            conn.reconnect_callbacks.add(lambda *_: reconnected.set())
            channel = await conn.channel()
            queue = await channel.declare_queue(queue_name, auto_delete=False)

            assert proxy.cut() == 1
            async with asyncio.timeout(10):
                await reconnected.wait()
            assert proxy.stats.connections == 2

            # the robust channel and queue work again on the new connection
            got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

            async def on_message(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
                if not got.done():
                    got.set_result(msg.body)

            await queue.consume(on_message, no_ack=True)
            await channel.default_exchange.publish(aio_pika.Message(b"after"), queue_name)
            async with asyncio.timeout(10):
                assert await got == b"after"
        finally:
            await conn.close()


async def test_refused_amqp_connection_fails_fast(amqp_url: str) -> None:
    async with Proxy(_port(amqp_url)) as proxy:
        proxy.refuse()
        started = time.monotonic()
        with pytest.raises((ConnectionError, aio_pika.exceptions.AMQPConnectionError)):
            await aio_pika.connect(proxy.url(amqp_url), timeout=5)
        assert time.monotonic() - started < 2
        assert proxy.stats.refused == 1


async def test_postgres_outage_through_the_proxy(admin_dsn: str) -> None:
    async with Proxy(_port(admin_dsn)) as proxy:
        conn = await asyncpg.connect(proxy.url(admin_dsn))
        assert await conn.fetchval("SELECT 1") == 1

        proxy.refuse()
        proxy.cut()
        with pytest.raises((ConnectionError, asyncpg.exceptions.ConnectionDoesNotExistError)):
            await conn.fetchval("SELECT 1")
        with pytest.raises((ConnectionError, OSError)):
            await asyncpg.connect(proxy.url(admin_dsn), timeout=5)
        conn.terminate()

        proxy.accept()
        conn = await asyncpg.connect(proxy.url(admin_dsn))
        try:
            assert await conn.fetchval("SELECT 2") == 2
        finally:
            await conn.close()


async def test_postgres_latency_through_the_proxy(admin_dsn: str) -> None:
    async with Proxy(_port(admin_dsn)) as proxy:
        conn = await asyncpg.connect(proxy.url(admin_dsn))
        try:
            proxy.delay(0.1)
            started = time.monotonic()
            assert await conn.fetchval("SELECT 1") == 1
            assert time.monotonic() - started >= 0.2  # one round trip: 0.1 s each way
        finally:
            proxy.delay(0)
            await conn.close()
