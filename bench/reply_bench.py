"""The client's two reply modes against a running worker: its durable reply queue and
RabbitMQ's direct reply-to (``Client(reply="queue" | "direct")``, ``enqueue --reply``).

    uv run python bench/reply_bench.py                 # 3 rounds, each mode in turn
    uv run python bench/reply_bench.py --rounds 5 --calls 500 --n 3000

One ``forge-worker run`` (uvloop, HTTP off) serves on queues ``fwbench.<run id>.*`` and a
database ``fwbench_<run id>``, all deleted at the end, also on failure. The service
delegates ``/customer/add`` to a Hilt key, and every request is what Hilt sends (the
invocation and its delegation, a new customer each), signed before anything is timed. Each
round measures both modes in turn (the order alternating from round to round), each with a
fresh :class:`worker.client.Client`:

- **setup**: ``Client.connect()`` (the queue mode also declares its quorum reply queue);
- **latency**: ``--calls`` round trips one after another (``Client.call``: publish with a
  confirm, await the verified receipt) after ``--warmup`` unmeasured ones; p50/p90/p99;
- **throughput**: ``--n`` requests through ``--concurrency`` lanes, as ``enqueue --from``
  does; requests a second, and the CPU the broker, the worker and the benchmark (the
  client) used a request over that window.

Prints a table and writes ``bench/results/reply.json`` with every round and the medians,
and whether direct reply-to was clearly faster (``verdict``: better in every round on
median latency and on throughput, and by at least ``CLEARLY`` on the medians of both).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _common as c
import aio_pika
import uvloop
from throughput import (
    Identities,
    WorkerRun,
    code_version,
    declare_worker_queues,
    make_identities,
    wait_consumers,
)

from worker.amqp import topology
from worker.client import Client, CustomerAdd, SignedRequest
from worker.ucan import Delegation, Signer, decode_token

PRODUCT = "did:web:hilt.fil-forge.com"
MODES = ("queue", "direct")
#: how much better (a fraction) the medians must be for direct reply-to to be the default
CLEARLY = 0.15


def _client(url: str, ids: Identities, queue: str, mode: str, tag: str) -> Client:
    proof = decode_token(ids.delegation)
    assert isinstance(proof, Delegation)
    return Client(
        url,
        signer=Signer.parse(ids.hilt_key),
        service_did=ids.service_did,
        proofs=[proof],
        queue=queue,
        client_id=f"bench-{tag}",
        timeout=30,
        reply=mode,  # type: ignore[arg-type]
    )


def _requests(client: Client, tag: str, n: int) -> list[SignedRequest]:
    details = {"external_id": f"bench-{tag}", "region": "us-east-1"}
    return [
        client.build(CustomerAdd(f"did:plc:{tag}{i:0{24 - len(tag)}d}", PRODUCT, details))
        for i in range(n)
    ]


async def one_mode(
    url: str,
    ids: Identities,
    run: WorkerRun,
    mode: str,
    tag: str,
    args: argparse.Namespace,
    groups: dict[str, list[int]],
) -> dict[str, Any]:
    """One mode's setup time, sequential latency and throughput, with a fresh client."""
    client = _client(url, ids, run.queue, mode, tag)
    t0 = time.perf_counter()
    await client.connect()
    setup_ms = (time.perf_counter() - t0) * 1000
    try:
        calls = _requests(client, f"{tag}l", args.warmup + args.calls)
        bulk = _requests(client, f"{tag}t", args.n)
        for request in calls[: args.warmup]:
            await client.call(request)
        rtts: list[float] = []
        for request in calls[args.warmup :]:
            t = time.perf_counter()
            await client.call(request)
            rtts.append((time.perf_counter() - t) * 1000)

        pending = iter(bulk)

        async def lane() -> None:
            for request in pending:  # the lanes share one iterator
                await client.call(request)

        meter = c.CpuMeter()
        meter.start({**groups, "worker": run.pids()})
        t = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - t
        cores = meter.stop()
    finally:
        await client.delete_reply_queue()
        await client.close()
    rate = args.n / elapsed
    return {
        "mode": mode,
        "setup_ms": round(setup_ms, 1),
        "p50_ms": round(c.percentile(rtts, 50), 2),
        "p90_ms": round(c.percentile(rtts, 90), 2),
        "p99_ms": round(c.percentile(rtts, 99), 2),
        "mean_ms": round(statistics.fmean(rtts), 2),
        "requests_per_s": round(rate, 1),
        "cores": cores,
        "cpu_us_per_request": {
            k: round(cores[k] / rate * 1e6) for k in ("rabbit", "worker", "bench") if k in cores
        },
    }


def summarize(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Medians per mode, and whether direct reply-to was clearly faster."""
    med: dict[str, dict[str, float]] = {}
    for mode in MODES:
        rs = [r[mode] for r in rounds]
        med[mode] = {
            k: round(statistics.median(float(x[k]) for x in rs), 2)
            for k in ("setup_ms", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "requests_per_s")
        }
        for who in ("rabbit", "worker", "bench"):
            med[mode][f"{who}_cpu_us_per_request"] = statistics.median(
                float(x["cpu_us_per_request"].get(who, 0)) for x in rs
            )
    q, d = med["queue"], med["direct"]
    every_round = all(
        r["direct"]["p50_ms"] < r["queue"]["p50_ms"]
        and r["direct"]["requests_per_s"] > r["queue"]["requests_per_s"]
        for r in rounds
    )
    latency_gain = 1 - d["p50_ms"] / q["p50_ms"]
    throughput_gain = d["requests_per_s"] / q["requests_per_s"] - 1
    clearly = every_round and latency_gain >= CLEARLY and throughput_gain >= CLEARLY
    return {
        "median": med,
        "direct_p50_lower_by": round(latency_gain, 3),
        "direct_throughput_higher_by": round(throughput_gain, 3),
        "direct_better_in_every_round": every_round,
        "verdict": "direct clearly faster" if clearly else "not clearly faster: keep the queue",
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    url = c.AMQP_URL
    rid = c.run_id()
    prefix = f"fwbench.{rid}"
    db_name = f"fwbench_{rid}"
    info = c.machine_info()
    versions = await c.server_versions()
    print(f"machine: {c.machine_line(info, versions)}", flush=True)
    result: dict[str, Any] = {"machine_detail": {**info, **versions}, "args": vars(args)}
    result["code"] = code_version()
    ids = make_identities()
    run = WorkerRun(f"{prefix}.w", f"{prefix}.w.receipts", "", ids, 1, c.RESULTS / "logs", url)
    queues = [
        run.queue,
        run.reply,
        topology.dead_letter_name(run.queue),
        *topology.retry_names(run.queue, topology.DEFAULT_RETRY_DELAYS),
    ]
    db_created = False
    rounds: list[dict[str, dict[str, Any]]] = []
    try:
        run.db_url = await c.create_database(db_name)
        db_created = True
        run.migrate()
        await declare_worker_queues(url, run.queue, run.reply)
        run.start()
        await wait_consumers(run)
        groups = {"rabbit": c.pids_by_comm("beam.smp"), "bench": [os.getpid()]}
        for k in range(args.rounds):
            order = MODES if k % 2 == 0 else MODES[::-1]
            got: dict[str, dict[str, Any]] = {}
            for mode in order:
                tag = f"{rid[:4]}{k}{mode[0]}"
                queues.append(f"{run.queue}.replies.bench-{tag}")
                got[mode] = await one_mode(url, ids, run, mode, tag, args, groups)
                print(f"round {k + 1} {mode}: {_line(got[mode])}", flush=True)
                run.check_alive()
            rounds.append(got)
        result["rounds"] = rounds
        result.update(summarize(rounds))
        return result
    finally:
        run.stop()
        conn = await aio_pika.connect(url)
        try:
            await c.delete_queues(conn, queues)
        finally:
            await conn.close()
        if db_created:
            await c.drop_database(db_name)
        result["machine"] = c.machine_line(info, versions)
        result["loadavg_at_end"] = c.loadavg()


def _line(r: dict[str, Any]) -> str:
    cpu = r["cpu_us_per_request"]
    return (
        f"setup {r['setup_ms']} ms, p50/p90/p99 {r['p50_ms']}/{r['p90_ms']}/{r['p99_ms']} ms, "
        f"{r['requests_per_s']:,.0f} req/s; CPU µs a request: broker {cpu.get('rabbit')}, "
        f"worker {cpu.get('worker')}, client {cpu.get('bench')}"
    )


def print_table(r: dict[str, Any]) -> None:
    med = r["median"]

    def row(label: str, key: str, fmt: str = "g") -> tuple[str, str, str]:
        return (label, format(med["queue"][key], fmt), format(med["direct"][key], fmt))

    rows = [
        ("median of rounds", "queue", "direct"),
        row("client setup (connect, declare), ms", "setup_ms"),
        *(row(f"round trip {k[:3]}, ms", k) for k in ("p50_ms", "p90_ms", "p99_ms")),
        row("throughput, requests/s", "requests_per_s", ",.0f"),
        row("broker CPU a request, µs", "rabbit_cpu_us_per_request"),
        row("worker CPU a request, µs", "worker_cpu_us_per_request"),
        row("client CPU a request, µs", "bench_cpu_us_per_request"),
    ]
    print()
    for a, b, cc in rows:
        print(f"{a:<40} {b:>10} {cc:>10}")
    print(
        f"\ndirect reply-to: p50 lower by {r['direct_p50_lower_by']:.0%}, throughput higher "
        f"by {r['direct_throughput_higher_by']:.0%}, better in every round: "
        f"{r['direct_better_in_every_round']} -> {r['verdict']}"
    )
    print(f"machine: {r['machine']}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="rounds, each mode once per round")
    p.add_argument("--calls", type=int, default=300, help="sequential round trips measured")
    p.add_argument("--warmup", type=int, default=30, help="sequential round trips not measured")
    p.add_argument("--n", type=int, default=2000, help="requests of the throughput phase")
    p.add_argument("--concurrency", type=int, default=32, help="lanes of the throughput phase")
    p.add_argument("--out", type=Path, default=c.RESULTS / "reply.json")
    args = p.parse_args(argv)
    args.out = str(args.out)
    result = uvloop.run(main_async(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = ["verdict", "median", "direct_p50_lower_by", "direct_throughput_higher_by", "machine"]
    ordered = {k: result.get(k) for k in keys} | {k: v for k, v in result.items() if k not in keys}
    out.write_text(json.dumps(ordered, indent=2, default=str) + "\n")
    print_table(result)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
