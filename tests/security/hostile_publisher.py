"""Publishes one message with properties or headers no well-behaved AMQP client writes,
by patching the publisher's own encoder. Run as a separate process (the patches are
global)::

    python tests/security/hostile_publisher.py AMQP_URL QUEUE CASE

CASE: ``header-timestamp`` (a timestamp past year 9999 in a header), ``property-timestamp``
(the same as the ``timestamp`` property), ``header-key`` (a header name that is not UTF-8),
``property-string`` (a ``message_id`` that is not UTF-8).
"""

from __future__ import annotations

import asyncio
import datetime
import sys
import time

import aio_pika
from pamqp import common, encode

BAD_UTF8 = b"\xc3\x28"
#: a private-use character marks the strings whose bytes are replaced
MARK = "\ue000"
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)

_short_string = encode.short_string


def _bad_short_string(value: str) -> bytes:
    if value == MARK:
        return common.Struct.byte.pack(len(BAD_UTF8)) + BAD_UTF8
    return _short_string(value)


def _bad_timestamp(value: datetime.datetime | time.struct_time) -> bytes:
    del value
    return common.Struct.timestamp.pack((1 << 64) - 1)


def message(case: str) -> aio_pika.Message:
    body = b"\xa1junk"
    if case == "header-timestamp":
        encode.timestamp = _bad_timestamp
        return aio_pika.Message(body, headers={"t": NOW})
    if case == "property-timestamp":
        encode.METHODS["timestamp"] = _bad_timestamp
        return aio_pika.Message(body, timestamp=NOW)
    if case == "header-key":
        encode.short_string = _bad_short_string
        return aio_pika.Message(body, headers={MARK: 1})
    if case == "property-string":
        encode.METHODS["shortstr"] = _bad_short_string
        return aio_pika.Message(body, message_id=MARK)
    raise SystemExit(f"unknown case {case!r}")


async def main(url: str, queue: str, case: str) -> None:
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        await ch.default_exchange.publish(message(case), queue)
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
