"""The Postgres side of the queue: ``execution_queue``, the durable mirror of every queued job.

Postgres is the truth, Redis the dispatch index (DESIGN.md §3-§4). Each Redis transition has a
mirror here, so the reaper can rebuild Redis from these rows after Redis lost them:

==================  ===============================  ========================================
Redis               mirror                           when
==================  ===============================  ========================================
enqueue             :func:`insert_queue_row`         submit, in the execution's transaction
dequeue             ``handoff.hand_off``             the worker, before touching the job (a
                    (:func:`lease_row`)              batch in one statement; the careful path)
renew               ``handoff.record_renewal``       each renewal (with the execution's count;
                                                     the first one: ``hand_off`` itself)
fail (retry)        :func:`retry_row`                a failed attempt with attempts left
release             :func:`release_row`              graceful shutdown, deferral
ack                 ``executions.transition``        the lease holder's terminal transition
                    (terminal, ``lease_token``)      (and ``finish_last_step``), BEFORE Redis
ack / remove        :func:`delete_queue_row`         nothing to run, cancel of a queued job
fail (dead)         ``dlq.move_to_dlq``              no attempt left
==================  ===============================  ========================================

Ordering rule: run the Redis call *inside* the Postgres transaction, before commit, so that a
Redis failure rolls the Postgres side back (a submit then leaves nothing behind). The converse
window (Redis done, commit failed) is what the reaper's reconcile repairs. The one exception is
the ack of a finished job: its row goes with the final transition's commit and Redis is acked
after it, so a job can never be re-pushed once it ended; a Redis entry that outlives its row
(the worker died in between) is found settled by the next handoff and only acked.

Writes a worker makes for a leased job are fenced on its lease token: they match no row once the
lease was taken over, and return False. :func:`lease_row` is the handoff: it also installs the
new token on the execution (its ``worker_id`` is the claim's to set), so from its commit on
every write fenced on the previous holder's token (``executions.transition(lease_token=...)``)
fails with :class:`~opsconductor.common.errors.StaleLeaseError`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from opsconductor.lifecycle.storage.events import EVENTS_CHANNEL
from opsconductor.lifecycle.storage.execution_records import PoolOrConnection, connection
from opsconductor.lifecycle.storage.queries import query

__all__ = [
    "QueueRow",
    "delete_queue_row",
    "existing_job_ids",
    "get_queue_row",
    "get_queue_row_for_execution",
    "insert_queue_row",
    "lease_row",
    "list_queue_rows",
    "queue_row_from_record",
    "queue_rows_missing",
    "release_row",
    "renew_row",
    "retry_row",
]

_INSERT = query("insert_queue_row")
_SELECT_BY_ID = query("get_queue_row")
_SELECT_BY_ID_FOR_UPDATE = query("lock_queue_row")
_SELECT_BY_EXECUTION = query("queue_row_of_execution")
_LEASE = query("lease_queue_row")
_RENEW = query("renew_queue_row")
_RETRY = query("retry_queue_row")
_RELEASE = query("release_queue_row")
_DELETE = query("delete_queue_row")
_DELETE_FENCED = query("delete_queue_row_fenced")
_LIST = query("queue_rows_missing")
_EXISTING = query("existing_queue_rows")


@dataclass(frozen=True)
class QueueRow:
    """One row of ``execution_queue``; ``id`` is the job id Redis knows the job by."""

    id: UUID
    execution_id: UUID
    tenant_id: str
    priority: int
    state: str
    attempts: int
    max_attempts: int
    available_at: datetime
    lease_owner: str | None
    lease_token: UUID | None
    lease_expires_at: datetime | None
    lease_renewals: int
    enqueued_at: datetime
    updated_at: datetime
    last_error: Any
    #: The renewal limit of the execution's timeout policy; only listings fill it in.
    max_lease_renewals: int | None = None
    #: The execution's request id and W3C traceparent; only listings fill them in.
    request_id: str | None = None
    trace_context: str | None = None


def queue_row_from_record(row: Mapping[str, Any]) -> QueueRow:
    """Build a :class:`QueueRow` from an ``execution_queue`` row (``SELECT *``)."""
    values: dict[str, Any] = {name: row.get(name) for name in QueueRow.__dataclass_fields__}
    return QueueRow(**values)


def _affected(status: str) -> bool:
    return int(status.split()[-1]) > 0


async def insert_queue_row(
    db: PoolOrConnection,
    *,
    execution_id: UUID,
    tenant_id: str,
    priority: int,
    max_attempts: int,
    available_at: datetime | None = None,
) -> QueueRow:
    """Create the queue row of an execution, or return the one it already has (idempotent).

    ``available_at`` in the future makes the row ``delayed``. One row per execution
    (``ux_queue_execution``); run it in the submit's transaction, then push to Redis, then commit.
    """
    async with connection(db) as conn:
        row = await conn.fetchrow(
            _INSERT, execution_id, tenant_id, priority, max_attempts, available_at
        )
        if row is None:
            row = await conn.fetchrow(_SELECT_BY_EXECUTION, execution_id)
    return queue_row_from_record(row)


async def get_queue_row(
    db: PoolOrConnection, job_id: UUID, *, for_update: bool = False
) -> QueueRow | None:
    """The queue row of a job, or None; ``for_update`` locks it for the caller's transaction."""
    async with connection(db) as conn:
        row = await conn.fetchrow(_SELECT_BY_ID_FOR_UPDATE if for_update else _SELECT_BY_ID, job_id)
    return None if row is None else queue_row_from_record(row)


async def get_queue_row_for_execution(db: PoolOrConnection, execution_id: UUID) -> QueueRow | None:
    """The queue row of an execution (to cancel it: its ``id`` is the Redis job id), or None."""
    async with connection(db) as conn:
        row = await conn.fetchrow(_SELECT_BY_EXECUTION, execution_id)
    return None if row is None else queue_row_from_record(row)


async def lease_row(
    db: PoolOrConnection,
    job_id: UUID,
    *,
    worker_id: str,
    lease_token: UUID,
    lease_expires_at: datetime,
    attempts: int,
) -> QueueRow | None:
    """Mirror a dequeue and hand the execution's fencing token to the new holder.

    Sets the row ``leased`` (``attempts`` as Redis counts them, renewals reset) and the
    execution's ``lease_token`` in one statement — not its ``worker_id``: the claim sets that,
    naming the one it replaces as the previous holder of a taken-over execution. Returns None
    when the row is not visible: its submit has not committed yet (or never will), so the
    worker must not run the job but defer it (``RedisQueue.release(..., delay_s=...)``); only
    the reaper drops entries whose row never appears.
    """
    async with connection(db) as conn:
        row = await conn.fetchrow(
            _LEASE, job_id, worker_id, lease_token, lease_expires_at, attempts
        )
    return None if row is None else queue_row_from_record(row)


async def renew_row(
    db: PoolOrConnection,
    job_id: UUID,
    *,
    lease_token: UUID,
    lease_expires_at: datetime,
    lease_renewals: int,
) -> bool:
    """Mirror a renewal; False when ``lease_token`` no longer holds the row."""
    async with connection(db) as conn:
        status = await conn.execute(_RENEW, job_id, lease_token, lease_expires_at, lease_renewals)
    return _affected(status)


async def retry_row(
    db: PoolOrConnection,
    job_id: UUID,
    *,
    lease_token: UUID,
    attempts: int,
    available_at: datetime,
    last_error: Mapping[str, Any] | None,
) -> bool:
    """Mirror a failed attempt with a retry at ``available_at``; False on a lost lease.

    Appends ``retry_scheduled`` (attempt, when) to the execution's events in the same
    statement.
    """
    error = None if last_error is None else dict(last_error)
    async with connection(db) as conn:
        row = await conn.fetchrow(
            _RETRY,
            job_id,
            lease_token,
            attempts,
            available_at,
            error,
            available_at.isoformat(),
            EVENTS_CHANNEL,
        )
    return row is not None


async def release_row(
    db: PoolOrConnection,
    job_id: UUID,
    *,
    lease_token: UUID,
    available_at: datetime | None = None,
) -> bool:
    """Mirror a release (no attempt spent): ready now, or delayed until ``available_at``.

    False when ``lease_token`` no longer holds the row.
    """
    async with connection(db) as conn:
        status = await conn.execute(_RELEASE, job_id, lease_token, available_at)
    return _affected(status)


async def delete_queue_row(
    db: PoolOrConnection, job_id: UUID, *, lease_token: UUID | None = None
) -> bool:
    """Delete a job's row: fenced on ``lease_token`` (ack) or not (cancel of a queued job).

    Returns whether a row was deleted.
    """
    async with connection(db) as conn:
        if lease_token is None:
            status = await conn.execute(_DELETE, job_id)
        else:
            status = await conn.execute(_DELETE_FENCED, job_id, lease_token)
    return _affected(status)


async def list_queue_rows(db: PoolOrConnection, *, limit: int = 10_000) -> list[QueueRow]:
    """Queue rows in dispatch order (priority, then enqueue time), at most ``limit``."""
    return await queue_rows_missing(db, (), limit=limit)


async def queue_rows_missing(
    db: PoolOrConnection, present: Collection[UUID], *, limit: int = 10_000
) -> list[QueueRow]:
    """Queue rows whose job id is not in ``present`` (the ids Redis holds), in dispatch order.

    Each carries its policy's ``max_lease_renewals`` (None without a policy). The reaper
    re-pushes these in the order returned, so FIFO within a priority survives a Redis restart.
    """
    async with connection(db) as conn:
        rows = await conn.fetch(_LIST, list(present), limit)
    return [queue_row_from_record(row) for row in rows]


async def existing_job_ids(db: PoolOrConnection, job_ids: Collection[UUID]) -> set[UUID]:
    """Which of ``job_ids`` have a queue row (the rest are Redis entries with no row)."""
    async with connection(db) as conn:
        rows = await conn.fetch(_EXISTING, list(job_ids))
    return {row["id"] for row in rows}
