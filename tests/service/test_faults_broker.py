"""Broker faults against the real RabbitMQ, through the fault proxy: a connection cut
mid-stream and a server-side consumer cancel. The worker is a subprocess."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import FaultRig, free_port, poll_until, readiness
from worker.amqp import topology

pytestmark = pytest.mark.integration


async def test_broker_cut_mid_stream_loses_nothing_and_repeats_nothing(rig: FaultRig) -> None:
    # two competing workers: a message redelivered after the cut may go to either, so the
    # ledger must also stop a task the *other* worker already executed
    await rig.start_worker()
    await rig.start_worker()
    requests = rig.requests(600)
    ids = [r.correlation_id for r in requests]
    assert await rig.publish(requests[:300]) == 300

    # cut while the stream is flowing: some answered, and work committed but not yet acked
    await rig.collector.wait_count(50)
    await rig.hold_back_and_commit_ahead(requests[300:])
    assert rig.amqp_proxy.cut() == 2
    rig.amqp_proxy.delay(0)
    assert len(rig.collector.answered) < len(requests), "the stream ended before the cut"

    # each worker reconnects by itself and its consumer is back
    await rig.amqp_proxy.wait_for(lambda s: s.connections >= 4 and s.live == 2, within=30)
    await rig.wait_consumers(2)
    await rig.collector.wait_for(ids, within=60)

    assert rig.collector.check(requests) == []
    # the fault caught work committed but not yet acked: it was redelivered and answered
    # from the ledger (any repeated receipt byte-identical, checked above), not executed
    assert rig.answered_from_ledger() > 0, "the fault hit no committed-but-unacked message"
    counts = await rig.counts()
    assert (counts.customers, counts.ledger) == (len(requests), len(requests))
    assert counts.duplicate_effects == 0, counts
    assert await rig.dead_letters() == 0


async def test_server_side_consumer_cancel_is_followed_by_a_new_consumer(
    amqp_url: str, database_url: str, queue_name: str, tmp_path: Path
) -> None:
    port = free_port()
    async with FaultRig(
        amqp_url=amqp_url,
        database_url=database_url,
        queue=queue_name,
        log_dir=tmp_path,
        env={"FORGE_WORKER_HTTP_PORT": str(port)},
    ) as rig:
        worker = await rig.start_worker()
        first = rig.requests(5)
        await rig.publish(first)
        await rig.collector.wait_for([r.correlation_id for r in first], within=30)
        assert (await readiness(port))["ready"] is True

        # deleting the inbox makes the broker cancel the worker's consumer (basic.cancel);
        # the worker notices: readiness names the consumer
        assert rig.conn is not None
        channel = await rig.conn.channel()
        await channel.queue_delete(rig.queue)
        cancelled = await poll_until(
            lambda: _failed(port), within=15, what="readiness to report the lost consumer"
        )
        assert cancelled == ["consumer"]

        # the queue comes back (an operator re-creating it): the worker consumes it again
        arguments: Any = topology.inbox_arguments(rig.queue)
        await channel.declare_queue(rig.queue, durable=True, arguments=arguments)
        await channel.close()
        await rig.wait_consumers(1, within=30)
        await poll_until(lambda: _ready(port), within=15, what="readiness to come back")

        second = rig.requests(5)
        await rig.publish(second)
        await rig.collector.wait_for([r.correlation_id for r in second], within=30)
        assert rig.collector.check([*first, *second]) == []
        assert worker.running and worker.starts == 1, "the worker restarted instead"
        assert rig.amqp_proxy.stats.connections == 1, "it reconnected instead"


async def _failed(port: int) -> list[str] | None:
    state = await readiness(port)
    return None if state["ready"] else list(state["failed"])


async def _ready(port: int) -> bool:
    return bool((await readiness(port))["ready"])
