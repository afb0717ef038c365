"""start_step_unless_cancelled against real Postgres: the between-steps cancellation check and
the step's start in one statement — the check always counted, nothing started once a
cancellation was requested, and a refused start explained as start_step explains it."""

from __future__ import annotations

from uuid import uuid4

import asyncpg
import pytest

from opsconductor.common.errors import FSMError, NotFoundError, StaleLeaseError
from opsconductor.common.fsm import ExecutionStatus, StepStatus
from opsconductor.lifecycle.storage.execution_steps import start_step_unless_cancelled
from opsconductor.lifecycle.storage.executions import (
    create_execution,
    get_execution,
    request_cancel,
    transition,
)

from .test_executions_repo import WINDOW, events, new_execution


async def running(pool: asyncpg.Pool):
    record, _ = await create_execution(pool, new_execution(), dedup_window=WINDOW)
    return await transition(pool, record.id, to=ExecutionStatus.RUNNING, by="w1", worker_id="w1")


async def test_it_starts_the_step_and_counts_the_check(db_pool: asyncpg.Pool) -> None:
    record = await running(db_pool)
    step = await start_step_unless_cancelled(db_pool, record.id, "s1", worker_id="w1")
    assert step is not None
    assert (step.status, step.attempt, step.worker_id) == (StepStatus.RUNNING, 1, "w1")
    stored = await get_execution(db_pool, record.tenant_id, record.id)
    assert stored.cancel_checks_performed == 1
    assert [t for _, t, _ in await events(db_pool, record.id)][-1] == "step_started"


async def test_once_cancelled_it_starts_nothing_but_counts_the_check(
    db_pool: asyncpg.Pool,
) -> None:
    record = await running(db_pool)
    await request_cancel(db_pool, record.id, tenant_id=record.tenant_id, by="bob", reason="r")
    before = await events(db_pool, record.id)
    assert await start_step_unless_cancelled(db_pool, record.id, "s1", worker_id="w1") is None
    stored = await get_execution(db_pool, record.tenant_id, record.id)
    assert stored.cancel_checks_performed == 1
    assert stored.steps[0].status is StepStatus.PENDING
    assert await events(db_pool, record.id) == before


async def test_a_refused_start_says_why(db_pool: asyncpg.Pool) -> None:
    with pytest.raises(NotFoundError):
        await start_step_unless_cancelled(db_pool, uuid4(), "s1", worker_id="w1")
    pending, _ = await create_execution(db_pool, new_execution(), dedup_window=WINDOW)
    with pytest.raises(FSMError):
        await start_step_unless_cancelled(db_pool, pending.id, "s1", worker_id="w1")
    record = await running(db_pool)
    with pytest.raises(StaleLeaseError):
        await start_step_unless_cancelled(
            db_pool, record.id, "s1", worker_id="w1", lease_token=uuid4()
        )
    with pytest.raises(NotFoundError):
        await start_step_unless_cancelled(db_pool, record.id, "nope", worker_id="w1")
    stored = await get_execution(db_pool, record.tenant_id, record.id)
    assert all(s.status is StepStatus.PENDING for s in stored.steps)
    # Each check was counted, refused or not.
    assert stored.cancel_checks_performed == 2
