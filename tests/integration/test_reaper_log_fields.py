"""The reaper's records about an execution carry its spec §7.2 log fields, as every other
process's do: a pass runs outside any request, so it binds the execution itself.

The e2e log-paths test (a real SIGKILLed worker) catches a missing binding only when the
reaper's pass happens to announce the expired lease before another worker takes the job over;
this drives that announcement every time."""

from __future__ import annotations

import time
from datetime import timedelta

import asyncpg
import structlog
from redis.asyncio import Redis
from structlog.contextvars import merge_contextvars

from opsconductor.common.fsm import ExecutionStatus as S
from opsconductor.lifecycle.execution_logging import SPEC_FIELDS
from opsconductor.lifecycle.maintenance_port import PostgresRedisMaintenance
from opsconductor.lifecycle.queue import jobs
from opsconductor.lifecycle.queue.redis_queue import RedisQueue
from opsconductor.worker.logic.reaper import reap_once

from .test_executions_repo import in_status


async def test_an_announced_lease_expiry_is_logged_with_the_executions_fields(
    db_pool: asyncpg.Pool, redis_client: Redis, redis_prefix: str
) -> None:
    record = await in_status(db_pool, S.RUNNING, mode="background")
    await db_pool.execute("UPDATE executions SET worker_id = 'worker-01' WHERE id = $1", record.id)
    row = await jobs.insert_queue_row(
        db_pool, execution_id=record.id, tenant_id=record.tenant_id, priority=50, max_attempts=3
    )
    now = [time.time()]
    queue = RedisQueue(redis_client, prefix=redis_prefix, clock=lambda: now[0])
    await queue.enqueue(row.id, record.id, record.tenant_id, 50, 3, 1, request_id="req-1")
    assert await queue.dequeue("worker-01", 5) is not None
    now[0] += 6  # the lease expired: its worker is gone, attempts remain
    # A reaper pass starts with nothing bound (the setup above bound this execution here).
    structlog.contextvars.clear_contextvars()
    # The records as the sink gets them: with the bound execution fields merged in.
    with structlog.testing.capture_logs(processors=[merge_contextvars]) as logs:
        report = await reap_once(
            PostgresRedisMaintenance(db_pool, queue), dedup_window=timedelta(days=1)
        )
    assert report.leases_requeued == 1
    (expired,) = [r for r in logs if r["event"] == "lease_expired"]
    assert {f for f in SPEC_FIELDS if f not in expired} == set()
    assert (expired["exec_id"], expired["request_id"]) == (str(record.id), "req-1")
