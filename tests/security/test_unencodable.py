"""Properties and headers the worker cannot write back (real RabbitMQ and Postgres).

A publisher's bytes that are not UTF-8 are read as U+FFFD (three bytes each), so a short
string property of 90 such bytes comes back as 270 bytes: too long for AMQP when the worker
copies it into a response or a retry or dead-letter copy. A header table of 1-byte values
can re-encode larger than it arrived, past the connection's frame size. Before the fix, the
write raised outside the per-message handling: the batch was never settled, the acks stopped
at its delivery tag, the prefetch window filled, and the worker stopped for everyone (the
issue measured 198 of 500 requests answered, then nothing). Now each such message fails
alone, as a dead letter whose unwritable parts are left out and kept inspectable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from tests.security.helpers import Collector, customer_did, inv
from tests.support.worker import QueueCleanup
from worker.amqp import topology
from worker.config import Settings
from worker.service.app import App, running
from worker.ucan import decode_request

pytestmark = pytest.mark.integration

PUBLISHER = Path(__file__).with_name("hostile_publisher.py")
#: behind the hostile message: more than the prefetch window, so a stuck ack window shows
FOLLOWERS = 40
PREFETCH = 10
#: 90 bytes 0xFF: read as 90 U+FFFD, 270 bytes in UTF-8
BAD = "ff*90"
#: the short-string properties a publisher can set and the broker passes on (``user_id``
#: and ``expiration`` it checks itself, closing the publisher's channel)
PROPERTIES = (
    "correlation_id",
    "message_id",
    "reply_to",
    "content_type",
    "content_encoding",
    "message_type",
    "app_id",
    "cluster_id",
)
#: the ones the worker copies into a dead letter, by their names there
COPIED = {
    "correlation_id": "correlation_id",
    "message_id": "message_id",
    "reply_to": "reply_to",
    "content_type": "content_type",
    "content_encoding": "content_encoding",
    "message_type": "type",
    "app_id": "app_id",
}


@pytest.fixture(name="small_window")
async def _small_window(
    worker_settings: Settings, queue_cleanup: QueueCleanup, amqp: AbstractRobustConnection
) -> AsyncIterator[App]:
    settings = queue_cleanup.track(dataclasses.replace(worker_settings, prefetch=PREFETCH))
    async with running(settings) as app:
        yield app


async def publish_hostile(
    app: App, cases: str, body: bytes | None = None, tmp: Path | None = None
) -> None:
    args = [sys.executable, str(PUBLISHER), app.settings.amqp_url, app.settings.queue, cases]
    if body is not None:
        assert tmp is not None
        path = tmp / "body.bin"
        path.write_bytes(body)
        args.append(str(path))
    proc = await asyncio.create_subprocess_exec(*args)
    assert await proc.wait() == 0


def connection_of(app: App) -> Any:
    """The live AMQP connection under the worker's robust one (a reconnect replaces it)."""
    assert app.broker is not None and app.broker.connection.transport is not None
    return app.broker.connection.transport.connection


async def followers_answered(app: App, amqp: AbstractRobustConnection) -> list[str]:
    """Publish FOLLOWERS valid requests and wait for every response; their outcomes."""
    assert app.key is not None
    service = app.key.signer
    ch = await amqp.channel()
    replies = await ch.declare_queue(exclusive=True, auto_delete=True)
    collector = Collector()
    await collector.consume(ch, replies.name)
    exp = int(time.time()) + 300
    for i in range(FOLLOWERS):
        body = inv(service, service.did, exp=exp)
        msg = aio_pika.Message(body, reply_to=replies.name, correlation_id=f"f{i}")
        await ch.default_exchange.publish(msg, app.settings.queue)
    await collector.until({replies.name: FOLLOWERS}, 20)
    outcomes = []
    for got in collector.got[replies.name]:
        (receipt,) = decode_request(got.body).receipts
        outcomes.append("ok" if receipt.error is None else str(receipt.error["name"]))
    await ch.close()
    return outcomes


async def dead_letter(app: App, amqp: AbstractRobustConnection) -> AbstractIncomingMessage:
    assert app.consumer is not None
    async with asyncio.timeout(20):
        await app.consumer.wait_for("dead_lettered", 1)
    ch = await amqp.channel()
    collector = Collector()
    dlq = topology.dead_letter_name(app.settings.queue)
    await collector.consume(ch, dlq)
    await collector.until({dlq: 1}, 20)
    await ch.close()
    return collector.got[dlq][0]


@pytest.mark.parametrize("prop", PROPERTIES)
async def test_a_property_that_cannot_be_written_back_fails_alone(
    small_window: App, amqp: AbstractRobustConnection, prop: str
) -> None:
    """Every short-string property: 90 bytes that are not UTF-8, on an undecodable body
    (it must be copied to the dead-letter queue). The requests behind it, four times the
    prefetch window, are all answered on the same connection."""
    app = small_window
    before = connection_of(app)
    await publish_hostile(app, f"prop:{prop}={BAD}")
    assert await followers_answered(app, amqp) == ["ok"] * FOLLOWERS
    dead = await dead_letter(app, amqp)
    headers = dead.headers or {}
    if prop in COPIED:
        name = COPIED[prop]
        original = headers[topology.H_ORIGINAL_PROPERTIES]
        assert isinstance(original, dict) and original[name] == "\ufffd" * 90
        # left out of the copy's properties (a message id is then a fresh random one)
        assert getattr(dead, name) != original[name]
        assert name == "message_id" or getattr(dead, name) is None
    assert headers[topology.H_REASON] in ("unencodable", "undecodable")
    assert dead.body == b"\xa1junk"  # the body is kept: inspectable and replayable
    assert connection_of(app) is before  # never disconnected
    assert app.consumer is not None and app.consumer.outcomes["retried"] == 0
    assert app.consumer.stalled_for() == 0.0


@pytest.mark.parametrize("prop", ["correlation_id", "reply_to"])
async def test_a_request_that_could_not_be_answered_is_not_executed(
    small_window: App, amqp: AbstractRobustConnection, tmp_path: Path, prop: str
) -> None:
    """A valid invocation whose response could not carry its correlation id or be routed
    to its reply_to is refused before anything is written: a dead letter that says why."""
    app = small_window
    assert app.key is not None and app.pool is not None
    service = app.key.signer
    customer = customer_did()
    body = inv(service, service.did, customer=customer, exp=int(time.time()) + 300)
    await publish_hostile(app, f"prop:{prop}={BAD}", body, tmp_path)
    dead = await dead_letter(app, amqp)
    headers = dead.headers or {}
    assert headers[topology.H_REASON] == "unencodable"
    assert "more than AMQP's 255" in str(headers[topology.H_ERROR])
    assert dead.body == body
    async with app.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM customer") == 0
        assert await conn.fetchval("SELECT count(*) FROM forge_worker.receipts") == 0
    assert await followers_answered(app, amqp) == ["ok"] * FOLLOWERS


async def test_a_property_only_copies_carry_does_not_stop_an_answer(
    small_window: App, amqp: AbstractRobustConnection, tmp_path: Path
) -> None:
    """``type`` is not part of a response: the request is answered as any other."""
    app = small_window
    assert app.key is not None and app.consumer is not None
    service = app.key.signer
    ch = await amqp.channel()
    replies = await ch.declare_queue(exclusive=True, auto_delete=True)
    collector = Collector()
    await collector.consume(ch, replies.name)
    body = inv(service, service.did, exp=int(time.time()) + 300)
    await publish_hostile(
        app, f"prop:message_type={BAD},prop:reply_to={replies.name}", body, tmp_path
    )
    await collector.until({replies.name: 1}, 20)
    (receipt,) = decode_request(collector.got[replies.name][0].body).receipts
    assert receipt.error is None
    assert app.consumer.outcomes["dead_lettered"] == 0
    await ch.close()


@pytest.mark.parametrize("case", ["header-grow=60000", "header-double"])
async def test_headers_that_cannot_be_written_back_are_left_out_of_the_dead_letter(
    small_window: App, amqp: AbstractRobustConnection, case: str
) -> None:
    """60,000 unsigned bytes (120 KB, within the frame) re-encode as 180 KB, past the
    connection's 128 KiB frame size: sent, it would close the worker's whole connection.
    A double of 1e300 re-encodes as a 4-byte float, which cannot hold it."""
    app = small_window
    before = connection_of(app)
    await publish_hostile(app, case)
    dead = await dead_letter(app, amqp)
    headers = dead.headers or {}
    assert "grow" not in headers and "double" not in headers
    assert "publisher headers left out" in str(headers[topology.H_DROPPED_HEADERS])
    assert headers[topology.H_REASON] == "undecodable"
    assert await followers_answered(app, amqp) == ["ok"] * FOLLOWERS
    assert connection_of(app) is before
