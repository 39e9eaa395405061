"""The supervisor's decisions without processes: how many, when to restart and when to give
up, the group's readiness from its processes' answers, and the status pipe."""

from __future__ import annotations

import json
import os

import pytest

from tests.service.test_http import FakeProbes
from worker.config import Settings
from worker.service import supervisor
from worker.service.http import serve_http
from worker.service.metrics import Metrics
from worker.service.supervisor import Membership, RestartPolicy, Slot, restart_delay


def test_zero_processes_means_one_per_core_this_process_may_use() -> None:
    assert supervisor.resolve_processes(3) == 3
    assert supervisor.resolve_processes(1) == 1
    assert supervisor.resolve_processes(0) == len(os.sched_getaffinity(0))


def test_restarts_back_off_and_three_failures_at_start_within_the_window_give_up() -> None:
    policy = RestartPolicy(first_delay=0.5, max_delay=4, give_up_after=3, window=60)
    slot = Slot(0)
    assert restart_delay(slot, 100.0, policy) == 0.5
    assert restart_delay(slot, 101.0, policy) == 1.0
    assert restart_delay(slot, 102.0, policy) is None  # a third exit before it ever consumed

    slot = Slot(1)  # failures far apart do not add up
    assert restart_delay(slot, 0.0, policy) == 0.5
    assert restart_delay(slot, 61.0, policy) == 1.0
    assert restart_delay(slot, 122.0, policy) == 2.0
    assert restart_delay(slot, 183.0, policy) == 4.0
    assert restart_delay(slot, 244.0, policy) == 4.0  # the longest delay


def test_a_process_that_consumed_is_restarted_however_often_it_dies() -> None:
    policy = RestartPolicy(first_delay=0.5, max_delay=30, stable_after=60)
    slot = Slot(0, start_failures=[10.0, 11.0])
    delays = []
    for t in (20.0, 21.0, 22.0, 23.0):
        slot.running_since = t - 0.5  # it reported that it consumes, then died
        delays.append(restart_delay(slot, t, policy))
    assert delays == [0.5, 1.0, 2.0, 4.0]
    slot.running_since = 100.0
    assert restart_delay(slot, 200.0, policy) == 0.5  # up for a while: a first exit again


async def test_group_readiness_fails_a_check_in_any_process_and_names_it() -> None:
    group = supervisor.Supervisor(Settings(), 3)
    metrics = Metrics()
    async with (
        serve_http("127.0.0.1", 0, metrics, FakeProbes()) as ready,
        serve_http("127.0.0.1", 0, metrics, FakeProbes(database=False)) as unready,
    ):
        group.slots[0].state, group.slots[0].http_port = "running", ready.port
        group.slots[1].state, group.slots[1].http_port = "running", unready.port
        group.slots[2].state = "restarting"
        verdict = await group.readiness()
    body = verdict.to_json()
    assert verdict.ready is False
    assert body["failed"] == ["database", "processes"]
    checks = body["checks"]
    assert isinstance(checks, dict)
    assert checks["database"]["error"] == "worker 1: database did not answer"
    assert checks["processes"]["error"] == "worker 2: not consuming (restarting)"
    assert [p["ready"] for p in verdict.processes] == [True, False, False]
    assert [p["failed"] for p in verdict.processes] == [[], ["database"], ["processes"]]
    assert group.metrics.registry.get_sample_value("forge_worker_ready") == 0
    assert group.metrics.registry.get_sample_value("forge_worker_processes_ready") == 1

    for slot in group.slots:
        slot.state = "starting"
    assert not (await group.readiness()).ready
    for slot in group.slots:  # every one consuming and ready
        slot.state = "running"
    async with serve_http("127.0.0.1", 0, metrics, FakeProbes()) as srv:
        for slot in group.slots:
            slot.http_port = srv.port
        verdict = await group.readiness()
    assert verdict.ready and verdict.to_json()["failed"] == []
    assert group.metrics.registry.get_sample_value("forge_worker_ready") == 1


def test_a_worker_process_reports_on_its_status_pipe() -> None:
    read_fd, write_fd = os.pipe()
    try:
        Membership(1, write_fd, os.getppid()).started(4321)
        Membership(1, None, os.getppid()).started(4321)  # no pipe: nothing to tell
        report = json.loads(os.read(read_fd, 4096))
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert report == {"event": "started", "pid": os.getpid(), "http_port": 4321}


@pytest.mark.parametrize("processes", [2, 4])
def test_a_supervisor_keeps_as_many_slots_as_asked(processes: int) -> None:
    group = supervisor.Supervisor(Settings(), processes)
    assert [s.index for s in group.slots] == list(range(processes))
    assert group.metrics.registry.get_sample_value("forge_worker_processes") == processes
