"""Fencing for queued work: which worker's lease token may write for an execution.

A worker that dequeues a job *claims* its execution: its lease token becomes the execution's
``lease_token``, and every later write of that worker (steps, transitions) is conditional on it.
If the job was already ``running`` — its previous worker died or was paused past its lease —
the claim is a takeover: the token is replaced, so the old worker's writes fail with
``StaleLeaseError`` from then on, and steps it left ``running`` go back to ``pending`` to be run
again (their idempotency key is the same, so the system acted upon can deduplicate).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID

import structlog

from opsconductor.common.fsm import TERMINAL, ExecutionStatus
from opsconductor.lifecycle.execution_logging import bind_execution
from opsconductor.lifecycle.storage.events import append_event
from opsconductor.lifecycle.storage.execution_failures import end_failed
from opsconductor.lifecycle.storage.execution_reads import bound_to_execution, get_execution
from opsconductor.lifecycle.storage.execution_records import (
    ExecutionRecord,
    PoolOrConnection,
    execution_from_row,
    lock_execution,
    transaction,
)
from opsconductor.lifecycle.storage.executions import transition
from opsconductor.lifecycle.storage.queries import query

log = structlog.get_logger(__name__)

_TAKE_OVER = query("take_over_execution")
_RESET_RUNNING_STEPS = query("reset_running_steps")
_RELEASE = query("release_claim")
_LOCK_FOR_CLAIM = query("lock_execution_for_claim")
_ATTEMPTS = query("execution_attempts")
_COUNT_RENEWAL = query("count_lease_renewal")


async def claim_execution(
    db: PoolOrConnection,
    execution_id: UUID,
    *,
    lease_token: UUID,
    worker_id: str,
    budget: timedelta,
) -> ExecutionRecord | None:
    """Make ``lease_token`` the execution's fencing token and mark it running.

    Returns the claimed execution (with steps), or ``None`` when there is nothing to run: the
    execution is gone, terminal, or waiting for an approval.
    """
    deadline = datetime.now(UTC) + budget
    async with transaction(db) as conn:
        row = await conn.fetchrow(_LOCK_FOR_CLAIM, execution_id)
        if row is None:
            return None
        status = ExecutionStatus(row["status"])
        if status in TERMINAL or status is ExecutionStatus.AWAITING_APPROVAL:
            return None
        if status is ExecutionStatus.RUNNING:
            await conn.execute(_TAKE_OVER, execution_id, lease_token, worker_id, deadline)
            reset = [r["step_id"] for r in await conn.fetch(_RESET_RUNNING_STEPS, execution_id)]
            await append_event(
                conn,
                tenant_id=row["tenant_id"],
                execution_id=execution_id,
                actor_id=worker_id,
                type="lease_taken_over",
                payload={
                    "previous_worker_id": row["worker_id"],
                    "worker_id": worker_id,
                    "steps_reset": reset,
                },
            )
            log.warning(
                "lease_taken_over",
                execution_id=str(execution_id),
                previous_worker_id=row["worker_id"],
                worker_id=worker_id,
                steps_reset=reset,
            )
        else:
            attempts = await conn.fetchval(_ATTEMPTS, execution_id)
            await transition(
                conn,
                execution_id,
                to=ExecutionStatus.RUNNING,
                by=worker_id,
                expected_from=status,
                worker_id=worker_id,
                fields={
                    "lease_token": lease_token,
                    "attempts": attempts + 1,
                    "deadline_at": deadline,
                },
                tenant_id=row["tenant_id"],
            )
        return await get_execution(conn, row["tenant_id"], execution_id)


async def release_claim(db: PoolOrConnection, execution_id: UUID, lease_token: UUID) -> bool:
    """Clear the fencing token if it is still ``lease_token`` (the job goes back to the queue)."""
    async with transaction(db) as conn:
        await lock_execution(conn, execution_id)
        status = await conn.execute(_RELEASE, execution_id, lease_token)
    return str(status).split()[-1] == "1"


_RESET_FOR_RETRY = query("reset_steps_for_retry")


async def requeue_execution(
    db: PoolOrConnection,
    execution_id: UUID,
    *,
    lease_token: UUID,
    by: str,
    reason: str,
    error_class: str | None = None,
    error_message: str | None = None,
) -> ExecutionRecord:
    """Put a running execution back in the queue (a retry, or a graceful shutdown).

    Fenced by ``lease_token``. Steps that succeeded keep their outcome (a resumed run skips
    them); the others go back to ``pending``. The fencing token is cleared: the next worker to
    dequeue the job claims it afresh.
    """
    async with transaction(db) as conn:
        locked = await lock_execution(conn, execution_id, lease_token=lease_token)
        reset = [r["step_id"] for r in await conn.fetch(_RESET_FOR_RETRY, execution_id)]
        fields: dict[str, object] = {"lease_token": None}
        if error_class is not None:
            fields |= {"error_class": error_class, "error_message": error_message}
        await transition(
            conn,
            execution_id,
            to=ExecutionStatus.QUEUED,
            by=by,
            expected_from=ExecutionStatus.RUNNING,
            lease_token=lease_token,
            fields=fields,
            event_type="execution_requeued",
            event_payload={"reason": reason, "steps_reset": reset, "error_class": error_class},
            tenant_id=locked["tenant_id"],
        )
        return await get_execution(conn, locked["tenant_id"], execution_id)


_RUNNING_BY = query("lock_running_execution_of_worker")


async def record_lease_expired(
    db: PoolOrConnection, execution_id: UUID, *, worker_id: str | None, lease_expirations: int
) -> bool:
    """Tell the execution's followers that ``worker_id``'s lease on it expired (the reaper
    reclaimed it): a ``lease_expired`` event, unless the execution ended or another worker
    took it over meanwhile (its ``lease_taken_over`` says so). Returns whether it was written.
    """
    async with transaction(db) as conn:
        tenant_id = await conn.fetchval(_RUNNING_BY, execution_id, worker_id)
        if tenant_id is None:
            return False
        await append_event(
            conn,
            tenant_id=tenant_id,
            execution_id=execution_id,
            actor_id="reaper",
            type="lease_expired",
            payload={"worker_id": worker_id, "lease_expirations": lease_expirations},
        )
    log.warning(
        "lease_expired",
        execution_id=str(execution_id),
        worker_id=worker_id,
        lease_expirations=lease_expirations,
    )
    return True


async def record_lease_renewal(db: PoolOrConnection, execution_id: UUID, lease_token: UUID) -> bool:
    """Count a lease renewal on the execution (spec §1.4 ``lease_renewals``), fenced."""
    async with transaction(db) as conn:
        status = await conn.execute(_COUNT_RENEWAL, execution_id, lease_token)
    return str(status).split()[-1] == "1"


_OVERDUE = query("overdue_executions")


async def fail_overdue_executions(
    db: PoolOrConnection, *, grace: timedelta, by: str = "reaper", limit: int = 1000
) -> list[UUID]:
    """Fail running executions whose deadline passed ``grace`` ago (their worker died).

    A live worker enforces the deadline itself; one past it by the grace period is gone. The
    execution ends ``failed`` with ``timed_out``; its fencing token is cleared, so a worker that
    comes back cannot write for it any more, and the locks it holds are released.
    """
    failed: list[UUID] = []
    async with transaction(db) as conn:
        rows = await conn.fetch(_OVERDUE, grace.total_seconds(), limit)
    for row in rows:
        # Its records (the transition, the locks released) are the execution's.
        with bind_execution(execution_from_row(row)):
            if await end_failed(
                db,
                row["id"],
                by=by,
                error_class="EXECUTION_TIMEOUT",
                error_message="deadline passed while no worker was running it",
                expected_from=ExecutionStatus.RUNNING,
                fail_running_steps=True,
                clear_lease=True,
                timed_out=True,
                release_locks=True,
            ):
                failed.append(row["id"])
    if failed:
        log.warning("overdue_executions_failed", count=len(failed))
    return failed


async def fail_lost_execution(
    db: PoolOrConnection,
    execution_id: UUID,
    *,
    error_class: str,
    error_message: str,
    by: str,
    lease_token: UUID | None = None,
) -> bool:
    """End a non-terminal execution ``failed`` (its job died in the queue); False if already
    terminal. Clears the fencing token and releases its locks. With ``lease_token``, only while
    that token still owns the execution (``StaleLeaseError`` otherwise)."""
    return await end_failed(
        db,
        execution_id,
        by=by,
        error_class=error_class,
        error_message=error_message,
        lease_token=lease_token,
        fail_running_steps=True,
        clear_lease=True,
        release_locks=True,
    )


_UNSTARTED_IMMEDIATE = query("unstarted_immediate_executions")


async def fail_unstarted_immediate(
    db: PoolOrConnection, *, grace: timedelta, by: str = "reaper", limit: int = 1000
) -> list[UUID]:
    """End ``failed`` (``DISPATCH_LOST``, key retired) immediate executions still ``pending`` or
    ``queued`` with no worker ``grace`` after they were created.

    A hand-over to a worker takes milliseconds; one that has not happened within ``grace`` never
    will. Each is a compare-and-set on its status, so a worker that starts it meanwhile wins.
    """
    async with transaction(db) as conn:
        rows = await conn.fetch(_UNSTARTED_IMMEDIATE, grace.total_seconds(), limit)
    failed: list[UUID] = []
    for row in rows:
        with await bound_to_execution(db, row["id"]):
            ended = await fail_unstarted_execution(
                db,
                row["id"],
                expected_from=ExecutionStatus(row["status"]),
                by=by,
                error_class="DISPATCH_LOST",
                error_message=(
                    "no worker started this immediate execution: it was never handed over "
                    "(the api stopped, or no worker answered); submit the plan again"
                ),
            )
        if ended:
            failed.append(row["id"])
    if failed:
        log.warning("unstarted_immediate_executions_failed", count=len(failed))
    return failed


async def fail_unstarted_execution(
    db: PoolOrConnection,
    execution_id: UUID,
    *,
    expected_from: ExecutionStatus,
    by: str,
    error_class: str,
    error_message: str,
) -> bool:
    """End ``failed`` an execution no worker started (it is still ``expected_from``) and retire
    its idempotency key: nothing ran, so the same plan may be submitted again at once.

    Returns False, changing nothing, when it has moved on meanwhile (a worker took it after all).
    """
    return await end_failed(
        db,
        execution_id,
        by=by,
        error_class=error_class,
        error_message=error_message,
        expected_from=expected_from,
        retire_key=True,
    )
