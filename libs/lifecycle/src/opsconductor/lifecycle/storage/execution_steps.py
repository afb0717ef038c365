"""Step rows of an execution: start, finish and skip, each with its event, fenced by lease token.

Every write first locks the execution row (the same lock status transitions take, so a step write
and a transition never interleave), checks the lease token when one is given
(:class:`StaleLeaseError`, nothing written), refuses once the execution is terminal (its
``execution_completed`` event must stay the last one) and then writes the step and its
``step_*`` event in one transaction. Import these through :mod:`.executions`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

import structlog

from opsconductor.common.errors import FSMError, NotFoundError
from opsconductor.common.fsm import TERMINAL, ExecutionStatus, StepStatus
from opsconductor.lifecycle.storage.events import append_event
from opsconductor.lifecycle.storage.execution_records import (
    PoolOrConnection,
    StepRecord,
    connection,
    lock_execution,
    step_from_row,
    transaction,
)

__all__ = ["finish_step", "load_steps", "skip_remaining_steps", "start_step"]

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
# The usual case of start and finish in one statement: lock the execution row (first, as the
# locking path does) if it is running and the lease token (when given) still owns it, then
# update the step if its status allows. No row back: the locking path finds out why.
_START_FAST = """
WITH e AS (
    SELECT id, tenant_id FROM executions
    WHERE id = $1 AND status = 'running'
      AND ($4::uuid IS NULL OR lease_token IS NOT DISTINCT FROM $4::uuid)
    FOR UPDATE
)
UPDATE execution_steps s
SET status = 'running', attempt = s.attempt + 1, worker_id = $3,
    started_at = clock_timestamp(), ended_at = NULL, duration_ms = NULL,
    result = NULL, error_class = NULL, error_message = NULL
FROM e
WHERE s.execution_id = e.id AND s.step_id = $2 AND s.status = ANY($5::varchar[])
RETURNING s.*, e.tenant_id
"""
_FINISH_FAST = """
WITH e AS (
    SELECT id, tenant_id FROM executions
    WHERE id = $1 AND status = 'running'
      AND ($7::uuid IS NULL OR lease_token IS NOT DISTINCT FROM $7::uuid)
    FOR UPDATE
), t AS (SELECT clock_timestamp() AS now)
UPDATE execution_steps s
SET status = $3, result = $4, error_class = $5, error_message = $6,
    ended_at = GREATEST(t.now, s.started_at),
    duration_ms = (extract(epoch FROM GREATEST(t.now, s.started_at) - s.started_at) * 1000)::bigint
FROM e, t
WHERE s.execution_id = e.id AND s.step_id = $2 AND s.status = 'running'
RETURNING s.*, e.tenant_id
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
    async with transaction(db) as conn:
        row = await conn.fetchrow(
            _START_FAST, execution_id, step_id, worker_id, lease_token, _STARTABLE_VALUES
        )
        if row is not None:
            tenant_id = row["tenant_id"]
        else:  # refused (or raced): lock both rows and say exactly why
            execution = await _lock_running_execution(conn, execution_id, lease_token, "running")
            tenant_id = execution["tenant_id"]
            current = await _lock_step(conn, execution_id, step_id)
            if current not in _STARTABLE:
                raise _illegal_step(step_id, current, StepStatus.RUNNING)
            row = await conn.fetchrow(_START, execution_id, step_id, worker_id)
        step = step_from_row(row)
        await append_event(
            conn,
            tenant_id=tenant_id,
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
    async with transaction(db) as conn:
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
            tenant_id = row["tenant_id"]
        else:  # refused (or raced): lock both rows and say exactly why
            execution = await _lock_running_execution(
                conn, execution_id, lease_token, outcome.value
            )
            tenant_id = execution["tenant_id"]
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
            tenant_id=tenant_id,
            execution_id=execution_id,
            actor_id=step.worker_id,
            type=f"step_{outcome.value}",
            payload=payload,
        )
    log.info(
        "step_finished",
        execution_id=str(execution_id),
        step_id=step_id,
        status=outcome.value,
        duration_ms=step.duration_ms,
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
