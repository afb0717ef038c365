"""Enqueue an execution: the one recipe of every path that queues one (a background submit, an
approval releasing an execution, a dead-letter requeue).

In the caller's Postgres transaction, in this order:

1. the ``execution_queue`` row (its id is the job id; idempotent per execution);
2. what the caller records about the job (``before_queued``: e.g. the requeue's audit event,
   which names the job and comes before the ``queued`` transition in the event log);
3. the execution's transition to ``queued`` (a compare-and-set on ``expected_from``);
4. the Redis push, last: a Redis failure raises
   :class:`~opsconductor.common.errors.QueueUnavailableError` and rolls everything back, so a
   refusal leaves no row behind.

A worker dequeuing the job before the commit defers it until the row is visible. Once committed,
the caller may :meth:`~opsconductor.lifecycle.queue.redis_queue.RedisQueue.announce` it to wake an
idle worker at once (polling finds it otherwise).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from opsconductor.common.fsm import ExecutionStatus
from opsconductor.lifecycle.queue.jobs import QueueRow, insert_queue_row
from opsconductor.lifecycle.queue.redis_queue import RedisQueue
from opsconductor.lifecycle.storage.execution_records import ExecutionRecord
from opsconductor.lifecycle.storage.executions import (
    CreatedQueued,
    NewExecution,
    create_queued_execution,
    transition,
)
from opsconductor.lifecycle.storage.policies import TimeoutPolicy
from opsconductor.lifecycle.storage.quota_usage import WaitingUsage

__all__ = ["Enqueued", "enqueue_execution", "submit_queued"]


@dataclass(frozen=True)
class Enqueued:
    """The execution as its transition to ``queued`` wrote it (steps not re-read) and its job."""

    record: ExecutionRecord
    job: QueueRow


async def enqueue_execution(
    conn: Any,
    queue: RedisQueue,
    record: ExecutionRecord,
    policy: TimeoutPolicy,
    *,
    by: str,
    expected_from: ExecutionStatus,
    event_payload: Mapping[str, Any] | None = None,
    before_queued: Callable[[QueueRow], Awaitable[None]] | None = None,
    trace_context: str | None = None,
) -> Enqueued:
    """Queue ``record`` on ``conn`` (inside the caller's transaction; see the module docstring).

    ``policy`` gives the job's attempt budget and lease-renewal limit; the job carries the
    execution's correlation (request id, and ``trace_context`` or else the execution's
    traceparent) so its run logs and traces as the request that created it.
    """
    job = await insert_queue_row(
        conn,
        execution_id=record.id,
        tenant_id=record.tenant_id,
        priority=record.priority,
        max_attempts=policy.max_attempts,
    )
    if before_queued is not None:
        await before_queued(job)
    queued = await transition(
        conn,
        record.id,
        to=ExecutionStatus.QUEUED,
        by=by,
        expected_from=expected_from,
        event_payload=event_payload,
        tenant_id=record.tenant_id,
    )
    await queue.enqueue(
        job.id,
        record.id,
        record.tenant_id,
        job.priority,
        job.max_attempts,
        policy.max_lease_renewals,
        request_id=record.request_id,
        trace_context=trace_context or record.trace_context,
    )
    return Enqueued(queued, job)


async def submit_queued(
    conn: Any,
    queue: RedisQueue,
    new: NewExecution,
    policy: TimeoutPolicy,
    *,
    dedup_window: timedelta,
    max_waiting: int,
    by: str,
) -> CreatedQueued | WaitingUsage:
    """A background submit: steps 1 and 3 above, with the quota admission and the creation, in
    one statement (:func:`~opsconductor.lifecycle.storage.executions.create_queued_execution`),
    then the Redis push (step 4) for a new execution, all in the caller's transaction ``conn``.
    A duplicate or a refusal pushes nothing."""
    created = await create_queued_execution(
        conn,
        new,
        dedup_window=dedup_window,
        max_waiting=max_waiting,
        max_attempts=policy.max_attempts,
        by=by,
    )
    if isinstance(created, WaitingUsage) or not created.created:
        return created
    record = created.record
    assert created.job_id is not None  # created with its queue row
    await queue.enqueue(
        created.job_id,
        record.id,
        record.tenant_id,
        record.priority,
        policy.max_attempts,
        policy.max_lease_renewals,
        request_id=record.request_id,
        trace_context=record.trace_context,
    )
    return created
