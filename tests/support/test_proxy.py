"""The fault proxy against a tiny local echo server: pass-through, cut, refuse, delay."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest

from tests.support.proxy import Proxy


@pytest.fixture(name="echo_port")
async def _echo_port() -> AsyncIterator[int]:
    """A loopback echo server; yields its port."""
    writers: set[asyncio.StreamWriter] = set()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            writers.discard(writer)

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    for w in list(writers):
        w.transport.abort()
    await server.wait_closed()


@pytest.fixture(name="proxy")
async def _proxy(echo_port: int) -> AsyncIterator[Proxy]:
    async with Proxy(echo_port) as proxy:
        yield proxy


async def _roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), 5)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_bytes_pass_through_both_ways(proxy: Proxy) -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB: several chunks each way
    assert await _roundtrip(proxy.port, payload) == payload
    assert proxy.stats.connections == 1
    assert proxy.stats.bytes_up == proxy.stats.bytes_down == len(payload)
    await proxy.wait_for(lambda s: s.live == 0, within=5)


async def test_url_points_at_the_proxy(proxy: Proxy) -> None:
    assert proxy.url("amqp://guest:guest@127.0.0.1:5672/vh") == (
        f"amqp://guest:guest@127.0.0.1:{proxy.port}/vh"
    )
    assert proxy.url("postgresql://postgres@localhost/db") == (
        f"postgresql://postgres@127.0.0.1:{proxy.port}/db"
    )


async def test_cut_closes_live_connections(proxy: Proxy) -> None:
    conns = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(3)]
    await proxy.wait_for(lambda s: s.live == 3, within=5)
    for reader, writer in conns:  # each is really connected end to end
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"

    assert proxy.cut() == 3

    assert proxy.stats.live == 0 and proxy.stats.cut == 3
    for reader, writer in conns:
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            # reset by the peer: either an error or EOF, never an answer
            data = await asyncio.wait_for(reader.read(4), 5)
            if not data:
                raise asyncio.IncompleteReadError(b"", 4)
        writer.close()
    # the proxy itself keeps serving
    assert await _roundtrip(proxy.port, b"after") == b"after"


async def test_refuse_blocks_new_connections_until_accept(proxy: Proxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    await proxy.wait_for(lambda s: s.live == 1, within=5)
    proxy.refuse()

    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await _roundtrip(proxy.port, b"refused")
    assert proxy.stats.refused == 1
    # a connection made before refuse() is left alone
    writer.write(b"live")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"live"

    proxy.accept()
    assert await _roundtrip(proxy.port, b"accepted") == b"accepted"
    assert proxy.stats.connections == 2
    writer.close()
    await writer.wait_closed()


async def test_delay_holds_each_chunk(proxy: Proxy) -> None:
    assert await _roundtrip(proxy.port, b"warm") == b"warm"
    proxy.delay(0.2)
    started = time.monotonic()
    assert await _roundtrip(proxy.port, b"slow") == b"slow"
    # 0.2 s up and 0.2 s back
    assert time.monotonic() - started >= 0.4

    proxy.delay(0)
    started = time.monotonic()
    assert await _roundtrip(proxy.port, b"fast") == b"fast"
    assert time.monotonic() - started < 0.2


async def test_delay_is_latency_not_a_throughput_cap(proxy: Proxy) -> None:
    proxy.delay(0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    started = time.monotonic()
    for i in range(10):  # ten chunks in flight at once, each held 0.2 s each way
        writer.write(b"%d;" % i)
        await writer.drain()
    expected = b"".join(b"%d;" % i for i in range(10))
    got = b""
    while len(got) < len(expected):
        got += await asyncio.wait_for(reader.read(100), 5)
    assert got == expected
    assert 0.4 <= time.monotonic() - started < 1.5
    writer.close()
    await writer.wait_closed()


async def test_wait_for_times_out(proxy: Proxy) -> None:
    with pytest.raises(TimeoutError):
        await proxy.wait_for(lambda s: s.connections > 0, within=0.1)


def test_only_loopback_targets() -> None:
    with pytest.raises(ValueError, match="loopback only"):
        Proxy(5672, "10.0.0.1")


async def test_an_unreachable_target_resets_the_client() -> None:
    with socket.socket() as sock:  # a port with nothing listening on it
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    async with Proxy(dead_port) as proxy:
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await _roundtrip(proxy.port, b"anyone?")
        await proxy.wait_for(lambda s: s.failed == 1, within=5)
        assert proxy.stats.connections == 0
