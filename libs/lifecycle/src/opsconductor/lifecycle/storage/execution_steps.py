"""Step rows of an execution: start, finish and skip, each with its event, fenced by lease token.

Every write first locks the execution row (the same lock status transitions take, so a step write
and a transition never interleave), checks the lease token when one is given
(:class:`StaleLeaseError`, nothing written), refuses once the execution is terminal (its
``execution_completed`` event must stay the last one) and then writes the step and its
``step_*`` event atomically: in one statement in the usual case, in one transaction when the
statement was refused and the row locks must say why. Import these through :mod:`.executions`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

import structlog

from opsconductor.common.errors import FSMError, NotFoundError
from opsconductor.common.fsm import TERMINAL, ExecutionStatus, StepStatus
from opsconductor.lifecycle.storage.events import EVENTS_CHANNEL, append_event
from opsconductor.lifecycle.storage.execution_records import (
    PoolOrConnection,
    StepRecord,
    connection,
    lock_execution,
    step_from_row,
    transaction,
)

__all__ = [
    "finish_step",
    "load_steps",
    "skip_remaining_steps",
    "start_step",
    "start_step_unless_cancelled",
]

log = structlog.get_logger(__name__)

# A step may be (re)started unless it already reached an outcome that must not be redone: a
# crashed worker's step is still "running", a retried job's failed step runs again.
_STARTABLE = frozenset(
    {StepStatus.PENDING, StepStatus.RUNNING, StepStatus.FAILED, StepStatus.AWAITING_APPROVAL}
)
_FINISHED = frozenset({StepStatus.SUCCEEDED, StepStatus.FAILED})
_SKIPPABLE = [StepStatus.PENDING.value, StepStatus.AWAITING_APPROVAL.value]

_SELECT_STEPS = "SELECT * FROM execution_steps WHERE execution_id = $1 ORDER BY position"
_LOCK_STEP = """
SELECT status FROM execution_steps WHERE execution_id = $1 AND step_id = $2 FOR UPDATE
"""
_START = """
UPDATE execution_steps
SET status = 'running', attempt = attempt + 1, worker_id = $3,
    started_at = clock_timestamp(), ended_at = NULL, duration_ms = NULL,
    result = NULL, error_class = NULL, error_message = NULL
WHERE execution_id = $1 AND step_id = $2
RETURNING *
"""
# One clock reading for both ended_at and duration_ms.
_FINISH = """
WITH t AS (SELECT clock_timestamp() AS now)
UPDATE execution_steps s
SET status = $3, result = $4, error_class = $5, error_message = $6,
    ended_at = GREATEST(t.now, s.started_at),
    duration_ms = (extract(epoch FROM GREATEST(t.now, s.started_at) - s.started_at) * 1000)::bigint
FROM t
WHERE s.execution_id = $1 AND s.step_id = $2
RETURNING s.*
"""
_STARTABLE_VALUES = sorted(s.value for s in _STARTABLE)
# The usual case of start and finish in one statement, its event included: the UPDATE of the
# execution row takes the row lock (first, as the locking path does) if it is running, the
# lease token (when given) still owns it and the step's status allows the write, and hands out
# the event's seq; the step is written and its event appended in the same statement. No row
# back: the locking path finds out why. Step writers all hold the execution row lock, so the
# step's status the UPDATE saw is the one the step UPDATE sees.
_STARTABLE_STEP = """
    status = 'running' AND ($4::uuid IS NULL OR lease_token IS NOT DISTINCT FROM $4::uuid)
    AND EXISTS (
        SELECT 1 FROM execution_steps
        WHERE execution_id = $1 AND step_id = $2 AND status = ANY($5::varchar[])
    )"""
_START_STEP = """
s AS (
    UPDATE execution_steps s
    SET status = 'running', attempt = s.attempt + 1, worker_id = $3,
        started_at = clock_timestamp(), ended_at = NULL, duration_ms = NULL,
        result = NULL, error_class = NULL, error_message = NULL
    FROM e
    WHERE e.go AND s.execution_id = e.id AND s.step_id = $2 AND s.status = ANY($5::varchar[])
    RETURNING s.*, e.tenant_id, e.event_seq
), ev AS (
    INSERT INTO execution_events (execution_id, tenant_id, actor_id, seq, type, payload)
    SELECT s.execution_id, s.tenant_id, $3, s.event_seq, 'step_started', jsonb_build_object(
        'step_id', s.step_id, 'position', s.position, 'action', s.action,
        'attempt', s.attempt, 'worker_id', $3::text
    )
    FROM s
    RETURNING execution_id, seq
)"""
_NOTIFIED = f"""(SELECT count(pg_notify('{EVENTS_CHANNEL}', ev.execution_id::text || ':' || ev.seq))
     FROM ev) AS notified"""
_START_FAST = f"""
WITH e AS (
    UPDATE executions SET event_seq = event_seq + 1
    WHERE id = $1 AND {_STARTABLE_STEP}
    RETURNING id, tenant_id, event_seq, true AS go
), {_START_STEP}
SELECT s.*, {_NOTIFIED} FROM s
"""
# The cancellation check between steps and the start of the next step in one statement: the
# check is counted whatever happens, and the step starts (as in _START_FAST) only if no
# cancellation was requested. The conditions are the row's own (re-checked on its newest
# version by the UPDATE). No row back: the execution does not exist.
_CHECK_AND_START = f"""
WITH e AS (
    UPDATE executions SET cancel_checks_performed = cancel_checks_performed + 1,
        event_seq = event_seq + CASE WHEN cancelled_at IS NULL AND {_STARTABLE_STEP}
                                     THEN 1 ELSE 0 END
    WHERE id = $1
    RETURNING id, tenant_id, event_seq, cancelled_at IS NOT NULL AS cancelled,
        cancelled_at IS NULL AND {_STARTABLE_STEP} AS go
), {_START_STEP}
SELECT e.cancelled, s.*, {_NOTIFIED} FROM e LEFT JOIN s ON true
"""
_FINISH_FAST = f"""
WITH e AS (
    UPDATE executions SET event_seq = event_seq + 1
    WHERE id = $1 AND status = 'running'
      AND ($7::uuid IS NULL OR lease_token IS NOT DISTINCT FROM $7::uuid)
      AND EXISTS (
          SELECT 1 FROM execution_steps
          WHERE execution_id = $1 AND step_id = $2 AND status = 'running'
      )
    RETURNING id, tenant_id, event_seq
), t AS (SELECT clock_timestamp() AS now),
s AS (
    UPDATE execution_steps s
    SET status = $3, result = $4, error_class = $5, error_message = $6,
        ended_at = GREATEST(t.now, s.started_at),
        duration_ms = (
            extract(epoch FROM GREATEST(t.now, s.started_at) - s.started_at) * 1000
        )::bigint
    FROM e, t
    WHERE s.execution_id = e.id AND s.step_id = $2 AND s.status = 'running'
    RETURNING s.*, e.tenant_id, e.event_seq
), ev AS (
    INSERT INTO execution_events (execution_id, tenant_id, actor_id, seq, type, payload)
    SELECT s.execution_id, s.tenant_id, s.worker_id, s.event_seq, 'step_' || $3,
        jsonb_build_object(
            'step_id', s.step_id, 'position', s.position, 'action', s.action,
            'attempt', s.attempt, 'duration_ms', s.duration_ms
        ) || CASE WHEN $5::text IS NULL THEN '{{}}'::jsonb
                  ELSE jsonb_build_object('error_class', $5::text) END
    FROM s
    RETURNING execution_id, seq
)
SELECT s.*, {_NOTIFIED} FROM s
"""
_SKIP = """
UPDATE execution_steps
SET status = 'skipped', ended_at = GREATEST(clock_timestamp(), started_at)
WHERE execution_id = $1 AND position >= $2 AND status = ANY($3::varchar[])
RETURNING *
"""


async def load_steps(db: PoolOrConnection, execution_id: UUID) -> tuple[StepRecord, ...]:
    """All steps of an execution in position order."""
    async with connection(db) as conn:
        rows = await conn.fetch(_SELECT_STEPS, execution_id)
    return tuple(step_from_row(row) for row in rows)


async def start_step(
    db: PoolOrConnection,
    execution_id: UUID,
    step_id: str,
    *,
    worker_id: str | None,
    lease_token: UUID | None = None,
) -> StepRecord:
    """Mark a step running (attempt + 1) and append ``step_started``; return the step.

    The execution must be ``running``; a step that already succeeded or was skipped cannot start
    again (:class:`FSMError`): resumed jobs skip finished steps instead.
    """
    async with connection(db) as conn:
        row = await conn.fetchrow(
            _START_FAST, execution_id, step_id, worker_id, lease_token, _STARTABLE_VALUES
        )
    if row is None:
        return await _start_locked(db, execution_id, step_id, worker_id, lease_token)
    return _started(row)


async def start_step_unless_cancelled(
    db: PoolOrConnection,
    execution_id: UUID,
    step_id: str,
    *,
    worker_id: str | None,
    lease_token: UUID | None = None,
) -> StepRecord | None:
    """The cancellation check between steps, then :func:`start_step`, in one statement.

    The check is counted in ``cancel_checks_performed`` (as ``check_cancelled`` counts it);
    None when a cancellation was requested (nothing started), else the started step.
    """
    async with connection(db) as conn:
        row = await conn.fetchrow(
            _CHECK_AND_START, execution_id, step_id, worker_id, lease_token, _STARTABLE_VALUES
        )
    if row is None:
        raise NotFoundError("execution not found", execution_id=str(execution_id))
    if row["cancelled"]:
        return None
    if row["step_id"] is None:
        return await _start_locked(db, execution_id, step_id, worker_id, lease_token)
    return _started(row)


def _started(row: Mapping[str, Any]) -> StepRecord:
    step = step_from_row(row)
    log.info(
        "step_started",
        execution_id=str(step.execution_id),
        step_id=step.step_id,
        attempt=step.attempt,
    )
    return step


async def _start_locked(
    db: PoolOrConnection,
    execution_id: UUID,
    step_id: str,
    worker_id: str | None,
    lease_token: UUID | None,
) -> StepRecord:
    """Refused (or raced) in one statement: lock both rows and say exactly why."""
    async with transaction(db) as conn:
        execution = await _lock_running_execution(conn, execution_id, lease_token, "running")
        current = await _lock_step(conn, execution_id, step_id)
        if current not in _STARTABLE:
            raise _illegal_step(step_id, current, StepStatus.RUNNING)
        step = step_from_row(await conn.fetchrow(_START, execution_id, step_id, worker_id))
        await append_event(
            conn,
            tenant_id=execution["tenant_id"],
            execution_id=execution_id,
            actor_id=worker_id,
            type="step_started",
            payload={
                "step_id": step.step_id,
                "position": step.position,
                "action": step.action,
                "attempt": step.attempt,
                "worker_id": worker_id,
            },
        )
    log.info("step_started", execution_id=str(execution_id), step_id=step_id, attempt=step.attempt)
    return step


async def finish_step(
    db: PoolOrConnection,
    execution_id: UUID,
    step_id: str,
    *,
    status: StepStatus,
    result: Any = None,
    error_class: str | None = None,
    error_message: str | None = None,
    lease_token: UUID | None = None,
) -> StepRecord:
    """Record a running step's outcome (succeeded or failed) and append ``step_<status>``."""
    outcome = StepStatus(status)
    if outcome not in _FINISHED:
        raise ValueError(f"a step finishes succeeded or failed, not {outcome.value}")
    async with connection(db) as conn:
        row = await conn.fetchrow(
            _FINISH_FAST,
            execution_id,
            step_id,
            outcome.value,
            result,
            error_class,
            error_message,
            lease_token,
        )
    if row is not None:
        step = step_from_row(row)
    else:
        step = await _finish_locked(
            db, execution_id, step_id, outcome, result, error_class, error_message, lease_token
        )
    log.info(
        "step_finished",
        execution_id=str(execution_id),
        step_id=step_id,
        status=outcome.value,
        duration_ms=step.duration_ms,
    )
    return step


async def _finish_locked(
    db: PoolOrConnection,
    execution_id: UUID,
    step_id: str,
    outcome: StepStatus,
    result: Any,
    error_class: str | None,
    error_message: str | None,
    lease_token: UUID | None,
) -> StepRecord:
    """Refused (or raced) in one statement: lock both rows and say exactly why."""
    async with transaction(db) as conn:
        execution = await _lock_running_execution(conn, execution_id, lease_token, outcome.value)
        current = await _lock_step(conn, execution_id, step_id)
        if current is not StepStatus.RUNNING:
            raise _illegal_step(step_id, current, outcome)
        row = await conn.fetchrow(
            _FINISH, execution_id, step_id, outcome.value, result, error_class, error_message
        )
        step = step_from_row(row)
        payload: dict[str, Any] = {
            "step_id": step.step_id,
            "position": step.position,
            "action": step.action,
            "attempt": step.attempt,
            "duration_ms": step.duration_ms,
        }
        if error_class is not None:
            payload["error_class"] = error_class
        await append_event(
            conn,
            tenant_id=execution["tenant_id"],
            execution_id=execution_id,
            actor_id=step.worker_id,
            type=f"step_{outcome.value}",
            payload=payload,
        )
    return step


async def skip_remaining_steps(
    db: PoolOrConnection,
    execution_id: UUID,
    from_position: int,
    *,
    lease_token: UUID | None = None,
    reason: str | None = None,
) -> list[StepRecord]:
    """Mark every not-yet-started step at or after ``from_position`` skipped, one event each.

    Steps that ran keep their outcome. The execution must not be terminal yet.
    """
    async with transaction(db) as conn:
        locked = await lock_execution(conn, execution_id, lease_token=lease_token)
        status = ExecutionStatus(locked["status"])
        if status in TERMINAL:
            raise _illegal_execution(execution_id, status, "skipped")
        rows = await conn.fetch(_SKIP, execution_id, from_position, _SKIPPABLE)
        steps = sorted((step_from_row(row) for row in rows), key=lambda s: s.position)
        for step in steps:
            await append_event(
                conn,
                tenant_id=locked["tenant_id"],
                execution_id=execution_id,
                actor_id=None,
                type="step_skipped",
                payload={
                    "step_id": step.step_id,
                    "position": step.position,
                    "action": step.action,
                    "reason": reason,
                },
            )
    if steps:
        log.info("steps_skipped", execution_id=str(execution_id), count=len(steps), reason=reason)
    return steps


async def _lock_running_execution(
    conn: Any, execution_id: UUID, lease_token: UUID | None, step_target: str
) -> Mapping[str, Any]:
    locked = await lock_execution(conn, execution_id, lease_token=lease_token)
    status = ExecutionStatus(locked["status"])
    if status is not ExecutionStatus.RUNNING:
        raise _illegal_execution(execution_id, status, step_target)
    return locked


async def _lock_step(conn: Any, execution_id: UUID, step_id: str) -> StepStatus:
    current = await conn.fetchval(_LOCK_STEP, execution_id, step_id)
    if current is None:
        raise NotFoundError("step not found", execution_id=str(execution_id), step_id=step_id)
    return StepStatus(current)


def _illegal_step(step_id: str, current: StepStatus, target: StepStatus) -> FSMError:
    return FSMError(
        f"Illegal state transition {current.value} -> {target.value}",
        from_status=current.value,
        to_status=target.value,
        step_id=step_id,
    )


def _illegal_execution(execution_id: UUID, status: ExecutionStatus, step_target: str) -> FSMError:
    # Step writes happen only while the execution runs; once it is terminal nothing may follow
    # its execution_completed event.
    return FSMError(
        f"Illegal state transition: execution is {status.value}, a step cannot become "
        f"{step_target}",
        from_status=status.value,
        to_status=step_target,
        execution_id=str(execution_id),
    )
