"""The reaper's pass: the backstop that leaves no job lost, stuck or locked forever.

Run every 60 s (Kubernetes CronJob, or the loop mode), on the lifecycle core's maintenance port
(:mod:`opsconductor.lifecycle.maintenance_port`: no storage or queue module here). Each pass,
under a Postgres advisory lock so concurrent reapers never double-act (a second one skips the
pass):

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

import structlog

from opsconductor.common.errors import QueueUnavailableError
from opsconductor.lifecycle.execution_metrics import counted_in_store
from opsconductor.lifecycle.maintenance_port import (
    REAPER_LOCK_KEY,
    MaintenanceLifecycle,
    QueuedJob,
)

__all__ = ["REAPER_LOCK_KEY", "UNDISPATCHED_GRACE", "UNSTARTED_GRACE", "ReaperReport", "reap_once"]

log = structlog.get_logger(__name__)

#: An approved immediate execution not started this long after its approval was lost.
UNDISPATCHED_GRACE = timedelta(minutes=5)
#: An immediate execution no worker took this long after its creation was never handed over.
UNSTARTED_GRACE = timedelta(seconds=30)


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
    stores: MaintenanceLifecycle,
    *,
    dedup_window: timedelta,
    deadline_grace: timedelta = timedelta(seconds=30),
    orphan_grace_s: float = 300.0,
    unstarted_grace: timedelta = UNSTARTED_GRACE,
) -> ReaperReport:
    """One pass (see the module docstring); skipped when another reaper holds the lock."""
    async with stores.exclusive() as held:
        if not held:
            log.info("reaper_skipped", reason="another reaper is running")
            return ReaperReport(skipped=True)
        # What it ends is counted in Postgres by the ending statements, not in this process.
        with counted_in_store():
            report = await _pass(
                stores, dedup_window, deadline_grace, orphan_grace_s, unstarted_grace
            )
    log.info("reaper_pass", **report.__dict__)
    return report


async def _pass(
    stores: MaintenanceLifecycle,
    dedup_window: timedelta,
    deadline_grace: timedelta,
    orphan_grace_s: float,
    unstarted_grace: timedelta,
) -> ReaperReport:
    reconciled = None
    dead = 0
    if stores.queue_configured:
        try:
            # First: jobs re-pushed below must not be dispatched during a drain.
            await _reapply_drain(stores)
            expiring = await stores.expired_leases()
            reconciled = await stores.reconcile(orphan_grace_s=orphan_grace_s)
            await _announce_expired_leases(stores, expiring)
            dead = await _dead_letter(stores)
        except QueueUnavailableError:
            # Redis is down (or restarting empty): the queue work waits for the next pass,
            # but what needs only Postgres (deadlines, locks, keys, approvals) must go on.
            log.warning("reaper_queue_unavailable")
    overdue = await stores.fail_overdue(grace=deadline_grace)
    for execution_id in overdue:
        with await stores.bound(execution_id):
            await _remove_job(stores, execution_id)
    locks = await stores.reap_expired_locks()
    keys = await stores.retire_keys(dedup_window)
    expired = await stores.expire_approvals()
    undispatched = await stores.fail_undispatched(grace=UNDISPATCHED_GRACE)
    unstarted = await stores.fail_unstarted(grace=unstarted_grace)
    await stores.publish_gauges()
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


async def _announce_expired_leases(stores: MaintenanceLifecycle, expiring: list[QueuedJob]) -> None:
    """A ``lease_expired`` event for each lease of ``expiring`` reclaimed since the snapshot
    (not one its holder renewed in time), so whoever follows the execution learns it now, not
    only when another worker takes it over or its deadline fails it."""
    for before in expiring:
        after = await stores.job(before.job_id)
        if after is None or after.lease_expirations <= before.lease_expirations:
            continue
        # Outside any request: the record carries the execution's fields only if bound here.
        with await stores.bound(before.execution_id, request_id=before.request_id):
            await stores.record_lease_expired(
                before.execution_id,
                worker_id=before.worker_id,
                lease_expirations=after.lease_expirations,
            )


async def _dead_letter(stores: MaintenanceLifecycle) -> int:
    """Jobs whose last lease expired: DLQ row first, execution failed, then out of Redis."""
    moved = 0
    for job in await stores.dead_jobs(limit=1000):
        message = "the job's last lease expired: its worker died or stalled on every attempt"
        with await stores.bound(job.execution_id, request_id=job.request_id):
            await stores.dead_letter_lost(job, error_class="LEASE_EXPIRED", error_message=message)
        moved += 1
    return moved


async def _remove_job(stores: MaintenanceLifecycle, execution_id: UUID) -> None:
    """An execution the reaper ended has nothing left to run: its job leaves both stores.

    Otherwise its expired lease would put it back in line, to be dequeued and dropped by some
    worker later, counted meanwhile as a ready job. If Redis fails the row stays and a worker
    drops the job when it dequeues it.
    """
    try:
        job_id = await stores.remove_job(execution_id)
    except QueueUnavailableError:
        log.warning("overdue_job_kept", execution_id=str(execution_id), reason="queue_unavailable")
        return
    if job_id is not None:
        log.info("overdue_job_removed", job_id=str(job_id), execution_id=str(execution_id))


async def _reapply_drain(stores: MaintenanceLifecycle) -> None:
    """A Redis restarted empty forgets the drain: the ``dispatch_paused`` flag is the truth."""
    paused = await stores.reapply_drain()
    if paused is not None:
        log.warning("dispatch_pause_reapplied", paused=paused)
