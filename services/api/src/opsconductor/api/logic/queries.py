"""GetExecution, ListExecutions and CancelExecution: tenant-scoped reads and the cancel request."""

from __future__ import annotations

from collections.abc import Collection

import structlog

from opsconductor.common.auth import Principal
from opsconductor.common.errors import QueueUnavailableError
from opsconductor.common.fsm import ExecutionStatus
from opsconductor.lifecycle.queue import jobs
from opsconductor.lifecycle.queue.redis_queue import RedisQueue
from opsconductor.lifecycle.storage.execution_reads import (
    as_execution_id,
    get_execution,
    list_executions,
)
from opsconductor.lifecycle.storage.execution_records import ExecutionRecord, PoolOrConnection
from opsconductor.lifecycle.storage.executions import request_cancel
from opsconductor.policy.rbac import Authorizer, Permission

log = structlog.get_logger(__name__)


class ExecutionQueries:
    """Reads and cancellation, each authorized for the tenant first (and audited if refused)."""

    def __init__(
        self, *, pool: PoolOrConnection, authorizer: Authorizer, queue: RedisQueue | None
    ) -> None:
        self._pool = pool
        self._authorizer = authorizer
        self._queue = queue

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
            self._pool,
            eid,
            tenant_id=tenant_id,
            by=principal.actor_id,
            reason=reason or None,
            initiator="system" if principal.is_machine else "user",
        )
        if record.status == ExecutionStatus.CANCELLED:
            await self._dequeue_cancelled(record)
        return record

    async def _dequeue_cancelled(self, record: ExecutionRecord) -> None:
        """A cancelled queued job leaves the queue (best-effort in Redis: a worker that still
        dequeues it finds it terminal and drops it; the reaper drops it otherwise)."""
        row = await jobs.get_queue_row_for_execution(self._pool, record.id)
        if row is None or row.state == "leased":
            return
        await jobs.delete_queue_row(self._pool, row.id)
        if self._queue is not None:
            try:
                await self._queue.remove(row.id)
            except QueueUnavailableError:
                log.warning("cancelled_job_left_in_redis", job_id=str(row.id))
