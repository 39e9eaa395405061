"""An in-process worker on the test's own queues and database, and a requester that talks to it.

Fixtures (all function-scoped, isolated through ``queue_name`` and ``database_url``):

``service``            the worker's identity: a fresh :class:`worker.ucan.Signer`
``agent``              a second identity (plays Hilt), delegated ``/customer/add`` by ``service``
``worker_settings``    :class:`Settings` for this test: its inbox ``queue_name``, receipts to
                       ``<queue_name>.receipts``, its own database, the ``service`` key, HTTP
                       off, retry tiers of 1 s and 2 s, a 10 s drain
``worker``             a running worker (:class:`worker.service.app.App`) on ``worker_settings``;
                       stopped (drained) after the test. ``worker.metrics``, ``worker.health``,
                       ``worker.pool`` and ``worker.broker`` are live.
``requester``          :class:`Requester`: publish requests, await responses

For other settings, start one yourself::

    async with worker.app.running(dataclasses.replace(worker_settings, prefetch=1)) as app:
        ...
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from tests.support.harness import FaultRig
from worker.config import Secret, Settings
from worker.service.app import App, running
from worker.service.broker import queue_declarations
from worker.ucan import (
    CID,
    CUSTOMER_ADD,
    Invocation,
    Receipt,
    Signer,
    customer_add_args,
    decode_request,
    decode_token,
    encode_container,
    encode_delegation,
    encode_invocation,
)

#: seconds a test waits for a response before failing
REPLY_TIMEOUT = 15.0


@pytest.fixture
def service() -> Signer:
    return Signer.generate()


@pytest.fixture
def agent() -> Signer:
    return Signer.generate()


class QueueCleanup:
    """Deletes, after the test, every queue a worker on the tracked settings declares
    (the shared ``amqp`` fixture knows only the default retry tiers)."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def track(self, settings: Settings) -> Settings:
        self.names.update(name for name, _ in queue_declarations(settings))
        return settings


@pytest.fixture
async def queue_cleanup(amqp_url: str) -> AsyncIterator[QueueCleanup]:
    cleanup = QueueCleanup()
    yield cleanup
    conn = await aio_pika.connect(amqp_url)
    try:
        for name in sorted(cleanup.names):
            ch = await conn.channel()
            try:
                await ch.queue_delete(name)
            except Exception:  # never declared, or gone already
                pass
            finally:
                if not ch.is_closed:
                    await ch.close()
    finally:
        await conn.close()


@pytest.fixture
def worker_settings(
    amqp_url: str,
    database_url: str,
    queue_name: str,
    service: Signer,
    queue_cleanup: QueueCleanup,
) -> Settings:
    """Settings of this test's worker (its queues are deleted after the test); for other
    settings use ``queue_cleanup.track(dataclasses.replace(worker_settings, ...))``."""
    return queue_cleanup.track(
        Settings(
            amqp_url=amqp_url,
            database_url=database_url,
            service_key=Secret(service.export()),
            queue=queue_name,
            receipt_queue=f"{queue_name}.receipts",
            http_port=0,
            log_format="json",
            retry_delays=(1, 2),
            shutdown_timeout=10,
        )
    )


@pytest.fixture
async def worker(worker_settings: Settings, amqp: AbstractRobustConnection) -> AsyncIterator[App]:
    # depends on ``amqp`` so that its clean-up (deleting the test's queues) runs after this stops
    async with running(worker_settings) as app:
        yield app


def cid_of(raw: bytes) -> CID:
    """The CID of a token given as bytes."""
    return decode_token(raw).cid


def task_of(raw: bytes) -> CID:
    """The task CID of an invocation given as bytes."""
    tok = decode_token(raw)
    assert isinstance(tok, Invocation)
    return tok.task_cid


def delegation(
    service: Signer,
    agent: Signer,
    *,
    cmd: str = CUSTOMER_ADD,
    pol: Iterable[Any] = (),
    exp: int | None = None,
) -> bytes:
    """``service`` delegates ``cmd`` on itself to ``agent``."""
    return encode_delegation(service, aud=agent.did, sub=service.did, cmd=cmd, pol=pol, exp=exp)


def invocation(
    issuer: Signer,
    service_did: str,
    *,
    customer: str | None = None,
    product: str = "did:web:hilt.fil-forge.com",
    details: Mapping[str, str] | None = None,
    external_account: str | None = None,
    proofs: Iterable[bytes] = (),
    exp: int | None = None,
    sub: str | None = None,
    aud: str | None = "service",
    cmd: str = CUSTOMER_ADD,
    args_raw: bytes | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """A ``/customer/add`` invocation as Hilt builds it (aud = sub = service, exp in 5 min)."""
    args = args_raw or customer_add_args(
        customer or f"did:plc:{uuid.uuid4().hex[:24]}",
        product,
        {"external_id": "c-1", "region": "eu"} if details is None else details,
        external_account,
    )
    return encode_invocation(
        issuer,
        sub=sub or service_did,
        cmd=cmd,
        args_raw=args,
        aud=service_did if aud == "service" else aud,
        exp=int(time.time()) + 300 if exp is None else exp,
        nonce=nonce,
        prf=[cid_of(p) for p in proofs],
    )


class Requester:
    """Publishes requests to the test's inbox and awaits their responses."""

    def __init__(self, conn: AbstractRobustConnection, settings: Settings) -> None:
        self.conn = conn
        self.settings = settings
        self._queues: dict[str, asyncio.Queue[AbstractIncomingMessage]] = {}
        self._declared: dict[str, AbstractQueue] = {}
        self.channel: aio_pika.abc.AbstractChannel | None = None

    async def _ch(self) -> aio_pika.abc.AbstractChannel:
        if self.channel is None:
            self.channel = await self.conn.channel()
        return self.channel

    async def reply_queue(self) -> str:
        """A private (exclusive, auto-delete) queue for ``reply_to``, already consumed."""
        ch = await self._ch()
        q = await ch.declare_queue(exclusive=True, auto_delete=True)
        await self._listen(q)
        return q.name

    async def _listen(self, q: AbstractQueue) -> None:
        buf: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._queues[q.name] = buf

        async def on(msg: AbstractIncomingMessage) -> None:
            await msg.ack()
            buf.put_nowait(msg)

        await q.consume(on)
        self._declared[q.name] = q

    async def listen(self, name: str) -> None:
        """Consume an existing queue (e.g. the receipt queue or the DLQ) into a buffer."""
        if name in self._queues:
            return
        ch = await self._ch()
        q = await ch.declare_queue(name, passive=True)
        await self._listen(q)

    async def publish(
        self,
        body: bytes,
        *,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        message_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """Publish ``body`` to the inbox (confirmed); returns its message id."""
        ch = await self._ch()
        mid = message_id or uuid.uuid4().hex
        await ch.default_exchange.publish(
            aio_pika.Message(
                body,
                reply_to=reply_to,
                correlation_id=correlation_id,
                message_id=mid,
                headers=dict(headers or {}),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                timestamp=time.time(),
            ),
            self.settings.queue,
        )
        return mid

    async def next(self, queue: str, within: float = REPLY_TIMEOUT) -> AbstractIncomingMessage:
        """The next message consumed from ``queue`` (see :meth:`listen`), or fail."""
        await self.listen(queue)
        try:
            async with asyncio.timeout(within):
                return await self._queues[queue].get()
        except TimeoutError:
            pytest.fail(f"no message on {queue!r} within {within}s")

    def pending(self, queue: str) -> int:
        """Messages already received on ``queue`` and not taken with :meth:`next`."""
        return self._queues[queue].qsize() if queue in self._queues else 0

    async def call(
        self, body: bytes, *, within: float = REPLY_TIMEOUT, **kw: Any
    ) -> tuple[AbstractIncomingMessage, list[Receipt]]:
        """Publish with a fresh ``reply_to`` and return the response and its receipts."""
        reply_to = await self.reply_queue()
        await self.publish(body, reply_to=reply_to, **kw)
        msg = await self.next(reply_to, within)
        return msg, receipts_of(msg.body)


def receipts_of(body: bytes) -> list[Receipt]:
    """The receipts of a response container."""
    req = decode_request(body)
    return list(req.receipts)


def container(*tokens: bytes) -> bytes:
    return encode_container(tokens)


@pytest.fixture
async def requester(
    amqp: AbstractRobustConnection, worker_settings: Settings
) -> AsyncIterator[Requester]:
    r = Requester(amqp, worker_settings)
    yield r
    if r.channel is not None and not r.channel.is_closed:
        await r.channel.close()


@pytest.fixture(name="rig")
async def _rig(
    amqp_url: str, database_url: str, queue_name: str, tmp_path: Path
) -> AsyncIterator[FaultRig]:
    """Worker subprocesses behind loopback fault proxies (tests/support/harness.py), on the
    test's own queue and database."""
    async with FaultRig(
        amqp_url=amqp_url, database_url=database_url, queue=queue_name, log_dir=tmp_path
    ) as rig:
        yield rig
