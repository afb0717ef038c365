"""GetExecution, ListExecutions and CancelExecution: tenant-scoped reads and the cancel request."""

from __future__ import annotations

from collections.abc import Collection

from opsconductor.common.auth import Principal
from opsconductor.common.fsm import ExecutionStatus
from opsconductor.common.rbac import Authorizer, Permission
from opsconductor.common.storage.execution_reads import (
    as_execution_id,
    get_execution,
    list_executions,
)
from opsconductor.common.storage.execution_records import ExecutionRecord, PoolOrConnection
from opsconductor.common.storage.executions import request_cancel


class ExecutionQueries:
    """Reads and cancellation, each authorized for the tenant first (and audited if refused)."""

    def __init__(self, *, pool: PoolOrConnection, authorizer: Authorizer) -> None:
        self._pool = pool
        self._authorizer = authorizer

    async def get(self, principal: Principal, tenant_id: str, execution_id: str) -> ExecutionRecord:
        eid = as_execution_id(execution_id)
        await self._authorizer.authorize(
            principal,
            tenant_id=tenant_id,
            permissions={Permission.EXECUTIONS_READ},
            resource="ExecutionService/GetExecution",
        )
        return await get_execution(self._pool, tenant_id, eid)

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
        records, token = await list_executions(
            self._pool,
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
        record, _changed = await request_cancel(
            self._pool, eid, tenant_id=tenant_id, by=principal.actor_id, reason=reason or None
        )
        return record
