"""finish_last_step against real Postgres: the last step's success and the execution's, one
statement, exactly what finish_step then transition(succeeded, release_locks) write; refused, it
writes nothing (the runner then makes both writes one by one, which say why)."""

from __future__ import annotations

from datetime import timedelta
from uuid import uuid4

import asyncpg

from opsconductor.common.fsm import ExecutionStatus, StepStatus
from opsconductor.lifecycle.storage.audit_chain import verify_chain
from opsconductor.lifecycle.storage.execution_leases import claim_execution
from opsconductor.lifecycle.storage.executions import (
    create_execution,
    finish_last_step,
    get_execution,
    start_step,
    transition,
)
from opsconductor.lifecycle.storage.locks import LockRequest, acquire_locks

from .test_executions_repo import WINDOW, events, new_execution

ONE_STEP = (("only", 0, "noop", "read"),)
SUMMARY = {"result_summary": {"steps": {"only": "succeeded"}, "counts": {"succeeded": 1}}}


async def running(pool: asyncpg.Pool) -> tuple[object, str]:
    record, _ = await create_execution(pool, new_execution(steps=ONE_STEP), dedup_window=WINDOW)
    await transition(pool, record.id, to=ExecutionStatus.RUNNING, by="w1", worker_id="w1")
    await start_step(pool, record.id, "only", worker_id="w1")
    return record, record.tenant_id


async def test_the_step_and_the_execution_end_together_with_their_events_in_order(
    db_pool: asyncpg.Pool,
) -> None:
    record, tenant = await running(db_pool)
    await acquire_locks(
        db_pool,
        [LockRequest(tenant, "srv-1", "noop")],
        owner_token=uuid4(),
        owner_execution_id=record.id,
        ttl=timedelta(minutes=1),
    )
    both = await finish_last_step(
        db_pool,
        record.id,
        "only",
        result={"ok": True},
        by="w1",
        lease_token=None,
        fields=SUMMARY,
        tenant_id=tenant,
    )
    assert both is not None
    final, step = both
    assert final.status is ExecutionStatus.SUCCEEDED
    assert final.result_summary == SUMMARY["result_summary"]
    assert (step.status, step.result) == (StepStatus.SUCCEEDED, {"ok": True})
    assert step.ended_at is not None
    assert final.ended_at is not None
    assert step.ended_at <= final.ended_at
    stored = await get_execution(db_pool, tenant, record.id)
    assert stored.steps[0].status is StepStatus.SUCCEEDED
    assert stored.steps[0].duration_ms == step.duration_ms
    logged = await events(db_pool, record.id)
    assert [t for _, t, _ in logged] == [
        "execution_started",
        "execution_running",
        "step_started",
        "step_succeeded",
        "execution_completed",
    ]
    assert [seq for seq, _, _ in logged] == [1, 2, 3, 4, 5]
    assert logged[3][2] == {
        "step_id": "only",
        "position": 0,
        "action": "noop",
        "attempt": 1,
        "duration_ms": step.duration_ms,
    }
    assert logged[4][2]["status"] == "succeeded"
    assert logged[4][2]["from"] == "running"
    assert logged[4][2]["duration_ms"] == final.duration_ms
    assert final.event_seq == 5
    assert (await verify_chain(db_pool, tenant, record.id)).intact
    assert await db_pool.fetchval("SELECT count(*) FROM execution_locks") == 0


async def test_refused_it_writes_nothing(db_pool: asyncpg.Pool) -> None:
    # A lease token that does not own the execution.
    record, tenant = await running(db_pool)
    before = await events(db_pool, record.id)
    refused = await finish_last_step(
        db_pool,
        record.id,
        "only",
        result=None,
        by="w1",
        lease_token=uuid4(),
        fields=SUMMARY,
        tenant_id=tenant,
    )
    assert refused is None
    # Another tenant's, and a step that is not running.
    assert (
        await finish_last_step(
            db_pool,
            record.id,
            "only",
            result=None,
            by="w1",
            lease_token=None,
            fields=SUMMARY,
            tenant_id="someone-else",
        )
        is None
    )
    pending, _ = await create_execution(db_pool, new_execution(steps=ONE_STEP), dedup_window=WINDOW)
    await transition(db_pool, pending.id, to=ExecutionStatus.RUNNING, by="w1")
    assert (
        await finish_last_step(
            db_pool,
            pending.id,
            "only",
            result=None,
            by="w1",
            lease_token=None,
            fields=SUMMARY,
            tenant_id=tenant,
        )
        is None
    )
    stored = await get_execution(db_pool, tenant, record.id)
    assert stored.status is ExecutionStatus.RUNNING
    assert stored.steps[0].status is StepStatus.RUNNING
    assert await events(db_pool, record.id) == before
    assert (await get_execution(db_pool, tenant, pending.id)).steps[0].status is StepStatus.PENDING


async def test_the_lease_holder_finishes_with_its_token(db_pool: asyncpg.Pool) -> None:
    record, _ = await create_execution(
        db_pool, new_execution(steps=ONE_STEP, mode="background"), dedup_window=WINDOW
    )
    await transition(db_pool, record.id, to=ExecutionStatus.QUEUED, by="api")
    token = uuid4()
    claimed = await claim_execution(
        db_pool, record.id, lease_token=token, worker_id="w1", budget=timedelta(minutes=1)
    )
    assert claimed is not None
    await start_step(db_pool, record.id, "only", worker_id="w1", lease_token=token)
    both = await finish_last_step(
        db_pool,
        record.id,
        "only",
        result=None,
        by="w1",
        lease_token=token,
        fields=SUMMARY,
        tenant_id=record.tenant_id,
    )
    assert both is not None
    assert both[0].status is ExecutionStatus.SUCCEEDED
