"""Releasing approved executions: nobody submits an approved plan a second time.

* **Background** executions (and every level-3 execution, which always runs from the queue) are
  queued inside the decision's own transaction, following the queue recipe: the execution
  ``awaiting_approval → queued``, its ``execution_queue`` row, then the Redis push, then commit.
  If Redis is down the decision rolls back with it (``UNAVAILABLE``/``QUEUE_UNAVAILABLE``): the
  approval stays pending and the approver simply retries — never a granted approval whose
  execution nobody will run.
* **Immediate** executions are run by a worker (``RunImmediate``) in a task of the approvals
  service, after the decision committed: ``Approve`` answers with the decided approval at once
  and does not wait for the run (its outcome is the execution's, readable through the api). The
  approver's token is forwarded so the worker can check that this very principal granted it.
  A worker that cannot be reached leaves the execution un-started: it ends ``failed``
  (``WORKER_UNAVAILABLE``) and its idempotency key is retired, so the plan can be submitted again.
  At shutdown the service waits (bounded) for the runs it started.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any
from uuid import UUID

import structlog

from opsconductor.common.errors import (
    ConflictError,
    OpsConductorError,
    QueueUnavailableError,
    WorkerUnavailableError,
)
from opsconductor.common.fsm import ExecutionStatus
from opsconductor.common.tracing import continue_trace, current_traceparent
from opsconductor.lifecycle.facade import ExecutionLifecycle, ExecutionRecord, TimeoutPolicy

from .ports import WorkerPort

log = structlog.get_logger(__name__)


class ExecutionDispatcher:
    """Queues or starts the executions whose approval was just granted."""

    def __init__(
        self,
        *,
        lifecycle: ExecutionLifecycle,
        worker: WorkerPort,
        policies: Mapping[str, TimeoutPolicy],
        margin_s: float,
    ) -> None:
        self._lifecycle = lifecycle
        self._worker = worker
        self._policies = policies
        self._margin_s = margin_s
        self._running: set[asyncio.Task[None]] = set()

    async def enqueue(self, conn: Any, record: ExecutionRecord, *, by: str) -> UUID:
        """Queue ``record`` on ``conn`` (the decision's transaction); returns the job id."""
        if not self._lifecycle.queue_configured:
            raise QueueUnavailableError("no queue is configured for background execution")
        policy = self._policies.get(record.timeout_policy_id or "")
        if policy is None:
            raise ConflictError(
                "the execution's timeout policy no longer exists",
                timeout_policy_id=record.timeout_policy_id or "",
            )
        # The submit's correlation: the released job logs as the request that created the
        # execution, and its trace continues the submit's through this release.
        with continue_trace("approval_released", record.trace_context, _attributes(record)):
            queued = await self._lifecycle.enqueue(
                conn,
                record,
                policy,
                by=by,
                expected_from=ExecutionStatus.AWAITING_APPROVAL,
                event_payload={"reason": "approved"},
                trace_context=current_traceparent(),
            )
        job_id = queued.job_id
        log.info("approved_execution_queued", execution_id=str(record.id), job_id=str(job_id))
        return job_id

    def start_immediate(self, record: ExecutionRecord, token: str) -> None:
        """Run ``record`` on a worker in the background (call once the decision committed)."""
        task = asyncio.create_task(self._run_immediate(record, token))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run_immediate(self, record: ExecutionRecord, token: str) -> None:
        try:
            with continue_trace("approval_released", record.trace_context, _attributes(record)):
                await self._worker.run_immediate(
                    tenant_id=record.tenant_id,
                    execution_id=record.id,
                    token=token,
                    timeout_s=record.timeout_ms / 1000 + self._margin_s,
                )
        except WorkerUnavailableError:
            await self._fail_unstarted(record)
        except OpsConductorError as exc:
            # Busy target, timeout, refusal...: the worker recorded it on the execution.
            log.info(
                "approved_execution_ended_with_error",
                execution_id=str(record.id),
                error_class=exc.reason,
            )
        except Exception:
            log.exception("approved_execution_dispatch_failed", execution_id=str(record.id))
        else:
            log.info("approved_execution_finished", execution_id=str(record.id))

    async def _fail_unstarted(self, record: ExecutionRecord) -> None:
        log.warning("approved_execution_not_started", execution_id=str(record.id))
        await self._lifecycle.end_unstarted(
            record.id,
            expected_from=ExecutionStatus.AWAITING_APPROVAL,
            by="approvals",
            error_class=WorkerUnavailableError.reason,
            error_message="no worker could be reached to run the approved execution",
        )

    async def drain(self, grace_s: float) -> None:
        """Wait (bounded) for the immediate runs still in flight, at shutdown."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=grace_s)


def _attributes(record: ExecutionRecord) -> dict[str, str]:
    return {"opsc.exec_id": str(record.id)}
