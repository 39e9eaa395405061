"""``/customer/add`` (libforge ``commands/customer``): upsert a customer of the upload service."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import asyncpg

from worker.commands.base import CommandError
from worker.ucan import Invocation

COMMAND: Final = "/customer/add"

#: product and details replaced; external_account replaced when given, kept when absent;
#: inserted_at kept; updated_at set. Rows are sorted by customer so that concurrent
#: workers lock them in the same order and cannot deadlock.
UPSERT: Final = """
INSERT INTO public.customer AS c
    (customer, external_account, product, details, inserted_at, updated_at)
SELECT u.customer, u.external_account, u.product, u.details, now(), now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[])
    AS u(customer, external_account, product, details)
ORDER BY u.customer
ON CONFLICT (customer) DO UPDATE SET
    product = EXCLUDED.product,
    details = EXCLUDED.details,
    external_account = COALESCE(EXCLUDED.external_account, c.external_account),
    updated_at = now()
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


def prepare(inv: Invocation, service_did: str) -> AddArguments:
    """The subject must be the service (sprue's rule), then the arguments are checked.

    Raises:
        CommandError: ``InvalidCustomerSubject`` or ``MalformedArguments``.
    """
    if inv.sub != service_did:
        raise CommandError(
            "InvalidCustomerSubject",
            f"invocation subject must be the service {service_did}, got {inv.sub}",
        )
    return parse_arguments(inv.args)


def merge(items: Sequence[AddArguments]) -> list[AddArguments]:
    """One row per customer, sorted by customer, equal to applying ``items`` in order."""
    rows: dict[str, AddArguments] = {}
    for item in items:
        before = rows.get(item.customer)
        external = item.external_account
        if external is None and before is not None:
            external = before.external_account
        rows[item.customer] = AddArguments(item.customer, item.product, item.details, external)
    return [rows[c] for c in sorted(rows)]


def details_json(details: Mapping[str, str]) -> str | None:
    """``details`` as stored: a JSON object, or NULL when empty."""
    return json.dumps(dict(details), ensure_ascii=False, sort_keys=True) if details else None


async def apply(conn: asyncpg.Connection, items: Sequence[object]) -> None:
    """Upsert every customer of ``items`` (in message order) in one statement."""
    rows = merge([i for i in items if isinstance(i, AddArguments)])
    if not rows:
        return
    await conn.execute(
        UPSERT,
        [r.customer for r in rows],
        [r.external_account for r in rows],
        [r.product for r in rows],
        [details_json(r.details) for r in rows],
    )
