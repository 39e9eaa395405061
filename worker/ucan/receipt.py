"""Receipts as CONTRACT §4 and ucantone define them: signed invocations of /ucan/assert/receipt."""

from __future__ import annotations

from typing import Any

from worker.ucan import cbor
from worker.ucan.cid import CID
from worker.ucan.envelope import RECEIPT_COMMAND, encode_invocation
from worker.ucan.keys import Signer


def receipt_args(*, ran: CID, ok: Any = None, error: tuple[str, str] | None = None) -> bytes:
    """The canonical ``{out: {ok: …} | {error: {name, message}}, ran}`` args of a receipt."""
    if error is not None:
        name, message = error
        out: dict[str, Any] = {"error": {"name": name, "message": message}}
    else:
        out = {"ok": {} if ok is None else ok}
    return cbor.encode({"out": out, "ran": ran})


def build_receipt(
    signer: Signer,
    *,
    ran: CID,
    ok: Any = None,
    error: tuple[str, str] | None = None,
    iat: int,
    exp: int | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """Build and sign a receipt.

    ``iss`` = ``sub`` = ``signer.did``, no ``aud``, ``prf`` empty, a 16-byte random nonce
    unless given, ``iat`` set, ``exp`` null unless given.

    Args:
        signer: the executor (the service).
        ran: the task CID of the invocation that was executed.
        ok: the success value (``None`` means ``{}``); ignored when ``error`` is given.
        error: ``(name, message)`` of a failure.
        iat: issued-at, unix seconds.
        exp: expiry for a transient outcome, else ``None``.
        nonce: for reproducible tests only.

    Raises:
        DecodeError: ``ok`` holds a value DAG-CBOR cannot encode.
    """
    return encode_invocation(
        signer,
        sub=signer.did,
        cmd=RECEIPT_COMMAND,
        args_raw=receipt_args(ran=ran, ok=ok, error=error),
        exp=exp,
        iat=iat,
        nonce=nonce,
    )
