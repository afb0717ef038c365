"""An in-memory :class:`~opsconductor.lifecycle.approval_port.ApprovalLifecycle` for unit tests,
over an :class:`~opsconductor.lifecycle.fake.InMemoryLifecycle`: its executions (a grant's
release is that fake's ``enqueue``, a rejection moves its execution) and the requests it keeps
(``approvals``: a cancel through the lifecycle port closes them, a level-3 pause opens one, and
its transactions roll them back with everything else).

It enforces what the storage functions do: a request is bound to the execution's own hashes,
level and requester (never the caller's) and only one is open per execution and step; reads and
decisions are tenant-scoped (another tenant's approval is not found, a malformed id names none);
the first decision wins (a compare-and-set on ``pending`` and unexpired, losers told why), the
requester never decides (the ``approval_not_self`` CHECK) and a decision needs the execution
still awaiting it; a rejection, an invalidation of an awaited approval, ends the execution
(remaining steps skipped, its other open requests invalidated, its locks released; failed
ones have their key retired); a step pause is fenced by the lease token, and a cancellation
requested meanwhile ends the execution cancelled instead. The worker's checks: a binding is
read from the stored request (a mismatch with the execution invalidates it), a step counts as
approved only for the plan's own hashes, and a paused execution's locks are extended all or
nothing under their owner's token (``core.locks``). Not modelled: events other than
the transitions. Every behaviour here also runs against :class:`PostgresApprovals`
(``tests/integration/test_lifecycle_facade.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from opsconductor.common.errors import (
    ApprovalInvalidatedError,
    ConflictError,
    FailedPreconditionError,
    FSMError,
    NotFoundError,
    OpsConductorError,
    SelfApprovalError,
    StaleLeaseError,
)
from opsconductor.common.fsm import ExecutionStatus, StepStatus
from opsconductor.lifecycle.fake import InMemoryLifecycle
from opsconductor.lifecycle.storage.approval_records import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    ApprovalRecord,
    ApprovalState,
    as_approval_id,
)
from opsconductor.lifecycle.storage.approvals import (
    ApprovalDecision,
    binding_mismatches,
    undecidable_error,
)
from opsconductor.lifecycle.storage.execution_reads import as_execution_id
from opsconductor.lifecycle.storage.execution_records import ExecutionRecord
from opsconductor.lifecycle.storage.locks import HeldLock, LockSet
from opsconductor.lifecycle.storage.paging import (
    decode_page_token,
    encode_page_token,
    invalid_page_request,
)

__all__ = ["InMemoryApprovals"]

_S = ExecutionStatus
#: The step statuses a pause before a step marks awaiting approval (the storage's rule).
_PAUSABLE = frozenset({StepStatus.PENDING, StepStatus.RUNNING, StepStatus.FAILED})


class InMemoryApprovals:
    """The approvals of ``core``'s executions, in a dict keyed by approval id."""

    def __init__(self, core: InMemoryLifecycle) -> None:
        self.core = core

    @property
    def approvals(self) -> dict[UUID, ApprovalRecord]:
        """The requests, kept by ``core`` (rolled back with its transactions)."""
        return self.core.approvals

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return self.core.transaction()

    # -- requests ---------------------------------------------------------------------------

    def _execution(self, execution_id: UUID) -> ExecutionRecord:
        if execution_id not in self.core.records:
            raise NotFoundError("execution not found", execution_id=str(execution_id))
        return self.core._current(execution_id)

    def _expect(
        self, execution_id: UUID, expected_from: ExecutionStatus, to: ExecutionStatus
    ) -> None:
        """``FSMError`` unless the execution is ``expected_from`` (the transition's CAS)."""
        current = self.core.executions[execution_id].status
        if current is not expected_from:
            raise FSMError(
                f"Illegal state transition {current.value} -> {to.value}",
                from_status=current.value,
                to_status=to.value,
                expected_from=[expected_from.value],
            )

    def _transition(
        self,
        execution_id: UUID,
        to: ExecutionStatus,
        *,
        expected_from: ExecutionStatus,
        by: str,
        payload: Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        self._expect(execution_id, expected_from, to)
        self.core._move(execution_id, to, by=by, payload=payload)
        if fields:
            self.core.records[execution_id] = replace(self.core.records[execution_id], **fields)

    async def request(
        self, execution_id: UUID, *, ttl: timedelta, by: str, tx: Any = None
    ) -> ApprovalRecord:
        record = self._execution(execution_id)
        if self.core.open_approval(execution_id, None) is not None:
            raise ConflictError("an approval request is already open for this execution")
        self._expect(execution_id, _S.PENDING, _S.AWAITING_APPROVAL)  # before any write
        approval = self.core.new_approval(record, None, ttl)
        self._transition(
            execution_id,
            _S.AWAITING_APPROVAL,
            expected_from=_S.PENDING,
            by=by,
            payload={"approval_id": str(approval.id), "level": approval.level, "step_id": None},
            approval_id=approval.id,
        )
        return self._with_plan(approval)

    async def request_step(
        self, execution_id: UUID, step_id: str, *, lease_token: UUID, ttl: timedelta, by: str
    ) -> ApprovalRecord | None:
        record = self._execution(execution_id)
        execution = self.core._fenced(execution_id, lease_token)
        if execution.cancelled_at is not None:
            # Cancelled meanwhile: it ends cancelled instead, its locks released.
            self._expect(execution_id, _S.RUNNING, _S.CANCELLED)
            self.core._skip(execution_id)
            self.core._move(execution_id, _S.CANCELLED, by=by, payload=None)
            execution.lease_token = None
            self.core._release_execution_locks(execution_id)
            return None
        self._expect(execution_id, _S.RUNNING, _S.AWAITING_APPROVAL)
        approval = self.core.open_approval(execution_id, step_id) or self.core.new_approval(
            record, step_id, ttl
        )
        self._mark_waiting(execution_id, step_id)
        self._transition(
            execution_id,
            _S.AWAITING_APPROVAL,
            expected_from=_S.RUNNING,
            by=by,
            payload={"approval_id": str(approval.id), "level": approval.level, "step_id": step_id},
        )
        execution.lease_token = None  # the worker gives its job up
        return self._with_plan(approval)

    def _mark_waiting(self, execution_id: UUID, step_id: str) -> None:
        """The paused step awaits approval, unless it already ended (the storage's rule)."""
        record = self.core.records[execution_id]
        steps = tuple(
            replace(step, status=StepStatus.AWAITING_APPROVAL)
            if step.step_id == step_id and step.status in _PAUSABLE
            else step
            for step in record.steps
        )
        self.core.records[execution_id] = replace(record, steps=steps)

    # -- reads ------------------------------------------------------------------------------

    def _with_plan(self, approval: ApprovalRecord) -> ApprovalRecord:
        snapshot = self.core.records[approval.execution_id].plan_snapshot or {}
        plan = snapshot.get("plan") if isinstance(snapshot, Mapping) else None
        return replace(approval, plan=plan if isinstance(plan, Mapping) else None)

    async def get(self, tenant_id: str, approval_id: UUID | str) -> ApprovalRecord:
        aid = as_approval_id(approval_id)
        approval = self.approvals.get(aid)
        if approval is None or approval.tenant_id != tenant_id:
            raise NotFoundError("approval not found", approval_id=str(aid))
        return self._with_plan(approval)

    async def list_pending(
        self, tenant_id: str, *, page_size: int = DEFAULT_PAGE_SIZE, page_token: str | None = None
    ) -> tuple[list[ApprovalRecord], str | None]:
        if page_size < 0:
            raise invalid_page_request("page_size", "must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        scope = hashlib.sha256(f"pending-approvals:{tenant_id}".encode()).hexdigest()[:16]
        after = decode_page_token(page_token, scope) if page_token else None
        now = datetime.now(UTC)
        rows = sorted(
            (
                a
                for a in self.approvals.values()
                if a.tenant_id == tenant_id
                and a.is_pending
                and a.expires_at > now
                and (after is None or (a.created_at, a.id) > after)
            ),
            key=lambda a: (a.created_at, a.id),
        )
        page = [self._with_plan(a) for a in rows[:size]]
        token = None
        if len(rows) > size:
            token = encode_page_token(page[-1].created_at, page[-1].id, scope)
        return page, token

    async def step_approval(
        self, tenant_id: str, execution_id: UUID, step_id: str
    ) -> ApprovalRecord | None:
        found = [
            a
            for a in self.approvals.values()
            if (a.execution_id, a.tenant_id, a.step_id) == (execution_id, tenant_id, step_id)
        ]
        if not found:
            return None
        # The open one first, else the latest (the read's ORDER BY).
        best = max(found, key=lambda a: (a.is_pending, a.created_at, a.id))
        return self._with_plan(best)

    async def approval_owner(self, approval_id: UUID | str) -> tuple[str, UUID] | None:
        try:
            approval = self.approvals.get(as_approval_id(approval_id))
        except NotFoundError:
            return None
        return None if approval is None else (approval.tenant_id, approval.execution_id)

    async def execution_owner(self, execution_id: UUID | str) -> str | None:
        try:
            record = self.core.records.get(as_execution_id(execution_id))
        except NotFoundError:
            return None
        return None if record is None else record.tenant_id

    async def execution(self, tenant_id: str, execution_id: UUID) -> ExecutionRecord:
        record = self.core.records.get(execution_id)
        if record is None or record.tenant_id != tenant_id:
            raise NotFoundError("execution not found", execution_id=str(execution_id))
        return replace(self.core._current(execution_id), steps=())

    # -- decisions --------------------------------------------------------------------------

    async def decide(
        self,
        approval_id: UUID | str,
        *,
        tenant_id: str,
        decision: ApprovalDecision,
        tx: Any = None,
    ) -> ApprovalRecord:
        aid = as_approval_id(approval_id)
        approval = self.approvals.get(aid)
        if approval is None or approval.tenant_id != tenant_id:
            raise NotFoundError("approval not found", approval_id=str(aid))
        if not approval.is_pending or approval.expires_at <= datetime.now(UTC):
            raise undecidable_error(approval)
        if decision.decided_by == approval.requested_by:
            raise SelfApprovalError(approval_id=str(aid))
        status = self.core.executions[approval.execution_id].status
        if status is not _S.AWAITING_APPROVAL:
            raise FailedPreconditionError(
                f"the execution is {status.value}, no longer awaiting this approval",
                approval_id=str(aid),
                status=status.value,
            )
        decided = replace(
            approval,
            state=ApprovalState.APPROVED if decision.approve else ApprovalState.REJECTED,
            decided_by=decision.decided_by,
            auth_method=decision.auth_method,
            source_ip=decision.source_ip,
            comment=decision.comment,
            decided_at=datetime.now(UTC),
        )
        self.approvals[aid] = decided
        if not decision.approve:
            self._end_waiting(decided, to=_S.REJECTED, by=decision.decided_by, reason="rejected")
        return decided

    async def invalidate(
        self, approval_id: UUID, *, by: str, reason: str, mismatched: list[str]
    ) -> ApprovalRecord | None:
        approval = self.approvals.get(approval_id)
        if approval is None:
            raise NotFoundError("approval not found", approval_id=str(approval_id))
        if approval.state not in (ApprovalState.PENDING, ApprovalState.APPROVED):
            return None
        invalidated = replace(approval, state=ApprovalState.INVALIDATED)
        self.approvals[approval_id] = invalidated
        if self.core.executions[approval.execution_id].status is _S.AWAITING_APPROVAL:
            self._end_waiting(
                invalidated, to=_S.FAILED, by=by, reason=reason, error=ApprovalInvalidatedError()
            )
        return invalidated

    def _end_waiting(
        self,
        approval: ApprovalRecord,
        *,
        to: ExecutionStatus,
        by: str,
        reason: str,
        error: OpsConductorError | None = None,
    ) -> None:
        """End the execution that waited for ``approval``: skip, close, transition."""
        eid = approval.execution_id
        self.core._skip(eid)
        self.core.close_approvals(eid)
        self._transition(
            eid,
            to,
            expected_from=_S.AWAITING_APPROVAL,
            by=by,
            payload={"approval_id": str(approval.id), "reason": reason},
        )
        self.core._release_execution_locks(eid)
        execution = self.core.executions[eid]
        if error is not None:
            execution.error_class, execution.error_message = error.reason, error.message
        if to is not _S.REJECTED:
            execution.key_retired = True  # nothing ran: the plan may be requested again

    # -- the worker's checks ----------------------------------------------------------------

    async def enforce_binding(self, record: ExecutionRecord, *, by: str) -> ApprovalRecord | None:
        if record.approval_level == 0:
            return None
        if record.approval_id is None:
            raise ApprovalInvalidatedError(
                "the execution needs an approval and none is bound to it",
                execution_id=str(record.id),
            )
        approval = await self.get(record.tenant_id, record.approval_id)
        mismatched = binding_mismatches(approval, record)
        if mismatched:
            await self.invalidate(
                approval.id, by=by, reason="binding_mismatch", mismatched=mismatched
            )
            raise ApprovalInvalidatedError(
                execution_id=str(record.id), approval_id=str(approval.id), mismatched=mismatched
            )
        if approval.state is not ApprovalState.APPROVED:
            raise FailedPreconditionError(
                f"the execution's approval is {approval.state.value}, not approved",
                execution_id=str(record.id),
                approval_id=str(approval.id),
                state=approval.state.value,
            )
        return approval

    async def step_approved(self, record: ExecutionRecord, step_id: str) -> bool:
        return any(
            (a.execution_id, a.step_id, a.state) == (record.id, step_id, ApprovalState.APPROVED)
            and (a.plan_hash, a.plan_snapshot_hash) == (record.plan_hash, record.plan_snapshot_hash)
            for a in self.approvals.values()
        )

    async def granted_by(self, execution_id: UUID, *, actor_id: str, tenant_id: str) -> bool:
        record = self.core.records.get(execution_id)
        if record is None or record.tenant_id != tenant_id or record.approval_id is None:
            return False
        approval = self.approvals.get(record.approval_id)
        return (
            approval is not None
            and approval.state is ApprovalState.APPROVED
            and approval.decided_by == actor_id
        )

    async def extend_locks(self, lock_set: LockSet, ttl: timedelta) -> LockSet:
        if ttl <= timedelta(0):
            raise ValueError("ttl must be positive")
        if not lock_set.locks:
            return lock_set
        keys = lock_set.keys
        held = {key: self.core.locks.get(key) for key in keys}
        lost = [
            key
            for key, lock in held.items()
            if lock is None or lock.owner_token != lock_set.owner_token
        ]
        if lost:
            raise StaleLeaseError(f"lock lease lost for {', '.join(lost)}", lost_keys=lost)
        until = datetime.now(UTC) + ttl
        extended = []
        for key in keys:
            lock = held[key]
            assert lock is not None
            self.core.locks[key] = replace(lock, expires_at=until)
            extended.append(HeldLock(key, lock_set.owner_token, lock.fencing_token, until))
        return LockSet(lock_set.owner_token, tuple(extended))
