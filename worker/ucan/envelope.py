"""Token envelopes (invocations, delegations, receipts): decode keeping raw spans, encode, sign.

A token is ``[signature, {"h": varsig, "<tag>": payload}]``. The signature covers the
SigPayload map exactly as received; a token's CID hashes the whole envelope as received;
a task's CID hashes ``{cmd, sub, args, nonce}`` with ``args`` copied verbatim.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from worker.ucan import cbor
from worker.ucan.bounded import SizedLRU, footprint
from worker.ucan.cid import CID
from worker.ucan.errors import DecodeError, ValidationError, quote
from worker.ucan.keys import Resolver, Signer
from worker.ucan.policy import Policy, parse_policy
from worker.ucan.varsig import HEADERS, check_header

#: the tags this project writes
INVOCATION_TAG: Final = "ucan/inv@1.0.0-rc.1"
DELEGATION_TAG: Final = "ucan/dlg@1.0.0-rc.1"
#: tags accepted on decode (the spec's final 1.0.0 too)
INVOCATION_TAGS: Final = frozenset((INVOCATION_TAG, "ucan/inv@1.0.0"))
DELEGATION_TAGS: Final = frozenset((DELEGATION_TAG, "ucan/dlg@1.0.0"))
#: the command of a receipt
RECEIPT_COMMAND: Final = "/ucan/assert/receipt"
#: longest DID and command accepted (real ones are under 100 characters): without a bound,
#: a 1 MiB DID was echoed into error receipts and log lines, twice over
MAX_DID_LENGTH: Final = 2048
MAX_CMD_LENGTH: Final = 1024

_INT64_MIN: Final = -(1 << 63)
_INT64_MAX: Final = (1 << 63) - 1
#: the SigPayload up to its tag, by varsig header: ``{"h": header, ``
_SIG_PAYLOAD_PREFIXES: Final = {h: b"\xa2\x61h" + cbor.head(2, len(h)) + h for h in HEADERS}
_TASK_CMD: Final = b"\xa4" + cbor.encode_text("cmd")
_TASK_SUB: Final = cbor.encode_text("sub")
_TASK_ARGS: Final = cbor.encode_text("args")
_TASK_NONCE: Final = cbor.encode_text("nonce")


@dataclass(frozen=True, slots=True)
class Token:
    """Fields every token has. ``raw`` is the envelope as received, ``payload_raw`` the
    signed SigPayload span, ``cid`` the sha2-256 dag-cbor CID of ``raw``."""

    raw: bytes = field(repr=False)
    cid: CID
    tag: str
    header: bytes = field(repr=False)
    signature: bytes = field(repr=False)
    payload_raw: bytes = field(repr=False)
    iss: str
    sub: str | None
    aud: str | None
    cmd: str
    exp: int | None
    nonce: bytes = field(repr=False)
    meta: dict[str, Any] | None = field(repr=False)


@dataclass(frozen=True, slots=True)
class Invocation(Token):
    """An invocation; ``args_raw`` is its args exactly as received."""

    args: dict[str, Any] = field(repr=False)
    args_raw: bytes = field(repr=False)
    prf: tuple[CID, ...]
    iat: int | None
    cause: CID | None
    task_cid: CID

    @property
    def audience(self) -> str:
        """The effective audience: ``aud``, else ``sub``."""
        return self.aud if self.aud is not None else str(self.sub)


@dataclass(frozen=True, slots=True)
class Receipt(Invocation):
    """A receipt: an invocation of ``/ucan/assert/receipt`` with no ``aud``."""

    ran: CID
    ok: Any
    error: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Delegation(Token):
    """A delegation; ``sub`` ``None`` is a powerline delegation."""

    pol: Policy = field(repr=False)
    nbf: int | None


def _slot_setters(cls: type) -> tuple[Any, ...]:
    """The slot descriptors' setters of a frozen dataclass, in ``__init__`` order."""
    assert not hasattr(cls, "__post_init__")  # _new_invocation would skip it
    return tuple(getattr(cls, f.name).__set__ for f in dataclasses.fields(cls))


_INVOCATION_SETTERS: Final = _slot_setters(Invocation)


def _new_invocation(values: tuple[Any, ...]) -> Invocation:
    """``Invocation(*values)`` in two thirds of the time: the generated ``__init__`` of a
    frozen dataclass sets each field through ``object.__setattr__``."""
    inv = object.__new__(Invocation)
    for set_field, value in zip(_INVOCATION_SETTERS, values):  # noqa: B905 - always as long
        set_field(inv, value)
    return inv


#: decoded delegations by their bytes: the same proof rides along with many invocations,
#: and decoding is a pure function of the bytes (treat the values as read-only). Kept only
#: once their signature verified (see :func:`verify_signature`): decoding happens before
#: any signature check, and anyone can self-sign, so the cache is bounded by the memory
#: the decoded delegations hold (a 4 KiB token of empty maps decodes to ~280 KiB: 1,024
#: entries held 278 MiB), least recently used first out. Hilt's (337 bytes) holds ~1.7 KiB
#: and decodes in ~11 µs, ~0.15 µs from here (bench/ucan_bench.py)
_DELEGATIONS_MAX: Final = 1024
_DELEGATIONS_MAX_FOOTPRINT: Final = 4 << 20
_DELEGATIONS: Final[SizedLRU[bytes, Delegation]] = SizedLRU(
    _DELEGATIONS_MAX_FOOTPRINT, max_entries=_DELEGATIONS_MAX
)
#: only small delegations are kept (Hilt's are a few hundred bytes)
_DELEGATIONS_MAX_BYTES: Final = 4096


def _keep(token: Token) -> None:
    """Keep a delegation whose signature verified for the next decode of its bytes,
    accounted by what its decoded values hold (not kept past a sixteenth of the bound)."""
    raw = token.raw
    if type(token) is Delegation and len(raw) <= _DELEGATIONS_MAX_BYTES and raw not in _DELEGATIONS:
        _DELEGATIONS.put(raw, token, footprint(token, _DELEGATIONS.max_entry))


def task_cid(cmd: str, sub: str, args_raw: bytes, nonce: bytes) -> CID:
    """The CID of the task ``{cmd, sub, args, nonce}`` with ``args_raw`` written verbatim."""
    return CID.dag_cbor(
        b"".join(
            (
                _TASK_CMD,
                cbor.encode_text(cmd),
                _TASK_SUB,
                cbor.encode_text(sub),
                _TASK_ARGS,
                args_raw or b"\xa0",
                _TASK_NONCE,
                cbor.head(2, len(nonce)),
                nonce,
            )
        )
    )


def _did(p: Mapping[str, Any], key: str, *, required: bool) -> str | None:
    v = p.get(key)
    if v is None:
        if required:
            raise DecodeError(f"cannot decode token: {key!r} is missing")
        return None
    if type(v) is not str or not v.startswith("did:"):
        raise DecodeError(f"cannot decode token: {key!r} is not a DID")
    if len(v) > MAX_DID_LENGTH:
        raise DecodeError(f"cannot decode token: {key!r} is longer than {MAX_DID_LENGTH}")
    return v


def _int(p: Mapping[str, Any], key: str) -> int | None:
    v = p.get(key)
    if v is None:
        return None
    if type(v) is not int or not _INT64_MIN <= v <= _INT64_MAX:
        raise DecodeError(f"cannot decode token: {key!r} must be a 64-bit integer or null")
    return v


def _cmd(p: Mapping[str, Any]) -> str:
    v = p.get("cmd")
    if type(v) is not str or not v.startswith("/"):
        raise DecodeError("cannot decode token: 'cmd' must be text starting with '/'")
    if len(v) > MAX_CMD_LENGTH:
        raise DecodeError(f"cannot decode token: 'cmd' is longer than {MAX_CMD_LENGTH}")
    return v


def _meta(p: Mapping[str, Any]) -> dict[str, Any] | None:
    v = p.get("meta")
    if v is not None and type(v) is not dict:
        raise DecodeError("cannot decode token: 'meta' must be a map")
    return v


def _nonce(p: Mapping[str, Any]) -> bytes:
    v = p.get("nonce", b"")
    if type(v) is not bytes:
        raise DecodeError("cannot decode token: 'nonce' must be bytes")
    return v


def decode_token(raw: bytes, *, max_size: int = cbor.MAX_SIZE) -> Invocation | Delegation | Receipt:
    """Decode one token, keeping the spans that signatures and CIDs are computed over.

    Args:
        raw: the envelope bytes.
        max_size: refuse tokens longer than this.

    Raises:
        DecodeError: not a token we can read (including a varsig header other than
            Ed25519 or secp256k1 + DAG-CBOR, and tags other than
            ``ucan/{inv,dlg}@1.0.0[-rc.1]``).
    """
    if type(raw) is not bytes:
        if not isinstance(raw, bytes | bytearray | memoryview):
            raise DecodeError("cannot decode token: expected bytes")
        raw = bytes(raw)
    if len(raw) > max_size:
        raise DecodeError(f"cannot decode token: {len(raw)} bytes exceeds the limit of {max_size}")
    if not raw or raw[0] != 0x82:
        raise DecodeError("cannot decode token: not a 2-element array [signature, payload]")
    cached = _DELEGATIONS.get(raw)  # now the most recently used: evicted last
    if cached is not None:
        return cached
    sig, header, tag, payload = _decode_envelope(raw)
    check_header(header)
    n = len(sig)
    payload_raw = raw[1 + _head_size(n) + n :]
    cid = CID.dag_cbor(raw)
    iss = _did(payload, "iss", required=True)
    assert iss is not None
    cmd = _cmd(payload)
    common: _Common = (raw, cid, tag, header, sig, payload_raw, iss)
    if tag in DELEGATION_TAGS:
        return _delegation(common, payload)
    sub = _did(payload, "sub", required=True)
    assert sub is not None
    aud = _did(payload, "aud", required=False)
    args = payload.get("args")
    if type(args) is not dict:
        raise DecodeError("cannot decode token: 'args' must be a map")
    args_raw = cbor.reencode(args)
    prf = payload.get("prf", [])
    if type(prf) is not list or (prf and set(map(type, prf)) != _ONLY_CIDS):
        raise DecodeError("cannot decode token: 'prf' must be an array of links")
    cause = payload.get("cause")
    if cause is not None and type(cause) is not CID:
        raise DecodeError("cannot decode token: 'cause' must be a link")
    nonce = _nonce(payload)
    fields = (
        *common, sub, aud, cmd, _int(payload, "exp"), nonce, _meta(payload), args, args_raw,
        tuple(prf), _int(payload, "iat"), cause, task_cid(cmd, sub, args_raw, nonce),
    )  # fmt: skip
    if cmd == RECEIPT_COMMAND and aud is None:
        parsed = _receipt_args(args)
        if parsed is not None:
            return Receipt(*fields, *parsed)
    return _new_invocation(fields)


_ONLY_CIDS: Final = {CID}


def _head_size(n: int) -> int:
    """The length of the minimal CBOR head for argument ``n``."""
    if n < 24:
        return 1
    if n < 0x100:
        return 2
    if n < 0x10000:
        return 3
    return 5 if n < 0x100000000 else 9


_Common = tuple[bytes, CID, str, bytes, bytes, bytes, str]


#: a token as ucantone writes it, up to its payload (either signature kind is 64 bytes):
#: 82 | 58 40 sig[3:67] | a2 61 "h" 48 header[71:79] 73 tag[80:99] | payload[99:]
_ENVELOPE_HEAD: Final = b"\x82" + cbor.head(2, 64)
#: the SigPayload heads of the accepted headers, for one ``bytes.startswith``
_SIG_PAYLOAD_HEADS: Final = tuple(p + cbor.head(3, 19) for p in _SIG_PAYLOAD_PREFIXES.values())
_TAGS_19: Final = {t.encode(): t for t in INVOCATION_TAGS | DELEGATION_TAGS if len(t) == 19}
_PAYLOAD_AT: Final = 99
#: the payload sits inside an array and a map: two levels of nesting
_PAYLOAD_DEPTH: Final = 2
#: larger tokens are decoded whole: when the payload is not valid the whole token is
#: decoded again for its error, and that should cost little
_SPLIT_MAX: Final = 1 << 16
assert all(len(_ENVELOPE_HEAD) + 64 + len(h) + 19 == _PAYLOAD_AT for h in _SIG_PAYLOAD_HEADS)


def _decode_envelope(raw: bytes) -> tuple[bytes, bytes, str, dict[str, Any]]:
    """``_split(cbor.decode(raw))``, decoding only the payload when the bytes before it are
    the usual ones: they are then canonical, so the whole token is valid DAG-CBOR exactly
    when its payload is (with two levels less nesting), and decodes to the same values.

    Raises:
        DecodeError: as ``cbor.decode`` and :func:`_split` do.
    """
    if (
        len(raw) <= _SPLIT_MAX
        and raw.startswith(_ENVELOPE_HEAD)
        and raw.startswith(_SIG_PAYLOAD_HEADS, 67)
        and (tag := _TAGS_19.get(raw[80:99])) is not None
    ):
        try:
            payload = cbor.decode(raw[_PAYLOAD_AT:], max_depth=cbor.MAX_DEPTH - _PAYLOAD_DEPTH)
        except DecodeError:
            pass  # decoded whole below, for the error message (offsets are in the token)
        else:
            if type(payload) is not dict:
                raise DecodeError(f"cannot decode token: {tag!r:.60} payload must be a map")
            return raw[3:67], raw[71:79], tag, payload
    return _split(cbor.decode(raw))


def _split(value: Any) -> tuple[bytes, bytes, str, dict[str, Any]]:
    """Signature, varsig header, tag and payload of a decoded envelope."""
    if type(value) is not list or len(value) != 2:
        raise DecodeError("cannot decode token: not a 2-element array [signature, payload]")
    sig, sp = value
    if type(sig) is not bytes:
        raise DecodeError("cannot decode token: signature must be bytes")
    if type(sp) is not dict or len(sp) != 2 or "h" not in sp:
        raise DecodeError("cannot decode token: payload must be a map of 'h' and one tag")
    header = sp["h"]
    if type(header) is not bytes:
        raise DecodeError("cannot decode token: varsig header 'h' must be bytes")
    tag = next(k for k in sp if k != "h")
    payload = sp[tag]
    if type(payload) is not dict:
        raise DecodeError(f"cannot decode token: {tag!r:.60} payload must be a map")
    if tag not in INVOCATION_TAGS and tag not in DELEGATION_TAGS:
        raise DecodeError(f"cannot decode token: unsupported tag {tag!r:.60}")
    return sig, header, tag, payload


def _delegation(common: _Common, payload: dict[str, Any]) -> Delegation:
    return Delegation(
        *common,
        _did(payload, "sub", required=False),
        _did(payload, "aud", required=True),
        _cmd(payload),
        _int(payload, "exp"),
        _nonce(payload),
        _meta(payload),
        parse_policy(payload.get("pol", [])),
        _int(payload, "nbf"),
    )


def _receipt_args(args: dict[str, Any]) -> tuple[CID, Any, dict[str, Any] | None] | None:
    ran, out = args.get("ran"), args.get("out")
    if type(ran) is not CID or type(out) is not dict or len(out) != 1:
        return None
    if "ok" in out:
        return ran, out["ok"], None
    err = out.get("error")
    if type(err) is not dict:
        return None
    return ran, None, err


def _check_args(args_raw: bytes) -> None:
    if not args_raw or args_raw[0] >> 5 != 5:
        raise DecodeError("cannot encode invocation: args must be a CBOR map")
    cbor.decode(args_raw)


def _sign(signer: Signer, tag: str, payload: bytes) -> bytes:
    prefix = _SIG_PAYLOAD_PREFIXES[signer.varsig_header]
    sig_payload = b"".join((prefix, cbor.encode_text(tag), payload))
    sig = signer.sign(sig_payload)
    return b"".join((b"\x82", cbor.head(2, len(sig)), sig, sig_payload))


def encode_invocation(
    signer: Signer,
    *,
    sub: str,
    cmd: str,
    args_raw: bytes,
    aud: str | None = None,
    exp: int | None,
    iat: int | None = None,
    nonce: bytes | None = None,
    prf: Iterable[CID] = (),
    meta: Mapping[str, Any] | None = None,
    cause: CID | None = None,
) -> bytes:
    """Build and sign an invocation as ucantone writes it (tag ``-rc.1``, the varsig header
    of the signer's key).

    Args:
        signer: the issuer; ``iss`` is ``signer.did``.
        sub: the subject DID.
        cmd: the command, e.g. ``/customer/add``.
        args_raw: the args map, written verbatim (it may be Go-ordered like Hilt's).
        aud: the audience, omitted when ``None``.
        exp: expiry (unix seconds) or ``None`` for none (written as null).
        iat: issued-at, omitted when ``None``.
        nonce: default 16 random bytes.
        prf: proof CIDs, root first.
        meta: optional metadata map.
        cause: optional link to the causing receipt.

    Raises:
        DecodeError: ``args_raw`` is not one DAG-CBOR map.
    """
    _check_args(args_raw)
    return _invocation(
        signer, sub=sub, cmd=cmd, args_raw=args_raw, aud=aud, exp=exp, iat=iat, nonce=nonce,
        prf=prf, meta=meta, cause=cause,
    )  # fmt: skip


def _invocation(
    signer: Signer,
    *,
    sub: str,
    cmd: str,
    args_raw: bytes,
    aud: str | None,
    exp: int | None,
    iat: int | None,
    nonce: bytes | None,
    prf: Iterable[CID],
    meta: Mapping[str, Any] | None,
    cause: CID | None,
) -> bytes:
    """Build and sign an invocation from args the caller vouches for (already one map)."""
    # keys in canonical order: aud cmd exp iat iss prf sub args meta cause nonce
    parts: list[bytes] = []
    if aud is not None:
        parts += (_K_AUD, cbor.encode_text(aud))
    parts += (_K_CMD, cbor.encode_text(cmd), _K_EXP, _nullable_int(exp))
    if iat is not None:
        parts += (_K_IAT, cbor.encode_int(iat))
    links = [cbor.encode_link(c) for c in prf]
    parts += (
        _K_ISS,
        cbor.encode_text(signer.did),
        _K_PRF,
        cbor.head(4, len(links)) + b"".join(links),
    )
    parts += (_K_SUB, cbor.encode_text(sub), _K_ARGS, args_raw)
    if meta is not None:
        parts += (_K_META, cbor.encode(dict(meta)))
    if cause is not None:
        parts += (_K_CAUSE, cbor.encode_link(cause))
    parts += (_K_NONCE, cbor.encode_bytes(os.urandom(16) if nonce is None else nonce))
    payload = cbor.head(5, len(parts) // 2) + b"".join(parts)
    return _sign(signer, INVOCATION_TAG, payload)


def _nullable_int(n: int | None) -> bytes:
    return b"\xf6" if n is None else cbor.encode_int(n)


_K_AUD, _K_CMD, _K_EXP, _K_IAT, _K_ISS, _K_PRF, _K_SUB = (
    cbor.encode_text(k) for k in ("aud", "cmd", "exp", "iat", "iss", "prf", "sub")
)
_K_ARGS, _K_META, _K_CAUSE, _K_NONCE = (
    cbor.encode_text(k) for k in ("args", "meta", "cause", "nonce")
)


def encode_delegation(
    signer: Signer,
    *,
    aud: str,
    sub: str | None,
    cmd: str,
    pol: Policy | Iterable[Any] = (),
    exp: int | None,
    nbf: int | None = None,
    nonce: bytes | None = None,
    meta: Mapping[str, Any] | None = None,
) -> bytes:
    """Build and sign a delegation as ucantone writes it.

    Args:
        signer: the issuer; ``iss`` is ``signer.did``.
        aud: the audience DID.
        sub: the subject DID, or ``None`` for a powerline delegation (written as null).
        cmd: the delegated command.
        pol: policy statements in wire form (lists), or a parsed :class:`Policy`.
        exp: expiry or ``None`` (null).
        nbf: not-before, omitted when ``None``.
        nonce: default 16 random bytes.
        meta: optional metadata map.

    Raises:
        DecodeError: the policy is malformed.
    """
    policy = pol if isinstance(pol, Policy) else parse_policy(list(pol))
    entries: dict[str, bytes] = {
        "aud": cbor.encode_text(aud),
        "cmd": cbor.encode_text(cmd),
        "exp": cbor.encode(exp),
        "iss": cbor.encode_text(signer.did),
        "pol": cbor.encode(policy.wire),
        "sub": cbor.encode(sub),
        "nonce": cbor.encode(os.urandom(16) if nonce is None else nonce),
    }
    if nbf is not None:
        entries["nbf"] = cbor.encode(nbf)
    if meta is not None:
        entries["meta"] = cbor.encode(dict(meta))
    return _sign(signer, DELEGATION_TAG, cbor.encode_map_raw(entries))


def verify_signature(token: Token, resolver: Resolver, *, now: int | None = None) -> None:
    """Check the token's signature over its SigPayload bytes as received, trying every
    verification method of its issuer in turn (ucantone does not match the varsig header
    against the key type: it tries the keys).

    Verified delegations are remembered by CID (per resolver) when their issuer's keys cannot
    change (static or did:key), so a proof shared by many invocations is verified once; a
    CID covers the signature, payload and issuer.

    Args:
        now: the validation time, for methods with ``expires``/``revoked`` (``None``: not
            checked).

    Raises:
        ValidationError: ``InvalidSignature`` with ucantone's message (every method tried and
            why it failed); the resolver's errors (``UnknownError`` for a did:plc that could
            not be resolved, ``DIDKeyResolutionError`` for an issuer no source knows).
    """
    cacheable = isinstance(token, Delegation)
    if cacheable and resolver.seen(token.cid.raw):
        _keep(token)
        return
    rejections = resolver.check(
        token.iss, token.payload_raw, token.signature, delegation=cacheable, now=now
    )
    if rejections is not None:
        raise ValidationError("InvalidSignature", invalid_signature_message(token, rejections))
    if cacheable:
        resolver.remember(token.cid.raw, token.iss)
        _keep(token)


def invalid_signature_message(token: Token, rejections: Iterable[tuple[str, str]]) -> str:
    """ucantone's InvalidSignature message: it says "proof" for every kind of token, then one
    line per verification method tried (``- <method id>: <reason>``)."""
    lines = [
        f"proof {quote(str(token.cid))} does not have a valid signature from {quote(token.iss)}",
        "  ℹ️ Tried these verification methods:",
    ]
    lines.extend(f"    - {vm}: {reason}" for vm, reason in rejections)
    return "\n".join(lines)
