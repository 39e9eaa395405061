"""Throughput benchmark of forge-worker against the raw broker ceiling, in one run.

    uv run python bench/throughput.py                    # default: 20k backlog, 1 and 2 processes
    uv run python bench/throughput.py --backlog 100000   # the RSS check with a 100k backlog

Phases (each on its own queues and database, all deleted afterwards):

a. **ceiling**: a bare aio-pika loop on the same broker: consume (prefetch 100) from a
   quorum queue, publish a 300-byte persistent reply with a publisher confirm, ack. Five
   drains of a pre-filled queue (three before the worker, two after); the median is the
   ceiling.
b. **drain**: ``forge-worker run`` (uvloop) drains a backlog of N pre-signed ``/customer/add``
   containers (Hilt's shape: the invocation plus its one delegation proof, Go-ordered
   ``details``, a new customer each) to confirmed receipts. Receipts are counted on the
   reply queue by polling its depth; the time runs from the first consume (the inbox depth
   drops) to the last receipt. Three drains (``--repeat``), a fresh process and inbox each;
   the median is reported. Repeated with two worker processes (competing consumers):
   ``forge-worker run --processes 2`` (a supervisor and two worker processes; the default)
   or, with ``--two-mode separate``, two ``run`` processes started side by side.
c. **latency**: the same single worker at a steady offered load of half of (b): requests
   are published at a fixed rate (what fell due, every ``--tick`` ms, in one write) and each
   receipt's arrival is matched to its request by ``correlation_id``; p50/p99 are taken
   after a warm-up. The raw loop of (a) is then driven the same way, as a reference.
d. **RSS**: the worker's peak resident set size (``VmHWM``) after (b) and (c).

Prints a table and writes ``bench/results/throughput.json``. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import _common as c
import aio_pika
import aiormq
import aiormq.abc
import uvloop
from aiormq import spec

from worker.amqp import topology
from worker.service import batch_publish

REPLY_BYTES = b"r" * 300
PRODUCT = "did:web:hilt.fil-forge.com"
CMD = "/customer/add"


# --------------------------------------------------------------------------- invocations


@dataclass(frozen=True)
class Identities:
    """The service key (the worker signs with it) and Hilt's key with its delegation."""

    service_key: str
    service_did: str
    hilt_key: str
    delegation: bytes


def make_identities() -> Identities:
    """A fresh service and Hilt identity; the service delegates /customer/add to Hilt."""
    from worker.ucan import Signer, encode_delegation

    service = Signer.generate()
    hilt = Signer.generate()
    dlg = encode_delegation(service, aud=hilt.did, sub=service.did, cmd=CMD, exp=None)
    return Identities(service.export(), service.did, hilt.export(), dlg)


_GEN: dict[str, Any] = {}


def _gen_init(ids: Identities) -> None:
    from worker.ucan import CID, Signer

    _GEN["hilt"] = Signer.parse(ids.hilt_key)
    _GEN["ids"] = ids
    _GEN["dlg_cid"] = CID.dag_cbor(ids.delegation)


def _gen_chunk(args: tuple[str, int, int, int]) -> list[bytes]:
    """Sign invocations ``lo``..``hi`` of run ``tag`` (one process-pool job)."""
    from worker.ucan import customer_add_args, encode_container, encode_invocation

    tag, lo, hi, exp = args
    ids: Identities = _GEN["ids"]
    out = []
    for i in range(lo, hi):
        # a did:plc is 24 base32 characters; the index keeps every customer (and task) new
        customer = f"did:plc:{tag}{i:0{24 - len(tag)}d}"
        details = {"external_id": f"console-{tag}-{i}", "region": "us-east-1"}
        args_raw = customer_add_args(customer, PRODUCT, details, None)
        inv = encode_invocation(
            _GEN["hilt"],
            sub=ids.service_did,
            aud=ids.service_did,
            cmd=CMD,
            args_raw=args_raw,
            exp=exp,
            prf=(_GEN["dlg_cid"],),
        )
        out.append(encode_container([inv, ids.delegation]))
    return out


def generate(ids: Identities, tag: str, n: int, pool: ProcessPoolExecutor) -> list[bytes]:
    """``n`` signed request bodies, signed in a process pool."""
    exp = int(time.time()) + 6 * 3600
    step = 2000
    jobs = [(tag, lo, min(lo + step, n), exp) for lo in range(0, n, step)]
    out: list[bytes] = []
    for chunk in pool.map(_gen_chunk, jobs):
        out.extend(chunk)
    return out


# --------------------------------------------------------------------------- (a) ceiling


async def ceiling_once(url: str, queue: str, reply: str, bodies: Sequence[bytes]) -> float:
    """Drain ``bodies`` through consume -> publish reply (confirm) -> ack; msgs/s."""
    n = len(bodies)
    pub_conn = await aio_pika.connect(url)
    try:
        pch = await pub_conn.channel(publisher_confirms=True)
        await c.publish_all(pch, queue, bodies)
    finally:
        await pub_conn.close()

    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel(publisher_confirms=True)
        await ch.set_qos(prefetch_count=100)
        q = await ch.declare_queue(queue, passive=True)
        ex = ch.default_exchange
        done = asyncio.Event()
        count = 0
        first = 0.0
        last = 0.0

        async def handle(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal count, first, last
            if not first:
                first = time.perf_counter()
            await ex.publish(
                aio_pika.Message(REPLY_BYTES, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=reply,
            )
            await msg.ack()
            count += 1
            if count == n:
                last = time.perf_counter()
                done.set()

        tag = await q.consume(handle)
        await asyncio.wait_for(done.wait(), timeout=300)
        await q.cancel(tag)
        rch = await conn.channel()
        await (await rch.declare_queue(reply, passive=True)).purge()
        return n / (last - first)
    finally:
        await conn.close()


async def declare_quorum_queues(url: str, *names: str) -> None:
    """Durable quorum queues (the raw loop's request and reply queues)."""
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        for name in names:
            await ch.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    finally:
        await conn.close()


async def measure_ceiling(url: str, prefix: str, body_size: int, n: int, runs: int) -> list[float]:
    """Median-worthy ceiling runs on a quorum queue with a quorum reply queue."""
    queue, reply = f"{prefix}.ceil", f"{prefix}.ceil.reply"
    await declare_quorum_queues(url, queue, reply)
    body = os.urandom(body_size)
    rates = []
    for _ in range(runs):
        rates.append(await ceiling_once(url, queue, reply, [body] * n))
    return rates


#: the raw loop of (a) as its own process, for a latency reference at the same offered load
ECHO = """
import asyncio, sys
import aio_pika, uvloop

async def main() -> None:
    conn = await aio_pika.connect(sys.argv[1])
    ch = await conn.channel(publisher_confirms=True)
    await ch.set_qos(prefetch_count=100)
    queue = await ch.declare_queue(sys.argv[2], passive=True)
    ex = ch.default_exchange

    async def handle(msg):
        reply = aio_pika.Message(
            b"r" * 300, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=msg.correlation_id,
        )
        await ex.publish(reply, routing_key=msg.reply_to)
        await msg.ack()

    await queue.consume(handle)
    await asyncio.Future()

uvloop.run(main())
"""


def _spawn_echo(url: str, queue: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", ECHO, url, queue])


async def echo_latency(
    url: str, prefix: str, body: bytes, rate: float, seconds: float, warmup: float, tick: float
) -> dict[str, Any]:
    """Latency of the raw loop (a) at ``rate``: what broker and machine alone give."""
    queue, reply = f"{prefix}.echo", f"{prefix}.echo.reply"
    await declare_quorum_queues(url, queue, reply)
    proc = _spawn_echo(url, queue)
    try:
        await asyncio.sleep(1.5)
        bodies = [body] * int(rate * (seconds + warmup))
        groups = {"rabbit": c.pids_by_comm("beam.smp"), "echo": [proc.pid]}
        return await latency(url, queue, reply, bodies, rate, warmup, None, groups, tick)
    finally:
        proc.terminate()
        proc.wait(10)


# --------------------------------------------------------------------------- the worker


@dataclass
class WorkerRun:
    """One or more ``forge-worker run`` processes on an isolated queue and database."""

    queue: str
    reply: str
    db_url: str
    ids: Identities
    processes: int
    log_dir: Path
    amqp_url: str
    entry: str = "worker.cli"
    #: several processes as ``run --processes N`` (supervisor) or N ``run`` (separate)
    mode: str = "supervisor"
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    restarts: int = 0
    #: more FORGE_WORKER_* settings (e.g. the PLC directory of bench/provision_bench.py)
    extra_env: dict[str, str] = field(default_factory=dict)

    def argv(self, *args: str) -> list[str]:
        """The worker's command line: ``python -m worker.cli`` or ``python SCRIPT.py``."""
        if self.entry.endswith(".py"):
            return [sys.executable, self.entry, *args]
        return [sys.executable, "-m", self.entry, *args]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            FORGE_WORKER_AMQP_URL=self.amqp_url,
            FORGE_WORKER_DATABASE_URL=self.db_url,
            FORGE_WORKER_SERVICE_KEY=self.ids.service_key,
            FORGE_WORKER_QUEUE=self.queue,
            FORGE_WORKER_RECEIPT_QUEUE=self.reply,
            FORGE_WORKER_HTTP_PORT="0",
            FORGE_WORKER_LOG_FORMAT="json",
        )
        env.pop("FORGE_WORKER_SERVICE_KEY_FILE", None)
        env.pop("FORGE_WORKER_SERVICE_DID", None)
        env.update(self.extra_env)
        return env

    def migrate(self) -> None:
        out = subprocess.run(
            self.argv("migrate"),
            env=self.env(),
            cwd=c.ROOT,
            capture_output=True,
            timeout=120,
        )
        if out.returncode != 0:
            raise RuntimeError(f"forge-worker migrate failed: {out.stderr.decode()[-2000:]}")

    def start(self, extra: Sequence[str] = (), count: int | None = None) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs = [p for p in self.procs if p.poll() is None]
        n = self.processes if count is None else count
        if self.mode == "supervisor" and self.processes > 1:
            # one supervisor of all of them (a restart after exit 3 starts the group again)
            extra, n = ("--processes", str(self.processes), *extra), 1
        for i in range(n):
            log = (self.log_dir / f"worker-{self.queue}-{i}.log").open("ab")
            self.procs.append(
                subprocess.Popen(
                    self.argv("run", *extra),
                    env=self.env(),
                    cwd=c.ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()

    def pids(self) -> list[int]:
        out: list[int] = []
        for p in self.procs:
            if p.poll() is None:
                out.extend(c.process_tree(p.pid))
        return out

    def check_alive(self, restart_unreachable: bool = False) -> None:
        """Raise if a worker process exited; before it consumed, one that could not reach
        a service (exit code 3, e.g. a connect timeout on a busy machine) is restarted."""
        for i, p in enumerate(self.procs):
            if p.poll() is None:
                continue
            if restart_unreachable and p.returncode == 3 and self.restarts < 3:
                self.restarts += 1
                print("worker exited with 3 (unreachable) at start; restarting", flush=True)
                self.procs.pop(i)
                self.start(count=1)
                return
            raise RuntimeError(
                f"forge-worker exited with {p.returncode}; see {self.log_dir}/worker-*.log"
            )

    def hwm_mb(self) -> list[float]:
        """Peak RSS of each worker process (the tree's processes, each on its own)."""
        return [round(c.vm_hwm_kb(p) / 1024, 1) for p in self.pids()]

    def stop(self, timeout: float = 30) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


async def declare_worker_queues(url: str, queue: str, reply: str) -> None:
    """The inbox with the worker's own arguments, and the reply queue."""
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        await ch.declare_queue(
            queue, durable=True, arguments=cast(Any, topology.inbox_arguments(queue))
        )
        await ch.declare_queue(
            reply, durable=True, arguments=cast(Any, topology.plain_quorum_arguments())
        )
    finally:
        await conn.close()


async def drain(
    url: str,
    run: WorkerRun,
    bodies: Sequence[bytes],
    meter_groups: dict[str, list[int]],
    profile: Path | None = None,
) -> dict[str, Any]:
    """Pre-fill the inbox, start the worker(s), and time the backlog to its last receipt.

    With ``profile``, py-spy samples the (first) worker process during the drain and writes
    collapsed stacks there.
    """
    n = len(bodies)
    await declare_worker_queues(url, run.queue, run.reply)
    conn = await aio_pika.connect(url)
    try:
        pch = await conn.channel(publisher_confirms=True)
        await c.publish_all(pch, run.queue, bodies, reply_to=run.reply)
        poll = await conn.channel()
        ready, _ = await c.queue_counts(poll, run.queue)
        assert ready == n, f"inbox holds {ready}, expected {n}"
        run.start()
        t_start = time.perf_counter()
        meter = c.CpuMeter()
        first = 0.0
        marks: dict[int, float] = {}
        receipts = 0
        spy: subprocess.Popen[bytes] | None = None
        progress = (0, t_start)
        while receipts < n:
            await asyncio.sleep(0.02)
            run.check_alive(restart_unreachable=not first)
            now = time.perf_counter()
            if now - progress[1] > 30:
                ready, _ = await c.queue_counts(poll, run.queue)
                raise RuntimeError(
                    f"drain stalled at {receipts}/{n} receipts, {ready} still queued; "
                    f"see {run.log_dir}"
                )
            if not first:
                ready, _ = await c.queue_counts(poll, run.queue)
                if ready < n:
                    first = time.perf_counter()
                    progress = (0, first)
                    meter.start({**meter_groups, "worker": run.pids()})
                    if profile is not None:
                        spy = start_py_spy(run.procs[0].pid, profile)
                continue
            receipts, _ = await c.queue_counts(poll, run.reply)
            now = time.perf_counter()
            if receipts != progress[0]:
                progress = (receipts, now)
            for frac in (10, 90):
                if frac not in marks and receipts >= n * frac / 100:
                    marks[frac] = now
        last = time.perf_counter()
        cpu = meter.stop({"pg": c.pids_by_comm("postgres")})
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        mid = (n * 0.8) / (marks[90] - marks[10]) if marks[90] > marks[10] else float("nan")
        return {
            "n": n,
            "processes": run.processes,
            "seconds": round(last - first, 3),
            "msgs_per_s": round(n / (last - first), 1),
            "mid_msgs_per_s": round(mid, 1),
            "startup_s": round(first - t_start, 2),
            "cores": cpu,
            # worker CPU time per message: steadier than msgs/s when the machine is shared
            "worker_cpu_us_per_msg": round(cpu["worker"] * (last - first) / n * 1e6, 1),
        }
    finally:
        await conn.close()


def start_py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """Sample ``pid`` with py-spy (collapsed stacks, non-blocking) until SIGINT."""
    exe = shutil.which("py-spy")
    if exe is None:
        raise RuntimeError(
            "--profile needs py-spy: uv run --with py-spy python bench/throughput.py"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--nonblocking",
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def summarize_profile(path: Path, top: int = 30) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    selfs: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_s)
        total += count
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
            for f in stack.split(";")
        ]
        selfs[frames[-1]] = selfs.get(frames[-1], 0) + count
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count
    lines = [f"{total} samples", "self%   function"]
    for f, n in sorted(selfs.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * n / total:5.1f}   {f}")
    lines.append("incl%   function")
    for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * n / total:5.1f}   {f}")
    return "\n".join(lines)


async def check_receipts(url: str, reply: str, expect: int, sample: int = 500) -> dict[str, int]:
    """Consume the reply queue; decode a sample of receipts and count their outcomes."""
    from worker.ucan import decode_request

    outcomes: dict[str, int] = {}
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        await ch.set_qos(prefetch_count=1000)
        q = await ch.declare_queue(reply, passive=True)
        got = 0
        done = asyncio.Event()

        async def handle(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal got
            got += 1
            if got <= sample or got % max(1, expect // sample) == 0:
                req = decode_request(msg.body)
                for r in req.receipts or req.invocations:
                    err = getattr(r, "error", None)
                    key = "ok" if err is None else str(err.get("name", "error"))
                    outcomes[key] = outcomes.get(key, 0) + 1
            if got % 500 == 0 or got == expect:
                await msg.ack(multiple=True)
            if got >= expect:
                done.set()

        tag = await q.consume(handle)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout=120)
        await q.cancel(tag)
        await q.purge()
        outcomes["_consumed"] = got
    finally:
        await conn.close()
    return outcomes


async def count_customers(db_url: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(db_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM customer"))
    finally:
        await conn.close()


# --------------------------------------------------------------------------- (c) latency


def _write_series(path: Path, sent: list[float], recv: list[float]) -> None:
    """Each request's publish time (s from the first) and latency (ms; -1 if unanswered)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = sent[0]
    path.write_text(
        "".join(
            f"{s - t0:.4f},{(r - s) * 1000 if r else -1:.2f}\n"
            for s, r in zip(sent, recv, strict=True)
        )
    )


async def latency(
    url: str,
    queue: str,
    reply: str,
    bodies: Sequence[bytes],
    rate: float,
    warmup: float,
    series: Path | None = None,
    meter_groups: dict[str, list[int]] | None = None,
    tick: float = 0.002,
) -> dict[str, Any]:
    """Publish ``bodies`` at ``rate``/s; publish -> receipt latency after ``warmup`` seconds.

    Every ``tick`` seconds the requests that have fallen due are written at once, each with
    a publisher confirm (``worker.service.batch_publish``); receipts are read without acks. The
    generator talks aiormq directly because it shares the cores with what it measures: its
    CPU is reported (``cores.bench``) and is mostly wake-ups, so a coarser tick costs less.
    With ``meter_groups`` the CPU of those processes over the measured window is reported.

    The generator's own garbage collector is off for the run (after one collection), as
    ``timeit`` does: a full collection of the benchmark's heap took 10-18 ms in the drain
    phases, and one would pause both its writes and its stamping of receipts, which is not
    the latency under test.
    """
    n = len(bodies)
    sent: list[float] = [0.0] * n
    recv: list[float] = [0.0] * n
    conn = await aiormq.connect(url)
    meter = c.CpuMeter()
    gc.collect()
    gc.disable()
    try:
        cch = await conn.channel()
        got = 0
        done = asyncio.Event()
        clock = time.perf_counter

        async def on_receipt(msg: aiormq.abc.DeliveredMessage) -> None:
            nonlocal got
            recv[int(msg.header.properties.correlation_id or 0)] = clock()
            got += 1
            if got >= n:
                done.set()

        await cch.basic_consume(reply, on_receipt, no_ack=True)
        pch = await conn.channel(publisher_confirms=True)
        assert batch_publish.supported(pch)
        pending: set[asyncio.Future[Any]] = set()
        failed: list[BaseException] = []

        def confirmed(fut: asyncio.Future[list[BaseException | None]]) -> None:
            pending.discard(fut)
            failed.extend(e for e in fut.result() if e is not None)

        t0 = clock()
        i = 0
        skip = int(warmup * rate)
        while i < n:
            if i >= skip and not meter.groups and meter_groups is not None:
                meter.start({**meter_groups, "bench": [os.getpid()]})
            due = min(n, int((clock() - t0) * rate) + 1)
            if due > i:
                now = clock()
                batch = []
                for j in range(i, due):
                    props = spec.Basic.Properties(
                        delivery_mode=2,
                        correlation_id=str(j),
                        message_id=f"lat-{j}",
                        reply_to=reply,
                    )
                    batch.append((queue, bodies[j], props))
                    sent[j] = now
                fut = asyncio.ensure_future(batch_publish.publish_batch(pch, batch, timeout=60))
                pending.add(fut)
                fut.add_done_callback(confirmed)
                i = due
            await asyncio.sleep(tick)
        publish_s = clock() - t0
        await asyncio.gather(*pending)
        if failed:
            raise RuntimeError(f"{len(failed)} requests were not confirmed: {failed[0]!r}")
        await asyncio.wait_for(done.wait(), timeout=120)
        cores = meter.stop({"pg": c.pids_by_comm("postgres")}) if meter.groups else {}
    finally:
        gc.enable()
        await conn.close()
    if series is not None:
        _write_series(series, sent, recv)
    lat = [(recv[j] - sent[j]) * 1000 for j in range(skip, n) if recv[j]]
    lat.sort()
    return {
        "offered_msgs_per_s": round(rate, 1),
        "achieved_publish_msgs_per_s": round(n / publish_s, 1),
        "samples": len(lat),
        "missing": sum(1 for j in range(n) if not recv[j]),
        "p50_ms": round(c.percentile(lat, 50), 2),
        "p90_ms": round(c.percentile(lat, 90), 2),
        "p99_ms": round(c.percentile(lat, 99), 2),
        "max_ms": round(lat[-1], 2) if lat else float("nan"),
        "tick_ms": round(tick * 1000, 3),
        "cores": cores,
    }


# --------------------------------------------------------------------------- main


def fmt_row(cells: Sequence[object], widths: Sequence[int]) -> str:
    return "  ".join(
        str(x).ljust(w) if i == 0 else str(x).rjust(w)
        for i, (x, w) in enumerate(zip(cells, widths, strict=True))
    )


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    url = c.AMQP_URL
    rid = c.run_id()
    prefix = f"fwbench.{rid}"
    db_name = f"fwbench_{rid}"
    info = c.machine_info()
    versions = await c.server_versions()
    print(f"machine: {c.machine_line(info, versions)}", flush=True)
    la = c.loadavg()
    if args.wait_quiet > 0:
        deadline = time.monotonic() + args.wait_quiet
        while (busy := c.busy_cores(3.0)) > 0.3 and time.monotonic() < deadline:
            print(f"waiting for a quiet machine ({busy:.2f} cores busy)", flush=True)
        la = c.loadavg()
    if la[0] > 0.7:
        print(f"warning: load average {la[0]} — the machine is not quiet", flush=True)

    result: dict[str, Any] = {"machine_detail": {**info, **versions}, "args": vars(args)}
    result["code"] = code_version()
    queues: list[str] = []
    runs: list[WorkerRun] = []
    db_created = False
    pool: ProcessPoolExecutor | None = None
    try:
        if not args.skip_worker:
            ids = make_identities()
            pool = ProcessPoolExecutor(
                max_workers=os.cpu_count() or 2, initializer=_gen_init, initargs=(ids,)
            )
        # --- invocations, signed ahead of time
        t = time.perf_counter()
        backlogs: list[list[bytes]] = []
        backlogs2: list[list[bytes]] = []
        if pool is not None:
            for k in range(args.repeat):
                backlogs.append(generate(ids, f"{rid[:3]}a{k}", args.backlog, pool))
                if args.two:
                    backlogs2.append(generate(ids, f"{rid[:3]}b{k}", args.backlog2, pool))
        size = len(backlogs[0][0]) if backlogs else args.body_size
        signed = sum(map(len, backlogs)) + sum(map(len, backlogs2))
        print(
            f"signed {signed} requests of {size} bytes in {time.perf_counter() - t:.1f}s",
            flush=True,
        )
        result["request_bytes"] = size

        # --- (a) ceiling, part 1
        queues += [f"{prefix}.ceil", f"{prefix}.ceil.reply"]
        rates = await measure_ceiling(url, prefix, size, args.ceiling_n, args.ceiling_runs)
        print(f"ceiling runs: {', '.join(f'{r:,.0f}' for r in rates)} msg/s", flush=True)
        if pool is None:
            result["ceiling_runs"] = [round(r, 1) for r in rates]
            result["ceiling_msgs_per_s"] = round(statistics.median(rates), 1)
            return result

        # --- (b) one process drains the backlog (repeated; a fresh process each time)
        db_url = await c.create_database(db_name)
        db_created = True
        rabbit = c.pids_by_comm("beam.smp")
        groups = {"rabbit": rabbit, "pg": c.pids_by_comm("postgres"), "bench": [os.getpid()]}
        one = WorkerRun(
            f"{prefix}.w1",
            f"{prefix}.w1.receipts",
            db_url,
            ids,
            1,
            c.RESULTS / "logs",
            url,
            args.worker_entry,
        )
        runs.append(one)
        queues += _worker_queue_names(one.queue, one.reply)
        one.migrate()
        prof = c.RESULTS / f"profile-drain1-{rid}.txt" if args.profile else None
        d1_runs = await drain_runs(url, one, backlogs, groups, prof)
        del backlogs
        d1 = _median_run(d1_runs)
        d1["customers"] = await count_customers(db_url)
        result["drain_1"] = d1
        worker_rate = float(d1["msgs_per_s"])

        # --- (a) ceiling, part 2: after the worker ran, so both see the same machine
        rates += await measure_ceiling(url, prefix, size, args.ceiling_n, args.ceiling_runs_after)
        ceiling = statistics.median(rates)
        result["ceiling_runs"] = [round(r, 1) for r in rates]
        result["ceiling_msgs_per_s"] = round(ceiling, 1)
        print(f"ceiling runs: {', '.join(f'{r:,.0f}' for r in rates)} msg/s", flush=True)

        # --- (c) latency at half of (b), one process
        rate = worker_rate / 2 if args.rate is None else args.rate
        lt: dict[str, Any] = {"offered_msgs_per_s": rate, "p50_ms": None, "p99_ms": None}
        lt.update(max_ms=None, samples=0)
        rss = max(max(d["rss_mb"]) for d in d1_runs)
        if args.latency_seconds > 0:
            lat_n = int(rate * (args.latency_seconds + args.warmup))
            lat_bodies = generate(ids, f"{rid[:4]}l", lat_n, pool)
            one.start()
            await wait_consumers(one)
            await asyncio.sleep(1)
            csv = c.RESULTS / f"latency-{rid}.csv"
            lt = await latency(
                url,
                one.queue,
                one.reply,
                lat_bodies,
                rate,
                args.warmup,
                csv,
                {**groups, "worker": one.pids()},
                args.tick / 1000,
            )
            del lat_bodies
            lt["rss_mb"] = one.hwm_mb()
            rss = max(rss, *lt["rss_mb"])
            one.stop()
            print(f"latency: {lt}", flush=True)
            queues += [f"{prefix}.echo", f"{prefix}.echo.reply"]
            ref = await echo_latency(
                url,
                prefix,
                os.urandom(size),
                rate,
                args.latency_seconds,
                args.warmup,
                args.tick / 1000,
            )
            print(f"latency of the raw loop at the same load: {ref}", flush=True)
            result["latency_raw_loop"] = ref
        result["latency"] = lt

        # --- (b') two processes
        if args.two:
            two = WorkerRun(
                f"{prefix}.w2",
                f"{prefix}.w2.receipts",
                db_url,
                ids,
                2,
                c.RESULTS / "logs",
                url,
                args.worker_entry,
                args.two_mode,
            )
            runs.append(two)
            queues += _worker_queue_names(two.queue, two.reply)
            d2_runs = await drain_runs(url, two, backlogs2, groups)
            result["drain_2"] = _median_run(d2_runs)

        result.update(
            worker_msgs_per_s=d1["msgs_per_s"],
            ratio=round(worker_rate / ceiling, 3),
            p50_ms=lt["p50_ms"],
            p99_ms=lt["p99_ms"],
            rss_mb=rss,
            backlog=args.backlog,
        )
        if args.two:
            result["worker2_msgs_per_s"] = result["drain_2"]["msgs_per_s"]
            result["ratio2"] = round(result["drain_2"]["msgs_per_s"] / ceiling, 3)
            result["two_mode"] = args.two_mode
            # 2 processes against 1, median drain against median drain
            result["speedup_2_vs_1"] = round(
                result["drain_2"]["msgs_per_s"] / float(d1["msgs_per_s"]), 3
            )
        return result
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        for r in runs:
            r.stop()
        conn = await aio_pika.connect(url)
        try:
            await c.delete_queues(conn, queues)
        finally:
            await conn.close()
        if db_created:
            await c.drop_database(db_name)
        result["machine"] = c.machine_line(info, versions)
        result["loadavg_at_end"] = c.loadavg()


async def drain_runs(
    url: str,
    run: WorkerRun,
    backlogs: list[list[bytes]],
    groups: dict[str, list[int]],
    profile: Path | None = None,
) -> list[dict[str, Any]]:
    """One drain per backlog, each by freshly started worker processes."""
    out = []
    for k, backlog in enumerate(backlogs):
        prof = profile if k == 0 else None
        d = await drain(url, run, backlog, groups, prof)
        if prof is not None:
            summary = summarize_profile(prof)
            prof.with_suffix(".summary.txt").write_text(summary + "\n")
            print(summary, flush=True)
        d["rss_mb"] = run.hwm_mb()
        run.stop()
        print(f"drain {run.processes} process(es): {d}", flush=True)
        d["receipts"] = await check_receipts(url, run.reply, len(backlog))
        print(f"  receipts: {d['receipts']}", flush=True)
        out.append(d)
    return out


def code_version() -> str:
    """The commit measured, with ``+dirty`` when the worker's files differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=c.ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", "worker"], cwd=c.ROOT
        ).returncode
    except OSError:
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate, with every run's rate beside it."""
    ordered = sorted(runs, key=lambda d: float(d["msgs_per_s"]))
    pick = dict(ordered[(len(ordered) - 1) // 2])
    pick["runs_msgs_per_s"] = [d["msgs_per_s"] for d in runs]
    pick["runs_cpu_us_per_msg"] = [d["worker_cpu_us_per_msg"] for d in runs]
    return pick


async def wait_consumers(run: WorkerRun, within: float = 60) -> None:
    """Wait until the run's inbox has a consumer per worker process (the workers are up)."""
    queue, n = run.queue, run.processes
    conn = await aio_pika.connect(run.amqp_url)
    try:
        ch = await conn.channel()
        deadline = time.monotonic() + within
        while (await c.queue_counts(ch, queue))[1] < n:
            run.check_alive(restart_unreachable=True)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{queue} did not get {n} consumers in {within}s")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


def _worker_queue_names(queue: str, reply: str) -> list[str]:
    return [
        queue,
        reply,
        topology.dead_letter_name(queue),
        *topology.retry_names(queue, topology.DEFAULT_RETRY_DELAYS),
    ]


def print_table(r: dict[str, Any]) -> None:
    w = (44, 12, 40)
    rows: list[tuple[object, object, object]] = [
        (
            "raw ceiling (consume→reply+confirm→ack)",
            f"{r['ceiling_msgs_per_s']:,.0f}",
            f"msg/s, median of {r['ceiling_runs']}",
        ),
    ]
    if "drain_1" in r:
        d1 = r["drain_1"]
        rows += [
            (
                f"worker, 1 process, {d1['n']:,} backlog",
                f"{d1['msgs_per_s']:,.0f}",
                f"msg/s ({d1['mid_msgs_per_s']:,.0f} in 10-90%), cores {d1['cores']}",
            ),
            ("  ratio to ceiling", f"{r['ratio']:.2f}", ""),
        ]
        if "drain_2" in r:
            d2 = r["drain_2"]
            rows += [
                (
                    f"worker, 2 processes ({r.get('two_mode')}), {d2['n']:,} backlog",
                    f"{d2['msgs_per_s']:,.0f}",
                    f"msg/s ({d2['mid_msgs_per_s']:,.0f} in 10-90%), cores {d2['cores']}",
                ),
                ("  ratio to ceiling", f"{r['ratio2']:.2f}", ""),
                (
                    "  2 processes / 1 process",
                    f"{r['speedup_2_vs_1']:.2f}",
                    f"x (drains: 1 process {d1['runs_msgs_per_s']}, "
                    f"2 processes {d2['runs_msgs_per_s']} msg/s)",
                ),
            ]
        lt = r["latency"]
        rows += [
            (
                f"latency at {lt['offered_msgs_per_s']:,.0f} msg/s offered",
                f"{r['p50_ms']}",
                "ms p50",
            ),
            ("", f"{r['p99_ms']}", f"ms p99 (max {lt['max_ms']} ms, {lt['samples']} samples)"),
        ]
        if lt.get("cores"):
            rows.append(("", f"{lt.get('tick_ms')}", f"ms tick; cores {lt['cores']}"))
        if "latency_raw_loop" in r:
            ref = r["latency_raw_loop"]
            rows.append(
                (
                    "  raw loop (a) at the same load",
                    f"{ref['p50_ms']} / {ref['p99_ms']}",
                    "ms p50 / p99: the broker and machine alone",
                )
            )
            rows.append(("", "", f"cores {ref.get('cores')}"))
        rows.append(("peak RSS, 1 process (VmHWM)", f"{r['rss_mb']}", "MB"))
    print()
    print(fmt_row(("measure", "value", "unit / notes"), w))
    for row in rows:
        print(fmt_row(row, w))
    print(f"\nmachine: {r['machine']}; load at end {r['loadavg_at_end']}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--backlog", type=int, default=20000, help="requests the 1-process worker drains"
    )
    p.add_argument(
        "--backlog2",
        type=int,
        default=None,
        help="requests the 2-process run drains (default: min(backlog, 20000))",
    )
    p.add_argument("--no-two", dest="two", action="store_false", help="skip the 2-process run")
    p.add_argument(
        "--two-mode",
        choices=("supervisor", "separate"),
        default="supervisor",
        help="2 processes as 'run --processes 2' (default) or as two 'run' side by side",
    )
    p.add_argument("--ceiling-n", type=int, default=12000, help="messages per ceiling run")
    p.add_argument("--ceiling-runs", type=int, default=3, help="ceiling runs before the worker")
    p.add_argument(
        "--ceiling-runs-after", type=int, default=2, help="ceiling runs after the 1-process drains"
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="drains per configuration, a fresh process each (the median is reported)",
    )
    p.add_argument(
        "--latency-seconds", type=float, default=10.0, help="latency run after warm-up; 0 skips it"
    )
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of latency run not counted")
    p.add_argument(
        "--tick",
        type=float,
        default=2.0,
        help="ms between the latency load generator's writes (each holds what fell due)",
    )
    p.add_argument(
        "--rate", type=float, default=None, help="latency offered load (default: half of the drain)"
    )
    p.add_argument(
        "--body-size", type=int, default=800, help="ceiling body size without a worker run"
    )
    p.add_argument(
        "--profile", action="store_true", help="py-spy the 1-process drain (needs --with py-spy)"
    )
    p.add_argument(
        "--worker-entry",
        default="worker.cli",
        help="module (python -m) or script (.py) taking 'run'/'migrate'; for instrumented runs",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to this long for the machine to idle (< 0.3 cores busy)",
    )
    p.add_argument("--skip-worker", action="store_true", help="measure only the ceiling")
    p.add_argument("--out", type=Path, default=c.RESULTS / "throughput.json")
    args = p.parse_args(argv)
    if args.backlog2 is None:
        args.backlog2 = min(args.backlog, 20000)
    args.out = str(args.out)

    result = uvloop.run(main_async(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = [
        "ceiling_msgs_per_s",
        "worker_msgs_per_s",
        "ratio",
        "worker2_msgs_per_s",
        "speedup_2_vs_1",
        "p50_ms",
        "p99_ms",
        "rss_mb",
        "machine",
    ]
    ordered = {k: result.get(k) for k in keys} | {k: v for k, v in result.items() if k not in keys}
    out.write_text(json.dumps(ordered, indent=2, default=str) + "\n")
    print_table(result)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
