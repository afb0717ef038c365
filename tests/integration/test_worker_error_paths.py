"""Every error that can follow ``running`` ends the execution ``failed`` with its true class, at
once: never left ``running`` for the reaper to call a timeout, never redelivered until the DLQ.

Real consumer, runner, Postgres and Redis (the rig of ``test_consumer_retries``); the faults are
rows the api would no longer write — a stored plan that does not parse, a tenant id that cannot
form a lock key — planted directly, as an older release or a bypassed check would leave them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from opsconductor.common.errors import PlanValidationError
from opsconductor.common.fsm import ExecutionStatus
from opsconductor.lifecycle.queue import jobs
from opsconductor.lifecycle.storage.execution_reads import get_execution
from tests.integration import test_consumer_retries as retries
from tests.integration.test_consumer_retries import TENANT, Rig, probe_plan, run_next, submit

# The retry tests' rig: real consumer, runner, Postgres and Redis.
rig = retries.rig


async def test_a_stored_plan_the_worker_cannot_parse_fails_the_execution_at_once(
    rig: Rig, tmp_path: Path
) -> None:
    """Finding 10: the api accepted 2^60, the worker refused the stored plan, the row stayed
    ``running`` and every delivery failed until the DLQ. Now: failed, INVALID_PLAN, job gone."""
    execution_id, job_id = await submit(rig, probe_plan(tmp_path / "ledger.jsonl"))
    await rig.pool.execute(
        "UPDATE executions SET plan_snapshot = jsonb_set(plan_snapshot, "
        "'{plan,steps,0,params,count}', to_jsonb(1152921504606846976::bigint)) WHERE id = $1",
        execution_id,
    )
    with pytest.raises(PlanValidationError):
        await run_next(rig)
    record = await get_execution(rig.pool, TENANT, execution_id)
    assert record.status is ExecutionStatus.FAILED
    assert record.error_class == "INVALID_PLAN"
    assert not record.timed_out
    assert await jobs.get_queue_row(rig.pool, job_id) is None
    assert await rig.queue.dequeue("another-worker", 30) is None


async def test_a_lock_key_that_cannot_be_built_fails_an_immediate_execution_at_once(
    rig: Rig, tmp_path: Path
) -> None:
    """Finding 8: a tenant id with ':' moved the row to running, then the lock key failed and
    the row was reaped 40 s later as EXECUTION_TIMEOUT. Now: failed at once, the real class."""
    execution_id, job_id = await submit(rig, probe_plan(tmp_path / "ledger.jsonl"))
    await jobs.delete_queue_row(rig.pool, job_id)
    await rig.pool.execute(
        "UPDATE executions SET tenant_id = 'bad:tenant', execution_mode = 'immediate', "
        "status = 'pending' WHERE id = $1",
        execution_id,
    )
    record = await get_execution(rig.pool, "bad:tenant", execution_id)
    with pytest.raises(ValueError, match="must not contain ':'"):
        await rig.consumer._runner.run(record)
    record = await get_execution(rig.pool, "bad:tenant", execution_id)
    assert record.status is ExecutionStatus.FAILED
    assert record.error_class == "ValueError"
    assert "ValueError" in (record.error_message or "")
    assert not record.timed_out
    assert {step.status for step in record.steps} == {"skipped"}
