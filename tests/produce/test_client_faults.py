"""Why the client's reply queue is durable: receipts survive a lost connection and a restart;
and how a client on direct reply-to recovers from the same loss by publishing again.

Direct reply-to would lose a receipt published while the client is disconnected; the durable
``<queue>.replies.<client_id>`` keeps it until the client (or its successor with the same
``client_id``) consumes again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import pytest

from tests.support.proxy import Proxy
from worker.amqp.topology import inbox_arguments
from worker.client import Client, CustomerAdd, reply_queue_name
from worker.config import Secret, Settings
from worker.service.app import running
from worker.ucan import Signer

pytestmark = pytest.mark.integration

PRODUCT = "did:web:hilt.example"


@pytest.fixture(name="settings")
async def _settings(
    amqp_url: str,
    database_url: str,
    queue_name: str,
    amqp: aio_pika.abc.AbstractRobustConnection,
) -> AsyncIterator[Settings]:
    """A worker's settings; its inbox exists before the worker runs, so publishes route."""
    ch = await amqp.channel()
    await ch.declare_queue(queue_name, durable=True, arguments=inbox_arguments(queue_name))
    await ch.close()
    yield Settings(
        amqp_url=amqp_url,
        database_url=database_url,
        service_key=Secret(Signer.generate().export()),
        queue=queue_name,
        receipt_queue=f"{queue_name}.receipts",
        http_port=0,
        log_format="json",
    )


async def _until_depth(
    amqp: aio_pika.abc.AbstractRobustConnection, queue: str, depth: int, within: float = 20
) -> None:
    """Wait until ``queue`` holds ``depth`` ready messages.

    The broker sends no event when a message lands in a queue nobody consumes, and
    consuming it here would take it from the client under test, so this polls the depth.
    """
    ch = await amqp.channel()
    try:
        async with asyncio.timeout(within):
            underlay = await ch.get_underlay_channel()
            while True:
                declared = await underlay.queue_declare(queue, passive=True)
                if declared.message_count == depth:
                    return
                await asyncio.sleep(0.05)
    finally:
        await ch.close()


async def test_receipt_published_while_disconnected_arrives_after_reconnect(
    settings: Settings, amqp: aio_pika.abc.AbstractRobustConnection
) -> None:
    service = Signer.parse(str(settings.service_key))
    async with Proxy(5672) as broker:
        url = broker.url(settings.amqp_url) + "?reconnect_interval=0.2"
        async with Client(
            url, signer=service, service_did=service.did, queue=settings.queue, client_id="cut"
        ) as client:
            request = client.build(CustomerAdd("did:plc:offline", PRODUCT))
            await client.publish(request)
            broker.refuse()
            assert broker.cut() == 1
            # the worker answers while the client is away: the receipt waits in its queue
            async with running(settings):
                await _until_depth(amqp, client.reply_queue, 1)
            waiting = asyncio.create_task(client.wait(request, timeout=20))
            broker.accept()
            outcome = await waiting
            assert outcome.task == request.task and outcome.ok == {}
            assert broker.stats.connections == 2  # it did reconnect
            await client.delete_reply_queue()


async def test_a_restarted_producer_collects_its_receipt(
    settings: Settings, amqp: aio_pika.abc.AbstractRobustConnection
) -> None:
    service = Signer.parse(str(settings.service_key))
    kw = {"signer": service, "service_did": service.did, "queue": settings.queue}
    async with Client(settings.amqp_url, client_id="hilt-1", **kw) as first:  # type: ignore[arg-type]
        request = first.build(CustomerAdd("did:plc:restart", PRODUCT))
        await first.publish(request)
    async with running(settings):
        await _until_depth(amqp, reply_queue_name(settings.queue, "hilt-1"), 1)
    # a new process with the same client_id: the reply is delivered as soon as it consumes,
    # before anyone waits, and is kept for wait()
    async with Client(settings.amqp_url, client_id="hilt-1", **kw) as second:  # type: ignore[arg-type]
        outcome = await second.wait(request, timeout=20)
        assert outcome.task == request.task
        await second.delete_reply_queue()


async def test_with_direct_reply_to_a_request_is_sent_again_after_a_reconnect(
    settings: Settings, amqp: aio_pika.abc.AbstractRobustConnection
) -> None:
    """Direct reply-to is at most once: the worker answers while the client is away and the
    receipt is dropped. After the reconnect the client publishes the request again (the
    same bytes), the worker answers it from the ledger, and call() returns."""
    service = Signer.parse(str(settings.service_key))
    async with Proxy(5672) as broker:
        url = broker.url(settings.amqp_url) + "?reconnect_interval=0.2"
        async with Client(
            url, signer=service, service_did=service.did, queue=settings.queue, reply="direct"
        ) as client:
            request = client.build(CustomerAdd("did:plc:directcut", PRODUCT))
            calling = asyncio.create_task(client.call(request, timeout=30))
            await _until_depth(amqp, settings.queue, 1)  # published, not yet answered
            broker.refuse()
            assert broker.cut() == 1
            async with running(settings) as app:
                assert app.consumer is not None
                await asyncio.wait_for(app.consumer.wait_for("ok"), 20)  # answered: lost
                broker.accept()
                outcome = await asyncio.wait_for(calling, 20)
                assert outcome.task == request.task and outcome.ok == {}
                # the resend was answered from the ledger, not executed again
                assert app.consumer.outcomes["duplicate"] == 1
            assert broker.stats.connections == 2
