"""The ApprovalService use cases: read requests, and record the one decision each may get.

Every call is authorized for the tenant that really owns the approval (read from Postgres, not
from the request): ``approvals:read`` to look, ``approvals:decide`` to decide. A principal of
another tenant is refused with ``PERMISSION_DENIED`` and the attempt is audited as an
``rbac_violation`` under the tenant it targeted, linked to the execution. A request's requester
can never decide it (:class:`SelfApprovalError`, backed by the ``approval_not_self`` CHECK).

A decision records the principal, how it authenticated, its source address, the time and the
comment; the first one wins (the port's ``decide`` is a compare-and-set), concurrent losers
get ``FAILED_PRECONDITION``. Before granting, the approval's
binding is checked once more against the execution row ("at dispatch"): a mismatch invalidates
it. A grant releases the execution (:mod:`.dispatch`); a rejection ends it ``rejected``.

Every read and write goes through the approvals port
(:class:`~opsconductor.lifecycle.approval_port.ApprovalLifecycle`), so the unit tests run these
use cases against its in-memory fake.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

import structlog

from opsconductor.actions.planning import ExecutionMode
from opsconductor.common.auth import Principal
from opsconductor.common.errors import (
    ApprovalInvalidatedError,
    InvalidArgumentError,
    NotFoundError,
    SelfApprovalError,
)
from opsconductor.lifecycle.approval_port import (
    ApprovalDecision,
    ApprovalLifecycle,
    ApprovalRecord,
    as_execution_id,
    binding_mismatches,
)
from opsconductor.lifecycle.execution_logging import bind_execution_fields
from opsconductor.policy.rbac import Authorizer, Permission

from .dispatch import ExecutionDispatcher

log = structlog.get_logger(__name__)

#: Longest comment a decision may carry.
MAX_COMMENT_CHARS: Final = 2000
_SERVICE: Final = "ApprovalService"


@dataclass(frozen=True)
class Caller:
    """Who decides: the verified principal, its raw token (forwarded to the worker when an
    immediate execution is released) and its source address."""

    principal: Principal
    token: str
    source_ip: str | None


def covered_scope(approval: ApprovalRecord) -> tuple[list[str], list[str]]:
    """The target refs and actions an approval covers (one step's for a level-3 step)."""
    targets: set[str] = set()
    actions: list[str] = []
    for step in _covered_steps(approval):
        for target in step.get("targets") or ():
            if isinstance(target, Mapping) and isinstance(target.get("ref"), str):
                targets.add(target["ref"])
        action = step.get("action")
        if isinstance(action, str) and action not in actions:
            actions.append(action)
    return sorted(targets), actions


def _covered_steps(approval: ApprovalRecord) -> Iterator[Mapping[str, Any]]:
    steps = (approval.plan or {}).get("steps") or ()
    for step in steps:
        if isinstance(step, Mapping) and approval.step_id in (None, step.get("id")):
            yield step


class ApprovalDecisions:
    """GetApproval, ListPendingApprovals, Approve, Reject and ApproveStep."""

    def __init__(
        self,
        *,
        approvals: ApprovalLifecycle,
        authorizer: Authorizer,
        dispatcher: ExecutionDispatcher,
    ) -> None:
        self._approvals = approvals
        self._authorizer = authorizer
        self._dispatcher = dispatcher

    async def get(self, principal: Principal, tenant_id: str, approval_id: str) -> ApprovalRecord:
        """One approval, with the plan it covers."""
        return await self._authorized(
            principal, tenant_id, approval_id, Permission.APPROVALS_READ, "GetApproval"
        )

    async def list_pending(
        self, principal: Principal, tenant_id: str, *, page_size: int, page_token: str | None
    ) -> tuple[list[ApprovalRecord], str | None]:
        """The tenant's undecided requests, oldest first, one page at a time."""
        await self._authorizer.authorize(
            principal,
            tenant_id=tenant_id,
            permissions={Permission.APPROVALS_READ},
            resource=f"{_SERVICE}/ListPendingApprovals",
        )
        return await self._approvals.list_pending(
            tenant_id, page_size=page_size, page_token=page_token
        )

    async def approve(
        self, caller: Caller, tenant_id: str, approval_id: str, comment: str
    ) -> ApprovalRecord:
        """Grant a request and release its execution."""
        approval = await self._authorized(
            caller.principal, tenant_id, approval_id, Permission.APPROVALS_DECIDE, "Approve"
        )
        return await self._grant(caller, approval, comment)

    async def approve_step(
        self, caller: Caller, tenant_id: str, execution_id: str, step_id: str, comment: str
    ) -> ApprovalRecord:
        """Grant the request of one step of a level-3 execution; the execution resumes."""
        eid = as_execution_id(execution_id)
        owner = await self._approvals.execution_owner(eid)
        await self._authorizer.authorize(
            caller.principal,
            tenant_id=owner or tenant_id,
            permissions={Permission.APPROVALS_DECIDE},
            execution_id=eid if owner else None,
            resource=f"{_SERVICE}/ApproveStep",
        )
        approval = await self._approvals.step_approval(tenant_id, eid, step_id)
        if approval is None:
            # Absent, another tenant's, or not asked yet: the worker asks when it reaches it.
            raise NotFoundError(
                "no approval was requested for this step", execution_id=str(eid), step_id=step_id
            )
        return await self._grant(caller, approval, comment)

    async def reject(
        self, caller: Caller, tenant_id: str, approval_id: str, comment: str
    ) -> ApprovalRecord:
        """Refuse a request: its execution ends ``rejected`` (terminal)."""
        approval = await self._authorized(
            caller.principal, tenant_id, approval_id, Permission.APPROVALS_DECIDE, "Reject"
        )
        self._refuse_self(caller.principal, approval)
        # As for a grant: the decision's records (the rejection ending it) are the execution's.
        bind_execution_fields(
            await self._approvals.execution(approval.tenant_id, approval.execution_id)
        )
        decided = await self._approvals.decide(
            approval.id,
            tenant_id=approval.tenant_id,
            decision=_decision(caller, approve=False, comment=comment),
        )
        return replace(decided, plan=approval.plan)

    async def _grant(
        self, caller: Caller, approval: ApprovalRecord, comment: str
    ) -> ApprovalRecord:
        self._refuse_self(caller.principal, approval)
        decision = _decision(caller, approve=True, comment=comment)
        record = await self._approvals.execution(approval.tenant_id, approval.execution_id)
        bind_execution_fields(record)  # the decision's records are the execution's too
        mismatched = binding_mismatches(approval, record)
        if mismatched:
            await self._approvals.invalidate(
                approval.id,
                by=caller.principal.actor_id,
                reason="binding_mismatch",
                mismatched=mismatched,
            )
            raise ApprovalInvalidatedError(approval_id=str(approval.id), mismatched=mismatched)
        if record.execution_mode == ExecutionMode.BACKGROUND:
            # The release commits with the decision, or neither does (Redis down: both undone).
            async with self._approvals.transaction() as tx:
                decided = await self._approvals.decide(
                    approval.id, tenant_id=approval.tenant_id, decision=decision, tx=tx
                )
                await self._dispatcher.enqueue(tx, record, by=caller.principal.actor_id)
        else:
            decided = await self._approvals.decide(
                approval.id, tenant_id=approval.tenant_id, decision=decision
            )
            self._dispatcher.start_immediate(record, caller.token)
        return replace(decided, plan=approval.plan)

    async def _authorized(
        self,
        principal: Principal,
        tenant_id: str,
        approval_id: str,
        permission: Permission,
        rpc: str,
    ) -> ApprovalRecord:
        """The approval, once ``principal`` holds ``permission`` in the tenant that owns it."""
        owner = await self._approvals.approval_owner(approval_id)
        await self._authorizer.authorize(
            principal,
            tenant_id=owner[0] if owner is not None else tenant_id,
            permissions={permission},
            execution_id=owner[1] if owner is not None else None,
            resource=f"{_SERVICE}/{rpc}",
        )
        # NotFound for "absent" and "in another tenant" alike, so ids cannot be probed.
        return await self._approvals.get(tenant_id, approval_id)

    @staticmethod
    def _refuse_self(principal: Principal, approval: ApprovalRecord) -> None:
        if principal.actor_id == approval.requested_by:
            log.warning(
                "self_approval_refused",
                approval_id=str(approval.id),
                execution_id=str(approval.execution_id),
                actor_id=principal.actor_id,
            )
            raise SelfApprovalError(approval_id=str(approval.id))


def _decision(caller: Caller, *, approve: bool, comment: str) -> ApprovalDecision:
    if len(comment) > MAX_COMMENT_CHARS:
        raise InvalidArgumentError(
            f"comment must be at most {MAX_COMMENT_CHARS} characters", field="comment"
        )
    return ApprovalDecision(
        approve=approve,
        decided_by=caller.principal.actor_id,
        auth_method=caller.principal.auth_method,
        source_ip=caller.source_ip,
        comment=comment or None,
    )
