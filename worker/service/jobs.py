"""What a batch is made of: the delivered messages (``Item``) and their invocations for the
service (``Job``), with what became of each."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.amqp import topology
from worker.commands import Handler
from worker.service.broker import Incoming
from worker.ucan import CID, Delegation, Invocation, Request, Resolver


@dataclass(slots=True)
class Job:
    """One invocation of a request, addressed to the service."""

    inv: Invocation
    #: the delegations beside it in its request, by CID
    proofs: Mapping[CID, Delegation] = field(default_factory=dict)
    #: who its issuers' keys come from: the batch's view with its did:plc documents
    resolver: Resolver | None = None
    handler: Handler | None = None
    prepared: object = None
    #: (name, message) when the invocation is refused
    error: tuple[str, str] | None = None
    #: the success value its handler decided (``None`` is ``{}``)
    ok: object = None
    #: its outcome came from its handler's database checks (undone with a rolled-back batch)
    decided: bool = False
    #: it passed validation (signature, time, chain, policy) and its handler's own checks:
    #: only then is its first arrival recorded (refused work writes nothing)
    validated: bool = False
    receipt: bytes | None = None
    duplicate: bool = False

    @property
    def task(self) -> str:
        return str(self.inv.task_cid)

    @property
    def cid(self) -> str:
        return str(self.inv.cid)


@dataclass(slots=True)
class Item:
    """One delivered message and what became of it."""

    msg: Incoming
    channel: Any
    received: float
    attempt: int = 0
    request: Request | None = None
    jobs: list[Job] = field(default_factory=list)
    #: set when the message failed: ``permanent`` (dead-letter) or ``transient`` (retry)
    failure: str | None = None
    reason: str = ""
    error: str = ""
    #: acked (or about to be, once the tags below it are) or given back to the queue
    settled: bool = False

    def fail(self, kind: str, reason: str, error: str) -> None:
        if self.failure != "permanent":  # a permanent verdict is never softened
            self.failure, self.reason, self.error = kind, reason, error


def attempt_of(msg: Incoming, tiers: int) -> int:
    """The worker's own attempt counter; clamped, since headers are the sender's to write."""
    raw = (msg.headers or {}).get(topology.H_ATTEMPT)
    try:
        value = int(raw) if isinstance(raw, (int, str, bytes)) else 0
    except ValueError:
        return 0
    return max(0, min(value, tiers))


def decides(job: Job) -> bool:
    """The job is valid and its command reads the database to decide its outcome."""
    return job.error is None and job.handler is not None and job.handler.decide is not None


def ledgered(job: Job) -> bool:
    return job.handler is None or job.handler.LEDGERED
