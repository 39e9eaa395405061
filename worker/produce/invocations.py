"""Building requests and reading their receipts, pure (no broker): what
:mod:`worker.produce.client` signs and checks, and the producer's errors.

``build_customer_add``, ``build_provider_add`` and ``build_space_info`` sign each invocation
as its Go producer does (ucantone's ``invocation.Invoke``: ``exp`` = now + lifetime, a
16-byte nonce, no ``iat``, ``prf`` root first) and frame it with its proofs as ucantone's
HTTP transport does; ``verify_response`` finds the receipt for a request's task in a
response body and checks it is the service's. Everything here is re-exported by
:mod:`worker.produce.client` (and :mod:`worker.client`), where the API is documented.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from worker.errors import WorkerError
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

CUSTOMER_ADD: Final = "/customer/add"
PROVIDER_ADD: Final = "/provider/add"
SPACE_INFO: Final = "/space/info"
RECEIPT_COMMAND: Final = "/ucan/assert/receipt"
#: seconds an invocation stays valid; longer than ucantone's 30 s because it may wait in a queue
DEFAULT_LIFETIME: Final = 300
NONCE_SIZE: Final = 16


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
    ``{consumer, provider}``, ``consumer`` first (cbor-gen sorts the keys canonically, by
    length then bytes, though the struct declares ``Provider`` first).

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
        problem = receipt_problem(receipt, service_did, resolver or Resolver())
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


def receipt_problem(receipt: Receipt, service_did: str, resolver: Resolver) -> str | None:
    """Why ``receipt`` is not the service's (command, no audience, issuer and subject, the
    signature), or None when it is."""
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
