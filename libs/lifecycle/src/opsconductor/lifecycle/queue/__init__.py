"""The background queue: a Redis dispatch index mirrored by durable Postgres rows.

* :mod:`.redis_queue` — :class:`RedisQueue`: priorities 0/50/100 (FIFO within), atomic
  dequeue-with-lease in Lua, renew/ack/fail/release fenced by the lease token, ``2^attempts`` s
  retries, drain flag, stats, tenants served round-robin. Keys under ``{prefix}q:v2:``.
* :mod:`.jobs` — ``execution_queue`` rows, one per queued job (the row id is the job id).
* :mod:`.handoff` — the worker's lease handoff and claim of a batch in one statement, and the
  renewal mirror.
* :mod:`.dlq` — ``execution_dlq``: move, list, requeue.
* :mod:`.enqueue` — the one recipe that queues an execution (row, transition, Redis push).
* :mod:`.reconcile` — the reaper's repair of Redis from Postgres.
* :mod:`.lease` — lease duration and renewal timing from the timeout policy.

How callers combine the two sides (one Postgres transaction each; the Postgres statement first,
so it holds the row lock the reaper waits on, then the Redis call, then commit — a Redis failure
raises :class:`~opsconductor.common.errors.QueueUnavailableError` and rolls everything back)::

    # submit (api), approval release, DLQ requeue: the queue recipe of .enqueue
    async with transaction(pool) as conn:
        record, created = await create_execution(conn, new, dedup_window=...)
        queued = await enqueue_execution(conn, queue, record, policy, by="api",
                                         expected_from=ExecutionStatus.PENDING)
    await queue.announce()               # committed: wake an idle worker

    # worker: a batch of leases in one script, handed off (and claimed) in one statement
    batch = await queue.dequeue_batch(worker_id, INITIAL_LEASE_S, free_slots)
    for handed in await handoff.hand_off(pool, batch, worker_id=..., first_renewal=...):
        if handed.settled:               # ended, its holder died before the Redis ack
            await queue.ack(handed.job.job_id, handed.job.lease_token)
        elif not handed.leased:          # submit not committed yet: defer, do not run
            await queue.release(handed.job.job_id, handed.job.lease_token, delay_s=...)
        elif handed.record is None:      # a takeover, or nothing to run: the careful path
            jobs.lease_row(...); claim_execution(...)
    ...                                  # run, renewing with queue.renew (the first renewal's
                                         # mirror is the handoff's; later: record_renewal)
    # success (any end): the terminal transition by the lease holder deletes its queue row in
    # the same statement (committed), then Redis is acked
    await transition(pool, ..., to=SUCCEEDED, lease_token=job.lease_token)
    await queue.ack(job.job_id, job.lease_token)
    async with transaction(pool) as conn:  # failure: lock the row before Redis decides
        await jobs.get_queue_row(conn, job.job_id, for_update=True)
        outcome = await queue.fail(job.job_id, job.lease_token, message, error_class=...)
        if outcome.dead:
            await dlq.move_to_dlq(conn, job.execution_id, attempts=outcome.attempts, ...)
        else:
            await jobs.retry_row(conn, job.job_id, lease_token=job.lease_token, ...)
"""

from __future__ import annotations

from opsconductor.lifecycle.queue.lease import LeaseRenewalLimitError, lease_seconds, renew_after
from opsconductor.lifecycle.queue.records import (
    FailOutcome,
    LeasedJob,
    MaintenanceReport,
    QueuedJob,
    QueueStats,
)
from opsconductor.lifecycle.queue.redis_queue import (
    DEFAULT_PREFIX,
    KEY_VERSION,
    RedisQueue,
    create_redis_client,
)

__all__ = [
    "DEFAULT_PREFIX",
    "KEY_VERSION",
    "FailOutcome",
    "LeaseRenewalLimitError",
    "LeasedJob",
    "MaintenanceReport",
    "QueueStats",
    "QueuedJob",
    "RedisQueue",
    "create_redis_client",
    "lease_seconds",
    "renew_after",
]
