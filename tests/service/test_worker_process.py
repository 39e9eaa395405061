"""``forge-worker run`` and ``migrate`` as processes: SIGTERM drains in-flight work, the
development key, migrations (idempotent, concurrent-safe) and the exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection

from tests.support.worker import QueueCleanup, Requester, invocation, receipts_of
from worker.config import Settings
from worker.service import store
from worker.ucan import Signer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
#: seconds to wait for a log event or an exit
WAIT = 30.0


def worker_env(settings: Settings | None, **extra: str) -> dict[str, str]:
    """The environment of a worker process: nothing FORGE_WORKER_* inherited but ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_WORKER_")}
    env["PYTHONPATH"] = str(ROOT)
    if settings is not None:
        env.update(
            FORGE_WORKER_AMQP_URL=settings.amqp_url,
            FORGE_WORKER_DATABASE_URL=settings.database_url,
            FORGE_WORKER_QUEUE=settings.queue,
            FORGE_WORKER_RECEIPT_QUEUE=settings.receipt_queue,
            FORGE_WORKER_HTTP_PORT="0",
            FORGE_WORKER_LOG_FORMAT="json",
            FORGE_WORKER_RETRY_DELAYS=",".join(map(str, settings.retry_delays)),
        )
        if settings.service_key is not None:
            env["FORGE_WORKER_SERVICE_KEY"] = str(settings.service_key)
    env.update(extra)
    return env


class WorkerProcess:
    """``python -m worker.cli <args>`` with its JSON log lines parsed as they come."""

    def __init__(self, args: list[str], env: Mapping[str, str], cwd: Path) -> None:
        self.args, self.env, self.cwd = args, dict(env), cwd
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._new = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> WorkerProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker.cli",
            *self.args,
            cwd=self.cwd,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            async with self._new:
                self.lines.append(line)
                with contextlib.suppress(ValueError):  # not every line is a log event
                    self.events.append(json.loads(line))
                self._new.notify_all()
        async with self._new:
            self._new.notify_all()

    async def event(self, name: str) -> dict[str, Any]:
        """The first log event called ``name`` (waits for it; fails if the process ends)."""

        def found() -> dict[str, Any] | None:
            return next((e for e in self.events if e.get("event") == name), None)

        async with asyncio.timeout(WAIT), self._new:
            while (hit := found()) is None:
                if self._reader is not None and self._reader.done():
                    pytest.fail(f"process ended without {name!r}:\n" + "\n".join(self.lines))
                await self._new.wait()
        return hit

    async def exit_code(self) -> int:
        assert self.proc is not None
        try:
            async with asyncio.timeout(WAIT):
                code = await self.proc.wait()
                if self._reader is not None:
                    await self._reader
        except TimeoutError:
            pytest.fail(f"process did not exit within {WAIT}s:\n" + "\n".join(self.lines))
        return code

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


@pytest.fixture
async def processes() -> AsyncIterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for p in started:
        await p.stop()


async def spawn(
    processes: list[WorkerProcess], args: list[str], env: Mapping[str, str], cwd: Path
) -> WorkerProcess:
    p = WorkerProcess(args, env, cwd)
    processes.append(p)
    return await p.start()


async def test_sigterm_stops_consuming_drains_in_flight_work_and_exits_zero(
    worker_settings: Settings,
    requester: Requester,
    service: Signer,
    database_url: str,
    processes: list[WorkerProcess],
    amqp: AbstractRobustConnection,
    tmp_path: Path,
) -> None:
    proc = await spawn(
        processes,
        ["run"],
        worker_env(worker_settings, FORGE_WORKER_SHUTDOWN_TIMEOUT="30"),
        tmp_path,
    )
    started = await proc.event("worker_started")
    # what start-up allocated is out of the cyclic collector's reach before the first
    # delivery (README, Decisions)
    frozen = await proc.event("startup_heap_frozen")
    assert frozen["objects"] > 10_000
    assert proc.events.index(frozen) < proc.events.index(started)
    receipts_q = worker_settings.receipt_queue
    await requester.listen(receipts_q)

    blocker = await asyncpg.connect(database_url)
    tx = blocker.transaction()
    await tx.start()
    await blocker.execute("LOCK TABLE public.customer IN ACCESS EXCLUSIVE MODE")
    n = 5
    for _ in range(n):
        await requester.publish(invocation(service, service.did))
    # the worker is now inside its transactions, waiting for the table: work in flight
    async with asyncio.timeout(WAIT):
        while not await blocker.fetchval(  # noqa: ASYNC110 - Postgres has no lock-wait event
            "SELECT count(*) > 0 FROM pg_locks WHERE NOT granted "
            "AND relation = 'public.customer'::regclass"
        ):
            await asyncio.sleep(0.02)

    proc.signal(signal.SIGTERM)
    cancelled = await proc.event("consumer_cancelled")
    assert cancelled["in_flight"] >= 1
    late = await requester.publish(invocation(service, service.did))  # after the cancel
    await tx.commit()
    await blocker.close()

    assert await proc.exit_code() == 0
    stopped = await proc.event("worker_stopped")
    assert stopped["drained"] is True
    answered = [receipts_of((await requester.next(receipts_q)).body) for _ in range(n)]
    assert all(r[0].ok == {} for r in answered)
    rows = await store_count(database_url, "SELECT count(*) FROM public.customer")
    assert rows == n
    ch = await amqp.channel()
    inbox = await ch.declare_queue(worker_settings.queue, passive=True)
    assert inbox.declaration_result.message_count == 1  # the late one waits for a worker
    await ch.close()
    assert late


async def store_count(database_url: str, sql: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def test_zero_config_creates_a_development_key(
    worker_settings: Settings,
    queue_cleanup: QueueCleanup,
    processes: list[WorkerProcess],
    amqp: AbstractRobustConnection,
    tmp_path: Path,
) -> None:
    env = worker_env(worker_settings)
    del env["FORGE_WORKER_SERVICE_KEY"]
    proc = await spawn(processes, ["run"], env, tmp_path)
    created = await proc.event("development_key_created")
    await proc.event("worker_started")
    key_file = tmp_path / ".forge-worker" / "service.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    assert created["did"] == Signer.parse(key).did
    assert created["level"] == "warning" and "development" in created["note"]
    proc.signal(signal.SIGINT)
    assert await proc.exit_code() == 0
    assert not any(key in line for line in proc.lines), "the key was logged"

    again = await spawn(processes, ["run"], env, tmp_path)  # the same identity next time
    loaded = await again.event("development_key_loaded")
    assert loaded["did"] == created["did"]
    await again.event("worker_started")
    again.signal(signal.SIGTERM)
    assert await again.exit_code() == 0


async def test_migrations_are_idempotent_and_safe_to_run_concurrently(database_url: str) -> None:
    # the upload service's own table may already be there, with data: left as it is
    conn = await asyncpg.connect(database_url)
    await conn.execute(
        "CREATE TABLE public.customer (customer TEXT PRIMARY KEY, external_account TEXT, "
        "product TEXT NOT NULL, details JSONB, reserved_capacity BIGINT, "
        "inserted_at TIMESTAMPTZ NOT NULL, updated_at TIMESTAMPTZ)"
    )
    await conn.execute(
        "INSERT INTO public.customer VALUES ('did:mailto:a', NULL, 'did:web:p', NULL, 7, now(), NULL)"
    )
    await conn.close()

    conns = [await asyncpg.connect(database_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(store.migrate(c) for c in conns))
    finally:
        for c in conns:
            await c.close()
    expected = [m.version for m in store.discover()]
    assert sorted(m.version for r in results for m in r) == expected  # each applied once
    conn = await asyncpg.connect(database_url)
    try:
        assert await store.migrate(conn) == []  # nothing left
        versions = await conn.fetch("SELECT version FROM forge_worker.schema_migrations")
        assert sorted(r["version"] for r in versions) == expected
        assert await conn.fetchval("SELECT reserved_capacity FROM public.customer") == 7
        for table in ("receipts", "arrivals", "audit"):
            assert await conn.fetchval(f"SELECT to_regclass('forge_worker.{table}') IS NOT NULL")
        for table in ("subscription", "consumer"):
            assert await conn.fetchval(f"SELECT to_regclass('public.{table}') IS NOT NULL")
    finally:
        await conn.close()


async def test_migrate_command(
    database_url: str, processes: list[WorkerProcess], tmp_path: Path
) -> None:
    env = worker_env(None, FORGE_WORKER_DATABASE_URL=database_url, FORGE_WORKER_LOG_FORMAT="json")
    first = await spawn(processes, ["migrate"], env, tmp_path)
    assert await first.exit_code() == 0
    assert [e["version"] for e in first.events if e.get("event") == "migration_applied"] == [
        m.version for m in store.discover()
    ]
    second = await spawn(processes, ["migrate"], env, tmp_path)
    assert await second.exit_code() == 0
    done = await second.event("migrations_current")
    assert done["applied"] == 0


@pytest.mark.parametrize(
    ("extra", "code", "names"),
    [
        ({"FORGE_WORKER_PREFETCH": "lots"}, 2, "FORGE_WORKER_PREFETCH"),
        ({"FORGE_WORKER_SERVICE_KEY": "bm90IGEga2V5"}, 2, "FORGE_WORKER_SERVICE_KEY"),
        ({"FORGE_WORKER_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"}, 3, "broker"),
        ({"FORGE_WORKER_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x"}, 3, "database"),
    ],
)
async def test_bad_configuration_and_unreachable_services_exit_with_their_codes(
    worker_settings: Settings,
    processes: list[WorkerProcess],
    tmp_path: Path,
    extra: dict[str, str],
    code: int,
    names: str,
) -> None:
    proc = await spawn(processes, ["run"], worker_env(worker_settings, **extra), tmp_path)
    assert await proc.exit_code() == code
    last = proc.lines[-1]
    assert last.startswith("forge-worker: ") and names in last, proc.lines
    assert "bm90IGEga2V5" not in "\n".join(proc.lines)  # a key is never echoed
    assert not any("Traceback" in line for line in proc.lines)
