"""A lost database: a batch waits for it (bounded) and tries once more, instead of spending
a retry attempt at once. Pure unit: a fake pool and a fake ping stand in for Postgres (the
fault tests prove the same on the real one)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
import structlog

from worker.config import Settings
from worker.service import consumer as consumer_mod
from worker.service import store as store_mod
from worker.service.consumer import Consumer
from worker.service.jobs import Item, Job
from worker.service.metrics import Metrics
from worker.ucan import Signer


class FlakyPool:
    """``acquire()`` fails while ``down``; counts the transactions it let through."""

    def __init__(self) -> None:
        self.down = True
        self.transactions = 0
        self.refused = asyncio.Event()

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        if self.down:
            self.refused.set()
            raise ConnectionRefusedError("connection refused")
        yield SimpleNamespace()


def make(pool: FlakyPool, monkeypatch: pytest.MonkeyPatch, hold: float) -> Consumer:
    c = Consumer(
        Settings(),
        broker=None,  # type: ignore[arg-type]  # not reached by _store
        pool=pool,
        signer=Signer.generate(),
        metrics=Metrics(),
        log=structlog.get_logger(),
        db_hold=hold,
    )

    async def transaction(conn: Any, live: Any, arrivals: Any, now: float) -> None:
        pool.transactions += 1

    monkeypatch.setattr(c, "_write", transaction)
    monkeypatch.setattr(store_mod, "ping", lambda _pool: _answer(not pool.down))
    return c


async def _answer(value: bool) -> bool:
    return value


def batch() -> list[Item]:
    msg: Any = SimpleNamespace(redelivered=False, headers={}, body=b"")
    return [Item(msg, channel=None, received=0.0, jobs=[Job(inv=SimpleNamespace())])]  # type: ignore[arg-type]


async def test_the_batch_waits_for_the_database_and_is_not_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = FlakyPool()
    c = make(pool, monkeypatch, hold=30)
    items = batch()
    store = asyncio.create_task(c._store(items, now=0.0))
    await asyncio.wait_for(pool.refused.wait(), timeout=10)  # the first try failed
    assert not c._db.up.is_set() and not store.done() and pool.transactions == 0
    pool.down = False  # the next ping answers
    await asyncio.wait_for(store, timeout=10)
    assert pool.transactions == 1
    assert items[0].failure is None  # no retry attempt spent


async def test_a_database_away_longer_than_the_hold_sends_the_batch_to_a_retry_tier(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = FlakyPool()
    c = make(pool, monkeypatch, hold=0.2)
    items = batch()
    await asyncio.wait_for(c._store(items, now=0.0), timeout=10)
    assert pool.transactions == 0
    assert (items[0].failure, items[0].reason) == ("transient", "database")
    assert "unreachable" in items[0].error
    # no broker here to stop: cancel the watcher, which is still pinging
    assert c._db.watch is not None
    await c._db.stop()


def delivery(size: int, n: int) -> Item:
    msg: Any = SimpleNamespace(redelivered=False, headers={}, body=bytes(size), n=n)
    return Item(msg, channel=None, received=0.0)


def _n(item: Item) -> int:
    n: int = getattr(item.msg, "n")  # noqa: B009 - set by delivery(), unknown to the type
    return n


async def test_a_batch_is_bounded_by_body_bytes_and_keeps_delivery_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Decoded CBOR can take tens of times its size: what one batch decodes is capped by
    bytes as well as by count, always at least one message, never reordering."""
    c = make(FlakyPool(), monkeypatch, hold=1)
    big = consumer_mod.MAX_BATCH_BYTES // 3 + 1  # three of these do not fit in one batch
    sizes = [big, big, big, 10, big * 3, 10, 10]
    for n, size in enumerate(sizes):
        c._buffer.append(delivery(size, n))
    batches = [await c.next_batch() for _ in range(4)]
    assert [[_n(i) for i in b] for b in batches] == [[0, 1], [2, 3], [4], [5, 6]]
    assert all(
        sum(len(i.msg.body) for i in b) <= consumer_mod.MAX_BATCH_BYTES or len(b) == 1
        for b in batches
    )
    assert c._carry is None and not c._buffer


def _arrived(n: int) -> Item:
    msg: Any = SimpleNamespace(redelivered=False, headers={}, body=b"x", n=n)
    return Item(msg, channel=None, received=time.monotonic())


async def test_the_next_batch_forms_at_once_when_idle_or_full_else_after_the_batch_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(consumer_mod, "BATCH_WAIT", 0.2)
    c = make(FlakyPool(), monkeypatch, hold=1)
    # nothing in flight: a lone delivery goes at once
    c._buffer.append(_arrived(0))
    await asyncio.wait_for(c._batch_ready(), timeout=0.1)
    assert len(c._take()) == 1

    in_flight: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    c._batches.add(in_flight)  # type: ignore[arg-type]  # stands in for a batch task
    # a batch in flight and a full batch waiting: at once
    for n in range(c._fill):
        c._buffer.append(_arrived(n))
    await asyncio.wait_for(c._batch_ready(), timeout=0.1)
    assert len(c._take()) == c._fill

    # a batch in flight that is still storing, and one delivery: it waits for company,
    # BATCH_WAIT at most
    c._preparing = 1
    c._buffer.append(_arrived(0))
    started = time.monotonic()
    waiting = asyncio.create_task(c._batch_ready())
    await asyncio.sleep(0)
    c._buffer.append(_arrived(1))  # company that does not fill the batch
    await asyncio.wait_for(waiting, timeout=5)
    assert time.monotonic() - started >= 0.2
    assert [_n(i) for i in c._take()] == [0, 1]
    in_flight.cancel()


async def test_the_next_batch_goes_at_once_once_the_batches_in_flight_have_stored_their_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under a moderate load a delivery does not wait for the batch ahead of it to be
    confirmed: once every batch in flight has stored its work, the next one forms."""
    monkeypatch.setattr(consumer_mod, "BATCH_WAIT", 5.0)  # longer than any wait below
    c = make(FlakyPool(), monkeypatch, hold=1)
    in_flight: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    c._batches.add(in_flight)  # type: ignore[arg-type]  # stands in for a batch task

    # the batch in flight is still storing: a delivery waits, and goes when it has stored
    stored = asyncio.Event()

    async def store(batch: list[Item], now: float) -> None:
        await stored.wait()

    monkeypatch.setattr(c, "_store", store)
    storing = asyncio.create_task(c._prepare([], 0.0))
    await asyncio.sleep(0)
    assert c._preparing == 1
    c._buffer.append(_arrived(0))
    for tag in (1, 2):  # the delivery and the batch in flight, unacked (as deliver() tracks)
        c._acks.received(None, tag)
    waiting = asyncio.create_task(c._batch_ready())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    stored.set()
    await asyncio.wait_for(waiting, timeout=1)
    await storing
    assert c._preparing == 0
    assert [_n(i) for i in c._take()] == [0]

    # the batch in flight has stored its work, but the window is more than half full (a
    # backlog): a delivery waits for company rather than go in a small batch
    c._buffer.append(_arrived(1))
    for tag in range(3, c._light + 2):  # the prefetch window more than half full
        c._acks.received(None, tag)
    waiting = asyncio.create_task(c._batch_ready())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting

    # a failure while preparing does not leave the next batch waiting
    async def broken(batch: list[Item], now: float) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(c, "_store", broken)
    with pytest.raises(RuntimeError):
        await c._prepare([], 0.0)
    assert c._preparing == 0
    in_flight.cancel()
