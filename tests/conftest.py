"""Shared fixtures: the real services (a missing one fails the run, never skips it), an
isolated database and isolated queue names per test, and the shared vectors."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest

#: fixtures every room's tests share: the protocol fixtures' principals and a Hilt-style
#: request (tests/support/principals.py), the in-process worker and its requester (worker.py)
pytest_plugins = ["tests.support.principals", "tests.support.worker", "tests.support.directory"]

ROOT = Path(__file__).resolve().parent.parent
#: ``../shared`` beside the checkout (CI puts it there); FORGE_WORKER_SHARED overrides
SHARED = Path(os.environ.get("FORGE_WORKER_SHARED", ROOT.parent / "shared"))
VECTORS = SHARED / "vectors"

AMQP_URL = os.environ.get("FORGE_WORKER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
ADMIN_DSN = os.environ.get(
    "FORGE_WORKER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _require(url: str, what: str) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port
    assert port is not None
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        pytest.fail(
            f"{what} is not reachable at {host}:{port} ({exc}); start it, the tests "
            "never skip a missing service",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def vectors() -> Path:
    """The shared test vectors; their absence fails the test."""
    if not VECTORS.is_dir():
        pytest.fail(f"shared vectors not found at {VECTORS}", pytrace=False)
    return VECTORS


@pytest.fixture(scope="session")
def amqp_url() -> str:
    _require(AMQP_URL, "RabbitMQ")
    return AMQP_URL


@pytest.fixture(scope="session")
def admin_dsn() -> str:
    _require(ADMIN_DSN, "PostgreSQL")
    return ADMIN_DSN


@pytest.fixture
async def database_url(admin_dsn: str) -> AsyncIterator[str]:
    """A fresh, empty database for this test, dropped afterwards."""
    name = f"fw_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    parts = urlsplit(admin_dsn)
    yield urlunsplit(parts._replace(path="/" + name))
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def queue_name() -> Iterator[str]:
    """A unique inbox name for this test; its derived queues share the prefix."""
    yield f"{SESSION_PREFIX}{uuid.uuid4().hex[:10]}"


#: every queue a test session creates starts with this, so the session can delete them all
SESSION_PREFIX = f"fwtest.{uuid.uuid4().hex[:6]}."


def _broker_queue_names() -> list[str]:
    """Every queue on the broker, read with rabbitmqctl (AMQP cannot list queues)."""
    try:
        out = subprocess.run(
            ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="session", autouse=True)
def _delete_session_queues() -> Iterator[None]:
    """At the end of the run, delete every queue this session left (retry tiers with custom
    delays, reply queues of clients, ...): quorum queues hold file descriptors, and a broker
    that runs out of them hangs new connections."""
    yield
    names = [n for n in _broker_queue_names() if n.startswith(SESSION_PREFIX)]
    if not names:
        return

    async def delete() -> None:
        conn = await aio_pika.connect(AMQP_URL)
        try:
            for name in names:
                ch = await conn.channel()
                with contextlib.suppress(Exception):
                    await ch.queue_delete(name)
                if not ch.is_closed:
                    await ch.close()
        finally:
            await conn.close()

    asyncio.run(delete())


@pytest.fixture
async def amqp(
    amqp_url: str, queue_name: str
) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    """A connection for the test's own use; deletes every queue named after ``queue_name``."""
    conn = await aio_pika.connect_robust(amqp_url)
    yield conn
    await delete_queues(conn, queue_name)
    await conn.close()


async def delete_queues(conn: aio_pika.abc.AbstractConnection, prefix: str) -> None:
    """Delete the inbox ``prefix`` and every queue derived from it (best effort)."""
    from worker.amqp.topology import DEFAULT_RETRY_DELAYS, dead_letter_name, retry_names

    names = [prefix, dead_letter_name(prefix), f"{prefix}.receipts", *retry_names(prefix)]
    names += retry_names(prefix, DEFAULT_RETRY_DELAYS)
    for name in dict.fromkeys(names):
        ch = await conn.channel()
        try:
            await ch.queue_delete(name)
        except Exception:  # a queue that was never declared is fine
            pass
        finally:
            if not ch.is_closed:
                await ch.close()
