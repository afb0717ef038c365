"""What the Redis queue hands back: leased jobs, queued-job snapshots, fail outcomes, stats.

All are frozen dataclasses built from the per-job Redis hash (see :mod:`.redis_queue` for its
fields). Times are epoch seconds (floats) of the queue's clock; ids are UUIDs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

__all__ = [
    "FailOutcome",
    "LeasedJob",
    "MaintenanceReport",
    "QueueStats",
    "QueuedJob",
    "decode_hash",
]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def decode_hash(pairs: Sequence[bytes | str] | Mapping[Any, Any]) -> dict[str, str]:
    """A Redis hash as ``{field: value}`` text, from HGETALL pairs or a mapping; bytes decoded."""
    if isinstance(pairs, Mapping):
        return {_text(k): _text(v) for k, v in pairs.items()}
    return {_text(pairs[i]): _text(pairs[i + 1]) for i in range(0, len(pairs), 2)}


def _ms_to_s(ms: str) -> float:
    # Lua hands numbers back as decimal strings, sometimes with a fraction; whole ms are kept.
    return int(float(ms)) / 1000


def _seconds(ms: str | None) -> float | None:
    return None if ms is None else _ms_to_s(ms)


def _last_error(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    value = json.loads(raw)
    return value if isinstance(value, dict) else {"message": str(value)}


@dataclass(frozen=True)
class QueuedJob:
    """A snapshot of one job in the Redis queue, whatever its state.

    ``state`` is ``ready``, ``leased``, ``delayed`` or ``dead`` (lease expired on the last attempt,
    waiting for the reaper to move it to the DLQ). ``attempts`` counts failures and lease
    expirations; a graceful release spends none. ``deliveries`` counts leases granted.
    """

    job_id: UUID
    execution_id: UUID
    tenant_id: str
    priority: int
    state: str
    attempts: int
    max_attempts: int
    lease_renewals: int
    max_lease_renewals: int
    lease_expirations: int
    deliveries: int
    enqueued_at: float
    available_at: float | None
    worker_id: str | None
    lease_deadline: float | None
    last_error: dict[str, Any] | None

    @classmethod
    def from_hash(cls, fields: Mapping[str, str]) -> QueuedJob:
        """Build from a decoded job hash."""
        return cls(
            job_id=UUID(fields["job_id"]),
            execution_id=UUID(fields["execution_id"]),
            tenant_id=fields["tenant_id"],
            priority=int(fields["priority"]),
            state=fields["state"],
            attempts=int(fields["attempts"]),
            max_attempts=int(fields["max_attempts"]),
            lease_renewals=int(fields["lease_renewals"]),
            max_lease_renewals=int(fields["max_lease_renewals"]),
            lease_expirations=int(fields["lease_expirations"]),
            deliveries=int(fields["deliveries"]),
            enqueued_at=_ms_to_s(fields["enqueued_at"]),
            available_at=_seconds(fields.get("available_at")),
            worker_id=fields.get("worker_id"),
            lease_deadline=_seconds(fields.get("lease_deadline")),
            last_error=_last_error(fields.get("last_error")),
        )


@dataclass(frozen=True)
class LeasedJob:
    """A job leased to one worker until ``lease_deadline`` (epoch seconds).

    Only the holder of ``lease_token`` may renew, ack, fail or release it; the same token fences
    the worker's Postgres writes. ``attempts`` already spent (failures and expired leases) and
    ``lease_expirations`` tell a worker it is picking up after a crash.
    """

    job_id: UUID
    execution_id: UUID
    tenant_id: str
    priority: int
    lease_token: UUID
    worker_id: str
    lease_deadline: float
    attempts: int
    max_attempts: int
    lease_renewals: int
    max_lease_renewals: int
    lease_expirations: int
    deliveries: int
    enqueued_at: float
    last_error: dict[str, Any] | None

    @property
    def renewals_left(self) -> int:
        """How many more times this lease may be renewed."""
        return max(self.max_lease_renewals - self.lease_renewals, 0)

    @classmethod
    def from_hash(cls, fields: Mapping[str, str]) -> LeasedJob:
        """Build from a decoded job hash in state ``leased``."""
        job = QueuedJob.from_hash(fields)
        return cls(
            job_id=job.job_id,
            execution_id=job.execution_id,
            tenant_id=job.tenant_id,
            priority=job.priority,
            lease_token=UUID(fields["lease_token"]),
            worker_id=fields["worker_id"],
            lease_deadline=_ms_to_s(fields["lease_deadline"]),
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            lease_renewals=job.lease_renewals,
            max_lease_renewals=job.max_lease_renewals,
            lease_expirations=job.lease_expirations,
            deliveries=job.deliveries,
            enqueued_at=job.enqueued_at,
            last_error=job.last_error,
        )


@dataclass(frozen=True)
class FailOutcome:
    """What :meth:`RedisQueue.fail` did: scheduled a retry at ``retry_at``, or gave up (``dead``).

    When ``dead`` the job is gone from Redis and the caller writes the DLQ row in Postgres
    (:func:`opsconductor.common.queue.dlq.move_to_dlq`) with ``attempts`` and ``last_error``.
    """

    job_id: UUID
    attempts: int
    max_attempts: int
    dead: bool
    retry_at: float | None
    last_error: dict[str, Any]


@dataclass(frozen=True)
class QueueStats:
    """Queue gauges: ready jobs per priority, leases (and how many have expired), delayed, dead.

    ``oldest_ready_age_s`` is the wait of the oldest job at the head of a priority (None when
    nothing is ready); ``paused`` tells whether dispatch is drained.
    """

    ready_by_priority: dict[int, int]
    leased: int
    expired_leases: int
    delayed: int
    dead: int
    oldest_ready_age_s: float | None
    paused: bool

    @property
    def ready(self) -> int:
        """Ready jobs of every priority."""
        return sum(self.ready_by_priority.values())


@dataclass(frozen=True)
class MaintenanceReport:
    """One housekeeping pass: retries made ready, expired leases requeued, jobs declared dead."""

    promoted: int = 0
    reclaimed: int = 0
    dead: int = 0

    def __add__(self, other: MaintenanceReport) -> MaintenanceReport:
        return MaintenanceReport(
            self.promoted + other.promoted,
            self.reclaimed + other.reclaimed,
            self.dead + other.dead,
        )
