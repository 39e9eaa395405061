"""The metrics and health server in-process, with fake probes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from worker.service.http import HttpServer, Probes, check_readiness, serve_http
from worker.service.metrics import Metrics


@dataclass
class FakeProbes:
    broker: bool = True
    consumer: bool = True
    database: bool = True
    key: bool = True
    progress: bool = True
    database_error: Exception | None = None
    database_hangs: bool = False

    def broker_connected(self) -> bool:
        return self.broker

    def consumer_registered(self) -> bool:
        return self.consumer

    async def database_reachable(self) -> bool:
        if self.database_hangs:
            await asyncio.Event().wait()
        if self.database_error is not None:
            raise self.database_error
        return self.database

    def key_loaded(self) -> bool:
        return self.key

    def deliveries_settling(self) -> bool:
        return self.progress


def _is_probes(p: Probes) -> Probes:
    return p


async def request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, body


async def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    return await request(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def probes() -> FakeProbes:
    return FakeProbes()


@pytest.fixture
async def server(metrics: Metrics, probes: FakeProbes) -> AsyncIterator[HttpServer]:
    async with serve_http("127.0.0.1", 0, metrics, _is_probes(probes)) as srv:
        yield srv


async def test_healthz(server: HttpServer) -> None:
    status, headers, body = await get(server.port, "/healthz")
    assert status == 200 and body == b"ok\n"
    assert headers["content-length"] == "3" and headers["connection"] == "close"


async def test_readyz_ready(server: HttpServer, metrics: Metrics) -> None:
    status, headers, body = await get(server.port, "/readyz")
    assert status == 200 and headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["ready"] is True and doc["failed"] == []
    assert set(doc["checks"]) == {"broker", "consumer", "database", "key", "progress"}
    assert metrics.registry.get_sample_value("forge_worker_ready") == 1


async def test_readyz_names_the_database_when_it_fails(
    server: HttpServer, probes: FakeProbes, metrics: Metrics
) -> None:
    probes.database = False
    status, _, body = await get(server.port, "/readyz")
    assert status == 503
    doc = json.loads(body)
    assert doc["ready"] is False and doc["failed"] == ["database"]
    assert doc["checks"]["database"]["ok"] is False
    assert "database" in doc["checks"]["database"]["error"]
    assert doc["checks"]["broker"] == {"ok": True}
    assert metrics.registry.get_sample_value("forge_worker_ready") == 0
    value = metrics.registry.get_sample_value
    assert value("forge_worker_ready_check", {"check": "database"}) == 0
    assert value("forge_worker_ready_check", {"check": "broker"}) == 1


async def test_readyz_reports_every_failure(server: HttpServer, probes: FakeProbes) -> None:
    probes.broker = probes.consumer = probes.key = probes.progress = False
    probes.database_error = ConnectionRefusedError("refused")
    status, _, body = await get(server.port, "/readyz")
    doc = json.loads(body)
    assert status == 503
    assert doc["failed"] == ["broker", "consumer", "database", "key", "progress"]
    assert "ConnectionRefusedError" in doc["checks"]["database"]["error"]


async def test_a_hanging_database_probe_times_out(
    probes: FakeProbes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("worker.service.http.PROBE_TIMEOUT", 0.05)
    probes.database_hangs = True
    readiness = await check_readiness(probes)
    assert readiness.failed == ["database"]
    assert "within 0.05s" in (readiness.checks["database"] or "")


async def test_metrics_exposes_values(server: HttpServer, metrics: Metrics) -> None:
    metrics.messages.labels(outcome="ok").inc(3)
    metrics.messages.labels(outcome="Expired").inc()
    metrics.queue_depth.labels(queue="ucan.invocations.dlq").set(7)
    metrics.in_flight.set(2)
    metrics.latency.observe(0.02)
    status, headers, body = await get(server.port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=")
    text = body.decode()
    assert 'forge_worker_messages_total{outcome="ok"} 3.0' in text
    assert 'forge_worker_messages_total{outcome="Expired"} 1.0' in text
    assert 'forge_worker_queue_depth{queue="ucan.invocations.dlq"} 7.0' in text
    assert "forge_worker_in_flight 2.0" in text
    assert "forge_worker_processing_seconds_count 1.0" in text
    assert "forge_worker_ready 1.0" in text  # evaluated on the scrape


async def test_head_unknown_paths_and_methods(server: HttpServer) -> None:
    status, headers, body = await request(server.port, b"HEAD /healthz HTTP/1.1\r\n\r\n")
    assert status == 200 and headers["content-length"] == "3" and body == b""
    assert (await get(server.port, "/nope"))[0] == 404
    assert (await get(server.port, "/readyz?verbose=1"))[0] == 200
    assert (await request(server.port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0] == 405
    assert (await request(server.port, b"garbage\r\n\r\n"))[0] == 400
    big = b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
    assert (await request(server.port, big))[0] == 431


async def test_a_silent_client_does_not_block_others(
    server: HttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\n")  # never finishes its request
    await writer.drain()
    assert (await get(server.port, "/healthz"))[0] == 200
    writer.close()
    await writer.wait_closed()


async def test_port_is_released_on_exit(metrics: Metrics, probes: FakeProbes) -> None:
    async with serve_http("127.0.0.1", 0, metrics, probes) as srv:
        port = srv.port
        assert (await get(port, "/healthz"))[0] == 200
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    # and can be bound again at once
    async with serve_http("127.0.0.1", port, metrics, probes) as again:
        assert again.port == port


async def test_a_failing_handler_answers_500_and_the_server_lives_on(
    server: HttpServer, metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(registry: object) -> bytes:
        raise RuntimeError("boom")

    monkeypatch.setattr("worker.service.http.generate_latest", broken)
    status, _, body = await get(server.port, "/metrics")
    assert status == 500 and b"RuntimeError" in body
    assert (await get(server.port, "/healthz"))[0] == 200
