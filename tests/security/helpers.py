"""Builders for hostile requests (chains, forged tokens, Hilt-style containers), and a
collector of what the worker sends back."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from worker.ucan import (
    CID,
    CUSTOMER_ADD,
    Signer,
    customer_add_args,
    encode_container,
    encode_delegation,
    encode_invocation,
)

#: the validation time of these tests (any fixed instant)
NOW = 1_767_225_600
PRODUCT = "did:web:hilt.fil-forge.com"


def customer_did() -> str:
    return f"did:plc:{uuid.uuid4().hex[:24]}"


def dlg(
    issuer: Signer,
    audience: Signer | str,
    *,
    sub: str | None,
    cmd: str = CUSTOMER_ADD,
    pol: Iterable[Any] = (),
    exp: int | None = None,
    nbf: int | None = None,
) -> bytes:
    """A delegation from ``issuer`` to ``audience`` on subject ``sub`` (None: powerline)."""
    aud = audience if isinstance(audience, str) else audience.did
    return encode_delegation(issuer, aud=aud, sub=sub, cmd=cmd, pol=pol, exp=exp, nbf=nbf)


def inv(
    issuer: Signer,
    service_did: str,
    proofs: Sequence[bytes] = (),
    *,
    sub: str | None = None,
    aud: str | None = None,
    cmd: str = CUSTOMER_ADD,
    args_raw: bytes | None = None,
    customer: str | None = None,
    exp: int | None = NOW + 300,
    nonce: bytes | None = None,
    prf: Sequence[CID] | None = None,
) -> bytes:
    """A ``/customer/add`` invocation as Hilt builds it (aud = sub = the service)."""
    args = args_raw or customer_add_args(
        customer or customer_did(), PRODUCT, {"external_id": "c-1", "region": "eu"}
    )
    return encode_invocation(
        issuer,
        sub=sub or service_did,
        aud=aud or service_did,
        cmd=cmd,
        args_raw=args,
        exp=exp,
        nonce=nonce,
        prf=prf if prf is not None else [CID.dag_cbor(p) for p in proofs],
    )


def hilt_container(service: Signer, hilt: Signer, *, customer: str | None = None) -> bytes:
    """A valid request: Hilt's invocation and the service's delegation, raw ``ctn-v1``."""
    d = dlg(service, hilt, sub=service.did)
    return encode_container([inv(hilt, service.did, [d], customer=customer), d])


def old_glob_regex(p: str, i: int = 0, in_alt: bool = False) -> tuple[str, int]:
    """The regex translation ``like`` used before it was made linear: the oracle for small
    inputs (its ``.*`` backtracks exponentially on hostile ones)."""
    out: list[str] = []
    n = len(p)
    while i < n:
        c = p[i]
        if c == "\\" and i + 1 < n:
            out.append(re.escape(p[i + 1]))
            i += 2
        elif c == "*":
            out.append(".*")
            i += 1
        elif c == "?":
            out.append(".")
            i += 1
        elif c == "[":
            close = p.find("]", i + 2)
            if close < 0:
                out.append(re.escape(c))
                i += 1
                continue
            body = p[i + 1 : close]
            neg = body.startswith("!")
            if neg:
                body = body[1:]
            cls = "".join(re.escape(ch) if ch != "-" else "-" for ch in body)
            out.append(f"[{'^' if neg else ''}{cls}]")
            i = close + 1
        elif c == "{":
            alts: list[str] = []
            i += 1
            while True:
                part, i = old_glob_regex(p, i, True)
                alts.append(part)
                if i >= n or p[i] == "}":
                    i += 1
                    break
                i += 1
            out.append("(?:" + "|".join(alts) + ")")
        elif in_alt and c in ",}":
            return "".join(out), i
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out), i


class Collector:
    """Consumes queues into lists and wakes waiters when a total is reached."""

    def __init__(self) -> None:
        self.got: dict[str, list[AbstractIncomingMessage]] = {}
        self._changed = asyncio.Event()

    async def consume(self, channel: aio_pika.abc.AbstractChannel, name: str) -> None:
        q = await channel.declare_queue(name, passive=True)
        self.got[name] = []

        async def on(msg: AbstractIncomingMessage) -> None:
            await msg.ack()
            self.got[name].append(msg)
            self._changed.set()

        await q.consume(on)

    async def until(self, counts: dict[str, int], within: float) -> None:
        async with asyncio.timeout(within):
            while any(len(self.got[q]) < n for q, n in counts.items()):
                self._changed.clear()
                await self._changed.wait()
