"""The receipt ledger's statements and the pool, against the real Postgres."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from worker.commands import customer_add
from worker.commands.customer_add import AddArguments
from worker.service import store


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await store.create_pool(database_url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await store.migrate(conn)
            await conn.reset()
        yield pool
    finally:
        await pool.close()


async def test_claim_inserts_new_tasks_and_returns_what_the_ledger_held(
    pool: asyncpg.Pool,
) -> None:
    async with pool.acquire() as conn:
        inserted, held = await store.claim_receipts(conn, [("t1", "i1", b"first")])
        assert (inserted, held) == ({"t1"}, {})
        stored_at = (await store.stored_receipts(conn, ["t1"]))["t1"][1]

        # one round trip: t1 is held (its stored bytes, not the new ones), t2 is inserted
        inserted, held = await store.claim_receipts(
            conn, [("t1", "i1-again", b"second"), ("t2", "i2", b"other")]
        )
        assert inserted == {"t2"}
        assert held == {"t1": (b"first", stored_at)}
        ledger = await store.stored_receipts(conn, ["t1", "t2"])
        assert {t: r for t, (r, _) in ledger.items()} == {"t1": b"first", "t2": b"other"}
        assert await store.claim_receipts(conn, []) == (set(), {})


async def test_a_task_another_transaction_commits_meanwhile_is_in_neither_result(
    pool: asyncpg.Pool,
) -> None:
    """The race the consumer answers with a second read (``stored_receipts``)."""
    async with pool.acquire() as other, pool.acquire() as conn:
        tx = other.transaction()
        await tx.start()
        await store.claim_receipts(other, [("t1", "i1", b"theirs")])
        async with conn.transaction():
            claim = asyncio.create_task(store.claim_receipts(conn, [("t1", "i1", b"ours")]))
            # the insert waits on the other transaction's row lock (Postgres has no event
            # for that: pg_stat_activity shows it), bounded by the test timeout
            while not await _waiting_for_a_lock(other):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            assert not claim.done()
            await tx.commit()
            inserted, held = await claim
            assert (inserted, held) == (set(), {})
            assert (await store.stored_receipts(conn, ["t1"]))["t1"][0] == b"theirs"


async def _waiting_for_a_lock(conn: asyncpg.Connection) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
    )


async def test_the_pool_still_rolls_back_what_a_released_connection_left_open(
    pool: asyncpg.Pool,
) -> None:
    # the pool's reset skips RESET ALL & co. (one round trip a batch); an open transaction
    # is still rolled back on release, so nothing uncommitted leaks to the next user
    conn = await pool.acquire()
    await conn.execute("BEGIN")
    await store.claim_receipts(conn, [("t1", "i1", b"uncommitted")])
    await pool.release(conn)
    async with pool.acquire() as again:
        assert not again.is_in_transaction()
        assert await store.stored_receipts(again, ["t1"]) == {}


async def customers(conn: asyncpg.Connection) -> dict[str, tuple[str, str | None, str | None]]:
    rows = await conn.fetch("SELECT customer, product, external_account, details FROM customer")
    return {r["customer"]: (r["product"], r["external_account"], r["details"]) for r in rows}


def ledger_row(task: str) -> tuple[str, str, bytes]:
    return (task, f"inv-{task}", f"receipt-{task}".encode())


async def test_the_effect_applies_the_claimed_tasks_once_each_as_in_message_order(
    pool: asyncpg.Pool,
) -> None:
    a = AddArguments("did:plc:b", "did:web:p1", {"k": "1"}, "acct-1")
    b = AddArguments("did:plc:b", "did:web:p2", {}, None)  # keeps acct-1, empties details
    c = AddArguments("did:plc:a", "did:web:p3", {}, "acct-3")
    stored = AddArguments("did:plc:b", "did:web:stored", {"k": "s"}, "acct-s")
    items = [("t0", stored), ("t1", a), ("t2", b), ("t3", c)]
    effect = [(customer_add.EFFECTS, customer_add.effect_args(items))]
    async with pool.acquire() as conn:
        await store.claim_receipts(conn, [ledger_row("t0")])  # t0 answered before
        inserted, held = await store.claim_receipts(
            conn, [ledger_row(t) for t, _ in sorted(items)], effect
        )
        assert inserted == {"t1", "t2", "t3"} and set(held) == {"t0"}
        assert await customers(conn) == {
            "did:plc:a": ("did:web:p3", "acct-3", None),
            "did:plc:b": ("did:web:p2", "acct-1", None),
        }

        # a later batch: a given externalAccount replaces, details are replaced, and a
        # task already in the ledger (t1 again) takes no effect
        d = AddArguments("did:plc:b", "did:web:p4", {"k": "4"}, "acct-4")
        items = [("t4", d), ("t1", a)]
        effect = [(customer_add.EFFECTS, customer_add.effect_args(items))]
        inserted, held = await store.claim_receipts(
            conn, [ledger_row(t) for t, _ in sorted(items)], effect
        )
        assert inserted == {"t4"} and set(held) == {"t1"}
        assert (await customers(conn))["did:plc:b"] == ("did:web:p4", "acct-4", '{"k": "4"}')


def test_effects_are_numbered_after_the_ledger_parameters() -> None:
    query = store.claim_statement(
        [(["SELECT {0}, {1}", "SELECT {1}"], [1, 2]), (["SELECT {0}"], [3])]
    )
    assert "effect_0_0 AS (SELECT $4, $5)" in query and "effect_0_1 AS (SELECT $5)" in query
    assert "effect_1_0 AS (SELECT $6)" in query
