"""scripts/cluster: three clustered nodes beside the default one, quorum queues replicated on
all three, a crashed leader replaced without losing a confirmed message, a node that comes
back with its data, and a stalled node."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import aio_pika
import pytest

from tests.cluster.conftest import (
    BASE,
    PREFIX,
    QUORUM,
    TIMINGS,
    Cluster,
    confirming_channel,
    connected,
    drain,
    publish,
    run_command,
)

pytestmark = pytest.mark.cluster


async def test_three_nodes_run_clustered_beside_the_untouched_default_node(
    cluster: Cluster, amqp_url: str
) -> None:
    code, out = await cluster.run("status")
    assert code == 0, out
    names = [cluster.name(n) for n in cluster.nodes]
    for name in names:
        assert f"{name}: running (pid " in out
    assert f"running nodes (seen by {names[0]}): {' '.join(names)}" in out

    # each node sees all three running; each answers AMQP as the cluster
    for n in cluster.nodes:
        status = await cluster.ctl_json(n, "cluster_status")
        assert sorted(status["running_nodes"]) == names
        assert sorted(status["disk_nodes"]) == names
        async with connected(n) as conn:
            assert conn.transport is not None
            props = conn.transport.connection.server_properties
            assert props["cluster_name"] == "forge-worker-cluster"

    # the default node is alone in its own cluster, as before
    code, out, err = await run_command("rabbitmqctl", "cluster_status", "--formatter", "json")
    assert code == 0, err
    running = json.loads(out)["running_nodes"]
    assert len(running) == 1 and not set(running) & set(names), running
    conn = await aio_pika.connect(amqp_url, timeout=10)
    try:
        assert conn.transport is not None
        assert conn.transport.connection.server_properties["cluster_name"] != "forge-worker-cluster"
    finally:
        await conn.close()


async def test_a_quorum_queue_declared_through_node_1_has_three_members_and_is_consumed_through_node_2(
    cluster: Cluster, queue: str
) -> None:
    names = sorted(cluster.name(n) for n in cluster.nodes)
    bodies = [f"m{i}".encode() for i in range(50)]
    async with connected(1) as one:
        channel = await confirming_channel(one)
        await channel.declare_queue(queue, durable=True, arguments=QUORUM)
        info = await cluster.queue_info(queue, via=2)
        assert sorted(info["members"]) == names
        assert sorted(info["online"]) == names
        await asyncio.gather(*(publish(channel, queue, body) for body in bodies))
    async with connected(2) as two:
        assert await drain(two, queue, len(bodies)) == bodies


async def test_a_killed_leader_is_replaced_and_its_node_comes_back_with_nothing_lost(
    cluster: Cluster, queue: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL the node leading a quorum queue while a publisher keeps publishing with
    confirms through another node: the queue elects a new leader, the publisher goes on, and
    after ``start-node`` every confirmed message is there. A queue declared while the node
    was down has a member on it all the same, which catches up once it is back."""
    async with connected(1) as one:
        await (await one.channel()).declare_queue(queue, durable=True, arguments=QUORUM)
    leader = cluster.index_of((await cluster.queue_info(queue))["leader"])
    survivor, other = [n for n in cluster.nodes if n != leader]

    confirmed: list[bytes] = []
    unconfirmed: list[bytes] = []
    confirmed_at: list[float] = []
    publishing = asyncio.Event()
    killed = asyncio.Event()
    done_after_kill = asyncio.Event()

    async with connected(survivor) as conn:
        channel = await confirming_channel(conn)
        for i in range(20):
            await publish(channel, queue, f"before-{i}".encode())
            confirmed.append(f"before-{i}".encode())

        async def keep_publishing() -> None:
            nonlocal channel
            i = 0
            while not done_after_kill.is_set():
                body = f"during-{i}".encode()
                i += 1
                try:
                    await publish(channel, queue, body, confirm_within=5)
                except (TimeoutError, aio_pika.exceptions.AMQPError):
                    unconfirmed.append(body)
                    if channel.is_closed:
                        channel = await confirming_channel(conn)
                    continue
                confirmed.append(body)
                confirmed_at.append(time.monotonic())
                if len(confirmed_at) == 10:
                    publishing.set()
                if killed.is_set():
                    done_after_kill.set()

        publisher = asyncio.create_task(keep_publishing())
        async with asyncio.timeout(10):
            await publishing.wait()  # under way, and confirming, before the kill
        began = time.monotonic()
        await cluster.run("kill", str(leader))
        kill_returned = time.monotonic()
        killed.set()
        async with asyncio.timeout(60):
            await publisher
        gaps = [b - a for a, b in itertools.pairwise(confirmed_at)]
        stall = max(gaps)

        info = await cluster.queue_info(queue, via=survivor)
        assert info["leader"] != cluster.name(leader)
        assert cluster.name(leader) in info["members"]
        assert cluster.name(leader) not in info["online"]

        # declared while the node is down: three members all the same, one offline
        late = f"{queue}.late"
        await channel.declare_queue(late, durable=True, arguments=QUORUM)
        late_info = await cluster.queue_info(late, via=other)
        assert sorted(late_info["members"]) == sorted(cluster.name(n) for n in cluster.nodes)
        assert sorted(late_info["online"]) == sorted([cluster.name(survivor), cluster.name(other)])
        for i in range(5):
            await publish(channel, late, f"late-{i}".encode())

    await cluster.run("start-node", str(leader))
    for name in (queue, late):
        await cluster.wait_caught_up(name, via=leader)
        assert len((await cluster.queue_info(name, via=leader))["online"]) == 3

    # everything confirmed is there, read through the node that came back
    async with connected(leader) as back:
        maybe = frozenset(unconfirmed)  # (an unconfirmed publish may have been kept)
        got = await drain(back, queue, len(confirmed), also=maybe, within=60)
        assert await drain(back, late, 5) == [f"late-{i}".encode() for i in range(5)]
    assert [b for b in got if b not in maybe] == confirmed, "a confirmed message is missing"

    TIMINGS.append(
        f"leader failover (SIGKILL of {cluster.name(leader)}, the leader): the publisher "
        f"through {cluster.name(survivor)} went {stall:.2f} s without a confirm; "
        f"{len(unconfirmed)} publishes unconfirmed; the kill command took "
        f"{kill_returned - began:.2f} s (until the VM was reaped)"
    )
    assert stall < 15, f"the queue was unavailable for {stall:.1f} s"


async def test_pause_stalls_a_node_and_resume_brings_it_back(cluster: Cluster, queue: str) -> None:
    async with connected(1) as one:
        channel = await confirming_channel(one)
        await channel.declare_queue(queue, durable=True, arguments=QUORUM)
        assert (await cluster.queue_info(queue))["leader"] == cluster.name(1)

        await cluster.run("pause", "3")
        try:
            code, out = await cluster.run("status", check=False)
            assert code == 3 and f"{cluster.name(3)}: paused (pid " in out, out
            # its port still accepts TCP, but nothing answers the AMQP handshake
            with pytest.raises(TimeoutError):
                await aio_pika.connect(cluster.url(3), timeout=2)
            # the other two are a majority: the queue takes confirmed publishes meanwhile
            began = time.monotonic()
            for i in range(10):
                await publish(channel, queue, f"p{i}".encode(), confirm_within=5)
            assert time.monotonic() - began < 5
            code, _ = await cluster.run("pause", "3", check=False)
            assert code != 0, "paused twice"
        finally:
            await cluster.run("resume", "3")

    code, out = await cluster.run("status", check=False)
    assert code == 0, out
    await cluster.wait_caught_up(queue, via=3)
    async with connected(3) as three:
        assert await drain(three, queue, 10) == [f"p{i}".encode() for i in range(10)]


async def test_the_script_refuses_what_it_cannot_do(cluster: Cluster) -> None:
    code, _ = await cluster.run("kill", "4", check=False)
    assert code != 0
    code, _ = await cluster.run("resume", "2", check=False)  # not paused
    assert code != 0
    code, out = await cluster.run("start-node", "2")
    assert "already running" in out
    # start again with the cluster up: it checks and changes nothing
    pids = {n: (BASE / f"{PREFIX}{n}" / "pid").read_text() for n in cluster.nodes}
    code, out = await cluster.run("start")
    assert out.count("already running") == 3 and out.count("already clustered") == 2, out
    assert {n: (BASE / f"{PREFIX}{n}" / "pid").read_text() for n in cluster.nodes} == pids
