"""Receipts as CONTRACT §4 and ucantone define them: signed invocations of /ucan/assert/receipt."""

from __future__ import annotations

import os
from typing import Any

from worker.ucan import cbor
from worker.ucan.cid import CID
from worker.ucan.envelope import (
    _K_ARGS,
    _K_CMD,
    _K_EXP,
    _K_IAT,
    _K_ISS,
    _K_NONCE,
    _K_PRF,
    _K_SUB,
    INVOCATION_TAG,
    RECEIPT_COMMAND,
    _invocation,
    _sign,
)
from worker.ucan.keys import Signer


def receipt_args(*, ran: CID, ok: Any = None, error: tuple[str, str] | None = None) -> bytes:
    """The canonical ``{out: {ok: …} | {error: {name, message}}, ran}`` args of a receipt."""
    if error is not None:
        name, message = error
        out = _ERROR + cbor.encode_text(str(name)) + _MESSAGE + cbor.encode_text(str(message))
    elif ok is None or (type(ok) is dict and not ok):
        out = _OK_UNIT
    else:
        out = _OK + cbor.encode(ok)
    return _OUT + out + _RAN + cbor.encode_link(ran)


# {out: ..., ran: ...}: both keys 3 bytes, "out" < "ran"
_OUT = b"\xa2\x63out"
_RAN = b"\x63ran"
_OK = b"\xa1\x62ok"
_OK_UNIT = _OK + b"\xa0"
_ERROR = b"\xa1\x65error\xa2\x64name"
_MESSAGE = b"\x67message"


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
    # the args are our own canonical encoding: no need to re-check them
    args_raw = receipt_args(ran=ran, ok=ok, error=error)
    if type(iat) is not int:  # e.g. None, outside the signature: written as before
        return _invocation(
            signer, sub=signer.did, cmd=RECEIPT_COMMAND, args_raw=args_raw, aud=None, exp=exp,
            iat=iat, nonce=nonce, prf=(), meta=None, cause=None,
        )  # fmt: skip
    # what _invocation writes for a receipt, in one join: one is built for every message
    did = cbor.encode_text(signer.did)
    payload = b"".join(
        (
            _RECEIPT_HEAD,
            b"\xf6" if exp is None else cbor.encode_int(exp),  # null
            _K_IAT,
            cbor.encode_int(iat),
            _K_ISS,
            did,
            _K_PRF,
            b"\x80",  # []
            _K_SUB,
            did,
            _K_ARGS,
            args_raw,
            _K_NONCE,
            cbor.encode_bytes(os.urandom(16) if nonce is None else nonce),
        )
    )
    return _sign(signer, INVOCATION_TAG, payload)


# {cmd, exp, iat, iss, prf, sub, args, nonce} in canonical order, as _invocation writes
# them with iat set and no aud, meta or cause
_RECEIPT_HEAD = cbor.head(5, 8) + _K_CMD + cbor.encode_text(RECEIPT_COMMAND) + _K_EXP
