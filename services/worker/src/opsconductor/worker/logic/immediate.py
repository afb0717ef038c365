"""The worker's side of the immediate path: authorize again, then run, whatever the caller does.

The api already checked the caller; the worker checks again against Postgres (defence in depth,
spec §3.3), trusting nothing of the request but the execution id: the execution is loaded from
Postgres, its tenant must be the caller's, the caller must be its submitter, and the submitter
must still hold the permissions its plan needs. Each refusal is audited as ``rbac_violation``.

An execution that needed an approval is started by whoever granted it (the approvals service
forwards the approver's token): the caller may then be the approver instead of the submitter,
if Postgres says the approval bound to the execution is ``approved`` and was decided by the
caller, the caller still holds ``approvals:decide`` in the tenant, and the submitter still holds
what the plan needs. Such an execution starts only if its approval is granted and covers exactly
its plan (``ApprovalChecks.require_granted``), checked before anything changes.

Once started, an execution runs to its end even if the RPC that started it is cancelled (the
client hung up): a half-run plan is worse than a finished one nobody waited for.
"""

from __future__ import annotations

import asyncio
from uuid import UUID

import structlog

from opsconductor.common.auth import Principal
from opsconductor.common.errors import FailedPreconditionError, NotFoundError, OpsConductorError
from opsconductor.lifecycle.approval_port import ApprovalLifecycle
from opsconductor.lifecycle.execution_logging import bind_execution_fields
from opsconductor.lifecycle.facade import ExecutionLifecycle, ExecutionRecord
from opsconductor.policy.rbac import Authorizer, Permission, one_request, submit_permissions

from .runner import ExecutionRunner

log = structlog.get_logger(__name__)

_RESOURCE = "WorkerService/RunImmediate"


class ImmediateExecutions:
    """Runs immediate executions handed over by the api."""

    def __init__(
        self,
        *,
        lifecycle: ExecutionLifecycle,
        approvals: ApprovalLifecycle,
        authorizer: Authorizer,
        runner: ExecutionRunner,
    ) -> None:
        #: The execution's read (the lifecycle core) and who granted its approval (the
        #: approvals port).
        self._lifecycle = lifecycle
        self._approvals = approvals
        self._authorizer = authorizer
        self._runner = runner
        self._running: set[asyncio.Task[ExecutionRecord]] = set()
        # Runs whose RPC was cancelled: nobody awaits their outcome any more.
        self._abandoned: set[asyncio.Task[ExecutionRecord]] = set()

    async def authorize(
        self, caller: Principal, *, tenant_id: str, execution_id: UUID
    ) -> ExecutionRecord:
        """The execution, if ``caller`` may run it; otherwise refuse and audit."""
        with one_request():  # each principal's roles are read once for all the checks
            return await self._authorize(caller, tenant_id=tenant_id, execution_id=execution_id)

    async def _authorize(
        self, caller: Principal, *, tenant_id: str, execution_id: UUID
    ) -> ExecutionRecord:
        # One read of the execution wherever it lives: its approval says whether the caller may
        # be its approver, and its tenant is where a probe is audited.
        found = await self._lifecycle.find(execution_id)
        if found is not None:
            # The rest of this RPC's records (checks, denials, the start) are the execution's.
            bind_execution_fields(found, worker_id=self._runner.worker_id)
        if (
            found is not None
            and found.approval_id is not None
            and await self._approvals.granted_by(
                execution_id, actor_id=caller.actor_id, tenant_id=caller.tenant_id
            )
        ):
            return await self._authorize_approver(caller, tenant_id=tenant_id, record=found)
        # Where the execution really lives, not where the request says: a request naming the
        # caller's own tenant for another tenant's execution is a probe, audited there, linked
        # to the execution it targeted (the event is that tenant's, so nothing leaks).
        await self._authorizer.authorize(
            caller,
            tenant_id=tenant_id if found is None else found.tenant_id,
            permissions={Permission.EXECUTIONS_SUBMIT},
            execution_id=execution_id,
            resource=_RESOURCE,
        )
        # NotFound for "absent" and "in another tenant" alike, so ids cannot be probed.
        if found is None or found.tenant_id != tenant_id:
            raise NotFoundError("execution not found", execution_id=str(execution_id))
        record = found
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

    async def _authorize_approver(
        self, caller: Principal, *, tenant_id: str, record: ExecutionRecord
    ) -> ExecutionRecord:
        """The approver of the execution dispatching it: still a decider, and the submitter
        still allowed what the plan needs (both checked against Postgres, both audited)."""
        await self._authorizer.authorize(
            caller,
            tenant_id=tenant_id,
            permissions={Permission.APPROVALS_DECIDE},
            execution_id=record.id,
            resource=_RESOURCE,
        )
        if record.tenant_id != tenant_id:
            raise NotFoundError("execution not found", execution_id=str(record.id))
        submitter = Principal(
            actor_id=record.actor_id, tenant_id=record.tenant_id, auth_method="approved_dispatch"
        )
        await self._authorizer.authorize(
            submitter,
            tenant_id=tenant_id,
            permissions=submit_permissions(record.action_class),
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
        if record.approval_level > 0:
            if self._runner.approvals is None:
                raise FailedPreconditionError(
                    "this worker cannot check approvals", execution_id=str(record.id)
                )
            await self._runner.approvals.require_granted(record)
        task = asyncio.ensure_future(self._runner.run(record))
        self._running.add(task)
        task.add_done_callback(self._forget)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The caller hung up; the run goes on (module docstring), and _forget collects it.
            self._abandoned.add(task)
            raise

    def _forget(self, task: asyncio.Task[ExecutionRecord]) -> None:
        """Drop a finished run; retrieve the outcome of one whose caller stopped waiting.

        Its outcome is already in Postgres; without this, asyncio would report a failed run
        (a timeout, a busy target) as "Task exception was never retrieved".
        """
        self._running.discard(task)
        if task not in self._abandoned:
            return
        self._abandoned.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, OpsConductorError):
            log.info("abandoned_execution_ended", reason=error.reason, error=error.message)
        elif error is not None:
            log.error("abandoned_execution_crashed", exc_info=error)

    async def drain(self, grace_s: float) -> None:
        """Wait (bounded) for executions still running, at shutdown."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=grace_s)
