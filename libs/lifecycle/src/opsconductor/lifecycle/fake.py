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
rollback); a background submit needs one, as the quota lock it takes does, but that lock
excludes nothing here (the fake runs one task at a time).

The worker's side keeps the Redis queue apart (:attr:`InMemoryLifecycle.queue`: never rolled
back, as Redis is not) from the Postgres rows (``jobs``, the DLQ, the locks): leases with their
tokens (every write fenced on them: a stale token writes nothing), renewal limits, attempts and
the ``2^attempts`` s backoff on :attr:`~InMemoryLifecycle.clock`, the DLQ on the last attempt,
per-asset locks (all or nothing, not re-entrant, expiring), the cancel flag and its counted
checks, and the takeover of a running execution.

The api's side (reads, cancel, the DLQ, the queue's gauges and drain) pages listings with the
storage's tokens, takes a cancelled job out of both stores unless it is leased, re-runs a DLQ
entry as a new execution (the entry marked requeued, the new execution naming it), and drains
dispatch with :attr:`InMemoryLifecycle.paused`.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

from opsconductor.common.errors import (
    DlqEntryRequeuedError,
    FSMError,
    LeaseRenewalLimitError,
    NotFoundError,
    QueueUnavailableError,
    ResourceBusyError,
    StaleLeaseError,
)
from opsconductor.common.fsm import TERMINAL, ExecutionStatus, StepStatus, check_transition
from opsconductor.common.hashing import step_idempotency_key
from opsconductor.lifecycle.facade import (
    DLQ_REQUEUED_EVENT,
    DeadLetter,
    ExecutionLifecycle,
    FirstRenewal,
    Handoff,
    Queued,
)
from opsconductor.lifecycle.queue.dlq import DlqEntry
from opsconductor.lifecycle.queue.lease import lease_seconds
from opsconductor.lifecycle.queue.records import LeasedJob, QueueStats
from opsconductor.lifecycle.storage.approval_records import ApprovalRecord, ApprovalState
from opsconductor.lifecycle.storage.execution_records import ExecutionRecord, StepRecord
from opsconductor.lifecycle.storage.executions import CancelInitiator, CreatedQueued, NewExecution
from opsconductor.lifecycle.storage.locks import HeldLock, LockRequest, LockSet, sorted_requests
from opsconductor.lifecycle.storage.paging import (
    decode_page_token,
    encode_page_token,
    invalid_page_request,
)
from opsconductor.lifecycle.storage.policies import TimeoutPolicy
from opsconductor.lifecycle.storage.quota_usage import ImmediateUsage, WaitingUsage

__all__ = [
    "FakeDeadLetter",
    "FakeExecution",
    "FakeJob",
    "FakeLock",
    "FakeQueueEntry",
    "InMemoryLifecycle",
]

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
    # The worker's side (the real row's columns of the same names).
    lease_token: UUID | None = None
    worker_id: str | None = None
    attempts: int = 0
    lease_renewals: int = 0
    cancel_checks_performed: int = 0
    cancelled_at: datetime | None = None
    cancelled_by: str | None = None
    cancel_reason: str | None = None
    cancel_initiator: str | None = None
    timed_out: bool = False
    result_summary: dict[str, Any] | None = None
    started_at: datetime | None = None
    deadline_at: datetime | None = None
    #: Event types the worker's writes appended that are not transitions, oldest first
    #: (``lease_taken_over``, ``retry_scheduled``, ``moved_to_dlq``, ``step_approval_requested``,
    #: and the api's ``dlq_requeued``).
    events: list[str] = field(default_factory=list)
    #: The payload of its ``dlq_requeued`` event (it re-runs the entry ``dlq_id`` names).
    dlq_requeued: dict[str, Any] | None = None


@dataclass(frozen=True)
class FakeJob:
    execution_id: UUID
    tenant_id: str
    priority: int
    max_attempts: int
    max_lease_renewals: int
    request_id: str | None
    trace_context: str | None
    # The queue row's mirror of its Redis lease (the real row's columns of the same names).
    state: str = "ready"
    lease_token: UUID | None = None
    lease_owner: str | None = None
    attempts: int = 0
    lease_renewals: int = 0
    available_at: datetime | None = None
    last_error: dict[str, Any] | None = None


@dataclass
class FakeQueueEntry:
    """A job as the Redis queue holds it (its hash): not rolled back with a transaction."""

    job_id: UUID
    execution_id: UUID
    tenant_id: str
    priority: int
    max_attempts: int
    max_lease_renewals: int
    enqueued_at: float
    #: FIFO order within a priority (the real ready score's sequence).
    seq: int
    request_id: str | None
    trace_context: str | None
    #: ``ready``, ``delayed`` (until ``available_at``), ``leased`` (until ``lease_deadline``) or
    #: ``dead`` (its last lease expired: the reaper dead-letters it).
    state: str = "ready"
    attempts: int = 0
    deliveries: int = 0
    lease_renewals: int = 0
    lease_expirations: int = 0
    lease_token: UUID | None = None
    worker_id: str | None = None
    lease_deadline: float | None = None
    available_at: float | None = None
    last_error: dict[str, Any] | None = None


@dataclass(frozen=True)
class FakeDeadLetter:
    """A DLQ entry: the job's last outcome (and, once requeued, by whom and when)."""

    id: UUID
    execution_id: UUID
    attempts: int
    error_class: str | None
    error_message: str | None
    last_error: dict[str, Any] | None
    tenant_id: str = ""
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    requeued_at: datetime | None = None
    requeued_by: str | None = None

    def entry(self) -> DlqEntry:
        return DlqEntry(
            id=self.id,
            execution_id=self.execution_id,
            tenant_id=self.tenant_id,
            attempts=self.attempts,
            error_class=self.error_class,
            error_message=self.error_message,
            last_error=self.last_error,
            created_at=self.created_at,
            requeued_at=self.requeued_at,
            requeued_by=self.requeued_by,
        )


@dataclass(frozen=True)
class FakeLock:
    owner_token: UUID
    owner_execution_id: UUID | None
    expires_at: datetime
    fencing_token: int


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
        #: The Redis side of each job (Redis is not rolled back with a Postgres transaction).
        self.queue: dict[UUID, FakeQueueEntry] = {}
        #: Leases that expired, ever (Redis's counter key: it outlives the jobs it counted).
        self.lease_expirations_total = 0
        #: Open DLQ entries by execution id.
        self.dlq: dict[UUID, FakeDeadLetter] = {}
        #: Requeued DLQ entries by entry id (out of :attr:`dlq`: no longer open).
        self.requeued_dlq: dict[UUID, FakeDeadLetter] = {}
        #: Whether dispatch is drained (the queue's Redis flag: never rolled back).
        self.paused = False
        #: Held locks by key.
        self.locks: dict[str, FakeLock] = {}
        #: Approval requests by id (the approvals port's fake, :mod:`.approval_fake`, reads and
        #: decides them; a cancel closes them, a level-3 pause opens one, as the real core).
        self.approvals: dict[UUID, ApprovalRecord] = {}
        #: The queue's clock (epoch seconds); tests move it to make backoffs and leases pass.
        self.clock: Callable[[], float] = time.time
        self._seq = 0
        self._fencing = 0
        #: The timeout_policies table as the fake holds it (the handoff's first renewal).
        self.policies: dict[str, TimeoutPolicy] = {}

    #: What a rollback puts back (the Postgres side; the Redis ``queue`` is never rolled back).
    _ROLLED_BACK = ("executions", "jobs", "records", "dlq", "requeued_dlq", "locks", "approvals")

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Any]:
        saved = copy.deepcopy({name: getattr(self, name) for name in self._ROLLED_BACK})
        self._open_transactions += 1
        try:
            yield self
        except BaseException:
            for name, value in saved.items():
                setattr(self, name, value)
            raise
        finally:
            self._open_transactions -= 1

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return self._transaction()

    def _waiting(self, tenant_id: str) -> int:
        # Ready or delayed: every row of the tenant not leased.
        return sum(
            1 for job in self.jobs.values() if job.tenant_id == tenant_id and job.state != "leased"
        )

    def add(self, record: ExecutionRecord) -> ExecutionRecord:
        """Store ``record`` as it is (what the real core's create did)."""
        self.executions[record.id] = FakeExecution(
            record.status,
            key_retired=record.idempotency_retired_at is not None,
            lease_token=record.lease_token,
            worker_id=record.worker_id,
            attempts=record.attempts,
            lease_renewals=record.lease_renewals,
            cancel_checks_performed=record.cancel_checks_performed,
            cancelled_at=record.cancelled_at,
            cancelled_by=record.cancelled_by,
            timed_out=record.timed_out,
            result_summary=record.result_summary,
            started_at=record.started_at,
            deadline_at=record.deadline_at,
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
        if tx is None or not self._open_transactions:
            raise RuntimeError("the quota lock is transaction-scoped: open a transaction first")
        live = self._live(new, dedup_window)
        if live is not None:  # a duplicate takes no slot
            return CreatedQueued(live, False, await self.queued_job(live.id))
        waiting = self._waiting(new.tenant_id)
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
            lease_token=execution.lease_token,
            worker_id=execution.worker_id,
            attempts=execution.attempts,
            lease_renewals=execution.lease_renewals,
            cancel_checks_performed=execution.cancel_checks_performed,
            cancelled_at=execution.cancelled_at,
            cancelled_by=execution.cancelled_by,
            cancel_reason=execution.cancel_reason or record.cancel_reason,
            cancel_initiator=execution.cancel_initiator or record.cancel_initiator,
            timed_out=execution.timed_out,
            result_summary=execution.result_summary,
            started_at=execution.started_at,
            deadline_at=execution.deadline_at,
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
        if to is ExecutionStatus.RUNNING and execution.started_at is None:
            execution.started_at = datetime.now(UTC)
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
        self._push(job_id, self.jobs[job_id])
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

    # --- The api: reads, cancel, the dead-letter queue, queue stats and drain ---------------
    # Listings page newest first on (created_at, id) with the storage's own tokens (bound to
    # the listing's filters); a cancel that ended a job's execution takes the job out of both
    # stores unless a worker holds it; a requeue re-runs an entry as a new execution and marks
    # the entry, all rolled back with the caller's transaction (the Redis push last).

    async def list_executions(
        self,
        tenant_id: str,
        *,
        statuses: Collection[ExecutionStatus],
        mode: str | None,
        page_size: int,
        page_token: str | None,
    ) -> tuple[list[ExecutionRecord], str | None]:
        try:
            wanted = {ExecutionStatus(s) for s in statuses}
        except ValueError as exc:
            allowed = sorted(s.value for s in ExecutionStatus)
            raise invalid_page_request("statuses", f"must be among {allowed}") from exc
        if mode is not None and mode not in ("immediate", "background"):
            raise invalid_page_request("mode", "must be one of ['background', 'immediate']")
        scope = f"executions:{tenant_id}:{sorted(s.value for s in wanted)}:{mode}"
        rows = [
            replace(self._current(eid), steps=())
            for eid, record in self.records.items()
            if record.tenant_id == tenant_id
            and (not wanted or self.executions[eid].status in wanted)
            and (mode is None or record.execution_mode == mode)
        ]
        return _page(rows, scope, page_size, page_token)

    async def cancel(
        self,
        tenant_id: str,
        execution_id: UUID,
        *,
        by: str,
        reason: str | None,
        initiator: CancelInitiator,
    ) -> ExecutionRecord:
        record, _changed = await self._request_cancel(
            tenant_id, execution_id, by, reason, initiator
        )
        if record.status is not ExecutionStatus.CANCELLED:
            return record
        for job_id, job in list(self.jobs.items()):
            if job.execution_id == execution_id and job.state != "leased":
                del self.jobs[job_id]
                if self._queue_configured and self.queue_up:  # else left in Redis, as there
                    self.queue.pop(job_id, None)
        return record

    def _dlq_entries(self) -> list[FakeDeadLetter]:
        return [*self.dlq.values(), *self.requeued_dlq.values()]

    async def dead_letters(
        self,
        *,
        tenant_id: str | None,
        error_class: str | None,
        page_size: int,
        page_token: str | None,
    ) -> tuple[list[DlqEntry], str | None]:
        scope = f"dlq:{tenant_id}:{error_class}"
        rows = [
            e.entry()
            for e in self.dlq.values()
            if (tenant_id is None or e.tenant_id == tenant_id)
            and (error_class is None or e.error_class == error_class)
        ]
        return _page(rows, scope, page_size, page_token)

    async def dead_letter_entry(self, dlq_id: UUID, *, tenant_id: str | None) -> DlqEntry:
        for entry in self._dlq_entries():
            if entry.id == dlq_id and (tenant_id is None or entry.tenant_id == tenant_id):
                return entry.entry()
        raise NotFoundError("dead-letter entry not found", dlq_id=str(dlq_id))

    async def open_dead_letters(self) -> int:
        return len(self.dlq)

    async def lock_dead_letter(self, tx: Any, dlq_id: UUID, *, tenant_id: str | None) -> DlqEntry:
        found = await self.dead_letter_entry(dlq_id, tenant_id=tenant_id)
        if found.requeued_at is not None:
            became = next(
                (
                    eid
                    for eid, execution in self.executions.items()
                    if (execution.dlq_requeued or {}).get("dlq_id") == str(dlq_id)
                ),
                None,
            )
            raise DlqEntryRequeuedError(
                f"dead-letter entry {dlq_id} was already requeued by {found.requeued_by} at "
                f"{found.requeued_at.isoformat()}"
                + (f" as execution {became}" if became is not None else ""),
                dlq_id=str(dlq_id),
                requeued_by=found.requeued_by,
                requeued_at=found.requeued_at.isoformat(),
                requeued_as=str(became) if became is not None else "",
            )
        return found

    async def requeue_dead_letter(
        self,
        tx: Any,
        entry: DlqEntry,
        record: ExecutionRecord,
        policy: TimeoutPolicy,
        *,
        by: str,
        event_payload: Mapping[str, Any],
    ) -> tuple[Queued, DlqEntry]:
        if tx is None or not self._open_transactions:
            raise RuntimeError("a requeue is one transaction: open one first")
        queued = await self.enqueue(
            tx, record, policy, by=by, expected_from=ExecutionStatus.PENDING
        )
        # The real order is row, event, mark, transition, push: all in the caller's transaction.
        open_entry = self.dlq.pop(entry.execution_id)
        marked = replace(open_entry, requeued_at=datetime.now(UTC), requeued_by=by)
        self.requeued_dlq[marked.id] = marked
        execution = self.executions[record.id]
        execution.events.append(DLQ_REQUEUED_EVENT)
        execution.dlq_requeued = {**event_payload, "job_id": str(queued.job_id)}
        return queued, marked.entry()

    async def queue_stats(self) -> QueueStats:
        self._redis()
        now = self.clock()
        self._housekeeping(now)
        ready = [e for e in self.queue.values() if e.state == "ready"]
        by_priority: dict[int, int] = {}
        for e in ready:
            by_priority[e.priority] = by_priority.get(e.priority, 0) + 1
        return QueueStats(
            ready_by_priority=by_priority,
            leased=sum(1 for e in self.queue.values() if e.state == "leased"),
            expired_leases=0,  # housekeeping above reclaimed them, as the stats' snapshot
            delayed=sum(1 for e in self.queue.values() if e.state == "delayed"),
            dead=sum(1 for e in self.queue.values() if e.state == "dead"),
            oldest_ready_age_s=max(now - min(e.enqueued_at for e in ready), 0.0) if ready else None,
            paused=self.paused,
            lease_expirations_total=self.lease_expirations_total,
        )

    async def set_dispatch_paused(self, paused: bool) -> None:
        self._redis()
        self.paused = paused

    # --- The worker: Redis lease, handoff and claim, runs, steps, locks, settle -------------
    # Redis (``queue``) and Postgres (the rest) are two stores here as there: a Postgres-side
    # write runs in :meth:`_transaction` (all or nothing), a Redis change is never rolled back,
    # and each settle checks the Redis side before it writes anything, as the real order does
    # (row locked, Redis, commit). Dequeue orders by priority then FIFO; the tenants' fair
    # share and running limits are not modelled; a drain (:attr:`paused`) hands out nothing.

    def _push(self, job_id: UUID, job: FakeJob) -> None:
        self._seq += 1
        self.queue[job_id] = FakeQueueEntry(
            job_id=job_id,
            execution_id=job.execution_id,
            tenant_id=job.tenant_id,
            priority=job.priority,
            max_attempts=job.max_attempts,
            max_lease_renewals=job.max_lease_renewals,
            enqueued_at=self.clock(),
            seq=self._seq,
            request_id=job.request_id,
            trace_context=job.trace_context,
        )

    def push_without_row(self, record: ExecutionRecord, policy: TimeoutPolicy) -> UUID:
        """A job in Redis whose row is not visible (its submit has not committed yet)."""
        job_id = uuid4()
        self._push(
            job_id,
            FakeJob(
                execution_id=record.id,
                tenant_id=record.tenant_id,
                priority=record.priority,
                max_attempts=policy.max_attempts,
                max_lease_renewals=policy.max_lease_renewals,
                request_id=record.request_id,
                trace_context=record.trace_context,
            ),
        )
        return job_id

    def _redis(self) -> None:
        if not self._queue_configured:
            raise QueueUnavailableError("no queue is configured for background execution")
        if not self.queue_up:
            raise QueueUnavailableError("the background queue is unreachable")

    def _held(self, job_id: UUID, lease_token: UUID) -> FakeQueueEntry:
        """The Redis entry ``lease_token`` still holds (``StaleLeaseError`` otherwise)."""
        entry = self.queue.get(job_id)
        if entry is None or entry.state != "leased" or entry.lease_token != lease_token:
            raise StaleLeaseError(job_id=str(job_id))
        return entry

    def _housekeeping(self, now: float) -> None:
        """Due retries become ready; expired leases are reclaimed (an attempt spent)."""
        for entry in self.queue.values():
            if entry.state == "delayed" and (entry.available_at or 0) <= now:
                entry.state, entry.available_at = "ready", None
            elif entry.state == "leased" and (entry.lease_deadline or 0) <= now:
                holder = entry.worker_id
                entry.attempts += 1
                entry.lease_expirations += 1
                self.lease_expirations_total += 1
                entry.state, entry.lease_token, entry.worker_id = "ready", None, None
                entry.lease_deadline = None
                if entry.attempts >= entry.max_attempts:
                    # No attempt left: dead until the reaper moves it to the DLQ.
                    entry.state = "dead"
                    entry.last_error = {
                        "error_class": "LeaseExpired",
                        "message": f"the lease of worker {holder} expired on the last attempt",
                    }

    async def dequeue_batch(self, worker_id: str, lease_s: float, count: int) -> list[LeasedJob]:
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        self._redis()
        now = self.clock()
        self._housekeeping(now)
        if self.paused:
            return []  # drained: nothing handed out, leases already granted unaffected
        ready = sorted(
            (e for e in self.queue.values() if e.state == "ready"),
            key=lambda e: (e.priority, e.seq),
        )
        leased: list[LeasedJob] = []
        for entry in ready[:count]:
            entry.state, entry.lease_token, entry.worker_id = "leased", uuid4(), worker_id
            entry.lease_deadline = now + lease_s
            entry.lease_renewals = 0
            entry.deliveries += 1
            leased.append(self._leased(entry))
        return leased

    def _leased(self, entry: FakeQueueEntry) -> LeasedJob:
        assert entry.lease_token is not None
        assert entry.worker_id is not None
        return LeasedJob(
            job_id=entry.job_id,
            execution_id=entry.execution_id,
            tenant_id=entry.tenant_id,
            priority=entry.priority,
            lease_token=entry.lease_token,
            worker_id=entry.worker_id,
            lease_deadline=entry.lease_deadline or 0.0,
            attempts=entry.attempts,
            max_attempts=entry.max_attempts,
            lease_renewals=entry.lease_renewals,
            max_lease_renewals=entry.max_lease_renewals,
            lease_expirations=entry.lease_expirations,
            deliveries=entry.deliveries,
            enqueued_at=entry.enqueued_at,
            last_error=entry.last_error,
            request_id=entry.request_id,
            trace_context=entry.trace_context,
        )

    async def renew_lease(self, job: LeasedJob, lease_s: float) -> float:
        self._redis()
        entry = self._held(job.job_id, job.lease_token)
        if entry.lease_renewals >= entry.max_lease_renewals:
            raise LeaseRenewalLimitError(
                job_id=str(job.job_id), lease_renewals=entry.lease_renewals
            )
        entry.lease_renewals += 1
        entry.lease_deadline = self.clock() + lease_s
        return entry.lease_deadline

    async def record_renewal(
        self, job: LeasedJob, *, lease_expires_at: datetime, lease_renewals: int
    ) -> bool:
        row = self.jobs.get(job.job_id)
        execution = self.executions.get(job.execution_id)
        if execution is not None and execution.lease_token == job.lease_token:
            execution.lease_renewals += 1
        if row is None or row.lease_token != job.lease_token or row.state != "leased":
            return False
        self.jobs[job.job_id] = replace(row, lease_renewals=lease_renewals)
        return True

    def _release_entry(self, job: LeasedJob, delay_s: float) -> None:
        if delay_s < 0:
            raise ValueError("delay_s must not be negative")
        self._redis()
        entry = self._held(job.job_id, job.lease_token)
        entry.lease_token, entry.worker_id, entry.lease_deadline = None, None, None
        if delay_s:
            entry.state, entry.available_at = "delayed", self.clock() + delay_s
        else:
            entry.state = "ready"

    async def defer(self, job: LeasedJob, delay_s: float) -> None:
        self._release_entry(job, delay_s)

    def _lease_row(self, job: LeasedJob, worker_id: str) -> bool:
        row = self.jobs.get(job.job_id)
        if row is None:
            return False  # not visible: its submit has not committed
        self.jobs[job.job_id] = replace(
            row,
            state="leased",
            lease_token=job.lease_token,
            lease_owner=worker_id,
            lease_renewals=0,
            attempts=job.attempts,
        )
        return True

    async def hand_off(
        self,
        batch: Sequence[LeasedJob],
        *,
        worker_id: str,
        first_renewal: FirstRenewal | None = None,
    ) -> list[Handoff]:
        out: list[Handoff] = []
        for job in batch:
            execution = self.executions.get(job.execution_id)
            if not self._lease_row(job, worker_id):
                # No row: settled when its execution ended (it never moves again).
                settled = execution is not None and execution.status in TERMINAL
                out.append(Handoff(job, leased=False, settled=settled))
                continue
            if execution is None or execution.status not in (
                ExecutionStatus.PENDING,
                ExecutionStatus.QUEUED,
            ):
                out.append(Handoff(job, leased=True))  # the careful path decides
                continue
            self._claim_fresh(job.execution_id, job.lease_token, worker_id, None)
            lease_s = None
            if first_renewal is not None and job.lease_renewals == 0 < job.max_lease_renewals:
                # The immediate renewal's mirror, written by the handoff (queue.handoff).
                policy = self.policies.get(self.records[job.execution_id].timeout_policy_id or "")
                lease_s = first_renewal.override_s or (
                    lease_seconds(policy) if policy is not None else first_renewal.default_s
                )
                self.jobs[job.job_id] = replace(self.jobs[job.job_id], lease_renewals=1)
                execution.lease_renewals += 1
            out.append(
                Handoff(job, leased=True, record=self._current(job.execution_id), lease_s=lease_s)
            )
        return out

    def _claim_fresh(
        self, execution_id: UUID, lease_token: UUID, worker_id: str, budget: timedelta | None
    ) -> None:
        record = self.records[execution_id]
        execution = self._move(execution_id, ExecutionStatus.RUNNING, by=worker_id, payload=None)
        execution.lease_token, execution.worker_id = lease_token, worker_id
        execution.attempts += 1
        execution.deadline_at = datetime.now(UTC) + (
            budget or timedelta(milliseconds=record.timeout_ms)
        )

    async def mirror_lease(self, job: LeasedJob, *, worker_id: str) -> bool:
        if not self._lease_row(job, worker_id):
            return False
        execution = self.executions.get(job.execution_id)
        if execution is not None:
            execution.lease_token = job.lease_token  # the fencing token from now on
        return True

    async def find(self, execution_id: UUID, *, with_steps: bool = True) -> ExecutionRecord | None:
        if execution_id not in self.records:
            return None
        record = self._current(execution_id)
        return record if with_steps else replace(record, steps=())

    async def claim(
        self, execution_id: UUID, *, lease_token: UUID, worker_id: str, budget: timedelta
    ) -> ExecutionRecord | None:
        execution = self.executions.get(execution_id)
        if execution is None:
            return None
        if execution.status in TERMINAL or execution.status is ExecutionStatus.AWAITING_APPROVAL:
            return None
        if execution.status is ExecutionStatus.RUNNING:
            # A takeover: the steps the previous holder left running start again.
            execution.lease_token, execution.worker_id = lease_token, worker_id
            execution.attempts += 1
            execution.deadline_at = datetime.now(UTC) + budget
            record = self.records[execution_id]
            self.records[execution_id] = replace(
                record,
                steps=tuple(
                    replace(s, status=StepStatus.PENDING, started_at=None, worker_id=None)
                    if s.status is StepStatus.RUNNING
                    else s
                    for s in record.steps
                ),
            )
            execution.events.append("lease_taken_over")
        else:
            self._claim_fresh(execution_id, lease_token, worker_id, budget)
        return self._current(execution_id)

    async def start_run(self, record: ExecutionRecord, *, worker_id: str) -> ExecutionRecord:
        execution = self.executions[record.id]
        if execution.status not in (ExecutionStatus.PENDING, ExecutionStatus.AWAITING_APPROVAL):
            raise _illegal(execution.status, ExecutionStatus.RUNNING)
        self._move(record.id, ExecutionStatus.RUNNING, by=worker_id, payload=None)
        execution.worker_id = worker_id
        execution.deadline_at = datetime.now(UTC) + timedelta(milliseconds=record.timeout_ms)
        return replace(self._current(record.id), steps=())

    async def request_cancel(
        self, tenant_id: str, execution_id: UUID, *, by: str, reason: str | None
    ) -> tuple[ExecutionRecord, bool]:
        return await self._request_cancel(tenant_id, execution_id, by, reason, "user")

    async def _request_cancel(
        self,
        tenant_id: str,
        execution_id: UUID,
        by: str,
        reason: str | None,
        initiator: CancelInitiator,
    ) -> tuple[ExecutionRecord, bool]:
        record = await self.get(tenant_id, execution_id)
        execution = self.executions[execution_id]
        if execution.cancelled_at is not None or execution.status in TERMINAL:
            return record, False
        async with self._transaction():
            execution = self.executions[execution_id]
            execution.cancelled_at, execution.cancelled_by = datetime.now(UTC), by
            execution.cancel_reason, execution.cancel_initiator = reason, initiator
            if execution.status in (
                ExecutionStatus.PENDING,
                ExecutionStatus.QUEUED,
                ExecutionStatus.AWAITING_APPROVAL,
            ):
                # Nobody runs it: it ends at once (a running one is ended by its worker).
                self._skip(execution_id)
                self.close_approvals(execution_id)
                self._release_execution_locks(execution_id)
                self._move(
                    execution_id, ExecutionStatus.CANCELLED, by=by, payload={"reason": reason}
                )
        return self._current(execution_id), True

    async def cancel_requested(self, execution_id: UUID) -> bool:
        execution = self.executions.get(execution_id)
        if execution is None:
            raise NotFoundError("execution not found", execution_id=str(execution_id))
        execution.cancel_checks_performed += 1
        return execution.cancelled_at is not None

    async def start_step_unless_cancelled(
        self,
        execution_id: UUID,
        step_id: str,
        *,
        worker_id: str | None,
        lease_token: UUID | None = None,
    ) -> StepRecord | None:
        if await self.cancel_requested(execution_id):
            return None
        return await self.start_step(
            execution_id, step_id, worker_id=worker_id, lease_token=lease_token
        )

    async def lock_and_start_step(
        self,
        execution_id: UUID,
        step_id: str,
        *,
        worker_id: str | None,
        lease_token: UUID | None,
        lock: LockRequest,
        owner_token: UUID,
        ttl: timedelta,
    ) -> tuple[LockSet, StepRecord | None]:
        if execution_id not in self.executions:
            raise NotFoundError("execution not found", execution_id=str(execution_id))
        lock_set = await self.acquire_locks(
            [lock], owner_token=owner_token, owner_execution_id=execution_id, ttl=ttl
        )
        try:
            step = await self.start_step_unless_cancelled(
                execution_id, step_id, worker_id=worker_id, lease_token=lease_token
            )
        except BaseException:
            # One statement in Postgres: a refused start keeps no lock.
            await self.release_locks(lock_set)
            raise
        return lock_set, step

    async def load_steps(self, execution_id: UUID) -> tuple[StepRecord, ...]:
        return tuple(sorted(self.records[execution_id].steps, key=lambda s: s.position))

    def _fenced(self, execution_id: UUID, lease_token: UUID | None) -> FakeExecution:
        """The execution, if ``lease_token`` (when given) still owns it (the row lock's check)."""
        execution = self.executions.get(execution_id)
        if execution is None:
            raise NotFoundError("execution not found", execution_id=str(execution_id))
        if lease_token is not None and execution.lease_token != lease_token:
            raise StaleLeaseError(
                "lease token no longer owns this execution", execution_id=str(execution_id)
            )
        return execution

    def _skip(self, execution_id: UUID) -> list[StepRecord]:
        record = self.records[execution_id]
        now = datetime.now(UTC)
        skipped = [
            replace(s, status=StepStatus.SKIPPED, ended_at=max(now, s.started_at or now))
            for s in record.steps
            if s.status in (StepStatus.PENDING, StepStatus.AWAITING_APPROVAL)
        ]
        by_id = {s.step_id: s for s in skipped}
        self.records[execution_id] = replace(
            record, steps=tuple(by_id.get(s.step_id, s) for s in record.steps)
        )
        return sorted(skipped, key=lambda s: s.position)

    async def skip_remaining_steps(
        self, execution_id: UUID, *, lease_token: UUID | None, reason: str
    ) -> list[StepRecord]:
        execution = self._fenced(execution_id, lease_token)
        if execution.status in TERMINAL:
            raise FSMError(
                f"Illegal state transition: execution is {execution.status.value}, a step "
                "cannot become skipped",
                from_status=execution.status.value,
                to_status=StepStatus.SKIPPED.value,
            )
        return self._skip(execution_id)

    def _end(
        self,
        execution_id: UUID,
        to: ExecutionStatus,
        *,
        by: str,
        lease_token: UUID | None,
        fields: Mapping[str, Any],
    ) -> ExecutionRecord:
        """The final transition of a run: fenced, from ``running`` only, its locks freed."""
        execution = self._fenced(execution_id, lease_token)
        if execution.status is not ExecutionStatus.RUNNING:
            raise _illegal(execution.status, to)
        self._move(execution_id, to, by=by, payload=None)
        self._apply(execution, fields)
        self._release_execution_locks(execution_id)
        if lease_token is not None:
            # The lease holder's end deletes its job's row (the Redis ack is ack_ended's).
            for job_id, row in list(self.jobs.items()):
                if row.execution_id == execution_id and row.lease_token == lease_token:
                    del self.jobs[job_id]
        return replace(self._current(execution_id), steps=())

    @staticmethod
    def _apply(execution: FakeExecution, fields: Mapping[str, Any]) -> None:
        if "error_class" in fields:
            execution.error_class = fields["error_class"]
            execution.error_message = fields.get("error_message")
        if "timed_out" in fields:
            execution.timed_out = bool(fields["timed_out"])
        if "result_summary" in fields:
            execution.result_summary = fields["result_summary"]
        if "lease_token" in fields:
            execution.lease_token = fields["lease_token"]

    async def finish_last_step(
        self,
        execution_id: UUID,
        step_id: str,
        *,
        result: Any,
        by: str,
        lease_token: UUID | None,
        fields: Mapping[str, Any],
        tenant_id: str,
    ) -> tuple[ExecutionRecord, StepRecord] | None:
        execution = self.executions.get(execution_id)
        if (
            execution is None
            or execution.status is not ExecutionStatus.RUNNING
            or (lease_token is not None and execution.lease_token != lease_token)
            or not any(
                s.step_id == step_id and s.status is StepStatus.RUNNING
                for s in self.records[execution_id].steps
            )
        ):
            return None  # nothing written: the caller's writes one by one say why
        step = await self.finish_step(
            execution_id,
            step_id,
            status=StepStatus.SUCCEEDED,
            result=result,
            lease_token=lease_token,
        )
        final = self._end(
            execution_id, ExecutionStatus.SUCCEEDED, by=by, lease_token=lease_token, fields=fields
        )
        return final, step

    async def end_run(
        self,
        execution_id: UUID,
        *,
        to: ExecutionStatus,
        by: str,
        lease_token: UUID | None,
        fields: Mapping[str, Any],
        tenant_id: str,
        dead_letter: DeadLetter | None = None,
    ) -> ExecutionRecord:
        async with self._transaction():
            if dead_letter is not None:
                self._dead_letter(
                    dead_letter.job, dead_letter.error_class, dead_letter.error_message
                )
            return self._end(execution_id, to, by=by, lease_token=lease_token, fields=fields)

    async def requeue(
        self,
        execution_id: UUID,
        *,
        lease_token: UUID,
        by: str,
        reason: str,
        error_class: str | None = None,
        error_message: str | None = None,
    ) -> ExecutionRecord:
        async with self._transaction():
            execution = self._fenced(execution_id, lease_token)
            if execution.status is not ExecutionStatus.RUNNING:
                raise _illegal(execution.status, ExecutionStatus.QUEUED)
            record = self.records[execution_id]
            # Succeeded steps keep their outcome (a resumed run skips them).
            self.records[execution_id] = replace(
                record,
                steps=tuple(
                    replace(
                        s,
                        status=StepStatus.PENDING,
                        started_at=None,
                        ended_at=None,
                        duration_ms=None,
                        worker_id=None,
                    )
                    if s.status in (StepStatus.RUNNING, StepStatus.FAILED, StepStatus.SKIPPED)
                    else s
                    for s in record.steps
                ),
            )
            self._move(
                execution_id,
                ExecutionStatus.QUEUED,
                by=by,
                payload={"reason": reason, "error_class": error_class},
            )
            execution.lease_token = None
            if error_class is not None:
                execution.error_class, execution.error_message = error_class, error_message
            return self._current(execution_id)

    async def end_failed(
        self,
        execution_id: UUID,
        *,
        by: str,
        error_class: str,
        error_message: str,
        expected_from: ExecutionStatus | None = None,
        lease_token: UUID | None = None,
        skip_reason: str | None = None,
        fail_running_steps: bool = False,
        clear_lease: bool = False,
        release_locks: bool = False,
    ) -> bool:
        async with self._transaction():
            execution = self._fenced(execution_id, lease_token)
            if execution.status in TERMINAL or (
                expected_from is not None and execution.status is not expected_from
            ):
                return False
            record = self.records[execution_id]
            if fail_running_steps:
                now = datetime.now(UTC)
                self.records[execution_id] = replace(
                    record,
                    steps=tuple(
                        replace(
                            s,
                            status=StepStatus.FAILED,
                            ended_at=now,
                            error_class="EXECUTION_TIMEOUT",
                            error_message="the execution passed its deadline; its worker "
                            "stopped responding",
                        )
                        if s.status is StepStatus.RUNNING
                        else s
                        for s in record.steps
                    ),
                )
            self._skip(execution_id)
            self._move(execution_id, ExecutionStatus.FAILED, by=by, payload=None)
            execution.error_class, execution.error_message = error_class, error_message
            if clear_lease:
                execution.lease_token = None
            if release_locks:
                self._release_execution_locks(execution_id)
            return True

    async def retire_key(self, execution_id: UUID, *, tx: Any = None) -> bool:
        execution = self.executions[execution_id]
        if execution.key_retired or execution.status not in TERMINAL:
            return False
        execution.key_retired = True
        return True

    async def acquire_locks(
        self,
        requests: Iterable[LockRequest],
        *,
        owner_token: UUID,
        owner_execution_id: UUID | None,
        ttl: timedelta,
    ) -> LockSet:
        if ttl <= timedelta(0):
            raise ValueError("ttl must be positive")
        keys = [request.key for request in sorted_requests(requests)]
        now = datetime.now(UTC)
        for key in keys:
            # Not re-entrant: a key this owner holds is busy too; an expired one is free, and
            # the same execution re-takes its own (a resumed or taken-over run: a new owner).
            held = self.locks.get(key)
            if (
                held is not None
                and held.expires_at > now
                and (owner_execution_id is None or held.owner_execution_id != owner_execution_id)
            ):
                raise ResourceBusyError(
                    f"{key} is locked by another execution; retry once it has finished",
                    lock_key=key,
                    held_by_execution_id=(
                        str(held.owner_execution_id) if held.owner_execution_id else None
                    ),
                )
        granted: list[HeldLock] = []
        for key in keys:
            self._fencing += 1
            self.locks[key] = FakeLock(owner_token, owner_execution_id, now + ttl, self._fencing)
            granted.append(HeldLock(key, owner_token, self._fencing, now + ttl))
        return LockSet(owner_token, tuple(granted))

    async def release_locks(self, lock_set: LockSet) -> int:
        released = 0
        for key in lock_set.keys:
            held = self.locks.get(key)
            if held is not None and held.owner_token == lock_set.owner_token:
                del self.locks[key]
                released += 1
        return released

    # -- Approval requests (shared with :class:`~.approval_fake.InMemoryApprovals`) -------------

    def open_approval(self, execution_id: UUID, step_id: str | None) -> ApprovalRecord | None:
        """The pending request of the execution (``step_id`` None: the whole plan's)."""
        for approval in self.approvals.values():
            if (approval.execution_id, approval.step_id) == (execution_id, step_id) and (
                approval.is_pending
            ):
                return approval
        return None

    def new_approval(
        self, record: ExecutionRecord, step_id: str | None, ttl: timedelta
    ) -> ApprovalRecord:
        """A pending request bound to the execution row, never to what a caller says (the
        storage's INSERT ... SELECT from ``executions``): its hashes, level and requester."""
        snapshot = record.plan_snapshot or {}
        plan = snapshot.get("plan") if isinstance(snapshot, Mapping) else None
        runbook = plan.get("runbook_url") if isinstance(plan, Mapping) else None
        now = datetime.now(UTC)
        approval = ApprovalRecord(
            id=uuid4(),
            tenant_id=record.tenant_id,
            execution_id=record.id,
            step_id=step_id,
            level=record.approval_level,
            state=ApprovalState.PENDING,
            plan_hash=record.plan_hash,
            plan_snapshot_hash=record.plan_snapshot_hash,
            requested_by=record.actor_id,
            runbook_url=runbook if isinstance(runbook, str) else None,
            decided_by=None,
            auth_method=None,
            source_ip=None,
            decided_at=None,
            comment=None,
            created_at=now,
            expires_at=now + ttl,
        )
        self.approvals[approval.id] = approval
        return approval

    def close_approvals(self, execution_id: UUID) -> None:
        """Invalidate the open requests of an execution that ends without them."""
        for approval in list(self.approvals.values()):
            if approval.execution_id == execution_id and approval.is_pending:
                self.approvals[approval.id] = replace(approval, state=ApprovalState.INVALIDATED)

    def _release_execution_locks(self, execution_id: UUID) -> None:
        for key, held in list(self.locks.items()):
            if held.owner_execution_id == execution_id:
                del self.locks[key]

    def _locked_row(self, job: LeasedJob) -> FakeJob | None:
        """The job's row (``SELECT ... FOR UPDATE``), None once the reaper or an operator
        settled it."""
        return self.jobs.get(job.job_id)

    def _ack_in(self, job: LeasedJob, *, settled_only: bool) -> bool:
        row = self.jobs.get(job.job_id)
        deleted = row is not None and row.lease_token == job.lease_token
        if settled_only and not deleted:
            return False
        self._redis()  # raising here rolls the delete below back, as the real order does
        self._held(job.job_id, job.lease_token)
        if deleted:
            del self.jobs[job.job_id]
        del self.queue[job.job_id]
        return True

    async def ack(self, job: LeasedJob, *, settled_only: bool = False) -> bool:
        async with self._transaction():
            return self._ack_in(job, settled_only=settled_only)

    async def ack_ended(self, job: LeasedJob) -> bool:
        self._redis()
        try:
            self._held(job.job_id, job.lease_token)
        except StaleLeaseError:
            return False
        del self.queue[job.job_id]
        return True

    async def release_on_shutdown(self, job: LeasedJob) -> bool:
        async with self._transaction():
            row = self._locked_row(job)
            if row is None:
                return False
            self._release_entry(job, 0.0)
            if row.lease_token == job.lease_token and row.state == "leased":
                self.jobs[job.job_id] = replace(
                    row, state="ready", lease_token=None, lease_owner=None
                )
            return True

    async def pause_for_approval(
        self, job: LeasedJob, step_id: str, *, ttl: timedelta, by: str
    ) -> bool:
        async with self._transaction():
            if self._locked_row(job) is None:
                return False
            execution = self._fenced(job.execution_id, job.lease_token)
            if execution.cancelled_at is not None:
                # Cancelled meanwhile: it ends cancelled instead, its locks released.
                self._skip(job.execution_id)
                self._move(job.execution_id, ExecutionStatus.CANCELLED, by=by, payload=None)
                self._release_execution_locks(job.execution_id)
            else:
                record = self.records[job.execution_id]
                if self.open_approval(job.execution_id, step_id) is None:
                    self.new_approval(self._current(job.execution_id), step_id, ttl)
                self.records[job.execution_id] = replace(
                    record,
                    steps=tuple(
                        replace(s, status=StepStatus.AWAITING_APPROVAL)
                        if s.step_id == step_id
                        else s
                        for s in record.steps
                    ),
                )
                self._move(job.execution_id, ExecutionStatus.AWAITING_APPROVAL, by=by, payload=None)
                execution.events.append("step_approval_requested")
            execution.lease_token = None
            self._ack_in(job, settled_only=False)
            return True

    def _fail_entry(
        self, job: LeasedJob, error_class: str | None, error_message: str | None
    ) -> tuple[FakeQueueEntry, bool]:
        """Spend an attempt in Redis: (entry, dead). Backoff ``2^attempts`` s (cap 3600)."""
        self._redis()
        entry = self._held(job.job_id, job.lease_token)
        entry.lease_token, entry.worker_id, entry.lease_deadline = None, None, None
        entry.attempts += 1
        entry.last_error = {"message": (error_message or "")[:1000]}
        if error_class is not None:
            entry.last_error["error_class"] = error_class
        if entry.attempts >= entry.max_attempts:
            del self.queue[job.job_id]
            return entry, True
        entry.state = "delayed"
        entry.available_at = self.clock() + min(2.0**entry.attempts, 3600.0)
        return entry, False

    async def settle_retry(
        self, job: LeasedJob, *, error_class: str | None, error_message: str | None
    ) -> bool:
        async with self._transaction():
            row = self._locked_row(job)
            if row is None:
                return False
            entry, _dead = self._fail_entry(job, error_class, error_message)
            if row.lease_token == job.lease_token and row.state == "leased":
                self.jobs[job.job_id] = replace(
                    row,
                    state="delayed",
                    lease_token=None,
                    lease_owner=None,
                    attempts=entry.attempts,
                    available_at=datetime.fromtimestamp(entry.available_at or 0, UTC),
                    last_error=entry.last_error,
                )
                self.executions[job.execution_id].events.append("retry_scheduled")
            return True

    async def dead_letter(
        self,
        job: LeasedJob,
        *,
        error_class: str | None,
        error_message: str | None,
    ) -> bool:
        async with self._transaction():
            return self._dead_letter(job, error_class, error_message)

    def _dead_letter(
        self, job: LeasedJob, error_class: str | None, error_message: str | None
    ) -> bool:
        if self._locked_row(job) is None:
            return False  # the reaper or an operator already settled it
        entry, _dead = self._fail_entry(job, error_class, error_message)
        for job_id, row in list(self.jobs.items()):
            if row.execution_id == job.execution_id:
                del self.jobs[job_id]
        self.dlq[job.execution_id] = FakeDeadLetter(
            id=uuid4(),
            execution_id=job.execution_id,
            attempts=entry.attempts,
            error_class=error_class,
            error_message=error_message,
            last_error=entry.last_error,
            tenant_id=self.records[job.execution_id].tenant_id,
        )
        self.executions[job.execution_id].events.append("moved_to_dlq")
        return True


def _page(
    rows: list[Any], scope: str, page_size: int, page_token: str | None
) -> tuple[list[Any], str | None]:
    """One keyset page of ``rows`` (records with ``created_at`` and ``id``), newest first, as the
    storage's listings: size 0 is the default (50), capped at 200; the token bound to ``scope``."""
    if page_size < 0:
        raise invalid_page_request("page_size", "must not be negative")
    size = min(page_size or 50, 200)
    ordered = sorted(rows, key=lambda r: (r.created_at, r.id), reverse=True)
    if page_token:
        after = decode_page_token(page_token, scope)
        ordered = [r for r in ordered if (r.created_at, r.id) < after]
    page = ordered[:size]
    token = None
    if len(ordered) > size:
        token = encode_page_token(page[-1].created_at, page[-1].id, scope)
    return page, token


def _illegal(current: ExecutionStatus, to: ExecutionStatus) -> FSMError:
    """The compare-and-set's refusal: the execution is not where the move starts from."""
    return FSMError(
        f"Illegal state transition {current} -> {to}",
        from_status=current.value,
        to_status=to.value,
    )


if TYPE_CHECKING:  # mypy checks that the fake implements the whole port, signatures included
    _PORT: type[ExecutionLifecycle] = InMemoryLifecycle
