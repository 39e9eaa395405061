"""Fuzzing AMQP properties and headers, not only bodies (issue 20).

What a publisher writes in a message's properties and header table reaches the worker
through pamqp's decoder (made total by ``worker.amqp.guard``) and comes back out whenever
the worker copies the message (a retry tier, the dead-letter queue). Generated here at the
byte level, as a hostile publisher would write them (any type octet RabbitMQ accepts, text
that is not UTF-8, NaN and infinite doubles, timestamps past year 9999, nesting):

* decoding never raises anything but ``ValueError`` (the guard's promise on well-framed
  data: in practice it always decodes);
* whatever decoded, :func:`~worker.service.broker.safe_copy_of` makes a dead letter that can
  always be written, and :func:`~worker.amqp.guard.encode_publish` either writes a copy or
  refuses it with ``Unencodable``, never another exception (which, raised in a batch's
  write, used to stall the worker).
"""

from __future__ import annotations

import contextlib
import struct
from types import SimpleNamespace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import decode

from worker.amqp import guard, topology
from worker.service.broker import copy_of, safe_copy_of

guard.install()

FRAME_MAX = 131_072


def _shortstr(raw: bytes) -> bytes:
    return struct.pack(">B", len(raw)) + raw


def _longstr(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


_text = st.binary(max_size=90)  # 90 bad bytes read as U+FFFD: 270 bytes once re-encoded

_scalar = st.one_of(
    st.builds(lambda b: b"t" + bytes([b]), st.integers(0, 255)),
    st.builds(lambda v: b"b" + struct.pack(">b", v), st.integers(-128, 127)),
    st.builds(lambda v: b"B" + struct.pack(">B", v), st.integers(0, 255)),
    st.builds(lambda v: b"s" + struct.pack(">h", v), st.integers(-(2**15), 2**15 - 1)),
    st.builds(lambda v: b"u" + struct.pack(">H", v), st.integers(0, 2**16 - 1)),
    st.builds(lambda v: b"I" + struct.pack(">i", v), st.integers(-(2**31), 2**31 - 1)),
    st.builds(lambda v: b"i" + struct.pack(">I", v), st.integers(0, 2**32 - 1)),
    st.builds(lambda v: b"l" + struct.pack(">q", v), st.integers(-(2**63), 2**63 - 1)),
    st.builds(lambda raw: b"f" + raw, st.binary(min_size=4, max_size=4)),
    st.builds(lambda raw: b"d" + raw, st.binary(min_size=8, max_size=8)),  # NaN, inf, 1e300
    st.builds(lambda raw: b"D" + raw, st.binary(min_size=5, max_size=5)),
    st.builds(lambda raw: b"T" + raw, st.binary(min_size=8, max_size=8)),  # past year 9999
    st.builds(lambda raw: b"S" + _longstr(raw), _text),  # not UTF-8: bytes
    st.builds(lambda raw: b"x" + _longstr(raw), st.binary(max_size=40)),
    st.just(b"V"),
)


def _table(values: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    entries = st.lists(st.tuples(st.binary(min_size=1, max_size=40), values), max_size=6)
    return entries.map(lambda es: _longstr(b"".join(_shortstr(k) + v for k, v in es)))


_value = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.builds(lambda t: b"F" + t, _table(inner)),
        st.lists(inner, max_size=6).map(lambda vs: b"A" + _longstr(b"".join(vs))),
    ),
    max_leaves=30,
)

#: (name on a delivery, name in AMQP's property list) of the short strings a copy carries
_PROPERTIES = (
    "correlation_id",
    "reply_to",
    "message_id",
    "content_type",
    "content_encoding",
    "type",
    "app_id",
)


def _delivery(headers: dict[str, Any], props: dict[str, str | None]) -> Any:
    return SimpleNamespace(body=b"\xa1junk", headers=headers, timestamp=None, **props)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=_table(_value),
    props=st.fixed_dictionaries({name: st.one_of(st.none(), _text) for name in _PROPERTIES}),
)
def test_any_header_table_and_properties_decode_and_copy_safely(
    table: bytes, props: dict[str, bytes | None]
) -> None:
    try:
        _, headers = decode.field_table(table)
    except ValueError:
        return  # well-framed data always decodes; a malformed frame is refused by the broker
    decoded = {
        k: None if v is None else decode.short_str(_shortstr(v))[1] for k, v in props.items()
    }
    msg = _delivery(dict(headers), decoded)
    ours = {topology.H_REASON: "undecodable", topology.H_ERROR: "x" * 500}
    for routing_key in ("q.dlq", "q.retry.1s"):
        plain = copy_of(msg, routing_key, ours)
        # refused alone, by name (Unencodable): the worker then makes the safe copy below
        with contextlib.suppress(guard.Unencodable):
            guard.encode_publish(1, routing_key, plain.properties(), [], frame_max=FRAME_MAX)
        safe = safe_copy_of(msg, routing_key, ours, frame_max=FRAME_MAX)
        guard.encode_publish(1, routing_key, safe.properties(), [], frame_max=FRAME_MAX)
        assert safe.headers[topology.H_REASON] == "undecodable"
