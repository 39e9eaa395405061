"""The consumer's pure parts: contiguous acks, the attempt header, failure classes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import aio_pika
import asyncpg
import pytest

from worker.amqp import topology
from worker.service.acks import AckTracker
from worker.service.consumer import is_transient_db_error
from worker.service.jobs import attempt_of as _attempt


def test_acks_cover_only_tags_with_nothing_unsettled_below() -> None:
    t = AckTracker()
    ch = object()
    for tag in range(1, 7):
        t.received(ch, tag)
    assert t.done(ch, [4, 5]) is None  # 1-3 are still being processed
    assert t.done(ch, [1, 2]) == 2  # ack 1..2; 3 still open
    assert t.done(ch, [3]) == 5  # 3 closes the gap: ack up to 5 at once
    assert t.unsettled() == 1
    t.forget(ch, 6)  # nacked
    assert t.unsettled() == 0


def test_acks_are_per_channel_and_a_lost_channel_is_forgotten() -> None:
    t = AckTracker()
    old, new = object(), object()
    t.received(old, 1)
    t.received(new, 1)
    t.received(new, 2)
    assert t.done(new, [2]) is None
    t.drop_channel(old)
    assert t.done(new, [1]) == 2
    assert t.unsettled() == 0


def msg(headers: dict[str, Any] | None) -> Any:
    return SimpleNamespace(headers=headers)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, 0), (2, 2), ("3", 3), (-4, 0), (99, 5), ("x", 0), (1.5, 0), ([1], 0)],
)
def test_attempt_header_is_clamped(value: object, expected: int) -> None:
    headers = None if value is None else {topology.H_ATTEMPT: value}
    assert _attempt(msg(headers), 5) == expected


def test_failure_classes_of_database_errors() -> None:
    assert is_transient_db_error(ConnectionRefusedError())
    assert is_transient_db_error(TimeoutError())
    assert is_transient_db_error(asyncpg.exceptions.AdminShutdownError())
    assert is_transient_db_error(asyncpg.exceptions.DeadlockDetectedError())
    assert not is_transient_db_error(asyncpg.exceptions.CheckViolationError())
    assert not is_transient_db_error(ValueError())


def test_a_copy_keeps_the_properties_and_drops_the_brokers_death_history() -> None:
    from datetime import UTC, datetime

    from worker.service.broker import copy_of

    when = datetime(2026, 1, 2, tzinfo=UTC)
    original: Any = SimpleNamespace(
        body=b"body",
        headers={"x-death": [{}], "x-first-death-reason": "expired", "app": "hilt"},
        correlation_id="corr",
        reply_to="replies",
        message_id="mid",
        timestamp=when,
        content_type="application/vnd.ipld.dag-cbor",
        content_encoding=None,
        type=None,
        app_id="hilt",
    )
    out = copy_of(original, "q.dlq", {topology.H_REASON: "undecodable"})
    assert (out.routing_key, out.body) == ("q.dlq", b"body")
    assert (out.correlation_id, out.reply_to, out.message_id, out.timestamp) == (
        "corr",
        "replies",
        "mid",
        when,
    )
    assert out.headers == {"app": "hilt", topology.H_REASON: "undecodable"}


def test_a_delivery_reads_what_the_consumer_uses_off_aiormqs_frames() -> None:
    from datetime import UTC, datetime

    from aiormq.abc import DeliveredMessage
    from pamqp import commands as spec
    from pamqp.header import ContentHeader

    from worker.service.broker import Delivery, copy_of

    when = datetime(2026, 11, 25, tzinfo=UTC)
    props = spec.Basic.Properties(
        headers={"forge-attempt": 2},
        reply_to="r",
        correlation_id="c",
        message_id="m",
        timestamp=when,
        content_type="application/vnd.ipld.dag-cbor",
        content_encoding="identity",
        message_type="t",
        app_id="a",
    )
    channel = object()
    raw = DeliveredMessage(
        delivery=spec.Basic.Deliver(consumer_tag="ct", delivery_tag=7, redelivered=True),
        header=ContentHeader(properties=props, body_size=4),
        body=b"body",
        channel=channel,  # type: ignore[arg-type]
    )
    d = Delivery(raw)
    assert (d.body, d.channel, d.delivery_tag, d.redelivered) == (b"body", channel, 7, True)
    assert (d.reply_to, d.correlation_id, d.message_id, d.timestamp) == ("r", "c", "m", when)
    assert (d.content_type, d.content_encoding, d.type, d.app_id) == (
        "application/vnd.ipld.dag-cbor",
        "identity",
        "t",
        "a",
    )
    assert d.headers == {"forge-attempt": 2}
    assert _attempt(d, 3) == 2
    out = copy_of(d, "q.dlq", {"forge-reason": "x"})
    assert (out.reply_to, out.message_id, out.type, out.app_id) == ("r", "m", "t", "a")
    assert out.headers == {"forge-attempt": 2, "forge-reason": "x"}
    bare = Delivery(
        DeliveredMessage(
            delivery=spec.Basic.Deliver(consumer_tag="ct", delivery_tag=8),
            header=ContentHeader(properties=spec.Basic.Properties(), body_size=0),
            body=b"",
            channel=channel,  # type: ignore[arg-type]
        )
    )
    assert bare.headers == {} and bare.reply_to is None and bare.redelivered is False


def test_progress_is_the_last_ack_or_give_back_while_deliveries_are_pending() -> None:
    now = [100.0]
    acks = AckTracker(clock=lambda: now[0])
    ch = object()
    assert acks.stalled_for() == 0.0  # nothing pending
    now[0] = 500.0
    acks.received(ch, 1)  # pending from now on, not since the tracker was made
    acks.received(ch, 2)
    now[0] = 530.0
    assert acks.stalled_for() == 30.0
    assert acks.done(ch, [2]) is None  # 1 is pending below it: no progress on the broker
    now[0] = 560.0
    assert acks.stalled_for() == 60.0
    # giving 1 back unblocks 2 and is progress
    assert acks.forget(ch, 1) == 2
    assert acks.unsettled() == 0 and acks.stalled_for() == 0.0


def test_a_copy_that_cannot_be_written_leaves_out_what_cannot() -> None:
    from worker.amqp import guard
    from worker.service.broker import copy_of, safe_copy_of

    bad = "\ufffd" * 90  # 270 bytes in UTF-8
    msg = aio_pika.message.Message(
        b"body",
        correlation_id=bad,
        app_id="ok",
        headers={"big": list(range(128, 256)) * 400, "keep": 1},  # type: ignore[dict-item]
    )
    incoming: Any = SimpleNamespace(
        body=msg.body,
        headers=msg.headers,
        correlation_id=msg.correlation_id,
        reply_to=None,
        message_id="m1",
        timestamp=None,
        content_type=None,
        content_encoding=None,
        type=None,
        app_id="ok",
    )
    ours = {topology.H_REASON: "undecodable"}
    plain = copy_of(incoming, "q.dlq", ours)
    problem = guard.check_properties(plain.properties(), frame_max=65_536)
    assert problem is not None and "cannot be encoded" in problem
    safe = safe_copy_of(incoming, "q.dlq", ours, frame_max=65_536)
    assert guard.check_properties(safe.properties(), frame_max=65_536) is None
    assert safe.correlation_id is None and safe.app_id == "ok" and safe.message_id == "m1"
    assert safe.headers[topology.H_ORIGINAL_PROPERTIES] == {"correlation_id": bad}
    # the publisher's headers no longer fit the frame: left out, and said so
    assert "big" not in safe.headers and "keep" not in safe.headers
    assert "2 publisher headers left out" in safe.headers[topology.H_DROPPED_HEADERS]
    assert safe.headers[topology.H_REASON] == "undecodable" and safe.body == b"body"


@pytest.mark.parametrize(
    ("props", "expected"),
    [
        ({"correlation_id": "x" * 255}, None),
        ({"correlation_id": "é" * 128}, "cannot be encoded"),  # 256 bytes
        ({"headers": {"f": 1e300}}, "cannot be encoded"),  # a 4-byte float cannot hold it
        ({"headers": {"s": "x" * 70_000}}, "over the connection's frame size"),
    ],
)
def test_which_properties_can_be_written(props: dict[str, Any], expected: str | None) -> None:
    from aiormq import spec

    from worker.amqp import guard

    problem = guard.check_properties(spec.Basic.Properties(**props), frame_max=65_536)
    assert (problem is None) if expected is None else (expected in str(problem))
