"""An in-memory :class:`~opsconductor.lifecycle.facade.ExecutionLifecycle` for unit tests of
service logic (procrastinate's ``InMemoryConnector``, in miniature).

It keeps what the adapter keeps, in dicts: each execution's status, error and whether its key
was retired; each job's execution, budget and correlation. Statuses move under the same FSM
(:func:`~opsconductor.common.fsm.check_transition`) and the same compare-and-set on
``expected_from``, so a test against the fake fails where the real core would refuse. Every
behaviour here is also run against the Postgres + Redis adapter
(``tests/integration/test_lifecycle_facade.py``). Transactions are not modelled: a refused call
changes nothing, as a rolled-back one does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID, uuid4

from opsconductor.common.errors import FSMError, QueueUnavailableError
from opsconductor.common.fsm import ExecutionStatus, check_transition
from opsconductor.lifecycle.storage.execution_records import ExecutionRecord
from opsconductor.lifecycle.storage.policies import TimeoutPolicy

__all__ = ["FakeExecution", "FakeJob", "InMemoryLifecycle"]


@dataclass
class FakeExecution:
    status: ExecutionStatus
    error_class: str | None = None
    error_message: str | None = None
    key_retired: bool = False
    #: (status, by, event payload) of each transition, oldest first.
    transitions: list[tuple[ExecutionStatus, str, dict[str, Any]]] = field(default_factory=list)


@dataclass(frozen=True)
class FakeJob:
    execution_id: UUID
    tenant_id: str
    priority: int
    max_attempts: int
    max_lease_renewals: int
    request_id: str | None
    trace_context: str | None


class InMemoryLifecycle:
    """The lifecycle core in dicts; ``queue_up=False`` plays a Redis that is down."""

    def __init__(self, *, queue_configured: bool = True, queue_up: bool = True) -> None:
        self._queue_configured = queue_configured
        self.queue_up = queue_up
        self.executions: dict[UUID, FakeExecution] = {}
        self.jobs: dict[UUID, FakeJob] = {}

    def add(self, record: ExecutionRecord) -> ExecutionRecord:
        """Store ``record`` as it is (what the real core's create did)."""
        self.executions[record.id] = FakeExecution(record.status)
        return record

    @property
    def queue_configured(self) -> bool:
        return self._queue_configured

    def _move(
        self,
        execution_id: UUID,
        to: ExecutionStatus,
        *,
        by: str,
        payload: Mapping[str, Any] | None,
    ) -> FakeExecution:
        """Move an execution its caller found in the expected status (the FSM still decides)."""
        execution = self.executions[execution_id]
        check_transition(execution.status, to)
        execution.status = to
        execution.transitions.append((to, by, dict(payload or {})))
        return execution

    async def enqueue(
        self,
        tx: Any,
        record: ExecutionRecord,
        policy: TimeoutPolicy,
        *,
        by: str,
        expected_from: ExecutionStatus,
        event_payload: Mapping[str, Any] | None = None,
        trace_context: str | None = None,
    ) -> UUID:
        if not self._queue_configured:
            raise QueueUnavailableError("no queue is configured for background execution")
        # The real recipe's order: the transition's compare-and-set, then the Redis push.
        current = self.executions[record.id].status
        if current is not expected_from:
            raise FSMError(
                f"Illegal state transition {current} -> {ExecutionStatus.QUEUED}",
                from_status=current.value,
                to_status=ExecutionStatus.QUEUED.value,
            )
        check_transition(current, ExecutionStatus.QUEUED)  # before the push, as the recipe
        if not self.queue_up:
            raise QueueUnavailableError("the background queue is unreachable")
        self._move(
            record.id,
            ExecutionStatus.QUEUED,
            by=by,
            payload=event_payload,
        )
        job_id = uuid4()
        self.jobs[job_id] = FakeJob(
            execution_id=record.id,
            tenant_id=record.tenant_id,
            priority=record.priority,
            max_attempts=policy.max_attempts,
            max_lease_renewals=policy.max_lease_renewals,
            request_id=record.request_id,
            trace_context=trace_context or record.trace_context,
        )
        return job_id

    async def end_unstarted(
        self,
        execution_id: UUID,
        *,
        expected_from: ExecutionStatus,
        by: str,
        error_class: str,
        error_message: str,
    ) -> bool:
        if self.executions[execution_id].status is not expected_from:
            return False
        execution = self._move(execution_id, ExecutionStatus.FAILED, by=by, payload=None)
        execution.error_class, execution.error_message = error_class, error_message
        execution.key_retired = True
        return True
