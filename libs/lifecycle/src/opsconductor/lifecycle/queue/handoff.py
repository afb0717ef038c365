"""The worker's Postgres side of a lease, in as few round trips as the guarantees allow.

:func:`hand_off` is the lease handoff *and* the claim of any number of leased jobs in ONE
statement (no ``BEGIN``/``COMMIT``: a statement is atomic on its own): each job's queue row is
set ``leased`` with its Redis lease (what :func:`.jobs.lease_row` does) and, when its execution is
``pending`` or ``queued``, the execution goes ``running`` under a compare-and-set with the job's
lease token as fencing token, its attempt counted and its deadline set from its timeout policy
(600 s without one, as on the careful path), the ``execution_running`` event appended (the audit
hash is the ``BEFORE INSERT`` trigger's, the ``NOTIFY`` is delivered at commit) and the execution
comes back with its steps.

With a :class:`FirstRenewal` (the worker renews each lease at once, from the dequeue's short
lease to its policy's), the statement writes that renewed lease and counts the renewal on the
queue row and the execution, so the renewal itself touches only Redis. It is counted before
Redis grants it: should the lease be lost in between, the row is the new holder's to rewrite.

What the one statement does not claim is reported as such and left to the careful path
(:func:`.jobs.lease_row`, then ``execution_leases.claim_execution``): a job whose row is not
visible (its submit has not committed: defer it), and an execution that is running already (a
takeover: steps reset, ``lease_taken_over``), terminal or waiting for an approval (nothing to
run). A job with no row whose execution is terminal is reported ``settled``: its final
transition deleted the row and its holder died before acking Redis (``storage.executions``);
the worker only acks it. A concurrent writer of the execution (a cancel) holds its row lock;
the ``UPDATE`` then waits and re-checks the status on the newest row version, so a cancelled
execution is never claimed.

:func:`record_renewal` mirrors a Redis lease renewal in one statement: the queue row's deadline
and renewal count, and the execution's ``lease_renewals``, both fenced on the lease token.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import structlog

from opsconductor.common.fsm import TERMINAL, ExecutionStatus, allowed_sources
from opsconductor.lifecycle.execution_logging import bind_execution
from opsconductor.lifecycle.queue.records import LeasedJob
from opsconductor.lifecycle.storage.events import EVENTS_CHANNEL
from opsconductor.lifecycle.storage.execution_records import (
    ExecutionRecord,
    PoolOrConnection,
    StepRecord,
    connection,
    execution_from_row,
    step_from_row,
)
from opsconductor.lifecycle.storage.queries import query

__all__ = ["FirstRenewal", "Handoff", "hand_off", "record_renewal"]

log = structlog.get_logger(__name__)

#: Statuses the one-statement claim moves to running (a running one is a takeover: careful path).
_CLAIMABLE = sorted(
    s.value
    for s in allowed_sources(ExecutionStatus.RUNNING)
    - {ExecutionStatus.RUNNING, ExecutionStatus.AWAITING_APPROVAL}
)
_TERMINAL = sorted(s.value for s in TERMINAL)
_HAND_OFF = query("hand_off")

_RENEW = query("record_renewal")

_STEP_TIMES = ("created_at", "started_at", "ended_at")


@dataclass(frozen=True)
class FirstRenewal:
    """The worker renews each claimed job's lease at once, to its policy's lease: the handoff
    writes that lease and counts that renewal itself, so the renewal needs no mirror of its own.

    The lease is :func:`.lease.lease_seconds` of the execution's timeout policy, ``override_s``
    instead when set (drills), ``default_s`` for an execution without a policy.
    """

    override_s: float | None
    default_s: float


@dataclass(frozen=True)
class Handoff:
    """What :func:`hand_off` did for one job."""

    job: LeasedJob
    #: The queue row was there and is now leased to this job's token (False: not visible yet).
    leased: bool
    #: The execution, claimed (running, fenced by the job's token) with its steps; None when the
    #: one statement did not claim it (see the module docstring: the careful path decides).
    record: ExecutionRecord | None = None
    #: No row and the execution has ended (a settled job its holder did not ack in Redis):
    #: nothing to run, the Redis entry is only to be acked.
    settled: bool = False
    #: Claimed with a :class:`FirstRenewal`: the lease (seconds) the worker's renewal must set,
    #: already written (with the renewal counted) on the queue row and the execution. None: no
    #: such renewal is due (none asked for, none left), or not claimed here.
    lease_s: float | None = None


def _step(value: Mapping[str, Any]) -> StepRecord:
    """A step from its ``jsonb`` rendering (times as ISO 8601 text, ids as text)."""
    row = dict(value)
    for name in _STEP_TIMES:
        if row.get(name) is not None:
            row[name] = datetime.fromisoformat(row[name])
    row["execution_id"] = UUID(row["execution_id"])
    return step_from_row(row)


async def hand_off(
    db: PoolOrConnection,
    leased: Sequence[LeasedJob],
    *,
    worker_id: str,
    first_renewal: FirstRenewal | None = None,
) -> list[Handoff]:
    """Mirror the Redis leases of ``leased`` and claim what can be claimed, in one statement.

    With ``first_renewal``, a job whose lease Redis will renew (it has renewals left) gets the
    renewed lease and count written here (:attr:`Handoff.lease_s`). Returns one
    :class:`Handoff` per job, in the order given.
    """
    if not leased:
        return []
    renews = [
        # The worker renews at once a lease not renewed yet; Redis grants it if any are left.
        first_renewal is not None and job.lease_renewals == 0 < job.max_lease_renewals
        for job in leased
    ]
    async with connection(db) as conn:
        rows = await conn.fetch(
            _HAND_OFF,
            [job.job_id for job in leased],
            [job.lease_token for job in leased],
            [datetime.fromtimestamp(job.lease_deadline, UTC) for job in leased],
            [job.attempts for job in leased],
            worker_id,
            _CLAIMABLE,
            EVENTS_CHANNEL,
            [job.execution_id for job in leased],
            renews,
            first_renewal.override_s if first_renewal else None,
            first_renewal.default_s if first_renewal else None,
            _TERMINAL,
        )
    by_job = {row["job_id"]: row for row in rows}
    out: list[Handoff] = []
    for job in leased:
        row = by_job[job.job_id]
        if not row["leased"]:
            out.append(Handoff(job, leased=False, settled=row["settled"]))
            continue
        if row["id"] is None:
            out.append(Handoff(job, leased=True))
            continue
        steps = tuple(_step(step) for step in row["step_rows"] or ())
        record = execution_from_row(row, steps)
        # Its §7.2 fields, as the worker binds them for the run (the job's request id).
        with bind_execution(
            record,
            request_id=job.request_id,
            worker_id=worker_id,
            queue_wait_ms=int(max(time.time() - job.enqueued_at, 0.0) * 1000),
        ):
            log.info(
                "execution_transitioned",
                execution_id=str(record.id),
                from_status=row["last_transition_from"],
                to_status=ExecutionStatus.RUNNING.value,
                by=worker_id,
            )
        out.append(Handoff(job, leased=True, record=record, lease_s=row["lease_s"]))
    return out


async def record_renewal(
    db: PoolOrConnection,
    job_id: UUID,
    execution_id: UUID,
    *,
    lease_token: UUID,
    lease_expires_at: datetime,
    lease_renewals: int,
) -> bool:
    """Mirror one Redis renewal (queue row deadline and count, execution ``lease_renewals``),
    fenced on ``lease_token``; False when the token no longer holds the queue row."""
    async with connection(db) as conn:
        row = await conn.fetchrow(
            _RENEW, job_id, lease_token, lease_expires_at, lease_renewals, execution_id
        )
    return bool(row["queue_rows"])
