"""Correlation across the queue: the job carries the submit's request id and W3C traceparent.

The api's real ``Submissions`` queues the job (its request id and the submit's trace context go
into the Redis job payload), the worker's real ``BackgroundConsumer`` runs it and uses the
payload's values — falling back to the execution row's for a job queued before jobs carried
them — and the reaper's re-push after a Redis loss puts them back from the execution. Values in
Redis that are malformed or oversized are dropped, never trusted and never a crash.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opsc_test_actions import read_ledger
from redis.asyncio import Redis
from structlog.testing import capture_logs

from opsconductor.actions.planning import ExecutionMode
from opsconductor.api.logic.submission import SubmitRequest
from opsconductor.lifecycle.execution_logging import SPEC_FIELDS
from opsconductor.lifecycle.queue import RedisQueue
from opsconductor.lifecycle.queue.reconcile import reconcile_queue
from opsconductor.lifecycle.queue.records import decode_hash
from opsconductor.lifecycle.storage.execution_reads import get_execution
from tests.integration.test_consumer_retries import (
    SUBMITTER,
    TENANT,
    WORKER,
    Rig,
    probe_plan,
    rig,
)
from tests.integration.test_queue_redis import FakeClock, take

__all__ = ["rig"]  # fixtures used here (redis_client comes from conftest.py)

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"


@contextmanager
def in_trace(trace_id: int = TRACE_ID) -> Iterator[None]:
    """Make a (remote) span of ``trace_id`` current, as the gRPC instrumentation does."""
    parent = NonRecordingSpan(
        SpanContext(trace_id, SPAN_ID, is_remote=True, trace_flags=TraceFlags(1))
    )
    token = otel_context.attach(trace.set_span_in_context(parent))
    try:
        yield
    finally:
        otel_context.detach(token)


async def submit(rig: Rig, ledger: Path, request_id: str) -> tuple[UUID, UUID]:
    with in_trace():
        result = await rig.submissions.submit(
            SUBMITTER,
            "",
            SubmitRequest(
                tenant_id=TENANT,
                plan=probe_plan(ledger),
                requested_mode=ExecutionMode.BACKGROUND,
                request_id=request_id,
            ),
        )
    assert result.job_id is not None
    return result.execution.id, result.job_id


async def job_hash(redis: Redis, queue: RedisQueue, job_id: UUID) -> dict[str, str]:
    return decode_hash(await redis.hgetall(queue.job_key(job_id)))


async def run_capturing(rig: Rig) -> list[dict[str, Any]]:
    job = await take(rig.queue, WORKER)
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        await rig.consumer.process(job)
    return logs


def trace_id_of(traceparent: str | None) -> str | None:
    return None if traceparent is None else traceparent.split("-")[1]


async def test_the_job_payload_carries_the_submits_request_id_and_trace_context(
    rig: Rig, redis_client: Redis, tmp_path: Path
) -> None:
    execution_id, job_id = await submit(rig, tmp_path / "ledger.jsonl", "rid-payload-1")
    fields = await job_hash(redis_client, rig.queue, job_id)
    assert (fields["request_id"], fields["traceparent"]) == ("rid-payload-1", TRACEPARENT)
    job = await take(rig.queue, WORKER)
    assert (job.job_id, job.request_id, job.trace_context) == (job_id, "rid-payload-1", TRACEPARENT)
    # The execution keeps its own copy (the fallback for jobs queued before jobs carried one).
    record = await get_execution(rig.pool, TENANT, execution_id)
    assert (record.request_id, record.trace_context) == ("rid-payload-1", TRACEPARENT)


async def test_the_worker_logs_and_traces_with_the_payloads_correlation(
    rig: Rig, tmp_path: Path
) -> None:
    """The execution row lost its copy: everything the worker does for the job still carries
    the submit's request id, and the step runs in the submit's trace."""
    ledger = tmp_path / "ledger.jsonl"
    execution_id, _job_id = await submit(rig, ledger, "rid-payload-2")
    await rig.pool.execute(
        "UPDATE executions SET request_id = NULL, trace_context = NULL WHERE id = $1",
        execution_id,
    )
    logs = await run_capturing(rig)
    assert (await get_execution(rig.pool, TENANT, execution_id)).status == "succeeded"
    [line] = read_ledger(ledger)
    assert line["request_id"] == "rid-payload-2"
    assert trace_id_of(line["traceparent"]) == f"{TRACE_ID:032x}"
    mine = [r for r in logs if r.get("exec_id") == str(execution_id)]
    events = {r["event"] for r in mine}
    assert {"execution_started", "step_finished", "execution_finished"} <= events, events
    for record in mine:
        assert [f for f in SPEC_FIELDS if f not in record] == [], record
        assert record["request_id"] == "rid-payload-2", record["event"]


async def test_a_job_queued_without_correlation_falls_back_to_the_execution_row(
    rig: Rig, redis_client: Redis, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    execution_id, job_id = await submit(rig, ledger, "rid-row-3")
    # As a job queued by the previous release: no correlation fields in its hash.
    await redis_client.hdel(rig.queue.job_key(job_id), "request_id", "traceparent")
    logs = await run_capturing(rig)
    [line] = read_ledger(ledger)
    assert line["request_id"] == "rid-row-3"
    assert trace_id_of(line["traceparent"]) == f"{TRACE_ID:032x}"
    started = [
        r for r in logs if r["event"] == "execution_started" and r["exec_id"] == str(execution_id)
    ]
    assert [r["request_id"] for r in started] == ["rid-row-3"]


async def test_malformed_or_oversized_correlation_in_redis_is_dropped_not_a_crash(
    rig: Rig, redis_client: Redis, tmp_path: Path
) -> None:
    """Written behind the queue's back: a forged log line as the request id and a megabyte as
    the traceparent. The job runs, with the execution's own values."""
    ledger = tmp_path / "ledger.jsonl"
    execution_id, job_id = await submit(rig, ledger, "rid-row-4")
    await redis_client.hset(
        rig.queue.job_key(job_id),
        mapping={"request_id": '{"event":"forged"}\n', "traceparent": "0" * 1_000_000},
    )
    job = await take(rig.queue, WORKER)
    assert (job.request_id, job.trace_context) == (None, None)
    await rig.consumer.process(job)
    assert (await get_execution(rig.pool, TENANT, execution_id)).status == "succeeded"
    [line] = read_ledger(ledger)
    assert (line["request_id"], trace_id_of(line["traceparent"])) == (
        "rid-row-4",
        f"{TRACE_ID:032x}",
    )


async def test_enqueue_leaves_out_values_that_are_no_request_id_or_traceparent(
    redis_client: Redis, redis_prefix: str
) -> None:
    queue = RedisQueue(redis_client, prefix=redis_prefix, clock=FakeClock(start=1_700_000_000))
    job_id = UUID(int=7)
    assert await queue.enqueue(
        job_id,
        UUID(int=8),
        TENANT,
        50,
        3,
        1,
        request_id="x" * 101,
        trace_context="00-zz-yy-01",
    )
    fields = await job_hash(redis_client, queue, job_id)
    assert "request_id" not in fields
    assert "traceparent" not in fields
    job = await take(queue)
    assert (job.request_id, job.trace_context) == (None, None)


async def test_a_job_repushed_after_redis_lost_it_carries_the_executions_correlation(
    rig: Rig, redis_client: Redis, tmp_path: Path
) -> None:
    _execution_id, job_id = await submit(rig, tmp_path / "ledger.jsonl", "rid-repush-5")
    keys = [k async for k in redis_client.scan_iter(match=f"{rig.queue.key_prefix}*")]
    await redis_client.delete(*keys)  # Redis restarted empty
    report = await reconcile_queue(rig.queue, rig.pool)
    assert report.repushed >= 1
    fields = await job_hash(redis_client, rig.queue, job_id)
    assert (fields["request_id"], fields["traceparent"]) == ("rid-repush-5", TRACEPARENT)
