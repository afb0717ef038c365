"""An in-memory :class:`~opsconductor.lifecycle.facade.ExecutionLifecycle` for unit tests of
service logic (procrastinate's ``InMemoryConnector``, in miniature).

It keeps what the adapter keeps, in dicts: each execution as created (its row and steps), its
status, error and whether its key was retired; each job's execution, budget and correlation.
Creation follows the real statement's idempotency (one live execution per tenant and key; a
terminal one past the dedup window gives its key up) and immediate admission (a tenant's
pending or running immediate executions counted against the limit; the usage's ``soonest_end``
is not modelled: None). Statuses move under the same FSM
(:func:`~opsconductor.common.fsm.check_transition`) and the same compare-and-set on
``expected_from``, so a test against the fake fails where the real core would refuse. Every
behaviour here is also run against the Postgres + Redis adapter
(``tests/integration/test_lifecycle_facade.py``). A refused call changes nothing; a
:meth:`~InMemoryLifecycle.transaction` that raises puts every dict back as it found them (as a
rollback); the quota lock needs one but excludes nothing (the fake runs one task at a time).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from opsconductor.common.errors import (
    FSMError,
    NotFoundError,
    QueueUnavailableError,
    StaleLeaseError,
)
from opsconductor.common.fsm import TERMINAL, ExecutionStatus, StepStatus, check_transition
from opsconductor.common.hashing import step_idempotency_key
from opsconductor.lifecycle.facade import Queued
from opsconductor.lifecycle.storage.execution_records import ExecutionRecord, StepRecord
from opsconductor.lifecycle.storage.executions import CreatedQueued, NewExecution
from opsconductor.lifecycle.storage.policies import TimeoutPolicy
from opsconductor.lifecycle.storage.quota_usage import ImmediateUsage, WaitingUsage

__all__ = ["FakeExecution", "FakeJob", "InMemoryLifecycle"]

#: The step statuses a step may (re)start from: the storage's own rule.
_STARTABLE = frozenset(
    {StepStatus.PENDING, StepStatus.RUNNING, StepStatus.FAILED, StepStatus.AWAITING_APPROVAL}
)


@dataclass
class FakeExecution:
    status: ExecutionStatus
    error_class: str | None = None
    error_message: str | None = None
    key_retired: bool = False
    ended_at: datetime | None = None
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
        self.records: dict[UUID, ExecutionRecord] = {}
        #: How many times a consumer was woken.
        self.announcements = 0
        self._open_transactions = 0

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Any]:
        saved = copy.deepcopy((self.executions, self.jobs, self.records))
        self._open_transactions += 1
        try:
            yield self
        except BaseException:
            self.executions, self.jobs, self.records = saved
            raise
        finally:
            self._open_transactions -= 1

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return self._transaction()

    async def lock_tenant_quota(self, tx: Any, tenant_id: str) -> None:
        if tx is None or not self._open_transactions:
            raise RuntimeError("the quota lock is transaction-scoped: open a transaction first")

    async def waiting_jobs(self, tx: Any, tenant_id: str) -> int:
        # No job is ever leased here: every job of the tenant is waiting.
        return sum(1 for job in self.jobs.values() if job.tenant_id == tenant_id)

    async def key_is_live(self, tx: Any, tenant_id: str, idempotency_key: str) -> bool:
        return any(
            record.tenant_id == tenant_id
            and record.idempotency_key == idempotency_key
            and not self.executions[eid].key_retired
            for eid, record in self.records.items()
        )

    def add(self, record: ExecutionRecord) -> ExecutionRecord:
        """Store ``record`` as it is (what the real core's create did)."""
        self.executions[record.id] = FakeExecution(
            record.status, key_retired=record.idempotency_retired_at is not None
        )
        self.records[record.id] = record
        return record

    @property
    def queue_configured(self) -> bool:
        return self._queue_configured

    def _live(self, new: NewExecution, dedup_window: timedelta) -> ExecutionRecord | None:
        now = datetime.now(UTC)
        for eid, record in self.records.items():
            execution = self.executions[eid]
            if (
                record.tenant_id != new.tenant_id
                or record.idempotency_key != new.idempotency_key
                or execution.key_retired
            ):
                continue
            ended = execution.ended_at or record.ended_at
            if execution.status in TERMINAL and ended is not None and ended < now - dedup_window:
                continue  # given up by this create (below), as the statement's ``retired``
            return self._current(eid)
        return None

    def _create(self, new: NewExecution, dedup_window: timedelta) -> ExecutionRecord:
        if new.initial_status in TERMINAL:
            raise ValueError(f"an execution cannot start {new.initial_status}")
        now = datetime.now(UTC)
        for eid, record in self.records.items():
            execution = self.executions[eid]
            if (
                record.tenant_id == new.tenant_id
                and record.idempotency_key == new.idempotency_key
                and not execution.key_retired
            ):
                execution.key_retired = True  # terminal past the window: _live skipped it
        eid = uuid4()
        record = ExecutionRecord(
            id=eid,
            tenant_id=new.tenant_id,
            actor_id=new.actor_id,
            request_id=new.request_id,
            idempotency_key=new.idempotency_key,
            idempotency_retired_at=None,
            plan_hash=new.plan_hash,
            plan_snapshot=new.plan_snapshot,
            plan_snapshot_hash=new.plan_snapshot_hash,
            status=new.initial_status,
            execution_mode=new.execution_mode,
            sla_class=new.sla_class,
            action_class=new.action_class,
            approval_level=new.approval_level,
            approval_id=None,
            priority=new.priority,
            timeout_policy_id=new.timeout_policy_id,
            timeout_ms=new.timeout_ms,
            timed_out=False,
            estimated_duration_ms=new.estimated_duration_ms,
            deadline_at=None,
            record_only=new.record_only,
            attempts=0,
            created_at=now,
            started_at=now if new.initial_status is ExecutionStatus.RUNNING else None,
            ended_at=None,
            updated_at=now,
            cancelled_by=None,
            cancelled_at=None,
            cancel_reason=None,
            result_summary=None,
            error_class=None,
            error_message=None,
            worker_id=None,
            lease_renewals=0,
            cancel_checks_performed=0,
            last_transition_at=None,
            last_transition_by=None,
            last_transition_from=None,
            lease_token=None,
            event_seq=1,
            steps=tuple(
                StepRecord(
                    execution_id=eid,
                    step_id=step_id,
                    position=position,
                    action=action,
                    action_class=action_class,
                    status=StepStatus.PENDING,
                    idempotency_key=step_idempotency_key(eid, step_id),
                    attempt=0,
                    worker_id=None,
                    created_at=now,
                    started_at=None,
                    ended_at=None,
                    duration_ms=None,
                    result=None,
                    error_class=None,
                    error_message=None,
                )
                for step_id, position, action, action_class in new.steps
            ),
            trace_context=new.trace_context,
        )
        return self.add(record)

    async def create(
        self, new: NewExecution, *, dedup_window: timedelta, tx: Any = None
    ) -> tuple[ExecutionRecord, bool]:
        live = self._live(new, dedup_window)
        if live is not None:
            return live, False
        return self._create(new, dedup_window), True

    async def create_admitted(
        self,
        new: NewExecution,
        *,
        dedup_window: timedelta,
        max_in_flight: int,
        tx: Any = None,
    ) -> tuple[ExecutionRecord, bool] | ImmediateUsage:
        live = self._live(new, dedup_window)
        if live is not None:
            return live, False  # a duplicate takes no slot
        in_flight = sum(
            1
            for eid, record in self.records.items()
            if record.tenant_id == new.tenant_id
            and record.execution_mode == "immediate"
            and self.executions[eid].status in (ExecutionStatus.PENDING, ExecutionStatus.RUNNING)
        )
        if max_in_flight and in_flight >= max_in_flight:
            return ImmediateUsage(in_flight=in_flight, soonest_end=None)
        return self._create(new, dedup_window), True

    async def create_queued(
        self,
        tx: Any,
        new: NewExecution,
        policy: TimeoutPolicy,
        *,
        dedup_window: timedelta,
        max_waiting: int,
        by: str,
    ) -> CreatedQueued | WaitingUsage:
        if not self._queue_configured:
            raise QueueUnavailableError("no queue is configured for background execution")
        await self.lock_tenant_quota(tx, new.tenant_id)
        live = self._live(new, dedup_window)
        if live is not None:  # a duplicate takes no slot
            return CreatedQueued(live, False, await self.queued_job(live.id))
        waiting = await self.waiting_jobs(tx, new.tenant_id)
        if max_waiting and waiting >= max_waiting:
            return WaitingUsage(waiting=waiting)
        record = self._create(new, dedup_window)
        queued = await self.enqueue(
            tx, record, policy, by=by, expected_from=ExecutionStatus.PENDING
        )
        return CreatedQueued(queued.record, True, queued.job_id)

    def _current(self, execution_id: UUID) -> ExecutionRecord:
        execution = self.executions[execution_id]
        record = self.records[execution_id]
        return replace(
            record,
            status=execution.status,
            error_class=execution.error_class or record.error_class,
            error_message=execution.error_message or record.error_message,
            ended_at=execution.ended_at or record.ended_at,
            idempotency_retired_at=record.idempotency_retired_at
            or (record.updated_at if execution.key_retired else None),
        )

    async def get(self, tenant_id: str, execution_id: UUID, *, tx: Any = None) -> ExecutionRecord:
        record = self.records.get(execution_id)
        if record is None or record.tenant_id != tenant_id:
            raise NotFoundError("execution not found", execution_id=str(execution_id))
        return self._current(execution_id)

    async def queued_job(self, execution_id: UUID, *, tx: Any = None) -> UUID | None:
        for job_id, job in self.jobs.items():
            if job.execution_id == execution_id:
                return job_id
        return None

    async def announce(self) -> None:
        self.announcements += 1

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
        if to in TERMINAL:
            execution.ended_at = datetime.now(UTC)
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
    ) -> Queued:
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
        return Queued(self._current(record.id), job_id)

    def _step_of(
        self, execution_id: UUID, step_id: str, lease_token: UUID | None, target: StepStatus
    ) -> tuple[int, StepRecord]:
        """The step to write, if its execution runs and ``lease_token`` (when given) owns it."""
        record = self._current(execution_id)
        if lease_token is not None and record.lease_token != lease_token:
            raise StaleLeaseError("the lease token no longer owns this execution")
        if record.status is not ExecutionStatus.RUNNING:
            raise FSMError(
                f"Illegal state transition: execution is {record.status.value}, a step cannot "
                f"become {target.value}",
                from_status=record.status.value,
                to_status=target.value,
                step_id=step_id,
            )
        for index, step in enumerate(record.steps):
            if step.step_id == step_id:
                return index, step
        raise NotFoundError("step not found", execution_id=str(execution_id), step_id=step_id)

    def _write_step(self, execution_id: UUID, index: int, step: StepRecord) -> StepRecord:
        record = self.records[execution_id]
        steps = list(record.steps)
        steps[index] = step
        self.records[execution_id] = replace(record, steps=tuple(steps))
        return step

    async def start_step(
        self,
        execution_id: UUID,
        step_id: str,
        *,
        worker_id: str | None,
        lease_token: UUID | None = None,
    ) -> StepRecord:
        index, step = self._step_of(execution_id, step_id, lease_token, StepStatus.RUNNING)
        if step.status not in _STARTABLE:
            raise FSMError(
                f"Illegal state transition {step.status.value} -> running",
                from_status=step.status.value,
                to_status=StepStatus.RUNNING.value,
                step_id=step_id,
            )
        started = replace(
            step,
            status=StepStatus.RUNNING,
            attempt=step.attempt + 1,
            worker_id=worker_id,
            started_at=datetime.now(UTC),
            ended_at=None,
            duration_ms=None,
            result=None,
            error_class=None,
            error_message=None,
        )
        return self._write_step(execution_id, index, started)

    async def finish_step(
        self,
        execution_id: UUID,
        step_id: str,
        *,
        status: StepStatus,
        result: Any = None,
        error_class: str | None = None,
        error_message: str | None = None,
        lease_token: UUID | None = None,
    ) -> StepRecord:
        outcome = StepStatus(status)
        if outcome not in (StepStatus.SUCCEEDED, StepStatus.FAILED):
            raise ValueError(f"a step finishes succeeded or failed, not {outcome.value}")
        index, step = self._step_of(execution_id, step_id, lease_token, outcome)
        if step.status is not StepStatus.RUNNING:
            raise FSMError(
                f"Illegal state transition {step.status.value} -> {outcome.value}",
                from_status=step.status.value,
                to_status=outcome.value,
                step_id=step_id,
            )
        now = max(datetime.now(UTC), step.started_at or datetime.now(UTC))
        started = step.started_at or now
        finished = replace(
            step,
            status=outcome,
            result=result,
            error_class=error_class,
            error_message=error_message,
            ended_at=now,
            duration_ms=int((now - started).total_seconds() * 1000),
        )
        return self._write_step(execution_id, index, finished)

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
