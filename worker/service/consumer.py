"""The pipeline, batch by batch, and THE one place that decides ack, retry or dead-letter.

Messages of the prefetch window are taken as they have arrived (a lone message is processed
at once; it never waits for a batch to fill). For each batch:

1. decode each request; an undecodable one is dead-lettered (permanent);
2. for each invocation addressed to the service: handler lookup (``HandlerNotFound``),
   full validation, the handler's own checks; a failure is answered with a signed error
   receipt, never stored;
3. ONE transaction: record first arrivals, re-validate time-bound failures as of the first
   arrival, answer tasks already in the ledger with their stored bytes (nothing executed),
   store the new receipts and apply the handlers set-based;
4. publish one response container per request, concurrently, each with a confirm;
5. settle: ack (``multiple=True`` over contiguous delivery tags), or on a transient failure
   publish a confirmed copy to the next retry tier (the last tier exhausted: to the
   dead-letter queue) and only then ack the original.

A failure of one message (or one row) never fails its neighbours: a batch transaction that
fails for a reason other than a lost database is retried one message per transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg
from structlog.typing import FilteringBoundLogger

from worker.amqp import guard, topology
from worker.commands import CommandError, Context, Handler, lookup
from worker.config import Settings
from worker.service import store
from worker.service.acks import AckTracker
from worker.service.broker import Broker, Incoming, Outgoing, copy_of, safe_copy_of
from worker.service.jobs import Item, Job, attempt_of, decides, ledgered
from worker.service.metrics import Metrics
from worker.service.resolve import DidResolver, Resolution, plc_issuers
from worker.ucan import (
    DecodeError,
    Resolver,
    Signer,
    ValidationError,
    build_receipt,
    decode_request,
    encode_container,
    validate_invocation,
)

#: most messages in one batch (one transaction)
MAX_BATCH: Final = 100
#: most body bytes in one batch (a batch always takes at least one message): decoded CBOR
#: can take tens of times its encoded size in memory, so what is decoded at once is bounded
#: by bytes, not only by count (typical requests are about 1 KiB, so this rarely binds)
MAX_BATCH_BYTES: Final = 1 << 20
#: batches processed at the same time (their transactions and publishes overlap)
MAX_CONCURRENT_BATCHES: Final = 4
#: seconds a delivery waits for company while another batch is in flight and has not yet
#: stored its work, or while the prefetch window is more than half full (see ``_batch_ready``)
BATCH_WAIT: Final = 0.02
#: seconds one batch's database work may take before it counts as a transient failure
DB_TIMEOUT: Final = 15.0
#: seconds a batch waits for a lost database to come back before it goes to a retry tier;
#: held batches fill the prefetch window, so the rest of the inbox waits where it is instead
#: of spending retry attempts (kept well under the broker's consumer timeout, 30 min)
DB_HOLD: Final = 60.0
#: seconds a batch waits for a PLC directory that cannot answer before it goes to a retry
#: tier (as a lost database holds it)
DIRECTORY_HOLD: Final = 60.0
#: validation errors re-checked as of an invocation's first arrival
_TIME_ERRORS: Final = frozenset({"Expired", "TooEarly"})

_RETRY_SQLSTATES: Final = ("08", "53", "57", "40")  # connection, resources, shutdown, conflicts


def is_transient_db_error(exc: BaseException) -> bool:
    """True for a lost or overloaded database (retry later), False for a row-specific error."""
    if isinstance(exc, store.CONNECTION_ERRORS):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        return state.startswith(_RETRY_SQLSTATES)
    return False


def _now() -> float:
    return time.time()


class Consumer:
    """Consumes the inbox in batches and settles every message (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        pool: asyncpg.Pool,
        signer: Signer,
        metrics: Metrics,
        log: FilteringBoundLogger,
        *,
        clock: Callable[[], float] = _now,
        max_batch: int = MAX_BATCH,
        max_concurrent_batches: int = MAX_CONCURRENT_BATCHES,
        db_hold: float = DB_HOLD,
        directory: DidResolver | None = None,
        directory_hold: float = DIRECTORY_HOLD,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.pool = pool
        self.signer = signer
        self.metrics = metrics
        self.log = log
        self.clock = clock
        self.max_batch = max_batch
        self.db_hold = db_hold
        self.service_did = signer.did
        static = {signer.did: [signer.public_key]} if signer.did != signer.key_did else {}
        self.resolver = Resolver(static)
        #: the PLC directory did:plc issuers are resolved from (None: none are)
        self.directory = directory
        self.directory_hold = directory_hold
        self.ctx = Context(signer.did, settings.allow_provision_without_plan)
        #: deliveries not yet in a batch, in delivery order
        self._buffer: deque[Item] = deque()
        #: a delivery taken from the queue that did not fit its batch: first in the next one
        self._carry: Item | None = None
        self._slots = asyncio.Semaphore(max_concurrent_batches)
        #: deliveries waiting that make a full batch while another batch is in flight
        self._fill = max(1, min(max_batch, settings.prefetch // 2))
        #: set when the buffer gets its first delivery or a full batch, or a batch finished
        #: or stored its work
        self._wake = asyncio.Event()
        self._batches: set[asyncio.Task[None]] = set()
        #: batches still decoding, checking or storing (not yet publishing their receipts)
        self._preparing = 0
        #: at most this many deliveries unacked, the next batch need not wait for the ones in
        #: flight to be confirmed (half the prefetch window: more is a backlog, where batches
        #: fill up)
        self._light = max(1, settings.prefetch // 2)
        self._acks = AckTracker()
        self._pending_arrivals: dict[str, datetime] = {}
        self._loop_task: asyncio.Task[None] | None = None
        #: whether the database is thought reachable, and the wait for it when it is not
        self._db = store.DatabaseWatch(pool, log)
        #: settles when nothing is buffered or being processed
        self.idle = asyncio.Event()
        self.idle.set()
        #: outcome -> how many so far (the ``messages`` metric's labels), for waiting on
        self.outcomes: Counter[str] = Counter()
        self._watchers: list[tuple[str, int, asyncio.Future[None]]] = []

    def _count(self, outcome: str) -> None:
        self.metrics.messages.labels(outcome).inc()
        self.outcomes[outcome] += 1
        for name, n, fut in self._watchers:
            if name == outcome and self.outcomes[name] >= n and not fut.done():
                fut.set_result(None)

    async def wait_for(self, outcome: str, n: int = 1) -> None:
        """Wait until ``n`` messages or invocations in total had ``outcome`` (``ok``,
        ``retried``, ``dead_lettered``, ``skipped``, ``duplicate`` or an error name)."""
        if self.outcomes[outcome] >= n:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        watcher = (outcome, n, fut)
        self._watchers.append(watcher)
        try:
            await fut
        finally:
            self._watchers.remove(watcher)

    # --- consuming -------------------------------------------------------------------------

    def deliver(self, msg: Incoming) -> None:
        """The broker's callback: buffer the delivery (synchronous: tags stay in order)."""
        channel = msg.channel
        assert msg.delivery_tag is not None
        self._acks.received(channel, msg.delivery_tag)
        attempt = attempt_of(msg, len(self.settings.retry_delays))
        self._buffer.append(Item(msg, channel, time.monotonic(), attempt))
        if len(self._buffer) in (1, self._fill):
            self._wake.set()
        self.idle.clear()
        self.metrics.in_flight.inc()
        if msg.timestamp is not None:
            ts = msg.timestamp
            if ts.tzinfo is None:
                ts = ts.replace(tzinfo=UTC)
            self.metrics.message_age.observe(max(0.0, self.clock() - ts.timestamp()))

    async def start(self) -> None:
        """Start the batch loop and subscribe to the inbox."""
        self._loop_task = asyncio.create_task(self._loop(), name="forge-worker-batches")
        await self.broker.start_consuming(self.deliver, self.settings.prefetch)

    async def stop(self, drain_within: float) -> bool:
        """Stop consuming, finish what was delivered (within ``drain_within`` s), stop the loop.

        Returns True when everything in flight was settled in time.
        """
        await self.broker.stop_consuming()
        self.log.info("consumer_cancelled", in_flight=self._acks.unsettled())
        drained = True
        try:
            async with asyncio.timeout(drain_within):
                await self.idle.wait()
        except TimeoutError:
            drained = False
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for task in list(self._batches):
            task.cancel()
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)
        await self._db.stop()
        return drained

    async def next_batch(self) -> list[Item]:
        """Wait for one delivery, then take whatever else has arrived (up to ``max_batch``
        messages and ``MAX_BATCH_BYTES``): a lone message never waits for company."""
        while self._carry is None and not self._buffer:
            self._wake.clear()
            await self._wake.wait()
        return self._take()

    def _take(self) -> list[Item]:
        if self._carry is not None:
            batch, self._carry = [self._carry], None
        else:
            batch = [self._buffer.popleft()]
        size = len(batch[0].msg.body)
        buffer = self._buffer
        while buffer and len(batch) < self.max_batch:
            item = buffer.popleft()
            size += len(item.msg.body)
            if size > MAX_BATCH_BYTES:
                self._carry = item  # keeps delivery order: it leads the next batch
                break
            batch.append(item)
        return batch

    async def _loop(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                await self._batch_ready()
                batch = self._take()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.create_task(self._run_batch(batch))
            self._batches.add(task)
            task.add_done_callback(self._batch_done)

    async def _batch_ready(self) -> None:
        """Wait until the next batch should form.

        With nothing in flight, at once: a lone message on an idle worker goes alone. While
        a batch is in flight, at once when a full batch waits (half the prefetch window);
        at once when every batch in flight has stored its work (it only waits for the
        broker's confirms and settles) and the worker holds at most half its prefetch
        window; otherwise once the oldest delivery has waited ``BATCH_WAIT``.

        Under a backlog the window is full, so batches fill up (one transaction, one write
        of receipts, one ack each) instead of free slots splitting the window into batches
        of 2-4 messages (measured: 27 messages a batch on average against 95). Under a
        moderate load a delivery does not wait for the batch ahead of it to be confirmed:
        the next batch is decoded, checked and stored while the broker confirms the one
        before, which costs CPU in smaller batches and cuts the tail (README, "Decisions");
        a delivery waits at most ``BATCH_WAIT`` for company.
        """
        while True:
            left: float | None = None
            if self._carry is not None:
                return
            if self._buffer:
                if not self._batches or len(self._buffer) >= self._fill:
                    return
                if not self._preparing and self._acks.unsettled() <= self._light:
                    return
                left = self._buffer[0].received + BATCH_WAIT - time.monotonic()
                if left <= 0:
                    return
            self._wake.clear()
            if left is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._wake.wait()

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        self._slots.release()
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            self.log.error("batch_crashed", error=repr(task.exception()))
        if not self._batches and not self._buffer and self._carry is None:
            self.idle.set()

    # --- one batch -------------------------------------------------------------------------

    async def _run_batch(self, batch: list[Item]) -> None:
        try:
            await self.process(batch)
        finally:
            self.metrics.in_flight.dec(len(batch))

    async def process(self, batch: list[Item]) -> None:
        """Decode, validate, store, answer and settle ``batch``."""
        now = self.clock()
        try:
            await self._prepare(batch, now)
            await self._answer(batch, now)
        except Exception as exc:  # a bug: retry (then dead-letter), never drop the batch
            self.log.exception("batch_failed", error=_describe(exc))
            for item in batch:
                item.fail("transient", "internal", _describe(exc))
        try:
            await self._settle(batch)
        except BaseException as exc:
            # whatever went wrong, no delivery of this batch may stay unsettled: its tag
            # would hold back the acks of every later delivery (they go only up to the
            # lowest pending tag), and the prefetch window would fill and stop the worker
            self.log.error("batch_settle_failed", error=_describe(exc))
            await asyncio.shield(self._abandon(batch))
            if not isinstance(exc, Exception):
                raise

    async def _abandon(self, batch: list[Item]) -> None:
        """Give back to the queue every delivery of ``batch`` not yet settled (it will be
        delivered again and answered from the ledger, or dead-lettered by the broker's
        delivery limit if it keeps failing)."""
        for item in batch:
            if not item.settled:
                await self._nack(item)

    async def _prepare(self, batch: list[Item], now: float) -> None:
        """Decode, resolve, check and store ``batch``: while a batch is here, the next one
        waits for company (see ``_batch_ready``)."""
        self._preparing += 1
        try:
            for item in batch:
                self._decode(item)
            await self._resolve(batch)
            for item in batch:
                if item.failure is None:
                    for job in item.jobs:
                        self._check(job, now)
            await self._store(batch, now)
        finally:
            self._preparing -= 1
            if not self._preparing:
                self._wake.set()

    def _decode(self, item: Item) -> None:
        problem = self._unanswerable(item.msg)
        if problem is not None:  # decided before anything is executed: nothing is written
            item.fail("permanent", "unencodable", problem)
            return
        try:
            item.request = decode_request(item.msg.body, max_size=self.settings.max_message_size)
        except DecodeError as exc:
            item.fail("permanent", "undecodable", str(exc))
            return
        except Exception as exc:  # a decoder bug must not lose the message: dead-letter it
            item.fail("permanent", "undecodable", f"{type(exc).__name__}: {exc}")
            return
        if not item.request.invocations and item.request.dropped:
            # tokens were there but none could be read: undecodable, not "nothing for us"
            item.fail("permanent", "undecodable", "; ".join(item.request.dropped)[:500])
            return
        proofs = item.request.delegations
        for inv in item.request.invocations:
            if (inv.aud or inv.sub) == self.service_did:
                item.jobs.append(Job(inv, proofs))

    # --- resolving did:plc issuers ---------------------------------------------------------

    async def _resolve(self, batch: list[Item]) -> None:
        """Resolve the batch's did:plc issuers before anything is validated, so validation
        stays a pure function of bytes, documents and the clock. A directory that cannot
        answer holds the batch (asking again) up to ``directory_hold`` s; then the messages
        that need it go to a retry tier, like a lost database: never an error receipt."""
        wanted: dict[int, set[str]] = {}
        refused: dict[str, str] = {}
        for item in batch:
            if item.failure is None and item.jobs:
                dids = plc_issuers([(j.inv, j.proofs) for j in item.jobs], refused)
                if dids:
                    wanted[id(item)] = dids
        if not wanted and not refused:
            return
        resolution = Resolution(failures=dict(refused))
        if wanted and self.directory is not None:
            got = await self.directory.resolve_holding(
                set().union(*wanted.values()),
                hold=self.directory_hold,
                log=self.log,
                counted=lambda outcome, n: self.metrics.did_resolutions.labels(outcome).inc(n),
            )
            resolution.documents.update(got.documents)
            resolution.failures.update(got.failures)
            resolution.unavailable = got.unavailable
        view = self.resolver.with_documents(resolution.documents, resolution.failures)
        for item in batch:
            down = sorted(wanted.get(id(item), set()) & resolution.unavailable.keys())
            if down:
                item.fail("transient", "directory", resolution.unavailable[down[0]])
                continue
            for job in item.jobs:
                job.resolver = view

    def _unanswerable(self, msg: Incoming) -> str | None:
        """Why no response to ``msg`` could be written, or None: its ``reply_to`` (the
        routing key) and its correlation id are short strings (255 bytes in UTF-8). A
        publisher's bytes that are not UTF-8 were read as U+FFFD, three bytes each."""
        to = topology.response_queue(msg.reply_to, self.settings.receipt_queue)
        correlation = msg.correlation_id or msg.message_id
        for name, value in (("reply_to", to), ("correlation id", correlation)):
            if not guard.shortstr_ok(value):
                assert value is not None
                return (
                    f"cannot answer: its {name} is {len(value.encode())} bytes in UTF-8, "
                    f"more than AMQP's {guard.SHORTSTR_MAX}"
                )
        return None

    def _check(self, job: Job, now: float) -> None:
        """Dispatcher order of ucantone: handler, then validation, then the handler's checks."""
        inv = job.inv
        job.handler = lookup(inv.cmd)
        if job.handler is None:
            job.error = ("HandlerNotFound", f"no handler for command {inv.cmd!r} at this service")
            return
        self._validate(job, now)

    def _validate(self, job: Job, at: float) -> None:
        assert job.handler is not None
        try:
            validate_invocation(
                job.inv,
                job.proofs,
                now=int(at),
                clock_skew=self.settings.clock_skew,
                resolver=job.resolver or self.resolver,
            )
            job.prepared = job.handler.prepare(job.inv, self.ctx)
            job.error, job.validated = None, True
        except (ValidationError, CommandError) as exc:
            job.error = (exc.name, exc.message)
        except Exception as exc:  # a bug hit by this input: refuse it, never its neighbours
            self.log.exception("validation_crashed", invocation=job.cid, error=_describe(exc))
            job.error = ("UnknownError", "cannot validate this invocation: internal error")

    # --- the transaction -------------------------------------------------------------------

    async def _store(self, batch: list[Item], now: float) -> None:
        # only requests the database can change: a valid invocation (execute, or answer from
        # the ledger) or a time-bound failure (re-check as of the first arrival); the rest
        # are answered even while the database is away
        live = [
            i
            for i in batch
            if i.failure is None
            and any(j.error is None or j.error[0] in _TIME_ERRORS for j in i.jobs)
        ]
        if not live:  # (pending arrivals wait for a batch that needs the database anyway)
            return
        arrivals = self._arrivals_to_record(live, now)
        for last_try in (False, True):
            if not await self._db.hold(self.db_hold):
                for item in live:
                    item.fail("transient", "database", f"unreachable for {self.db_hold:g} s")
                return
            try:
                async with asyncio.timeout(DB_TIMEOUT):
                    async with self.pool.acquire() as conn:
                        await self._write(conn, live, arrivals, now)
                self._flushed(arrivals)
                return
            except Exception as exc:
                self._reset(live)
                if is_transient_db_error(exc):
                    if not last_try:  # (a lost database: wait for it) then try once more
                        if isinstance(exc, store.CONNECTION_ERRORS):
                            self._db.lost(_describe(exc))
                        continue
                    for item in live:
                        item.fail("transient", "database", _describe(exc))
                    return
                if len(live) <= 1:
                    for item in live:
                        item.fail("transient", "database", _describe(exc))
                    return
                self.log.warning("batch_split", size=len(live), error=_describe(exc))
                break
        # a row-specific failure: one message per transaction, so the others go through
        for item in live:
            try:
                async with asyncio.timeout(DB_TIMEOUT):
                    async with self.pool.acquire() as conn:
                        await self._write(conn, [item], arrivals, now)
                self._flushed(arrivals)
            except Exception as exc:
                self._reset([item])
                item.fail("transient", "database", _describe(exc))

    def _reset(self, items: list[Item]) -> None:
        """Forget what a rolled-back transaction decided (receipts it did not store, the
        outcomes its checks read)."""
        for item in items:
            for job in item.jobs:
                if job.decided:
                    job.ok, job.error, job.decided = None, None, False
                if job.error is None:
                    job.receipt, job.duplicate = None, False

    def _arrivals_to_record(self, live: list[Item], now: float) -> dict[str, datetime]:
        seen = datetime.fromtimestamp(now, UTC)
        arrivals = dict(self._pending_arrivals)
        for item in live:
            if item.msg.redelivered or item.attempt > 0:
                for job in item.jobs:
                    if job.validated:  # refused work writes nothing
                        arrivals.setdefault(job.cid, seen)
        return arrivals

    def _flushed(self, arrivals: dict[str, datetime]) -> None:
        for cid in arrivals:
            self._pending_arrivals.pop(cid, None)

    async def _write(
        self,
        conn: asyncpg.Connection,
        items: list[Item],
        arrivals: dict[str, datetime],
        now: float,
    ) -> None:
        """The batch's database work: one statement (the ledger and the commands' effects,
        see ``store.claim_receipts``), in a transaction only when arrivals are recorded or
        time bounds re-checked first (retries and redeliveries), or a command reads the
        database to decide (``/provider/add``'s checks, ``/space/info``)."""
        jobs = [j for i in items for j in i.jobs]
        # time bounds as of the first arrival: the arrivals table, or when the ledger stored
        # the task's receipt (it was valid then); never a header
        late = [j for j in jobs if j.error is not None and j.error[0] in _TIME_ERRORS]
        if not arrivals and not late and not any(decides(j) for j in jobs):
            await self._claim(conn, jobs, {}, now)
            return
        async with conn.transaction():
            await store.record_arrivals(conn, arrivals)
            ledger: dict[str, tuple[bytes, datetime]] = {}
            if late:
                ledger = await store.stored_receipts(conn, {j.task for j in late})
                first = await store.first_arrivals(conn, [j.cid for j in late])
                for job in late:
                    times = (first.get(job.cid), ledger.get(job.task, (b"", None))[1])
                    seen = [t for t in times if t]
                    if seen:
                        previous = job.error
                        self._validate(job, min(seen).timestamp())
                        if job.error is not None:
                            job.error = previous
            deciding = [j for j in jobs if decides(j)]
            if deciding:
                stored = {j.task for j in deciding if ledgered(j)} - ledger.keys()
                if stored:
                    ledger.update(await store.stored_receipts(conn, stored))
                await self._decide(conn, deciding, ledger)
            await self._claim(conn, jobs, ledger, now)

    async def _decide(
        self, conn: asyncpg.Connection, jobs: list[Job], ledger: dict[str, tuple[bytes, datetime]]
    ) -> None:
        """Each handler's database checks, for the jobs it has in this batch (message
        order); a task the ledger holds is answered with its stored receipt instead, and a
        task repeated within the batch shares its first job's outcome."""
        groups: dict[str, list[Job]] = {}
        first: dict[str, Job] = {}
        repeats: list[tuple[Job, Job]] = []
        for job in jobs:
            assert job.handler is not None
            ledgered = job.handler.LEDGERED
            if ledgered and job.task in ledger:
                continue
            if ledgered and job.task in first:
                repeats.append((job, first[job.task]))
                continue
            first[job.task] = job
            groups.setdefault(job.handler.COMMAND, []).append(job)
        for group in groups.values():
            handler = group[0].handler
            assert handler is not None and handler.decide is not None
            outcomes = await handler.decide(conn, [(j.task, j.prepared) for j in group], self.ctx)
            for job, outcome in zip(group, outcomes, strict=True):
                job.ok, job.error, job.decided = outcome.ok, outcome.error, True
        for job, leader in repeats:
            job.ok, job.error, job.decided = leader.ok, leader.error, True

    async def _claim(
        self,
        conn: asyncpg.Connection,
        jobs: list[Job],
        ledger: dict[str, tuple[bytes, datetime]],
        now: float,
    ) -> None:
        iat = int(now)
        valid: list[Job] = []
        for job in jobs:
            if job.error is not None:
                continue
            if ledgered(job):
                valid.append(job)
            else:  # a read: answered every time, never stored
                job.receipt = build_receipt(self.signer, ran=job.inv.task_cid, ok=job.ok, iat=iat)
        new: dict[str, Job] = {}  # the first job of each task, in message order
        for job in valid:
            if job.task in ledger:
                job.receipt, job.duplicate = ledger[job.task][0], True
            elif job.task not in new:
                new[job.task] = job
        # signed before the ledger is read (in the same statement as the insert): a task the
        # ledger holds already (a redelivery) costs one signature that is thrown away
        by_handler: dict[str, list[tuple[str, object]]] = {}
        handlers: dict[str, Handler] = {}
        for task, job in new.items():
            job.receipt = build_receipt(self.signer, ran=job.inv.task_cid, ok=job.ok, iat=iat)
            assert job.handler is not None
            handlers[job.handler.COMMAND] = job.handler
            by_handler.setdefault(job.handler.COMMAND, []).append((task, job.prepared))
        effects = [
            (handlers[c].EFFECTS, handlers[c].effect_args(it))
            for c, it in by_handler.items()
            if handlers[c].EFFECTS
        ]
        inserted, held = await store.claim_receipts(
            conn, [(t, j.cid, j.receipt) for t, j in sorted(new.items()) if j.receipt], effects
        )
        ledger.update(held)
        lost = [t for t in new if t not in inserted and t not in ledger]
        if lost:  # another worker stored these tasks meanwhile: answer with its bytes
            ledger.update(await store.stored_receipts(conn, lost))
        for job in valid:
            if job.duplicate or (job.task in inserted and new.get(job.task) is job):
                continue
            # a task the ledger held, a repeat within this batch, or stored by another worker
            job.duplicate = True
            job.receipt = ledger[job.task][0] if job.task in ledger else new[job.task].receipt

    # --- responses -------------------------------------------------------------------------

    async def _answer(self, batch: list[Item], now: float) -> None:
        iat = int(now)
        sends: list[tuple[Item, Outgoing]] = []
        receipt_queue = self.settings.receipt_queue
        for item in batch:
            if item.failure is not None:
                continue
            for job in item.jobs:
                if job.error is not None:
                    job.receipt = build_receipt(
                        self.signer, ran=job.inv.task_cid, error=job.error, iat=iat
                    )
            body = encode_container([j.receipt for j in item.jobs if j.receipt is not None])
            msg = item.msg
            sends.append(
                (
                    item,
                    Outgoing(
                        routing_key=topology.response_queue(msg.reply_to, receipt_queue),
                        body=body,
                        correlation_id=msg.correlation_id or msg.message_id,
                        content_type=topology.CONTENT_TYPE,
                        timestamp=datetime.fromtimestamp(now, UTC),
                    ),
                )
            )
        failures = await self.broker.publish_many([out for _, out in sends])
        for (item, _), failed in zip(sends, failures, strict=True):
            # refused: a direct reply-to name no attempt can deliver to; acked, as the effect
            # is stored and a resend is answered from the ledger (service/direct_reply.py)
            if failed is not None and failed.kind != "refused":
                kind = "permanent" if failed.kind == "unencodable" else "transient"
                item.fail(kind, failed.kind if kind == "permanent" else "publish", str(failed))
        confirmed = failures.count(None)
        if confirmed:
            self.metrics.receipts_published.inc(confirmed)

    # --- settling: the one place that decides ----------------------------------------------

    async def _settle(self, batch: list[Item]) -> None:
        copies: list[tuple[Item, Outgoing, str]] = []
        now = self.clock()
        for item in batch:
            if item.failure is None:
                continue
            if item.failure == "transient":
                for job in item.jobs:
                    if job.validated:  # refused work writes nothing
                        self._pending_arrivals.setdefault(job.cid, datetime.fromtimestamp(now, UTC))
            copies.append((item, *self._successor(item, now)))
        results = await self.broker.publish_many([out for _, out, _ in copies])
        unsettled: set[int] = set()
        for (item, out, outcome), result in zip(copies, results, strict=True):
            if result is not None:
                # the successor is not confirmed, so the original must stay: back to the queue
                unsettled.add(id(item))
                self.log.error(
                    "successor_unconfirmed", queue=out.routing_key, error=_describe(result)
                )
                await self._nack(item)
            else:
                self._count(outcome)
                self.log.warning(
                    "request_" + outcome,
                    message_id=item.msg.message_id,
                    reason=item.reason,
                    error=item.error,
                    attempt=item.attempt + 1,
                    queue=out.routing_key,
                )
        for item in batch:
            if id(item) not in unsettled:
                self._report(item)
        await self._ack([i for i in batch if id(i) not in unsettled])
        if self._pending_arrivals:
            await self._flush_arrivals()

    def _successor(self, item: Item, now: float) -> tuple[Outgoing, str]:
        """Where a failed message goes next: a retry tier, or the dead-letter queue. A copy
        that cannot be written (a property or header of the publisher's) makes the message
        a dead letter with those left out (:func:`worker.service.broker.safe_copy_of`)."""
        msg, q = item.msg, self.settings.queue
        attempts = item.attempt + 1
        headers: dict[str, Any] = {
            topology.H_ATTEMPT: attempts,
            topology.H_ERROR: item.error[:500],
            topology.H_ORIGIN_QUEUE: q,
        }
        delays = self.settings.retry_delays
        if item.failure == "transient" and item.attempt < len(delays):
            out = copy_of(msg, topology.retry_name(q, delays[item.attempt]), headers)
            problem = self.broker.unencodable(out)
            if problem is None:
                return out, "retried"
            item.failure, item.reason = "permanent", "unencodable"
            item.error = headers[topology.H_ERROR] = f"cannot copy to a retry queue: {problem}"
        headers[topology.H_REASON] = (
            item.reason if item.failure == "permanent" else "retries-exhausted"
        )
        headers[topology.H_DEAD_LETTERED_AT] = int(now)
        dead = topology.dead_letter_name(q)
        out = copy_of(msg, dead, headers)
        if self.broker.unencodable(out) is not None:
            out = safe_copy_of(msg, dead, headers, frame_max=self.broker.frame_max)
        return out, "dead_lettered"

    def _report(self, item: Item) -> None:
        latency_ms = round((time.monotonic() - item.received) * 1000, 3)
        self.metrics.latency.observe(latency_ms / 1000)
        if item.failure is not None:
            return
        if not item.jobs:
            self._count("skipped")
            self.log.info(
                "request_skipped",
                message_id=item.msg.message_id,
                reason="no invocation for this service: answered with an empty container",
                tokens=len(item.request.invocations) if item.request else 0,
                latency_ms=latency_ms,
            )
            return
        for job in item.jobs:
            outcome = "duplicate" if job.duplicate else (job.error[0] if job.error else "ok")
            self._count(outcome)
            if job.duplicate:
                self.metrics.duplicates.inc()
            self.log.info(
                "invocation_answered",
                invocation=job.cid,
                task=job.task,
                iss=job.inv.iss,
                cmd=job.inv.cmd,
                outcome=outcome,
                error=job.error[1] if job.error else None,
                latency_ms=latency_ms,
            )

    async def _ack(self, items: list[Item]) -> None:
        by_channel: dict[Any, list[Item]] = {}
        for item in items:
            item.settled = True
            by_channel.setdefault(item.channel, []).append(item)
        for channel, group in by_channel.items():
            tags = [i.msg.delivery_tag for i in group if i.msg.delivery_tag is not None]
            top = self._acks.done(channel, tags)
            if top is None:
                continue
            try:
                # shielded: a cancelled drain must not leave an effect acked only halfway
                await asyncio.shield(channel.basic_ack(delivery_tag=top, multiple=True))
            except Exception as exc:
                # the channel is gone and the broker requeues its messages: the ledger
                # answers them again byte for byte
                self._acks.drop_channel(channel)
                self.log.warning("ack_lost", error=_describe(exc))

    async def _nack(self, item: Item) -> None:
        """Give ``item`` back to the queue, then ack what its tag was holding back."""
        assert item.msg.delivery_tag is not None
        item.settled = True
        top = self._acks.forget(item.channel, item.msg.delivery_tag)
        try:
            await item.channel.basic_nack(delivery_tag=item.msg.delivery_tag, requeue=True)
            if top is not None:
                await asyncio.shield(item.channel.basic_ack(delivery_tag=top, multiple=True))
        except Exception:  # a lost channel requeues by itself
            self._acks.drop_channel(item.channel)

    def stalled_for(self) -> float:
        """Seconds during which deliveries were pending and none was settled."""
        return self._acks.stalled_for()

    async def _flush_arrivals(self) -> None:
        pending = dict(self._pending_arrivals)
        try:
            async with asyncio.timeout(2.0):
                async with self.pool.acquire() as conn:
                    await store.record_arrivals(conn, pending)
            self._flushed(pending)
        except Exception as exc:  # kept in memory; the next batch transaction writes them
            self.log.debug("arrivals_deferred", count=len(pending), error=_describe(exc))


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__
