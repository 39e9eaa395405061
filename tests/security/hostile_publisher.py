"""Publishes one message with properties or headers no well-behaved AMQP client writes,
by patching the publisher's own encoder. Run as a separate process (the patches are
global)::

    python tests/security/hostile_publisher.py AMQP_URL QUEUE CASE[,CASE...] [BODY_FILE]

CASE:

``header-timestamp``
    a timestamp past year 9999 in a header
``property-timestamp``
    the same as the ``timestamp`` property
``header-key``
    a header name that is not UTF-8
``property-string``
    a ``message_id`` that is not UTF-8
``prop:NAME=HEX*N``
    the short-string property NAME (``correlation_id``, ``message_id``, ``reply_to``,
    ``content_type``, ``content_encoding``, ``message_type``, ``app_id``, ``cluster_id``,
    ``user_id``, ``expiration``) written as N copies of the bytes HEX, e.g.
    ``prop:correlation_id=ff*90`` (90 bytes that are not UTF-8: read as 90 U+FFFD, 270 bytes
    in UTF-8, too long for a short string when written again)
``prop:NAME=TEXT``
    the property set to the text TEXT (e.g. a valid ``reply_to`` beside a bad one)
``header-grow=N``
    a header ``grow`` holding an array of N unsigned bytes 200 (type ``B``, 2 bytes each),
    which the AMQP library reads as integers and writes back as ``s`` (3 bytes each)
``header-double``
    a header ``double`` holding the double 1e300, which the library reads as a float and
    writes back as a 4-byte float it cannot hold

BODY_FILE: the body (default: 5 bytes that are not a UCAN container).
"""

from __future__ import annotations

import asyncio
import datetime
import struct
import sys
import time
from pathlib import Path
from typing import Any

import aio_pika
from pamqp import common, encode

BAD_UTF8 = b"\xc3\x28"
#: a private-use character marks the strings whose bytes are replaced
MARK = "\ue000"
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
JUNK = b"\xa1junk"

_short_string = encode.short_string
_shortstr_method = encode.METHODS["shortstr"]
_encode_table_value = encode.encode_table_value

#: marker text -> the raw bytes written in its place
_RAW_STRINGS: dict[str, bytes] = {}


class RawValue:
    """A header value written as these exact bytes (type octet included)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw


def _raw_short_string(value: str) -> bytes:
    raw = _RAW_STRINGS.get(value)
    if raw is not None:
        return common.Struct.byte.pack(len(raw)) + raw
    return _shortstr_method(value)


def _raw_table_value(value: Any) -> bytes:
    if isinstance(value, RawValue):
        return value.raw
    return _encode_table_value(value)


def _bad_short_string(value: str) -> bytes:
    if value == MARK:
        return common.Struct.byte.pack(len(BAD_UTF8)) + BAD_UTF8
    return _short_string(value)


def _bad_timestamp(value: datetime.datetime | time.struct_time) -> bytes:
    del value
    return common.Struct.timestamp.pack((1 << 64) - 1)


def _raw_property(spec: str) -> tuple[str, str]:
    """``NAME=HEX*N`` or ``NAME=TEXT``: the property and the marker (or text) to set."""
    name, _, value = spec.partition("=")
    hexpart, star, count = value.partition("*")
    if not star:
        return name, value
    marker = chr(0xE100 + len(_RAW_STRINGS))
    _RAW_STRINGS[marker] = bytes.fromhex(hexpart) * int(count)
    encode.METHODS["shortstr"] = _raw_short_string
    return name, marker


def message(cases: str, body: bytes = JUNK) -> aio_pika.Message:
    props: dict[str, Any] = {}
    headers: dict[str, Any] = {}
    for case in cases.split(","):
        if case == "header-timestamp":
            encode.timestamp = _bad_timestamp
            headers["t"] = NOW
        elif case == "property-timestamp":
            encode.METHODS["timestamp"] = _bad_timestamp
            props["timestamp"] = NOW
        elif case == "header-key":
            encode.short_string = _bad_short_string
            headers[MARK] = 1
        elif case == "property-string":
            encode.METHODS["shortstr"] = _bad_short_string
            props["message_id"] = MARK
        elif case.startswith("prop:"):
            name, value = _raw_property(case.removeprefix("prop:"))
            props[name] = value
        elif case.startswith("header-grow="):
            n = int(case.removeprefix("header-grow="))
            items = b"B\xc8" * n
            headers["grow"] = RawValue(b"A" + struct.pack(">I", len(items)) + items)
            encode.encode_table_value = _raw_table_value
        elif case == "header-double":
            headers["double"] = RawValue(b"d" + struct.pack(">d", 1e300))
            encode.encode_table_value = _raw_table_value
        else:
            raise SystemExit(f"unknown case {case!r}")
    type_ = props.pop("message_type", None)
    cluster_id = props.pop("cluster_id", None)
    expiration = props.pop("expiration", None)
    msg = _Message(body, headers=headers or None, type=type_, **props)
    msg.raw_cluster_id, msg.raw_expiration = cluster_id, expiration
    return msg


class _Message(aio_pika.Message):
    """A message whose ``cluster_id`` and ``expiration`` are written as given (aio-pika has
    no argument for the first and parses the second)."""

    raw_cluster_id: str | None = None
    raw_expiration: str | None = None

    @property
    def properties(self) -> Any:
        props = super().properties
        props.cluster_id = self.raw_cluster_id  # type: ignore[assignment]
        if self.raw_expiration is not None:
            props.expiration = self.raw_expiration
        return props


async def main(url: str, queue: str, cases: str, body: bytes) -> None:
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel(publisher_confirms=True)
        await ch.default_exchange.publish(message(cases, body), queue)
    finally:
        await conn.close()


if __name__ == "__main__":
    url, queue, cases, *rest = sys.argv[1:]
    asyncio.run(main(url, queue, cases, Path(rest[0]).read_bytes() if rest else JUNK))
