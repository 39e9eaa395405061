"""The command registry: a UCAN command string -> the module that handles it.

A handler module has ``COMMAND`` (its command string), and:

``LEDGERED``
    True for a write: executed once per task, its receipt stored in the ledger (a
    redelivery gets the stored bytes); False for a read, executed on every delivery and
    never stored.
``prepare(inv, ctx) -> object``
    pure: checks the invocation for this command (its subject, its arguments) and returns
    what the rest needs; raises :class:`CommandError` (answered with an error receipt).
``decide``
    ``None`` when every prepared invocation succeeds with ``{}`` (``/customer/add``); else
    ``async decide(conn, items, ctx) -> list[Outcome]``: the checks that read the database,
    run in the batch's transaction for ``(task CID, prepared)`` pairs in message order, the
    tasks the ledger holds already left out (their stored receipt is the answer). An
    :class:`Outcome` with an error is answered with an error receipt and writes nothing.
``EFFECTS``
    data-modifying SQL statements applying a batch's successful items set-based. They run
    in the same statement as the receipt ledger's insert, as CTEs that can read
    ``claimed(task_cid)``: the tasks that insert took, so only they take effect, atomically
    with their receipts. Their parameters are written ``{0}``, ``{1}``, ... (shared by all
    of a handler's statements).
``effect_args(items) -> list``
    those parameters for the ``(task CID, prepared)`` pairs that succeeded, in message order.

Adding a command is one module here, listed in ``_MODULES``, and its tests.

May import: ``worker.ucan`` only (handlers are pure but for ``decide``, which is handed its
connection; the service runs their SQL).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from types import ModuleType
from typing import Any, Final, Protocol

from worker.commands import customer_add, provider_add, space_info
from worker.commands.base import CommandError, Context, Outcome
from worker.ucan import Invocation

#: ``decide(conn, items, ctx)``; ``conn`` is an asyncpg connection in a transaction
Decide = Callable[[Any, Sequence[tuple[str, object]], Context], Awaitable[list[Outcome]]]


class Handler(Protocol):
    """What a handler module provides (see the module docstring)."""

    COMMAND: str
    LEDGERED: bool
    EFFECTS: tuple[str, ...]
    decide: Decide | None

    def prepare(self, inv: Invocation, ctx: Context) -> object: ...

    def effect_args(self, items: Sequence[tuple[str, object]]) -> list[object]: ...


_MODULES: Final[tuple[ModuleType, ...]] = (customer_add, provider_add, space_info)

__all__ = ["REGISTRY", "CommandError", "Context", "Decide", "Handler", "Outcome", "lookup"]

#: command string -> its handler
REGISTRY: Final[dict[str, Handler]] = {m.COMMAND: m for m in _MODULES}


def lookup(command: str) -> Handler | None:
    """The handler of ``command``, or None (answered with ``HandlerNotFound``)."""
    return REGISTRY.get(command)
