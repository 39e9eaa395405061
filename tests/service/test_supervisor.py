"""``forge-worker run --processes N`` as processes on the real services: N competing
consumers under one supervisor, restarts, the drain on SIGTERM, giving up on a worker that
cannot start, one development key, migrations once, and the group's ``/metrics`` and
``/readyz`` (worker.service.supervisor)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest

from tests.support.harness import (
    ROOT,
    Identities,
    ReceiptCollector,
    build_requests,
    free_port,
    http_get,
    poll_until,
    publish,
    queue_state,
    sample,
    worker_env,
)
from tests.support.harness import (
    WorkerProcess as Process,
)
from worker.service import store

pytestmark = pytest.mark.integration

#: seconds to wait for answers, events and exits
WAIT = 45.0


class Group:
    """One ``run --processes N`` under test, with a collector on its receipt queue."""

    def __init__(
        self,
        conn: aio_pika.abc.AbstractRobustConnection,
        queue: str,
        env: Mapping[str, str],
        log: Path,
        cwd: Path,
        processes: int = 2,
    ) -> None:
        self.conn, self.queue, self.log, self.cwd = conn, queue, log, cwd
        self.env = dict(env)
        self.http_port = int(self.env["FORGE_WORKER_HTTP_PORT"])
        self.proc = Process(self.env, log, "run", "--processes", str(processes), cwd=cwd)
        self.collector = ReceiptCollector()

    async def start(self, ready: int = 2) -> list[dict[str, Any]]:
        """Start it; wait until ``ready`` worker processes consume; their ready events."""
        await self.collector.start(await self.conn.channel(), f"{self.queue}.receipts")
        await self.proc.start()
        return await self.proc.wait_events("worker_process_ready", ready, within=WAIT)

    async def publish(self, ids: Identities, n: int) -> list[str]:
        requests = build_requests(ids, n)
        channel = await self.conn.channel(publisher_confirms=True)
        try:
            await publish(channel, self.queue, requests, reply_to=f"{self.queue}.receipts")
        finally:
            await channel.close()
        self.requests = getattr(self, "requests", []) + requests
        return [r.correlation_id for r in requests]

    async def consumers(self, n: int) -> None:
        async def probe() -> bool:
            state = await queue_state(self.conn, self.queue)
            return state is not None and state.consumers == n

        await poll_until(probe, within=WAIT, what=f"{n} consumers on {self.queue}")

    async def metrics(self, port: int | None = None) -> str:
        status, body = await http_get(port or self.http_port, "/metrics")
        assert status == 200
        return body.decode()

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        status, body = await http_get(self.http_port, "/readyz")
        parsed: dict[str, Any] = json.loads(body)
        return status, parsed

    async def close(self) -> None:
        await self.collector.stop()
        await self.proc.stop(within=WAIT)
        self.proc.close()


@pytest.fixture
def ids() -> Identities:
    return Identities.generate()


@pytest.fixture
async def group(
    amqp: aio_pika.abc.AbstractRobustConnection,
    amqp_url: str,
    database_url: str,
    queue_name: str,
    ids: Identities,
    tmp_path: Path,
) -> AsyncIterator[Group]:
    """``run --processes 2`` on the test's queue and database, the group's endpoints on a
    free port, a prefetch of 10 (so both processes get work), in ``tmp_path``."""
    env = worker_env(
        amqp_url=amqp_url,
        database_url=database_url,
        queue=queue_name,
        extra={
            **ids.worker_env(),
            "FORGE_WORKER_HTTP_PORT": str(free_port()),
            "FORGE_WORKER_PREFETCH": "10",
            "FORGE_WORKER_SHUTDOWN_TIMEOUT": "20",
            "PYTHONPATH": str(ROOT),
        },
    )
    g = Group(amqp, queue_name, env, tmp_path / "group.log", tmp_path)
    yield g
    await g.close()


def ok_count(text: str) -> float:
    return sample(text, "forge_worker_messages_total", outcome="ok") or 0.0


async def test_two_processes_compete_on_the_inbox_and_serve_one_group(
    group: Group, ids: Identities, database_url: str
) -> None:
    # a development key, created by the supervisor once and loaded by both processes
    del group.env["FORGE_WORKER_SERVICE_KEY"]
    group.proc.env = group.env
    ready = await group.start()
    proc = group.proc
    assert proc.proc is not None
    supervisor_pid = proc.proc.pid
    pids = {e["worker"]: e["worker_pid"] for e in ready}
    assert set(pids) == {0, 1} and len(set(pids.values())) == 2
    assert supervisor_pid not in pids.values()
    await group.consumers(2)

    created = proc.find("development_key_created")
    assert len(created) == 1 and created[0]["role"] == "supervisor"
    loaded = proc.find("development_key_loaded")
    assert sorted(e["worker"] for e in loaded) == [0, 1]
    assert {e["did"] for e in loaded} == {created[0]["did"]}
    key_file = group.cwd / ".forge-worker" / "service.key"
    assert key_file.read_text().strip() not in group.log.read_text()

    # each worker process's lines name it; the supervisor's are its own
    started = proc.find("worker_started")
    assert {(e["worker"], e["pid"]) for e in started} == set(pids.items())
    assert all(e["role"] == "worker" for e in started)
    assert proc.find("supervisor_started")[0]["pid"] == supervisor_pid

    # migrations: each applied once, by whichever process took the lock first
    applied = [e["version"] for e in proc.find("migration_applied")]
    assert sorted(applied) == [m.version for m in store.discover()]

    # every request answered, by both processes
    from worker.ucan import Signer

    service = Signer.parse(key_file.read_text().strip())
    ids = Identities(service, ids.client, *_delegate(service, ids.client))
    sent = await group.publish(ids, 100)
    await group.collector.wait_for(sent, within=WAIT)
    assert group.collector.check(group.requests) == []
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM public.customer") == 100
    finally:
        await conn.close()

    # one /readyz for the group, naming each process; one /metrics summing them
    status, body = await group.readyz()
    assert status == 200 and body["ready"] is True
    assert {p["worker"]: p["pid"] for p in body["processes"]} == pids
    assert all(p["ready"] for p in body["processes"])
    text = await group.metrics()
    assert ok_count(text) == 100
    each = [ok_count(await group.metrics(p["port"])) for p in body["processes"]]
    assert all(n > 0 for n in each) and sum(each) == 100, each
    assert sample(text, "forge_worker_processes") == 2
    assert sample(text, "forge_worker_processes_ready") == 2
    assert sample(text, "forge_worker_ready") == 1
    assert sample(text, "forge_worker_ready_check", check="processes") == 1
    assert sample(text, "forge_worker_in_flight") == 0
    assert text.count("# TYPE forge_worker_ready gauge") == 1  # one family each, no pid label

    assert await group.proc.stop(within=WAIT) == 0


def _delegate(service: Any, client: Any) -> tuple[bytes, Any]:
    from worker.ucan import CID, CUSTOMER_ADD, encode_delegation

    proof = encode_delegation(service, aud=client.did, sub=service.did, cmd=CUSTOMER_ADD, exp=None)
    return proof, CID.dag_cbor(proof)


async def test_a_killed_worker_process_is_restarted_and_requests_keep_being_answered(
    group: Group, ids: Identities, database_url: str
) -> None:
    ready = await group.start()
    await group.consumers(2)
    first = await group.publish(ids, 100)
    await group.collector.wait_count(20)
    before = ok_count(await group.metrics())

    victim = next(e["worker_pid"] for e in ready if e["worker"] == 0)
    os.kill(victim, signal.SIGKILL)
    exited = await group.proc.wait_events("worker_process_exited", worker=0, within=WAIT)
    assert exited[0]["signal"] == "SIGKILL" and exited[0]["worker_pid"] == victim
    await group.proc.wait_events("worker_process_restarting", worker=0, within=WAIT)
    again = await group.proc.wait_events("worker_process_ready", 3, within=WAIT)
    assert again[-1]["worker"] == 0 and again[-1]["worker_pid"] != victim
    await group.consumers(2)

    more = await group.publish(ids, 100)
    await group.collector.wait_for([*first, *more], within=WAIT)
    assert group.collector.check(group.requests) == []
    conn = await asyncpg.connect(database_url)
    try:  # each task executed once, whichever process took it (or took it again)
        assert await conn.fetchval("SELECT count(*) FROM public.customer") == 200
        assert await conn.fetchval("SELECT count(*) FROM forge_worker.receipts") == 200
    finally:
        await conn.close()

    text = await group.metrics()
    assert sample(text, "forge_worker_process_restarts_total") == 1
    # the killed process's counts stay in the group's sums: a counter never goes back
    assert ok_count(text) >= max(before, 1)
    _, body = await group.readyz()
    assert [p["restarts"] for p in body["processes"]] == [1, 0]
    assert await group.proc.stop(within=WAIT) == 0


async def test_sigterm_drains_every_worker_process_and_exits_zero(
    group: Group, ids: Identities, database_url: str
) -> None:
    await group.start()
    await group.consumers(2)
    blocker = await asyncpg.connect(database_url)
    tx = blocker.transaction()
    await tx.start()
    await blocker.execute("LOCK TABLE public.customer IN ACCESS EXCLUSIVE MODE")
    sent = await group.publish(ids, 20)

    # both processes are inside their transactions, waiting for the table: work in flight
    async def both_waiting() -> bool:
        waiting = await blocker.fetchval(
            "SELECT count(DISTINCT pid) FROM pg_locks WHERE NOT granted "
            "AND relation = 'public.customer'::regclass"
        )
        return int(waiting) >= 2

    await poll_until(both_waiting, within=WAIT, what="both processes waiting on the table")
    assert group.proc.proc is not None
    group.proc.proc.send_signal(signal.SIGTERM)
    cancelled = await group.proc.wait_events("consumer_cancelled", 2, within=WAIT)
    assert all(e["in_flight"] >= 1 for e in cancelled)
    await tx.commit()
    await blocker.close()

    assert await asyncio.wait_for(group.proc.wait(), WAIT) == 0
    stopped = group.proc.find("worker_stopped")
    assert sorted(e["worker"] for e in stopped) == [0, 1]
    assert all(e["drained"] is True for e in stopped)
    assert group.proc.find("supervisor_stopped")[0]["exit_code"] == 0
    assert not group.proc.find("worker_process_restarting")
    await group.collector.wait_for(sent, within=WAIT)
    assert group.collector.check(group.requests) == []


async def test_a_worker_process_that_keeps_failing_at_start_makes_the_supervisor_give_up(
    group: Group,
) -> None:
    # the supervisor never talks to the database: only its worker processes find it away
    group.env["FORGE_WORKER_DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    group.proc.env = group.env
    await group.proc.start()
    code = await asyncio.wait_for(group.proc.wait(), WAIT)
    assert code == 3  # the worker processes' own exit code: cannot reach the database
    failing = group.proc.find("worker_process_failing")
    assert len(failing) == 1
    event = failing[0]
    assert event["level"] == "error" and event["exit_code"] == 3 and event["failures"] == 3
    assert "exited with code 3 3 times" in event["message"]
    assert group.proc.events("worker_process_restarting", worker=event["worker"]) == 2
    log = group.log.read_text()
    assert "forge-worker: cannot reach the database" in log  # what the processes said
    assert "Traceback" not in log
    assert group.proc.find("supervisor_stopped")[0]["exit_code"] == 3


async def test_one_process_runs_without_a_supervisor(group: Group) -> None:
    group.proc = Process(group.env, group.log, "run", "--processes", "1", cwd=group.cwd)
    await group.proc.start()
    started = await group.proc.wait_events("worker_started", within=WAIT)
    assert "role" not in started[0] and "worker" not in started[0]
    assert not group.proc.find("supervisor_started")
    await group.consumers(1)
    assert group.proc.proc is not None
    status, _ = await http_get(group.http_port, "/readyz")  # its own endpoints, as today
    assert status == 200
    assert await group.proc.stop(within=WAIT) == 0


async def test_worker_processes_stop_by_themselves_when_the_supervisor_dies(group: Group) -> None:
    ready = await group.start()
    assert group.proc.proc is not None
    group.proc.proc.send_signal(signal.SIGKILL)
    await group.proc.proc.wait()
    gone = await group.proc.wait_events("supervisor_gone", 2, within=WAIT, after_exit=True)
    assert sorted(e["worker"] for e in gone) == [0, 1]
    stopped = await group.proc.wait_events("worker_stopped", 2, within=WAIT, after_exit=True)
    assert all(e["drained"] is True for e in stopped)

    async def exited() -> bool:
        return all(_gone(e["worker_pid"]) for e in ready)

    await poll_until(exited, within=WAIT, what="the worker processes to exit")
    await group.consumers(0)


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for an init that does not reap counts)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")
