"""Dead letters replayed through a running worker: each comes back with its receipt, and one
that expired while dead (a passing failure) is still valid as of its first arrival."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection

from tests.support.proxy import Proxy
from tests.support.worker import QueueCleanup, Requester, invocation, receipts_of, task_of
from worker import cli
from worker.amqp import topology
from worker.config import Settings
from worker.operate import audit, deadletters, replay
from worker.service.app import App, running
from worker.ucan import Signer

pytestmark = pytest.mark.integration


@asynccontextmanager
async def customer_table_away(database_url: str) -> AsyncIterator[None]:
    """Every upsert fails (a passing database fault) until the block ends."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("ALTER TABLE public.customer RENAME TO customer_gone")
        yield
    finally:
        await conn.execute("ALTER TABLE IF EXISTS public.customer_gone RENAME TO customer")
        await conn.close()


async def test_a_replayed_dead_letter_gets_its_receipt(
    worker: App,
    requester: Requester,
    service: Signer,
    amqp: AbstractRobustConnection,
    database_url: str,
) -> None:
    settings = worker.settings
    body = invocation(service, service.did)
    reply_to = await requester.reply_queue()
    ch = await amqp.channel()
    # as the worker dead-letters: a copy in the DLQ with its reason and original properties
    await ch.default_exchange.publish(
        aio_pika.Message(
            body,
            message_id="dead-1",
            correlation_id="corr-1",
            reply_to=reply_to,
            headers={
                topology.H_REASON: "retries-exhausted",
                topology.H_ATTEMPT: 3,
                topology.H_DEAD_LETTERED_AT: int(time.time()),
            },
        ),
        routing_key=topology.dead_letter_name(settings.queue),
    )
    await ch.close()

    async with audit.AuditLog.open(database_url) as log:
        result = await replay.replay(
            amqp,
            dead_letter_queue=topology.dead_letter_name(settings.queue),
            inbox=settings.queue,
            selection=deadletters.Selection(ids=frozenset({"dead-1"})),
            audit=log,
        )
    assert result.done == 1
    response = await requester.next(reply_to)
    assert response.correlation_id == "corr-1"
    [receipt] = receipts_of(response.body)
    assert receipt.ok == {}, receipt.error
    assert receipt.ran == task_of(body)


async def test_replay_after_expiry_is_valid_as_of_first_arrival(
    worker_settings: Settings,
    requester: Requester,
    service: Signer,
    amqp: AbstractRobustConnection,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database is away long enough for the worker to give up (retries exhausted); the
    invocation expires in the DLQ; once the database is back, a replay still succeeds."""
    monkeypatch.setenv("FORGE_WORKER_AMQP_URL", worker_settings.amqp_url)  # it has a password
    settings = dataclasses.replace(worker_settings, clock_skew=0, retry_delays=(1,))
    exp = int(time.time()) + 2
    body = invocation(service, service.did, exp=exp)
    dlq = topology.dead_letter_name(settings.queue)
    async with running(settings) as app:
        assert app.consumer is not None
        reply_to = await requester.reply_queue()
        async with customer_table_away(database_url):
            await requester.publish(body, reply_to=reply_to, correlation_id="late-1")
            await app.consumer.wait_for("dead_lettered")
        [dead] = await deadletters.read_dead_letters(amqp, dlq)
        assert dead.reason == "retries-exhausted" and dead.correlation_id == "late-1"
        # wall-clock time has to pass the invocation's exp: there is no event for that
        await asyncio.sleep(max(0.0, exp + 1 - time.time()))

        code = await asyncio.to_thread(
            cli.main,
            [
                "dlq",
                "replay",
                "--reason",
                "retries-exhausted",
                "--json",
                "--database-url",
                settings.database_url,
                "--queue",
                settings.queue,
            ],
        )
        assert code == 0
        # the in-process worker logs to the same stdout: pick the command's document
        [doc] = [
            json.loads(line)
            for line in capsys.readouterr().out.splitlines()
            if line.startswith('{"action": "replay"')
        ]
        assert doc["replayed"] == 1
        response = await requester.next(reply_to)
    assert time.time() > exp
    assert response.correlation_id == "late-1"
    [receipt] = receipts_of(response.body)
    assert receipt.ok == {}, receipt.error

    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT action, invocation_cids FROM forge_worker.audit")
        customers = await conn.fetchval("SELECT count(*) FROM public.customer")
    finally:
        await conn.close()
    assert [r["action"] for r in rows] == ["replay"]
    assert rows[0]["invocation_cids"] == [dead.invocation_cids[0]]
    assert customers == 1


async def _http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_the_running_worker_serves_metrics_and_readiness(
    worker_settings: Settings, requester: Requester, service: Signer
) -> None:
    with socket.socket() as s:  # a free port for the worker's server
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = dataclasses.replace(worker_settings, http_port=port)
    async with running(settings) as app:
        assert app.http_port == port
        _, receipts = await requester.call(invocation(service, service.did))
        assert [r.ok for r in receipts] == [{}]

        status, body = await _http_get(port, "/readyz")
        assert status == 200 and json.loads(body)["ready"] is True
        assert (await _http_get(port, "/healthz"))[0] == 200
        depth_line = f'forge_worker_queue_depth{{queue="{settings.queue}"}} 0.0'.encode()
        async with asyncio.timeout(10):
            while True:  # the poller's first round runs at start-up; no event is exposed
                status, body = await _http_get(port, "/metrics")
                if depth_line in body:
                    break
                await asyncio.sleep(0.05)
        assert b'forge_worker_messages_total{outcome="ok"} 1.0' in body
        assert b"forge_worker_receipts_published_total 1.0" in body
        # (polled once before the consumer starts, so 0 or 1 until the next round)
        assert f'forge_worker_queue_consumers{{queue="{settings.queue}"}}'.encode() in body
        assert b"forge_worker_ready 1.0" in body

        app.request_stop()  # a stopping worker is not ready
        status, body = await _http_get(port, "/readyz")
        assert status == 503 and "consumer" in json.loads(body)["failed"]


async def test_status_verdict_against_a_running_worker(
    worker: App,
    requester: Requester,
    amqp: AbstractRobustConnection,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``ready`` while the worker consumes and nothing is dead; a dead letter turns it into
    ``dead-letters``, with the command to look at them."""
    settings = worker.settings
    monkeypatch.setenv("FORGE_WORKER_AMQP_URL", settings.amqp_url)  # it has a password
    argv = ["status", "--queue", settings.queue, "--receipt-queue", settings.receipt_queue]
    argv += ["--retry-delays", ",".join(map(str, settings.retry_delays))]

    async def status() -> dict[str, str]:
        assert await asyncio.to_thread(cli.main, [*argv, "--json"]) == 0
        [doc] = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if '"queues"' in ln]
        verdict: dict[str, str] = doc["verdict"]
        return verdict

    assert await status() == {
        "state": "ready",
        "message": "ready: 1 consumer on the inbox, no dead letters",
    }
    assert worker.consumer is not None
    await requester.publish(b"\x00 not a container")  # undecodable: dead-lettered
    await worker.consumer.wait_for("dead_lettered")
    for _ in range(100):  # until the broker counts it into the DLQ's depth (bounded)
        if (found := await status())["state"] != "ready":
            break
        await asyncio.sleep(0.1)
    assert found == {
        "state": "dead-letters",
        "message": f"1 dead letter waiting: forge-worker dlq list --queue {settings.queue}",
    }
    assert await asyncio.to_thread(cli.main, argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"1 dead letter waiting: forge-worker dlq list --queue {settings.queue}"


async def test_a_replayed_old_registration_never_rolls_a_customer_back(
    worker_settings: Settings,
    queue_cleanup: QueueCleanup,
    requester: Requester,
    service: Signer,
    amqp: AbstractRobustConnection,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A /customer/add dead-lettered during a database outage (connections cut and refused
    through the fault proxy) and replayed after a newer registration of the same customer
    executed is answered ok and changes nothing: the newer state stays."""
    monkeypatch.setenv("FORGE_WORKER_AMQP_URL", worker_settings.amqp_url)
    customer = "did:plc:norollback00000000000001"
    port = urlsplit(database_url).port
    assert port is not None
    async with Proxy(port) as pg:
        settings = queue_cleanup.track(
            dataclasses.replace(
                worker_settings, database_url=pg.url(database_url), retry_delays=(1,)
            )
        )
        async with running(settings) as app:
            assert app.consumer is not None
            app.consumer.db_hold = 0.3  # give up on the database quickly: a dead letter
            reply_to = await requester.reply_queue()
            pg.refuse()
            pg.cut()
            old = invocation(service, service.did, customer=customer, product="did:web:old")
            await requester.publish(old, reply_to=reply_to, correlation_id="old")
            await app.consumer.wait_for("dead_lettered")
            pg.accept()
            new = invocation(service, service.did, customer=customer, product="did:web:new")
            await requester.publish(new, reply_to=reply_to, correlation_id="new")
            assert (await requester.next(reply_to)).correlation_id == "new"

            code = await asyncio.to_thread(
                cli.main,
                ["dlq", "replay", "--all", "--json", "--database-url", database_url,
                 "--queue", settings.queue],
            )  # fmt: skip
            assert code == 0
            capsys.readouterr()
            response = await requester.next(reply_to)
            assert response.correlation_id == "old"
            [receipt] = receipts_of(response.body)
            assert receipt.ok == {}, receipt.error  # registered: with newer details
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT product FROM public.customer WHERE customer = $1", customer
        )
        arrivals = await conn.fetchval("SELECT count(*) FROM forge_worker.arrivals")
    finally:
        await conn.close()
    assert row is not None and row["product"] == "did:web:new"
    assert arrivals == 1  # the old registration's first arrival, recorded when it was retried
