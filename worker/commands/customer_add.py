"""``/customer/add`` (libforge ``commands/customer``): upsert a customer of the upload service."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from worker.commands.base import CommandError, Context
from worker.ucan import Invocation

COMMAND: Final = "/customer/add"
#: a write: once per task, through the ledger
LEDGERED: Final = True
#: nothing to read first: every prepared invocation succeeds with ``{}``
decide = None

#: Runs in the batch's one statement, after the receipt ledger's insert (``claimed`` holds
#: the tasks it inserted): the customers of those tasks only, one row per customer, equal to
#: applying them in the order they first arrived, then in message order (``ord``): product
#: and details those of the last, external_account the last one given (kept when none is),
#: inserted_at kept, updated_at set.
#:
#: A registration never rolls a customer back: a task is as old as its first arrival
#: (``arrived``: recorded for retried, redelivered and replayed tasks; a fresh one arrives
#: now), and it changes a row only if it is not older than the row's last change
#: (``updated_at``). So a registration dead-lettered during an outage and replayed after a
#: newer one executed is answered ``{ok: {}}`` and changes nothing: the customer is
#: registered, with newer details. ``updated_at`` of a new row is its registration's first
#: arrival. The comparison sits in ``ON CONFLICT ... WHERE``, which Postgres evaluates on
#: the row as it is once locked, so a concurrent worker's newer change is never overwritten.
#: Rows are sorted by customer so that concurrent workers lock them in the same order and
#: cannot deadlock. ``{0}``… are this statement's parameters (see ``effect_args``).
EFFECT: Final = """
INSERT INTO public.customer AS c
    (customer, external_account, product, details, inserted_at, updated_at)
SELECT m.customer, m.external_account, m.product, m.details, now(), m.arrived
FROM (
    SELECT u.customer,
        (array_agg(u.product ORDER BY u.at DESC, u.ord DESC))[1] AS product,
        (array_agg(u.details ORDER BY u.at DESC, u.ord DESC))[1] AS details,
        (array_agg(u.external_account ORDER BY u.at DESC, u.ord DESC)
            FILTER (WHERE u.external_account IS NOT NULL))[1] AS external_account,
        max(u.at) AS arrived
    FROM (
        SELECT r.*, COALESCE(a.first_seen_at, now()) AS at
        FROM unnest({0}::text[], {1}::text[], {2}::text[], {3}::text[], {4}::jsonb[])
            WITH ORDINALITY AS r(task, customer, external_account, product, details, ord)
        LEFT JOIN arrived AS a ON a.task_cid = r.task
        WHERE r.task IN (SELECT task_cid FROM claimed)
    ) AS u
    WHERE u.at >= COALESCE(
        (SELECT k.updated_at FROM public.customer AS k WHERE k.customer = u.customer),
        '-infinity'
    )
    GROUP BY u.customer
) AS m
ORDER BY m.customer
ON CONFLICT (customer) DO UPDATE SET
    product = EXCLUDED.product,
    details = EXCLUDED.details,
    external_account = COALESCE(EXCLUDED.external_account, c.external_account),
    updated_at = now()
WHERE c.updated_at IS NULL OR c.updated_at <= EXCLUDED.updated_at
"""


@dataclass(frozen=True, slots=True)
class AddArguments:
    """libforge ``AddArguments``: what one invocation asks for."""

    customer: str
    product: str
    details: Mapping[str, str]
    external_account: str | None = None


def _malformed(cause: str) -> CommandError:
    return CommandError("MalformedArguments", f"malformed arguments: {cause}")


def _text(args: Mapping[str, object], key: str, *, did: bool) -> str:
    value = args.get(key)
    if not isinstance(value, str):
        shown = "missing" if key not in args else f"expected text, got {type(value).__name__}"
        raise _malformed(f"{key}: {shown}")
    if "\x00" in value:
        raise _malformed(f"{key}: contains a NUL character")
    if did:
        parts = value.split(":", 2)
        if len(parts) < 3 or parts[0] != "did" or not parts[1] or not parts[2]:
            raise _malformed(f"{key}: expected a DID such as did:plc:..., got {value[:80]!r}")
    return value


def parse_arguments(args: object) -> AddArguments:
    """Check ``args`` as libforge's decoder would (unknown keys are ignored).

    Raises:
        CommandError: ``MalformedArguments`` naming the offending field.
    """
    if not isinstance(args, Mapping):
        raise _malformed(f"expected a map, got {type(args).__name__}")
    customer = _text(args, "customer", did=True)
    product = _text(args, "product", did=True)
    if "details" not in args:
        raise _malformed("details: missing")
    details = args["details"]
    if not isinstance(details, Mapping):
        raise _malformed(f"details: expected a map of text to text, got {type(details).__name__}")
    for k, v in details.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise _malformed(f"details: expected text to text, got {k!r}: {type(v).__name__}")
        if "\x00" in k or "\x00" in v:
            raise _malformed(f"details: {k!r} contains a NUL character")
    external = args.get("externalAccount")
    if external is not None:
        external = _text(args, "externalAccount", did=False)
    return AddArguments(customer, product, dict(details), external)


def prepare(inv: Invocation, ctx: Context) -> AddArguments:
    """The subject must be the service (sprue's rule), then the arguments are checked.

    Raises:
        CommandError: ``InvalidCustomerSubject`` or ``MalformedArguments``.
    """
    if inv.sub != ctx.service_did:
        raise CommandError(
            "InvalidCustomerSubject",
            f"invocation subject must be the service {ctx.service_did}, got {inv.sub}",
        )
    return parse_arguments(inv.args)


def details_json(details: Mapping[str, str]) -> str | None:
    """``details`` as stored: a JSON object, or NULL when empty."""
    return json.dumps(dict(details), ensure_ascii=False, sort_keys=True) if details else None


def effect_args(items: Sequence[tuple[str, object]]) -> list[object]:
    """The parameters of :data:`EFFECT` for ``(task CID, prepared)`` in message order."""
    rows = [(task, a) for task, a in items if isinstance(a, AddArguments)]
    return [
        [task for task, _ in rows],
        [a.customer for _, a in rows],
        [a.external_account for _, a in rows],
        [a.product for _, a in rows],
        [details_json(a.details) for _, a in rows],
    ]


#: the statements of the effect (one here)
EFFECTS: Final = (EFFECT,)
