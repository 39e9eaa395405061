"""The command registry: a UCAN command string -> the module that handles it.

A handler module has ``COMMAND`` (its command string) and two functions:

``prepare(inv, service_did) -> object``
    pure: checks the invocation for this command (its subject, its arguments) and returns
    what ``apply`` needs; raises :class:`CommandError` (answered with an error receipt).
``async apply(conn, items) -> None``
    runs inside the batch's transaction with every prepared item of the batch for this
    command, in message order, and applies them set-based. Each item's outcome is ``{ok: {}}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Final, Protocol

import asyncpg

from worker.commands import customer_add
from worker.commands.base import CommandError
from worker.ucan import Invocation


class Handler(Protocol):
    """What a handler module provides (see the module docstring)."""

    COMMAND: str

    def prepare(self, inv: Invocation, service_did: str) -> object: ...

    async def apply(self, conn: asyncpg.Connection, items: Sequence[object]) -> None: ...


_MODULES: Final[tuple[ModuleType, ...]] = (customer_add,)

#: command string -> its handler
__all__ = ["REGISTRY", "CommandError", "Handler", "lookup"]

REGISTRY: Final[dict[str, Handler]] = {m.COMMAND: m for m in _MODULES}


def lookup(command: str) -> Handler | None:
    """The handler of ``command``, or None (answered with ``HandlerNotFound``)."""
    return REGISTRY.get(command)
