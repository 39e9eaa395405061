"""A three-node RabbitMQ cluster (scripts/cluster) for the failover tests.

Fixtures:

``cluster``        :class:`Cluster`: ``scripts/cluster start`` once for all the tests of this
                   package (their whole run: the nodes are stopped, and their directory
                   deleted, after the last of them rather than at the end of the session,
                   so that the rest of the suite runs without three more VMs beside it)
``whole_cluster``  (autouse) after each test, every node resumed and running again, so
                   that a failing test leaves the next one a whole cluster
``queue``          a fresh quorum-queue name

What the tests measure (``TIMINGS``) is printed in the terminal summary.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "cluster"
AMQP_PORT = int(os.environ.get("FORGE_WORKER_CLUSTER_AMQP_PORT", "5681"))
PREFIX = os.environ.get("FORGE_WORKER_CLUSTER_NAME", "fw")
BASE = Path(os.environ.get("FORGE_WORKER_CLUSTER_DIR", "/tmp/forge-worker-cluster"))
NODES = (1, 2, 3)
QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}

#: what the tests measured, printed at the end of the run
TIMINGS: list[str] = []


def node_name(n: int) -> str:
    return f"{PREFIX}{n}@localhost"


def url(n: int) -> str:
    return f"amqp://guest:guest@127.0.0.1:{AMQP_PORT + n - 1}/"


async def run_command(*argv: str, within: float = 120) -> tuple[int, str, str]:
    """Run ``argv`` without blocking the event loop: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(within):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``scripts/cluster ARGS``, blocking (for the synchronous fixtures)."""
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout
    )


class Cluster:
    """The running cluster: the script's commands, rabbitmqctl through it, and URLs."""

    nodes = NODES

    def __init__(self, start_seconds: float) -> None:
        self.start_seconds = start_seconds

    url = staticmethod(url)
    name = staticmethod(node_name)

    async def run(self, *args: str, check: bool = True, within: float = 180) -> tuple[int, str]:
        """``scripts/cluster ARGS`` without blocking the event loop: (exit code, stdout)."""
        code, out, err = await run_command("bash", str(SCRIPT), *args, within=within)
        if check and code != 0:
            pytest.fail(f"scripts/cluster {' '.join(args)} exited {code}:\n{out}{err}")
        return code, out

    async def ctl_json(self, n: int, *args: str) -> Any:
        """``rabbitmqctl ARGS --formatter json`` against node ``n``, parsed."""
        _, out = await self.run("ctl", str(n), *args, "--formatter", "json", "--quiet")
        return json.loads(out)

    async def queue_info(self, queue: str, *, via: int = 1) -> dict[str, Any]:
        """The queue's ``members``, ``online`` members and ``leader``, as node ``via`` says."""
        rows = await self.ctl_json(via, "list_queues", "name", "members", "online", "leader")
        [row] = [r for r in rows if r["name"] == queue]
        return dict(row)

    async def quorum_status(self, queue: str, *, via: int = 1) -> dict[str, dict[str, Any]]:
        """Per member node: its Raft state, log and commit index."""
        _, out = await self.run(
            "queues", str(via), "quorum_status", queue, "--formatter", "json", "--quiet"
        )
        return {row["Node Name"]: row for row in json.loads(out)}

    async def wait_caught_up(self, queue: str, *, via: int, within: float = 30) -> None:
        """Until every member of ``queue`` is online and at the leader's commit index."""
        deadline = time.monotonic() + within
        while True:
            status = await self.quorum_status(queue, via=via)
            leaders = [s for s in status.values() if s["Raft State"] == "leader"]
            indexes = {s["Commit Index"] for s in status.values()}
            if len(status) == 3 and len(leaders) == 1 and len(indexes) == 1:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"{queue}: members not caught up within {within} s: {status}")
            await asyncio.sleep(0.5)

    def index_of(self, node: str) -> int:
        [n] = [n for n in NODES if node_name(n) == node]
        return n


@pytest.fixture(scope="package")
def cluster() -> Iterator[Cluster]:
    """``scripts/cluster start`` (a failure fails the tests: nothing is skipped), and
    ``scripts/cluster stop`` after the last test of this package."""
    began = time.monotonic()
    started = run_script("start")
    took = time.monotonic() - began
    if started.returncode != 0:
        stopped = run_script("stop")
        pytest.fail(
            f"scripts/cluster start exited {started.returncode}:\n{started.stdout}"
            f"{started.stderr}\n(stop: {stopped.stdout}{stopped.stderr})",
            pytrace=False,
        )
    TIMINGS.append(f"scripts/cluster start: {took:.1f} s")
    yield Cluster(took)
    stopped = run_script("stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr


@pytest.fixture(autouse=True)
def whole_cluster(cluster: Cluster) -> Iterator[None]:
    """After the test: resume any paused node and start any stopped one."""
    yield
    status = run_script("status")
    if status.returncode == 0:
        return
    for n in NODES:
        if f"{node_name(n)}: paused" in status.stdout:
            run_script("resume", str(n))
    healed = run_script("start")
    assert healed.returncode == 0, healed.stdout + healed.stderr


@pytest.fixture
def queue() -> str:
    return f"fwcluster.{uuid.uuid4().hex[:10]}"


@asynccontextmanager
async def connected(n: int) -> AsyncIterator[AbstractConnection]:
    """A plain connection to node ``n``."""
    conn = await aio_pika.connect(url(n), timeout=10)
    try:
        yield conn
    finally:
        await conn.close()


async def confirming_channel(conn: AbstractConnection) -> AbstractChannel:
    return await conn.channel(publisher_confirms=True, on_return_raises=True)


async def publish(
    channel: AbstractChannel, queue: str, body: bytes, *, confirm_within: float = 10
) -> None:
    """Publish persistent and ``mandatory``, and wait for the broker's confirm."""
    await channel.default_exchange.publish(
        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
        queue,
        mandatory=True,
        timeout=confirm_within,
    )


async def drain(
    conn: AbstractConnection,
    queue: str,
    count: int,
    *,
    also: frozenset[bytes] = frozenset(),
    within: float = 30,
) -> list[bytes]:
    """Consume (and ack) messages of ``queue`` through ``conn`` until ``count`` of them are
    not in ``also`` (bodies that may or may not be there); all of them, in order."""
    channel = await conn.channel()
    await channel.set_qos(prefetch_count=min(count, 100))
    q = await channel.declare_queue(queue, durable=True, arguments=QUORUM)
    bodies: list[bytes] = []
    expected = 0
    async with asyncio.timeout(within), q.iterator() as messages:
        async for message in messages:
            await message.ack()
            bodies.append(message.body)
            expected += message.body not in also
            if expected == count:
                break
    await channel.close()
    return bodies


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TIMINGS:
        terminalreporter.section("cluster timings")
        for line in TIMINGS:
            terminalreporter.write_line(line)
