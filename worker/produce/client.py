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

Replies (``reply=``). By default each client consumes a **durable quorum queue of its
own**, ``<queue>.replies.<client_id>``, named in ``reply_to`` (``reply="queue"``): a receipt
published while the client's connection is down waits there until the (robust) connection
comes back, and a producer that restarts with the same ``client_id`` finds it there. The
queue expires (``x-expires``, default one hour) once no client consumes it, so one-shot
clients leave nothing behind for long; it is never deleted on close, because the worker
publishes receipts ``mandatory`` and a deleted reply queue would make it retry.

``reply="direct"`` uses RabbitMQ's direct reply-to (``amq.rabbitmq.reply-to``, consumed
without acks on the channel that publishes): no queue, but at most once. A receipt the
worker publishes while the client is disconnected is lost, and so is one for a previous
process; so after a reconnect the client publishes every request it still awaits again
(the same bytes: the worker answers from its ledger with the same receipt), and
:meth:`Client.wait` can only collect a receipt for a request of this connection. Measured
against the queue in ``bench/reply_bench.py`` (README, "Producers").

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

The pure parts (the errors, building and signing requests, verifying a response) live in
:mod:`worker.produce.invocations`; every name is re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Literal, get_args

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
from worker.amqp.topology import CONTENT_TYPE, DIRECT_REPLY_TO
from worker.errors import Unreachable
from worker.produce.invocations import (
    CUSTOMER_ADD,
    DEFAULT_LIFETIME,
    NONCE_SIZE,
    PROVIDER_ADD,
    RECEIPT_COMMAND,
    SPACE_INFO,
    SPACE_INFO_ARGS,
    ClientError,
    CustomerAdd,
    InvalidReceipt,
    Outcome,
    ProofError,
    Provisioned,
    PublishFailed,
    ReceiptError,
    ReceiptTimeout,
    SignedRequest,
    SpaceInfo,
    build_customer_add,
    build_provider_add,
    build_space_info,
    command_covers,
    load_proofs,
    proof_chain,
    provider_add_args,
    receipt_problem,
    verify_response,
)
from worker.ucan import DecodeError, Delegation, Resolver, Signer, decode_request
from worker.ucan.keys import PublicKey, did_key_public

__all__ = [
    "CUSTOMER_ADD",
    "DEFAULT_LIFETIME",
    "DEFAULT_QUEUE",
    "DEFAULT_REPLY",
    "DEFAULT_REPLY_QUEUE_EXPIRES",
    "DEFAULT_TIMEOUT",
    "NONCE_SIZE",
    "PROVIDER_ADD",
    "RECEIPT_COMMAND",
    "REPLY_MODES",
    "SPACE_INFO",
    "SPACE_INFO_ARGS",
    "Client",
    "ClientError",
    "CustomerAdd",
    "InvalidReceipt",
    "Outcome",
    "ProofError",
    "Provisioned",
    "PublishFailed",
    "ReceiptError",
    "ReceiptTimeout",
    "ReplyMode",
    "SignedRequest",
    "SpaceInfo",
    "build_customer_add",
    "build_provider_add",
    "build_space_info",
    "command_covers",
    "load_proofs",
    "proof_chain",
    "provider_add_args",
    "reply_queue_arguments",
    "reply_queue_name",
    "verify_response",
]

DEFAULT_QUEUE: Final = "ucan.invocations"
#: seconds to wait for a receipt after each publish
DEFAULT_TIMEOUT: Final = 30.0
#: seconds an unused reply queue lives on (RabbitMQ ``x-expires``)
DEFAULT_REPLY_QUEUE_EXPIRES: Final = 3600
CONNECT_TIMEOUT: Final = 10.0
PUBLISH_TIMEOUT: Final = 30.0
#: responses kept for a later call()/wait() when they arrive before anyone waits
MAX_UNCLAIMED: Final = 10_000
#: of those, kept per correlation id (newest)
MAX_UNCLAIMED_PER_ID: Final = 8
#: problems of responses that did not verify, kept per wait to name in InvalidReceipt
MAX_PROBLEMS: Final = 3

#: how receipts come back: the client's durable reply queue, or direct reply-to
ReplyMode = Literal["queue", "direct"]
REPLY_MODES: Final[tuple[str, ...]] = get_args(ReplyMode)
DEFAULT_REPLY: Final[ReplyMode] = "queue"


#: what to check after each way a publish can fail (see worker.amqp.publish.PublishFailed.kind)
_PUBLISH_HINTS: Final = {
    "returned": " (no such queue: is the worker running?)",
    "nacked": " (is the inbox full?)",
}


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

    __slots__ = ("future", "invalid", "problems", "published", "request", "users")

    def __init__(self, request: SignedRequest, future: asyncio.Future[Outcome]) -> None:
        self.request = request
        self.future = future
        self.users = 0
        self.invalid = 0
        self.problems: list[str] = []
        #: published by this client (not only awaited with wait()): sent again after a
        #: reconnect when replies come by direct reply-to
        self.published = False

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
        reply: ReplyMode = DEFAULT_REPLY,
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
        reply: ``"queue"``, the durable reply queue (receipts survive a disconnect), or
            ``"direct"``, RabbitMQ's direct reply-to (at most once; after a reconnect the
            requests still awaited are published again). See the module docstring.

        Raises:
            DecodeError: ``service_key_did`` is not an Ed25519 or secp256k1 did:key.
            ValueError: ``reply`` is neither ``"queue"`` nor ``"direct"``.
        """
        if reply not in REPLY_MODES:
            raise ValueError(f"reply must be one of {', '.join(REPLY_MODES)}, got {reply!r}")
        self.amqp_url = amqp_url
        self.signer = signer
        self.service_did = service_did
        self.proofs = list(proofs)
        self.queue = queue
        self.client_id = client_id or uuid.uuid4().hex[:16]
        self.reply_queue = reply_queue_name(queue, self.client_id)
        self.reply: ReplyMode = reply
        #: what requests name in ``reply_to``
        self.reply_to = DIRECT_REPLY_TO if reply == "direct" else self.reply_queue
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
        self._resends: set[asyncio.Task[None]] = set()

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
        """Connect (robustly), open a confirming channel, declare and consume the reply queue
        (or, with ``reply="direct"``, consume direct reply-to on that channel).

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
            if self.replies and self.reply == "direct":
                # RabbitMQ's pseudo-queue: consumed without acks on the channel that
                # publishes the requests; restored with the channel after a reconnect
                self._replies = await self._channel.declare_queue(DIRECT_REPLY_TO, passive=True)
                self._consumer_tag = await self._replies.consume(self._on_reply, no_ack=True)
                self._connection.reconnect_callbacks.add(self._resend_awaited)
            elif self.replies:
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
        """Delete this client's reply queue now (e.g. in tests) instead of letting it expire;
        nothing to do with direct reply-to."""
        if self._replies is not None and self.reply == "queue":
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
            reply: name this client's reply queue (or direct reply-to) in ``reply_to``;
                without it the worker sends the receipt to its receipt queue.

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
            reply_to=self.reply_to if reply else None,
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
        ``client_id``): the response waits in the durable reply queue. With direct reply-to
        only a response to this connection can arrive (nothing is kept for a restart).

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
        if publish:
            waiter.published = True
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
            receipt_problem(r, self.service_did, self.resolver) is None for r in response.receipts
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
        if self.reply == "queue":  # (direct reply-to is consumed without acks)
            await message.ack()

    async def _resend_awaited(self, *_: Any) -> None:
        """After a reconnect, with direct reply-to: a receipt the worker published while
        the connection was down is lost, so publish every request still awaited again (the
        same bytes; the worker answers from its ledger). Not awaited here: the connection's
        callbacks must not wait for confirms."""
        for waiter in list(self._waiters.values()):
            if waiter.published and not waiter.future.done():
                task = asyncio.create_task(self._resend(waiter.request))
                self._resends.add(task)
                task.add_done_callback(self._resends.discard)

    async def _resend(self, request: SignedRequest) -> None:
        # a resend that fails leaves the caller's own timeout and attempts to act
        with contextlib.suppress(ClientError):
            await self.publish(request)
