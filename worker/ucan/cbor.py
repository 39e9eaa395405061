"""DAG-CBOR: a strict, bounded decoder that accepts any map-key order, and a canonical encoder.

The decoder is cbor2's C decoder with every semantic tag but 42 refused, indefinite lengths,
duplicate keys and non-text keys refused, then one check that proves the rest of DAG-CBOR:
the decoded value, re-encoded by cbor2 in the order it was read, must give back the input
byte for byte. That catches non-minimal integers and lengths, floats that are not float64,
``undefined`` and other simple values, and trailing bytes, at C speed. Map keys may come in
any order (Go's ``sort.Strings`` order for ``details`` in Hilt's ``/customer/add``).

Links are read as plain ``CBORTag`` values first and made CIDs after the checks, which
spares a Python call per link on decode and on re-encode; any input that path is not
sure of goes through the reference path, so both give the same values and errors.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from typing import Any, Final

import cbor2

from worker.ucan.cid import CID, wrap
from worker.ucan.errors import DecodeError

#: default bound on nesting (arrays and maps)
MAX_DEPTH: Final = 64
#: default bound on a message
MAX_SIZE: Final = 1 << 20

# cbor2's built-in semantic tags; DAG-CBOR allows tag 42 only.
_BUILTIN_TAGS: Final = (
    0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 262,
    263, 270, 1004, 55799,
)  # fmt: skip


def _refuse_tag(tag: int) -> Callable[[Any, bool], Any]:
    def refuse(_value: Any, _immutable: bool) -> Any:
        raise DecodeError(f"cannot decode dag-cbor: tag {tag} is not allowed")

    return refuse


_CIDV1_SHA256: Final = b"\x00\x01\x71\x12\x20"


def _decode_link(value: Any, _immutable: bool) -> CID:
    if type(value) is not bytes or not value or value[0] != 0:
        raise DecodeError("cannot decode dag-cbor: tag 42 must hold 0x00-prefixed bytes")
    if len(value) == 37 and value.startswith(_CIDV1_SHA256):  # the usual CID: no parsing
        return wrap(value[1:])
    return CID.from_bytes(value[1:])


def _tag_hook(tag: cbor2.CBORTag, _immutable: bool) -> Any:
    raise DecodeError(f"cannot decode dag-cbor: tag {tag.tag} is not allowed")


_SEMANTIC: Final[Mapping[int, Any]] = {
    **{t: _refuse_tag(t) for t in _BUILTIN_TAGS},
    42: _decode_link,
}
_SCALARS: Final = frozenset((str, bytes, int, bool, type(None), CID))
_TEXT_KEYS: Final = {str}


def _encode_default(enc: cbor2.CBOREncoder, value: Any) -> None:
    if type(value) is CID:
        enc.encode(cbor2.CBORTag(42, b"\0" + value.raw))
        return
    raise DecodeError(f"cannot encode dag-cbor: unsupported type {type(value).__name__}")


def _check_types(value: Any) -> None:
    """Refuse what cbor2 decodes but DAG-CBOR lacks: non-text keys, undefined, simple
    values, NaN and Infinity. Only containers are pushed; scalars are checked in place."""
    if type(value) is not list and type(value) is not dict:
        _check_scalar(value)
        return
    stack = [value]
    while stack:
        v = stack.pop()
        if type(v) is dict:
            if v and set(map(type, v)) != _TEXT_KEYS:
                raise DecodeError("cannot decode dag-cbor: map keys must be text")
            items: Iterable[Any] = v.values()
        else:
            items = v
        for x in items:
            t = type(x)
            if t in _SCALARS:
                continue
            if t is dict or t is list:
                stack.append(x)
            else:
                _check_scalar(x)


def _check_scalar(x: Any) -> None:
    t = type(x)
    if t in _SCALARS:
        return
    if t is float:
        if not math.isfinite(x):
            raise DecodeError("cannot decode dag-cbor: NaN and Infinity are not allowed")
        return
    if x is cbor2.undefined:
        raise DecodeError("cannot decode dag-cbor: undefined is not allowed")
    if t is cbor2.CBORSimpleValue:
        raise DecodeError("cannot decode dag-cbor: simple values are not allowed")
    raise DecodeError(f"cannot decode dag-cbor: {t.__name__} is not allowed")


def decode(data: bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """Decode one DAG-CBOR value, accepting any map-key order.

    Links come back as :class:`CID`; maps as ``dict`` in wire order; arrays as ``list``.

    Args:
        data: exactly one encoded value.
        max_depth: deepest nesting of arrays and maps allowed.

    Raises:
        DecodeError: anything DAG-CBOR forbids (bar key order), or more nesting than allowed.
    """
    # The fast path answers only when it can tell the strict path would give the same
    # value or the same error; anything unusual is decoded again by the strict path, which
    # runs outside the handlers here so that its errors chain nothing from the fast one.
    # Large inputs go to the strict path only: decoding them twice would cost too much.
    if len(data) > _FAST_MAX:
        return _decode_strict(data, max_depth)
    try:
        value = cbor2.loads(
            data,
            semantic_decoders=_SEMANTIC_FAST,
            max_depth=max_depth,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        )
        links = _links(value)
        again = cbor2.dumps(value) if links is not None else None
    except Exception:
        links = again = None
    if links is None or again is None:
        return _decode_strict(data, max_depth)
    if again != data:
        if links:
            return _decode_strict(data, max_depth)
        # no tags: the strict path would decode, check and re-encode exactly this value
        raise DecodeError(_why_not_canonical(data, again))
    try:
        for container in links:
            _resolve_links(container)
    except DecodeError:
        links = None
    return value if links is not None else _decode_strict(data, max_depth)


#: the strict path's semantic decoders but for tag 42, which the fast path reads as a
#: ``CBORTag`` (no Python call per link on decode or encode) and turns into a CID after
_SEMANTIC_FAST: Final[Mapping[int, Any]] = {t: f for t, f in _SEMANTIC.items() if t != 42}
_PLAIN: Final = frozenset((str, bytes, int, bool, type(None)))
_FAST_MAX: Final = 1 << 16


def _links(value: Any) -> list[Any] | None:
    """The maps and arrays of a fast-decoded value that hold tag 42, or ``None`` when it
    holds anything the strict path has to judge: another tag, a non-text key, a float
    that is not finite, a simple value, a link at the top."""
    t = type(value)
    if t is not dict and t is not list:
        return [] if t in _PLAIN or (t is float and math.isfinite(value)) else None
    plain, tag = _PLAIN, cbor2.CBORTag
    found: list[Any] = []
    stack = [value]
    while stack:
        v = stack.pop()
        if type(v) is dict:
            if v and set(map(type, v)) != _TEXT_KEYS:
                return None
            items: Iterable[Any] = v.values()
        else:
            items = v
        tagged = False
        for x in items:
            t = type(x)
            if t in plain:
                continue
            if t is dict or t is list:
                stack.append(x)
            elif t is tag and x.tag == 42:
                tagged = True
            elif t is not float or not math.isfinite(x):
                return None
        if tagged:
            found.append(v)
    return found


def _resolve_links(container: Any) -> None:
    """Replace the tag-42 values of one map or array by CIDs, as the strict path reads them."""
    tag = cbor2.CBORTag
    pairs = enumerate(container) if type(container) is list else container.items()
    for k, x in pairs:
        if type(x) is tag:
            v = x.value
            if type(v) is bytes and len(v) == 37 and v.startswith(_CIDV1_SHA256):
                container[k] = wrap(v[1:])  # what _decode_link gives, without the call
            else:
                container[k] = _decode_link(v, False)  # a new value, not a new key


def _decode_strict(data: bytes, max_depth: int) -> Any:
    """The reference decoder: every check in the order that names the first fault."""
    try:
        value = cbor2.loads(
            data,
            tag_hook=_tag_hook,
            semantic_decoders=_SEMANTIC,
            max_depth=max_depth,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        )
        _check_types(value)
        again = cbor2.dumps(value, default=_encode_default)
    except DecodeError:
        raise
    except cbor2.CBORDecodeEOF as exc:
        raise DecodeError("cannot decode dag-cbor: truncated input") from exc
    except (cbor2.CBORError, ValueError, TypeError, OverflowError) as exc:
        cause = exc.__cause__
        if isinstance(cause, DecodeError):
            raise DecodeError(str(cause)) from exc
        raise DecodeError(f"cannot decode dag-cbor: {_one_line(exc)}") from exc
    except (RecursionError, MemoryError) as exc:
        raise DecodeError("cannot decode dag-cbor: input too deep or too large") from exc
    if again != data:
        raise DecodeError(_why_not_canonical(data, again))
    return value


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def _why_not_canonical(data: bytes, again: bytes) -> str:
    if len(again) < len(data) and data.startswith(again):
        return f"cannot decode dag-cbor: {len(data) - len(again)} trailing bytes"
    i = next((i for i, (a, b) in enumerate(zip(data, again, strict=False)) if a != b), None)
    where = f"at byte {i}" if i is not None else f"at byte {min(len(data), len(again))}"
    return (
        f"cannot decode dag-cbor: not in DAG-CBOR form {where} "
        "(non-minimal length or integer, float not 64-bit, or trailing bytes)"
    )


def reencode(value: Any) -> bytes:
    """Encode a decoded value in the order it holds (the bytes it was decoded from)."""
    return cbor2.dumps(value, default=_encode_default)


def _canonical(value: Any, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise DecodeError("cannot encode dag-cbor: nesting too deep")
    t = type(value)
    if t is dict:
        items = []
        for k, v in value.items():
            if type(k) is not str:
                raise DecodeError(f"cannot encode dag-cbor: map key {k!r} is not text")
            items.append((k.encode(), k, v))
        items.sort(key=lambda kv: (len(kv[0]), kv[0]))
        return {k: _canonical(v, depth + 1) for _, k, v in items}
    if t is list or t is tuple:
        return [_canonical(v, depth + 1) for v in value]
    if t is float:
        if not math.isfinite(value):
            raise DecodeError("cannot encode dag-cbor: NaN and Infinity are not allowed")
        return value
    if t is int:
        if not -(1 << 64) <= value < (1 << 64):
            raise DecodeError("cannot encode dag-cbor: integer out of 64-bit range")
        return value
    if value is None or t is bool or t is str or t is bytes or t is CID:
        return value
    if isinstance(value, Mapping):
        return _canonical(dict(value), depth)
    raise DecodeError(f"cannot encode dag-cbor: unsupported type {t.__name__}")


def encode(value: Any) -> bytes:
    """Canonical DAG-CBOR of ``value`` (keys length-first then bytewise, float64, links tag 42).

    Raises:
        DecodeError: a value DAG-CBOR cannot hold (non-text key, NaN, a set, ...).
    """
    return cbor2.dumps(_canonical(value), default=_encode_default)


def encode_text(text: str) -> bytes:
    """The CBOR encoding of one text string (cached when short: keys, DIDs and commands
    repeat; an invocation's ``sub``, up to 2,048 characters and written before any
    signature is checked, and error messages need not)."""
    if len(text) <= _TEXT_CACHED_MAX:
        return _encode_text_cached(text)
    b = text.encode()
    return head(3, len(b)) + b


#: the longest text whose encoding is cached: 4,096 entries of at most ~1 KiB each (text
#: and bytes at 4 bytes a character) where they were up to ~16 KiB
_TEXT_CACHED_MAX: Final = 128


@lru_cache(maxsize=4096)
def _encode_text_cached(text: str) -> bytes:
    b = text.encode()
    return head(3, len(b)) + b


def encode_bytes(data: bytes) -> bytes:
    """The CBOR encoding of one byte string."""
    return head(2, len(data)) + data


def encode_int(n: int) -> bytes:
    """The CBOR encoding of one integer (64-bit range).

    Raises:
        DecodeError: out of range.
    """
    if type(n) is not int or not -(1 << 64) <= n < (1 << 64):
        raise DecodeError(f"cannot encode dag-cbor: {n!r} is not a 64-bit integer")
    return head(0, n) if n >= 0 else head(1, -1 - n)


def encode_link(cid: CID) -> bytes:
    """The CBOR encoding of one link (tag 42)."""
    return b"\xd8\x2a" + head(2, len(cid.raw) + 1) + b"\x00" + cid.raw


def head(major: int, n: int) -> bytes:
    """A minimal CBOR head of major type ``major`` with argument ``n``."""
    if 0 <= n < 0x100 and 0 <= major < 8:
        return _HEADS[major][n]
    m = major << 5
    if n < 24:
        return bytes((m | n,))
    if n < 0x100:
        return bytes((m | 24, n))
    if n < 0x10000:
        return bytes((m | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((m | 26,)) + n.to_bytes(4, "big")
    return bytes((m | 27,)) + n.to_bytes(8, "big")


#: heads with arguments below 256 by major type: lengths, counts and small integers
#: take one of these in every token the worker writes
_HEADS: Final = tuple(
    tuple(bytes((m << 5 | n,)) if n < 24 else bytes((m << 5 | 24, n)) for n in range(0x100))
    for m in range(8)
)


def encode_map_raw(entries: Mapping[str, bytes]) -> bytes:
    """A map of already-encoded values, keys in canonical order (values written verbatim)."""
    keys = sorted(entries, key=lambda k: (len(k.encode()), k.encode()))
    out = [head(5, len(keys))]
    for k in keys:
        out.append(encode_text(k))
        out.append(entries[k])
    return b"".join(out)


def to_dag_json(value: Any) -> Any:
    """A JSON-ready copy of a decoded value: bytes as ``{"/": {"bytes": b64}}``, links as
    ``{"/": cid}`` (base64 standard, no padding, as DAG-JSON writes it)."""
    t = type(value)
    if t is dict:
        return {k: to_dag_json(v) for k, v in value.items()}
    if t is list or t is tuple:
        return [to_dag_json(v) for v in value]
    if t is bytes:
        return {"/": {"bytes": base64.b64encode(value).decode().rstrip("=")}}
    if t is CID:
        return {"/": str(value)}
    return value


def from_dag_json(value: Any) -> Any:
    """Inverse of :func:`to_dag_json` for fixtures: ``{"/": ...}`` forms become bytes and links."""
    if isinstance(value, dict):
        if set(value) == {"/"}:
            inner = value["/"]
            if isinstance(inner, str):
                return CID.parse(inner)
            if isinstance(inner, dict) and set(inner) == {"bytes"}:
                b = inner["bytes"]
                return base64.b64decode(b + "=" * (-len(b) % 4))
        return {k: from_dag_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_dag_json(v) for v in value]
    return value
