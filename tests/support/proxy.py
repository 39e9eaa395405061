"""A loopback TCP proxy for fault-injection tests: cut, refuse and delay connections.

Tests put it between the worker and RabbitMQ or PostgreSQL, so a fault is injected
without stopping the machine's services::

    async with Proxy(5672) as broker:
        url = broker.url("amqp://guest:guest@127.0.0.1:5672/")
        ...                       # the worker connects through broker.port
        broker.cut()              # every live connection is reset now
        broker.refuse()           # new connections are reset as soon as they arrive
        broker.accept()           # back to normal
        broker.delay(0.2)         # each forwarded chunk arrives 200 ms late

The controls are synchronous and never sleep: their effect is in place when they
return. Waiting for something to happen (a reconnect) is :meth:`Proxy.wait_for`,
woken by the proxy's own events rather than by polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final
from urllib.parse import urlsplit, urlunsplit

LOOPBACK: Final = "127.0.0.1"
#: bytes read per chunk; the delay applies per chunk, not per byte
CHUNK: Final = 64 * 1024


@dataclass(slots=True)
class ProxyStats:
    """What the proxy has seen since it started."""

    #: connections accepted and forwarded to the target
    connections: int = 0
    #: connections reset on arrival because the proxy was refusing
    refused: int = 0
    #: connections open right now
    live: int = 0
    #: connections reset by :meth:`Proxy.cut`
    cut: int = 0
    #: connections whose target could not be reached
    failed: int = 0
    #: bytes forwarded client -> target and target -> client
    bytes_up: int = 0
    bytes_down: int = 0


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), as a dead peer or a firewall would, not a polite FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and its connection to the target, pumped both ways."""

    def __init__(
        self,
        proxy: Proxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        target: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.client_writer = client[1]
        self.target_writer = target[1]
        self.pumps = [
            asyncio.create_task(self._pump(client[0], target[1], up=True)),
            asyncio.create_task(self._pump(target[0], client[1], up=False)),
        ]

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        # Reading and writing are split by a queue so that a delay is latency (each chunk
        # is held until its own deadline) rather than a cap on throughput.
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def write() -> None:
            while True:
                deadline, data = await queue.get()
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                wait = deadline - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
                if up:
                    self.proxy.stats.bytes_up += len(data)
                else:
                    self.proxy.stats.bytes_down += len(data)

        writing = asyncio.create_task(write())
        try:
            while True:
                data = await reader.read(CHUNK)
                queue.put_nowait((time.monotonic() + self.proxy.latency, data))
                if not data:
                    break
            await writing
        except (ConnectionError, OSError):
            pass
        finally:
            writing.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await writing
            # One direction ending ends the link: a half-open proxy would hide a cut.
            self.close(reset=False)

    def close(self, *, reset: bool) -> None:
        for w in (self.client_writer, self.target_writer):
            if reset:
                _reset(w)
            elif not w.is_closing():
                w.close()
        self.proxy._forget(self)


class Proxy:
    """A TCP proxy on 127.0.0.1:<ephemeral port> forwarding to ``target_host:target_port``.

    Args:
        target_port: the port of the real service (5672, 5432).
        target_host: the real service's host; loopback only.
    """

    def __init__(self, target_port: int, target_host: str = LOOPBACK) -> None:
        if target_host not in (LOOPBACK, "localhost"):
            raise ValueError(f"cannot proxy to {target_host!r}: loopback only")
        self.target = (target_host, target_port)
        self.stats = ProxyStats()
        self.latency = 0.0
        self._refusing = False
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._changed = asyncio.Event()
        self._port = 0

    # --- lifecycle ---

    async def __aenter__(self) -> Proxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Listen on an ephemeral loopback port."""
        self._server = await asyncio.start_server(self._on_client, LOOPBACK, 0)
        self._port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and reset every live connection."""
        if self._server is not None:
            self._server.close()
        self.cut()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    @property
    def port(self) -> int:
        """The port the proxy listens on."""
        if not self._port:
            raise RuntimeError("cannot tell the port: the proxy is not started")
        return self._port

    def url(self, url: str) -> str:
        """``url`` (amqp://…, postgresql://…) with its host and port replaced by the proxy's."""
        parts = urlsplit(url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{LOOPBACK}:{self.port}"))

    # --- controls (synchronous: in effect when they return) ---

    def cut(self) -> int:
        """Reset every live connection now; returns how many were cut."""
        links = list(self._links)
        for link in links:
            link.close(reset=True)
        self.stats.cut += len(links)
        self._notify()
        return len(links)

    def refuse(self) -> None:
        """Reset new connections as soon as they arrive (live ones are left alone)."""
        self._refusing = True

    def accept(self) -> None:
        """Forward new connections again."""
        self._refusing = False

    def refusing(self) -> bool:
        """Whether new connections are being reset."""
        return self._refusing

    def delay(self, seconds: float) -> None:
        """Hold each forwarded chunk ``seconds`` before passing it on (0 turns it off)."""
        if seconds < 0:
            raise ValueError(f"cannot delay by {seconds!r} seconds")
        self.latency = seconds

    # --- waiting for events ---

    async def wait_for(self, predicate: Callable[[ProxyStats], bool], *, within: float) -> None:
        """Wait until ``predicate(stats)`` holds, woken on every connection event.

        Raises:
            TimeoutError: it did not hold within ``within`` seconds.
        """
        async with asyncio.timeout(within):
            while not predicate(self.stats):
                self._changed.clear()
                await self._changed.wait()

    # --- internals ---

    def _notify(self) -> None:
        self._changed.set()

    def _forget(self, link: _Link) -> None:
        if link in self._links:
            self._links.discard(link)
            self.stats.live = len(self._links)
            self._notify()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            self.stats.refused += 1
            _reset(writer)
            self._notify()
            return
        try:
            target = await asyncio.open_connection(*self.target)
        except OSError:
            self.stats.failed += 1
            _reset(writer)
            self._notify()
            return
        if self.refusing():  # refuse() was called while we were connecting
            self.stats.refused += 1
            _reset(writer)
            _reset(target[1])
            self._notify()
            return
        link = _Link(self, (reader, writer), target)
        self._links.add(link)
        self.stats.connections += 1
        self.stats.live = len(self._links)
        self._notify()
        await asyncio.gather(*link.pumps, return_exceptions=True)
