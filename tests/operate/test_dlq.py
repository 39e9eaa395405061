"""Operator tools against the real broker and database: status, dlq list/show/replay/purge,
and the depth poller."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
import pytest

from worker import cli
from worker.amqp import topology
from worker.amqp.queues import queue_depths
from worker.config import Settings
from worker.operate import deadletters, purge, replay
from worker.service import store
from worker.service.depth import DepthPoller
from worker.service.metrics import Metrics
from worker.ucan import Signer, customer_add_args, decode_request, encode_container
from worker.ucan import encode_invocation as _encode_invocation

pytestmark = pytest.mark.integration

SERVICE = Signer.generate()


def request_body(customer: str, issuer: Signer | None = None) -> tuple[bytes, str, str]:
    """A /customer/add request: (body, invocation CID, issuer DID)."""
    who = issuer or Signer.generate()
    token = _encode_invocation(
        who,
        sub=SERVICE.did,
        cmd="/customer/add",
        args_raw=customer_add_args(customer, "did:web:product.example", {"plan": "free"}),
        exp=None,
    )
    body = encode_container([token])
    return body, str(decode_request(body).invocations[0].cid), who.did


@pytest.fixture
def settings(amqp_url: str, database_url: str, queue_name: str) -> Settings:
    return Settings(
        amqp_url=amqp_url,
        database_url=database_url,
        queue=queue_name,
        receipt_queue=f"{queue_name}.receipts",
        log_format="json",
    )


@pytest.fixture
async def channel(
    amqp: aio_pika.abc.AbstractRobustConnection, settings: Settings
) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A channel with the worker's topology declared."""
    ch = await amqp.channel()
    q = settings.queue
    await ch.declare_queue(
        topology.dead_letter_name(q), durable=True, arguments=topology.plain_quorum_arguments()
    )
    await ch.declare_queue(q, durable=True, arguments=topology.inbox_arguments(q))
    for delay in settings.retry_delays:
        await ch.declare_queue(
            topology.retry_name(q, delay),
            durable=True,
            arguments=topology.retry_arguments(q, delay),
        )
    await ch.declare_queue(
        settings.receipt_queue, durable=True, arguments=topology.plain_quorum_arguments()
    )
    yield ch
    await ch.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """The test's database, migrated (the audit table is the worker's)."""
    conn = await asyncpg.connect(database_url)
    await store.migrate(conn)
    yield conn
    await conn.close()


async def depth(conn: aio_pika.abc.AbstractConnection, queue: str) -> int:
    found = (await queue_depths(conn, [queue]))[queue]
    assert found is not None
    return found.ready


async def wait_depth(conn: aio_pika.abc.AbstractConnection, queue: str, n: int) -> None:
    """Dead-lettering by the broker is asynchronous: wait (bounded) until ``queue`` holds n."""
    deadline = time.monotonic() + 10
    while await depth(conn, queue) != n:
        assert time.monotonic() < deadline, f"{queue} never reached {n} messages"
        await asyncio.sleep(0.02)


async def dead_letter_by_worker(
    ch: aio_pika.abc.AbstractChannel,
    settings: Settings,
    body: bytes,
    *,
    reason: str,
    message_id: str | None,
    dead_at: int,
    attempt: int = 3,
) -> None:
    """What the worker publishes to the dead-letter queue."""
    await ch.default_exchange.publish(
        aio_pika.Message(
            body,
            message_id=message_id,
            correlation_id=f"corr-{message_id}",
            reply_to="hilt.replies",
            timestamp=datetime.fromtimestamp(dead_at - 60, UTC),
            content_type=topology.CONTENT_TYPE,
            headers={
                topology.H_REASON: reason,
                topology.H_ERROR: f"cannot finish: {reason}",
                topology.H_ATTEMPT: attempt,
                topology.H_FIRST_ARRIVAL: dead_at - 60,
                topology.H_DEAD_LETTERED_AT: dead_at,
                topology.H_ORIGIN_QUEUE: settings.queue,
            },
        ),
        routing_key=topology.dead_letter_name(settings.queue),
    )


async def dead_letter_by_broker(
    conn: aio_pika.abc.AbstractConnection,
    ch: aio_pika.abc.AbstractChannel,
    settings: Settings,
    body: bytes,
    *,
    message_id: str | None = None,
) -> str:
    """Through the broker's own route: the inbox rejects it without requeue. Returns the
    message_id (aiormq makes one up when none is given)."""
    dlq = topology.dead_letter_name(settings.queue)
    before = await depth(conn, dlq)
    await ch.default_exchange.publish(
        aio_pika.Message(body, message_id=message_id, correlation_id="c-broker", reply_to="r"),
        routing_key=settings.queue,
    )
    inbox = await ch.get_queue(settings.queue)
    msg = await inbox.get(timeout=5)
    assert msg.body == body
    await msg.reject(requeue=False)
    await wait_depth(conn, dlq, before + 1)
    assert msg.message_id is not None
    return msg.message_id


async def run_cli(*argv: str) -> int:
    """``forge-worker ARGV`` in a thread (it runs its own event loop)."""
    return await asyncio.to_thread(cli.main, list(argv))


@pytest.fixture(autouse=True)
def _broker_in_the_environment(monkeypatch: pytest.MonkeyPatch, amqp_url: str) -> None:
    """The broker URL holds a password, so the commands take it from the environment, as
    an operator gives it (a password in a flag is refused: ps shows it)."""
    monkeypatch.setenv("FORGE_WORKER_AMQP_URL", amqp_url)


def flags(settings: Settings) -> list[str]:
    """The test's own queues and database (its URL has no password) as flags."""
    return [
        "--database-url",
        settings.database_url,
        "--queue",
        settings.queue,
        "--receipt-queue",
        settings.receipt_queue,
    ]


async def drain(
    ch: aio_pika.abc.AbstractChannel, queue: str
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    q = await ch.get_queue(queue)
    out = []
    while (m := await q.get(fail=False, no_ack=True, timeout=5)) is not None:
        out.append(m)
    return out


@pytest.fixture
async def populated(
    amqp: aio_pika.abc.AbstractRobustConnection,
    channel: aio_pika.abc.AbstractChannel,
    settings: Settings,
) -> dict[str, Any]:
    """Three dead letters: two from the worker (one undecodable), one from the broker."""
    now = int(time.time())
    body_a, cid_a, iss_a = request_body("did:mailto:example.com:alice")
    body_b, cid_b, iss_b = request_body("did:mailto:example.com:bob")
    await dead_letter_by_worker(
        channel, settings, body_a, reason="retries-exhausted", message_id="m-a", dead_at=now - 3600
    )
    await dead_letter_by_worker(
        channel, settings, b"\x00not a ucan", reason="undecodable", message_id="m-u", dead_at=now
    )
    b_id = await dead_letter_by_broker(amqp, channel, settings, body_b)
    return {"a": (body_a, cid_a, iss_a), "b": (body_b, cid_b, iss_b), "now": now, "b_id": b_id}


async def test_list_shows_worker_and_broker_dead_letters(amqp, populated, settings, capsys) -> None:
    dlq = topology.dead_letter_name(settings.queue)
    assert await run_cli("dlq", "list", "--json", *flags(settings)) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["queue"] == dlq and doc["count"] == 3
    a, u, b = doc["dead_letters"]  # queue order

    _, cid_a, iss_a = populated["a"]
    assert a["id"] == "m-a"
    assert a["reason"] == "retries-exhausted"
    assert a["attempts"] == 3
    assert a["first_death_at"] == deadletters.iso(
        datetime.fromtimestamp(populated["now"] - 3600, UTC)
    )
    assert a["invocation_cids"] == [cid_a]
    assert a["issuers"] == [iss_a]
    assert a["commands"] == ["/customer/add"]
    assert a["customers"] == ["did:mailto:example.com:alice"]
    assert a["correlation_id"] == "corr-m-a" and a["reply_to"] == "hilt.replies"
    assert a["origin_queue"] == settings.queue

    assert u["id"] == "m-u" and u["reason"] == "undecodable"
    assert u["invocation_cids"] == [] and u["decode_error"]

    _, cid_b, iss_b = populated["b"]
    assert b["reason"] == "rejected"  # the broker's x-death
    # aiormq gives every publish a message_id, so the hash id is a unit test's matter
    assert b["id"] == b["message_id"] == populated["b_id"]
    assert b["first_death_at"] is not None
    assert b["invocation_cids"] == [cid_b] and b["issuers"] == [iss_b]
    assert b["customers"] == ["did:mailto:example.com:bob"]
    assert b["origin_queue"] == settings.queue

    # listing is non-destructive, keeps the order, and the hash id is stable
    assert await depth(amqp, dlq) == 3
    assert await run_cli("dlq", "list", "--json", *flags(settings)) == 0
    again = json.loads(capsys.readouterr().out)["dead_letters"]
    assert [d["id"] for d in again] == ["m-a", "m-u", b["id"]]

    # the table names them too; --limit and --reason narrow it
    assert await run_cli("dlq", "list", "--limit", "1", *flags(settings)) == 0
    out = capsys.readouterr().out
    assert "m-a" in out and cid_a in out and "m-u" not in out
    assert await run_cli("dlq", "list", "--json", "--reason", "rejected", *flags(settings)) == 0
    assert [d["id"] for d in json.loads(capsys.readouterr().out)["dead_letters"]] == [b["id"]]


async def test_show_decodes_one(amqp, populated, settings, capsys) -> None:
    assert await run_cli("dlq", "show", "m-a", "--json", *flags(settings)) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["id"] == "m-a" and doc["copies"] == 1
    assert doc["headers"][topology.H_REASON] == "retries-exhausted"
    assert doc["invocations"][0]["args"]["customer"] == "did:mailto:example.com:alice"
    assert doc["invocations"][0]["args"]["details"] == {"plan": "free"}
    assert await run_cli("dlq", "show", "nope", *flags(settings)) == 1
    assert "no dead letter 'nope'" in capsys.readouterr().err
    assert await depth(amqp, topology.dead_letter_name(settings.queue)) == 3


async def test_replay_moves_back_with_headers_and_audit(
    amqp, channel, populated, settings, db, capsys
) -> None:
    dlq = topology.dead_letter_name(settings.queue)
    listed = await deadletters.read_dead_letters(amqp, dlq)
    broker_id = listed[2].id
    code = await run_cli("dlq", "replay", "--id", "m-a", broker_id, "--json", *flags(settings))
    assert code == 0, capsys.readouterr().err
    doc = json.loads(capsys.readouterr().out)
    assert doc["replayed"] == 2 and doc["scanned"] == 3

    remaining = await deadletters.read_dead_letters(amqp, dlq)
    assert [d.id for d in remaining] == ["m-u"]
    moved = await drain(channel, settings.queue)
    assert [m.body for m in moved] == [populated["a"][0], populated["b"][0]]

    a, b = moved
    assert a.message_id == "m-a" and a.correlation_id == "corr-m-a"
    assert a.reply_to == "hilt.replies"
    assert a.timestamp == datetime.fromtimestamp(populated["now"] - 3600 - 60, UTC)
    assert a.content_type == topology.CONTENT_TYPE
    assert a.headers[topology.H_REPLAY_COUNT] == 1
    replayed_at = a.headers[topology.H_REPLAYED_AT]
    assert isinstance(replayed_at, int) and abs(replayed_at - time.time()) < 60
    assert a.headers[topology.H_FIRST_ARRIVAL] == populated["now"] - 3600 - 60  # kept
    assert topology.H_REASON not in a.headers and topology.H_ATTEMPT not in a.headers
    old_death: Any = a.headers[replay.H_REPLAY_OF_DEATH]
    assert old_death[topology.H_REASON] == "retries-exhausted"
    assert old_death[topology.H_ATTEMPT] == 3
    for m in moved:
        assert not any(k.startswith(("x-death", "x-first-", "x-last-")) for k in m.headers)
    # the broker's history is kept under a non-x name
    death: Any = b.headers[replay.H_REPLAY_OF_DEATH]
    assert death["x-first-death-reason"] == "rejected"
    assert death["x-death"][0]["queue"] == settings.queue
    assert b.correlation_id == "c-broker" and b.reply_to == "r"

    rows = await db.fetch("SELECT * FROM forge_worker.audit ORDER BY id")
    assert [r["action"] for r in rows] == ["replay", "replay"]
    assert rows[0]["message_id"] == "m-a"
    assert rows[0]["invocation_cids"] == [populated["a"][1]]
    assert rows[1]["message_id"] == broker_id == b.message_id
    assert rows[1]["invocation_cids"] == [populated["b"][1]]
    detail = json.loads(rows[1]["detail"])
    assert detail["id"] == broker_id and detail["reason"] == "rejected"
    assert detail["from"] == dlq and detail["to"] == settings.queue


async def test_replay_dry_run_moves_nothing(amqp, populated, settings, db, capsys) -> None:
    dlq = topology.dead_letter_name(settings.queue)
    assert await run_cli("dlq", "replay", "--all", "--dry-run", "--json", *flags(settings)) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["dry_run"] is True and doc["selected"] == 3 and doc["replayed"] == 0
    assert await depth(amqp, dlq) == 3
    assert await depth(amqp, settings.queue) == 0
    assert await db.fetchval("SELECT count(*) FROM forge_worker.audit") == 0


async def test_replay_filters_select(amqp, channel, populated, settings, db, capsys) -> None:
    dlq = topology.dead_letter_name(settings.queue)
    since = datetime.fromtimestamp(populated["now"] - 60, UTC).isoformat()
    args = ("dlq", "replay", "--dry-run", "--json", *flags(settings))
    assert await run_cli(*args, "--since", since) == 0
    picked = [d["id"] for d in json.loads(capsys.readouterr().out)["dead_letters"]]
    assert "m-a" not in picked and "m-u" in picked and len(picked) == 2
    assert await run_cli(*args, "--reason", "undecodable") == 0
    assert [d["id"] for d in json.loads(capsys.readouterr().out)["dead_letters"]] == ["m-u"]
    assert await run_cli(*args, "--all", "--limit", "2") == 0
    limited = json.loads(capsys.readouterr().out)
    assert [d["id"] for d in limited["dead_letters"]] == ["m-a", "m-u"]
    assert limited["scanned"] == 2  # stopped there: the third was never taken

    # for real, with a filter: only the selected one moves
    assert await run_cli("dlq", "replay", "--reason", "undecodable", *flags(settings)) == 0
    assert "replayed 1 of 3" in capsys.readouterr().out
    assert [m.message_id for m in await drain(channel, settings.queue)] == ["m-u"]
    # (the limited dry run put m-a behind the broker's dead letter: returns join the tail)
    assert sorted(d.id for d in await deadletters.read_dead_letters(amqp, dlq)) == sorted(
        ["m-a", picked[1]]
    )
    # usage errors: nothing selected, or --all with a filter
    assert await run_cli("dlq", "replay", *flags(settings)) == 2
    assert await run_cli("dlq", "replay", "--all", "--id", "m-a", *flags(settings)) == 2
    assert await run_cli("dlq", "replay", "--since", "yesterday", *flags(settings)) == 2
    assert await depth(amqp, dlq) == 2


async def test_replay_into_a_missing_inbox_keeps_everything(
    amqp, channel, populated, settings, db, capsys
) -> None:
    await channel.queue_delete(settings.queue)
    assert await run_cli("dlq", "replay", "--all", *flags(settings)) == 1
    assert "no such queue" in capsys.readouterr().err
    assert await depth(amqp, topology.dead_letter_name(settings.queue)) == 3


class _FailingAudit:
    """An audit trail that breaks on its n-th row, as a crash between confirm and ack would."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at
        self.rows: list[str] = []

    async def record(self, action: str, dl: deadletters.DeadLetter, detail: Any) -> None:
        if len(self.rows) + 1 == self.fail_at:
            raise ConnectionResetError("database went away")
        self.rows.append(dl.id)


async def _where(amqp, channel, settings) -> tuple[list[bytes], list[bytes]]:
    dlq = [
        d.body
        for d in await deadletters.read_dead_letters(
            amqp, topology.dead_letter_name(settings.queue)
        )
    ]
    inbox = [m.body for m in await drain(channel, settings.queue)]
    return dlq, inbox


async def test_replay_interrupted_after_confirm_never_loses(
    amqp, channel, populated, settings
) -> None:
    everything = {populated["a"][0], populated["b"][0], b"\x00not a ucan"}
    audit = _FailingAudit(fail_at=2)
    with pytest.raises(ConnectionResetError):
        await replay.replay(
            amqp,
            dead_letter_queue=topology.dead_letter_name(settings.queue),
            inbox=settings.queue,
            selection=deadletters.Selection(),
            audit=audit,  # type: ignore[arg-type]
        )
    dlq, inbox = await _where(amqp, channel, settings)
    assert audit.rows == ["m-a"]
    assert set(dlq) | set(inbox) == everything
    # the first moved; the second is in both (a duplicate the ledger absorbs); the third stayed
    assert inbox == [populated["a"][0], b"\x00not a ucan"]
    assert sorted(dlq) == sorted([b"\x00not a ucan", populated["b"][0]])


async def test_replay_killed_midway_never_loses(amqp, channel, populated, settings, db) -> None:
    """SIGKILL the real command between two moves: each message is in the DLQ or the inbox."""
    everything = {populated["a"][0], populated["b"][0], b"\x00not a ucan"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli",
        "dlq",
        "replay",
        "--all",
        "--rate",
        "0.5",  # two seconds between moves: killed in that gap
        *flags(settings),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_depth(amqp, settings.queue, 1)
    finally:
        proc.kill()
        await proc.wait()
    # the broker returns what the dead connection held, in its own time; a kill between the
    # first move's confirm and its ack returns that message too (in both places: at least
    # once, and the ledger answers a repeat byte for byte), so the DLQ holds 2 or 3
    dead = topology.dead_letter_name(settings.queue)
    deadline = time.monotonic() + 10
    while await depth(amqp, dead) < 2:
        assert time.monotonic() < deadline, f"{dead} never got its messages back"
        await asyncio.sleep(0.02)
    dlq, inbox = await _where(amqp, channel, settings)
    assert set(dlq) | set(inbox) == everything
    assert inbox == [populated["a"][0]]
    assert sorted(set(dlq) - {populated["a"][0]}) == sorted(everything - {populated["a"][0]})


async def test_replay_cancelled_midway_never_loses(amqp, channel, populated, settings) -> None:
    """Ctrl-C (a cancellation) right after a move stops the replay and loses nothing."""
    everything = {populated["a"][0], populated["b"][0], b"\x00not a ucan"}
    first_moved = asyncio.Event()
    task = asyncio.create_task(
        replay.replay(
            amqp,
            dead_letter_queue=topology.dead_letter_name(settings.queue),
            inbox=settings.queue,
            selection=deadletters.Selection(),
            audit=None,
            on_moved=lambda _: first_moved.set(),
        )
    )
    await first_moved.wait()
    task.cancel()  # lands in the next basic.get
    with pytest.raises(asyncio.CancelledError):
        await task
    dlq, inbox = await _where(amqp, channel, settings)
    assert set(dlq) | set(inbox) == everything
    assert inbox == [populated["a"][0]]
    assert len(dlq) == 2


async def test_purge_filters_confirmation_and_audit(amqp, populated, settings, db, capsys) -> None:
    dlq = topology.dead_letter_name(settings.queue)
    # non-interactive (pytest's stdin is not a TTY) and no --yes: refused, nothing touched
    assert await run_cli("dlq", "purge", "--reason", "undecodable", *flags(settings)) == 2
    assert "--yes" in capsys.readouterr().err
    assert await depth(amqp, dlq) == 3

    code = await run_cli(
        "dlq", "purge", "--reason", "undecodable", "--yes", "--json", *flags(settings)
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out)["purged"] == 1
    assert [d.id for d in await deadletters.read_dead_letters(amqp, dlq)] == [
        "m-a",
        populated["b_id"],
    ]
    assert await depth(amqp, dlq) == 2
    rows = await db.fetch("SELECT action, message_id, detail FROM forge_worker.audit")
    assert [(r["action"], r["message_id"]) for r in rows] == [("purge", "m-u")]
    assert json.loads(rows[0]["detail"])["reason"] == "undecodable"

    # an operator who says no keeps everything
    async def no(_: list[deadletters.DeadLetter]) -> bool:
        return False

    result = await purge.purge(
        amqp, dead_letter_queue=dlq, selection=deadletters.Selection(), audit=None, confirm=no
    )
    assert len(result.selected) == 2 and result.done == 0
    assert await depth(amqp, dlq) == 2

    assert await run_cli("dlq", "purge", "--all", "--yes", *flags(settings)) == 0
    assert await depth(amqp, dlq) == 0
    assert await db.fetchval("SELECT count(*) FROM forge_worker.audit") == 3


class _Terminal(io.StringIO):
    """Standard input as a terminal where the operator types ``answer``."""

    def isatty(self) -> bool:
        return True


async def test_purge_all_asks_first_and_needs_yes_without_a_terminal(
    amqp, populated, settings, db, capsys, monkeypatch
) -> None:
    """CONTRACT §7: --all is no answer to the question; only --yes is."""
    dlq = topology.dead_letter_name(settings.queue)
    # no terminal (pytest's stdin) and no --yes: refused, nothing touched
    assert await run_cli("dlq", "purge", "--all", *flags(settings)) == 2
    assert "--yes" in capsys.readouterr().err
    assert await depth(amqp, dlq) == 3
    # on a terminal the operator is shown them and asked; "n" keeps them all
    monkeypatch.setattr("sys.stdin", _Terminal("n\n"))
    assert await run_cli("dlq", "purge", "--all", *flags(settings)) == 1
    err = capsys.readouterr().err
    assert "delete these 3 dead letters" in err and "m-a" in err
    assert await depth(amqp, dlq) == 3
    assert await db.fetchval("SELECT count(*) FROM forge_worker.audit") == 0
    # "y" deletes them
    monkeypatch.setattr("sys.stdin", _Terminal("y\n"))
    assert await run_cli("dlq", "purge", "--all", *flags(settings)) == 0
    assert await depth(amqp, dlq) == 0
    assert await db.fetchval("SELECT count(*) FROM forge_worker.audit") == 3


async def test_status_reports_real_depths(amqp, channel, settings, capsys) -> None:
    now = int(time.time())
    # the oldest is not at the head: the whole (small) DLQ is read for its age
    for mid, age in (("s-1", 100), ("s-2", 500), ("s-3", 10)):
        await dead_letter_by_worker(
            channel, settings, b"x", reason="undecodable", message_id=mid, dead_at=now - age
        )
    for i in range(2):
        await channel.default_exchange.publish(
            aio_pika.Message(b"m%d" % i), routing_key=settings.queue
        )
    retry = topology.retry_name(settings.queue, settings.retry_delays[-1])
    await channel.default_exchange.publish(aio_pika.Message(b"r"), routing_key=retry)
    consumer_ch = await amqp.channel()
    receipts = await consumer_ch.get_queue(settings.receipt_queue)

    async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        return None

    await receipts.consume(ignore)

    assert await run_cli("status", "--json", *flags(settings)) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {q["name"]: q for q in doc["queues"]}
    dlq = topology.dead_letter_name(settings.queue)
    assert rows[settings.queue]["role"] == "inbox"
    assert rows[settings.queue]["ready"] == 2 and rows[settings.queue]["consumers"] == 0
    assert rows[retry]["ready"] == 1 and rows[retry]["max_age_seconds"] == settings.retry_delays[-1]
    assert rows[dlq]["ready"] == 3
    assert 500 <= rows[dlq]["oldest_age_seconds"] < 560
    assert rows[settings.receipt_queue]["consumers"] == 1
    assert len(rows) == 3 + len(settings.retry_delays)
    # nobody consumes the inbox: that comes first, and the dead letters are named too
    assert doc["verdict"]["state"] == "no-consumer"
    assert doc["verdict"]["message"] == (
        "no consumer on the inbox (2 requests waiting): start forge-worker run; "
        f"3 dead letters waiting: forge-worker dlq list --queue {settings.queue}"
    )
    # reading them put them all back, in their order
    assert [d.id for d in await deadletters.read_dead_letters(amqp, dlq)] == ["s-1", "s-2", "s-3"]

    assert await run_cli("status", *flags(settings)) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["QUEUE", "ROLE", "READY", "CONSUMERS", "OLDEST"]
    assert table[1].split()[:4] == [settings.queue, "inbox", "2", "0"]
    assert table[-1] == doc["verdict"]["message"] and table[-2] == ""
    await consumer_ch.close()


async def test_status_marks_missing_queues(amqp_url, queue_name, capsys) -> None:
    receipts = f"{queue_name}.receipts"
    args = (
        "status",
        "--json",
        "--queue",
        queue_name,
        "--receipt-queue",
        receipts,
    )
    assert await run_cli(*args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert all(q["exists"] is False and q["ready"] is None for q in doc["queues"])
    assert doc["verdict"]["state"] == "missing"
    assert doc["verdict"]["message"].startswith(
        f"missing: {queue_name} and {queue_name}.dlq not found"
    )


async def test_status_without_broker_exits_3_with_one_line(capsys, monkeypatch) -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("FORGE_WORKER_AMQP_URL", f"amqp://guest:secret@127.0.0.1:{port}/")
    assert await run_cli("status") == 3
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot reach the broker" in err
    assert "secret" not in err


async def test_depth_poller_sets_gauges(amqp, channel, settings) -> None:
    metrics = Metrics()
    for i in range(3):
        await channel.default_exchange.publish(
            aio_pika.Message(b"%d" % i), routing_key=settings.queue
        )
    dlq = topology.dead_letter_name(settings.queue)
    await channel.default_exchange.publish(aio_pika.Message(b"d"), routing_key=dlq)
    poller = DepthPoller.for_settings(amqp, settings, metrics, interval=3600)
    assert poller.queues == [
        settings.queue,
        *topology.retry_names(settings.queue, settings.retry_delays),
        dlq,
    ]

    def value(name: str, queue: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"queue": queue})

    async with poller:
        await poller.wait_rounds(1)
    assert poller.last_error is None
    assert value("forge_worker_queue_depth", settings.queue) == 3
    assert value("forge_worker_queue_depth", dlq) == 1
    assert value("forge_worker_queue_consumers", settings.queue) == 0
    assert value("forge_worker_queue_depth", topology.retry_name(settings.queue, 1)) == 0

    # a queue that disappears loses its series instead of showing a stale number
    await channel.queue_delete(dlq)
    await poller.poll_once()
    assert value("forge_worker_queue_depth", dlq) is None
    assert value("forge_worker_queue_depth", settings.queue) == 3


async def test_replay_without_the_database_moves_nothing_and_exits_3(
    amqp, populated, settings, capsys
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = flags(settings)
    args[args.index("--database-url") + 1] = f"postgresql://postgres@127.0.0.1:{port}/x"
    assert await run_cli("dlq", "replay", "--all", *args) == 3
    assert "cannot reach the database" in capsys.readouterr().err
    assert await depth(amqp, topology.dead_letter_name(settings.queue)) == 3
    assert await depth(amqp, settings.queue) == 0
    # a dry run needs no database
    assert await run_cli("dlq", "replay", "--all", "--dry-run", *args) == 0


def _error(poller: DepthPoller) -> BaseException | None:
    return poller.last_error  # read afresh (mypy would keep an earlier narrowing)


async def test_depth_poller_survives_a_broker_cut(amqp_url, channel, settings) -> None:
    from urllib.parse import urlsplit

    from tests.support.proxy import Proxy

    port = urlsplit(amqp_url).port
    assert port is not None
    metrics = Metrics()
    await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key=settings.queue)
    async with Proxy(port) as proxy:
        conn = await aio_pika.connect_robust(proxy.url(amqp_url), reconnect_interval=0.1)
        reconnected = asyncio.Event()
        conn.reconnect_callbacks.add(lambda *_: reconnected.set())
        try:
            async with DepthPoller(conn, [settings.queue], metrics, interval=0.05) as poller:
                await poller.wait_rounds(1)
                assert poller.last_error is None
                proxy.refuse()
                proxy.cut()
                failed = poller.rounds
                await poller.wait_rounds(failed + 2)
                assert _error(poller) is not None  # skipped, not crashed
                await channel.default_exchange.publish(
                    aio_pika.Message(b"y"), routing_key=settings.queue
                )
                proxy.accept()
                async with asyncio.timeout(10):
                    await reconnected.wait()
                    while _error(poller) is not None:
                        await poller.wait_rounds(poller.rounds + 1)
            sample = metrics.registry.get_sample_value
            assert sample("forge_worker_queue_depth", {"queue": settings.queue}) == 2
        finally:
            await conn.close()


async def test_a_dead_letter_the_broker_made_says_the_brokers_reason_not_a_publishers(
    amqp: aio_pika.abc.AbstractRobustConnection, queue_name: str
) -> None:
    """The broker dead-letters a message at its delivery limit as it is: the worker's own
    headers on it are the publisher's, so the reason, time, attempts and error come from
    the broker's x-death."""
    inbox, dlq = queue_name, topology.dead_letter_name(queue_name)
    ch = await amqp.channel()
    await ch.declare_queue(dlq, durable=True, arguments=topology.plain_quorum_arguments())
    q = await ch.declare_queue(
        inbox, durable=True, arguments=topology.inbox_arguments(inbox, delivery_limit=1)
    )
    forged: dict[str, Any] = {
        topology.H_REASON: "forged",
        topology.H_DEAD_LETTERED_AT: 1,
        topology.H_ATTEMPT: 99,
        topology.H_ERROR: "forged",
    }
    await ch.default_exchange.publish(aio_pika.Message(b"x", headers=forged, message_id="m"), inbox)
    for _ in range(2):  # given back twice: past the limit of 1, the broker dead-letters it
        msg = await q.get(timeout=5)
        await msg.nack(requeue=True)
    found: list[deadletters.DeadLetter] = []
    async with asyncio.timeout(10):
        while not found:  # the broker's dead-lettering is asynchronous and says nothing
            found = await deadletters.read_dead_letters(amqp, dlq)
    [dead] = found
    assert dead.reason == "delivery_limit"
    assert dead.first_death_at is not None and dead.first_death_at.timestamp() > 1
    assert dead.attempts is None and dead.error is None
    await ch.close()
