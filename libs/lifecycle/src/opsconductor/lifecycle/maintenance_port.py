"""The reaper's operations as service logic sees them: a port beside :mod:`.facade`'s and
:mod:`.approval_port`'s, its Postgres + Redis adapter, and (:mod:`.maintenance_fake`) an
in-memory stand-in for unit tests.

The worker's reaper (``opsconductor.worker.logic.reaper``) holds a :class:`MaintenanceLifecycle`
instead of a pool and a queue: one pass at a time (:meth:`~MaintenanceLifecycle.exclusive`), the
drain re-applied after a Redis wipe, expired leases reclaimed (requeued, or dead on their last
attempt) and announced, dead jobs moved to the DLQ with their executions failed, Redis
reconciled with ``execution_queue``, overdue executions failed and their jobs removed, expired
locks reaped, idempotency keys retired, expired approvals expired (their executions failed),
lost dispatches failed, and the gauges published.

Each call delegates to the storage or queue function that does it (:mod:`.storage`,
:mod:`.queue`), statement for statement; :meth:`PostgresRedisMaintenance.remove_job` is the
reaper's former ``_remove_job`` (row locked, Redis, commit). Every behaviour of the fake is also
checked against this adapter on real Postgres + Redis (``tests/integration/
test_maintenance_port.py``, one test body for both).
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Any, Protocol
from uuid import UUID

import asyncpg

from opsconductor.common.errors import QueueUnavailableError
from opsconductor.lifecycle.queue import dlq, jobs
from opsconductor.lifecycle.queue.gauges import publish_gauges
from opsconductor.lifecycle.queue.reconcile import ReconcileReport, reconcile_queue
from opsconductor.lifecycle.queue.records import MaintenanceReport, QueuedJob
from opsconductor.lifecycle.queue.redis_queue import RedisQueue
from opsconductor.lifecycle.storage import approvals, execution_leases, executions, flags, locks
from opsconductor.lifecycle.storage.advisory import try_advisory_lock
from opsconductor.lifecycle.storage.execution_reads import bound_to_execution
from opsconductor.lifecycle.storage.execution_records import transaction

__all__ = [
    "REAPER_LOCK_KEY",
    "MaintenanceLifecycle",
    "MaintenanceReport",
    "PostgresRedisMaintenance",
    "QueuedJob",
    "ReconcileReport",
]

#: pg advisory lock key of the reaper ("opsc_rea").
REAPER_LOCK_KEY = 0x6F7073635F726561


class MaintenanceLifecycle(Protocol):
    """The reaper's operations on the queue and execution stores."""

    @property
    def queue_configured(self) -> bool:
        """Whether there is a Redis queue to maintain (without one, only Postgres work)."""
        ...

    def exclusive(self) -> contextlib.AbstractAsyncContextManager[bool]:
        """Whether this pass may run (held for the block); False while another one runs."""
        ...

    async def bound(
        self, execution_id: UUID, **extra: Any
    ) -> contextlib.AbstractContextManager[Any]:
        """The execution's fields bound to the log records of the block (as it is now)."""
        ...

    async def reapply_drain(self) -> bool | None:
        """Make Redis's dispatch pause agree with the ``dispatch_paused`` flag (a Redis
        restarted empty forgot it); the value set, None when it already agreed."""
        ...

    async def expired_leases(self) -> list[QueuedJob]:
        """A snapshot of the leased jobs whose lease passed (their holder may still renew)."""
        ...

    async def reconcile(self, *, orphan_grace_s: float) -> ReconcileReport:
        """Due retries made ready, expired leases reclaimed (an attempt spent: ready again, or
        dead on the last), rows missing from Redis pushed again with the attempts they spent,
        Redis entries older than ``orphan_grace_s`` with no row dropped."""
        ...

    async def job(self, job_id: UUID) -> QueuedJob | None:
        """The job as Redis holds it, None when it is not there."""
        ...

    async def record_lease_expired(
        self, execution_id: UUID, *, worker_id: str | None, lease_expirations: int
    ) -> bool:
        """A ``lease_expired`` event while ``worker_id`` still runs the execution."""
        ...

    async def dead_jobs(self, *, limit: int) -> list[QueuedJob]:
        """Jobs whose last lease expired, waiting to be dead-lettered."""
        ...

    async def dead_letter_lost(
        self, job: QueuedJob, *, error_class: str, error_message: str
    ) -> None:
        """A dead job: its DLQ row, its execution ended ``failed`` (lease cleared, locks
        released), then out of Redis."""
        ...

    async def fail_overdue(self, *, grace: timedelta) -> list[UUID]:
        """Running executions past their deadline by ``grace`` ended ``failed``, timed out."""
        ...

    async def remove_job(self, execution_id: UUID) -> UUID | None:
        """The job of an execution the reaper ended out of both stores (row first, then
        Redis); its id, None when it had none. ``QueueUnavailableError``: the row stays."""
        ...

    async def reap_expired_locks(self) -> int:
        """Expired locks deleted; how many."""
        ...

    async def retire_keys(self, dedup_window: timedelta) -> int:
        """Keys of executions that ended over ``dedup_window`` ago retired; how many."""
        ...

    async def expire_approvals(self) -> int:
        """Requests past their expiry expired; an execution waiting for one ends ``failed``
        (``APPROVAL_EXPIRED``: steps skipped, locks released, key retired). How many."""
        ...

    async def fail_undispatched(self, *, grace: timedelta) -> int:
        """Approved immediate executions no worker started ``grace`` after the decision ended
        ``failed`` (``DISPATCH_LOST``, key retired); how many."""
        ...

    async def fail_unstarted(self, *, grace: timedelta) -> list[UUID]:
        """Immediate executions still pending or queued with no worker ``grace`` after their
        creation ended ``failed`` (``DISPATCH_LOST``, key retired)."""
        ...

    async def publish_gauges(self) -> None:
        """Refresh the queue's and the stores' gauges."""
        ...


class PostgresRedisMaintenance:
    """:class:`MaintenanceLifecycle` on Postgres and (when configured) Redis."""

    def __init__(self, pool: asyncpg.Pool, queue: RedisQueue | None) -> None:
        self._pool = pool
        self._queue = queue

    @property
    def queue_configured(self) -> bool:
        return self._queue is not None

    def _redis(self) -> RedisQueue:
        if self._queue is None:
            raise QueueUnavailableError("no queue is configured for background execution")
        return self._queue

    def exclusive(self) -> contextlib.AbstractAsyncContextManager[bool]:
        return try_advisory_lock(self._pool, REAPER_LOCK_KEY)

    async def bound(
        self, execution_id: UUID, **extra: Any
    ) -> contextlib.AbstractContextManager[Any]:
        return await bound_to_execution(self._pool, execution_id, **extra)

    async def reapply_drain(self) -> bool | None:
        queue = self._redis()
        paused = (await flags.load_flags(self._pool)).dispatch_paused
        if await queue.is_paused() == paused:
            return None
        await queue.set_paused(paused)
        return paused

    async def expired_leases(self) -> list[QueuedJob]:
        return await self._redis().expired_leases()

    async def reconcile(self, *, orphan_grace_s: float) -> ReconcileReport:
        return await reconcile_queue(self._redis(), self._pool, orphan_grace_s=orphan_grace_s)

    async def job(self, job_id: UUID) -> QueuedJob | None:
        return await self._redis().get(job_id)

    async def record_lease_expired(
        self, execution_id: UUID, *, worker_id: str | None, lease_expirations: int
    ) -> bool:
        return await execution_leases.record_lease_expired(
            self._pool, execution_id, worker_id=worker_id, lease_expirations=lease_expirations
        )

    async def dead_jobs(self, *, limit: int) -> list[QueuedJob]:
        return await self._redis().dead_jobs(limit=limit)

    async def dead_letter_lost(
        self, job: QueuedJob, *, error_class: str, error_message: str
    ) -> None:
        queue = self._redis()
        await dlq.move_to_dlq(
            self._pool,
            job.execution_id,
            attempts=job.attempts,
            error_class=error_class,
            error_message=error_message,
            last_error=job.last_error,
        )
        await execution_leases.fail_lost_execution(
            self._pool,
            job.execution_id,
            error_class=error_class,
            error_message=error_message,
            by="reaper",
        )
        await queue.remove(job.job_id)

    async def fail_overdue(self, *, grace: timedelta) -> list[UUID]:
        return await execution_leases.fail_overdue_executions(self._pool, grace=grace)

    async def remove_job(self, execution_id: UUID) -> UUID | None:
        async with transaction(self._pool) as conn:
            row = await jobs.get_queue_row_for_execution(conn, execution_id)
            if row is None or not await jobs.delete_queue_row(conn, row.id):
                return None
            if self._queue is not None:
                await self._queue.remove(row.id)  # raising rolls the delete back
        return row.id

    async def reap_expired_locks(self) -> int:
        return await locks.reap_expired_locks(self._pool)

    async def retire_keys(self, dedup_window: timedelta) -> int:
        return await executions.retire_idempotency_keys(self._pool, dedup_window)

    async def expire_approvals(self) -> int:
        return await approvals.expire_pending(self._pool)

    async def fail_undispatched(self, *, grace: timedelta) -> int:
        return await approvals.fail_undispatched(self._pool, grace=grace)

    async def fail_unstarted(self, *, grace: timedelta) -> list[UUID]:
        return await execution_leases.fail_unstarted_immediate(self._pool, grace=grace)

    async def publish_gauges(self) -> None:
        await publish_gauges(self._pool, self._queue)
