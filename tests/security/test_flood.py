"""The worker under a flood of hostile messages mixed with valid ones (real RabbitMQ and
Postgres): every message ends answered (an empty container when nothing is for this service) or dead-lettered
with a reason; nothing is acked without an outcome; the worker keeps serving; bodies over
the size limit are refused before they are decoded."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
import tracemalloc
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection

from tests.security.helpers import Collector, customer_did, dlg, inv
from tests.support.replies import FORGED_DIRECT_REPLY, worker_links
from worker.amqp import topology
from worker.commands import customer_add
from worker.config import Settings
from worker.log import get_logger
from worker.service import store
from worker.service.app import App
from worker.service.broker import Broker
from worker.service.consumer import Consumer
from worker.service.metrics import Metrics
from worker.ucan import DecodeError, Signer, decode_request, encode_container

pytestmark = pytest.mark.integration

#: seconds the whole flood may take to settle
SETTLE_WITHIN = 60.0


async def depth(channel: aio_pika.abc.AbstractChannel, name: str) -> int:
    q = await channel.declare_queue(name, passive=True)
    return int(q.declaration_result.message_count or 0)


Sent = list[tuple[str, bytes, dict[str, Any]]]


def hostile_mix(
    service: Signer, hilt: Signer, mallory: Signer, root: bytes, forged: bytes, limit: int
) -> tuple[Sent, list[str]]:
    """About 270 messages, shuffled: (expected end, body, message properties), and the
    customers of the valid ones."""
    rng = random.Random(8)
    exp = int(time.time()) + 600
    # (kind, body, properties); kind decides the expected end
    sent: Sent = []
    valid_customers: list[str] = []

    def valid() -> bytes:
        c = customer_did()
        valid_customers.append(c)
        return encode_container([inv(hilt, service.did, [root], customer=c, exp=exp), root])

    for _ in range(60):
        sent.append(("answered", valid(), {}))
    for _ in range(10):
        sent.append(("answered", valid(), {"content_type": "text/plain; charset=latin-1"}))
    for _ in range(10):  # no reply_to, message_id, correlation_id: to the receipt queue
        sent.append(("receipt-queue", valid(), {"bare": True}))
    for i in range(10):  # large and hostile headers, including the worker's own
        headers = {
            "x-pad": "h" * 60_000,
            topology.H_ATTEMPT: 999 if i % 2 else "not a number",
            topology.H_FIRST_ARRIVAL: -1,
            "x-death": [{"count": 10**9}],
        }
        sent.append(("answered", valid(), {"headers": headers}))
    for _ in range(40):
        n = rng.randrange(0, 2000)
        body = bytes(rng.randrange(256) for _ in range(n))
        try:
            decode_request(body)
        except DecodeError:
            sent.append(("dead", body, {}))
    for _ in range(40):
        body = valid()
        valid_customers.pop()
        sent.append(("dead", body[: rng.randrange(1, len(body) - 1)], {}))
    for i in range(40):  # decodable but not authorized: signed error receipts
        if i % 2:
            body = encode_container([inv(mallory, service.did, [forged], exp=exp), forged])
        else:
            body = encode_container(
                [inv(hilt, service.did, [root], exp=int(time.time()) - 600), root]
            )
        sent.append(("refused", body, {}))
    for _ in range(5):
        sent.append(("dead", b"", {}))
    for _ in range(5):  # one byte over the limit
        sent.append(("dead", b"\xa1" + b"\x40" * limit, {}))
    for _ in range(5):  # addressed to someone else: answered with an empty container
        other = inv(hilt, service.did, [root], aud="did:web:elsewhere.example", exp=exp)
        sent.append(("skipped", encode_container([other, root]), {}))
    # an expired invocation claiming, in the worker's own headers, an early first arrival
    late = encode_container([inv(hilt, service.did, [root], exp=int(time.time()) - 600), root])
    headers = {topology.H_ATTEMPT: 1, topology.H_FIRST_ARRIVAL: int(time.time()) - 3600}
    sent.append(("refused", late, {"headers": headers}))
    rng.shuffle(sent)
    return sent, valid_customers


async def test_a_flood_of_hostile_messages(
    worker: App, amqp: AbstractRobustConnection, database_url: str, queue_name: str
) -> None:
    assert worker.key is not None and worker.consumer is not None
    service = worker.key.signer
    hilt, mallory = Signer.generate(), Signer.generate()
    root = dlg(service, hilt, sub=service.did)
    forged = dlg(mallory, mallory, sub=service.did)
    exp = int(time.time()) + 600
    limit = worker.settings.max_message_size

    ch = await amqp.channel()
    replies = await ch.declare_queue(exclusive=True, auto_delete=True)
    collector = Collector()
    dlq = topology.dead_letter_name(queue_name)
    await collector.consume(ch, replies.name)
    await collector.consume(ch, worker.settings.receipt_queue)
    await collector.consume(ch, dlq)

    sent, valid_customers = hostile_mix(service, hilt, mallory, root, forged, limit)

    expected = Counter(kind for kind, _, _ in sent)
    pub = await amqp.channel()  # publisher confirms: every message is in the inbox
    publishes = []
    for i, (_kind, body, props) in enumerate(sent):
        bare = props.pop("bare", False)
        msg = aio_pika.Message(
            body,
            reply_to=None if bare else replies.name,
            correlation_id=None if bare else f"m{i}",
            message_id=None if bare else uuid.uuid4().hex,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            **props,
        )
        publishes.append(pub.default_exchange.publish(msg, queue_name))
    await asyncio.gather(*publishes)

    answered = expected["answered"] + expected["refused"] + expected["skipped"]
    await collector.until(
        {
            replies.name: answered,
            worker.settings.receipt_queue: expected["receipt-queue"],
            dlq: expected["dead"],
        },
        SETTLE_WITHIN,
    )
    await worker.consumer.wait_for("skipped", expected["skipped"])
    assert worker.consumer.idle.is_set() or await _idle(worker)

    # nothing left anywhere, nothing extra, nothing retried
    assert await depth(ch, queue_name) == 0
    for name in topology.retry_names(queue_name, worker.settings.retry_delays):
        assert await depth(ch, name) == 0
    assert len(collector.got[replies.name]) == answered
    assert len(collector.got[worker.settings.receipt_queue]) == expected["receipt-queue"]
    assert len(collector.got[dlq]) == expected["dead"]
    outcomes = worker.consumer.outcomes
    assert outcomes["retried"] == 0
    assert outcomes["dead_lettered"] == expected["dead"]
    assert outcomes["skipped"] == expected["skipped"]
    assert outcomes["dead_lettered"] + len(collector.got[replies.name]) + len(
        collector.got[worker.settings.receipt_queue]
    ) == len(sent)

    # every dead letter says why; every answer is one receipt, refusals are errors
    for dead in collector.got[dlq]:
        assert (dead.headers or {}).get(topology.H_REASON) == "undecodable"
        assert (dead.headers or {}).get(topology.H_ERROR)
    kinds = {f"m{i}": kind for i, (kind, _, _) in enumerate(sent)}
    names: Counter[str] = Counter()
    for reply in collector.got[replies.name]:
        kind = kinds[str(reply.correlation_id)]
        if kind == "skipped":  # nothing for this service: an empty container, at once
            assert reply.body == encode_container([])
            continue
        (rcpt,) = decode_request(reply.body).receipts
        names[rcpt.error["name"] if rcpt.error else "ok"] += 1
        assert (rcpt.error is None) == (kind == "answered"), (kind, rcpt.error)
    assert names == {
        "ok": expected["answered"],
        "InvalidAudience": 20,
        "Expired": expected["refused"] - 20,
    }

    # the valid ones, and only they, were written
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT customer FROM public.customer")
    finally:
        await conn.close()
    assert sorted(r["customer"] for r in rows) == sorted(valid_customers)
    # and it still serves: a fresh request is answered
    await worker.consumer.wait_for("ok", expected["answered"] + expected["receipt-queue"])
    fresh = encode_container([inv(hilt, service.did, [root], exp=exp), root])
    await pub.default_exchange.publish(
        aio_pika.Message(fresh, reply_to=replies.name, correlation_id="fresh"), queue_name
    )
    await collector.until({replies.name: answered + 1}, 15)
    assert collector.got[replies.name][-1].correlation_id == "fresh"
    await ch.close()
    await pub.close()


async def _idle(worker: App) -> bool:
    assert worker.consumer is not None
    async with asyncio.timeout(10):
        await worker.consumer.idle.wait()
    return True


async def test_bodies_just_over_the_limit_are_refused_before_decoding(
    worker: App, amqp: AbstractRobustConnection, queue_name: str
) -> None:
    """A body one byte over the limit that would be costly to decode (a container of
    a million empty tokens: ~100 MB of objects and a reason per token) costs its own size."""
    assert worker.consumer is not None
    limit = worker.settings.max_message_size
    body = b"\xa1\x66ctn-v1\x9a" + (limit).to_bytes(4, "big") + b"\x40" * (limit - 12)
    assert len(body) == limit + 1
    ch = await amqp.channel()
    collector = Collector()
    dlq = topology.dead_letter_name(queue_name)
    await collector.consume(ch, dlq)
    tracemalloc.start()
    try:
        start = time.perf_counter()
        for n in range(1, 4):
            await ch.default_exchange.publish(aio_pika.Message(body), queue_name)
            await collector.until({dlq: n}, 15)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * limit, f"peak {peak} bytes"
    assert elapsed < 10
    for dead in collector.got[dlq]:
        assert "exceeds the limit" in str((dead.headers or {}).get(topology.H_ERROR))
    await ch.close()


async def test_a_message_that_breaks_validation_fails_alone(
    worker_settings: Settings,
    service: Signer,
    amqp: AbstractRobustConnection,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug hit by one invocation (here: the command's checks raise) must not fail the
    batch: its neighbours are answered at once, and it gets an error receipt."""
    poison = customer_did()
    real_prepare = customer_add.prepare

    def prepare(inv: Any, ctx: Any) -> Any:
        if inv.args.get("customer") == poison:
            raise RuntimeError("a bug on this input")
        return real_prepare(inv, ctx)

    monkeypatch.setattr(customer_add, "prepare", prepare)
    pool = await store.create_pool(worker_settings.database_url)
    async with pool.acquire() as conn:
        await store.migrate(conn)
    broker = await Broker.connect(worker_settings)
    try:
        await broker.declare_topology()
        consumer = Consumer(
            worker_settings, broker, pool, service, Metrics(), get_logger(test="poison")
        )
        ch = await amqp.channel()
        replies = await ch.declare_queue(exclusive=True, auto_delete=True)
        collector = Collector()
        await collector.consume(ch, replies.name)
        customers = [customer_did(), poison, customer_did()]
        for i, c in enumerate(customers):
            body = inv(service, service.did, customer=c, exp=int(time.time()) + 300)
            msg = aio_pika.Message(body, reply_to=replies.name, correlation_id=str(i))
            await ch.default_exchange.publish(msg, queue_name)
        assert broker.inbox is not None
        for _ in customers:  # one batch of three, deterministically
            got = await broker.inbox.get(no_ack=False, fail=True, timeout=5)
            assert got is not None
            consumer.deliver(got)
        batch = [consumer._buffer.popleft() for _ in customers]
        await consumer.process(batch)
        await collector.until({replies.name: 3}, 15)
        outcome = {}
        for reply in collector.got[replies.name]:
            (rcpt,) = decode_request(reply.body).receipts
            outcome[reply.correlation_id] = rcpt.error["name"] if rcpt.error else "ok"
        assert outcome == {"0": "ok", "1": "UnknownError", "2": "ok"}
        assert consumer.outcomes["retried"] == 0
        async with pool.acquire() as conn:
            rows = await conn.fetch("SELECT customer FROM public.customer")
        assert sorted(r["customer"] for r in rows) == sorted([customers[0], customers[2]])
        await ch.close()
    finally:
        await broker.close()
        await pool.close()


async def test_a_forged_reserved_reply_to_cannot_take_the_worker_down(
    worker: App, amqp: AbstractRobustConnection, amqp_url: str, queue_name: str
) -> None:
    """Names in the broker's ``amq.`` namespace are answered like any other (issue 21); a
    forged direct reply-to name, which makes RabbitMQ close the publisher's whole
    connection, closes only the worker's separate direct reply-to publisher: its request is
    acked (refused, nothing to retry), everyone else is answered, and the worker's consuming
    and publishing channels and connection are the same objects before and after."""
    assert worker.key is not None and worker.consumer is not None and worker.broker is not None
    service = worker.key.signer
    hilt = Signer.generate()
    root = dlg(service, hilt, sub=service.did)
    before = await worker_links(worker.broker)
    ch = await amqp.channel()
    replies = await ch.declare_queue(exclusive=True, auto_delete=True)
    plain = await aio_pika.connect(amqp_url)  # a server-named queue, as a plain client has it
    plain_channel = await plain.channel()
    server_named = await plain_channel.declare_queue("", exclusive=True)
    assert server_named.name.startswith("amq.gen-")
    collector = Collector()
    await collector.consume(plain_channel, server_named.name)
    dlq = topology.dead_letter_name(queue_name)
    for name in (replies.name, worker.settings.receipt_queue, dlq):
        await collector.consume(ch, name)
    exp = int(time.time()) + 300
    # a forged direct reply-to name, garbage after the prefix (dropped: at most once), a
    # server-named queue
    hostile = {5: FORGED_DIRECT_REPLY, 6: "amq.rabbitmq.reply-to.x", 7: server_named.name}
    for i in range(30):
        body = encode_container([inv(hilt, service.did, [root], exp=exp), root])
        if i == 8:
            body = b"\xa1garbage"  # undecodable, with a forged reply_to: dead-lettered
        reply_to = FORGED_DIRECT_REPLY if i == 8 else hostile.get(i, replies.name)
        msg = aio_pika.Message(body, reply_to=reply_to, correlation_id=str(i))
        await ch.default_exchange.publish(msg, queue_name)
    # 26 answered as asked, 1 on the server-named queue, 2 unanswerable, 1 dead-lettered
    await collector.until({replies.name: 26, server_named.name: 1, dlq: 1}, 20)
    await worker.consumer.wait_for("ok", 29)
    assert not collector.got[worker.settings.receipt_queue]
    assert worker.consumer.outcomes["retried"] == 0
    assert worker.broker.direct.refused == 1
    assert worker.broker.connected and await worker_links(worker.broker) == before
    await plain.close()
    await ch.close()


async def test_a_deeply_nested_header_cannot_take_the_worker_down(
    worker: App, amqp: AbstractRobustConnection, queue_name: str
) -> None:
    """AMQP header tables nest; one frame holds ~20,000 levels. The AMQP library decodes
    them recursively, in the connection's reader: a RecursionError there dropped the
    connection, the message came back, and the worker was down until the delivery limit."""
    assert worker.key is not None and worker.consumer is not None
    service = worker.key.signer
    deep: dict[str, Any] = {"x": 1}
    for _ in range(6_000):  # far past the default recursion limit; decoding is quadratic
        deep = {"n": deep}
    ch = await amqp.channel()
    replies = await ch.declare_queue(exclusive=True, auto_delete=True)
    collector = Collector()
    dlq = topology.dead_letter_name(queue_name)
    for name in (replies.name, dlq):
        await collector.consume(ch, name)
    valid = inv(service, service.did, exp=int(time.time()) + 300)
    for body in (b"\xa1garbage", valid):
        msg = aio_pika.Message(body, headers={"deep": deep}, reply_to=replies.name)
        await ch.default_exchange.publish(msg, queue_name)
    await collector.until({replies.name: 1, dlq: 1}, 20)
    assert worker.consumer.outcomes["retried"] == 0
    assert worker.broker is not None and worker.broker.connected
    # the operator's tools can still read the dead-letter queue
    await ch.close()  # stops collecting the dead-letter queue
    ch = await amqp.channel()
    await ch.default_exchange.publish(
        aio_pika.Message(b"\xa1junk", headers={"deep": deep}), queue_name
    )
    await worker.consumer.wait_for("dead_lettered", 2)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FORGE_WORKER_")},
        "FORGE_WORKER_AMQP_URL": worker.settings.amqp_url,
        "FORGE_WORKER_DATABASE_URL": worker.settings.database_url,
        "FORGE_WORKER_QUEUE": queue_name,
    }
    exe = Path(sys.executable).parent / "forge-worker"
    proc = await asyncio.create_subprocess_exec(
        str(exe), "dlq", "list", "--json", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-1000:]
    assert json.loads(out)["count"] == 1
    await ch.close()


@pytest.mark.parametrize(
    "case", ["header-timestamp", "property-timestamp", "header-key", "property-string"]
)
async def test_headers_the_amqp_library_cannot_read_do_not_take_the_worker_down(
    worker: App, amqp: AbstractRobustConnection, queue_name: str, case: str
) -> None:
    """A timestamp past year 9999 or a name that is not UTF-8 made the AMQP library's
    decoder raise in the connection's reader: the connection dropped, the message came back,
    and the worker was down (reconnecting every 5 s) until the broker's delivery limit."""
    assert worker.key is not None and worker.consumer is not None
    publisher = Path(__file__).with_name("hostile_publisher.py")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(publisher), worker.settings.amqp_url, queue_name, case
    )
    assert await proc.wait() == 0
    async with asyncio.timeout(10):
        await worker.consumer.wait_for("dead_lettered", 1)
    # and the worker answers the next request at once
    service = worker.key.signer
    ch = await amqp.channel()
    replies = await ch.declare_queue(exclusive=True, auto_delete=True)
    collector = Collector()
    await collector.consume(ch, replies.name)
    body = inv(service, service.did, exp=int(time.time()) + 300)
    await ch.default_exchange.publish(aio_pika.Message(body, reply_to=replies.name), queue_name)
    await collector.until({replies.name: 1}, 10)
    assert worker.consumer.outcomes["retried"] == 0
    await ch.close()


def test_settling_on_a_dropped_channel_does_not_crash_the_batch() -> None:
    """After a connection loss a batch can hold deliveries of the dead channel and the new
    one; settling the dead channel's raised KeyError, and the live channel's deliveries in
    the same batch were never acked (their prefetch slots lost until a restart)."""
    from worker.service.acks import AckTracker

    acks = AckTracker()
    dead, live = object(), object()
    acks.received(dead, 1)
    acks.received(live, 1)
    acks.drop_channel(dead)  # its ack failed: the broker requeues what it held
    assert acks.done(dead, [1]) == 1  # the ack is attempted (and fails, harmlessly)
    assert acks.done(live, [1]) == 1
    assert acks.unsettled() == 0
