"""Plans that need a person: open their approval request at submit, and check a presented one.

A plan whose approval level is 1 or more is created ``awaiting_approval`` with a pending
request bound to the execution's ``plan_hash`` and ``plan_snapshot_hash``, in the submit's own
transaction; SubmitExecution returns at once with the approval id. Once a person approves it,
the approvals service releases the execution: nobody submits it a second time.

Spec §6.2: a client may re-submit a plan together with the id of the approval it got earlier.
The approval must cover exactly that plan: its ``plan_hash`` and ``plan_snapshot_hash`` must
equal the new plan's, or the submit is refused with :class:`ApprovalInvalidatedError`
(``FAILED_PRECONDITION``, reason ``APPROVAL_INVALIDATED``) and a new approval is needed
(submit without the id). What happens to the presented approval depends on its state:

* **pending** — it can no longer be trusted to describe what its requester wants run: it is
  ``invalidated`` and the execution waiting for it ends ``failed`` (``APPROVAL_INVALIDATED``);
* **approved** — a person already released the *original* plan, which runs (or ran) as
  approved; the changed plan is refused and the approval stays as it was. Invalidating it
  would cancel a run a person signed off on because someone later asked for something else.

Only the approval's requester may present it (others are refused and audited): otherwise any
submitter of the tenant could invalidate a colleague's pending request.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

import structlog

from opsconductor.common.approval_policy import ApprovalPolicy
from opsconductor.common.auth import Principal
from opsconductor.common.errors import ApprovalInvalidatedError
from opsconductor.lifecycle.approval_port import ApprovalLifecycle, ApprovalRecord
from opsconductor.policy.rbac import Authorizer, Permission

log = structlog.get_logger(__name__)

_RESOURCE = "ExecutionService/SubmitExecution"


class ApprovalIntake:
    """The api's side of approvals: requests at submit, presented approvals checked."""

    def __init__(
        self, *, approvals: ApprovalLifecycle, authorizer: Authorizer, policy: ApprovalPolicy
    ) -> None:
        self._approvals = approvals
        self._authorizer = authorizer
        self._ttl = timedelta(seconds=policy.approval_ttl_s)

    async def open_request(self, tx: Any, execution_id: UUID) -> ApprovalRecord:
        """The execution's pending request (``pending → awaiting_approval``), in ``tx``."""
        return await self._approvals.request(execution_id, ttl=self._ttl, by="api", tx=tx)

    async def check_presented(
        self,
        principal: Principal,
        *,
        tenant_id: str,
        approval_id: str,
        plan_hash: str,
        plan_snapshot_hash: str,
    ) -> ApprovalRecord:
        """The presented approval if it covers this plan; else invalidate it if pending, and
        raise :class:`ApprovalInvalidatedError` (see the module docstring)."""
        approval = await self._approvals.get(tenant_id, approval_id)
        await self._authorizer.require_actor(
            principal,
            tenant_id=tenant_id,
            owner_actor_id=approval.requested_by,
            permissions={Permission.EXECUTIONS_SUBMIT},
            execution_id=approval.execution_id,
            resource=_RESOURCE,
        )
        mismatched = [
            name
            for name, approved, submitted in (
                ("plan_hash", approval.plan_hash, plan_hash),
                ("plan_snapshot_hash", approval.plan_snapshot_hash, plan_snapshot_hash),
            )
            if approved != submitted
        ]
        if not mismatched:
            return approval
        state = approval.state
        if approval.is_pending:
            closed = await self._approvals.invalidate(
                approval.id,
                by=principal.actor_id,
                reason="plan_changed",
                mismatched=mismatched,
            )
            if closed is not None:
                state = closed.state
        log.warning(
            "presented_approval_mismatch",
            approval_id=str(approval.id),
            execution_id=str(approval.execution_id),
            mismatched=mismatched,
            approval_state=state.value,
        )
        raise ApprovalInvalidatedError(
            "the plan differs from the one this approval covers; submit it without the "
            "approval id to request a new approval",
            approval_id=str(approval.id),
            mismatched=mismatched,
            approval_state=state.value,
        )
