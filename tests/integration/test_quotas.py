"""Quota admission against a real Postgres: racing submits admit exactly the limit, a refusal
leaves no row, a duplicate is never refused, slots come back as rows move on, and a submitter
that dies holding the tenant's quota lock blocks nobody (docs/security.md, "Fair share and
quotas"). The e2e view (RESOURCE_EXHAUSTED with RetryInfo through the api): tests/e2e/
test_fair_share.py.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import timedelta
from uuid import uuid4

import asyncpg
import pytest

from opsconductor.common.errors import QuotaExceededError
from opsconductor.common.fsm import ExecutionStatus
from opsconductor.common.tenant_policy import TenantPolicies
from opsconductor.lifecycle.queue import jobs
from opsconductor.lifecycle.storage.db import create_pool
from opsconductor.lifecycle.storage.execution_records import transaction
from opsconductor.lifecycle.storage.executions import (
    NewExecution,
    create_execution,
    create_queued_execution,
    transition,
)
from opsconductor.lifecycle.storage.quota_usage import QUOTA_LOCK_CLASS, WaitingUsage
from opsconductor.policy.quotas import QuotaLimits, TenantQuotas

TENANT = "tenant-quota"
LIMIT = 10


@pytest.fixture
async def wide_pool(db_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """12 transactions in flight at once (the shared server's connections are finite): a real
    race, with the other submits queued right behind them."""
    pool = await create_pool(db_dsn, min_size=12, max_size=12)
    try:
        yield pool
    finally:
        await pool.close()


def quotas(**limits: int) -> TenantQuotas:
    values = {"max_queued": LIMIT, "max_running": 0, "max_immediate": LIMIT, **limits}
    return TenantQuotas(QuotaLimits(**values), TenantPolicies.from_document(None))


def new_execution(mode: str, key: str | None = None) -> NewExecution:
    return NewExecution(
        tenant_id=TENANT,
        actor_id="alice",
        request_id=None,
        idempotency_key=key or hashlib.sha256(uuid4().bytes).hexdigest(),
        plan_hash="a" * 64,
        plan_snapshot={"name": "q"},
        plan_snapshot_hash="b" * 64,
        execution_mode=mode,
        sla_class="fast",
        action_class="read",
        approval_level=0,
        priority=50,
        timeout_policy_id="fast_read",
        timeout_ms=10_000,
        estimated_duration_ms=2_000,
        record_only=False,
    )


async def submit_queued(pool: asyncpg.Pool, limits: TenantQuotas, key: str | None = None):
    """The api's background statement (the Redis push, after it, counts nothing): admission,
    creation, transition to queued and queue row at once; refused → nothing committed."""
    new = new_execution("background", key)
    limit = limits.for_tenant(TENANT).max_queued
    async with transaction(pool) as conn:
        created = await create_queued_execution(
            conn,
            new,
            dedup_window=timedelta(hours=1),
            max_waiting=limit,
            max_attempts=3,
            by="api",
        )
        if isinstance(created, WaitingUsage):
            raise limits.queued_refusal(TENANT, limit, created.waiting)
    return created.record, created.created


async def submit_immediate(pool: asyncpg.Pool, limits: TenantQuotas, key: str | None = None):
    """The api's immediate recipe: quota lock, admission and creation in one statement."""
    new = new_execution("immediate", key)
    return await limits.create_immediate(pool, new, dedup_window=timedelta(hours=1))


async def hold_quota_lock(conn: asyncpg.Connection) -> None:
    """Take the tenant's quota lock, as every admitting statement does, until ``conn``'s
    transaction ends (spelled out here: admission waiting behind it proves they agree)."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock($1::int4, hashtext($2))", QUOTA_LOCK_CLASS, TENANT
    )


async def count(pool: asyncpg.Pool, table: str) -> int:
    return int(await pool.fetchval(f"SELECT count(*) FROM {table} WHERE tenant_id = $1", TENANT))


async def race(submit, pool: asyncpg.Pool, limits: TenantQuotas, n: int = 50) -> list[object]:
    start = asyncio.Event()

    async def one() -> object:
        await start.wait()
        return await submit(pool, limits)

    tasks = [asyncio.create_task(one()) for _ in range(n)]
    await asyncio.sleep(0.05)
    start.set()
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_fifty_racing_immediate_submits_against_a_limit_of_ten_admit_exactly_ten(
    wide_pool: asyncpg.Pool,
) -> None:
    results = await race(submit_immediate, wide_pool, quotas())
    refused = [r for r in results if isinstance(r, QuotaExceededError)]
    assert len(refused) == 40, results
    assert await count(wide_pool, "executions") == LIMIT
    hint = refused[0].retry_after_s
    assert hint is not None
    assert 1.0 <= hint <= 2.0  # the first run in flight is estimated to end 2 s after creation
    assert refused[0].details["quota"] == "immediate"


async def test_a_slot_comes_back_when_its_row_moves_on(db_pool: asyncpg.Pool) -> None:
    limits = quotas(max_queued=2, max_immediate=1)
    (first, _), _ = [await submit_queued(db_pool, limits) for _ in range(2)]
    with pytest.raises(QuotaExceededError):
        await submit_queued(db_pool, limits)
    # Leased = running, not waiting: it frees a place in line.
    row = await jobs.get_queue_row_for_execution(db_pool, first.id)
    assert row is not None
    await jobs.lease_row(
        db_pool,
        row.id,
        worker_id="w",
        lease_token=uuid4(),
        lease_expires_at=row.enqueued_at + timedelta(minutes=5),
        attempts=0,
    )
    await submit_queued(db_pool, limits)

    running, _ = await submit_immediate(db_pool, limits)
    with pytest.raises(QuotaExceededError):
        await submit_immediate(db_pool, limits)
    await transition(db_pool, running.id, to=ExecutionStatus.FAILED, by="reaper", tenant_id=TENANT)
    await submit_immediate(db_pool, limits)


async def test_a_duplicate_at_the_limit_finds_its_execution_and_is_not_refused(
    db_pool: asyncpg.Pool,
) -> None:
    limits = quotas(max_queued=1, max_immediate=1)
    queued, _ = await submit_queued(db_pool, limits, key="k-bg")
    again, created = await submit_queued(db_pool, limits, key="k-bg")
    assert (again.id, created) == (queued.id, False)
    running, _ = await submit_immediate(db_pool, limits, key="k-im")
    again, created = await submit_immediate(db_pool, limits, key="k-im")
    assert (again.id, created) == (running.id, False)
    with pytest.raises(QuotaExceededError):
        await submit_immediate(db_pool, limits, key="k-other")


async def test_a_key_retired_at_the_limit_is_refused_and_stays_live(
    db_pool: asyncpg.Pool,
) -> None:
    """A key whose execution ended past the dedup window would make the submit new after all:
    at the limit it is refused, and the retirement goes with the refusal (nothing written)."""
    limits = quotas(max_immediate=1)
    old, _ = await submit_immediate(db_pool, limits, key="k-old")
    await transition(db_pool, old.id, to=ExecutionStatus.FAILED, by="reaper", tenant_id=TENANT)
    await db_pool.execute(
        "UPDATE executions SET created_at = created_at - interval '3 hours',"
        " ended_at = ended_at - interval '2 hours' WHERE id = $1",
        old.id,
    )
    await submit_immediate(db_pool, limits, key="k-busy")
    with pytest.raises(QuotaExceededError):
        await submit_immediate(db_pool, limits, key="k-old")
    retired = await db_pool.fetchval(
        "SELECT idempotency_retired_at FROM executions WHERE id = $1", old.id
    )
    assert retired is None
    assert await count(db_pool, "executions") == 2
    # Below the limit the same key retires the old execution and creates a new one.
    limits = quotas(max_immediate=2)
    again, created = await submit_immediate(db_pool, limits, key="k-old")
    assert created
    assert again.id != old.id
    assert await db_pool.fetchval(
        "SELECT idempotency_retired_at IS NOT NULL FROM executions WHERE id = $1", old.id
    )


async def test_zero_means_no_limit(db_pool: asyncpg.Pool) -> None:
    limits = quotas(max_queued=0, max_immediate=0)
    for _ in range(3):
        await submit_queued(db_pool, limits)
        await submit_immediate(db_pool, limits)
    assert await count(db_pool, "executions") == 6


async def test_fifty_racing_one_statement_background_submits_admit_exactly_ten(
    wide_pool: asyncpg.Pool,
) -> None:
    results = await race(submit_queued, wide_pool, quotas())
    refused = [r for r in results if isinstance(r, QuotaExceededError)]
    admitted = [r for r in results if not isinstance(r, BaseException)]
    assert (len(admitted), len(refused)) == (LIMIT, 40), results
    assert await count(wide_pool, "execution_queue") == LIMIT
    assert await count(wide_pool, "executions") == LIMIT  # refusals left no row behind
    # started and queued of each admitted one, nothing of a refusal
    assert await count(wide_pool, "execution_events") == 2 * LIMIT
    assert {record.status for record, _ in admitted} == {ExecutionStatus.QUEUED}
    first = refused[0]
    assert first.details["quota"] == "queued"
    assert (first.details["limit"], first.details["in_use"]) == (LIMIT, LIMIT)
    assert first.retry_after_s == 5.0
    assert "max_queued" in first.message


async def test_one_statement_background_slot_duplicate_and_retired_key_at_the_limit(
    db_pool: asyncpg.Pool,
) -> None:
    limits = quotas(max_queued=1)
    first, created = await submit_queued(db_pool, limits, key="k-bg")
    assert created
    # The events transition() would have written after the creation, in seq order.
    events = await db_pool.fetch(
        "SELECT seq, type, actor_id, payload FROM execution_events"
        " WHERE execution_id = $1 ORDER BY seq",
        first.id,
    )
    assert [(e["seq"], e["type"], e["actor_id"]) for e in events] == [
        (1, "execution_started", "alice"),
        (2, "execution_queued", "api"),
    ]
    assert events[0]["payload"]["status"] == "pending"
    assert events[1]["payload"] == {"status": "queued", "from": "pending"}
    assert (first.last_transition_from, first.last_transition_by, first.event_seq) == (
        ExecutionStatus.PENDING,
        "api",
        2,
    )
    again, created = await submit_queued(db_pool, limits, key="k-bg")
    assert (again.id, created) == (first.id, False)  # a duplicate at the limit is not refused
    with pytest.raises(QuotaExceededError):
        await submit_queued(db_pool, limits, key="k-other")
    # A key whose execution ended past the dedup window, at the limit: refused, not retired.
    old = await create_execution(
        db_pool, new_execution("background", "k-old"), dedup_window=timedelta(hours=1)
    )
    await transition(db_pool, old[0].id, to=ExecutionStatus.FAILED, by="reaper", tenant_id=TENANT)
    await db_pool.execute(
        "UPDATE executions SET created_at = created_at - interval '3 hours',"
        " ended_at = ended_at - interval '2 hours' WHERE id = $1",
        old[0].id,
    )
    with pytest.raises(QuotaExceededError):
        await submit_queued(db_pool, limits, key="k-old")
    assert await db_pool.fetchval(
        "SELECT idempotency_retired_at IS NULL FROM executions WHERE id = $1", old[0].id
    )
    assert await count(db_pool, "executions") == 2
    # Leased = running, not waiting: the slot comes back.
    row = await jobs.get_queue_row_for_execution(db_pool, first.id)
    assert row is not None
    await jobs.lease_row(
        db_pool,
        row.id,
        worker_id="w",
        lease_token=uuid4(),
        lease_expires_at=row.enqueued_at + timedelta(minutes=5),
        attempts=0,
    )
    again, created = await submit_queued(db_pool, limits, key="k-old")
    assert created
    assert again.id != old[0].id


async def test_a_one_statement_background_submit_waits_for_a_killed_lock_holder(
    db_dsn: str, db_pool: asyncpg.Pool
) -> None:
    """The statement takes the same quota lock as every admission: it waits behind a holder,
    and goes ahead once the holder's session is killed."""
    victim_pool = await create_pool(db_dsn, min_size=1, max_size=1)
    victim = await victim_pool.acquire()
    tx = victim.transaction()
    await tx.start()
    await hold_quota_lock(victim)
    pid = victim.get_server_pid()
    waiter = asyncio.create_task(submit_queued(db_pool, quotas()))
    await asyncio.sleep(0.3)
    assert not waiter.done()  # serialized behind the holder
    await db_pool.execute("SELECT pg_terminate_backend($1)", pid)
    _, created = await asyncio.wait_for(waiter, 10)
    assert created
    victim_pool.terminate()


async def test_a_submitter_killed_holding_the_quota_lock_blocks_nobody(
    db_dsn: str, db_pool: asyncpg.Pool
) -> None:
    """The lock is transaction-scoped: when the session holding it dies (api SIGKILLed mid
    submit), Postgres ends the transaction, releases it, and nothing it wrote survives."""
    victim_pool = await create_pool(db_dsn, min_size=1, max_size=1)
    victim = await victim_pool.acquire()
    tx = victim.transaction()
    await tx.start()
    await hold_quota_lock(victim)
    await create_execution(victim, new_execution("background"), dedup_window=timedelta(hours=1))
    pid = victim.get_server_pid()

    waiter = asyncio.create_task(submit_queued(db_pool, quotas()))
    await asyncio.sleep(0.3)
    assert not waiter.done()  # serialized behind the holder
    await db_pool.execute("SELECT pg_terminate_backend($1)", pid)
    _, created = await asyncio.wait_for(waiter, 10)
    assert created
    assert await count(db_pool, "executions") == 1  # the dead submit's row went with it
    victim_pool.terminate()


async def test_an_immediate_submit_waits_for_the_tenants_quota_lock(
    db_dsn: str, db_pool: asyncpg.Pool
) -> None:
    """The one-statement immediate admission takes the same per-tenant lock as every other
    admission: it waits while another submit of the tenant holds it, and counts what that one
    committed (here: the limit reached, so it is refused)."""
    holder_pool = await create_pool(db_dsn, min_size=1, max_size=1)
    try:
        async with holder_pool.acquire() as holder, holder.transaction():
            await hold_quota_lock(holder)
            await create_execution(
                holder, new_execution("immediate"), dedup_window=timedelta(hours=1)
            )
            waiter = asyncio.create_task(submit_immediate(db_pool, quotas(max_immediate=1)))
            await asyncio.sleep(0.3)
            assert not waiter.done()  # serialized behind the holder
        with pytest.raises(QuotaExceededError):
            await asyncio.wait_for(waiter, 10)
        assert await count(db_pool, "executions") == 1
    finally:
        await holder_pool.close()
