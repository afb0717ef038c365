"""The reaper's pass: the backstop that leaves no job lost, stuck or locked forever.

Run every 60 s (Kubernetes CronJob, or the loop mode). Each pass, under a Postgres advisory lock
so concurrent reapers never double-act (a second one skips the pass):

1. queue housekeeping — due retries become ready, expired leases are requeued (each counted as a
   lease expiration in Redis by the script that reclaims it: a worker died or stalled; the
   execution gets a ``lease_expired`` event unless another worker took it over meanwhile);
   (before anything is re-pushed, a drain the ``dispatch_paused`` flag asks for is re-applied:
   Redis restarted empty has forgotten it);
2. jobs whose last lease expired go to the DLQ and their executions end ``failed``;
3. running executions past their deadline (their worker died) end ``failed``, timed out, and
   their jobs leave both stores (nothing is left to run; a zombie holder is fenced off);
4. Redis is reconciled with ``execution_queue``: rows missing from Redis (Redis restarted
   empty) are pushed again, Redis entries whose row never appeared are dropped;
5. expired mutexes are deleted; idempotency keys past the dedup window are retired;
   approval requests past their expiry are expired and the executions waiting for them end
   ``failed`` (``APPROVAL_EXPIRED``; a paused level-3 execution's locks are released), and
   approved immediate executions no worker started within 5 minutes end ``failed``
   (``DISPATCH_LOST``: the approvals service died between the decision and the dispatch), and
   so do immediate executions still ``pending``/``queued`` without a worker ``unstarted_grace``
   after their creation (the api died between create and dispatch, or gave up on a paused
   worker): their keys are retired, so the plan can be submitted again;
6. gauges: ready jobs per priority, leased, delayed, DLQ size, oldest ready job's age (and the
   stored counters, :mod:`opsconductor.lifecycle.queue.gauges`).

It counts nothing in its own process: a CronJob's process is gone before Prometheus scrapes it.
What it does is counted in the stores (leases in Redis; reaped locks, the executions it ends and
its DLQ moves in ``metric_counters``, by the statements that do it) and exported by the api's
gauge refresh (the executions and DLQ moves as ``opsc_reaper_*``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from uuid import UUID

import asyncpg
import structlog

from opsconductor.common.errors import QueueUnavailableError
from opsconductor.lifecycle.execution_metrics import counted_in_store
from opsconductor.lifecycle.queue import dlq, jobs
from opsconductor.lifecycle.queue.gauges import publish_gauges
from opsconductor.lifecycle.queue.reconcile import reconcile_queue
from opsconductor.lifecycle.queue.records import QueuedJob
from opsconductor.lifecycle.queue.redis_queue import RedisQueue
from opsconductor.lifecycle.storage.advisory import try_advisory_lock
from opsconductor.lifecycle.storage.approvals import expire_pending, fail_undispatched
from opsconductor.lifecycle.storage.execution_leases import (
    fail_lost_execution,
    fail_overdue_executions,
    fail_unstarted_immediate,
    record_lease_expired,
)
from opsconductor.lifecycle.storage.execution_reads import bound_to_execution
from opsconductor.lifecycle.storage.execution_records import transaction
from opsconductor.lifecycle.storage.executions import retire_idempotency_keys
from opsconductor.lifecycle.storage.flags import load_flags
from opsconductor.lifecycle.storage.locks import reap_expired_locks

log = structlog.get_logger(__name__)

#: An approved immediate execution not started this long after its approval was lost.
UNDISPATCHED_GRACE = timedelta(minutes=5)
#: An immediate execution no worker took this long after its creation was never handed over.
UNSTARTED_GRACE = timedelta(seconds=30)
#: pg advisory lock key of the reaper ("opsc_rea").
REAPER_LOCK_KEY = 0x6F7073635F726561


@dataclass(frozen=True)
class ReaperReport:
    skipped: bool = False
    leases_requeued: int = 0
    retries_promoted: int = 0
    dead_lettered: int = 0
    deadlines_failed: int = 0
    repushed: int = 0
    dropped: int = 0
    locks_reaped: int = 0
    idempotency_retired: int = 0
    approvals_expired: int = 0
    approvals_undispatched: int = 0
    unstarted_failed: int = 0


async def reap_once(
    pool: asyncpg.Pool,
    queue: RedisQueue | None,
    *,
    dedup_window: timedelta,
    deadline_grace: timedelta = timedelta(seconds=30),
    orphan_grace_s: float = 300.0,
    unstarted_grace: timedelta = UNSTARTED_GRACE,
) -> ReaperReport:
    """One pass (see the module docstring); skipped when another reaper holds the lock."""
    async with try_advisory_lock(pool, REAPER_LOCK_KEY) as held:
        if not held:
            log.info("reaper_skipped", reason="another reaper is running")
            return ReaperReport(skipped=True)
        # What it ends is counted in Postgres by the ending statements, not in this process.
        with counted_in_store():
            report = await _pass(
                pool, queue, dedup_window, deadline_grace, orphan_grace_s, unstarted_grace
            )
    log.info("reaper_pass", **report.__dict__)
    return report


async def _pass(
    pool: asyncpg.Pool,
    queue: RedisQueue | None,
    dedup_window: timedelta,
    deadline_grace: timedelta,
    orphan_grace_s: float,
    unstarted_grace: timedelta,
) -> ReaperReport:
    reconciled = None
    dead = 0
    if queue is not None:
        try:
            # First: jobs re-pushed below must not be dispatched during a drain.
            await _reapply_drain(pool, queue)
            expiring = await queue.expired_leases()
            reconciled = await reconcile_queue(queue, pool, orphan_grace_s=orphan_grace_s)
            await _announce_expired_leases(pool, queue, expiring)
            dead = await _dead_letter(pool, queue)
        except QueueUnavailableError:
            # Redis is down (or restarting empty): the queue work waits for the next pass,
            # but what needs only Postgres (deadlines, locks, keys, approvals) must go on.
            log.warning("reaper_queue_unavailable")
    overdue = await fail_overdue_executions(pool, grace=deadline_grace)
    for execution_id in overdue:
        with await bound_to_execution(pool, execution_id):
            await _remove_job(pool, queue, execution_id)
    locks = await reap_expired_locks(pool)
    keys = await retire_idempotency_keys(pool, dedup_window)
    expired = await expire_pending(pool)
    undispatched = await fail_undispatched(pool, grace=UNDISPATCHED_GRACE)
    unstarted = await fail_unstarted_immediate(pool, grace=unstarted_grace)
    await publish_gauges(pool, queue)
    return ReaperReport(
        leases_requeued=reconciled.maintenance.reclaimed if reconciled else 0,
        retries_promoted=reconciled.maintenance.promoted if reconciled else 0,
        dead_lettered=dead,
        deadlines_failed=len(overdue),
        repushed=reconciled.repushed if reconciled else 0,
        dropped=reconciled.dropped if reconciled else 0,
        locks_reaped=locks,
        idempotency_retired=keys,
        approvals_expired=expired,
        approvals_undispatched=undispatched,
        unstarted_failed=len(unstarted),
    )


async def _announce_expired_leases(
    pool: asyncpg.Pool, queue: RedisQueue, expiring: list[QueuedJob]
) -> None:
    """A ``lease_expired`` event for each lease of ``expiring`` reclaimed since the snapshot
    (not one its holder renewed in time), so whoever follows the execution learns it now, not
    only when another worker takes it over or its deadline fails it."""
    for before in expiring:
        after = await queue.get(before.job_id)
        if after is None or after.lease_expirations <= before.lease_expirations:
            continue
        await record_lease_expired(
            pool,
            before.execution_id,
            worker_id=before.worker_id,
            lease_expirations=after.lease_expirations,
        )


async def _dead_letter(pool: asyncpg.Pool, queue: RedisQueue) -> int:
    """Jobs whose last lease expired: DLQ row first, execution failed, then out of Redis."""
    moved = 0
    for job in await queue.dead_jobs(limit=1000):
        message = "the job's last lease expired: its worker died or stalled on every attempt"
        with await bound_to_execution(pool, job.execution_id, request_id=job.request_id):
            await dlq.move_to_dlq(
                pool,
                job.execution_id,
                attempts=job.attempts,
                error_class="LEASE_EXPIRED",
                error_message=message,
                last_error=job.last_error,
            )
            await fail_lost_execution(
                pool,
                job.execution_id,
                error_class="LEASE_EXPIRED",
                error_message=message,
                by="reaper",
            )
            await queue.remove(job.job_id)
        moved += 1
    return moved


async def _remove_job(pool: asyncpg.Pool, queue: RedisQueue | None, execution_id: UUID) -> None:
    """An execution the reaper ended has nothing left to run: its job leaves both stores.

    Otherwise its expired lease would put it back in line, to be dequeued and dropped by some
    worker later, counted meanwhile as a ready job. Row first (locked), then Redis, then commit;
    if Redis fails the row stays and a worker drops the job when it dequeues it.
    """
    try:
        async with transaction(pool) as conn:
            row = await jobs.get_queue_row_for_execution(conn, execution_id)
            if row is None or not await jobs.delete_queue_row(conn, row.id):
                return
            if queue is not None:
                await queue.remove(row.id)
    except QueueUnavailableError:
        log.warning("overdue_job_kept", execution_id=str(execution_id), reason="queue_unavailable")
        return
    log.info("overdue_job_removed", job_id=str(row.id), execution_id=str(execution_id))


async def _reapply_drain(pool: asyncpg.Pool, queue: RedisQueue) -> None:
    """A Redis restarted empty forgets the drain: the ``dispatch_paused`` flag is the truth."""
    paused = (await load_flags(pool)).dispatch_paused
    if await queue.is_paused() != paused:
        await queue.set_paused(paused)
        log.warning("dispatch_pause_reapplied", paused=paused)
