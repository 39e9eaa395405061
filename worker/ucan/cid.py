"""CIDv1 values: binary form, base32 and base58btc text, sha2-256 dag-cbor CIDs of bytes."""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache
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


_B32_ALPHABET: Final = b"abcdefghijklmnopqrstuvwxyz234567"
_B32_TABLE: Final = bytes.maketrans(bytes(range(32)), _B32_ALPHABET)


def b32encode(data: bytes) -> str:
    """Lowercase RFC 4648 base32 of ``data`` without padding (multibase ``b`` text).

    ``base64.b32encode`` is pure Python (about 3 µs for a CID); this moves every 5-bit
    group of one big integer into a byte of its own with a few whole-number shifts and
    masks, then maps the bytes to letters with ``bytes.translate``. Longer inputs (a link
    inside a token can be any length) go through ``base64``: a plan grows as n log n and
    takes superlinear time to make (74 ms for 16,000 bytes, minutes for a megabyte), and
    the plans are cached by length.
    """
    if len(data) > _B32_PLANNED:
        return base64.b32encode(data).decode().rstrip("=").lower()
    lanes, pad, moves, masks, chars = _b32_plan(len(data))
    x = int.from_bytes(data, "big") << pad
    # 5-byte groups (40 bits, 8 letters) move apart to 64-bit lanes, largest moves first
    for keep, move, shift in moves:
        x = (x & keep) | ((x & move) << shift)
    # within each lane: 20-bit halves to 32-bit halves, 10 bits to 16, 5 bits to 8
    for keep, move, shift in masks:
        x = (x & keep) | ((x & move) << shift)
    return x.to_bytes(lanes * 8, "big").translate(_B32_TABLE)[:chars].decode()


_B32Steps = tuple[tuple[int, int, int], ...]
#: the longest input encoded by a plan (CIDs are 36 bytes, 68 with a 512-bit digest)
_B32_PLANNED: Final = 128


@lru_cache(maxsize=64)
def _b32_plan(n: int) -> tuple[int, int, _B32Steps, _B32Steps, int]:
    """Lanes, padding bits, lane moves, in-lane spreads and letters for ``n`` bytes."""
    lanes = -(-n // 5)
    top = max(lanes - 1, 0).bit_length()
    moves = []
    for j in reversed(range(top)):
        keep = move = 0
        for k in range(lanes):  # lane k (0 = last 5 bytes) sits at 40k + 24 * (moves done)
            at = ((1 << 40) - 1) << (40 * k + 24 * (k >> (j + 1) << (j + 1)))
            if k >> j & 1:
                move |= at
            else:
                keep |= at
        moves.append((keep, move, 24 << j))

    def every_lane(pattern: int) -> int:
        return sum(pattern << (64 * k) for k in range(lanes))

    masks = []
    for width, lane in ((20, 64), (10, 32), (5, 16)):
        low = high = 0
        for i in range(0, 64, lane):
            low |= ((1 << width) - 1) << i
            high |= ((1 << width) - 1) << (i + width)
        masks.append((every_lane(low), every_lane(high), lane // 2 - width))
    return lanes, 8 * (lanes * 5 - n), tuple(moves), tuple(masks), -(-n * 8 // 5)


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
        return _wrap(cls, b"\x01\x71\x12\x20" + hashlib.sha256(data).digest())

    @classmethod
    def raw_sha256(cls, data: bytes) -> CID:
        """The CIDv1 (raw, sha2-256) of ``data``."""
        return _wrap(cls, b"\x01\x55\x12\x20" + hashlib.sha256(data).digest())

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
        # times per message (ledger keys, logs).
        text = self._text
        if text is None:
            if len(self.raw) == 34 and self.raw[0] == 0x12:
                text = b58encode(self.raw)
            else:
                text = "b" + b32encode(self.raw)
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


_SET_RAW: Final = CID.__dict__["raw"].__set__
_SET_HASH: Final = CID.__dict__["_hash"].__set__
_SET_TEXT: Final = CID.__dict__["_text"].__set__


def _wrap(cls: type[CID], raw: bytes) -> CID:
    """``cls(raw)`` for ``raw`` that is already ``bytes``, in half the time: every token
    and task gets a CID, and the slots are set directly rather than through
    ``object.__setattr__`` (``CID.__setattr__`` refuses)."""
    cid = object.__new__(cls)
    _SET_RAW(cid, raw)
    _SET_HASH(cid, hash(raw))
    _SET_TEXT(cid, None)
    return cid


def wrap(raw: bytes) -> CID:
    """A :class:`CID` of binary CID bytes the caller has checked, without copying them."""
    return _wrap(CID, raw)
