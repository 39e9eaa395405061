"""``forge-worker run``: resources in one AsyncExitStack, signals, and a bounded drain."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg

from worker import log as logs
from worker.amqp import guard
from worker.config import Settings
from worker.errors import Unreachable
from worker.keyfile import ServiceKey, load_service_key
from worker.service import store
from worker.service.broker import Broker
from worker.service.consumer import Consumer
from worker.service.depth import DepthPoller
from worker.service.http import serve_http
from worker.service.metrics import Metrics
from worker.service.resolve import DidResolver
from worker.service.supervisor import Membership, resolve_processes, supervise

HTTP_HOST: Final = "127.0.0.1"
#: seconds deliveries may stay pending with none of them settled before the worker stops
#: being ready: longer than the slowest legitimate settle (a batch held DB_HOLD for a lost
#: database, then its statement's DB_TIMEOUT, its receipts' and its successors' confirms)
STALL_AFTER: Final = 120.0
#: seconds between prunings of first arrivals older than store.ARRIVALS_KEPT
PRUNE_EVERY: Final = 3600.0
#: seconds between queue-depth polls (worker.service.depth.DepthPoller)
DEPTH_POLL_INTERVAL: Final = 15.0


@dataclass
class Health:
    """The readiness facts (``worker.service.http.Probes``): can this worker make progress?"""

    broker: Broker | None = None
    pool: asyncpg.Pool | None = None
    key: ServiceKey | None = None
    consumer: Consumer | None = None
    #: seconds deliveries may stay pending with none settled before readiness turns false
    stall_after: float = STALL_AFTER
    #: set once a stop was asked for (SIGTERM/SIGINT or the fixture's exit)
    stopping: bool = False

    def broker_connected(self) -> bool:
        """The AMQP connection and the worker's channels are open."""
        return self.broker is not None and self.broker.connected

    def consumer_registered(self) -> bool:
        """The inbox consumer is registered on the live channel (not cancelled)."""
        return not self.stopping and self.broker is not None and self.broker.consumer_registered()

    async def database_reachable(self) -> bool:
        """A pooled connection answers ``SELECT 1`` within 2 s."""
        return self.pool is not None and await store.ping(self.pool)

    def key_loaded(self) -> bool:
        """The service signing key is loaded."""
        return self.key is not None

    def deliveries_settling(self) -> bool:
        """No delivery has stayed pending for ``stall_after`` s without any being settled."""
        return self.consumer is None or self.consumer.stalled_for() < self.stall_after

    async def ready(self) -> bool:
        """Every fact at once."""
        return (
            self.broker_connected()
            and self.consumer_registered()
            and self.key_loaded()
            and self.deliveries_settling()
            and await self.database_reachable()
        )


@dataclass
class App:
    """One running worker: what it is made of, for the HTTP server and tests."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    health: Health = field(default_factory=Health)
    key: ServiceKey | None = None
    broker: Broker | None = None
    pool: asyncpg.Pool | None = None
    consumer: Consumer | None = None
    directory: DidResolver | None = None
    #: the HTTP server's bound port (None when off)
    http_port: int | None = None
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def service_did(self) -> str:
        assert self.key is not None
        return self.key.signer.did

    def request_stop(self) -> None:
        """Ask the worker to stop (what SIGTERM does)."""
        self.health.stopping = True
        self.stop_requested.set()


#: seconds a helper (the depth poller) gets to stop before the worker closes without it
HELPER_STOP_TIMEOUT: Final = 1.0


@contextlib.asynccontextmanager
async def _stopping_within(
    cm: AbstractAsyncContextManager[Any], name: str, stragglers: set[asyncio.Future[Any]]
) -> AsyncIterator[None]:
    """Enter ``cm``; on exit give its clean-up :data:`HELPER_STOP_TIMEOUT` seconds.

    A helper stuck in a broker call (cancelled mid-RPC) must not hold up the drain: it is
    left in ``stragglers`` and ends when the connection closes.
    """
    await cm.__aenter__()
    try:
        yield
    finally:
        leaving = asyncio.ensure_future(cm.__aexit__(None, None, None))
        try:
            await asyncio.wait_for(asyncio.shield(leaving), HELPER_STOP_TIMEOUT)
        except TimeoutError:
            logs.get_logger().warning("helper_stop_slow", helper=name)
            stragglers.add(leaving)


class _Pruner:
    """Deletes old first arrivals every :data:`PRUNE_EVERY` s while entered (the first
    time at start); a failure (the database away) waits for the next round."""

    def __init__(self, pool: asyncpg.Pool, log: Any) -> None:
        self._pool, self._log = pool, log
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            try:
                pruned = await store.prune_arrivals(self._pool)
                if pruned:
                    self._log.info("arrivals_pruned", rows=pruned)
            except Exception as exc:  # the database away: the next round tries again
                self._log.warning("arrivals_prune_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(PRUNE_EVERY)

    async def __aenter__(self) -> _Pruner:
        self._task = asyncio.create_task(self._run(), name="forge-worker-prune")
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def _end_stragglers(stragglers: set[asyncio.Future[Any]]) -> None:
    """After the connection closed: give stuck helpers a moment, then cancel them."""
    if stragglers:
        _, pending = await asyncio.wait(stragglers, timeout=HELPER_STOP_TIMEOUT)
        for fut in pending:
            fut.cancel()
        await asyncio.gather(*stragglers, return_exceptions=True)


async def _migrate(pool: asyncpg.Pool) -> list[store.Migration]:
    try:
        async with pool.acquire() as conn:  # (transaction-level locks: no session to reset)
            return await store.migrate(conn)
    except store.CONNECTION_ERRORS as exc:
        raise Unreachable(f"cannot reach the database: {type(exc).__name__}: {exc}") from None


@contextlib.asynccontextmanager
async def running(
    settings: Settings,
    *,
    key: ServiceKey | None = None,
    freeze_heap: bool = False,
    member: bool = False,
) -> AsyncIterator[App]:
    """Start a worker on ``settings`` (migrations, topology, HTTP, consumer) while entered.

    With ``freeze_heap`` (the ``run`` command), what start-up allocated is frozen out of the
    cyclic garbage collector's reach just before consuming begins (``_freeze_startup_heap``).

    A ``member`` of a group (``run --processes N``) serves its HTTP endpoints on a free port
    (its supervisor asks it for its readiness there and serves the group's on
    ``FORGE_WORKER_HTTP_PORT``) and leaves the queue gauges to the supervisor.

    Leaving the block stops consuming, drains in-flight work (bounded by
    ``settings.shutdown_timeout``) and closes everything.

    Raises:
        ConfigError: a bad key or a queue declared with other arguments.
        Unreachable: the broker or the database cannot be reached.
    """
    log = logs.get_logger()
    guard.install()
    app = App(settings)
    app.key = key or load_service_key(settings, log)
    app.health.key = app.key
    log.info(
        "worker_starting",
        service_did=app.key.signer.did,
        key_source=app.key.source,
        queue=settings.queue,
        receipt_queue=settings.receipt_queue,
    )
    async with contextlib.AsyncExitStack() as stack:
        app.pool = await store.create_pool(settings.database_url, pooler=settings.database_pooler)
        stack.push_async_callback(app.pool.close)
        app.health.pool = app.pool
        applied = await _migrate(app.pool)
        for mig in applied:
            log.info("migration_applied", version=mig.version, name=mig.name)

        stragglers: set[asyncio.Future[Any]] = set()
        stack.push_async_callback(_end_stragglers, stragglers)
        app.broker = await Broker.connect(settings)
        stack.push_async_callback(app.broker.close)
        app.health.broker = app.broker
        await app.broker.declare_topology()

        if settings.http_port:
            port = 0 if member else settings.http_port
            server = await stack.enter_async_context(
                serve_http(HTTP_HOST, port, app.metrics, app.health)
            )
            app.http_port = server.port
            log.info("http_serving", host=HTTP_HOST, port=server.port)
        await stack.enter_async_context(
            _stopping_within(_Pruner(app.pool, log), "arrivals_pruner", stragglers)
        )
        if not member:
            poller = DepthPoller.for_settings(
                app.broker.connection, settings, app.metrics, interval=DEPTH_POLL_INTERVAL
            )
            await stack.enter_async_context(_stopping_within(poller, "depth_poller", stragglers))

        directory = await stack.enter_async_context(
            DidResolver(
                settings.plc_directory,
                ttl=settings.did_cache_ttl,
                on_request=app.metrics.directory_requests.inc,
            )
        )
        app.directory = directory
        app.consumer = Consumer(
            settings,
            app.broker,
            app.pool,
            app.key.signer,
            app.metrics,
            log,
            directory=directory,
        )
        app.health.consumer = app.consumer
        if freeze_heap:
            log.info("startup_heap_frozen", objects=_freeze_startup_heap())
        await app.consumer.start()
        log.info("worker_started", prefetch=settings.prefetch)
        try:
            yield app
        finally:
            app.health.stopping = True
            drained = await app.consumer.stop(float(settings.shutdown_timeout))
            log.info("worker_stopped", drained=drained)


async def serve(settings: Settings, member: Membership | None = None) -> int:
    """Run until SIGTERM or SIGINT, then drain and exit 0.

    A ``member`` of a group (``run --processes N``) tells its supervisor once it consumes,
    and stops (drains) by itself should its supervisor die.
    """
    loop = asyncio.get_running_loop()
    started: list[App] = []
    signalled = asyncio.Event()

    def on_signal() -> None:
        signalled.set()
        for app in started:
            app.request_stop()

    # installed before start-up, so a signal during start-up stops the worker once started
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        async with running(settings, freeze_heap=True, member=member is not None) as app:
            started.append(app)
            if signalled.is_set():
                app.request_stop()
            async with contextlib.AsyncExitStack() as stack:
                if member is not None:
                    member.started(app.http_port)
                    await stack.enter_async_context(member.watching(app.request_stop))
                await app.stop_requested.wait()
            reason = "signal" if signalled.is_set() else "supervisor_gone"
            logs.get_logger().info("worker_stopping", reason=reason)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0


def _freeze_startup_heap() -> int:
    """Move what start-up allocated (modules, the code of every library, settings, pools)
    out of the cyclic garbage collector's reach.

    A full collection walks every tracked object; nearly all of them live as long as the
    process, so each full collection cost 10-15 ms of a stopped event loop, several times a
    minute under load, to free a few hundred objects at most. Frozen, they are never walked
    again (refcounting still frees them); a full collection then takes 0.1-0.5 ms. Only the
    ``run`` command does this: tests start many workers in one process. Returns how many
    objects are frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _runner() -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is installed wherever it builds
        return asyncio.run
    return uvloop.run


def run_main(args: argparse.Namespace, settings: Settings) -> int:
    """``forge-worker run``: the worker, until SIGTERM or SIGINT; with ``--processes N``
    (N > 1, or 0 on a machine of several cores) a supervisor of N of them."""
    logs.configure(settings.log_format)
    index = getattr(args, "worker_index", None)
    if index is not None:  # one of a group's worker processes (supervisor.py starts them)
        member = Membership.from_arguments(index, getattr(args, "status_fd", None))
        member.bind_log_context()
        result: int = _runner()(serve(settings, member))
        return result
    processes = resolve_processes(settings.processes)
    if processes > 1:
        return supervise(settings, processes)
    result = _runner()(serve(settings))
    return result
