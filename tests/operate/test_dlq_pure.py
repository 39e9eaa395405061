"""The operator tools' pure parts: describing dead letters, ids, selection, replay copies,
pacing, the status table and the command's usage errors."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest

from worker import cli
from worker.amqp import topology
from worker.config import Settings
from worker.operate import deadletters, dlq, replay, status
from worker.ucan import Signer, customer_add_args, encode_container, encode_invocation

T0 = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)


def broker_headers(reason: str = "delivery_limit", when: datetime = T0) -> dict[str, Any]:
    """What RabbitMQ 3.10 puts on a message it dead-letters from the inbox."""
    return {
        "app": "kept",
        "x-death": [
            {
                "count": 1,
                "reason": reason,
                "queue": "ucan.invocations",
                "time": when,
                "exchange": "",
                "routing-keys": ["ucan.invocations"],
            },
            {
                "count": 2,
                "reason": "expired",
                "queue": "ucan.invocations.retry.5s",
                "time": when - timedelta(minutes=5),
                "exchange": "",
                "routing-keys": ["ucan.invocations.retry.5s"],
            },
        ],
        "x-delivery-count": 4,
        "x-first-death-exchange": "",
        "x-first-death-queue": "ucan.invocations.retry.5s",
        "x-first-death-reason": "expired",
    }


def test_reason_is_the_brokers_when_it_dead_lettered_else_the_workers() -> None:
    # the worker's own dead letter (a copy it published: no x-death)
    assert deadletters.death_reason({topology.H_REASON: "undecodable"}) == "undecodable"
    # dead-lettered by the broker: its forge-reason is the publisher's, not the worker's
    assert (
        deadletters.death_reason({topology.H_REASON: "forged", **broker_headers()})
        == broker_headers()["x-death"][0]["reason"]
    )
    # x-death is most recent first: the death that put it in the DLQ, not the first one
    assert deadletters.death_reason(broker_headers("delivery_limit")) == "delivery_limit"
    assert (
        deadletters.death_reason({"x-last-death-reason": "rejected", **broker_headers()})
        == "rejected"
    )
    assert deadletters.death_reason({"x-first-death-reason": "maxlen"}) == "maxlen"
    assert deadletters.death_reason({}) == "unknown"


def test_first_death_time() -> None:
    assert deadletters.first_death_time(broker_headers()) == T0 - timedelta(minutes=5)
    forged = {topology.H_DEAD_LETTERED_AT: int(T0.timestamp()), **broker_headers()}
    assert deadletters.first_death_time(forged) == T0 - timedelta(minutes=5)  # the broker's
    assert deadletters.first_death_time({topology.H_DEAD_LETTERED_AT: int(T0.timestamp())}) == T0
    assert (
        deadletters.first_death_time({topology.H_DEAD_LETTERED_AT: str(int(T0.timestamp()))}) == T0
    )
    assert deadletters.first_death_time({}) is None
    assert deadletters.first_death_time({topology.H_DEAD_LETTERED_AT: "soon"}) is None


def test_id_is_message_id_else_a_stable_hash_of_body_and_first_death() -> None:
    assert deadletters.dead_letter_id("m-1", b"body", T0) == "m-1"
    h = deadletters.dead_letter_id(None, b"body", T0)
    assert h.startswith("h:") and len(h) == 18
    assert deadletters.dead_letter_id(None, b"body", T0) == h
    assert deadletters.dead_letter_id("", b"body", T0) == h
    assert deadletters.dead_letter_id(None, b"body", T0 + timedelta(seconds=1)) != h
    assert deadletters.dead_letter_id(None, b"other", T0) != h
    assert deadletters.dead_letter_id(None, b"body", None) != h


def _request(customer: str) -> tuple[bytes, Signer]:
    issuer, service = Signer.generate(), Signer.generate()
    token = encode_invocation(
        issuer,
        sub=service.did,
        cmd="/customer/add",
        args_raw=customer_add_args(customer, "did:web:p.example", {}),
        exp=None,
    )
    return encode_container([token]), issuer


def test_describe_a_broker_dead_letter() -> None:
    body, issuer = _request("did:mailto:example.com:carol")
    msg = aio_pika.Message(body, headers=broker_headers(), correlation_id="c", reply_to="r")
    dl = deadletters.describe(msg)
    assert dl.id.startswith("h:")
    assert dl.reason == "delivery_limit"
    assert dl.first_death_at == T0 - timedelta(minutes=5)
    assert dl.attempts is None
    assert dl.origin_queue == "ucan.invocations.retry.5s"
    assert [i.iss for i in dl.invocations] == [issuer.did]
    assert dl.invocations[0].customer == "did:mailto:example.com:carol"
    doc = dl.to_json(full=True)
    assert doc["commands"] == ["/customer/add"]
    assert doc["customers"] == ["did:mailto:example.com:carol"]
    assert doc["correlation_id"] == "c" and doc["reply_to"] == "r"
    headers = doc["headers"]
    assert isinstance(headers, dict)
    assert headers["x-death"][0]["time"] == "2026-11-01T12:00:00Z"


def test_describe_an_undecodable_body() -> None:
    msg = aio_pika.Message(b"\xffjunk", message_id="m", headers={topology.H_REASON: "undecodable"})
    dl = deadletters.describe(msg)
    assert dl.invocations == () and dl.decode_error
    assert dl.to_json()["invocation_cids"] == []


def test_selection() -> None:
    msg = aio_pika.Message(b"x", message_id="m-1", headers=broker_headers("delivery_limit"))
    dl = deadletters.describe(msg)
    assert deadletters.Selection().matches(dl)
    assert deadletters.Selection(ids=frozenset({"m-1", "m-2"})).matches(dl)
    assert not deadletters.Selection(ids=frozenset({"m-2"})).matches(dl)
    assert deadletters.Selection(reason="delivery-limit").matches(dl)  # - and _ alike
    assert deadletters.Selection(reason="DELIVERY_LIMIT").matches(dl)
    assert not deadletters.Selection(reason="rejected").matches(dl)
    assert deadletters.Selection(since=T0 - timedelta(minutes=5)).matches(dl)
    assert not deadletters.Selection(since=T0).matches(dl)
    unknown = deadletters.describe(aio_pika.Message(b"x", message_id="m"))
    assert not deadletters.Selection(since=T0).matches(unknown)
    assert deadletters.Selection(limit=2).full(2) and not deadletters.Selection(limit=2).full(1)
    assert not deadletters.Selection().full(10**6)


def test_parse_since() -> None:
    assert deadletters.parse_since(str(int(T0.timestamp()))) == T0
    assert deadletters.parse_since("2026-11-01T12:00:00Z") == T0
    assert deadletters.parse_since("2026-11-01T13:00:00+01:00") == T0
    assert deadletters.parse_since("2026-11-01 12:00:00") == T0  # naive means UTC
    with pytest.raises(ValueError, match="unix seconds or ISO 8601"):
        deadletters.parse_since("yesterday")


def test_replay_copy_strips_broker_headers_and_keeps_properties() -> None:
    headers: dict[str, Any] = {
        topology.H_REPLAY_COUNT: 2,
        topology.H_FIRST_ARRIVAL: 1,
        topology.H_ATTEMPT: 3,
        topology.H_REASON: "retries-exhausted",
        topology.H_ERROR: "database down",
        topology.H_DEAD_LETTERED_AT: 5,
        topology.H_ORIGIN_QUEUE: "ucan.invocations",
        replay.H_REPLAY_OF_DEATH: {"x-death": []},  # the previous replay's record
        **broker_headers(),
    }
    headers["x-last-death-reason"] = "delivery_limit"
    original = aio_pika.Message(
        b"body",
        headers=headers,
        message_id="m-1",
        correlation_id="c-1",
        reply_to="replies",
        timestamp=T0,
        content_type=topology.CONTENT_TYPE,
        user_id="hilt",
        expiration=5,
        type="t",
        app_id="hilt",
    )
    now = T0 + timedelta(hours=1)
    copy = replay.replay_copy(original, now=now, by="ops@host")
    assert copy.body == b"body"
    assert copy.message_id == "m-1" and copy.correlation_id == "c-1"
    assert copy.reply_to == "replies" and copy.timestamp == T0
    assert copy.content_type == topology.CONTENT_TYPE
    assert copy.type == "t" and copy.app_id == "hilt"
    assert copy.user_id is None and copy.expiration is None
    assert copy.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    h = copy.headers
    assert not [k for k in h if k.startswith("x-")]
    assert h["app"] == "kept" and h[topology.H_FIRST_ARRIVAL] == 1
    assert h[topology.H_REPLAY_COUNT] == 3
    assert h[topology.H_REPLAYED_AT] == int(now.timestamp())
    assert h[replay.H_REPLAYED_BY] == "ops@host"
    death = h[replay.H_REPLAY_OF_DEATH]
    assert isinstance(death, dict)
    assert set(death) == {
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-reason",
        topology.H_ATTEMPT,
        topology.H_REASON,
        topology.H_ERROR,
        topology.H_DEAD_LETTERED_AT,
        topology.H_ORIGIN_QUEUE,
    }
    assert death[topology.H_REASON] == "retries-exhausted"
    assert death["x-death"] == broker_headers()["x-death"]
    # a fresh retry budget, and no stale reason should it die again
    for gone in (topology.H_ATTEMPT, topology.H_REASON, topology.H_DEAD_LETTERED_AT):
        assert gone not in h
    # and a replayed message that dies again is described by its new death
    again = deadletters.describe(
        aio_pika.Message(b"b", headers={**h, **broker_headers("rejected")})
    )
    assert again.reason == "rejected" and again.replay_count == 3
    # a message that never died at the broker's hands carries no empty record
    plain = replay.replay_copy(aio_pika.Message(b"b"), now=now, by="x")
    assert replay.H_REPLAY_OF_DEATH not in plain.headers
    assert plain.headers[topology.H_REPLAY_COUNT] == 1


async def test_pacer_spaces_events() -> None:
    clock = [100.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    pacer = replay.Pacer(4.0, clock=lambda: clock[0], sleep=fake_sleep)
    for _ in range(3):
        await pacer.wait()
    assert slept == [0.25, 0.25]
    clock[0] += 10  # idle time does not buy a burst beyond one event
    await pacer.wait()
    await pacer.wait()
    assert slept == [0.25, 0.25, 0.25]
    with pytest.raises(ValueError):
        replay.Pacer(0)


def test_status_table() -> None:
    rows = [
        status.QueueStatus("q", "inbox", True, 12, 2),
        status.QueueStatus("q.retry.5s", "retry", True, 3, 0, max_age_seconds=5),
        status.QueueStatus("q.dlq", "dead-letter", True, 1, 0, oldest_age_seconds=7200),
        status.QueueStatus("q.receipts", "receipts", False, None, None),
    ]
    lines = status.format_status(rows).splitlines()
    assert lines[0].split() == ["QUEUE", "ROLE", "READY", "CONSUMERS", "OLDEST"]
    assert lines[1].split() == ["q", "inbox", "12", "2", "-"]
    assert lines[2].split() == ["q.retry.5s", "retry", "3", "0", "<=5s"]
    assert lines[3].split() == ["q.dlq", "dead-letter", "1", "0", "2h"]
    assert lines[4].split() == ["q.receipts", "receipts", "missing", "-", "-"]


def _rows(
    *, inbox: tuple[int, int] | None, dead: int | None, queue: str = "q"
) -> list[status.QueueStatus]:
    """Status rows: the inbox's (ready, consumers) and the DLQ's ready; None: missing."""
    return [
        status.QueueStatus(
            queue, "inbox", inbox is not None, *(inbox if inbox is not None else (None, None))
        ),
        status.QueueStatus(f"{queue}.retry.5s", "retry", True, 0, 0, max_age_seconds=5),
        status.QueueStatus(
            f"{queue}.dlq", "dead-letter", dead is not None, dead, None if dead is None else 0
        ),
        status.QueueStatus(f"{queue}.receipts", "receipts", True, 0, 0),
    ]


@pytest.mark.parametrize(
    ("inbox", "dead", "state", "message"),
    [
        ((0, 2), 0, "ready", "ready: 2 consumers on the inbox, no dead letters"),
        ((5, 1), 0, "ready", "ready: 1 consumer on the inbox, no dead letters"),
        ((0, 1), 3, "dead-letters", "3 dead letters waiting: forge-worker dlq list --queue q"),
        ((0, 1), 1, "dead-letters", "1 dead letter waiting: forge-worker dlq list --queue q"),
        ((0, 0), 0, "no-consumer", "no consumer on the inbox: start forge-worker run"),
        # no consumer comes first (nothing flows at all), and the dead letters are named too
        (
            (7, 0),
            2,
            "no-consumer",
            "no consumer on the inbox (7 requests waiting): start forge-worker run; "
            "2 dead letters waiting: forge-worker dlq list --queue q",
        ),
        # a missing queue comes before everything
        (None, 4, "missing", "missing: q not found"),
        ((0, 1), None, "missing", "missing: q.dlq not found"),
    ],
)
def test_status_verdict_and_its_priority(
    inbox: tuple[int, int] | None, dead: int | None, state: str, message: str
) -> None:
    found = status.verdict(_rows(inbox=inbox, dead=dead), "q")
    assert found.state == state
    assert found.message.startswith(message), found.message
    assert found.to_json() == {"state": state, "message": found.message}


def test_status_verdict_names_no_queue_flag_for_the_default_inbox() -> None:
    rows = _rows(inbox=(0, 1), dead=2, queue="ucan.invocations")
    assert status.verdict(rows, "ucan.invocations").message == (
        "2 dead letters waiting: forge-worker dlq list"
    )


def test_worker_queues_cover_inbox_retries_dlq_receipts() -> None:
    s = Settings(queue="in", receipt_queue="out", retry_delays=(1, 30))
    assert status.worker_queues(s) == [
        ("in", "inbox", None),
        ("in.retry.1s", "retry", 1.0),
        ("in.retry.30s", "retry", 30.0),
        ("in.dlq", "dead-letter", None),
        ("out", "receipts", None),
    ]


def test_redact_hides_the_password() -> None:
    from worker.amqp.connect import redact

    assert redact("amqp://u:secret@h:5672/v") == "amqp://u:***@h:5672/v"
    assert redact("amqp://h/") == "amqp://h/"
    assert redact("amqp://forge:s3cret@host:5672/") == "amqp://forge:***@host:5672/"


def _args(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["dlq", *argv])


def test_selection_usage_errors() -> None:
    assert isinstance(dlq._selection(_args("list")), deadletters.Selection)
    assert "say which" in str(dlq._selection(_args("replay")))
    assert "say which" in str(dlq._selection(_args("purge")))
    assert "--all" in str(dlq._selection(_args("replay", "--all", "--reason", "x")))
    assert "--since" in str(dlq._selection(_args("purge", "--since", "later")))
    assert "--limit" in str(dlq._selection(_args("replay", "--all", "--limit", "0")))
    sel = dlq._selection(_args("replay", "--id", "a", "b", "--limit", "3"))
    assert sel == deadletters.Selection(ids=frozenset({"a", "b"}), limit=3)


def test_purge_without_yes_off_a_tty_is_refused_before_connecting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_broker(url: str) -> None:
        raise AssertionError("must not connect")

    monkeypatch.setattr(dlq, "connect", no_broker)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    code = cli.main(["dlq", "purge", "--reason", "undecodable"])
    assert code == cli.EXIT_USAGE
    assert "--yes" in capsys.readouterr().err
    assert cli.main(["dlq", "replay"]) == cli.EXIT_USAGE


def test_format_dead_letters_lists_invocations() -> None:
    body, issuer = _request("did:mailto:example.com:dan")
    dl = deadletters.describe(aio_pika.Message(body, message_id="m-9", headers=broker_headers()))
    text = deadletters.format_dead_letters([dl])
    assert "m-9" in text and "delivery_limit" in text
    assert dl.invocations[0].cid in text and issuer.did in text
    assert "customer=did:mailto:example.com:dan" in text
    assert deadletters.format_dead_letters([]) == "no dead letters"
