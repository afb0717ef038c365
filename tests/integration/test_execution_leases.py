"""Ending an execution no worker started: failed, steps skipped, key retired — or untouched."""

from __future__ import annotations

import asyncpg

from opsconductor.common.fsm import ExecutionStatus as S
from opsconductor.common.storage.execution_leases import fail_unstarted_execution
from opsconductor.common.storage.execution_reads import get_execution
from opsconductor.common.storage.executions import create_execution

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
