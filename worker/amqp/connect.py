"""Connections for the operators' and producers' tools, and URLs shown without passwords."""

from __future__ import annotations

from typing import Final
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection

from worker.errors import Unreachable

#: seconds to wait for a broker answer (connect, declare, get, publish confirm)
BROKER_TIMEOUT: Final = 30.0


def redact(url: str) -> str:
    """``url`` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


async def connect(url: str) -> AbstractConnection:
    """A plain (not robust) connection; failing to connect raises :class:`Unreachable`."""
    try:
        return await aio_pika.connect(url, timeout=BROKER_TIMEOUT)
    except (OSError, TimeoutError, aiormq.exceptions.AMQPError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise Unreachable(f"cannot reach the broker at {redact(url)}: {detail}") from None
