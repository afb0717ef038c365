"""The tamper-evident event chain: written by the append itself, never forked by racing writers,
and broken at the right seq by every edit made behind the application's back."""

from __future__ import annotations

import asyncio
import hashlib
from uuid import UUID

import asyncpg
import pytest

from opsconductor.common.errors import NotFoundError
from opsconductor.lifecycle.storage.audit_chain import ChainProblem, link_hash, verify_chain
from opsconductor.lifecycle.storage.events import append_event

TENANT = "tenant-audit"


async def _new_execution(pool: asyncpg.Pool, key: str = "c" * 64) -> UUID:
    execution_id: UUID = await pool.fetchval(
        """
        INSERT INTO executions (tenant_id, actor_id, idempotency_key, plan_hash, plan_snapshot,
            plan_snapshot_hash, execution_mode, sla_class, action_class, timeout_ms)
        VALUES ($1, 'alice', $2, $3, $4, $5, 'immediate', 'fast', 'read', 10000)
        RETURNING id
        """,
        TENANT,
        key,
        "a" * 64,
        {"name": "audit", "steps": []},
        "b" * 64,
    )
    return execution_id


async def _finished_execution(pool: asyncpg.Pool, events: int = 5) -> UUID:
    execution_id = await _new_execution(pool)
    async with pool.acquire() as conn:
        for index in range(events):
            await append_event(
                conn,
                tenant_id=TENANT,
                execution_id=execution_id,
                actor_id="alice",
                type=f"event_{index + 1}",
                payload={"index": index + 1, "text": "ünïcode ✓", "nested": {"b": [1, 2.5]}},
            )
    return execution_id


async def test_an_untouched_chain_verifies_and_its_head_is_the_last_hash(
    db_pool: asyncpg.Pool,
) -> None:
    execution_id = await _finished_execution(db_pool)
    verdict = await verify_chain(db_pool, TENANT, execution_id)
    assert verdict.intact
    assert (verdict.events_checked, verdict.events_expected) == (5, 5)
    last = await db_pool.fetchval(
        "SELECT hash FROM execution_events WHERE execution_id = $1 AND seq = 5", execution_id
    )
    assert verdict.head_hash == bytes(last).hex()


async def test_each_hash_is_sha256_of_the_previous_hash_and_the_canonical_text(
    db_pool: asyncpg.Pool,
) -> None:
    """The stored value is exactly the documented formula (an auditor can recompute it)."""
    execution_id = await _finished_execution(db_pool, events=2)
    rows = await db_pool.fetch(
        """
        SELECT seq, hash, execution_event_canonical(execution_id, seq, tenant_id, actor_id, type,
               payload, created_at) AS canonical
        FROM execution_events WHERE execution_id = $1 ORDER BY seq
        """,
        execution_id,
    )
    first = hashlib.sha256(rows[0]["canonical"].encode()).digest()
    assert bytes(rows[0]["hash"]) == first
    assert bytes(rows[1]["hash"]) == hashlib.sha256(first + rows[1]["canonical"].encode()).digest()
    assert link_hash(first, rows[1]["canonical"]) == bytes(rows[1]["hash"])
    assert '"seq": 1' in rows[0]["canonical"]
    assert str(execution_id) in rows[0]["canonical"]


async def test_the_canonical_text_does_not_depend_on_the_session_time_zone(
    db_pool: asyncpg.Pool,
) -> None:
    execution_id = await _finished_execution(db_pool, events=3)
    async with db_pool.acquire() as conn:
        await conn.execute("SET TIME ZONE 'Asia/Kolkata'")
        try:
            assert (await verify_chain(conn, TENANT, execution_id)).intact
        finally:
            await conn.execute("RESET TIME ZONE")


async def test_racing_writers_of_one_execution_never_fork_the_chain(
    db_pool: asyncpg.Pool,
) -> None:
    """20 transactions, all open before any appends, each appending two events: one chain."""
    execution_id = await _new_execution(db_pool)
    writers = 20
    all_open = asyncio.Barrier(writers)

    async def write(index: int) -> None:
        async with db_pool.acquire() as conn, conn.transaction():
            await all_open.wait()
            for part in range(2):
                await append_event(
                    conn,
                    tenant_id=TENANT,
                    execution_id=execution_id,
                    actor_id="worker",
                    type="step_progress",
                    payload={"writer": index, "part": part},
                )

    await asyncio.gather(*(write(i) for i in range(writers)))
    verdict = await verify_chain(db_pool, TENANT, execution_id)
    assert verdict.intact, verdict.detail
    assert verdict.events_checked == 2 * writers
    distinct = await db_pool.fetchval(
        "SELECT count(DISTINCT hash) FROM execution_events WHERE execution_id = $1", execution_id
    )
    assert distinct == 2 * writers


async def test_an_altered_payload_is_reported_at_its_seq(db_pool: asyncpg.Pool) -> None:
    execution_id = await _finished_execution(db_pool)
    await db_pool.execute(
        "UPDATE execution_events SET payload = payload || '{\"index\": 99}'"
        " WHERE execution_id = $1 AND seq = 3",
        execution_id,
    )
    verdict = await verify_chain(db_pool, TENANT, execution_id)
    assert (verdict.broken_seq, verdict.problem) == (3, ChainProblem.ALTERED)
    assert verdict.events_checked == 2
    assert "event 3" in verdict.detail


@pytest.mark.parametrize(
    "column_change",
    [
        "type = 'forged'",
        "actor_id = 'mallory'",
        "created_at = created_at + interval '1 microsecond'",
        "tenant_id = 'other-tenant'",
    ],
)
async def test_any_altered_column_is_reported_at_its_seq(
    db_pool: asyncpg.Pool, column_change: str
) -> None:
    execution_id = await _finished_execution(db_pool)
    await db_pool.execute(
        f"UPDATE execution_events SET {column_change} WHERE execution_id = $1 AND seq = 4",
        execution_id,
    )
    verdict = await verify_chain(db_pool, TENANT, execution_id)
    assert (verdict.broken_seq, verdict.problem) == (4, ChainProblem.ALTERED)


async def test_an_altered_event_with_a_recomputed_hash_breaks_the_next_link(
    db_pool: asyncpg.Pool,
) -> None:
    """Forging one row's hash to match its new content still breaks the link after it."""
    execution_id = await _finished_execution(db_pool)
    async with db_pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "UPDATE execution_events SET payload = '{\"forged\": true}'"
            " WHERE execution_id = $1 AND seq = 2",
            execution_id,
        )
        await conn.execute(
            """
            UPDATE execution_events AS e SET hash = sha256(p.hash || convert_to(
                execution_event_canonical(e.execution_id, e.seq, e.tenant_id, e.actor_id, e.type,
                                          e.payload, e.created_at), 'UTF8'))
            FROM execution_events AS p
            WHERE e.execution_id = $1 AND e.seq = 2 AND p.execution_id = $1 AND p.seq = 1
            """,
            execution_id,
        )
    verdict = await verify_chain(db_pool, TENANT, execution_id)
    assert (verdict.broken_seq, verdict.problem) == (3, ChainProblem.ALTERED)


async def test_a_deleted_event_is_reported_as_missing_at_its_seq(db_pool: asyncpg.Pool) -> None:
    execution_id = await _finished_execution(db_pool)
    await db_pool.execute(
        "DELETE FROM execution_events WHERE execution_id = $1 AND seq = 2", execution_id
    )
    verdict = await verify_chain(db_pool, TENANT, execution_id)
    assert (verdict.broken_seq, verdict.problem) == (2, ChainProblem.MISSING)
    assert verdict.detail == "event 2 is missing"


async def test_deleted_last_events_are_reported_as_missing(db_pool: asyncpg.Pool) -> None:
    execution_id = await _finished_execution(db_pool)
    await db_pool.execute(
        "DELETE FROM execution_events WHERE execution_id = $1 AND seq >= 4", execution_id
    )
    verdict = await verify_chain(db_pool, TENANT, execution_id)
    assert (verdict.broken_seq, verdict.problem) == (4, ChainProblem.MISSING)
    assert verdict.detail == "events 4 to 5 are missing"
    assert verdict.events_checked == 3


async def test_reordered_events_are_reported_at_the_first_moved_seq(db_pool: asyncpg.Pool) -> None:
    execution_id = await _finished_execution(db_pool)
    async with db_pool.acquire() as conn, conn.transaction():
        for old, new in ((3, -3), (4, 3), (-3, 4)):
            await conn.execute(
                "UPDATE execution_events SET seq = $3 WHERE execution_id = $1 AND seq = $2",
                execution_id,
                old,
                new,
            )
    verdict = await verify_chain(db_pool, TENANT, execution_id)
    assert (verdict.broken_seq, verdict.problem) == (3, ChainProblem.ALTERED)


async def test_an_event_without_a_hash_is_reported_unchained(db_pool: asyncpg.Pool) -> None:
    execution_id = await _finished_execution(db_pool)
    await db_pool.execute(
        "UPDATE execution_events SET hash = NULL WHERE execution_id = $1 AND seq = 5",
        execution_id,
    )
    verdict = await verify_chain(db_pool, TENANT, execution_id)
    assert (verdict.broken_seq, verdict.problem) == (5, ChainProblem.UNCHAINED)


async def test_other_executions_stay_intact_when_one_is_tampered_with(
    db_pool: asyncpg.Pool,
) -> None:
    tampered = await _finished_execution(db_pool)
    untouched = await _new_execution(db_pool, "d" * 64)
    async with db_pool.acquire() as conn:
        await append_event(
            conn, tenant_id=TENANT, execution_id=untouched, actor_id=None, type="only"
        )
        # An event of no execution is not chained and changes nothing.
        await append_event(conn, tenant_id=TENANT, execution_id=None, actor_id="x", type="lone")
    await db_pool.execute("DELETE FROM execution_events WHERE execution_id = $1", tampered)
    assert not (await verify_chain(db_pool, TENANT, tampered)).intact
    assert (await verify_chain(db_pool, TENANT, untouched)).intact
    assert (
        await db_pool.fetchval(
            "SELECT hash FROM execution_events WHERE execution_id IS NULL AND type = 'lone'"
        )
        is None
    )


async def test_another_tenants_execution_is_not_found(db_pool: asyncpg.Pool) -> None:
    execution_id = await _finished_execution(db_pool)
    with pytest.raises(NotFoundError):
        await verify_chain(db_pool, "someone-else", execution_id)


async def test_an_execution_without_events_is_intact(db_pool: asyncpg.Pool) -> None:
    execution_id = await _new_execution(db_pool)
    verdict = await verify_chain(db_pool, TENANT, execution_id)
    assert verdict.intact
    assert verdict.events_checked == 0
    assert verdict.head_hash == ""
