"""Ending an execution no worker started: failed, steps skipped, key retired — or untouched;
ending one whose worker is gone: failed, and its locks released."""

from __future__ import annotations

from datetime import timedelta
from uuid import uuid4

import asyncpg

from opsconductor.common.fsm import ExecutionStatus as S
from opsconductor.lifecycle.storage.execution_leases import (
    fail_lost_execution,
    fail_overdue_executions,
    fail_unstarted_execution,
    record_lease_expired,
)
from opsconductor.lifecycle.storage.execution_reads import get_execution
from opsconductor.lifecycle.storage.execution_records import ExecutionRecord
from opsconductor.lifecycle.storage.executions import create_execution
from opsconductor.lifecycle.storage.locks import LockRequest, acquire_locks

from .test_executions_repo import WINDOW, in_status, new_execution


async def test_an_unstarted_execution_ends_failed_with_its_key_retired(
    db_pool: asyncpg.Pool,
) -> None:
    """No worker could be reached: the pending execution ends failed with the reason, its steps
    are skipped (none is left pending), and the same plan can be submitted again at once."""
    record = await in_status(db_pool, S.PENDING)
    assert await fail_unstarted_execution(
        db_pool,
        record.id,
        expected_from=S.PENDING,
        by="api",
        error_class="WORKER_UNAVAILABLE",
        error_message="no worker could be reached",
    )
    failed = await get_execution(db_pool, record.tenant_id, record.id)
    assert failed.status == S.FAILED
    assert failed.error_class == "WORKER_UNAVAILABLE"
    assert {str(s.status) for s in failed.steps} == {"skipped"}
    again, created = await create_execution(
        db_pool, new_execution(key=record.idempotency_key), dedup_window=WINDOW
    )
    assert created
    assert again.id != record.id


async def test_an_execution_a_worker_took_meanwhile_is_left_alone(db_pool: asyncpg.Pool) -> None:
    """If the execution moved on (a worker did start it), nothing changes and the key stays."""
    record = await in_status(db_pool, S.RUNNING)
    assert not await fail_unstarted_execution(
        db_pool,
        record.id,
        expected_from=S.PENDING,
        by="api",
        error_class="WORKER_UNAVAILABLE",
        error_message="no worker could be reached",
    )
    same = await get_execution(db_pool, record.tenant_id, record.id)
    assert same.status == S.RUNNING
    assert same.idempotency_retired_at is None


async def _running_with_a_lock(db_pool: asyncpg.Pool) -> ExecutionRecord:
    record = await in_status(db_pool, S.RUNNING)
    await acquire_locks(
        db_pool,
        [LockRequest(record.tenant_id, "db-1", "restart")],
        owner_token=uuid4(),
        owner_execution_id=record.id,
        ttl=timedelta(hours=1),
    )
    return record


async def _locks_of(db_pool: asyncpg.Pool, record: ExecutionRecord) -> int:
    count: int = await db_pool.fetchval(
        "SELECT count(*) FROM execution_locks WHERE owner_execution_id = $1", record.id
    )
    return count


async def test_the_reaper_failing_an_overdue_execution_releases_its_locks(
    db_pool: asyncpg.Pool,
) -> None:
    """Found by the chaos soak: a worker died mid-run; the reaper ends the execution failed
    (timed out) past its deadline. Its locks go in the same transaction — the dead worker
    never will release them, and until their expiry every plan on those targets was refused
    RESOURCE_BUSY although nothing ran there."""
    record = await _running_with_a_lock(db_pool)
    await db_pool.execute(
        "UPDATE executions SET deadline_at = clock_timestamp() - interval '1 minute' WHERE id = $1",
        record.id,
    )
    assert await fail_overdue_executions(db_pool, grace=timedelta(seconds=1)) == [record.id]
    assert (await get_execution(db_pool, record.tenant_id, record.id)).status == S.FAILED
    assert await _locks_of(db_pool, record) == 0


async def test_a_lost_execution_failed_by_the_reaper_releases_its_locks(
    db_pool: asyncpg.Pool,
) -> None:
    """Same for a job dead-lettered after its last lease expired (its worker died each time)."""
    record = await _running_with_a_lock(db_pool)
    assert await fail_lost_execution(
        db_pool, record.id, error_class="LEASE_EXPIRED", error_message="lost", by="reaper"
    )
    assert await _locks_of(db_pool, record) == 0


async def test_an_expired_lease_is_announced_only_while_its_holder_still_runs_it(
    db_pool: asyncpg.Pool,
) -> None:
    """The reaper's ``lease_expired`` event is written for the worker that held the execution;
    not once another worker took it over, nor for an ended or unknown execution."""
    record = await in_status(db_pool, S.RUNNING)
    await db_pool.execute("UPDATE executions SET worker_id = 'worker-a' WHERE id = $1", record.id)
    assert not await record_lease_expired(
        db_pool, record.id, worker_id="worker-b", lease_expirations=1
    )
    assert await record_lease_expired(db_pool, record.id, worker_id="worker-a", lease_expirations=1)
    events = await db_pool.fetch(
        "SELECT type, actor_id, payload FROM execution_events WHERE execution_id = $1 "
        "AND type = 'lease_expired'",
        record.id,
    )
    assert [(e["actor_id"], e["payload"]) for e in events] == [
        ("reaper", {"worker_id": "worker-a", "lease_expirations": 1})
    ]
    ended = await in_status(db_pool, S.SUCCEEDED)
    assert not await record_lease_expired(db_pool, ended.id, worker_id=None, lease_expirations=1)
    assert not await record_lease_expired(
        db_pool, uuid4(), worker_id="worker-a", lease_expirations=1
    )
