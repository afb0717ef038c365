"""The execution event log: per-execution sequence numbers and NOTIFY delivered at commit only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from uuid import UUID

import asyncpg
import pytest

from opsconductor.lifecycle.storage.db import connect
from opsconductor.lifecycle.storage.events import EVENTS_CHANNEL, append_event

TENANT = "tenant-events"


async def _new_execution(pool: asyncpg.Pool, idempotency_key: str = "e" * 64) -> UUID:
    execution_id: UUID = await pool.fetchval(
        """
        INSERT INTO executions (tenant_id, actor_id, idempotency_key, plan_hash, plan_snapshot,
            plan_snapshot_hash, execution_mode, sla_class, action_class, timeout_ms)
        VALUES ($1, 'alice', $2, $3, $4, $5, 'immediate', 'fast', 'read', 10000)
        RETURNING id
        """,
        TENANT,
        idempotency_key,
        "a" * 64,
        {"name": "events", "steps": []},
        "b" * 64,
    )
    return execution_id


async def _seqs(pool: asyncpg.Pool, execution_id: UUID) -> list[int]:
    rows = await pool.fetch(
        "SELECT seq FROM execution_events WHERE execution_id = $1 ORDER BY seq", execution_id
    )
    return [row["seq"] for row in rows]


class Listener:
    """A LISTENing session whose notifications land in a queue, in delivery order."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.received: asyncio.Queue[str] = asyncio.Queue()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.received.put_nowait(payload)

    async def next(self) -> str:
        return await asyncio.wait_for(self.received.get(), timeout=10)


@pytest.fixture
async def listener(db_dsn: str) -> AsyncIterator[Listener]:
    conn = await connect(db_dsn)
    listener = Listener(conn)
    await conn.add_listener(EVENTS_CHANNEL, listener._on_notify)
    try:
        yield listener
    finally:
        await conn.close()


async def _send_marker(pool: asyncpg.Pool, marker: str) -> None:
    """Commit a NOTIFY of our own on the channel.

    Postgres delivers notifications in commit order, so once the marker arrives, anything
    committed before it has arrived too: a notification not seen by then was not sent.
    """
    await pool.execute("SELECT pg_notify($1, $2)", EVENTS_CHANNEL, marker)


async def test_sequence_is_gapless_and_unique_under_20_concurrent_appenders(
    db_pool: asyncpg.Pool,
) -> None:
    execution_id = await _new_execution(db_pool)
    appenders = 20
    # Every appender holds an open transaction before any of them appends: they really contend
    # for the execution row that hands out the sequence numbers.
    all_open = asyncio.Barrier(appenders)

    async def append(index: int) -> int:
        async with db_pool.acquire() as conn, conn.transaction():
            await all_open.wait()
            return await append_event(
                conn,
                tenant_id=TENANT,
                execution_id=execution_id,
                actor_id="worker",
                type="step_progress",
                payload={"appender": index},
            )

    returned = await asyncio.gather(*(append(i) for i in range(appenders)))
    assert sorted(returned) == list(range(1, appenders + 1))
    assert await _seqs(db_pool, execution_id) == list(range(1, appenders + 1))
    assert (
        await db_pool.fetchval("SELECT event_seq FROM executions WHERE id = $1", execution_id)
        == appenders
    )


async def test_each_execution_has_its_own_sequence(db_pool: asyncpg.Pool) -> None:
    first = await _new_execution(db_pool, "1" * 64)
    second = await _new_execution(db_pool, "2" * 64)
    async with db_pool.acquire() as conn:
        for execution_id in (first, second, first, second, first):
            await append_event(
                conn,
                tenant_id=TENANT,
                execution_id=execution_id,
                actor_id=None,
                type="tick",
                payload={},
            )
    assert await _seqs(db_pool, first) == [1, 2, 3]
    assert await _seqs(db_pool, second) == [1, 2]


async def test_event_without_execution_gets_seq_0(
    db_pool: asyncpg.Pool, listener: Listener
) -> None:
    async with db_pool.acquire() as conn:
        seqs = [
            await append_event(
                conn,
                tenant_id=TENANT,
                execution_id=None,
                actor_id="mallory",
                type="rbac_violation",
                payload={"permission": "execution.submit"},
            )
            for _ in range(2)
        ]
    assert seqs == [0, 0]
    rows = await db_pool.fetch(
        "SELECT id, seq, execution_id, actor_id, payload FROM execution_events ORDER BY id"
    )
    assert [(r["seq"], r["execution_id"], r["actor_id"]) for r in rows] == [
        (0, None, "mallory"),
        (0, None, "mallory"),
    ]
    assert rows[0]["payload"] == {"permission": "execution.submit"}
    # Listeners of events with no execution learn the event id instead of a sequence number.
    assert [await listener.next(), await listener.next()] == [f":{r['id']}" for r in rows]


async def test_notify_reaches_listeners_only_after_commit(
    db_pool: asyncpg.Pool, listener: Listener
) -> None:
    execution_id = await _new_execution(db_pool)
    async with db_pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        seq = await append_event(
            conn,
            tenant_id=TENANT,
            execution_id=execution_id,
            actor_id="alice",
            type="execution_started",
            payload={},
        )
        await _send_marker(db_pool, "marker-before-commit")
        assert await listener.next() == "marker-before-commit"
        assert listener.received.empty()

        await transaction.commit()
    assert await listener.next() == f"{execution_id}:{seq}"


async def test_notify_is_never_sent_for_a_rolled_back_event(
    db_pool: asyncpg.Pool, listener: Listener
) -> None:
    execution_id = await _new_execution(db_pool)
    async with db_pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        await append_event(
            conn,
            tenant_id=TENANT,
            execution_id=execution_id,
            actor_id="alice",
            type="execution_started",
            payload={},
        )
        await transaction.rollback()
    await _send_marker(db_pool, "marker-after-rollback")
    assert await listener.next() == "marker-after-rollback"
    assert listener.received.empty()
    # The sequence number was rolled back with the event: the next event is still seq 1.
    assert await _seqs(db_pool, execution_id) == []
    async with db_pool.acquire() as conn, conn.transaction():
        seq = await append_event(
            conn,
            tenant_id=TENANT,
            execution_id=execution_id,
            actor_id="alice",
            type="execution_started",
            payload={},
        )
    assert seq == 1
    assert await listener.next() == f"{execution_id}:1"
