"""The command registry: a UCAN command string -> the module that handles it.

A handler module has ``COMMAND`` (its command string), and:

``prepare(inv, service_did) -> object``
    pure: checks the invocation for this command (its subject, its arguments) and returns
    what the effect needs; raises :class:`CommandError` (answered with an error receipt).
``EFFECT``
    the SQL of one data-modifying statement that applies a batch's prepared items
    set-based. It runs in the same statement as the receipt ledger's insert, as a CTE that
    can read ``claimed(task_cid)``: the tasks that insert took, so only they take effect,
    atomically with their receipts. Its parameters are written ``{0}``, ``{1}``, ...
``effect_args(items) -> list``
    those parameters for ``(task CID, prepared item)`` pairs in message order. Each item's
    outcome is ``{ok: {}}``.

May import: ``worker.ucan`` only (handlers are pure; the service runs their SQL).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Final, Protocol

from worker.commands import customer_add
from worker.commands.base import CommandError
from worker.ucan import Invocation


class Handler(Protocol):
    """What a handler module provides (see the module docstring)."""

    COMMAND: str
    EFFECT: str

    def prepare(self, inv: Invocation, service_did: str) -> object: ...

    def effect_args(self, items: Sequence[tuple[str, object]]) -> list[object]: ...


_MODULES: Final[tuple[ModuleType, ...]] = (customer_add,)

#: command string -> its handler
__all__ = ["REGISTRY", "CommandError", "Handler", "lookup"]

REGISTRY: Final[dict[str, Handler]] = {m.COMMAND: m for m in _MODULES}


def lookup(command: str) -> Handler | None:
    """The handler of ``command``, or None (answered with ``HandlerNotFound``)."""
    return REGISTRY.get(command)
