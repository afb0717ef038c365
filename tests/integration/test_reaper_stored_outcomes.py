"""The outcomes a reaper pass ends are counted in Postgres by the ending statement, not in its
process (a CronJob's process is gone before any scrape), and exported by the api's gauge
refresh; an execution ended anywhere else is counted in-process only: never both, never
neither."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import asyncpg
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from opsconductor.common.fsm import ExecutionStatus as S
from opsconductor.lifecycle.maintenance_port import PostgresRedisMaintenance
from opsconductor.lifecycle.queue import jobs
from opsconductor.lifecycle.queue.gauges import publish_gauges
from opsconductor.lifecycle.queue.redis_queue import RedisQueue
from opsconductor.lifecycle.storage.execution_leases import fail_overdue_executions
from opsconductor.lifecycle.storage.execution_records import ExecutionRecord
from opsconductor.worker.logic.reaper import reap_once

from .test_executions_repo import in_status


async def _stored(pool: asyncpg.Pool) -> dict[tuple[str, str], int]:
    rows = await pool.fetch("SELECT name, labels, value FROM metric_counters")
    return {(r["name"], str(sorted(r["labels"].items()))): int(r["value"]) for r in rows}


def _in_process(record: ExecutionRecord) -> dict[str, Any]:
    labels = {"mode": record.execution_mode, "sla_class": record.sla_class}
    return {
        "timed_out": REGISTRY.get_sample_value("opsc_executions_timed_out_total", labels) or 0,
        "exported": REGISTRY.get_sample_value("opsc_reaper_executions_timed_out_total", labels),
    }


async def _overdue(pool: asyncpg.Pool) -> ExecutionRecord:
    record = await in_status(pool, S.RUNNING)
    await pool.execute(
        "UPDATE executions SET deadline_at = clock_timestamp() - interval '1 minute' WHERE id = $1",
        record.id,
    )
    return record


async def test_an_overdue_execution_the_reaper_ends_is_counted_once_in_the_store(
    db_pool: asyncpg.Pool,
) -> None:
    record = await _overdue(db_pool)
    before_store, before = await _stored(db_pool), _in_process(record)
    report = await reap_once(
        PostgresRedisMaintenance(db_pool, None),
        dedup_window=timedelta(days=1),
        deadline_grace=timedelta(seconds=1),
    )
    assert report.deadlines_failed == 1
    after_store, after = await _stored(db_pool), _in_process(record)
    moved = {k: v - before_store.get(k, 0) for k, v in after_store.items()}
    key = str(
        sorted(
            {
                "mode": record.execution_mode,
                "sla_class": record.sla_class,
                "action_class": record.action_class,
                "status": "failed",
                "error_class": "EXECUTION_TIMEOUT",
                "timed_out": True,
            }.items()
        )
    )
    assert {k: v for k, v in moved.items() if v} == {("reaper_executions_ended", key): 1}
    assert after["timed_out"] == before["timed_out"]  # not in the reaper's process
    # Exported by whoever refreshes the gauges (the api): the row's count, not the process's.
    assert after["exported"] is not None
    assert after["exported"] >= 1
    await publish_gauges(db_pool, None)
    assert _in_process(record)["exported"] == after["exported"]
    # A second pass finds nothing: nothing counted again.
    await reap_once(PostgresRedisMaintenance(db_pool, None), dedup_window=timedelta(days=1))
    assert await _stored(db_pool) == after_store


async def test_the_same_ending_outside_a_reaper_pass_is_counted_in_process_only(
    db_pool: asyncpg.Pool,
) -> None:
    record = await _overdue(db_pool)
    before_store, before = await _stored(db_pool), _in_process(record)
    assert await fail_overdue_executions(db_pool, grace=timedelta(seconds=1)) == [record.id]
    assert await _stored(db_pool) == before_store
    assert _in_process(record)["timed_out"] == before["timed_out"] + 1


class _Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_a_job_the_reaper_dead_letters_is_counted_once_in_the_store(
    db_pool: asyncpg.Pool, redis_client: Redis, redis_prefix: str
) -> None:
    """Its worker died on the last attempt: the pass moves it to the DLQ and ends the execution
    failed (LEASE_EXPIRED); both counted by their statements, neither in the process."""
    record = await in_status(db_pool, S.RUNNING, mode="background")
    row = await jobs.insert_queue_row(
        db_pool, execution_id=record.id, tenant_id=record.tenant_id, priority=50, max_attempts=1
    )
    clock = _Clock()
    queue = RedisQueue(redis_client, prefix=redis_prefix, clock=clock)
    await queue.enqueue(row.id, record.id, record.tenant_id, 50, 1, 1)
    assert await queue.dequeue("worker-01", 5) is not None
    clock.now += 6  # the lease expired: the worker is gone
    failed_labels = {"error_class": "LEASE_EXPIRED", "mode": "background"}
    in_process_before = (
        REGISTRY.get_sample_value("opsc_dlq_moves_total"),
        REGISTRY.get_sample_value("opsc_executions_failed_total", failed_labels),
    )
    before = await _stored(db_pool)
    report = await reap_once(
        PostgresRedisMaintenance(db_pool, queue), dedup_window=timedelta(days=1)
    )
    assert report.dead_lettered == 1
    moved = {k: v - before.get(k, 0) for k, v in (await _stored(db_pool)).items()}
    ended = str(
        sorted(
            {
                "mode": "background",
                "sla_class": record.sla_class,
                "action_class": record.action_class,
                "status": "failed",
                "error_class": "LEASE_EXPIRED",
                "timed_out": False,
            }.items()
        )
    )
    assert {k: v for k, v in moved.items() if v} == {
        ("reaper_dlq_moves", "[]"): 1,
        ("reaper_executions_ended", ended): 1,
    }
    assert (
        REGISTRY.get_sample_value("opsc_dlq_moves_total"),
        REGISTRY.get_sample_value("opsc_executions_failed_total", failed_labels),
    ) == in_process_before
    # Exported by the pass's own gauge refresh, as the api's does: the stored total.
    stored_total = (await _stored(db_pool))[("reaper_dlq_moves", "[]")]
    assert REGISTRY.get_sample_value("opsc_reaper_dlq_moves_total") == stored_total
