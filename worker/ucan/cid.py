"""CIDv1 values: binary form, base32 and base58btc text, sha2-256 dag-cbor CIDs of bytes."""

from __future__ import annotations

import base64
import hashlib
from typing import Final

from worker.ucan.errors import DecodeError

#: multicodec codes
DAG_CBOR: Final = 0x71
RAW: Final = 0x55
SHA2_256: Final = 0x12

_B58_ALPHABET: Final = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX: Final = {c: i for i, c in enumerate(_B58_ALPHABET)}


def b58encode(data: bytes) -> str:
    """Bitcoin base58 of ``data`` (leading zero bytes become ``1``)."""
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58_ALPHABET[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    """Inverse of :func:`b58encode`.

    Raises:
        DecodeError: ``text`` holds a character outside the alphabet.
    """
    if len(text) > 4096:
        raise DecodeError("cannot decode base58: text too long")
    n = 0
    for c in text:
        i = _B58_INDEX.get(c)
        if i is None:
            raise DecodeError(f"cannot decode base58: invalid character {c!r}")
        n = n * 58 + i
    pad = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * pad + body


def read_uvarint(data: bytes, pos: int) -> tuple[int, int]:
    """Read an unsigned LEB128 varint (at most 9 bytes, minimal) at ``pos``.

    Returns:
        The value and the position after it.

    Raises:
        DecodeError: truncated, too long or not minimal.
    """
    value = 0
    shift = 0
    for i in range(9):
        if pos + i >= len(data):
            raise DecodeError("cannot read varint: truncated")
        b = data[pos + i]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            if b == 0 and i > 0:
                raise DecodeError("cannot read varint: not minimal")
            return value, pos + i + 1
        shift += 7
    raise DecodeError("cannot read varint: too long")


def uvarint(n: int) -> bytes:
    """Unsigned LEB128 encoding of ``n``."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


class CID:
    """A content identifier; ``raw`` is its binary form (CIDv1, or a 34-byte CIDv0)."""

    __slots__ = ("_hash", "_text", "raw")

    raw: bytes
    _hash: int
    _text: str | None

    def __init__(self, raw: bytes) -> None:
        """Wrap binary CID bytes; use :meth:`from_bytes` to check them."""
        object.__setattr__(self, "raw", bytes(raw))
        object.__setattr__(self, "_hash", hash(self.raw))
        object.__setattr__(self, "_text", None)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("CID is immutable")

    @classmethod
    def from_bytes(cls, raw: bytes) -> CID:
        """Check and wrap a binary CID.

        Raises:
            DecodeError: not a CIDv0 or a well-formed CIDv1.
        """
        if len(raw) == 34 and raw[0] == 0x12 and raw[1] == 0x20:
            return cls(raw)
        version, pos = read_uvarint(raw, 0)
        if version != 1:
            raise DecodeError(f"cannot read cid: unsupported version {version}")
        _codec, pos = read_uvarint(raw, pos)
        _code, pos = read_uvarint(raw, pos)
        length, pos = read_uvarint(raw, pos)
        if len(raw) - pos != length:
            raise DecodeError("cannot read cid: digest length does not match")
        return cls(raw)

    @classmethod
    def dag_cbor(cls, data: bytes) -> CID:
        """The CIDv1 (dag-cbor, sha2-256) of ``data``."""
        return cls(b"\x01\x71\x12\x20" + hashlib.sha256(data).digest())

    @classmethod
    def raw_sha256(cls, data: bytes) -> CID:
        """The CIDv1 (raw, sha2-256) of ``data``."""
        return cls(b"\x01\x55\x12\x20" + hashlib.sha256(data).digest())

    @classmethod
    def parse(cls, text: str) -> CID:
        """Parse base32 (``b…``) or base58btc (``z…``, or a bare CIDv0 ``Qm…``) text.

        Raises:
            DecodeError: not a CID.
        """
        if not text:
            raise DecodeError("cannot parse cid: empty")
        if text.startswith("Qm") and len(text) == 46:
            return cls.from_bytes(b58decode(text))
        prefix, body = text[0], text[1:]
        if prefix == "b":
            try:
                raw = base64.b32decode(body.upper() + "=" * (-len(body) % 8))
            except ValueError as exc:
                raise DecodeError(f"cannot parse cid {text!r}: not base32") from exc
        elif prefix == "z":
            raw = b58decode(body)
        else:
            raise DecodeError(f"cannot parse cid {text!r}: unsupported multibase {prefix!r}")
        return cls.from_bytes(raw)

    def __str__(self) -> str:
        # Computed once per CID: the worker names the same task and invocation CIDs several
        # times per message (ledger keys, logs), and base32 is pure Python (about 4 µs).
        text = self._text
        if text is None:
            if len(self.raw) == 34 and self.raw[0] == 0x12:
                text = b58encode(self.raw)
            else:
                text = "b" + base64.b32encode(self.raw).decode().lower().rstrip("=")
            object.__setattr__(self, "_text", text)
        return text

    def __repr__(self) -> str:
        return f"CID({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CID) and other.raw == self.raw

    def __hash__(self) -> int:
        return self._hash

    def __lt__(self, other: CID) -> bool:
        return self.raw < other.raw

    def __le__(self, other: CID) -> bool:
        return self.raw <= other.raw

    def __gt__(self, other: CID) -> bool:
        return self.raw > other.raw

    def __ge__(self, other: CID) -> bool:
        return self.raw >= other.raw
