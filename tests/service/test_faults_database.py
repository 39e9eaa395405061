"""A database outage against the real Postgres, through the fault proxy: the worker holds
what it has (the rest waits in the inbox), spends no retry attempt on a short outage, and
answers everything once the database is back; nothing is dead-lettered."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.support.harness import FaultRig, poll_until

pytestmark = pytest.mark.integration

#: how long the database stays unreachable
OUTAGE_S = 3.0


async def test_database_outage_is_waited_out_without_spending_retries(rig: FaultRig) -> None:
    await rig.start_worker()
    before = rig.requests(20)
    await rig.publish(before)
    await rig.collector.wait_for([r.correlation_id for r in before], within=30)

    # the database goes away: live connections are reset, new ones refused
    rig.pg_proxy.refuse()
    rig.pg_proxy.cut()
    during = rig.requests(100)
    await rig.publish(during)
    await poll_until(
        _async(lambda: rig.events("database_lost")), within=15, what="the worker to notice"
    )
    await asyncio.sleep(OUTAGE_S)  # the outage itself, not a wait for a condition
    assert not rig.collector.answered & {r.correlation_id for r in during}, (
        "answered while the database was unreachable"
    )
    assert rig.pg_proxy.stats.refused > 0, "the worker never tried the database"
    # held in the prefetch window and the inbox, not pushed through the retry tiers
    assert await rig.retry_depth() == 0
    assert rig.events("request_retried") == 0

    rig.pg_proxy.accept()
    await rig.collector.wait_for([r.correlation_id for r in during], within=60)

    assert rig.events("database_back") >= 1
    assert rig.events("request_retried") == 0
    assert rig.collector.check([*before, *during]) == []
    assert await rig.dead_letters() == 0
    counts = await rig.counts()
    assert (counts.customers, counts.ledger) == (120, 120)
    assert counts.duplicate_effects == 0, counts
    depths = await rig.depths()
    assert sum(depths.values()) == 0, depths


def _async(probe: Callable[[], int]) -> Callable[[], Awaitable[int]]:
    async def run() -> int:
        return probe()

    return run


async def test_database_connections_cut_mid_transaction_repeat_no_effect(
    amqp_url: str, database_url: str, queue_name: str, tmp_path: Path
) -> None:
    async with FaultRig(
        amqp_url=amqp_url,
        database_url=database_url,
        queue=queue_name,
        log_dir=tmp_path,
        # short tiers: a message hit by two cuts waits 1 s + 2 s, not 1 s + 5 s
        env={"FORGE_WORKER_RETRY_DELAYS": "1,2,4"},
    ) as rig:
        await _cut_mid_transaction(rig)


async def _cut_mid_transaction(rig: FaultRig) -> None:
    await rig.start_worker()
    requests = rig.requests(300)
    ids = [r.correlation_id for r in requests]
    # 20 ms each way makes a batch transaction last a few round trips, so there is always
    # one in flight when the cuts land (an idle pool would just reconnect unnoticed)
    rig.pg_proxy.delay(0.02)
    await rig.publish(requests)

    # reset every database connection three times while batches are in flight: a cut can
    # land before, during or after a COMMIT, so the worker cannot know whether it happened
    for at in (30, 100, 170):
        await rig.collector.wait_count(at)
        rig.pg_proxy.cut()
    assert len(rig.collector.answered) < len(requests), "the stream ended before the cuts"
    await rig.collector.wait_for(ids, within=60)

    assert rig.pg_proxy.stats.cut > 0
    # a cut transaction is tried again once the database answers (a retry tier only if not)
    assert rig.events("database_lost") > 0, "no cut hit a transaction"
    assert rig.collector.check(requests) == []
    assert await rig.dead_letters() == 0
    counts = await rig.counts()
    assert counts.customers == counts.ledger == counts.writes == len(requests), counts
