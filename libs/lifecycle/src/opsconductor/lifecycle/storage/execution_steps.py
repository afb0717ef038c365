"""Step rows of an execution: start, finish and skip, each with its event, fenced by lease token.

Every write first locks the execution row (the same lock status transitions take, so a step write
and a transition never interleave), checks the lease token when one is given
(:class:`StaleLeaseError`, nothing written), refuses once the execution is terminal (its
``execution_completed`` event must stay the last one) and then writes the step and its
``step_*`` event atomically: in one statement in the usual case, in one transaction when the
statement was refused and the row locks must say why. Import these through :mod:`.executions`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import timedelta
from typing import Any
from uuid import UUID

import structlog

from opsconductor.common.errors import FSMError, NotFoundError
from opsconductor.common.fsm import TERMINAL, ExecutionStatus, StepStatus
from opsconductor.lifecycle.storage import locks
from opsconductor.lifecycle.storage.events import append_event
from opsconductor.lifecycle.storage.execution_records import (
    PoolOrConnection,
    StepRecord,
    connection,
    lock_execution,
    step_from_row,
    transaction,
)
from opsconductor.lifecycle.storage.locks import HeldLock, LockRequest, LockSet
from opsconductor.lifecycle.storage.queries import query

__all__ = [
    "finish_step",
    "load_steps",
    "lock_and_start_step",
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

_SELECT_STEPS = query("load_steps")
_LOCK_STEP = query("lock_step")
_START = query("start_step")
_FINISH = query("finish_step")
_STARTABLE_VALUES = sorted(s.value for s in _STARTABLE)
_START_FAST = query("start_step_fast")
_CHECK_AND_START = query("check_cancel_and_start_step")
_LOCK_CHECK_AND_START = query("lock_check_cancel_and_start_step")
_FINISH_FAST = query("finish_step_fast")
_SKIP = query("skip_remaining_steps")


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


async def lock_and_start_step(
    db: PoolOrConnection,
    execution_id: UUID,
    step_id: str,
    *,
    worker_id: str | None,
    lease_token: UUID | None,
    lock: LockRequest,
    owner_token: UUID,
    ttl: timedelta,
) -> tuple[LockSet, StepRecord | None]:
    """A run's one lock, then :func:`start_step_unless_cancelled`, in one statement.

    The lock is taken as :func:`~.locks.acquire_locks` takes it for ``owner_token`` on behalf
    of ``execution_id`` (the same metric, span and logs), and the check and start run only
    once it is granted: ``(locks, None)`` when a cancellation was requested (the lock is held:
    the run's end frees it), else ``(locks, step)``.

    Raises:
        ResourceBusyError: the key is held by another owner; nothing was taken, checked or
            started.
        NotFoundError: no such execution; nothing was taken.
        StorageError: the database failed.
        Whatever :func:`start_step` raises when the start is refused (a lost lease, a step
            that cannot start): the lock is released first.
    """
    locks.check_ttl(ttl)
    key = lock.key
    with locks.timed_acquire(1) as timing:
        try:
            with locks.storage_errors("acquire"):
                async with connection(db) as conn:
                    row = await conn.fetchrow(
                        _LOCK_CHECK_AND_START,
                        execution_id,
                        step_id,
                        worker_id,
                        lease_token,
                        _STARTABLE_VALUES,
                        key,
                        lock.tenant_id,
                        lock.target_ref,
                        lock.action,
                        owner_token,
                        ttl,
                    )
                    if row["found"] and row["lock_fencing_token"] is None:
                        raise await locks.busy_error(conn, [key], set(), owner_token, execution_id)
        except asyncio.CancelledError:
            # The statement may have committed before the cancellation landed: free by token.
            await locks.release_surviving_cancellation(db, [key], owner_token)
            raise
        if not row["found"]:
            timing.outcome = "error"
            raise NotFoundError("execution not found", execution_id=str(execution_id))
        timing.outcome = "acquired"
    held = LockSet(
        owner_token,
        (HeldLock(key, owner_token, row["lock_fencing_token"], row["lock_expires_at"]),),
    )
    locks.log_acquired(held, execution_id)
    if row["cancelled"]:
        return held, None
    if row["step_id"] is not None:
        return held, _started(row)
    try:
        return held, await _start_locked(db, execution_id, step_id, worker_id, lease_token)
    except BaseException:
        # Refused (or raced): the run never started under this lock.
        await locks.release_surviving_cancellation(db, [key], owner_token)
        raise


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
