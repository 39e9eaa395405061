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

Nested header tables are the other hazard (pamqp recurses); ``worker.app.RECURSION_LIMIT``
covers them.
"""

from __future__ import annotations

import datetime
import struct
from typing import Final

from pamqp import common, decode

_CLAMPED: Final = datetime.datetime.max.replace(tzinfo=datetime.UTC)


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
    """Replace pamqp's raising decoders (idempotent; process-wide)."""
    decode.METHODS["timestamp"] = _timestamp
    decode.METHODS["shortstr"] = _short_str
    decode.METHODS["table"] = _field_table
    decode.TABLE_MAPPING[b"T"] = _timestamp
    decode.TABLE_MAPPING[b"F"] = _field_table
    decode.timestamp = _timestamp
    decode.short_str = _short_str
    decode.field_table = _field_table
