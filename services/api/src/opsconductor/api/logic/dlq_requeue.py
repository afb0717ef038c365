"""RequeueDlqEntry: re-run a dead-lettered execution as a NEW execution with a fresh budget.

A dead-lettered execution is ``failed``, and terminal states never transition (spec §4.1), so
a requeue cannot put it back in the queue. It creates a new execution instead, a copy of the old
one's frozen record: same tenant, submitter, plan snapshot, hashes and idempotency key (the old
execution's key is retired first, so the new one may hold it), same priority; a fresh attempt
budget from the timeout policy. Everything happens in ONE Postgres transaction, with the Redis
push last before the commit: the new execution is queued by the one queue recipe every path
uses (the lifecycle port's ``requeue_dead_letter``: the recipe a background submit's and an
approval's release use too), so a Redis failure rolls
it all back and the entry stays open. This module decides (may it be requeued, as what); every
read and write is a call of the lifecycle port, in its transaction:

1. lock the DLQ entry (refused if it was requeued already, naming by whom and as what);
2. retire the old execution's idempotency key, create the new execution (event
   ``execution_started``, actor: the submitter);
3. the recipe: its queue row; then (the recipe's ``before_queued``) ``dlq_requeued`` recorded on
   it (actor: the admin; payload: ``requeued_from``, ``dlq_id``, the job id, the old attempts and
   error) and the entry marked requeued (``requeued_at``, ``requeued_by``); the move to
   ``queued`` (by the admin); the Redis push;
4. the new execution read back with its steps (the transition's row carries none), returned.

The old execution is not touched: ``execution_completed`` stays its last event. The links go
both ways: the new execution's ``dlq_requeued`` event names the old one, and the entry (which
points at the old one) names the new one through that event (the port's ``lock_dead_letter``
reports it when a second requeue is refused).

The worker re-authorizes the *submitter* before running the new execution, as for any queued
job: a submitter who lost the plan's permissions since cannot have it run by an admin's requeue.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from uuid import UUID

import structlog

from opsconductor.common.errors import (
    ConflictError,
    DeadLetterNotRequeueableError,
    QueueUnavailableError,
)
from opsconductor.common.tracing import current_traceparent
from opsconductor.lifecycle.facade import (
    DLQ_REQUEUED_EVENT,
    DlqEntry,
    ExecutionLifecycle,
    ExecutionRecord,
    NewExecution,
    TimeoutPolicy,
)

__all__ = [
    "DLQ_REQUEUED_EVENT",
    "DeadLetterNotRequeueableError",
    "RequeueResult",
    "requeue_dead_letter",
]

log = structlog.get_logger(__name__)

_MAX_REQUEST_ID = 100  # executions.request_id is VARCHAR(100)


@dataclass(frozen=True)
class RequeueResult:
    """The entry (now marked requeued), the new execution (``queued``) and its queue job."""

    entry: DlqEntry
    execution: ExecutionRecord
    job_id: UUID


def _rerun_of(old: ExecutionRecord, *, request_id: str | None, record_only: bool) -> NewExecution:
    """The new execution: the old one's frozen record, nothing re-decided but record-only."""
    return NewExecution(
        tenant_id=old.tenant_id,
        actor_id=old.actor_id,
        request_id=None if request_id is None else request_id[:_MAX_REQUEST_ID],
        # The requeue's trace: the new run's spans continue the request that requeued it.
        trace_context=current_traceparent(),
        idempotency_key=old.idempotency_key,
        plan_hash=old.plan_hash,
        plan_snapshot=old.plan_snapshot,
        plan_snapshot_hash=old.plan_snapshot_hash,
        execution_mode="background",
        sla_class=old.sla_class,
        action_class=old.action_class,
        approval_level=old.approval_level,
        priority=old.priority,
        timeout_policy_id=old.timeout_policy_id,
        timeout_ms=old.timeout_ms,
        estimated_duration_ms=old.estimated_duration_ms,
        record_only=record_only,
        steps=[(s.step_id, s.position, s.action, s.action_class) for s in old.steps],
    )


def _check_requeueable(
    old: ExecutionRecord, policies: Mapping[str, TimeoutPolicy]
) -> TimeoutPolicy:
    if not old.is_terminal:
        raise DeadLetterNotRequeueableError(
            f"execution {old.id} is still {old.status.value}; requeue it once it has ended",
            execution_id=str(old.id),
            status=old.status.value,
        )
    if old.approval_level > 0:
        # Its approval covered one run; a re-run needs a new decision: submit the plan again.
        raise DeadLetterNotRequeueableError(
            f"execution {old.id} needed approval level {old.approval_level}; submit the plan "
            "again to have the re-run approved",
            execution_id=str(old.id),
            approval_level=old.approval_level,
        )
    policy = policies.get(old.timeout_policy_id or "")
    if policy is None:
        raise DeadLetterNotRequeueableError(
            f"execution {old.id} ran under timeout policy {old.timeout_policy_id!r}, which no "
            "longer exists; submit the plan again",
            execution_id=str(old.id),
            timeout_policy_id=old.timeout_policy_id or "",
        )
    return policy


async def requeue_dead_letter(
    lifecycle: ExecutionLifecycle,
    policies: Mapping[str, TimeoutPolicy],
    *,
    dlq_id: UUID,
    by: str,
    tenant_scope: str | None,
    request_id: str | None,
    record_only: bool | None,
    dedup_window: timedelta,
) -> RequeueResult:
    """Re-run the execution of DLQ entry ``dlq_id`` as a new queued execution (module docstring).

    ``tenant_scope`` limits the lookup to one tenant (a tenant admin): another tenant's entry is
    "not found". ``record_only`` None keeps the old execution's setting. Raises
    :class:`NotFoundError`, :class:`~opsconductor.common.errors.DlqEntryRequeuedError`,
    :class:`DeadLetterNotRequeueableError`, :class:`ConflictError` (a live execution of the same
    plan holds its idempotency key) and :class:`QueueUnavailableError`; each leaves no trace.
    """
    if not lifecycle.queue_configured:
        raise QueueUnavailableError("no queue is configured for background execution")
    async with lifecycle.transaction() as tx:
        entry = await lifecycle.lock_dead_letter(tx, dlq_id, tenant_id=tenant_scope)
        old = await lifecycle.get(entry.tenant_id, entry.execution_id, tx=tx)
        policy = _check_requeueable(old, policies)
        await lifecycle.retire_key(old.id, tx=tx)
        new = _rerun_of(
            old,
            request_id=request_id,
            record_only=old.record_only if record_only is None else record_only,
        )
        record, created = await lifecycle.create(new, dedup_window=dedup_window, tx=tx)
        if not created:
            raise ConflictError(
                f"execution {record.id} of the same plan holds its idempotency key "
                f"({record.status.value}); there is nothing to requeue",
                execution_id=str(record.id),
                status=record.status.value,
            )
        # The port adds the job's id; the entry is marked requeued in the same transaction.
        queued, marked = await lifecycle.requeue_dead_letter(
            tx,
            entry,
            record,
            policy,
            by=by,
            event_payload={
                "dlq_id": str(dlq_id),
                "requeued_from": str(old.id),
                "requeued_by": by,
                "max_attempts": policy.max_attempts,
                "previous_attempts": entry.attempts,
                "previous_error_class": entry.error_class,
                "request_id": request_id,
            },
        )
        record = await lifecycle.get(record.tenant_id, record.id, tx=tx)
    log.info(
        "dlq_entry_requeued",
        dlq_id=str(dlq_id),
        requeued_from=str(old.id),
        execution_id=str(record.id),
        job_id=str(queued.job_id),
        tenant_id=record.tenant_id,
        by=by,
    )
    return RequeueResult(entry=marked, execution=record, job_id=queued.job_id)
