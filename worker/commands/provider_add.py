"""``/provider/add`` (libforge ``commands/provider``): provision a space for an account, as
sprue does (``pkg/service/handlers/provider_add.go``, ``pkg/provisioning/service.go``).

Hilt sends it on every bucket creation, signed by the tenant's own ``did:plc`` (issuer =
subject = the account, audience = the service, no proofs). sprue's checks, in its order:

1. the subject is a ``did:mailto`` or a ``did:plc`` account, else ``InvalidAccount``
   (``invalid account DID: `` and ucantone's ``plc.Parse`` text);
2. the account has a ``customer`` row (its payment plan), else ``AccountPlanMissing``,
   unless ``FORGE_WORKER_ALLOW_PROVISION_WITHOUT_PLAN``;
3. ``args.provider`` is the service itself, else ``ProviderNotAllowed``;
4. the space has no ``consumer`` row for this provider yet, else ``ConsumerExists``
   (a redelivery of the task that made it is answered from the ledger instead).

Then the ``subscription`` row (an existing one is fine) and the ``consumer`` row, ``cause`` =
the task CID; the success value is ``{id: <subscription>}``, the subscription being the CID
of the DAG-CBOR map ``{"consumer": <space>}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from worker.commands.base import CommandError, Context, Outcome
from worker.ucan import CID, Invocation, encode, plc_did_problem

COMMAND: Final = "/provider/add"
#: a write: once per task, through the ledger
LEDGERED: Final = True

#: sprue's error names and messages
INVALID_ACCOUNT: Final = "InvalidAccount"
PLAN_MISSING: Final = ("AccountPlanMissing", "account does not have an active payment plan")
PROVIDER_NOT_ALLOWED: Final = ("ProviderNotAllowed", "provider not allowed")
CONSUMER_EXISTS: Final = ("ConsumerExists", "adding consumer: consumer already exists")

#: Runs in the batch's one statement after the receipt ledger's insert (``claimed`` holds
#: the tasks it inserted): the subscriptions, then the consumers, of those tasks only,
#: sorted so that concurrent workers take row locks in the same order.
_ROWS: Final = """
    FROM unnest({0}::text[], {1}::text[], {2}::text[], {3}::text[], {4}::text[])
        AS u(task, subscription, provider, customer, consumer)
    WHERE u.task IN (SELECT task_cid FROM claimed)
    ORDER BY u.subscription, u.provider"""
EFFECTS: Final = (
    """
INSERT INTO public.subscription (subscription, provider, customer, cause, inserted_at)
SELECT u.subscription, u.provider, u.customer, u.task, now()"""
    + _ROWS
    + """
ON CONFLICT (subscription, provider) DO NOTHING""",
    """
INSERT INTO public.consumer (subscription, provider, consumer, customer, cause, inserted_at)
SELECT u.subscription, u.provider, u.consumer, u.customer, u.task, now()"""
    + _ROWS
    + """
ON CONFLICT (subscription, provider) DO NOTHING""",
)

#: serializes provisioning of one space across workers until the transaction ends: the
#: ``ConsumerExists`` check and the insert must not interleave with another task's
_LOCK: Final = """
SELECT pg_advisory_xact_lock(hashtextextended('forge-worker consumer ' || s, 0))
FROM unnest($1::text[]) AS s ORDER BY s
"""
_CUSTOMERS: Final = "SELECT customer FROM public.customer WHERE customer = ANY($1::text[])"
_CONSUMERS: Final = """
SELECT subscription, provider FROM public.consumer
WHERE subscription = ANY($1::text[]) AND provider = ANY($2::text[])
"""


@dataclass(frozen=True, slots=True)
class Provision:
    """One ``/provider/add``: the account (the subject), the space, the provider."""

    account: str
    consumer: str
    provider: str
    subscription: str


def subscription_id(space: str) -> str:
    """sprue's ``NewSubscriptionID``: the CID of DAG-CBOR ``{"consumer": space}``."""
    return str(CID.dag_cbor(encode({"consumer": space})))


def account_problem(did: str) -> str | None:
    """Why ``did`` is not an account (sprue: ``didmailto.Parse``, then ``plc.Parse``)."""
    if did.startswith("did:mailto:") and len(did) > len("did:mailto:"):
        return None
    return plc_did_problem(did)


def _did_arg(args: Mapping[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str):
        shown = "missing" if key not in args else f"expected a DID, got {type(value).__name__}"
        raise CommandError("MalformedArguments", f"malformed arguments: {key}: {shown}")
    parts = value.split(":", 2)
    if len(parts) < 3 or parts[0] != "did" or not parts[1] or not parts[2] or "\x00" in value:
        raise CommandError(
            "MalformedArguments",
            f"malformed arguments: {key}: expected a DID such as did:key:..., got {value[:80]!r}",
        )
    return value


def prepare(inv: Invocation, ctx: Context) -> Provision:
    """The checks that need no database: the arguments, then the account.

    Raises:
        CommandError: ``MalformedArguments`` or ``InvalidAccount``.
    """
    args = inv.args
    if not isinstance(args, Mapping):
        raise CommandError("MalformedArguments", "malformed arguments: expected a map")
    consumer = _did_arg(args, "consumer")
    provider = _did_arg(args, "provider")
    account = str(inv.sub)
    problem = account_problem(account)
    if problem is not None:
        raise CommandError(INVALID_ACCOUNT, f"invalid account DID: {problem}")
    return Provision(account, consumer, provider, subscription_id(consumer))


async def decide(conn: Any, items: Sequence[tuple[str, object]], ctx: Context) -> list[Outcome]:
    """sprue's checks 2-4 for each item, in message order, under a lock per space (two
    tasks provisioning one space in one batch: the first succeeds, the second is refused)."""
    provisions = [p for _, p in items if isinstance(p, Provision)]
    assert len(provisions) == len(items)
    await conn.execute(_LOCK, sorted({p.consumer for p in provisions}))
    customers: set[str] = set()
    if not ctx.allow_provision_without_plan:
        rows = await conn.fetch(_CUSTOMERS, sorted({p.account for p in provisions}))
        customers = {r["customer"] for r in rows}
    rows = await conn.fetch(
        _CONSUMERS,
        sorted({p.subscription for p in provisions}),
        sorted({p.provider for p in provisions}),
    )
    taken = {(r["subscription"], r["provider"]) for r in rows}
    outcomes: list[Outcome] = []
    for p in provisions:
        if not ctx.allow_provision_without_plan and p.account not in customers:
            outcomes.append(Outcome.refused(*PLAN_MISSING))
        elif p.provider != ctx.service_did:
            outcomes.append(Outcome.refused(*PROVIDER_NOT_ALLOWED))
        elif (p.subscription, p.provider) in taken:
            outcomes.append(Outcome.refused(*CONSUMER_EXISTS))
        else:
            taken.add((p.subscription, p.provider))
            outcomes.append(Outcome(ok={"id": p.subscription}))
    return outcomes


def effect_args(items: Sequence[tuple[str, object]]) -> list[object]:
    """The parameters of :data:`EFFECTS` for ``(task CID, prepared)`` in message order."""
    rows = [(task, p) for task, p in items if isinstance(p, Provision)]
    return [
        [task for task, _ in rows],
        [p.subscription for _, p in rows],
        [p.provider for _, p in rows],
        [p.account for _, p in rows],
        [p.consumer for _, p in rows],
    ]
