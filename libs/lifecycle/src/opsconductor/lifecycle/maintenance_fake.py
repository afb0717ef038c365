"""An in-memory :class:`~opsconductor.lifecycle.maintenance_port.MaintenanceLifecycle` for unit
tests, over an :class:`~opsconductor.lifecycle.fake.InMemoryLifecycle`: the reaper's pass on
that fake's executions, jobs (its Redis ``queue`` and its ``jobs`` rows), DLQ, locks and
approval requests.

It does what the storage and queue functions do: one pass at a time (a second
:meth:`~InMemoryMaintenance.exclusive` is refused while one is held); an expired lease spends an
attempt and is ready again, or dead on the last one (the fake's own housekeeping, on its
``clock``), and a dead job is dead-lettered with its execution failed (``LEASE_EXPIRED``);
``lease_expired`` is recorded only while the lease's worker still runs the execution; rows
missing from Redis are pushed again with the attempts they spent, Redis entries with no row
older than the grace are dropped; overdue running executions end failed and timed out; expired
approvals expire and the executions waiting for them end failed (``APPROVAL_EXPIRED``, key
retired); approved immediate executions not started within the grace and immediate ones no
worker took end failed (``DISPATCH_LOST``, key retired); expired locks and keys past the dedup
window go. Deadlines, expiries and the dedup window run on wall-clock time (Postgres's
``now()``), the queue on ``core.clock`` (Redis's). ``dispatch_paused`` is the flag,
``core``'s Redis keeps its own pause (``queue_paused``; a wiped Redis forgets it).
:meth:`~InMemoryMaintenance.publish_gauges` sets the queue's gauges from ``core``'s queue
(with the real code, :func:`~opsconductor.lifecycle.queue.gauges.set_queue_gauges`) and the DLQ
size from its open entries, and counts the calls (``gauges_published``). Not modelled: log
binding (:meth:`bound` binds nothing), the pending-approvals gauges and the stored counters.
Every behaviour here also runs against :class:`PostgresRedisMaintenance`
(``tests/integration/test_maintenance_port.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from opsconductor.common.errors import ApprovalExpiredError, QueueUnavailableError
from opsconductor.common.fsm import TERMINAL, ExecutionStatus
from opsconductor.lifecycle.approval_fake import InMemoryApprovals
from opsconductor.lifecycle.fake import FakeDeadLetter, FakeQueueEntry, InMemoryLifecycle
from opsconductor.lifecycle.maintenance_port import MaintenanceLifecycle
from opsconductor.lifecycle.queue.gauges import DLQ_SIZE, set_queue_gauges
from opsconductor.lifecycle.queue.reconcile import ReconcileReport
from opsconductor.lifecycle.queue.records import MaintenanceReport, QueuedJob
from opsconductor.lifecycle.storage.approval_records import ApprovalState

__all__ = ["InMemoryMaintenance"]

_S = ExecutionStatus


class InMemoryMaintenance:
    """The reaper's operations on ``core``'s dicts."""

    def __init__(self, core: InMemoryLifecycle) -> None:
        self.core = core
        #: The ``dispatch_paused`` flag (Postgres) and Redis's pause of dispatch.
        self.dispatch_paused = False
        self.queue_paused = False
        self.gauges_published = 0
        self._passing = False

    @property
    def queue_configured(self) -> bool:
        return self.core.queue_configured

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[bool]:
        if self._passing:
            yield False
            return
        self._passing = True
        try:
            yield True
        finally:
            self._passing = False

    def exclusive(self) -> contextlib.AbstractAsyncContextManager[bool]:
        return self._exclusive()

    async def bound(
        self, execution_id: UUID, **extra: Any
    ) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    # -- Redis ------------------------------------------------------------------------------

    @staticmethod
    def _snapshot(entry: FakeQueueEntry) -> QueuedJob:
        return QueuedJob(
            job_id=entry.job_id,
            execution_id=entry.execution_id,
            tenant_id=entry.tenant_id,
            priority=entry.priority,
            state=entry.state,
            attempts=entry.attempts,
            max_attempts=entry.max_attempts,
            lease_renewals=entry.lease_renewals,
            max_lease_renewals=entry.max_lease_renewals,
            lease_expirations=entry.lease_expirations,
            deliveries=entry.deliveries,
            enqueued_at=entry.enqueued_at,
            available_at=entry.available_at,
            worker_id=entry.worker_id,
            lease_deadline=entry.lease_deadline,
            last_error=entry.last_error,
            request_id=entry.request_id,
            trace_context=entry.trace_context,
        )

    async def reapply_drain(self) -> bool | None:
        self.core._redis()
        if self.queue_paused == self.dispatch_paused:
            return None
        self.queue_paused = self.dispatch_paused
        return self.dispatch_paused

    async def expired_leases(self) -> list[QueuedJob]:
        self.core._redis()
        now = self.core.clock()
        expired = [
            e
            for e in self.core.queue.values()
            if e.state == "leased" and (e.lease_deadline or 0) <= now
        ]
        return [self._snapshot(e) for e in sorted(expired, key=lambda e: e.lease_deadline or 0)]

    async def reconcile(self, *, orphan_grace_s: float) -> ReconcileReport:
        core = self.core
        core._redis()
        before = {job_id: entry.state for job_id, entry in core.queue.items()}
        core._housekeeping(core.clock())
        moved = [(before[job_id], entry.state) for job_id, entry in core.queue.items()]
        maintenance = MaintenanceReport(
            promoted=moved.count(("delayed", "ready")),
            reclaimed=moved.count(("leased", "ready")),
            dead=moved.count(("leased", "dead")),
        )
        repushed = 0
        for job_id, row in list(core.jobs.items()):
            if job_id in core.queue:
                continue
            # A lease Redis forgot is void: ready again (or still delayed), attempts kept.
            core._push(job_id, row)
            entry = core.queue[job_id]
            entry.attempts = min(row.attempts, row.max_attempts - 1)
            if row.state == "delayed" and row.available_at is not None:
                entry.state, entry.available_at = "delayed", row.available_at.timestamp()
            repushed += 1
        dropped = 0
        for job_id, entry in list(core.queue.items()):
            if job_id not in core.jobs and core.clock() - entry.enqueued_at >= orphan_grace_s:
                del core.queue[job_id]
                dropped += 1
        return ReconcileReport(maintenance, repushed, dropped)

    async def job(self, job_id: UUID) -> QueuedJob | None:
        self.core._redis()
        entry = self.core.queue.get(job_id)
        return None if entry is None else self._snapshot(entry)

    async def dead_jobs(self, *, limit: int) -> list[QueuedJob]:
        self.core._redis()
        dead = [self._snapshot(e) for e in self.core.queue.values() if e.state == "dead"]
        return dead[:limit]

    # -- Postgres (and the job's Redis entry) -----------------------------------------------

    async def record_lease_expired(
        self, execution_id: UUID, *, worker_id: str | None, lease_expirations: int
    ) -> bool:
        execution = self.core.executions.get(execution_id)
        if execution is None or execution.status is not _S.RUNNING:
            return False
        if execution.worker_id != worker_id:
            return False  # taken over meanwhile: its lease_taken_over says so
        execution.events.append("lease_expired")
        return True

    async def dead_letter_lost(
        self, job: QueuedJob, *, error_class: str, error_message: str
    ) -> None:
        core = self.core
        core._redis()
        rows = [job_id for job_id, row in core.jobs.items() if row.execution_id == job.execution_id]
        if rows and job.execution_id not in core.dlq:
            for job_id in rows:
                del core.jobs[job_id]
            core.dlq[job.execution_id] = FakeDeadLetter(
                id=job.job_id,
                execution_id=job.execution_id,
                attempts=job.attempts,
                error_class=error_class,
                error_message=error_message,
                last_error=job.last_error,
            )
            core.executions[job.execution_id].events.append("moved_to_dlq")
        await core.end_failed(
            job.execution_id,
            by="reaper",
            error_class=error_class,
            error_message=error_message,
            fail_running_steps=True,
            clear_lease=True,
            release_locks=True,
        )
        core.queue.pop(job.job_id, None)

    async def fail_overdue(self, *, grace: timedelta) -> list[UUID]:
        now = datetime.now(UTC)
        failed = []
        for eid, execution in list(self.core.executions.items()):
            deadline = execution.deadline_at
            if execution.status is not _S.RUNNING or deadline is None or deadline + grace >= now:
                continue
            if await self.core.end_failed(
                eid,
                by="reaper",
                error_class="EXECUTION_TIMEOUT",
                error_message="deadline passed while no worker was running it",
                expected_from=_S.RUNNING,
                fail_running_steps=True,
                clear_lease=True,
                release_locks=True,
            ):
                execution.timed_out = True
                failed.append(eid)
        return failed

    async def remove_job(self, execution_id: UUID) -> UUID | None:
        core = self.core
        found = next((j for j, row in core.jobs.items() if row.execution_id == execution_id), None)
        if found is None:
            return None
        if core.queue_configured:
            core._redis()  # down: the row stays (the real delete rolls back)
            core.queue.pop(found, None)
        del core.jobs[found]
        return found

    async def reap_expired_locks(self) -> int:
        now = datetime.now(UTC)
        expired = [key for key, lock in self.core.locks.items() if lock.expires_at < now]
        for key in expired:
            del self.core.locks[key]
        return len(expired)

    async def retire_keys(self, dedup_window: timedelta) -> int:
        cutoff = datetime.now(UTC) - dedup_window
        retired = 0
        for execution in self.core.executions.values():
            ended = execution.ended_at
            if (
                execution.status in TERMINAL
                and not execution.key_retired
                and ended
                and ended < cutoff
            ):
                execution.key_retired = True
                retired += 1
        return retired

    async def expire_approvals(self) -> int:
        now = datetime.now(UTC)
        approvals = InMemoryApprovals(self.core)
        expired = 0
        for approval in list(self.core.approvals.values()):
            if not approval.is_pending or approval.expires_at > now:
                continue
            closed = replace(approval, state=ApprovalState.EXPIRED)
            self.core.approvals[approval.id] = closed
            if self.core.executions[approval.execution_id].status is _S.AWAITING_APPROVAL:
                approvals._end_waiting(
                    closed,
                    to=_S.FAILED,
                    by="reaper",
                    reason="approval_expired",
                    error=ApprovalExpiredError(),
                )
            expired += 1
        return expired

    async def fail_undispatched(self, *, grace: timedelta) -> int:
        cutoff = datetime.now(UTC) - grace
        failed = 0
        for eid, execution in self.core.executions.items():
            record = self.core.records[eid]
            approval = self.core.approvals.get(record.approval_id) if record.approval_id else None
            if (
                execution.status is not _S.AWAITING_APPROVAL
                or record.execution_mode != "immediate"
                or approval is None
                or approval.state is not ApprovalState.APPROVED
                or approval.step_id is not None
                or approval.decided_at is None
                or approval.decided_at >= cutoff
            ):
                continue
            self.core._move(eid, _S.FAILED, by="reaper", payload={"approval_id": str(approval.id)})
            execution.error_class = "DISPATCH_LOST"
            execution.error_message = "approved, but no worker was asked to run it"
            execution.key_retired = True
            failed += 1
        return failed

    async def fail_unstarted(self, *, grace: timedelta) -> list[UUID]:
        cutoff = datetime.now(UTC) - grace
        failed = []
        for eid, execution in self.core.executions.items():
            record = self.core.records[eid]
            if (
                record.execution_mode != "immediate"
                or execution.status not in (_S.PENDING, _S.QUEUED)
                or execution.worker_id is not None
                or record.created_at >= cutoff
            ):
                continue
            self.core._skip(eid)
            self.core._move(eid, _S.FAILED, by="reaper", payload=None)
            execution.error_class = "DISPATCH_LOST"
            execution.error_message = (
                "no worker started this immediate execution: it was never handed over "
                "(the api stopped, or no worker answered); submit the plan again"
            )
            execution.key_retired = True
            failed.append(eid)
        return failed

    async def publish_gauges(self) -> None:
        self.gauges_published += 1
        DLQ_SIZE.set(len(self.core.dlq))
        if not self.core.queue_configured:
            return
        # As the real one: a queue that cannot be reached leaves its gauges as they were.
        with contextlib.suppress(QueueUnavailableError):
            set_queue_gauges(await self.core.queue_stats())


if TYPE_CHECKING:  # mypy checks that the fake implements the whole port, signatures included
    _PORT: type[MaintenanceLifecycle] = InMemoryMaintenance
