"""Two runs of one execution overlapping in one worker process (the chaos soak's ``KeyError``).

After a lost lease the same worker can take an execution over while its first run is still
unwinding. The unwinding run must not reach into the live run's state: here the live run (A,
holding the lease) is in its first step when a stale run (B, an old lease token, told to stop)
of the same execution ends in the same runner. A's next step must still find its own stop
signal. While the stop event was kept per execution id, B's exit removed A's entry and A failed
with ``KeyError``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any
from uuid import uuid4

import asyncpg
import pytest

from opsconductor.actions.registry import default_registry
from opsconductor.common.fsm import ExecutionStatus, StepStatus
from opsconductor.common.hashing import plan_hash
from opsconductor.common.plan import parse_plan, to_wire_dict
from opsconductor.common.secrets import SecretResolver
from opsconductor.lifecycle.facade import PostgresRedisLifecycle
from opsconductor.lifecycle.storage.cancellation import CancelSignals
from opsconductor.lifecycle.storage.execution_leases import claim_execution
from opsconductor.lifecycle.storage.execution_steps import load_steps
from opsconductor.lifecycle.storage.executions import NewExecution, create_execution, transition
from opsconductor.lifecycle.storage.policies import load_timeout_policies
from opsconductor.worker.logic.runner import ExecutionRunner

TENANT = "tenant-overlap"
WORKER = "worker-overlap"


def _plan() -> dict[str, Any]:
    return {
        "name": "overlap-" + uuid4().hex[:8],
        "sla_class": "fast",
        "steps": [
            {
                "id": f"s{i}",
                "action": "sleep",
                "action_class": "read",
                "targets": [{"ref": "host:overlap"}],
                "params": {"seconds": 0.4},
            }
            for i in (1, 2)
        ],
    }


async def _queued_execution(pool: asyncpg.Pool) -> Any:
    plan = parse_plan(_plan())
    record, _ = await create_execution(
        pool,
        NewExecution(
            tenant_id=TENANT,
            actor_id="alice",
            request_id=None,
            idempotency_key=hashlib.sha256(uuid4().bytes).hexdigest(),
            plan_hash=plan_hash(plan),
            plan_snapshot={"plan": to_wire_dict(plan), "resolved": {}},
            plan_snapshot_hash="c" * 64,
            execution_mode="background",
            action_class="read",
            approval_level=0,
            priority=50,
            timeout_policy_id="fast_read",
            sla_class="fast",
            timeout_ms=10_000,
            estimated_duration_ms=800,
            record_only=False,
            steps=[(f"s{i}", i - 1, "sleep", "read") for i in (1, 2)],
        ),
        dedup_window=timedelta(hours=24),
    )
    await transition(pool, record.id, to=ExecutionStatus.QUEUED, by="api", tenant_id=TENANT)
    return record


@pytest.fixture
async def runner(db_pool: asyncpg.Pool, db_dsn: str) -> AsyncIterator[ExecutionRunner]:
    signals = CancelSignals(db_dsn)
    await signals.start()
    try:
        yield ExecutionRunner(
            lifecycle=PostgresRedisLifecycle(db_pool, None),
            pool=db_pool,
            handlers=default_registry(),
            secrets=SecretResolver([]),
            cancel_signals=signals,
            policies=await load_timeout_policies(db_pool),
            worker_id=WORKER,
        )
    finally:
        await signals.stop()


async def test_a_stale_run_ending_does_not_break_the_live_runs_next_step(
    runner: ExecutionRunner, db_pool: asyncpg.Pool
) -> None:
    queued = await _queued_execution(db_pool)
    token = uuid4()
    claimed = await claim_execution(
        db_pool, queued.id, lease_token=token, worker_id=WORKER, budget=timedelta(seconds=30)
    )
    assert claimed is not None
    live = asyncio.create_task(runner.execute(claimed, lease_token=token, retry_allowed=False))
    async with asyncio.timeout(5):  # until A is inside s1 (its 0.4 s sleep)
        while (await load_steps(db_pool, claimed.id))[0].status != StepStatus.RUNNING:
            await asyncio.sleep(0.01)
    stop = asyncio.Event()
    stop.set()
    [stale] = await asyncio.gather(
        runner.execute(claimed, lease_token=uuid4(), retry_allowed=False, stop_event=stop),
        return_exceptions=True,
    )
    assert not isinstance(stale, KeyError)
    assert not live.done()  # B ended while A was still in s1
    result = await live
    assert result.record.status == "succeeded"
    assert [s.status for s in result.record.steps] == ["succeeded", "succeeded"]
