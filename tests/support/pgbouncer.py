"""PgBouncer from the Debian package in front of the local Postgres, for one test.

Its own configuration, port and auth file in a temporary directory, ``pool_mode =
transaction`` and a server pool of two (so concurrent transactions of one client share
server connections, as under load), run as a subprocess and stopped afterwards. A missing
``pgbouncer`` fails the test (``scripts/ensure-env`` installs it), never skips it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

#: seconds PgBouncer gets to start answering
START_WITHIN = 15.0


def binary() -> str:
    """The ``pgbouncer`` executable, or fail the test."""
    found = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.fail(
            "pgbouncer is not installed: scripts/ensure-env installs it "
            "(apt-get install pgbouncer); the tests never skip it",
            pytrace=False,
        )
    return found


def version() -> str:
    """``pgbouncer --version``'s first line, e.g. ``PgBouncer 1.18.0``."""
    out = subprocess.run([binary(), "--version"], capture_output=True, text=True, timeout=10)
    return out.stdout.splitlines()[0].strip()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _user() -> list[str]:
    """PgBouncer refuses to run as root: ``-u`` the postgres (or nobody) user then."""
    if os.geteuid() != 0:
        return []
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return ["-u", name]
    pytest.fail("running as root and no postgres or nobody user to run pgbouncer as")


def _configure(database_url: str, pool_size: int) -> tuple[Path, Path, str]:
    """A directory with pgbouncer.ini and its auth file; (directory, ini, PgBouncer's URL)."""
    target = urlsplit(database_url)
    user = target.username or "postgres"
    port = _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="fw-pgbouncer-"))
    workdir.chmod(0o755)  # read by the postgres user when it runs as root
    ini = workdir / "pgbouncer.ini"
    users = workdir / "userlist.txt"
    users.write_text(f'"{user}" ""\n')
    ini.write_text(
        "[databases]\n"
        f"* = host={target.hostname or '127.0.0.1'} port={target.port or 5432}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {users}\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {pool_size}\n"
        "max_client_conn = 200\n"
    )
    for f in (ini, users):
        f.chmod(0o644)
    return workdir, ini, urlunsplit(target._replace(netloc=f"{user}@127.0.0.1:{port}"))


@contextlib.asynccontextmanager
async def pgbouncer(database_url: str, *, pool_size: int = 2) -> AsyncIterator[str]:
    """PgBouncer in transaction pooling mode in front of ``database_url``'s server, while
    entered; yields ``database_url`` with PgBouncer's host and port."""
    exe = binary()
    workdir, ini, url = _configure(database_url, pool_size)
    log_path = workdir / "pgbouncer.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            exe,
            *_user(),
            str(ini),
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
        )
    try:
        await _wait_ready(proc, url, log_path)
        yield url
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _read(path: Path) -> str:
    return path.read_text(errors="replace")


async def _wait_ready(proc: asyncio.subprocess.Process, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_WITHIN
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            log = _read(log_path)
            pytest.fail(f"pgbouncer exited with {proc.returncode}:\n{log}", pytrace=False)
        try:
            conn = await asyncpg.connect(url, statement_cache_size=0, timeout=2)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            last = exc
            await asyncio.sleep(0.1)
            continue
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()
        return
    pytest.fail(f"pgbouncer did not answer within {START_WITHIN} s: {last!r}", pytrace=False)
