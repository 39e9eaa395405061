"""``/metrics``, ``/healthz`` and ``/readyz`` on a tiny asyncio HTTP/1.1 server (no framework).

Only ``GET`` and ``HEAD`` of those three paths; one request per connection
(``Connection: close``); a request that does not arrive within a few seconds or is larger
than a few kilobytes is dropped, so a stuck scraper cannot tie the worker up.

Readiness is five probes (:class:`Probes`). Every ``/readyz`` and every scrape of
``/metrics`` runs them, so ``forge_worker_ready`` and ``forge_worker_ready_check{check}``
are current whenever Prometheus looks. :func:`serve_endpoints` serves any registry and
readiness: the supervisor of ``run --processes N`` serves its group's with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker.service.metrics import Metrics

#: seconds a client has to send its request line and headers
READ_TIMEOUT: Final = 5.0
#: seconds the database probe may take before it counts as failed
PROBE_TIMEOUT: Final = 2.0
#: largest request head accepted (request line + headers)
MAX_HEAD: Final = 8192

#: the readiness checks, in the order they are reported
CHECKS: Final = ("broker", "consumer", "database", "key", "progress")

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class Probes(Protocol):
    """What readiness asks the worker; each answer must be cheap."""

    def broker_connected(self) -> bool:
        """The AMQP connection is open (not reconnecting)."""
        ...

    def consumer_registered(self) -> bool:
        """The inbox consumer is registered (basic.consume-ok, not cancelled)."""
        ...

    async def database_reachable(self) -> bool:
        """A pooled connection answers ``SELECT 1`` (bounded by the caller's timeout)."""
        ...

    def key_loaded(self) -> bool:
        """The service signing key is loaded."""
        ...

    def deliveries_settling(self) -> bool:
        """Deliveries are being settled: none has been pending for long without any of them
        acked or given back (a worker whose ack window is stuck is not ready)."""
        ...


class Report(Protocol):
    """A readiness verdict as ``/readyz`` answers it."""

    @property
    def ready(self) -> bool: ...

    def to_json(self) -> dict[str, object]: ...


@dataclass(frozen=True, slots=True)
class Readiness:
    """The outcome of one round of probes."""

    checks: dict[str, str | None]  # check -> None when it passed, else what failed

    @property
    def ready(self) -> bool:
        return all(v is None for v in self.checks.values())

    @property
    def failed(self) -> list[str]:
        return [k for k, v in self.checks.items() if v is not None]

    def to_json(self) -> dict[str, object]:
        return {
            "ready": self.ready,
            "failed": self.failed,
            "checks": {
                k: {"ok": v is None, **({"error": v} if v is not None else {})}
                for k, v in self.checks.items()
            },
        }


_FAILURES: Final = {
    "broker": "not connected to the broker",
    "consumer": "no consumer registered on the inbox",
    "database": "database did not answer",
    "key": "service key not loaded",
    "progress": "deliveries pending and none settled for too long",
}


async def _check(name: str, probe: Callable[[], bool | Awaitable[bool]]) -> str | None:
    try:
        result = probe()
        if not isinstance(result, bool):
            async with asyncio.timeout(PROBE_TIMEOUT):
                result = await result
    except TimeoutError:
        return f"{_FAILURES[name]} within {PROBE_TIMEOUT:g}s"
    except Exception as exc:  # a probe that raises is a failed check, not a failed server
        return f"{_FAILURES[name]}: {type(exc).__name__}: {exc}"
    return None if result else _FAILURES[name]


async def check_readiness(probes: Probes, metrics: Metrics | None = None) -> Readiness:
    """Run every probe (the database one bounded by :data:`PROBE_TIMEOUT`); record the
    result in ``metrics`` when given."""
    funcs: dict[str, Callable[[], bool | Awaitable[bool]]] = {
        "broker": probes.broker_connected,
        "consumer": probes.consumer_registered,
        "database": probes.database_reachable,
        "key": probes.key_loaded,
        "progress": probes.deliveries_settling,
    }
    checks = {name: await _check(name, funcs[name]) for name in CHECKS}
    readiness = Readiness(checks)
    if metrics is not None:
        for name, failure in checks.items():
            metrics.ready_check.labels(check=name).set(0 if failure else 1)
        metrics.ready.set(1 if readiness.ready else 0)
    return readiness


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


class _App:
    def __init__(
        self, render: Callable[[], bytes], readiness: Callable[[], Awaitable[Report]]
    ) -> None:
        self.render = render
        self.readiness = readiness

    async def route(self, method: str, path: str) -> _Response:
        path = path.split("?", 1)[0]
        if path not in ("/metrics", "/healthz", "/readyz"):
            return _Response(404, b"not found\n")
        if method not in ("GET", "HEAD"):
            return _Response(405, b"method not allowed\n")
        if path == "/healthz":
            return _Response(200, b"ok\n")
        readiness = await self.readiness()
        if path == "/readyz":
            body = json.dumps(readiness.to_json()).encode() + b"\n"
            return _Response(200 if readiness.ready else 503, body, "application/json")
        return _Response(200, self.render(), CONTENT_TYPE_LATEST)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                response, method = _Response(431, b"request head too large\n"), "GET"
            else:
                try:
                    response, method = await self._parse_and_route(head)
                except Exception as exc:  # a bug must not take the server down, nor hide
                    body = f"internal error: {type(exc).__name__}\n".encode()
                    response, method = _Response(500, body), "GET"
            await self._write(writer, response, head_only=method == "HEAD")
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away or never finished its request
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _parse_and_route(self, head: bytes) -> tuple[_Response, str]:
        try:
            request_line = head.split(b"\r\n", 1)[0].decode("ascii")
            method, target, version = request_line.split(" ")
        except (UnicodeDecodeError, ValueError):
            return _Response(400, b"bad request\n"), "GET"
        if not version.startswith("HTTP/1.") or not target.startswith("/"):
            return _Response(400, b"bad request\n"), method
        return await self.route(method, target), method

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, response: _Response, *, head_only: bool) -> None:
        reason = _REASONS.get(response.status, "")
        headers = (
            f"HTTP/1.1 {response.status} {reason}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(headers.encode("ascii"))
        if not head_only:
            writer.write(response.body)
        await writer.drain()


@dataclass(frozen=True, slots=True)
class HttpServer:
    """A running server; ``port`` is the bound port (useful when asked for port 0)."""

    host: str
    port: int
    server: asyncio.Server


def serve_http(
    host: str, port: int, metrics: Metrics, probes: Probes
) -> contextlib.AbstractAsyncContextManager[HttpServer]:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` of one worker on ``host:port``
    while entered.

    ``port`` 0 binds a free port (tests); the worker does not call this at all when
    ``FORGE_WORKER_HTTP_PORT`` is 0. Leaving the block stops accepting and closes the
    server.

    Raises:
        OSError: the port cannot be bound (in use, no permission).
    """

    async def readiness() -> Report:
        return await check_readiness(probes, metrics)

    return serve_endpoints(host, port, lambda: generate_latest(metrics.registry), readiness)


@contextlib.asynccontextmanager
async def serve_endpoints(
    host: str,
    port: int,
    render: Callable[[], bytes],
    readiness: Callable[[], Awaitable[Report]],
) -> AsyncIterator[HttpServer]:
    """Serve ``/metrics`` (``render()``, after ``readiness()`` so its gauges are current),
    ``/healthz`` and ``/readyz`` (``readiness()``) on ``host:port`` while entered.

    Raises:
        OSError: the port cannot be bound (in use, no permission).
    """
    app = _App(render, readiness)
    server = await asyncio.start_server(app.handle, host, port, limit=MAX_HEAD)
    bound = server.sockets[0].getsockname()[1]
    try:
        yield HttpServer(host=host, port=bound, server=server)
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(READ_TIMEOUT):
                await server.wait_closed()
