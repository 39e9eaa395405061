"""SIGKILL of a worker subprocess mid-stream: after a restart every message is answered,
each task's effect happened once, and repeated receipts are byte-identical."""

from __future__ import annotations

import pytest

from tests.support.harness import FaultRig

pytestmark = pytest.mark.integration


async def test_sigkill_mid_stream_loses_nothing_and_repeats_no_effect(rig: FaultRig) -> None:
    worker = await rig.start_worker()
    requests = rig.requests(600)
    ids = [r.correlation_id for r in requests]
    assert await rig.publish(requests[:200]) == 200

    # two kills, each mid-stream, each followed by a restart; each catches work committed
    # but not yet acked (the rest of the stream is published once the traffic is held back)
    for at, more in ((100, requests[200:400]), (300, requests[400:])):
        await rig.collector.wait_count(at)
        await rig.hold_back_and_commit_ahead(more)
        await worker.kill()
        rig.amqp_proxy.delay(0)
        assert worker.proc is not None and worker.proc.returncode == -9
        assert len(rig.collector.answered) < len(requests), "the stream ended before the kill"
        # the dead worker's connection is gone (so the consumer count below is the new one's)
        await rig.amqp_proxy.wait_for(lambda s: s.live == 0, within=10)
        await worker.start()
        await rig.wait_consumers(1)

    await rig.collector.wait_for(ids, within=60)
    assert rig.collector.check(requests) == []
    # the fault caught work committed but not yet acked: it was redelivered and answered
    # from the ledger (any repeated receipt byte-identical, checked above), not executed
    assert rig.answered_from_ledger() > 0, "the fault hit no committed-but-unacked message"
    counts = await rig.counts()
    assert counts.customers == counts.ledger == counts.writes == len(requests), counts
    assert counts.duplicate_effects == 0
    assert await rig.dead_letters() == 0
    assert worker.starts == 3
