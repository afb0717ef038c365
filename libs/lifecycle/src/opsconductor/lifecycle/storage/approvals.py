"""The approvals repository: requests, the one decision, invalidation, expiry, and the binding.

An approval is bound to one execution and to the exact plan it saw: its ``plan_hash`` and
``plan_snapshot_hash`` are copied from the execution row when it is requested, never from the
caller. Every change is written with its execution event in one transaction, and always locks
the execution row *before* the approval row (the order :func:`~.executions.request_cancel`
uses too), so concurrent deciders, cancellers and the reaper serialize instead of deadlocking.

* :func:`request_approval` — a plan needing approval: ``pending → awaiting_approval`` with a
  pending whole-plan request (``approval_requested``).
* :func:`request_step_approval` — a level-3 execution pausing before a step:
  ``running → awaiting_approval`` (fenced by the lease token, which it clears) with a pending
  request for that step (``step_approval_requested``).
* :func:`decide` — the first decision wins: a compare-and-set ``WHERE state = 'pending' AND
  expires_at > now``; a loser gets :class:`ApprovalDecidedError` (or expired / invalidated). The
  CHECK ``approval_not_self`` backs the "requester never decides" rule
  (:class:`SelfApprovalError`). A rejection ends the execution ``rejected``.
* :func:`invalidate_approval` / :func:`enforce_binding` — a broken binding invalidates the
  approval; an execution still waiting for it ends ``failed``.
* :func:`expire_pending` — the reaper's pass over requests past ``expires_at``.

An execution that ends while waiting has its remaining steps skipped and the locks it holds
(a paused level-3 execution keeps them) released; expired and invalidated ones also have their
idempotency key retired, since nothing ran and the same plan may simply be requested again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

import asyncpg
import structlog

from opsconductor.common.errors import (
    ApprovalDecidedError,
    ApprovalExpiredError,
    ApprovalInvalidatedError,
    ConflictError,
    FailedPreconditionError,
    NotFoundError,
    OpsConductorError,
    SelfApprovalError,
)
from opsconductor.common.fsm import ExecutionStatus
from opsconductor.lifecycle.storage.approval_records import (
    ApprovalRecord,
    ApprovalState,
    approval_from_row,
    as_approval_id,
    close_pending_approvals,
    get_approval,
)
from opsconductor.lifecycle.storage.events import append_event
from opsconductor.lifecycle.storage.execution_failures import end_failed
from opsconductor.lifecycle.storage.execution_reads import bound_to_execution
from opsconductor.lifecycle.storage.execution_records import (
    ExecutionRecord,
    PoolOrConnection,
    connection,
    lock_execution,
    transaction,
)
from opsconductor.lifecycle.storage.executions import (
    retire_idempotency_key,
    skip_remaining_steps,
    transition,
)
from opsconductor.lifecycle.storage.locks import release_execution_locks
from opsconductor.lifecycle.storage.queries import query

__all__ = [
    "ApprovalDecision",
    "binding_mismatches",
    "decide",
    "enforce_binding",
    "expire_pending",
    "fail_undispatched",
    "granted_by",
    "invalidate_approval",
    "request_approval",
    "request_step_approval",
    "step_approved",
    "undecidable_error",
]

log = structlog.get_logger(__name__)

_S = ExecutionStatus

_INSERT = query("create_approval")
_PENDING_FOR_STEP = query("pending_approval_for_step")
_MARK_STEP_WAITING = query("mark_step_awaiting_approval")
_DECIDE = query("decide_approval")
_INVALIDATE = query("invalidate_approval")
_DUE = query("due_approvals")
_EXPIRE = query("expire_approval")
_UNDISPATCHED = query("undispatched_approved_executions")
_GRANTED_BY = query("execution_approved_by")
_STEP_APPROVED = query("step_approved")
_CANCEL_REQUESTED = query("execution_cancel_requested")
_EXECUTION_OF_TENANT_APPROVAL = query("execution_of_tenant_approval")
_APPROVAL = query("get_approval")
_EXECUTION_OF_APPROVAL = query("execution_of_approval")


@dataclass(frozen=True)
class ApprovalDecision:
    """Who decided what, how they authenticated, from where, and why."""

    approve: bool
    decided_by: str
    auth_method: str
    source_ip: str | None
    comment: str | None = None


def _payload(approval: ApprovalRecord, **extra: Any) -> dict[str, Any]:
    return {
        "approval_id": str(approval.id),
        "level": approval.level,
        "step_id": approval.step_id,
        **extra,
    }


async def request_approval(
    db: PoolOrConnection, execution_id: UUID, *, ttl: timedelta, by: str
) -> ApprovalRecord:
    """Open the whole-plan request of a new execution: ``pending → awaiting_approval``.

    The request's level is the execution's ``approval_level``; it expires ``ttl`` from now.
    """
    async with transaction(db) as conn:
        locked = await lock_execution(conn, execution_id)
        row = await conn.fetchrow(_INSERT, execution_id, None, ttl)
        if row is None:
            raise ConflictError("an approval request is already open for this execution")
        approval = approval_from_row(row)
        await transition(
            conn,
            execution_id,
            to=_S.AWAITING_APPROVAL,
            by=by,
            expected_from=_S.PENDING,
            fields={"approval_id": approval.id},
            event_type="approval_requested",
            event_payload=_payload(
                approval,
                requested_by=approval.requested_by,
                runbook_url=approval.runbook_url,
                expires_at=approval.expires_at.isoformat(),
            ),
            tenant_id=locked["tenant_id"],
        )
    log.info(
        "approval_requested",
        approval_id=str(approval.id),
        execution_id=str(execution_id),
        level=approval.level,
    )
    return approval


async def request_step_approval(
    db: PoolOrConnection,
    execution_id: UUID,
    step_id: str,
    *,
    lease_token: UUID,
    ttl: timedelta,
    by: str,
) -> ApprovalRecord | None:
    """Pause a running level-3 execution before ``step_id`` until a person approves that step.

    Fenced by ``lease_token``, which is cleared: the worker gives its job up and whoever
    approves the step queues the execution again. Re-pausing (after a takeover) reuses the open
    request. If cancellation was requested meanwhile the execution ends ``cancelled`` instead
    (its locks released) and None is returned.
    """
    async with transaction(db) as conn:
        locked = await lock_execution(conn, execution_id, lease_token=lease_token)
        tenant_id = locked["tenant_id"]
        cancelled = await conn.fetchval(_CANCEL_REQUESTED, execution_id)
        if cancelled:
            await skip_remaining_steps(
                conn, execution_id, 0, lease_token=lease_token, reason="cancelled"
            )
            await transition(
                conn,
                execution_id,
                to=_S.CANCELLED,
                by=by,
                expected_from=_S.RUNNING,
                lease_token=lease_token,
                fields={"lease_token": None},
                tenant_id=tenant_id,
            )
            await release_execution_locks(conn, execution_id)
            return None
        row = await conn.fetchrow(_INSERT, execution_id, step_id, ttl)
        if row is None:
            row = await conn.fetchrow(_PENDING_FOR_STEP, execution_id, step_id)
        approval = approval_from_row(row)
        await conn.execute(_MARK_STEP_WAITING, execution_id, step_id)
        await transition(
            conn,
            execution_id,
            to=_S.AWAITING_APPROVAL,
            by=by,
            expected_from=_S.RUNNING,
            lease_token=lease_token,
            fields={"lease_token": None},
            event_type="step_approval_requested",
            event_payload=_payload(approval, expires_at=approval.expires_at.isoformat()),
            tenant_id=tenant_id,
        )
    log.info(
        "step_approval_requested",
        approval_id=str(approval.id),
        execution_id=str(execution_id),
        step_id=step_id,
    )
    return approval


async def decide(
    db: PoolOrConnection, approval_id: UUID | str, *, tenant_id: str, decision: ApprovalDecision
) -> ApprovalRecord:
    """Record the first and only decision on a pending approval; return it.

    Raises :class:`NotFoundError` (absent or another tenant's), :class:`SelfApprovalError`
    (the requester deciding), :class:`ApprovalDecidedError` (someone decided first),
    :class:`ApprovalExpiredError`, :class:`ApprovalInvalidatedError`, or
    :class:`FailedPreconditionError` when the execution no longer waits for it. A rejection ends
    the execution ``rejected`` in the same transaction; an approval leaves the execution to the
    caller, who dispatches it within the same transaction when it passes a connection.
    """
    aid = as_approval_id(approval_id)
    state = ApprovalState.APPROVED if decision.approve else ApprovalState.REJECTED
    async with transaction(db) as conn:
        execution_id = await conn.fetchval(_EXECUTION_OF_TENANT_APPROVAL, aid, tenant_id)
        if execution_id is None:
            raise NotFoundError("approval not found", approval_id=str(aid))
        locked = await lock_execution(conn, execution_id)
        try:
            row = await conn.fetchrow(
                _DECIDE,
                aid,
                state.value,
                decision.decided_by,
                decision.auth_method,
                decision.source_ip,
                decision.comment,
            )
        except asyncpg.CheckViolationError as exc:
            if exc.constraint_name == "approval_not_self":
                raise SelfApprovalError(approval_id=str(aid)) from exc
            raise
        if row is None:
            current = await conn.fetchrow(_APPROVAL, aid)
            raise undecidable_error(approval_from_row(current))
        approval = approval_from_row(row)
        if locked["status"] != _S.AWAITING_APPROVAL.value:
            raise FailedPreconditionError(
                f"the execution is {locked['status']}, no longer awaiting this approval",
                approval_id=str(aid),
                status=locked["status"],
            )
        await append_event(
            conn,
            tenant_id=tenant_id,
            execution_id=execution_id,
            actor_id=decision.decided_by,
            type=f"{approval.event_prefix}_{'granted' if decision.approve else 'rejected'}",
            payload=_payload(
                approval,
                decided_by=decision.decided_by,
                auth_method=decision.auth_method,
                source_ip=decision.source_ip,
                comment=decision.comment,
            ),
        )
        if not decision.approve:
            await _end_waiting(
                conn,
                execution_id,
                tenant_id,
                to=_S.REJECTED,
                by=decision.decided_by,
                reason="rejected",
                approval=approval,
            )
    log.info(
        "approval_decided",
        approval_id=str(aid),
        execution_id=str(execution_id),
        state=state.value,
        decided_by=decision.decided_by,
        step_id=approval.step_id,
    )
    return approval


def undecidable_error(current: ApprovalRecord) -> OpsConductorError:
    """Why ``current`` can no longer be decided: decided first, invalidated, or expired."""
    details = {"approval_id": str(current.id), "state": current.state.value}
    if current.state in (ApprovalState.APPROVED, ApprovalState.REJECTED):
        return ApprovalDecidedError(
            f"the approval was already {current.state.value} by {current.decided_by}; "
            "the first decision stands",
            **details,
        )
    if current.state is ApprovalState.INVALIDATED:
        return ApprovalInvalidatedError(**details)
    return ApprovalExpiredError(**details)


async def invalidate_approval(
    db: PoolOrConnection, approval_id: UUID, *, by: str, reason: str, **details: Any
) -> ApprovalRecord | None:
    """Mark a pending or approved approval ``invalidated`` (``approval_invalidated``).

    An execution still waiting for it ends ``failed`` with ``APPROVAL_INVALIDATED`` (steps
    skipped, locks released, key retired); a running one is left to its worker. Returns None
    when the approval was already closed.
    """
    async with transaction(db) as conn:
        execution_id = await conn.fetchval(_EXECUTION_OF_APPROVAL, approval_id)
        if execution_id is None:
            raise NotFoundError("approval not found", approval_id=str(approval_id))
        locked = await lock_execution(conn, execution_id)
        row = await conn.fetchrow(_INVALIDATE, approval_id)
        if row is None:
            return None
        approval = approval_from_row(row)
        await append_event(
            conn,
            tenant_id=approval.tenant_id,
            execution_id=execution_id,
            actor_id=by,
            type="approval_invalidated",
            payload=_payload(approval, reason=reason, **details),
        )
        if locked["status"] == _S.AWAITING_APPROVAL.value:
            await _end_waiting(
                conn,
                execution_id,
                approval.tenant_id,
                to=_S.FAILED,
                by=by,
                reason=reason,
                approval=approval,
                error=ApprovalInvalidatedError(),
            )
    log.warning(
        "approval_invalidated", approval_id=str(approval_id), reason=reason, by=by, **details
    )
    return approval


def binding_mismatches(approval: ApprovalRecord, record: ExecutionRecord) -> list[str]:
    """What of ``record`` the approval does not cover (empty: the binding holds)."""
    mismatched = []
    if approval.execution_id != record.id:
        mismatched.append("execution_id")
    if approval.plan_hash != record.plan_hash:
        mismatched.append("plan_hash")
    if approval.plan_snapshot_hash != record.plan_snapshot_hash:
        mismatched.append("plan_snapshot_hash")
    if approval.level < record.approval_level:
        mismatched.append("level")
    return mismatched


async def enforce_binding(
    db: PoolOrConnection, record: ExecutionRecord, *, by: str, require_approved: bool = True
) -> ApprovalRecord | None:
    """Check that ``record``'s approval covers exactly this execution's plan; None at level 0.

    Any mismatch invalidates the approval (committed first when ``db`` is a pool) and raises
    :class:`ApprovalInvalidatedError`. With ``require_approved`` an approval that is not granted
    raises :class:`FailedPreconditionError` (reason ``FAILED_PRECONDITION``).
    """
    if record.approval_level == 0:
        return None
    if record.approval_id is None:
        raise ApprovalInvalidatedError(
            "the execution needs an approval and none is bound to it",
            execution_id=str(record.id),
        )
    approval = await get_approval(db, record.tenant_id, record.approval_id)
    mismatched = binding_mismatches(approval, record)
    if mismatched:
        await invalidate_approval(
            db, approval.id, by=by, reason="binding_mismatch", mismatched=mismatched
        )
        raise ApprovalInvalidatedError(
            execution_id=str(record.id), approval_id=str(approval.id), mismatched=mismatched
        )
    if require_approved and approval.state is not ApprovalState.APPROVED:
        raise FailedPreconditionError(
            f"the execution's approval is {approval.state.value}, not approved",
            execution_id=str(record.id),
            approval_id=str(approval.id),
            state=approval.state.value,
        )
    return approval


async def expire_pending(db: PoolOrConnection, *, by: str = "reaper", limit: int = 1000) -> int:
    """Expire requests past ``expires_at`` (reaper); their executions end ``failed``.

    Each expiry is its own transaction (``approval_expired``, then the execution ``failed`` with
    ``APPROVAL_EXPIRED``, steps skipped, locks released, key retired). Returns how many expired.
    """
    async with transaction(db) as conn:
        due = await conn.fetch(_DUE, limit)
    expired = 0
    for item in due:
        with await bound_to_execution(db, item["execution_id"]):
            expired += await _expire(db, item, by)
    if expired:
        log.info("approvals_expired", count=expired)
    return expired


async def _expire(db: PoolOrConnection, item: Any, by: str) -> int:
    """One expiry in its own transaction: 1 if it expired, 0 if decided or closed meanwhile."""
    async with transaction(db) as conn:
        locked = await lock_execution(conn, item["execution_id"])
        row = await conn.fetchrow(_EXPIRE, item["id"])
        if row is None:
            return 0
        approval = approval_from_row(row)
        await append_event(
            conn,
            tenant_id=approval.tenant_id,
            execution_id=approval.execution_id,
            actor_id=by,
            type="approval_expired",
            payload=_payload(approval, expires_at=approval.expires_at.isoformat()),
        )
        if locked["status"] == _S.AWAITING_APPROVAL.value:
            await _end_waiting(
                conn,
                approval.execution_id,
                approval.tenant_id,
                to=_S.FAILED,
                by=by,
                reason="approval_expired",
                approval=approval,
                error=ApprovalExpiredError(),
            )
    return 1


async def fail_undispatched(
    db: PoolOrConnection, *, grace: timedelta, by: str = "reaper", limit: int = 1000
) -> int:
    """Fail approved immediate executions no worker started within ``grace`` (reaper).

    The approvals service starts an approved immediate execution right after the decision
    commits; if it died in between, nobody would. Each is ended ``failed``
    (``DISPATCH_LOST``, key retired) under compare-and-set: a worker starting it at the same
    moment wins or loses cleanly. Returns how many were failed.
    """
    async with transaction(db) as conn:
        rows = await conn.fetch(_UNDISPATCHED, grace, limit)
    failed = 0
    for row in rows:
        with await bound_to_execution(db, row["id"]):
            ended = await end_failed(
                db,
                row["id"],
                by=by,
                error_class="DISPATCH_LOST",
                error_message="approved, but no worker was asked to run it",
                expected_from=_S.AWAITING_APPROVAL,
                skip_steps=False,
                retire_key=True,
                event_payload={"approval_id": str(row["approval_id"])},
            )
        if ended:
            failed += 1  # else started (or ended) meanwhile
    if failed:
        log.warning("undispatched_executions_failed", count=failed)
    return failed


async def granted_by(
    db: PoolOrConnection, execution_id: UUID, *, actor_id: str, tenant_id: str
) -> bool:
    """Whether ``actor_id`` granted the approval bound to ``execution_id`` in ``tenant_id``."""
    async with connection(db) as conn:
        found = await conn.fetchval(_GRANTED_BY, execution_id, tenant_id, actor_id)
    return found is not None


async def step_approved(db: PoolOrConnection, record: ExecutionRecord, step_id: str) -> bool:
    """Whether ``step_id`` of ``record`` has an approval granted for this very plan."""
    async with connection(db) as conn:
        found = await conn.fetchval(
            _STEP_APPROVED, record.id, step_id, record.plan_hash, record.plan_snapshot_hash
        )
    return found is not None


async def _end_waiting(
    conn: Any,
    execution_id: UUID,
    tenant_id: str,
    *,
    to: ExecutionStatus,
    by: str,
    reason: str,
    approval: ApprovalRecord,
    error: OpsConductorError | None = None,
) -> None:
    """End an execution that was waiting for ``approval``: skip, close, transition, unlock."""
    await skip_remaining_steps(conn, execution_id, 0, reason=reason)
    await close_pending_approvals(
        conn, execution_id, state=ApprovalState.INVALIDATED, by=by, reason=reason
    )
    fields: dict[str, Any] = {}
    if error is not None:
        fields = {"error_class": error.reason, "error_message": error.message}
    await transition(
        conn,
        execution_id,
        to=to,
        by=by,
        expected_from=_S.AWAITING_APPROVAL,
        fields=fields,
        event_payload={"approval_id": str(approval.id), "reason": reason},
        tenant_id=tenant_id,
    )
    await release_execution_locks(conn, execution_id)
    if to is not _S.REJECTED:
        # Nothing ran: the same plan may be requested again at once.
        await retire_idempotency_key(conn, execution_id)
