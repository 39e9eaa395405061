"""Chaos run: N signed /customer/add invocations through worker kills, a broker connection
cut and a database outage; then count what was answered, written, repeated, dead-lettered
and lost.

    uv run python bench/chaos.py --n 10000 --kills 3 --db-outage 10 --broker-cut
    uv run python bench/chaos.py --quick          # N=500 at 100/s, 1 kill, a cut, 3 s outage

Isolated: its own inbox queue (``chaos.<id>``) and database (``fw_chaos_<id>``), both
removed at the end (``--keep`` leaves them). The workers are ``forge-worker run``
subprocesses that reach RabbitMQ and Postgres through loopback fault proxies
(tests/support/proxy.py), so no service is stopped. The publisher and the receipt
collector talk to RabbitMQ directly: only the workers see the faults.

Faults fire at random points of progress (a fraction of N answered), so they always land
mid-stream whatever the throughput:

* kill: SIGKILL of a random worker, restarted at once;
* broker cut: every worker's AMQP connection is reset;
* database outage: the Postgres proxy resets live connections and refuses new ones for
  D seconds.

Definitions (printed and written to bench/results/chaos.json):

* sent: requests the broker confirmed;
* answered: distinct correlation ids with at least one receipt on the reply queue;
* rows: rows in ``customer`` (every request is for a different customer);
* ledger: rows in ``forge_worker.receipts`` (one per task executed);
* duplicate effects: committed writes to ``customer`` beyond the first, per customer,
  counted by an audit trigger installed in the run's database. The trigger's row commits
  or rolls back with the write, so this counts exactly the tasks whose effect happened
  more than once (a redelivery that is answered from the ledger writes nothing);
* repeated receipts: extra receipts for an answered request; allowed only when
  byte-identical, any difference is counted as ``receipt_mismatch``;
* dead-lettered: distinct requests in the dead-letter queue;
* lost: sent requests neither answered nor dead-lettered.

Exit status: 0 when the goal holds (nothing lost, no duplicate effect, nothing
dead-lettered, every receipt ok and identical across repeats), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aio_pika  # noqa: E402
import asyncpg  # noqa: E402

from tests.support.harness import (  # noqa: E402
    Identities,
    ReceiptCollector,
    SignedRequest,
    WorkerProcess,
    build_requests,
    db_counts,
    install_write_audit,
    poll_until,
    publish,
    queue_state,
    run_command,
    worker_env,
)
from tests.support.proxy import Proxy  # noqa: E402
from worker.amqp import topology  # noqa: E402

AMQP_URL = os.environ.get("FORGE_WORKER_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
ADMIN_DSN = os.environ.get(
    "FORGE_WORKER_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
RESULTS = ROOT / "bench" / "results"


@dataclass
class Timeline:
    t0: float = field(default_factory=time.monotonic)
    events: list[dict[str, Any]] = field(default_factory=list)

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    def mark(self, what: str, **detail: Any) -> None:
        event = {"t": self.now(), "event": what, **detail}
        self.events.append(event)
        extra = " ".join(f"{k}={v}" for k, v in detail.items())
        print(f"[{event['t']:8.2f}s] {what} {extra}".rstrip(), flush=True)


class Supervisor:
    """Keeps one worker running, as the deployment's ``restart: unless-stopped`` does: a
    worker that exits by itself (e.g. exit 3, the database unreachable at start-up) is
    started again after ``backoff`` seconds; one killed by the chaos is started at once."""

    def __init__(self, worker: WorkerProcess, index: int, tl: Timeline, backoff: float = 1.0):
        self.worker = worker
        self.index = index
        self.tl = tl
        self.backoff = backoff
        #: exit codes of exits nobody asked for
        self.unplanned: list[int] = []
        self._killing = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.worker.start()
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            code = await self.worker.wait()
            if self._stopping:
                return
            if self._killing:
                self._killing = False
            else:
                self.unplanned.append(code)
                self.tl.mark("worker_exited", worker=self.index, code=code)
                await asyncio.sleep(self.backoff)  # the supervisor's restart delay
            await self.worker.start()
            self.tl.mark("restart", worker=self.index)

    async def kill(self) -> None:
        """SIGKILL the worker; the watcher starts it again at once."""
        self._killing = True
        await self.worker.kill()

    async def stop(self) -> None:
        self._stopping = True
        await self.worker.stop(within=10)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.worker.close()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--n", type=int, default=10_000, help="invocations to send (default 10000)")
    p.add_argument("--kills", type=int, default=3, help="SIGKILLs of a worker (default 3)")
    p.add_argument(
        "--db-outage",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="database unreachable this long, once (0: none; default 10)",
    )
    p.add_argument("--broker-cut", action="store_true", help="cut the broker connection once")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument(
        "--rate",
        type=float,
        default=0.0,
        metavar="PER_SECOND",
        help="publish at most this fast (default: as fast as confirms allow)",
    )
    p.add_argument(
        "--retry-delays",
        default=None,
        metavar="S,S,...",
        help="FORGE_WORKER_RETRY_DELAYS for the workers (default: the worker's)",
    )
    p.add_argument("--prefetch", type=int, default=None, help="FORGE_WORKER_PREFETCH")
    p.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="give up waiting for quiescence after this long (default 900)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="N=500 published at 100/s, 1 kill, a broker cut, a 3 s outage (for development)",
    )
    p.add_argument("--keep", action="store_true", help="keep the queues and database")
    p.add_argument("--out", type=Path, default=RESULTS / "chaos.json", help="JSON results")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.kills, args.db_outage, args.broker_cut = 500, 1, 3.0, True
        # paced, so that the faults land mid-stream (unpaced, 500 are done in a second)
        args.rate = args.rate or 100.0
        if args.out == RESULTS / "chaos.json":
            args.out = RESULTS / "chaos-quick.json"
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    return args


async def _dead_lettered(conn: aio_pika.abc.AbstractConnection, dlq: str) -> set[str]:
    """Correlation ids in the DLQ, read without removing anything (closing the channel
    requeues every unacked get)."""
    ids: set[str] = set()
    state = await queue_state(conn, dlq)
    if state is None or state.messages == 0:
        return ids
    ch = await conn.channel()
    try:
        q = await ch.declare_queue(dlq, passive=True)
        while (msg := await q.get(no_ack=False, fail=False)) is not None:
            ids.add(msg.correlation_id or msg.message_id or "?")
    finally:
        await ch.close()
    return ids


async def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    tl = Timeline()
    run_id = uuid.uuid4().hex[:10]
    queue = f"chaos.{run_id}"
    reply_queue = f"{queue}.replies"
    db_name = f"fw_chaos_{run_id}"
    logs = RESULTS / f"chaos-{run_id}"
    logs.mkdir(parents=True, exist_ok=True)
    print(
        f"chaos {run_id}: n={args.n} kills={args.kills} broker_cut={args.broker_cut} "
        f"db_outage={args.db_outage}s workers={args.workers} seed={args.seed}",
        flush=True,
    )

    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{db_name}"')
    await admin.close()
    dsn = ADMIN_DSN.rsplit("/", 1)[0] + "/" + db_name

    ids = Identities.generate()
    started = time.monotonic()
    requests = build_requests(ids, args.n)
    build_s = time.monotonic() - started
    tl.mark("signed", n=len(requests), seconds=round(build_s, 2))

    conn = await aio_pika.connect_robust(AMQP_URL)
    workers: list[Supervisor] = []
    result: dict[str, Any] = {}
    try:
        async with Proxy(5672) as amqp_proxy, Proxy(5432) as pg_proxy:
            try:
                extra = ids.worker_env()
                if args.retry_delays:
                    extra["FORGE_WORKER_RETRY_DELAYS"] = args.retry_delays
                if args.prefetch:
                    extra["FORGE_WORKER_PREFETCH"] = str(args.prefetch)
                env = worker_env(
                    amqp_url=amqp_proxy.url(AMQP_URL),
                    database_url=pg_proxy.url(dsn),
                    queue=queue,
                    extra=extra,
                )
                # migrations straight to the database, then the audit trigger on customer
                rc = await run_command(
                    {**env, "FORGE_WORKER_DATABASE_URL": dsn}, logs / "migrate.log", "migrate"
                )
                if rc != 0:
                    raise SystemExit(f"migrate failed ({rc}); see {logs / 'migrate.log'}")
                await install_write_audit(dsn)

                collector = ReceiptCollector()
                await collector.start(await conn.channel(), reply_queue)
                workers = [
                    Supervisor(WorkerProcess(env, logs / f"worker-{i}.log"), i, tl)
                    for i in range(args.workers)
                ]
                for w in workers:
                    await w.start()
                await poll_until(
                    lambda: _consumers_at_least(conn, queue, args.workers),
                    within=60,
                    what=f"{args.workers} consumers on {queue}",
                )
                tl.mark("workers_ready", workers=args.workers)

                faults = _schedule(rng, args)
                tl.mark("faults_planned", plan=[(f, round(at, 3)) for at, f in faults])
                pub_ch = await conn.channel(publisher_confirms=True)
                t_pub = time.monotonic()
                publisher = asyncio.create_task(
                    _publish(pub_ch, queue, reply_queue, requests, args.rate)
                )
                fault_task = asyncio.create_task(
                    _inject(conn, faults, args, collector, workers, amqp_proxy, pg_proxy, rng, tl)
                )
                sent = await publisher
                publish_s = time.monotonic() - t_pub
                tl.mark(
                    "published",
                    sent=sent,
                    seconds=round(publish_s, 2),
                    per_second=round(sent / publish_s, 1),
                )
                try:
                    await asyncio.wait_for(fault_task, args.timeout)
                    tl.mark("faults_done")
                except TimeoutError:
                    tl.mark("faults_incomplete", detail="progress stalled before every fault fired")

                # quiescence: every request answered, or (bounded) nothing left anywhere
                all_ids = [r.correlation_id for r in requests]
                try:
                    await collector.wait_for(all_ids, within=args.timeout)
                    tl.mark("all_answered")
                except AssertionError as exc:
                    tl.mark("not_all_answered", detail=str(exc))
                t_done = time.monotonic()
                dead = await _dead_lettered(conn, topology.dead_letter_name(queue))
                counts = await db_counts(dsn)
                problems = collector.check(requests)
                answered = collector.answered & set(all_ids)
                lost_ids = set(all_ids) - answered - dead
                repeats = sum(len(collector.bodies[i]) - 1 for i in answered)
                result = {
                    "run": run_id,
                    "seed": args.seed,
                    "config": {
                        "n": args.n,
                        "kills": args.kills,
                        "broker_cut": args.broker_cut,
                        "db_outage_s": args.db_outage,
                        "workers": args.workers,
                        "retry_delays": args.retry_delays,
                        "prefetch": args.prefetch,
                    },
                    "sent": sent,
                    "answered": len(answered),
                    "rows": counts.customers,
                    "ledger_rows": counts.ledger,
                    "customer_writes": counts.writes,
                    "duplicate_effects": counts.duplicate_effects,
                    "repeated_receipts": repeats,
                    "receipt_mismatch": len(problems),
                    "dead_lettered": len(dead),
                    "lost": len(lost_ids),
                    # from the workers' logs: redeliveries answered with the stored receipt
                    # (the exactly-once effect at work) and transient failures sent to a tier
                    "answered_from_ledger": sum(
                        w.worker.events("invocation_answered", outcome="duplicate") for w in workers
                    ),
                    "retried": sum(w.worker.events("request_retried") for w in workers),
                    "worker_starts": sum(w.worker.starts for w in workers),
                    "unplanned_worker_exits": [c for w in workers for c in w.unplanned],
                    "proxy": {
                        "amqp_connections": amqp_proxy.stats.connections,
                        "amqp_cut": amqp_proxy.stats.cut,
                        "pg_connections": pg_proxy.stats.connections,
                        "pg_refused": pg_proxy.stats.refused,
                        "pg_cut": pg_proxy.stats.cut,
                    },
                    "timings_s": {
                        "sign": round(build_s, 2),
                        "publish": round(publish_s, 2),
                        "publish_to_all_answered": round(t_done - t_pub, 2),
                        "total": tl.now(),
                    },
                    "throughput_per_s": round(len(answered) / max(t_done - t_pub, 1e-9), 1),
                    "longest_receipt_gap": _longest_gap(collector, tl),
                    "problems_sample": problems[:10],
                    "lost_sample": sorted(lost_ids)[:10],
                    "events": tl.events,
                    "logs": str(logs),
                }
                await collector.stop()
            finally:
                # workers first: they must not outlive the proxies they talk through
                for w in workers:
                    await w.stop()
    finally:
        if not args.keep:
            delays = (
                tuple(int(d) for d in args.retry_delays.split(","))
                if args.retry_delays
                else topology.DEFAULT_RETRY_DELAYS
            )
            await _cleanup(conn, queue, reply_queue, db_name, delays)
        await conn.close()

    _report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {args.out}")
    ok = (
        result["lost"] == 0
        and result["duplicate_effects"] == 0
        and result["dead_lettered"] == 0
        and result["receipt_mismatch"] == 0
        and result["answered"] == result["sent"] == args.n
        and result["rows"] == result["ledger_rows"] == args.n
    )
    print("GOAL MET" if ok else "GOAL NOT MET")
    return 0 if ok else 1


async def _consumers_at_least(conn: aio_pika.abc.AbstractConnection, queue: str, n: int) -> bool:
    state = await queue_state(conn, queue)
    return state is not None and state.consumers >= n


def _schedule(rng: random.Random, args: argparse.Namespace) -> list[tuple[float, str]]:
    """Faults at random points of progress (fraction of N answered), in firing order."""
    plan = [(rng.uniform(0.05, 0.9), "kill") for _ in range(args.kills)]
    if args.broker_cut:
        plan.append((rng.uniform(0.05, 0.9), "broker_cut"))
    if args.db_outage > 0:
        plan.append((rng.uniform(0.05, 0.8), "db_outage"))
    return sorted(plan)


async def _publish(
    channel: aio_pika.abc.AbstractChannel,
    queue: str,
    reply_queue: str,
    requests: list[SignedRequest],
    rate: float,
) -> int:
    if rate <= 0:
        return await publish(channel, queue, requests, reply_to=reply_queue)
    sent, step = 0, max(1, int(rate / 10))
    t0 = time.monotonic()
    for i in range(0, len(requests), step):
        sent += await publish(channel, queue, requests[i : i + step], reply_to=reply_queue)
        ahead = t0 + sent / rate - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)  # pacing the publisher, not waiting for a condition
    return sent


async def _inject(
    conn: aio_pika.abc.AbstractConnection,
    plan: list[tuple[float, str]],
    args: argparse.Namespace,
    collector: ReceiptCollector,
    workers: list[Supervisor],
    amqp_proxy: Proxy,
    pg_proxy: Proxy,
    rng: random.Random,
    tl: Timeline,
) -> None:
    outage: asyncio.Task[None] | None = None
    watches: list[asyncio.Task[None]] = []
    queue = workers[0].worker.env["FORGE_WORKER_QUEUE"]
    for fraction, fault in plan:
        target = int(fraction * args.n)
        await collector.wait_count(target)
        # each fault lands on a steady state: every worker up and consuming (a restarted
        # worker needs a moment to connect), so a cut or a kill always hits live work
        try:
            await poll_until(
                lambda: _consumers_at_least(conn, queue, len(workers)),
                within=60,
                what="every worker consuming",
            )
        except AssertionError as exc:  # inject anyway; the report shows it
            tl.mark("no_steady_state", detail=str(exc))
        if fault == "kill":
            w = rng.choice([w for w in workers if w.worker.running] or workers)
            tl.mark("kill", worker=w.index, answered=len(collector.bodies))
            await w.kill()
            watches.append(
                asyncio.create_task(_consumers_back(conn, queue, len(workers), tl, fault))
            )
        elif fault == "broker_cut":
            cut = amqp_proxy.cut()
            tl.mark("broker_cut", connections=cut, answered=len(collector.bodies))
            watches.append(
                asyncio.create_task(
                    _consumers_back(conn, queue, len(workers), tl, fault, amqp_proxy, cut=cut)
                )
            )
        elif fault == "db_outage":
            outage = asyncio.create_task(_db_outage(pg_proxy, args.db_outage, collector, tl))
    if outage is not None:
        await outage
    for watch in watches:
        await watch


async def _consumers_back(
    conn: aio_pika.abc.AbstractConnection,
    queue: str,
    n: int,
    tl: Timeline,
    fault: str,
    proxy: Proxy | None = None,
    *,
    cut: int = 0,
) -> None:
    """Mark how long after ``fault`` every worker was consuming again."""
    t0 = time.monotonic()
    try:
        if proxy is not None and cut:
            # the broker drops a cut connection's consumer only once it notices: first see
            # every cut worker connect again, then count consumers
            want = proxy.stats.connections + cut
            await proxy.wait_for(lambda st: st.connections >= want, within=120)
        await poll_until(
            lambda: _consumers_at_least(conn, queue, n), within=120, what="consumers back"
        )
        tl.mark("consumers_back", after=fault, seconds=round(time.monotonic() - t0, 2))
    except (AssertionError, TimeoutError) as exc:
        tl.mark("consumers_not_back", after=fault, detail=str(exc))


async def _db_outage(
    proxy: Proxy, seconds: float, collector: ReceiptCollector, tl: Timeline
) -> None:
    proxy.refuse()
    cut = proxy.cut()
    tl.mark("db_down", connections=cut, answered=len(collector.bodies))
    await asyncio.sleep(seconds)  # the outage itself
    proxy.accept()
    tl.mark("db_up", answered=len(collector.bodies), refused=proxy.stats.refused)


async def _cleanup(
    conn: aio_pika.abc.AbstractConnection,
    queue: str,
    reply_queue: str,
    db_name: str,
    delays: tuple[int, ...],
) -> None:
    names = [queue, topology.dead_letter_name(queue), f"{queue}.receipts", reply_queue]
    names += topology.retry_names(queue, delays)
    for name in names:
        ch = await conn.channel()
        try:
            await ch.queue_delete(name)
        except Exception:
            pass
        finally:
            if not ch.is_closed:
                await ch.close()
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
    finally:
        await admin.close()


def _longest_gap(collector: ReceiptCollector, tl: Timeline) -> dict[str, float]:
    """The longest time with no new request answered, and when it started (run clock)."""
    times = sorted(collector.first_seen.values())
    if len(times) < 2:
        return {"seconds": 0.0, "from": 0.0}
    gap, start = max((b - a, a) for a, b in itertools.pairwise(times))
    return {"seconds": round(gap, 2), "from": round(start - tl.t0, 2)}


def _report(r: dict[str, Any]) -> None:
    if not r:
        return
    rows = [
        ("sent", r["sent"]),
        ("answered", r["answered"]),
        ("rows (customers)", r["rows"]),
        ("ledger rows", r["ledger_rows"]),
        ("duplicate effects", r["duplicate_effects"]),
        ("repeated receipts (identical)", r["repeated_receipts"]),
        ("answered from the ledger", r["answered_from_ledger"]),
        ("sent to a retry tier", r["retried"]),
        ("receipt mismatches", r["receipt_mismatch"]),
        ("dead-lettered", r["dead_lettered"]),
        ("lost", r["lost"]),
        ("worker starts", r["worker_starts"]),
    ]
    for k, v in rows:
        print(f"  {k:<32}{v:>10}")
    for k, v in r["timings_s"].items():
        print(f"  time {k:<27}{v:>10} s")
    print(f"  {'throughput':<32}{r['throughput_per_s']:>10} /s")
    gap = r["longest_receipt_gap"]
    print(f"  {'longest gap in answers':<32}{gap['seconds']:>10} s (from {gap['from']} s)")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
