"""UCAN containers (``ctn-v1``) in every form ucantone and the spec write, and bare tokens."""

from __future__ import annotations

import base64
import binascii
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from worker.ucan import cbor
from worker.ucan.cid import CID
from worker.ucan.envelope import Delegation, Invocation, Receipt, decode_token
from worker.ucan.errors import DecodeError

CONTAINER_KEY: Final = "ctn-v1"
#: header bytes; gzip forms as ucantone writes them (``GZIP_*``) and as the spec does
RAW: Final = 0x40
BASE64: Final = 0x42
BASE64URL: Final = 0x43
GZIP: Final = 0x44
GZIP_BASE64: Final = 0x45
GZIP_BASE64URL: Final = 0x46
SPEC_GZIP: Final = 0x4D
SPEC_GZIP_BASE64: Final = 0x4F
SPEC_GZIP_BASE64URL: Final = 0x50

#: header -> (base64 alphabet or None, gzipped)
_FORMS: Final[dict[int, tuple[str | None, bool]]] = {
    RAW: (None, False),
    BASE64: ("std", False),
    BASE64URL: ("url", False),
    GZIP: (None, True),
    GZIP_BASE64: ("std", True),
    GZIP_BASE64URL: ("url", True),
    SPEC_GZIP: (None, True),
    SPEC_GZIP_BASE64: ("std", True),
    SPEC_GZIP_BASE64URL: ("url", True),
}
_WHITESPACE: Final = b" \t\r\n\v\f"
#: the Go encoder's limit on tokens in one container
MAX_TOKENS: Final = 8192


@dataclass(slots=True)
class Request:
    """What a request body holds, sorted by kind; ``dropped`` says why tokens were skipped."""

    invocations: list[Invocation] = field(default_factory=list)
    delegations: dict[CID, Delegation] = field(default_factory=dict)
    receipts: list[Receipt] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    #: every decoded token in container order
    tokens: list[Invocation | Delegation | Receipt] = field(default_factory=list)


def _b64decode(data: bytes, alphabet: str) -> bytes:
    data = data.strip(_WHITESPACE)
    try:
        if alphabet == "url":
            return base64.b64decode(data + b"=" * (-len(data) % 4), altchars=b"-_", validate=True)
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DecodeError(f"cannot decode container: bad base64 ({_short(exc)})") from None


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:120]


def gunzip(data: bytes, *, max_size: int) -> bytes:
    """Inflate a gzip stream, never producing more than ``max_size`` bytes.

    Raises:
        DecodeError: not gzip, truncated, or larger than ``max_size`` once inflated.
    """
    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(data, max_size + 1)
    except zlib.error as exc:
        raise DecodeError(f"cannot decode container: bad gzip ({_short(exc)})") from None
    if len(out) > max_size or d.unconsumed_tail:
        raise DecodeError(f"cannot decode container: inflates beyond the limit of {max_size} bytes")
    if not d.eof:
        raise DecodeError("cannot decode container: truncated gzip stream")
    if d.unused_data:
        raise DecodeError("cannot decode container: trailing bytes after the gzip stream")
    return out


def unwrap(body: bytes, *, max_size: int = cbor.MAX_SIZE) -> bytes:
    """The container's CBOR (or a bare token) from any serialized form.

    Raises:
        DecodeError: empty, too large, an unknown header byte, bad base64 or gzip.
    """
    if len(body) > max_size:
        raise DecodeError(
            f"cannot decode request: {len(body)} bytes exceeds the limit of {max_size}"
        )
    stripped = body.strip(_WHITESPACE)
    if not stripped:
        raise DecodeError("cannot decode request: empty body")
    first = body[0]
    if first in (0xA1, 0x82):  # raw container map, or a bare token
        return body
    if stripped[0] != first:  # leading whitespace is only allowed before base64 forms
        first = stripped[0]
        if _FORMS.get(first, (None, False))[0] is None:
            raise DecodeError("cannot decode request: leading whitespace before a binary form")
        body = stripped
    form = _FORMS.get(first)
    if form is None:
        raise DecodeError(
            f"cannot decode request: unknown container header byte 0x{first:02x} "
            "(expected a ctn-v1 map, a token, or 0x40-0x46, 0x4d, 0x4f, 0x50)"
        )
    alphabet, gzipped = form
    data = body[1:]
    if alphabet is not None:
        data = _b64decode(data, alphabet)
    if gzipped:
        data = gunzip(data, max_size=max_size)
    return data


def decode_request(body: bytes, *, max_size: int = cbor.MAX_SIZE) -> Request:
    """Decode a request body: a ``ctn-v1`` container in any form, or a bare token.

    Tokens inside a container that cannot be read are skipped (as ucantone does) and the
    reason is kept in ``Request.dropped``.

    Raises:
        DecodeError: the body is none of these forms.
    """
    if not isinstance(body, bytes | bytearray | memoryview):
        raise DecodeError("cannot decode request: expected bytes")
    data = unwrap(bytes(body), max_size=max_size)
    req = Request()
    if data[:1] == b"\x82":
        _add(req, decode_token(data, max_size=max_size))
        return req
    tokens = _split_container(data)
    if tokens is None:
        value = cbor.decode(data)
        if type(value) is not dict or list(value) != [CONTAINER_KEY]:
            raise DecodeError(
                "cannot decode container: expected a map with the single key 'ctn-v1'"
            )
        tokens = value[CONTAINER_KEY]
        if type(tokens) is not list or any(type(t) is not bytes for t in tokens):
            raise DecodeError("cannot decode container: 'ctn-v1' must be an array of byte strings")
        if len(tokens) > MAX_TOKENS:
            raise DecodeError(f"cannot decode container: more than {MAX_TOKENS} tokens")
    for i, raw in enumerate(tokens):
        try:
            tok = decode_token(raw, max_size=max_size)
        except DecodeError as exc:
            req.dropped.append(f"token {i} ({CID.dag_cbor(raw)}): {exc}")
            continue
        _add(req, tok)
    return req


_PREFIX: Final = b"\xa1\x66" + CONTAINER_KEY.encode()


def _split_container(data: bytes) -> list[bytes] | None:
    """The tokens of a container in DAG-CBOR form (one key, minimal heads, nothing after),
    read by slicing; ``None`` for anything else, which the strict decoder then judges.

    Such bytes are exactly what the strict decoder accepts as ``{"ctn-v1": [bytes…]}``,
    so both give the same tokens; this costs half as much for the usual two tokens.
    """
    if not data.startswith(_PREFIX):
        return None
    end = len(data)
    try:
        count, pos = _head(data, len(_PREFIX), 0x80)
        if count < 0 or count > MAX_TOKENS:  # the strict path reports a count over the limit
            return None
        tokens = []
        for _ in range(count):
            if data[pos] == 0x59:  # the usual token: 256 to 65,535 bytes
                n = data[pos + 1] << 8 | data[pos + 2]
                pos += 3
                if n < 0x100:
                    return None
            else:
                n, pos = _head(data, pos, 0x40)
            if n < 0 or pos + n > end:
                return None
            tokens.append(data[pos : pos + n])
            pos += n
    except IndexError:  # truncated
        return None
    return tokens if pos == end else None


def _head(data: bytes, pos: int, base: int) -> tuple[int, int]:
    """The argument of a minimal head of major type ``base`` at ``pos`` and the position
    after it; -1 for a head of another type, a non-minimal head or a 64-bit argument."""
    info = data[pos] - base
    if 0 <= info < 24:
        return info, pos + 1
    if info == 24:
        n = data[pos + 1]
        return (n if n >= 24 else -1), pos + 2
    if info == 25:
        n = int.from_bytes(data[pos + 1 : pos + 3], "big")
        return (n if n >= 0x100 and pos + 3 <= len(data) else -1), pos + 3
    if info == 26:
        n = int.from_bytes(data[pos + 1 : pos + 5], "big")
        return (n if n >= 0x10000 and pos + 5 <= len(data) else -1), pos + 5
    return -1, pos


def _add(req: Request, tok: Invocation | Delegation | Receipt) -> None:
    req.tokens.append(tok)
    if isinstance(tok, Delegation):
        req.delegations[tok.cid] = tok
    elif isinstance(tok, Receipt):
        req.receipts.append(tok)
    else:
        req.invocations.append(tok)


def encode_container(tokens: Iterable[bytes], *, header: int | None = None) -> bytes:
    """A ``ctn-v1`` container of ``tokens``: sorted bytewise, deduplicated, canonical.

    Args:
        tokens: envelope bytes.
        header: ``None`` for no header byte (what ucantone's HTTP transport sends), or one
            of the header constants of this module.

    Raises:
        DecodeError: an unknown header.
    """
    unique = sorted({bytes(t) for t in tokens})
    if len(unique) > MAX_TOKENS:
        raise DecodeError(f"cannot encode container: more than {MAX_TOKENS} tokens")
    # what cbor.encode({CONTAINER_KEY: unique}) writes, without walking the value
    data = b"".join(
        [_PREFIX, cbor.head(4, len(unique))]
        + [b for t in unique for b in (cbor.head(2, len(t)), t)]
    )
    if header is None:
        return data
    form = _FORMS.get(header)
    if form is None:
        raise DecodeError(f"cannot encode container: unknown header byte 0x{header:02x}")
    alphabet, gzipped = form
    if gzipped:
        data = _gzip(data)
    if alphabet == "std":
        data = base64.b64encode(data)
    elif alphabet == "url":
        data = base64.urlsafe_b64encode(data).rstrip(b"=")
    return bytes((header,)) + data


def _gzip(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=31)
    return c.compress(data) + c.flush()
