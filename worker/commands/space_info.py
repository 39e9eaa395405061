"""``/space/info`` (libforge ``commands/space``): the providers a space is provisioned with,
as sprue's ``pkg/service/handlers/space_info.go`` reads them from ``consumer``.

The subject is the space; its issuer is the space itself or holds a delegation chain from
it (the validator checks that). A read: executed on every delivery, never stored in the
ledger. ``{ok: {providers: [DID, ...]}}`` (sorted as sprue lists them: by provider), or
``UnknownSpace`` for a space that is not a ``did:key`` (sprue's rule) or has no provider
(CONTRACT §5c; sprue itself answers such a did:key space with an empty list).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from worker.commands.base import CommandError, Context, Outcome
from worker.ucan import Invocation

COMMAND: Final = "/space/info"
#: a read: executed on every delivery, never stored
LEDGERED: Final = False
#: a read writes nothing
EFFECTS: Final[tuple[str, ...]] = ()
UNKNOWN_SPACE: Final = "UnknownSpace"

_PROVIDERS: Final = """
SELECT consumer, provider FROM public.consumer WHERE consumer = ANY($1::text[])
ORDER BY consumer, provider, subscription
"""


def prepare(inv: Invocation, ctx: Context) -> str:
    """The space (the subject), once the arguments are the empty map libforge sends.

    Raises:
        CommandError: ``MalformedArguments`` or ``UnknownSpace`` (not a did:key).
    """
    if not isinstance(inv.args, Mapping):
        raise CommandError("MalformedArguments", "malformed arguments: expected a map")
    space = str(inv.sub)
    if not space.startswith("did:key:"):
        raise CommandError(UNKNOWN_SPACE, "can only get info for did:key spaces")
    return space


async def decide(conn: Any, items: Sequence[tuple[str, object]], ctx: Context) -> list[Outcome]:
    """Each space's providers, one query for the batch."""
    spaces = [str(space) for _, space in items]
    providers: dict[str, list[str]] = {}
    for row in await conn.fetch(_PROVIDERS, sorted(set(spaces))):
        found = providers.setdefault(row["consumer"], [])
        if row["provider"] not in found:
            found.append(row["provider"])
    return [
        Outcome(ok={"providers": providers[s]})
        if providers.get(s)
        else Outcome.refused(UNKNOWN_SPACE, f"space {s} has no provider")
        for s in spaces
    ]


def effect_args(items: Sequence[tuple[str, object]]) -> list[object]:
    """A read has no effect."""
    return []
