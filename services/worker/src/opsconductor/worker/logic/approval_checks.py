"""What the worker checks of approvals, and how a level-3 execution waits for a step approval.

**Binding, before the first step** (both paths): an execution that needed an approval runs only
if the approval bound to it is ``approved`` and covers exactly its ``plan_hash`` and
``plan_snapshot_hash``, read from Postgres (nothing in a request or a job is trusted). A
mismatch invalidates the approval and the execution ends ``failed`` with
``APPROVAL_INVALIDATED``; an approval not granted ends it ``failed`` too. On the immediate path
the same check runs once more before the execution even starts (:meth:`ApprovalChecks.
require_granted`), so a premature ``RunImmediate`` changes nothing.

**Level 3, before every step**: the step runs only once a person approved that step for this
very plan. Otherwise the run stops there ("paused"): the runner keeps the execution's locks and
extends them up to the approval timeout (nobody else may touch the targets between two approved
steps), and the consumer, in one call of the lifecycle core, opens the step's request
(``running → awaiting_approval``, lease token cleared) and removes the job from the queue, so
the worker gives its lease up without spending an attempt. Approving the step queues the
execution again; a worker resumes it, re-takes its own locks and skips the steps already done.
Level-3 plans always run in background mode (the api routes them there): a person in the loop
before every step cannot fit an immediate budget. Human waiting time is not counted in the
execution budget: each run between two approvals gets the policy's full budget.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Final

import structlog

from opsconductor.common.approval_policy import LEVEL_STEP_BY_STEP
from opsconductor.common.errors import (
    ApprovalInvalidatedError,
    FailedPreconditionError,
    OpsConductorError,
    StaleLeaseError,
    StorageError,
)
from opsconductor.lifecycle.approval_port import ApprovalLifecycle
from opsconductor.lifecycle.facade import ExecutionRecord, LockSet

log = structlog.get_logger(__name__)

#: Locks of a paused execution outlive its step approval's expiry by this much; the reaper
#: expires the approval first and releases them with it.
PAUSED_LOCK_BUFFER: Final = timedelta(minutes=5)


class ApprovalChecks:
    """Approval binding and level-3 step gates for one worker process."""

    def __init__(self, approvals: ApprovalLifecycle, *, ttl: timedelta, worker_id: str) -> None:
        #: The approvals port: the bindings, the step grants and the locks of a paused run.
        self._approvals = approvals
        self._ttl = ttl
        self._worker_id = worker_id

    async def verify(
        self, record: ExecutionRecord, *, background: bool
    ) -> OpsConductorError | None:
        """Why ``record`` may not run (its approval), or None when it may.

        A broken binding has invalidated the approval by the time this returns.
        """
        if record.approval_level == 0:
            return None
        if not background and record.approval_level >= LEVEL_STEP_BY_STEP:
            return FailedPreconditionError(
                "level-3 (step-by-step) executions run in background mode only",
                execution_id=str(record.id),
            )
        try:
            await self._approvals.enforce_binding(record, by=self._worker_id)
        except (ApprovalInvalidatedError, FailedPreconditionError) as exc:
            log.warning(
                "approval_check_failed",
                execution_id=str(record.id),
                approval_id=str(record.approval_id),
                reason=exc.reason,
            )
            return exc
        return None

    async def require_granted(self, record: ExecutionRecord) -> None:
        """Immediate path, before starting: raise unless the approval is granted and bound."""
        refused = await self.verify(record, background=False)
        if refused is not None:
            raise refused

    @property
    def ttl(self) -> timedelta:
        """How long a step approval stays open (the consumer's pause requests it for that)."""
        return self._ttl

    def gates_steps(self, record: ExecutionRecord) -> bool:
        """Whether each step of ``record`` needs its own approval (level 3)."""
        return record.approval_level >= LEVEL_STEP_BY_STEP

    async def step_approved(self, record: ExecutionRecord, step_id: str) -> bool:
        """Whether a person approved ``step_id`` of this very plan."""
        return await self._approvals.step_approved(record, step_id)

    async def hold_locks(self, lock_set: LockSet) -> None:
        """Keep a paused execution's locks until its step approval expires (plus a buffer).

        If they cannot be extended (lost, or the database failed) they lapse at their current
        expiry; the resumed run re-takes them or finds a target busy.
        """
        try:
            await self._approvals.extend_locks(lock_set, self._ttl + PAUSED_LOCK_BUFFER)
        except (StaleLeaseError, StorageError) as exc:
            log.warning("paused_locks_not_extended", lock_keys=lock_set.keys, error=exc.reason)
