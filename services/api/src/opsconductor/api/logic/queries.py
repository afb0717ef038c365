"""GetExecution, ListExecutions and CancelExecution: tenant-scoped reads and the cancel request.

They hold the lifecycle port (:mod:`opsconductor.lifecycle.facade`), never a pool or the queue:
the cancel's dequeue of a job it ended is the core's (an import-linter contract).
"""

from __future__ import annotations

from collections.abc import Collection

from opsconductor.common.auth import Principal
from opsconductor.common.fsm import ExecutionStatus
from opsconductor.lifecycle.facade import ExecutionLifecycle, ExecutionRecord, as_execution_id
from opsconductor.policy.rbac import Authorizer, Permission


class ExecutionQueries:
    """Reads and cancellation, each authorized for the tenant first (and audited if refused)."""

    def __init__(self, *, lifecycle: ExecutionLifecycle, authorizer: Authorizer) -> None:
        self._lifecycle = lifecycle
        self._authorizer = authorizer

    async def get(self, principal: Principal, tenant_id: str, execution_id: str) -> ExecutionRecord:
        eid = as_execution_id(execution_id)
        await self._authorizer.authorize(
            principal,
            tenant_id=tenant_id,
            permissions={Permission.EXECUTIONS_READ},
            resource="ExecutionService/GetExecution",
        )
        return await self._lifecycle.get(tenant_id, eid)

    async def list(
        self,
        principal: Principal,
        tenant_id: str,
        *,
        statuses: Collection[ExecutionStatus],
        mode: str | None,
        page_size: int,
        page_token: str | None,
    ) -> tuple[list[ExecutionRecord], str | None]:
        await self._authorizer.authorize(
            principal,
            tenant_id=tenant_id,
            permissions={Permission.EXECUTIONS_READ},
            resource="ExecutionService/ListExecutions",
        )
        records, token = await self._lifecycle.list_executions(
            tenant_id,
            statuses=statuses,
            mode=mode,
            page_size=page_size or 50,
            page_token=page_token or None,
        )
        return list(records), token

    async def cancel(
        self, principal: Principal, tenant_id: str, execution_id: str, reason: str
    ) -> ExecutionRecord:
        """Request cancellation; idempotent. A running execution ends when its worker notices."""
        eid = as_execution_id(execution_id)
        await self._authorizer.authorize(
            principal,
            tenant_id=tenant_id,
            permissions={Permission.EXECUTIONS_CANCEL},
            resource="ExecutionService/CancelExecution",
        )
        return await self._lifecycle.cancel(
            tenant_id,
            eid,
            by=principal.actor_id,
            reason=reason or None,
            initiator="system" if principal.is_machine else "user",
        )
