"""Makes the AMQP codec (pamqp, under aio-pika) total on what a publisher can write.

pamqp decodes a delivery's properties and headers in the connection's reader task. An
exception there closes the whole connection; the broker then redelivers the message to the
next connection, which fails the same way: one published message kept the worker down
(reconnecting every 5 s) until the queue's delivery limit, and then blocked the
dead-letter tools. pamqp 4.0 raised on a timestamp past year 9999 (``ValueError`` from
``datetime``) and on a short string or a header name that is not UTF-8
(``UnicodeDecodeError``). :func:`install` replaces those decoders with ones that cannot
raise on well-framed data: timestamps are clamped to ``datetime.max``, and text that is not
UTF-8 is decoded with U+FFFD replacements (the worker never trusts either).

Nested header tables are the other hazard: pamqp decodes (and encodes) them recursively,
and :data:`RECURSION_LIMIT` covers them.

What the worker writes is checked here too, message by message (:func:`encode_publish`).
"""

from __future__ import annotations

import datetime
import struct
import sys
from typing import Any, Final

from pamqp import common, decode, frame
from pamqp.commands import Basic
from pamqp.header import ContentHeader

_CLAMPED: Final = datetime.datetime.max.replace(tzinfo=datetime.UTC)
#: Python frames allowed: pamqp decodes (and encodes) nested header tables recursively, two
#: frames a level, and one frame (128 KiB) holds ~22,000 levels. At the default of 1,000 a
#: publisher's nested header raised RecursionError in the connection's reader: the
#: connection dropped, the message came back, and the worker was down until the broker's
#: delivery limit. Python-to-Python calls use no C stack (3.11+), so this is heap only.
RECURSION_LIMIT: Final = 100_000


def _timestamp(value: bytes) -> tuple[int, datetime.datetime]:
    try:
        (seconds,) = common.Struct.timestamp.unpack(value[0:8])
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack timestamp value") from err
    if seconds > 0xFFFFFFFF:  # pamqp's reading: above the year 2106 it is milliseconds
        seconds /= 1000.0
    try:
        return 8, datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    except (ValueError, OverflowError, OSError):
        return 8, _CLAMPED


def _short_str(value: bytes) -> tuple[int, str]:
    try:
        (length,) = common.Struct.byte.unpack(value[0:1])
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack short string value") from err
    return length + 1, value[1 : length + 1].decode("utf-8", "replace")


def _field_table(value: bytes) -> tuple[int, common.FieldTable]:
    """pamqp's ``field_table`` with header names decoded leniently."""
    try:
        (length,) = common.Struct.integer.unpack(value[0:4])
        offset = 4
        data: common.FieldTable = {}
        end = offset + length
        if end > len(value):
            raise ValueError("Field table length exceeds available data")
        while offset < end:
            (key_length,) = common.Struct.byte.unpack_from(value, offset)
            offset += 1
            if offset + key_length > end:
                raise ValueError("Field table key length exceeds data")
            key = value[offset : offset + key_length].decode("utf-8", "replace")
            offset += key_length
            consumed, result = decode.embedded_value(value[offset:])
            offset += consumed
            data[key] = result
        return end, data
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack data") from err


def install() -> None:
    """Replace pamqp's raising decoders and raise the recursion limit to
    :data:`RECURSION_LIMIT` (idempotent; process-wide). Every command that reads messages
    (``run``, ``dlq``, ``status``, the client) needs both."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), RECURSION_LIMIT))
    decode.METHODS["timestamp"] = _timestamp
    decode.METHODS["shortstr"] = _short_str
    decode.METHODS["table"] = _field_table
    decode.TABLE_MAPPING[b"T"] = _timestamp
    decode.TABLE_MAPPING[b"F"] = _field_table
    decode.timestamp = _timestamp
    decode.short_str = _short_str
    decode.field_table = _field_table


# --- encoding: what the worker writes must never fail its neighbours ---------------------

#: what pamqp raises on a value it cannot encode (a short string over 255 bytes, a float a
#: 4-byte ``f`` cannot hold, a decimal it cannot scale, ...)
ENCODE_ERRORS: Final = (TypeError, ValueError, OverflowError, struct.error, UnicodeError)
#: the frame_max RabbitMQ negotiates by default (bytes, frame overhead included)
DEFAULT_FRAME_MAX: Final = 131_072
#: a frame's type, channel and size fields and its end octet
FRAME_OVERHEAD: Final = 8
#: an AMQP short string's limit, in bytes
SHORTSTR_MAX: Final = 255


class Unencodable(ValueError):
    """An outgoing message cannot be written: a property over 255 bytes in UTF-8, a header
    pamqp cannot encode, or properties larger than one frame. Permanent for that message
    alone: re-sending it would fail the same way."""


def shortstr_ok(value: str | None) -> bool:
    """Whether ``value`` fits an AMQP short string (255 bytes in UTF-8); cheap for the
    common case of short ASCII text."""
    return value is None or len(value) <= SHORTSTR_MAX // 4 or len(value.encode()) <= SHORTSTR_MAX


def encode_publish(
    channel_number: int,
    routing_key: str,
    properties: Basic.Properties,
    body_frames: list[Any],
    *,
    frame_max: int,
    mandatory: bool = True,
) -> bytes:
    """The wire bytes of one publish through the default exchange (``mandatory`` unless
    told otherwise).

    pamqp checks a short string's length only while it writes it, and nothing checks that
    the content header fits in one frame: a message copied from a hostile one (a property
    whose bad bytes were read as U+FFFD, three bytes each; a header table of 1-byte values
    that re-encode as 2 or 3) could otherwise raise in the middle of a batch's write, or
    reach the broker as a frame over ``frame_max``, which closes the whole connection.

    Raises:
        Unencodable: why this message cannot be written.
    """
    if not shortstr_ok(routing_key):
        raise Unencodable(f"the routing key is {len(routing_key.encode())} bytes in UTF-8")
    try:
        header = frame.marshal(
            ContentHeader(properties=properties, body_size=_body_size(body_frames)),
            channel_number,
        )
        parts = [
            frame.marshal(
                Basic.Publish(exchange="", routing_key=routing_key, mandatory=mandatory),
                channel_number,
            ),
            header,
        ]
        parts.extend(frame.marshal(f, channel_number) for f in body_frames)
    except ENCODE_ERRORS as exc:
        raise Unencodable(f"its properties cannot be encoded ({_one_line(exc)})") from None
    if len(header) > frame_max:
        raise Unencodable(
            f"its properties and headers encode to {len(header)} bytes, over the "
            f"connection's frame size of {frame_max}"
        )
    return b"".join(parts)


def check_properties(properties: Basic.Properties, *, frame_max: int) -> str | None:
    """Why a message with ``properties`` cannot be written, or None when it can."""
    try:
        encode_publish(0, "", properties, [], frame_max=frame_max)
    except Unencodable as exc:
        return str(exc)
    return None


def _body_size(body_frames: list[Any]) -> int:
    return sum(len(f.value) for f in body_frames)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
