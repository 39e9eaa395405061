"""What the fault tests and the chaos script share: signed requests, a receipt collector,
queue and database probes, a worker subprocess, and a bounded poll for conditions that
have no event.

Nothing here sleeps to let something happen: waits are on events (a receipt arrived, a
process exited) or, where the only signal is a number in RabbitMQ or Postgres, on
:func:`poll_until`, which checks every 50 ms up to a deadline and fails loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, TypeVar
from urllib.parse import urlsplit

import aio_pika
import aio_pika.abc
import aiormq
import asyncpg

from tests.support.proxy import LOOPBACK, Proxy
from worker.amqp import topology
from worker.service import store
from worker.ucan import (
    CID,
    CUSTOMER_ADD,
    Signer,
    customer_add_args,
    decode_request,
    encode_container,
    encode_delegation,
    encode_invocation,
    task_cid,
)

T = TypeVar("T")

ROOT: Final = Path(__file__).resolve().parents[2]
#: Hilt's default product (CONTRACT §5, ucan-wire §7.2)
PRODUCT: Final = "did:web:hilt.fil-forge.com"
POLL_INTERVAL: Final = 0.05


# --- waiting ---------------------------------------------------------------------------


async def poll_until(
    probe: Callable[[], Awaitable[T | None]],
    *,
    within: float,
    what: str,
    interval: float = POLL_INTERVAL,
) -> T:
    """Call ``probe`` every ``interval`` seconds until it returns something truthy.

    For conditions with no event to wait on (a queue depth, a row count). Returns the
    truthy value.

    Raises:
        AssertionError: still falsy after ``within`` seconds; names ``what`` and the last value.
    """
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what} (last: {value!r})")
        await asyncio.sleep(interval)


# --- requests --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identities:
    """The worker's service key and a Hilt-like client holding a delegation from it."""

    service: Signer
    client: Signer
    #: the delegation token (service -> client, /customer/add), sent with every request
    proof: bytes
    proof_cid: CID

    @classmethod
    def generate(cls) -> Identities:
        service = Signer.generate()
        client = Signer.generate()
        proof = encode_delegation(
            service, aud=client.did, sub=service.did, cmd=CUSTOMER_ADD, exp=None
        )
        return cls(service, client, proof, CID.dag_cbor(proof))

    def worker_env(self) -> dict[str, str]:
        """The environment that makes a worker act as this service."""
        return {"FORGE_WORKER_SERVICE_KEY": self.service.export()}


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """One request body (a container with the delegation and one invocation)."""

    correlation_id: str
    customer: str
    task: CID
    body: bytes


def build_requests(ids: Identities, n: int, *, lifetime: int = 3600) -> list[SignedRequest]:
    """``n`` pre-signed ``/customer/add`` requests, each for its own new customer."""
    exp = int(time.time()) + lifetime
    out = []
    for _ in range(n):
        customer = f"did:plc:{uuid.uuid4().hex[:24]}"
        # Hilt's shape: a did:plc customer, its console id and region as details
        details = {"external_id": f"console-{customer[-12:]}", "region": "us-east-1"}
        args = customer_add_args(customer, PRODUCT, details)
        nonce = os.urandom(16)
        token = encode_invocation(
            ids.client,
            sub=ids.service.did,
            aud=ids.service.did,
            cmd=CUSTOMER_ADD,
            args_raw=args,
            exp=exp,
            nonce=nonce,
            prf=(ids.proof_cid,),
        )
        out.append(
            SignedRequest(
                correlation_id=uuid.uuid4().hex,
                customer=customer,
                task=task_cid(CUSTOMER_ADD, ids.service.did, args, nonce),
                body=encode_container([ids.proof, token]),
            )
        )
    return out


async def publish(
    channel: aio_pika.abc.AbstractChannel,
    queue: str,
    requests: Iterable[SignedRequest],
    *,
    reply_to: str,
    window: int = 256,
) -> int:
    """Publish persistently with confirms, ``window`` at a time; returns how many were confirmed."""
    batch: list[Awaitable[object]] = []
    sent = 0
    for req in requests:
        message = aio_pika.Message(
            req.body,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=req.correlation_id,
            message_id=req.correlation_id,
            reply_to=reply_to,
            content_type=topology.CONTENT_TYPE,
        )
        batch.append(channel.default_exchange.publish(message, routing_key=queue, mandatory=True))
        if len(batch) >= window:
            await asyncio.gather(*batch)
            sent += len(batch)
            batch = []
    if batch:
        await asyncio.gather(*batch)
        sent += len(batch)
    return sent


# --- receipts ----------------------------------------------------------------------------


@dataclass(slots=True)
class ReceiptCollector:
    """Consumes a reply queue and keeps every body received, by correlation id."""

    bodies: dict[str, list[bytes]] = field(default_factory=dict)
    #: monotonic time each request was first answered
    first_seen: dict[str, float] = field(default_factory=dict)
    uncorrelated: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _queue: aio_pika.abc.AbstractQueue | None = None
    _tag: str | None = None

    @property
    def answered(self) -> set[str]:
        return set(self.bodies)

    @property
    def repeated(self) -> int:
        """Receipts beyond the first per request (redeliveries answered again)."""
        return sum(len(v) - 1 for v in self.bodies.values())

    @property
    def received(self) -> int:
        return sum(len(v) for v in self.bodies.values()) + self.uncorrelated

    async def start(self, channel: aio_pika.abc.AbstractChannel, queue: str) -> None:
        """Declare the durable reply queue ``queue`` and consume it."""
        await channel.set_qos(prefetch_count=1000)
        arguments: Any = topology.plain_quorum_arguments()
        self._queue = await channel.declare_queue(queue, durable=True, arguments=arguments)
        self._tag = await self._queue.consume(self._on_message, no_ack=True)

    async def stop(self) -> None:
        if self._queue is not None and self._tag is not None:
            with contextlib.suppress(Exception):
                await self._queue.cancel(self._tag)

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        if message.correlation_id is None:
            self.uncorrelated += 1
        else:
            self.bodies.setdefault(message.correlation_id, []).append(message.body)
            self.first_seen.setdefault(message.correlation_id, time.monotonic())
        self._changed.set()

    async def wait_for(self, ids: Iterable[str], *, within: float) -> None:
        """Wait until every id in ``ids`` has a receipt.

        Raises:
            AssertionError: some are still unanswered after ``within`` seconds.
        """
        wanted = set(ids)
        try:
            async with asyncio.timeout(within):
                while not wanted <= self.bodies.keys():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            missing = wanted - self.bodies.keys()
            raise AssertionError(
                f"{len(missing)} of {len(wanted)} requests unanswered after {within} s"
            ) from None

    async def wait_count(self, n: int) -> None:
        """Wait until ``n`` distinct requests are answered (no bound: the caller sets one)."""
        while len(self.bodies) < n:
            self._changed.clear()
            await self._changed.wait()

    def check(self, requests: Iterable[SignedRequest]) -> list[str]:
        """Problems with the receipts of ``requests``: a failed or foreign receipt, or two
        different bodies for one request (a repeat must be byte-identical)."""
        problems = []
        for req in requests:
            bodies = self.bodies.get(req.correlation_id)
            if not bodies:
                continue
            if any(b != bodies[0] for b in bodies[1:]):
                problems.append(f"{req.correlation_id}: {len(set(bodies))} different receipts")
            receipts = decode_request(bodies[0]).receipts
            if [r.ran for r in receipts] != [req.task]:
                problems.append(f"{req.correlation_id}: receipt ran {[r.ran for r in receipts]}")
            elif receipts[0].error is not None:
                problems.append(f"{req.correlation_id}: error {receipts[0].error}")
        return problems


# --- broker and database probes ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueueState:
    messages: int
    consumers: int


async def queue_state(conn: aio_pika.abc.AbstractConnection, name: str) -> QueueState | None:
    """Ready messages and consumers of ``name`` (``None`` if it does not exist)."""
    channel = await conn.channel()
    try:
        q = await channel.declare_queue(name, passive=True)
        res = q.declaration_result
        return QueueState(res.message_count or 0, res.consumer_count or 0)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return None
    finally:
        if not channel.is_closed:
            await channel.close()


async def queue_depths(
    conn: aio_pika.abc.AbstractConnection, queue: str, delays: Iterable[int]
) -> dict[str, int]:
    """Ready messages in the inbox, each retry tier and the dead-letter queue."""
    names = [queue, *topology.retry_names(queue, tuple(delays)), topology.dead_letter_name(queue)]
    out = {}
    for name in names:
        state = await queue_state(conn, name)
        out[name] = state.messages if state else 0
    return out


#: records every committed write to ``customer``: a task executed twice writes twice
AUDIT_SQL: Final = """
CREATE SCHEMA IF NOT EXISTS fault_audit;
CREATE TABLE IF NOT EXISTS fault_audit.customer_writes (
    customer text NOT NULL,
    op text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE OR REPLACE FUNCTION fault_audit.record() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fault_audit.customer_writes (customer, op) VALUES (NEW.customer, TG_OP);
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS fault_audit_customer ON public.customer;
CREATE TRIGGER fault_audit_customer AFTER INSERT OR UPDATE ON public.customer
    FOR EACH ROW EXECUTE FUNCTION fault_audit.record();
"""


async def install_write_audit(dsn: str) -> None:
    """Count every committed write to ``customer`` (the worker's migrations must have run).

    A trigger row commits or rolls back with the write that fired it, so the table holds
    exactly the effects that happened: more than one row for a customer means its task
    was executed more than once.
    """
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(AUDIT_SQL)
    finally:
        await conn.close()


@dataclass(frozen=True, slots=True)
class DbCounts:
    #: rows in ``customer``
    customers: int
    #: rows in the worker's receipt ledger (one per task)
    ledger: int
    #: committed writes to ``customer`` (from the audit trigger)
    writes: int
    #: writes beyond the first, per customer: tasks executed again
    duplicate_effects: int


#: the worker's receipt ledger: one row per task CID
LEDGER_TABLE: Final = "forge_worker.receipts"


async def db_counts(dsn: str) -> DbCounts:
    conn = await asyncpg.connect(dsn)
    try:
        customers = await conn.fetchval("SELECT count(*) FROM public.customer")
        ledger = await conn.fetchval(f"SELECT count(*) FROM {LEDGER_TABLE}")
        writes, distinct = await conn.fetchrow(
            "SELECT count(*), count(DISTINCT customer) FROM fault_audit.customer_writes"
        )
        return DbCounts(customers, ledger, writes, writes - distinct)
    finally:
        await conn.close()


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    """GET ``path`` on 127.0.0.1:``port``: the status and the body."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the series ``name`` with exactly ``labels`` in a Prometheus text
    exposition, or ``None`` when it is not there."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


async def readiness(port: int) -> dict[str, Any]:
    """The worker's ``/readyz`` on 127.0.0.1:``port`` as JSON, plus its HTTP ``status``."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    result: dict[str, Any] = json.loads(body)
    result["status"] = int(head.split()[1])
    return result


def free_port() -> int:
    """A loopback port nobody listens on right now (for a worker's HTTP server)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


# --- the worker as a subprocess ----------------------------------------------------------


def worker_env(
    *,
    amqp_url: str,
    database_url: str,
    queue: str,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A clean environment for a worker subprocess: only its own FORGE_WORKER_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_WORKER_")}
    env.update(
        FORGE_WORKER_AMQP_URL=amqp_url,
        FORGE_WORKER_DATABASE_URL=database_url,
        FORGE_WORKER_QUEUE=queue,
        FORGE_WORKER_RECEIPT_QUEUE=f"{queue}.receipts",
        FORGE_WORKER_HTTP_PORT="0",
        FORGE_WORKER_LOG_FORMAT="json",
    )
    env.update(extra or {})
    return env


class WorkerProcess:
    """``forge-worker run`` (or another command) in a subprocess, logging to a file."""

    def __init__(
        self, env: Mapping[str, str], log_path: Path, *args: str, cwd: Path = ROOT
    ) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.args = args or ("run",)
        self.cwd = cwd
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self._log: IO[bytes] | None = None

    async def start(self) -> None:
        if self._log is None:
            self._log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker.cli",
            *self.args,
            env=self.env,
            cwd=self.cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        self.starts += 1

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def kill(self) -> None:
        """SIGKILL: no drain, no goodbye to the broker; wait for the exit."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    async def stop(self, within: float = 30) -> int | None:
        """SIGTERM and wait (SIGKILL after ``within`` seconds); returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(within):
                    await self.proc.wait()
            except TimeoutError:
                await self.kill()
        return self.proc.returncode

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def events(self, name: str, **fields: object) -> int:
        """How many JSON log lines of this worker (all its runs) have ``event == name`` and
        the given ``fields`` (e.g. ``outcome="duplicate"``)."""
        return len(self.find(name, **fields))

    def find(self, name: str, **fields: object) -> list[dict[str, Any]]:
        """The JSON log lines of this worker (all its runs) with ``event == name`` and the
        given ``fields``, in order."""
        found: list[dict[str, Any]] = []
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return found
        for line in text.splitlines():
            if f'"{name}"' not in line:
                continue
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == name and all(event.get(k) == v for k, v in fields.items()):
                    found.append(event)
        return found

    async def wait_events(
        self,
        name: str,
        n: int = 1,
        *,
        within: float = 30,
        after_exit: bool = False,
        **fields: object,
    ) -> list[dict[str, Any]]:
        """Wait until ``n`` log lines match (see :meth:`find`); fails after ``within``
        seconds, or if the process exits first (unless ``after_exit``: lines of processes
        it left behind may still come)."""

        async def probe() -> list[dict[str, Any]] | None:
            found = self.find(name, **fields)
            if len(found) >= n:
                return found
            if not after_exit and self.proc is not None and self.proc.returncode is not None:
                raise AssertionError(
                    f"exited with {self.proc.returncode} before {n} {name!r}:\n{self.log_tail()}"
                )
            return None

        return await poll_until(probe, within=within, what=f"{n} {name!r} log line(s)")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


async def run_command(env: Mapping[str, str], log_path: Path, *args: str) -> int:
    """Run a one-shot ``forge-worker`` command (e.g. ``migrate``) to completion."""
    proc = WorkerProcess(env, log_path, *args)
    await proc.start()
    try:
        return await proc.wait()
    finally:
        proc.close()


# --- a worker under test, behind fault proxies -------------------------------------------


class FaultRig:
    """Everything a fault test needs: proxies to both services, an identity, a migrated
    database with the write audit, a reply queue being collected, and worker subprocesses
    that reach the services only through the proxies.

    Args:
        amqp_url, database_url: the real services (the test's own database).
        queue: the test's own inbox name.
        log_dir: where worker logs go (a test's ``tmp_path``).
        env: extra FORGE_WORKER_* settings for the workers.
    """

    def __init__(
        self,
        *,
        amqp_url: str,
        database_url: str,
        queue: str,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.amqp_url = amqp_url
        self.database_url = database_url
        self.queue = queue
        self.reply_queue = f"{queue}.receipts"
        self.log_dir = log_dir
        self.extra_env = dict(env or {})
        self.ids = Identities.generate()
        self.amqp_proxy = Proxy(_port(amqp_url))
        self.pg_proxy = Proxy(_port(database_url))
        self.collector = ReceiptCollector()
        self.workers: list[WorkerProcess] = []
        self.conn: aio_pika.abc.AbstractRobustConnection | None = None
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> FaultRig:
        try:
            await self._stack.enter_async_context(self.amqp_proxy)
            await self._stack.enter_async_context(self.pg_proxy)
            conn = await asyncpg.connect(self.database_url)
            try:
                await store.migrate(conn)
            finally:
                await conn.close()
            await install_write_audit(self.database_url)
            self.conn = await aio_pika.connect_robust(self.amqp_url)
            self._stack.push_async_callback(self._close_broker)
            await self.collector.start(await self.conn.channel(), self.reply_queue)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _close_broker(self) -> None:
        for w in self.workers:
            await w.stop(within=10)
            w.close()
        await self.collector.stop()
        assert self.conn is not None
        delays = self.env().get("FORGE_WORKER_RETRY_DELAYS")
        names = [self.queue, self.reply_queue, topology.dead_letter_name(self.queue)]
        names += topology.retry_names(self.queue)
        if delays:
            names += topology.retry_names(self.queue, tuple(int(d) for d in delays.split(",")))
        for name in dict.fromkeys(names):
            ch = await self.conn.channel()
            try:
                await ch.queue_delete(name)
            except Exception:  # never declared: nothing to delete
                pass
            finally:
                if not ch.is_closed:
                    await ch.close()
        await self.conn.close()

    def env(self) -> dict[str, str]:
        """The workers' environment: services through the proxies, the test's queue and key."""
        return worker_env(
            amqp_url=self.amqp_proxy.url(self.amqp_url),
            database_url=self.pg_proxy.url(self.database_url),
            queue=self.queue,
            extra={**self.ids.worker_env(), **self.extra_env},
        )

    async def start_worker(self) -> WorkerProcess:
        """Start one more worker and wait until its consumer is registered."""
        w = WorkerProcess(self.env(), self.log_dir / f"worker-{len(self.workers)}.log")
        self.workers.append(w)
        await w.start()
        await self.wait_consumers(self.consumers_expected())
        return w

    def consumers_expected(self) -> int:
        return sum(1 for w in self.workers if w.running)

    async def wait_consumers(self, n: int, within: float = 30) -> QueueState:
        """Wait until the inbox has exactly ``n`` consumers (fails early if a worker died)."""
        assert self.conn is not None
        conn = self.conn

        async def probe() -> QueueState | None:
            for w in self.workers:
                if w.proc is not None and w.proc.returncode not in (None, -signal.SIGKILL):
                    raise AssertionError(f"worker exited with {w.proc.returncode}:\n{w.log_tail()}")
            state = await queue_state(conn, self.queue)
            return state if state is not None and state.consumers == n else None

        return await poll_until(probe, within=within, what=f"{n} consumer(s) on {self.queue}")

    async def publish(self, requests: Iterable[SignedRequest]) -> int:
        assert self.conn is not None
        channel = await self.conn.channel(publisher_confirms=True)
        try:
            return await publish(channel, self.queue, requests, reply_to=self.reply_queue)
        finally:
            await channel.close()

    def requests(self, n: int) -> list[SignedRequest]:
        return build_requests(self.ids, n)

    async def depths(self) -> dict[str, int]:
        assert self.conn is not None
        delays = self.env().get("FORGE_WORKER_RETRY_DELAYS")
        tiers = (
            tuple(int(d) for d in delays.split(",")) if delays else topology.DEFAULT_RETRY_DELAYS
        )
        return await queue_depths(self.conn, self.queue, tiers)

    async def retry_depth(self) -> int:
        d = await self.depths()
        return sum(v for k, v in d.items() if ".retry." in k)

    async def dead_letters(self) -> int:
        return (await self.depths())[topology.dead_letter_name(self.queue)]

    async def counts(self) -> DbCounts:
        return await db_counts(self.database_url)

    def events(self, name: str, **fields: object) -> int:
        """Log events ``name`` (with ``fields``) over every worker of the rig."""
        return sum(w.events(name, **fields) for w in self.workers)

    async def hold_back_and_commit_ahead(
        self, more: Sequence[SignedRequest], *, within: float = 10
    ) -> None:
        """Hold the workers' broker traffic back (each chunk 0.5 s), publish ``more``, and wait
        until some of it is committed with its receipts not yet arrived: a fault injected
        next surely catches work committed but not yet confirmed, so not yet acked.

        A fast worker otherwise often has everything it committed acked already. Only work
        committed after the hold began is surely unconfirmed (work committed before may be
        acked, its receipts only slow to reach the collector), and ``more`` is published
        after it began, so it can only be committed after: the wait cannot find the stream
        already over. Turn the hold off with ``amqp_proxy.delay(0)``.
        """
        self.amqp_proxy.delay(0.5)
        held_at = (await self.counts()).ledger
        assert await self.publish(more) == len(more)

        async def ahead() -> bool:
            ledger = (await self.counts()).ledger
            return ledger > max(held_at, len(self.collector.answered))

        await poll_until(
            ahead, within=within, what="work committed whose receipts have not arrived"
        )

    def answered_from_ledger(self) -> int:
        """Invocations the workers answered with a stored receipt instead of executing."""
        return self.events("invocation_answered", outcome="duplicate")

    def logs(self) -> str:
        return "\n".join(f"--- {w.log_path.name}\n{w.log_tail()}" for w in self.workers)


def _port(url: str) -> int:
    parts = urlsplit(url)
    if parts.port:
        return parts.port
    return {"amqp": 5672, "postgresql": 5432, "postgres": 5432}[parts.scheme]
