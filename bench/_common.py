"""Helpers shared by the benchmark scripts: the machine, /proc readings, isolated
queues and databases, and a fast publisher.

Everything here talks to loopback services only and cleans up what it creates.
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

AMQP_URL = os.environ.get("FORGE_WORKER_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
ADMIN_DSN = os.environ.get(
    "FORGE_WORKER_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
_TCK = os.sysconf("SC_CLK_TCK")


def run_id() -> str:
    """A short unique id naming this run's queues and database."""
    return uuid.uuid4().hex[:10]


# --------------------------------------------------------------------------- machine


def loadavg() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    a, b, c = os.getloadavg()
    return round(a, 2), round(b, 2), round(c, 2)


def machine_info() -> dict[str, object]:
    """What the figures were measured on: CPUs, memory, kernel, Python, load at start."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "mem_gb": mem_gb,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": loadavg(),
    }


def machine_line(info: dict[str, object], versions: dict[str, str]) -> str:
    """One line naming the machine, for the JSON and the table."""
    la = info["loadavg_at_start"]
    assert isinstance(la, tuple)
    vers = ", ".join(f"{k} {v}" for k, v in versions.items())
    return (
        f"{info['cpus']} vCPU {info['cpu_model']}, {info['mem_gb']} GB RAM, Linux "
        f"{info['kernel']}, Python {info['python']}, {vers}; broker, database, worker and "
        f"benchmark share the cores; load average at start {la[0]}/{la[1]}/{la[2]}"
    )


# --------------------------------------------------------------------------- /proc


def vm_hwm_kb(pid: int) -> int:
    """Peak resident set size (VmHWM) of ``pid`` in kB, 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def vm_rss_kb(pid: int) -> int:
    """Current resident set size (VmRSS) of ``pid`` in kB, 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that are alive."""
    out = [pid]
    i = 0
    while i < len(out):
        p = out[i]
        i += 1
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                out.extend(int(c) for c in children)
        except OSError:
            continue
    return list(dict.fromkeys(out))


def pids_by_comm(*names: str) -> list[int]:
    """Pids whose command name (``/proc/<pid>/comm``) is one of ``names``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm in names:
            found.append(int(entry.name))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid`` (0 if it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TCK


def busy_cores(seconds: float = 2.0) -> float:
    """Cores the whole machine kept busy over the next ``seconds`` (blocking)."""
    b0, t0, _ = machine_cpu_seconds()
    time.sleep(seconds)
    b1, t1, _ = machine_cpu_seconds()
    return (b1 - b0) / (t1 - t0) * (os.cpu_count() or 1) if t1 > t0 else 0.0


def machine_cpu_seconds() -> tuple[float, float, float]:
    """(busy, total, steal) CPU seconds of the whole machine from /proc/stat (busy counts
    steal).

    Steal is time the hypervisor gave this VM's runnable vCPUs to someone else: on a shared
    VM it is part of the noise a latency run sees, so it is reported on its own.
    """
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    total = sum(parts[:8])
    steal = parts[7] if len(parts) > 7 else 0
    return (total - idle) / _TCK, total / _TCK, steal / _TCK


@dataclass
class CpuMeter:
    """CPU cores used by groups of processes over a window (start(), then stop())."""

    groups: dict[str, Sequence[int]] = field(default_factory=dict)
    _start: dict[int, float] = field(default_factory=dict)
    _t0: float = 0.0
    _m0: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def start(self, groups: dict[str, Sequence[int]]) -> None:
        self.groups = groups
        self._start = {p: cpu_seconds(p) for pids in groups.values() for p in pids}
        self._t0 = time.monotonic()
        self._m0 = machine_cpu_seconds()

    def stop(self, late: dict[str, Sequence[int]] | None = None) -> dict[str, float]:
        """Cores used per group; ``late`` adds pids that appeared during the window."""
        wall = time.monotonic() - self._t0
        out: dict[str, float] = {}
        for name, pids in self.groups.items():
            extra = list((late or {}).get(name, ()))
            used = sum(cpu_seconds(p) - self._start.get(p, 0.0) for p in {*pids, *extra})
            out[name] = round(used / wall, 2) if wall > 0 else 0.0
        busy, total, steal = machine_cpu_seconds()
        dt = total - self._m0[1]
        ncpu = os.cpu_count() or 1
        out["machine"] = round((busy - self._m0[0]) / dt * ncpu, 2) if dt > 0 else 0.0
        # what the rest of the machine (other processes, and the hypervisor's steal, which
        # is also shown on its own) took meanwhile
        out["other"] = round(max(0.0, out["machine"] - sum(out[g] for g in self.groups)), 2)
        out["steal"] = round((steal - self._m0[2]) / dt * ncpu, 2) if dt > 0 else 0.0
        return out


# --------------------------------------------------------------------------- services


def database_url(name: str, admin_dsn: str = ADMIN_DSN) -> str:
    """The DSN of database ``name`` on the admin DSN's server."""
    return urlunsplit(urlsplit(admin_dsn)._replace(path="/" + name))


async def create_database(name: str, admin_dsn: str = ADMIN_DSN) -> str:
    """Create an empty database and return its DSN."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return database_url(name, admin_dsn)


async def drop_database(name: str, admin_dsn: str = ADMIN_DSN) -> None:
    """Drop a database created by :func:`create_database` (its connections are cut)."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def server_versions(amqp_url: str = AMQP_URL, admin_dsn: str = ADMIN_DSN) -> dict[str, str]:
    """RabbitMQ and PostgreSQL versions, as the servers report them."""
    out: dict[str, str] = {}
    conn = await aio_pika.connect(amqp_url)
    try:
        props = conn.transport.connection.server_properties if conn.transport else {}
        out["RabbitMQ"] = str(props.get("version", "?"))
    except Exception:
        out["RabbitMQ"] = "?"
    finally:
        await conn.close()
    pg = await asyncpg.connect(admin_dsn)
    try:
        out["PostgreSQL"] = str(await pg.fetchval("SHOW server_version")).split()[0]
    finally:
        await pg.close()
    return out


async def delete_queues(conn: aio_pika.abc.AbstractConnection, names: Iterable[str]) -> None:
    """Delete queues by name; a queue that does not exist is fine."""
    for name in dict.fromkeys(names):
        ch = await conn.channel()
        try:
            await ch.queue_delete(name)
        except Exception:  # never declared, or already gone
            pass
        finally:
            if not ch.is_closed:
                await ch.close()


async def queue_counts(channel: aio_pika.abc.AbstractChannel, name: str) -> tuple[int, int]:
    """(ready messages, consumers) of an existing queue, by a passive declare."""
    q = await channel.declare_queue(name, passive=True)
    res = q.declaration_result
    return int(res.message_count or 0), int(res.consumer_count or 0)


async def publish_all(
    channel: aio_pika.abc.AbstractChannel,
    routing_key: str,
    bodies: Sequence[bytes],
    *,
    reply_to: str | None = None,
    first_index: int = 0,
    window: int = 1000,
) -> None:
    """Publish persistent messages with confirms, ``window`` in flight at a time.

    Each message carries ``correlation_id`` = its index (from ``first_index``).
    """
    ex = channel.default_exchange
    for lo in range(0, len(bodies), window):
        chunk = bodies[lo : lo + window]
        await asyncio.gather(
            *(
                ex.publish(
                    aio_pika.Message(
                        body,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        correlation_id=str(first_index + lo + j),
                        message_id=f"bench-{first_index + lo + j}",
                        reply_to=reply_to,
                    ),
                    routing_key=routing_key,
                )
                for j, body in enumerate(chunk)
            )
        )


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    cuts = statistics.quantiles(values, n=1000, method="inclusive")
    idx = min(max(round(q * 10) - 1, 0), len(cuts) - 1)
    return cuts[idx]
