"""``/provider/add`` against ``/customer/add`` drains, interleaved in one run.

    uv run python bench/provision_bench.py                 # 3 rounds of 10,000 each
    uv run python bench/provision_bench.py --backlog 20000 --rounds 5

Each round drains a backlog of pre-signed ``/customer/add`` requests (Hilt's shape, as in
``bench/throughput.py``) and a backlog of ``/provider/add`` requests (Hilt's
``ProvisionSpace``: issuer = subject = a tenant ``did:plc`` signing with secp256k1, no proofs,
a new space each) with one fresh ``forge-worker run`` each, the two kinds alternating. The
tenant's document is served by the development PLC directory (``forge-worker plc serve``,
started here) and the cache is warm after the first request: the goal of issue 17 is
``/provider/add`` at ≥ 0.8× the ``/customer/add`` rate of the same run. The worker's CPU per
message is printed beside each rate (steadier than the rate on a shared machine).

Writes ``bench/results/provision.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import _common as c
import aio_pika
import asyncpg
import throughput as tp
import uvloop

_GEN: dict[str, Any] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prov_init(tenant_key: str, tenant_did: str, service_did: str) -> None:
    from worker.ucan import Signer

    _GEN["tenant"] = Signer.parse(tenant_key).with_did(tenant_did)
    _GEN["service"] = service_did


def _prov_chunk(args: tuple[str, int, int, int]) -> list[bytes]:
    from worker.ucan import encode, encode_container, encode_invocation

    tag, lo, hi, exp = args
    tenant, service = _GEN["tenant"], _GEN["service"]
    out = []
    for i in range(lo, hi):
        space = f"did:key:z6Mkbench{tag}{i:012d}"
        inv = encode_invocation(
            tenant,
            sub=tenant.did,
            aud=service,
            cmd="/provider/add",
            args_raw=encode({"consumer": space, "provider": service}),
            exp=exp,
        )
        out.append(encode_container([inv]))
    return out


def generate_provisions(pool: ProcessPoolExecutor, tag: str, n: int) -> list[bytes]:
    exp = int(time.time()) + 6 * 3600
    jobs = [(tag, lo, min(lo + 2000, n), exp) for lo in range(0, n, 2000)]
    out: list[bytes] = []
    for chunk in pool.map(_prov_chunk, jobs):
        out.extend(chunk)
    return out


class Directory:
    """``forge-worker plc serve`` in a subprocess, with one tenant created by ``plc create``."""

    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.tmp / "plc.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "plc", "serve", "--port", str(self.port)],
            cwd=c.ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)  # a subprocess starting: no event to wait on
        raise RuntimeError("plc serve did not start")

    def create_tenant(self) -> tuple[str, str]:
        from worker.ucan import Signer

        key = Signer.generate(kind="secp256k1")
        path = self.tmp / "tenant.key"
        path.write_text(key.export())
        out = subprocess.run(
            [sys.executable, "-m", "worker.cli", "plc", "create", "--key", f"@{path}",
             "--directory", self.url, "--json"],
            cwd=c.ROOT, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return key.export(), json.loads(out.stdout)["did"]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    url = c.AMQP_URL
    rid = c.run_id()
    prefix = f"fwbench.{rid}"
    info = c.machine_info()
    versions = await c.server_versions()
    print(f"machine: {c.machine_line(info, versions)}", flush=True)
    result: dict[str, Any] = {"machine_detail": {**info, **versions}, "args": vars(args)}
    result["code"] = tp.code_version()
    result["loadavg_start"] = c.loadavg()
    tmp = Path(tempfile.mkdtemp(prefix="fw-provision-bench-"))
    directory = Directory(tmp)
    directory.start()
    db_url = await c.create_database(f"fwbench_{rid}")
    queues: list[str] = []
    try:
        tenant_key, tenant_did = directory.create_tenant()
        ids = tp.make_identities()
        with ProcessPoolExecutor(
            os.cpu_count() or 2, initializer=tp._gen_init, initargs=(ids,)
        ) as cpool:
            customers = [tp.generate(ids, f"{rid[:3]}c{k}", args.backlog, cpool)
                         for k in range(args.rounds)]  # fmt: skip
        with ProcessPoolExecutor(
            os.cpu_count() or 2,
            initializer=_prov_init,
            initargs=(tenant_key, tenant_did, ids.service_did),
        ) as ppool:
            provisions = [
                generate_provisions(ppool, f"{k}", args.backlog) for k in range(args.rounds)
            ]
        groups = {"rabbit": c.pids_by_comm("beam.smp"), "pg": c.pids_by_comm("postgres")}
        rates: dict[str, list[dict[str, Any]]] = {"customer_add": [], "provider_add": []}
        for k in range(args.rounds):
            order = (
                ["customer_add", "provider_add"] if k % 2 == 0 else ["provider_add", "customer_add"]
            )
            for kind in order:
                plc = {"FORGE_WORKER_PLC_DIRECTORY": directory.url}
                run = tp.WorkerRun(
                    f"{prefix}.{kind}.{k}", f"{prefix}.{kind}.{k}.receipts", db_url, ids, 1,
                    c.RESULTS / "logs", url, extra_env=plc,
                )  # fmt: skip
                queues += tp._worker_queue_names(run.queue, run.reply)
                run.migrate()
                if kind == "provider_add":
                    conn = await asyncpg.connect(db_url)
                    try:
                        await conn.execute(
                            "INSERT INTO public.customer (customer, product, inserted_at) "
                            "VALUES ($1, 'did:web:bench', now()) ON CONFLICT DO NOTHING",
                            tenant_did,
                        )
                    finally:
                        await conn.close()
                backlog = customers[k] if kind == "customer_add" else provisions[k]
                d = await tp.drain(url, run, backlog, groups)
                run.stop()
                d["receipts"] = await tp.check_receipts(url, run.reply, len(backlog))
                print(f"round {k} {kind}: {d['msgs_per_s']:,.0f} msg/s, "
                      f"{d['worker_cpu_us_per_msg']} µs CPU a message, receipts {d['receipts']}",
                      flush=True)  # fmt: skip
                rates[kind].append(d)
        summary = {
            kind: {
                "msgs_per_s": [d["msgs_per_s"] for d in runs],
                "median_msgs_per_s": statistics.median(d["msgs_per_s"] for d in runs),
                "worker_cpu_us_per_msg": [d["worker_cpu_us_per_msg"] for d in runs],
            }
            for kind, runs in rates.items()
        }
        ratio = (
            summary["provider_add"]["median_msgs_per_s"]
            / summary["customer_add"]["median_msgs_per_s"]
        )
        result.update(summary=summary, ratio=round(ratio, 3), runs=rates)
        result["loadavg_end"] = c.loadavg()
        print("\n/customer/add vs /provider/add, one worker, interleaved drains:")
        for kind, s in summary.items():
            print(f"  {kind:13} median {s['median_msgs_per_s']:8,.0f} msg/s  runs {s['msgs_per_s']}"
                  f"  CPU µs/msg {s['worker_cpu_us_per_msg']}")  # fmt: skip
        print(f"  ratio provider/customer: {ratio:.2f} (goal ≥ 0.80)")
        return result
    finally:
        directory.stop()
        conn2 = await aio_pika.connect(url)
        try:
            await c.delete_queues(conn2, queues)
        finally:
            await conn2.close()
        await c.drop_database(f"fwbench_{rid}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backlog", type=int, default=10_000, help="requests per drain")
    p.add_argument("--rounds", type=int, default=3, help="drains of each kind, alternating")
    p.add_argument("--out", type=Path, default=c.RESULTS / "provision.json")
    args = p.parse_args()
    result = uvloop.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
