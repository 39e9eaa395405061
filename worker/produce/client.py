"""The producer side (Hilt's): sign ``/customer/add``, ``/provider/add`` and ``/space/info``,
publish them, await a verified receipt.

The three invocations, each built as its Go producer builds it:

* ``/customer/add`` (Hilt's ``RegisterCustomer``): issuer Hilt, ``aud`` = ``sub`` = the
  service, with the delegation chain from the service;
* ``/provider/add`` (Hilt's ``ProvisionSpace``): issuer = subject = the account (a tenant's
  ``did:plc`` signing with its secp256k1 key), ``aud`` = the service, no proofs, args
  ``{consumer: space, provider}``;
* ``/space/info``: subject = the space, issuer the space or the holder of a delegation chain
  from it, ``aud`` = the service, args ``{}``.

A request is what Hilt would send over HTTP with ucantone: a raw ``{"ctn-v1": [...]}``
container (no header byte) holding the invocation and the delegations its ``prf`` names.
It goes to the inbox through the default exchange (routing key = queue name), persistent,
``mandatory`` and with publisher confirms, so a missing inbox or a full one is an error
rather than a silent drop.

Replies. Each client consumes a **durable quorum queue of its own**,
``<queue>.replies.<client_id>``, named in ``reply_to``. Direct reply-to
(``amq.rabbitmq.reply-to``) was rejected: it is at-most-once, so a receipt published while
the client's connection is down is lost; a durable queue keeps it until the (robust)
connection comes back, and a producer that restarts with the same ``client_id`` finds it
there. The queue expires (``x-expires``, default one hour) once no client consumes it, so
one-shot clients leave nothing behind for long; it is never deleted on close, because the
worker publishes receipts ``mandatory`` and a deleted reply queue would make it retry.

Correlation. ``correlation_id`` is the invocation's CID: a resend of the same invocation
bytes carries the same id, and any response to any copy completes the wait. The id is
public (it is in the request) and anyone who can publish to the reply queue can send a
response carrying it, so only a response holding a receipt for the task that verifies
(signed by the service) ends the wait; others are noted and the wait goes on until the
timeout, which then raises :class:`InvalidReceipt` naming what came instead of
:class:`ReceiptTimeout`. A response that arrives before anyone waits for it (after a
reconnect, or for a previous process with the same ``client_id``) is kept, boundedly, for a
later :meth:`Client.call` or :meth:`Client.wait` when it holds a receipt the service signed.
Tasks are idempotent (the worker stores one receipt per task and sends the same bytes
again), so timeouts and resends are safe.

Errors::

    WorkerError
    └── ClientError          root of the producer's errors; ``name`` is a short token
        ├── ReceiptError     the service answered with an error receipt (``name``, ``message``)
        ├── InvalidReceipt   responses arrived, but none with a receipt for the task that
        │                    verifies, within the timeout
        ├── ReceiptTimeout   no response within the timeout (after every attempt)
        ├── PublishFailed    the broker did not take the request (returned, nacked, lost)
        └── ProofError       the delegations do not authorize the issuer for the command

A broker that cannot be reached at connect time raises :class:`worker.errors.Unreachable`.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final

import aio_pika
import aiormq.exceptions
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from worker.amqp.connect import redact
from worker.amqp.publish import PublishFailed as _BrokerPublishFailed
from worker.amqp.publish import publish_confirmed
from worker.amqp.topology import CONTENT_TYPE
from worker.errors import Unreachable, WorkerError
from worker.ucan import (
    CID,
    DecodeError,
    Delegation,
    Receipt,
    Resolver,
    Signer,
    ValidationError,
    customer_add_args,
    decode_request,
    encode,
    encode_container,
    encode_invocation,
    task_cid,
    verify_signature,
)
from worker.ucan.keys import PublicKey, did_key_public

CUSTOMER_ADD: Final = "/customer/add"
PROVIDER_ADD: Final = "/provider/add"
SPACE_INFO: Final = "/space/info"
RECEIPT_COMMAND: Final = "/ucan/assert/receipt"
DEFAULT_QUEUE: Final = "ucan.invocations"
#: seconds an invocation stays valid; longer than ucantone's 30 s because it may wait in a queue
DEFAULT_LIFETIME: Final = 300
#: seconds to wait for a receipt after each publish
DEFAULT_TIMEOUT: Final = 30.0
#: seconds an unused reply queue lives on (RabbitMQ ``x-expires``)
DEFAULT_REPLY_QUEUE_EXPIRES: Final = 3600
NONCE_SIZE: Final = 16
CONNECT_TIMEOUT: Final = 10.0
PUBLISH_TIMEOUT: Final = 30.0
#: responses kept for a later call()/wait() when they arrive before anyone waits
MAX_UNCLAIMED: Final = 10_000
#: of those, kept per correlation id (newest)
MAX_UNCLAIMED_PER_ID: Final = 8
#: problems of responses that did not verify, kept per wait to name in InvalidReceipt
MAX_PROBLEMS: Final = 3


# --- errors ------------------------------------------------------------------------------


class ClientError(WorkerError):
    """Root of the producer's errors; ``name`` is a short machine-readable token."""

    name: str = "ClientError"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ReceiptError(ClientError):
    """The service answered with a verified error receipt.

    Attributes:
        name: the receipt's error name (ucantone's, e.g. ``"MatchError"``).
        message: the receipt's error message.
        task: the task the receipt is about.
        receipt: the verified receipt.
    """

    def __init__(self, name: str, message: str, *, task: CID, receipt: Receipt) -> None:
        super().__init__(message)
        self.name = name
        self.task = task
        self.receipt = receipt

    def __str__(self) -> str:
        return f"{self.name}: {self.message}"


class InvalidReceipt(ClientError):
    """Responses arrived but none holds a receipt for the task that verifies."""

    name = "InvalidReceipt"


class ReceiptTimeout(ClientError):
    """No response arrived in time (after every attempt)."""

    name = "Timeout"


class PublishFailed(ClientError):
    """The broker did not take the request: returned (no such queue), nacked, or lost."""

    name = "PublishFailed"


#: what to check after each way a publish can fail (see worker.amqp.publish.PublishFailed.kind)
_PUBLISH_HINTS: Final = {
    "returned": " (no such queue: is the worker running?)",
    "nacked": " (is the inbox full?)",
}


class ProofError(ClientError):
    """The delegations at hand do not authorize the issuer to invoke the command."""

    name = "ProofError"


# --- building requests (pure) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CustomerAdd:
    """The arguments of one ``/customer/add`` (libforge's ``AddArguments``)."""

    customer: str
    product: str
    details: Mapping[str, str] = field(default_factory=dict)
    external_account: str | None = None


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """A signed invocation and the container that carries it with its proofs."""

    #: the invocation's envelope bytes
    invocation: bytes
    #: the invocation's CID (also the AMQP ``correlation_id``)
    cid: CID
    #: the task CID a receipt's ``ran`` must equal
    task: CID
    #: the message body: raw container of the invocation and its proofs, no header byte
    body: bytes
    #: the invocation's ``exp`` (unix seconds)
    exp: int | None


@dataclass(frozen=True, slots=True)
class Outcome:
    """A verified ok receipt."""

    task: CID
    receipt: Receipt
    #: the receipt's ``ok`` value (``{}`` for ``/customer/add``)
    ok: object


@dataclass(frozen=True, slots=True)
class Provisioned(Outcome):
    """A verified ok receipt of ``/provider/add``: ``ok`` is ``{id: subscription}``."""

    #: the subscription id (sprue's: the CID of DAG-CBOR ``{"consumer": space}``, as text)
    subscription: str

    @classmethod
    def of(cls, outcome: Outcome) -> Provisioned:
        """The subscription of a verified ``/provider/add`` outcome.

        Raises:
            InvalidReceipt: its ``ok`` is not ``{id: text}``.
        """
        ok = outcome.ok
        sub = ok.get("id") if isinstance(ok, Mapping) else None
        if not isinstance(sub, str):
            raise InvalidReceipt(
                f"the service's ok receipt for task {outcome.task} holds no subscription id "
                f"({{id: text}}), got {_shown(ok)}"
            )
        return cls(outcome.task, outcome.receipt, ok, sub)


@dataclass(frozen=True, slots=True)
class SpaceInfo(Outcome):
    """A verified ok receipt of ``/space/info``: ``ok`` is ``{providers: [DID, ...]}``."""

    #: the providers the space is provisioned with
    providers: tuple[str, ...]

    @classmethod
    def of(cls, outcome: Outcome) -> SpaceInfo:
        """The providers of a verified ``/space/info`` outcome.

        Raises:
            InvalidReceipt: its ``ok`` is not ``{providers: [text, ...]}``.
        """
        ok = outcome.ok
        providers = ok.get("providers") if isinstance(ok, Mapping) else None
        if not isinstance(providers, list) or not all(isinstance(p, str) for p in providers):
            raise InvalidReceipt(
                f"the service's ok receipt for task {outcome.task} holds no provider list "
                f"({{providers: [DID, ...]}}), got {_shown(ok)}"
            )
        return cls(outcome.task, outcome.receipt, ok, tuple(providers))


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def command_covers(granted: str, wanted: str) -> bool:
    """Whether a delegation of ``granted`` covers ``wanted`` (``/`` covers all, segment-wise)."""
    return granted == "/" or wanted == granted or wanted.startswith(granted + "/")


def proof_chain(
    delegations: Iterable[Delegation], *, issuer: str, subject: str, command: str, now: int
) -> list[Delegation]:
    """The delegation chain, root first, from ``subject`` to ``issuer`` for ``command``.

    Expired delegations and ones that do not cover ``command`` are ignored; among several
    chains the shortest is taken. An issuer equal to the subject needs no chain.

    Raises:
        ProofError: no chain exists.
    """
    if issuer == subject:
        return []
    usable = [
        d
        for d in delegations
        if command_covers(d.cmd, command)
        and (d.sub is None or d.sub == subject)
        and (d.exp is None or d.exp > now)
    ]
    # breadth-first from the issuer back towards the subject, so the first hit is shortest
    frontier: list[tuple[str, list[Delegation]]] = [(issuer, [])]
    seen = {issuer}
    while frontier:
        next_frontier: list[tuple[str, list[Delegation]]] = []
        for audience, tail in frontier:
            for d in usable:
                if d.aud != audience or d in tail:
                    continue
                chain = [d, *tail]
                if d.iss == subject and d.sub is not None:
                    return chain
                if d.iss not in seen:
                    seen.add(d.iss)
                    next_frontier.append((d.iss, chain))
        frontier = next_frontier
    raise ProofError(
        f"cannot invoke {command!r} on {subject!r} as {issuer!r}: no unexpired delegation "
        "chain from the subject to the issuer among the proofs"
    )


def load_proofs(path: str | os.PathLike[str]) -> list[Delegation]:
    """The delegations in a container file (any form CONTRACT §4 accepts, or a bare token).

    Raises:
        ProofError: the file cannot be read or holds no delegation.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ProofError(f"cannot read proofs from {str(path)!r}: {exc.strerror}") from None
    try:
        request = decode_request(data, max_size=16 << 20)
    except DecodeError as exc:
        raise ProofError(f"cannot read proofs from {str(path)!r}: {exc}") from None
    if not request.delegations:
        raise ProofError(f"cannot read proofs from {str(path)!r}: it holds no delegation")
    return list(request.delegations.values())


def _sign(
    signer: Signer,
    *,
    cmd: str,
    sub: str,
    aud: str,
    args_raw: bytes,
    chain: Sequence[Delegation],
    lifetime: int | None,
    now: int,
    nonce: bytes | None,
) -> SignedRequest:
    """Sign an invocation as ucantone's ``invocation.Invoke`` does (``prf`` = the chain root
    first, ``exp`` = now + ``lifetime``, a 16-byte nonce, no ``iat``) and frame it with the
    chain's delegations."""
    nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
    exp = None if lifetime is None else now + lifetime
    token = encode_invocation(
        signer,
        sub=sub,
        aud=aud,
        cmd=cmd,
        args_raw=args_raw,
        exp=exp,
        nonce=nonce,
        prf=[d.cid for d in chain],
    )
    body = encode_container([token, *(d.raw for d in chain)])
    return SignedRequest(
        invocation=token,
        cid=CID.dag_cbor(token),
        task=task_cid(cmd, sub, args_raw, nonce),
        body=body,
        exp=exp,
    )


def build_customer_add(
    signer: Signer,
    service_did: str,
    args: CustomerAdd,
    *,
    proofs: Sequence[Delegation] = (),
    lifetime: int | None = DEFAULT_LIFETIME,
    now: int | None = None,
    nonce: bytes | None = None,
) -> SignedRequest:
    """Sign a ``/customer/add`` the way Hilt does, and frame it with its proofs.

    Hilt's shape (ucantone ``invocation.Invoke`` with ``WithAudience``): ``iss`` = the
    signer, ``aud`` = ``sub`` = the service, ``prf`` = the chain root first, ``exp`` = now +
    ``lifetime``, a 16-byte random nonce, no ``iat``; ``args`` encoded as libforge does
    (``details`` in Go's ``sort.Strings`` order).

    Args:
        signer: the producer's identity.
        service_did: the worker's service DID (audience and subject).
        args: the registration.
        proofs: delegations to pick the chain from (see :func:`proof_chain`).
        lifetime: seconds until ``exp``; ``None`` for no expiry.
        now: the clock (unix seconds), default the system clock.
        nonce: default 16 random bytes.

    Raises:
        ProofError: the proofs do not authorize the signer.
    """
    now = int(time.time()) if now is None else now
    chain = proof_chain(
        proofs, issuer=signer.did, subject=service_did, command=CUSTOMER_ADD, now=now
    )
    args_raw = customer_add_args(
        args.customer, args.product, dict(args.details), args.external_account
    )
    return _sign(
        signer,
        cmd=CUSTOMER_ADD,
        sub=service_did,
        aud=service_did,
        args_raw=args_raw,
        chain=chain,
        lifetime=lifetime,
        now=now,
        nonce=nonce,
    )


def provider_add_args(consumer: str, provider: str) -> bytes:
    """libforge's ``provider.AddArguments`` byte for byte as cbor-gen writes them:
    ``{consumer, provider}``, ``consumer`` first (which is also DAG-CBOR's order).

    Raises:
        TypeError: a DID is not text.
    """
    for name, value in (("consumer", consumer), ("provider", provider)):
        if not isinstance(value, str):
            raise TypeError(f"cannot encode /provider/add args: {name} must be text")
    return b"\xa2" + encode("consumer") + encode(consumer) + encode("provider") + encode(provider)


#: ``/space/info``'s args: libforge's empty ``InfoArguments``, the empty map
SPACE_INFO_ARGS: Final = b"\xa0"


def build_provider_add(
    signer: Signer,
    service_did: str,
    space: str,
    provider: str | None = None,
    *,
    lifetime: int | None = DEFAULT_LIFETIME,
    now: int | None = None,
    nonce: bytes | None = None,
) -> SignedRequest:
    """Sign a ``/provider/add`` the way Hilt's ``ProvisionSpace`` does.

    ``providercmds.Add.Invoke(account, account.DID(), &AddArguments{Provider, Consumer},
    WithAudience(service))``: ``iss`` = ``sub`` = the signer's DID (the account: a tenant's
    ``did:plc``, i.e. ``Signer.parse(key).with_did(did_plc)``), ``aud`` = the service, no
    proofs, args ``{consumer: space, provider}``, ``exp`` = now + ``lifetime``, a 16-byte
    nonce, no ``iat``. The worker answers ``{id: subscription}`` or sprue's errors
    (``InvalidAccount`` for an account that is not a did:plc, ``AccountPlanMissing``,
    ``ProviderNotAllowed``, ``ConsumerExists``).

    Args:
        signer: the account (acting as its did:plc).
        service_did: the worker's service DID (the audience).
        space: the space to provision (the ``consumer``).
        provider: the provider; default the service itself (the only one sprue allows).
        lifetime, now, nonce: as :func:`build_customer_add`.
    """
    now = int(time.time()) if now is None else now
    return _sign(
        signer,
        cmd=PROVIDER_ADD,
        sub=signer.did,
        aud=service_did,
        args_raw=provider_add_args(space, service_did if provider is None else provider),
        chain=(),
        lifetime=lifetime,
        now=now,
        nonce=nonce,
    )


def build_space_info(
    signer: Signer,
    service_did: str,
    space: str,
    *,
    proofs: Sequence[Delegation] = (),
    lifetime: int | None = DEFAULT_LIFETIME,
    now: int | None = None,
    nonce: bytes | None = None,
) -> SignedRequest:
    """Sign a ``/space/info`` about ``space``: ``sub`` = the space, ``iss`` = the signer (the
    space's own key, or the holder of a delegation chain from the space among ``proofs``),
    ``aud`` = the service, args ``{}``.

    Raises:
        ProofError: the signer is not the space and the proofs hold no chain from it.
    """
    now = int(time.time()) if now is None else now
    chain = proof_chain(proofs, issuer=signer.did, subject=space, command=SPACE_INFO, now=now)
    return _sign(
        signer,
        cmd=SPACE_INFO,
        sub=space,
        aud=service_did,
        args_raw=SPACE_INFO_ARGS,
        chain=chain,
        lifetime=lifetime,
        now=now,
        nonce=nonce,
    )


def verify_response(
    request: SignedRequest, body: bytes, *, service_did: str, resolver: Resolver | None = None
) -> Outcome:
    """Find and verify the receipt for ``request`` in a response body.

    The receipt must be signed by ``service_did`` (``iss`` = ``sub``), have command
    ``/ucan/assert/receipt`` and no ``aud``, and its ``ran`` must be the request's task.

    Raises:
        InvalidReceipt: no such receipt, or it does not verify.
        ReceiptError: a verified error receipt.
    """
    try:
        response = decode_request(body, max_size=16 << 20)
    except DecodeError as exc:
        raise InvalidReceipt(f"cannot read the response for task {request.task}: {exc}") from None
    receipts = [r for r in response.receipts if r.ran == request.task]
    if not receipts:
        raise InvalidReceipt(f"cannot find a receipt for task {request.task} in the response")
    problems: list[str] = []
    for receipt in receipts:
        problem = _receipt_problem(receipt, service_did, resolver or Resolver())
        if problem is not None:
            problems.append(problem)
            continue
        if receipt.error is not None:
            raise ReceiptError(
                str(receipt.error.get("name", "UnknownError")),
                str(receipt.error.get("message", "")),
                task=request.task,
                receipt=receipt,
            )
        return Outcome(task=request.task, receipt=receipt, ok=receipt.ok)
    raise InvalidReceipt(f"cannot verify the receipt for task {request.task}: {problems[0]}")


def _receipt_problem(receipt: Receipt, service_did: str, resolver: Resolver) -> str | None:
    if receipt.cmd != RECEIPT_COMMAND:
        return f"command is {receipt.cmd!r}, not {RECEIPT_COMMAND!r}"
    if receipt.aud is not None:
        return f"a receipt has no audience, this one has {receipt.aud!r}"
    if receipt.iss != service_did or receipt.sub != service_did:
        return f"issued by {receipt.iss!r} about {receipt.sub!r}, expected {service_did!r}"
    try:
        verify_signature(receipt, resolver)
    except ValidationError as exc:
        return f"{exc.name}: {exc.message}"
    return None


def reply_queue_arguments(expires: int = DEFAULT_REPLY_QUEUE_EXPIRES) -> dict[str, object]:
    """A durable quorum reply queue that disappears ``expires`` seconds after its last use."""
    return {"x-queue-type": "quorum", "x-expires": expires * 1000}


def reply_queue_name(queue: str, client_id: str) -> str:
    """The reply queue of client ``client_id`` of inbox ``queue``."""
    return f"{queue}.replies.{client_id}"


# --- the client --------------------------------------------------------------------------


class _Waiter:
    """One pending wait for a verified receipt: shared by every copy of one invocation.

    ``future`` completes with the first response holding a receipt for the task that
    verifies (an :class:`Outcome`, or a :class:`ReceiptError`); responses that do not verify
    are counted, and the first few problems kept, for :class:`InvalidReceipt`.
    """

    __slots__ = ("future", "invalid", "problems", "request", "users")

    def __init__(self, request: SignedRequest, future: asyncio.Future[Outcome]) -> None:
        self.request = request
        self.future = future
        self.users = 0
        self.invalid = 0
        self.problems: list[str] = []

    def reject(self, problem: str) -> None:
        self.invalid += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)


class Client:
    """Publishes signed invocations and awaits their verified receipts.

    Use it as ``async with Client(...) as client: await client.add_customer(...)``;
    ``provision(space)`` (``/provider/add`` by the signer's account) and
    ``space_info(space)`` (``/space/info``) likewise.
    """

    def __init__(
        self,
        amqp_url: str,
        *,
        signer: Signer,
        service_did: str,
        proofs: Sequence[Delegation] = (),
        queue: str = DEFAULT_QUEUE,
        client_id: str | None = None,
        lifetime: int | None = DEFAULT_LIFETIME,
        timeout: float = DEFAULT_TIMEOUT,
        resolver: Resolver | None = None,
        service_key_did: str | None = None,
        reply_queue_expires: int = DEFAULT_REPLY_QUEUE_EXPIRES,
        replies: bool = True,
    ) -> None:
        """Args:
        amqp_url: the broker.
        signer: the producer's identity (Hilt's key, possibly ``with_did``; for
            :meth:`provision`, the account: a tenant's secp256k1 key ``with_did`` its
            did:plc).
        service_did: the worker's service DID: the audience of every invocation (and the
            subject of ``/customer/add``), and the only accepted issuer of receipts.
        proofs: delegations to the signer (e.g. :func:`load_proofs`): from the service for
            ``/customer/add``, from a space for ``/space/info``; each request takes the
            chain it needs.
        queue: the worker's inbox.
        client_id: names the reply queue; give a stable one to collect replies across
            restarts (one live client per id). Default: random.
        lifetime: seconds each invocation stays valid (``exp``); ``None`` for no expiry.
        timeout: default seconds to wait for a receipt after each publish.
        resolver: resolves the service DID's key to verify receipts; default: did:key only,
            plus ``service_key_did``.
        service_key_did: the did:key of the service's key, for a service DID such as
            did:web that cannot be resolved offline.
        reply_queue_expires: seconds the reply queue outlives its last consumer.
        replies: declare and consume the reply queue; ``False`` for a publish-only client
            (receipts then go to the worker's receipt queue).

        Raises:
            DecodeError: ``service_key_did`` is not an Ed25519 or secp256k1 did:key.
        """
        self.amqp_url = amqp_url
        self.signer = signer
        self.service_did = service_did
        self.proofs = list(proofs)
        self.queue = queue
        self.client_id = client_id or uuid.uuid4().hex[:16]
        self.reply_queue = reply_queue_name(queue, self.client_id)
        self.lifetime = lifetime
        self.timeout = timeout
        if resolver is None:
            static: dict[str, list[PublicKey]] = {}
            if service_key_did is not None:
                static[service_did] = [did_key_public(service_key_did)]
            resolver = Resolver(static)
        self.resolver = resolver
        self.reply_queue_expires = reply_queue_expires
        self.replies = replies
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._replies: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._waiters: dict[str, _Waiter] = {}
        #: responses that arrived before anyone waited for them, by correlation id, oldest
        #: id first
        self._unclaimed: OrderedDict[str, list[bytes]] = OrderedDict()

    # -- lifecycle --

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect (robustly), open a confirming channel, declare and consume the reply queue.

        Raises:
            Unreachable: the broker cannot be reached or refuses the login.
        """
        try:
            self._connection = await aio_pika.connect_robust(
                self.amqp_url,
                timeout=CONNECT_TIMEOUT,
                client_properties={"connection_name": f"forge-worker client {self.client_id}"},
            )
        except (OSError, TimeoutError, aiormq.exceptions.AMQPError) as exc:
            raise Unreachable(
                f"cannot reach the broker at {redact(self.amqp_url)}: {type(exc).__name__}: {exc}"
            ) from None
        try:
            self._channel = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            if self.replies:
                self._replies = await self._channel.declare_queue(
                    self.reply_queue,
                    durable=True,
                    arguments=reply_queue_arguments(self.reply_queue_expires),
                )
                self._consumer_tag = await self._replies.consume(self._on_reply, no_ack=False)
        except BaseException:
            await self._connection.close()
            self._connection = None
            raise

    async def close(self) -> None:
        """Stop consuming and close the connection; pending waits fail with ClientError."""
        for waiter in self._waiters.values():
            if not waiter.future.done():
                waiter.future.set_exception(ClientError("cannot wait: the client was closed"))
        if self._connection is not None and not self._connection.is_closed:
            await self._connection.close()
        self._connection = None

    async def delete_reply_queue(self) -> None:
        """Delete this client's reply queue now (e.g. in tests) instead of letting it expire."""
        if self._replies is not None:
            if self._consumer_tag is not None:
                await self._replies.cancel(self._consumer_tag)
                self._consumer_tag = None
            await self._replies.delete(if_unused=False, if_empty=False)
            self._replies = None

    # -- requests --

    def build(self, args: CustomerAdd, *, now: int | None = None) -> SignedRequest:
        """A signed ``/customer/add`` with this client's identity, service and proofs."""
        return build_customer_add(
            self.signer,
            self.service_did,
            args,
            proofs=self.proofs,
            lifetime=self.lifetime,
            now=now,
        )

    async def publish(self, request: SignedRequest, *, reply: bool = True) -> None:
        """Publish ``request`` to the inbox and wait for the broker's confirm.

        Args:
            request: what to send (sending the same request again is safe).
            reply: name this client's reply queue in ``reply_to``; without it the worker
                sends the receipt to its receipt queue.

        Raises:
            PublishFailed: returned (no inbox), nacked (e.g. the inbox is full), not
                confirmed in time, or the connection was lost; a resend is safe.
        """
        channel = self._channel
        if channel is None or channel.is_closed:
            raise PublishFailed("cannot publish: the client is not connected")
        if reply and self._replies is None:
            raise ClientError("cannot await replies: this client was made with replies=False")
        message = aio_pika.Message(
            request.body,
            content_type=CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=str(request.cid),
            reply_to=self.reply_queue if reply else None,
            message_id=uuid.uuid4().hex,
            timestamp=int(time.time()),
            app_id="forge-worker-client",
        )
        try:
            await publish_confirmed(channel, message, self.queue, timeout=PUBLISH_TIMEOUT)
        except _BrokerPublishFailed as exc:
            raise PublishFailed(f"{exc}{_PUBLISH_HINTS.get(exc.kind, '')}") from None

    async def call(
        self,
        request: SignedRequest,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - per attempt, between resends
        attempts: int = 1,
    ) -> Outcome:
        """Publish ``request`` and await its verified receipt, resending on timeout.

        A response already received for this invocation (e.g. one that reached the reply
        queue while the connection was down) is used without publishing again.

        Args:
            request: the signed request (see :meth:`build`).
            timeout: seconds to wait after each publish (default: the client's).
            attempts: publishes in all; each resend is the same bytes, which the worker
                answers with the same receipt.

        Raises:
            ReceiptError: the receipt is an error; ``.name`` and ``.message`` are its own.
            InvalidReceipt: responses came, but none held a receipt for the task that
                verifies, after ``attempts`` publishes (a response that does not verify
                never ends the wait: anyone who can publish to the reply queue can send one).
            ReceiptTimeout: nothing arrived after ``attempts`` publishes.
            PublishFailed: the broker did not take it.
        """
        timeout = self.timeout if timeout is None else timeout
        return await self._await_reply(request, timeout, max(1, attempts), publish=True)

    async def wait(
        self,
        request: SignedRequest,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - overall, nothing is resent
    ) -> Outcome:
        """Await the receipt of a request published earlier, without publishing it again.

        For a producer that published before a disconnect or a restart (with the same
        ``client_id``): the response waits in the durable reply queue.

        Raises:
            ReceiptError, InvalidReceipt, ReceiptTimeout: as :meth:`call`.
        """
        timeout = self.timeout if timeout is None else timeout
        return await self._await_reply(request, timeout, 1, publish=False)

    async def _await_reply(
        self,
        request: SignedRequest,
        timeout: float,  # noqa: ASYNC109 - per attempt, between resends
        attempts: int,
        *,
        publish: bool,
    ) -> Outcome:
        key = str(request.cid)
        waiter = self._waiters.get(key)
        if waiter is None:
            waiter = _Waiter(request, asyncio.get_running_loop().create_future())
            self._waiters[key] = waiter
        for body in self._unclaimed.pop(key, ()):
            self._offer(waiter, body)
        waiter.users += 1
        published = 0
        try:
            for _ in range(attempts):
                if publish and not waiter.future.done():
                    await self.publish(request)
                    published += 1
                try:
                    # shield: a timeout must not cancel the future other copies may share
                    return await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
                except TimeoutError:
                    continue
        finally:
            waiter.users -= 1
            if waiter.users == 0 and self._waiters.get(key) is waiter:
                del self._waiters[key]
        waited = f"within {timeout:g} s " + (
            f"after {published} publish(es)" if publish else "(not published again)"
        )
        if waiter.invalid:
            raise InvalidReceipt(
                f"cannot get a verified receipt for task {request.task} {waited}: "
                f"{waiter.invalid} response(s) with its correlation id did not verify: "
                + "; ".join(waiter.problems)
            )
        raise ReceiptTimeout(f"cannot get a receipt for task {request.task}: none {waited}")

    def _offer(self, waiter: _Waiter, body: bytes) -> None:
        """Complete ``waiter`` with ``body`` if it holds a verifying receipt for its task;
        otherwise note why not and let the wait go on."""
        if waiter.future.done():
            return
        try:
            outcome = verify_response(
                waiter.request, body, service_did=self.service_did, resolver=self.resolver
            )
        except ReceiptError as exc:  # verified: the service's own answer
            waiter.future.set_exception(exc)
        except InvalidReceipt as exc:
            waiter.reject(exc.message)
        else:
            waiter.future.set_result(outcome)

    def _signed_by_service(self, body: bytes) -> bool:
        """Whether ``body`` holds a receipt the service signed (worth keeping for later)."""
        try:
            response = decode_request(body, max_size=16 << 20)
        except DecodeError:
            return False
        return any(
            _receipt_problem(r, self.service_did, self.resolver) is None for r in response.receipts
        )

    async def add_customer(
        self,
        customer: str,
        product: str,
        details: Mapping[str, str] | None = None,
        external_account: str | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - per attempt, between resends
        attempts: int = 1,
    ) -> Outcome:
        """Register a customer and return the verified ok receipt.

        Raises:
            ReceiptError: the service refused it; ``.name`` / ``.message`` say why.
            InvalidReceipt, ReceiptTimeout, PublishFailed, ProofError: see :meth:`call`.
        """
        request = self.build(CustomerAdd(customer, product, details or {}, external_account))
        return await self.call(request, timeout=timeout, attempts=attempts)

    def build_provision(
        self, space: str, provider: str | None = None, *, now: int | None = None
    ) -> SignedRequest:
        """A signed ``/provider/add`` of ``space`` by this client's signer (the account)."""
        return build_provider_add(
            self.signer, self.service_did, space, provider, lifetime=self.lifetime, now=now
        )

    def build_space_info(self, space: str, *, now: int | None = None) -> SignedRequest:
        """A signed ``/space/info`` about ``space`` with this client's identity and proofs."""
        return build_space_info(
            self.signer,
            self.service_did,
            space,
            proofs=self.proofs,
            lifetime=self.lifetime,
            now=now,
        )

    async def provision(
        self,
        space: str,
        provider: str | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - per attempt, between resends
        attempts: int = 1,
    ) -> Provisioned:
        """Provision ``space`` for this client's account (``/provider/add``, as Hilt's
        ``ProvisionSpace``) and return the verified outcome with its subscription id.

        Args:
            space: the space DID (the ``consumer``).
            provider: default the service (the only provider the worker allows).

        Raises:
            ReceiptError: the service refused it; ``.name`` is sprue's (``InvalidAccount``,
                ``AccountPlanMissing``, ``ProviderNotAllowed``, ``ConsumerExists``) or
                ucantone's (e.g. ``InvalidSignature``, ``UnknownError`` for a did:plc the
                directory does not know).
            InvalidReceipt, ReceiptTimeout, PublishFailed: see :meth:`call`.
        """
        request = self.build_provision(space, provider)
        return Provisioned.of(await self.call(request, timeout=timeout, attempts=attempts))

    async def space_info(
        self,
        space: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - per attempt, between resends
        attempts: int = 1,
    ) -> SpaceInfo:
        """The providers ``space`` is provisioned with (``/space/info``), verified.

        Raises:
            ReceiptError: e.g. ``UnknownSpace`` (no provider yet).
            ProofError: the signer is not the space and holds no delegation chain from it.
            InvalidReceipt, ReceiptTimeout, PublishFailed: see :meth:`call`.
        """
        request = self.build_space_info(space)
        return SpaceInfo.of(await self.call(request, timeout=timeout, attempts=attempts))

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        key = message.correlation_id or ""
        waiter = self._waiters.get(key)
        if waiter is not None:
            self._offer(waiter, message.body)
        elif key and self._signed_by_service(message.body):
            # nobody waits yet (a reply from before a restart with this client_id, or one
            # that beat wait()): keep it for a later call()/wait(), boundedly; a resend of
            # its invocation would get the same receipt again anyway. What the service did
            # not sign is dropped: it could never end a wait.
            kept = self._unclaimed.setdefault(key, [])
            kept.append(message.body)
            del kept[:-MAX_UNCLAIMED_PER_ID]
            self._unclaimed.move_to_end(key)
            while len(self._unclaimed) > MAX_UNCLAIMED:
                self._unclaimed.popitem(last=False)
        await message.ack()
