"""Reconcile Redis with Postgres: the reaper's repair of the dispatch index (DESIGN.md §4).

:func:`reconcile_queue` does three things, each idempotent and safe to run next to workers and
another reaper (the caller still takes its advisory lock to avoid double work):

1. **Expired leases** and due retries: :meth:`RedisQueue.requeue_expired` (the backstop when no
   worker polls).
2. **Rows missing from Redis** (Redis restarted empty, or a commit outlived a Redis write): each
   row is locked and re-pushed with the attempts it already spent, in dispatch order. A row
   deleted meanwhile (the job finished) is skipped: the lock waits for that transaction.
3. **Redis entries with no row**: a submit pushes to Redis before it commits, so an entry may
   precede its row for a moment. Only entries older than ``orphan_grace_s`` whose row is still
   absent are dropped.

Jobs whose lease expired on the last attempt (``RedisQueue.dead_jobs``) are left to the caller,
which also fails the execution: move them with ``dlq.move_to_dlq`` and then ``RedisQueue.remove``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from uuid import UUID

import asyncpg
import structlog

from opsconductor.lifecycle.queue.jobs import (
    QueueRow,
    existing_job_ids,
    get_queue_row,
    queue_rows_missing,
)
from opsconductor.lifecycle.queue.records import MaintenanceReport
from opsconductor.lifecycle.queue.redis_queue import RedisQueue
from opsconductor.lifecycle.storage.execution_records import transaction

__all__ = ["ReconcileReport", "reconcile_queue"]

log = structlog.get_logger(__name__)

#: Longer than any submit transaction can stay open between its Redis push and its commit.
DEFAULT_ORPHAN_GRACE_S = 300.0


@dataclass(frozen=True)
class ReconcileReport:
    """What one reconcile pass changed."""

    maintenance: MaintenanceReport = field(default_factory=MaintenanceReport)
    repushed: int = 0
    dropped: int = 0


async def reconcile_queue(
    queue: RedisQueue,
    db: asyncpg.Pool,
    *,
    orphan_grace_s: float = DEFAULT_ORPHAN_GRACE_S,
    limit: int = 10_000,
) -> ReconcileReport:
    """One reconcile pass (see the module docstring); returns what it changed.

    At most ``limit`` missing rows are re-pushed per pass (the next pass takes the rest).
    """
    maintenance = await queue.requeue_expired()
    in_redis = await queue.all_job_ids()
    repushed = 0
    for row in await queue_rows_missing(db, in_redis, limit=limit):
        repushed += await _repush(queue, db, row)
    dropped = 0
    for job_id in in_redis - await existing_job_ids(db, in_redis):
        dropped += await _drop_orphan(queue, db, job_id, orphan_grace_s)
    if repushed or dropped:
        log.info("queue_reconciled", repushed=repushed, dropped=dropped)
    return ReconcileReport(maintenance, repushed, dropped)


async def _repush(queue: RedisQueue, db: asyncpg.Pool, row: QueueRow) -> int:
    async with transaction(db) as conn:
        locked = await get_queue_row(conn, row.id, for_update=True)
        if locked is None:
            return 0
        # A lease Redis forgot is void: the job is ready again (or still delayed), and keeps
        # the attempts it already spent. Pushed before commit, like a submit.
        created = await queue.enqueue(
            locked.id,
            locked.execution_id,
            locked.tenant_id,
            locked.priority,
            locked.max_attempts,
            row.max_lease_renewals or 0,
            locked.available_at if locked.state == "delayed" else None,
            attempts=min(locked.attempts, locked.max_attempts - 1),
            # The execution's correlation, as its submit queued it.
            request_id=row.request_id,
            trace_context=row.trace_context,
        )
    return int(created)


async def _drop_orphan(queue: RedisQueue, db: asyncpg.Pool, job_id: UUID, grace_s: float) -> int:
    job = await queue.get(job_id)
    if job is None or queue.now() - job.enqueued_at < grace_s:
        return 0
    # Checked again now: the row may have committed since the listing.
    if await get_queue_row(db, job_id) is not None:
        return 0
    return int(await queue.remove(job_id))
