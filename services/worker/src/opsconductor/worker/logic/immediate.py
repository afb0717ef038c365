"""The worker's side of the immediate path: authorize again, then run, whatever the caller does.

The api already checked the caller; the worker checks again against Postgres (defence in depth,
spec §3.3), trusting nothing of the request but the execution id: the execution is loaded from
Postgres, its tenant must be the caller's, the caller must be its submitter, and the submitter
must still hold the permissions its plan needs. Each refusal is audited as ``rbac_violation``.

Once started, an execution runs to its end even if the RPC that started it is cancelled (the
client hung up): a half-run plan is worse than a finished one nobody waited for.
"""

from __future__ import annotations

import asyncio
from uuid import UUID

from opsconductor.common.auth import Principal
from opsconductor.common.errors import FailedPreconditionError
from opsconductor.common.rbac import Authorizer, Permission, submit_permissions
from opsconductor.common.storage.execution_reads import find_execution_tenant, get_execution
from opsconductor.common.storage.execution_records import ExecutionRecord, PoolOrConnection

from .runner import ExecutionRunner

_RESOURCE = "WorkerService/RunImmediate"


class ImmediateExecutions:
    """Runs immediate executions handed over by the api."""

    def __init__(
        self, *, pool: PoolOrConnection, authorizer: Authorizer, runner: ExecutionRunner
    ) -> None:
        self._pool = pool
        self._authorizer = authorizer
        self._runner = runner
        self._running: set[asyncio.Task[ExecutionRecord]] = set()

    async def authorize(
        self, caller: Principal, *, tenant_id: str, execution_id: UUID
    ) -> ExecutionRecord:
        """The execution, if ``caller`` may run it; otherwise refuse and audit."""
        # Where the execution really lives, not where the request says: a request naming the
        # caller's own tenant for another tenant's execution is a probe, audited there.
        actual_tenant = await find_execution_tenant(self._pool, execution_id)
        await self._authorizer.authorize(
            caller,
            tenant_id=tenant_id if actual_tenant is None else actual_tenant,
            permissions={Permission.EXECUTIONS_SUBMIT},
            execution_id=execution_id if actual_tenant == tenant_id else None,
            resource=_RESOURCE,
        )
        # NotFound for "absent" and "in another tenant" alike, so ids cannot be probed.
        record = await get_execution(self._pool, tenant_id, execution_id)
        needed = submit_permissions(record.action_class)
        await self._authorizer.require_actor(
            caller,
            tenant_id=tenant_id,
            owner_actor_id=record.actor_id,
            permissions=needed,
            execution_id=record.id,
            resource=_RESOURCE,
        )
        await self._authorizer.authorize(
            caller,
            tenant_id=tenant_id,
            permissions=needed,
            execution_id=record.id,
            resource=_RESOURCE,
        )
        return record

    async def run(
        self, caller: Principal, *, tenant_id: str, execution_id: UUID
    ) -> ExecutionRecord:
        """Authorize, then run the execution to its end and return its final record."""
        record = await self.authorize(caller, tenant_id=tenant_id, execution_id=execution_id)
        if record.execution_mode != "immediate":
            raise FailedPreconditionError(
                "only immediate executions run through RunImmediate; background ones are queued",
                execution_id=str(record.id),
            )
        task = asyncio.ensure_future(self._runner.run(record))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return await asyncio.shield(task)

    async def drain(self, grace_s: float) -> None:
        """Wait (bounded) for executions still running, at shutdown."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=grace_s)
