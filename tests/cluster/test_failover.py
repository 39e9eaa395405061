"""worker.amqp.failover on the real cluster: the robust connection over ``node1,node2,node3``
moves to the next node when its node crashes or stalls, and aio-pika restores its channel,
QoS, queue and consumer there; with the first node down it starts on the second."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, MutableMapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from structlog.testing import capture_logs

from tests.cluster.conftest import (
    QUORUM,
    TIMINGS,
    Cluster,
    confirming_channel,
    connected,
    publish,
)
from worker.amqp.failover import (
    FailoverConnection,
    connect_any,
    connect_failover,
    node_of,
    redact,
)

pytestmark = pytest.mark.cluster

PREFETCH = 7


def urls(cluster: Cluster, order: Sequence[int] = (1, 2, 3)) -> list[str]:
    return [cluster.url(n) for n in order]


class Consumer:
    """A robust channel of a failover connection consuming ``queue`` (aio-pika's own
    ``RobustQueue.consume``), and the connection's reconnects as an event."""

    def __init__(self, connection: FailoverConnection) -> None:
        self.connection = connection
        self.received: asyncio.Queue[bytes] = asyncio.Queue()
        #: when each message arrived (monotonic)
        self.arrivals: list[float] = []
        self.reconnected = asyncio.Event()
        self.tag = ""
        connection.reconnect_callbacks.add(lambda *_: self.reconnected.set())

    async def start(self, queue: str) -> None:
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        q = await channel.declare_queue(queue, durable=True, arguments=QUORUM)
        self.tag = await q.consume(self._on_message)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        self.arrivals.append(time.monotonic())
        await self.received.put(message.body)

    async def next(self, within: float = 15) -> bytes:
        async with asyncio.timeout(within):
            return await self.received.get()


@asynccontextmanager
async def failover(
    cluster: Cluster, order: Sequence[int], **kwargs: Any
) -> AsyncIterator[FailoverConnection]:
    conn = await connect_failover(urls(cluster, order), **kwargs)
    try:
        yield conn
    finally:
        await conn.close()


async def channels_to(cluster: Cluster, n: int) -> list[dict[str, Any]]:
    """The channels of the connections to node ``n`` (named ``client -> node (number)``)."""
    rows = await cluster.ctl_json(n, "list_channels", "name", "consumer_count", "prefetch_count")
    return [dict(r) for r in rows if f" -> {node_of(cluster.url(n))} " in r["name"]]


def events(logs: Sequence[MutableMapping[str, Any]], *names: str) -> list[tuple[str, str]]:
    return [(e["event"], e["node"]) for e in logs if e["event"] in names]


async def test_a_crashed_node_is_left_for_the_next_and_the_consumer_resumes(
    cluster: Cluster, queue: str
) -> None:
    # the queue's leader on node 2: node 1's crash takes the connection, not the queue
    async with connected(2) as two:
        await (await two.channel()).declare_queue(queue, durable=True, arguments=QUORUM)
    with capture_logs() as logs:
        async with failover(cluster, (1, 2, 3)) as conn, connected(3) as three:
            assert conn.node == node_of(cluster.url(1))
            consumer = Consumer(conn)
            await consumer.start(queue)
            publisher = await confirming_channel(three)
            await publish(publisher, queue, b"before")
            assert await consumer.next() == b"before"

            began = time.monotonic()
            await cluster.run("kill", "1")
            async with asyncio.timeout(15):
                await consumer.reconnected.wait()
            took = time.monotonic() - began
            # the node after the one that failed
            assert conn.node == node_of(cluster.url(2))

            await publish(publisher, queue, b"after")
            assert await consumer.next() == b"after"
            # aio-pika restored the channel, its QoS and the consumer, on node 2
            [channel] = await channels_to(cluster, 2)  # (ours: nothing else is on node 2)
            assert channel["prefetch_count"] == PREFETCH and channel["consumer_count"] == 1

    assert events(logs, "broker_connected", "broker_connection_lost") == [
        ("broker_connected", node_of(cluster.url(1))),
        ("broker_connection_lost", node_of(cluster.url(1))),
        ("broker_connected", node_of(cluster.url(2))),
    ]
    assert [e.get("reconnected") for e in logs if e["event"] == "broker_connected"] == [
        False,
        True,
    ]
    assert "guest:guest" not in repr(logs)
    assert all(e["url"] == redact(e["url"]) for e in logs if "url" in e)
    TIMINGS.append(
        f"failover connection, its node SIGKILLed: reconnected to the next node {took:.2f} s "
        "after the kill command began"
    )
    assert took < 10


async def test_with_the_first_node_down_it_starts_on_the_second(
    cluster: Cluster, queue: str
) -> None:
    await cluster.run("kill", "1")
    with capture_logs() as logs:
        async with failover(cluster, (1, 2, 3)) as conn:
            assert conn.node == node_of(cluster.url(2))
            channel = await conn.channel()
            await channel.declare_queue(queue, durable=True, arguments=QUORUM)
        one_shot = await connect_any(",".join(urls(cluster)))
        try:
            assert isinstance(one_shot, aio_pika.Connection)
            assert node_of(one_shot.url) == node_of(cluster.url(2))
        finally:
            await one_shot.close()
    node1, node2 = node_of(cluster.url(1)), node_of(cluster.url(2))
    assert events(logs, "broker_connected", "broker_connect_failed") == [
        ("broker_connect_failed", node1),
        ("broker_connected", node2),
        ("broker_connect_failed", node1),
        ("broker_connected", node2),
    ]
    assert "guest:guest" not in repr(logs)


async def test_a_stalled_node_is_left_after_missed_heartbeats(cluster: Cluster, queue: str) -> None:
    """A paused VM keeps its sockets open: only the heartbeat shows it gone (with a 1 s
    heartbeat aiormq gives up after (1 + 1) * 3 s). The cluster, though, still counts the
    stalled node's consumer (until net_ticktime declares the node down): the queue's leader
    goes on handing it messages, up to its prefetch, which wait there until the node resumes
    (then they come back to the queue and to the new consumer: late, not lost)."""
    # the queue's leader on node 3, the connection on node 2 (then the next: node 3)
    async with connected(3) as three:
        await (await three.channel()).declare_queue(queue, durable=True, arguments=QUORUM)
    bodies = [f"s{i}".encode() for i in range(PREFETCH + 3)]
    async with failover(cluster, (2, 3, 1), heartbeat=1) as conn, connected(1) as one:
        consumer = Consumer(conn)
        await consumer.start(queue)
        publisher = await confirming_channel(one)
        await cluster.run("pause", "2")
        try:
            began = time.monotonic()
            async with asyncio.timeout(30):
                await consumer.reconnected.wait()
            took = time.monotonic() - began
            assert conn.node == node_of(cluster.url(3))
            await asyncio.gather(*(publish(publisher, queue, body) for body in bodies))
            # the new consumer gets at least what the stale one has no room for
            early = [await consumer.next() for _ in range(len(bodies) - PREFETCH)]
        finally:
            resumed = time.monotonic()
            await cluster.run("resume", "2")
        # the stalled node, resumed, finds its client gone and gives back what it held
        late = [await consumer.next(within=30) for _ in range(len(bodies) - len(early))]
    assert sorted(early + late) == sorted(bodies)
    parked = sum(1 for t in consumer.arrivals if t > resumed)
    TIMINGS.append(
        f"failover connection, its node paused (heartbeat 1 s): reconnected to the next node "
        f"{took:.2f} s after the pause; {parked} of {len(bodies)} messages published after "
        "the reconnect waited on the stalled node's stale consumer until it resumed"
    )
    assert took < 15
