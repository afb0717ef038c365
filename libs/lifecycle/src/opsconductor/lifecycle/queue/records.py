"""What the Redis queue hands back: leased jobs, queued-job snapshots, fail outcomes, stats.

All are frozen dataclasses built from the per-job Redis hash (see :mod:`.redis_queue` for its
fields). Times are epoch seconds (floats) of the queue's clock; ids are UUIDs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from uuid import UUID

from opsconductor.contract.metadata import is_acceptable_request_id

__all__ = [
    "TRACEPARENT_LENGTH",
    "FailOutcome",
    "LeasedJob",
    "MaintenanceReport",
    "QueueStats",
    "QueuedJob",
    "correlation_request_id",
    "correlation_traceparent",
    "decode_hash",
]

#: Length of a W3C ``traceparent`` of version 00, the only one the queue carries.
TRACEPARENT_LENGTH: Final = 55
# version 00, 32 hex trace id, 16 hex parent id, 2 hex flags (lower case, as W3C requires);
# all-zero ids are invalid (checked apart).
_TRACEPARENT: Final = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def decode_hash(pairs: Sequence[bytes | str] | Mapping[Any, Any]) -> dict[str, str]:
    """A Redis hash as ``{field: value}`` text, from HGETALL pairs or a mapping; bytes decoded."""
    if isinstance(pairs, Mapping):
        return {_text(k): _text(v) for k, v in pairs.items()}
    return {_text(pairs[i]): _text(pairs[i + 1]) for i in range(0, len(pairs), 2)}


def correlation_request_id(value: str | None) -> str | None:
    """``value`` when it is a request id the queue may carry (short plain token), else None.

    The correlation fields of a job come from Redis, which anybody with access could have
    written: a malformed or oversized value is dropped, never trusted nor raised on.
    """
    if value is None or not is_acceptable_request_id(value):
        return None
    return value


def correlation_traceparent(value: str | None) -> str | None:
    """``value`` when it is a valid W3C ``traceparent`` (version 00), else None."""
    if value is None or len(value) != TRACEPARENT_LENGTH:
        return None
    match = _TRACEPARENT.fullmatch(value)
    if match is None or set(match[1]) == {"0"} or set(match[2]) == {"0"}:
        return None
    return value


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
    request_id: str | None = None
    trace_context: str | None = None

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
            request_id=correlation_request_id(fields.get("request_id")),
            trace_context=correlation_traceparent(fields.get("traceparent")),
        )


@dataclass(frozen=True)
class LeasedJob:
    """A job leased to one worker until ``lease_deadline`` (epoch seconds).

    Only the holder of ``lease_token`` may renew, ack, fail or release it; the same token fences
    the worker's Postgres writes. ``attempts`` already spent (failures and expired leases) and
    ``lease_expirations`` tell a worker it is picking up after a crash. ``request_id`` and
    ``trace_context`` carry the queuing request's correlation across the queue (see
    :class:`QueuedJob`).
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
    request_id: str | None = None
    trace_context: str | None = None

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
            request_id=job.request_id,
            trace_context=job.trace_context,
        )


@dataclass(frozen=True)
class FailOutcome:
    """What :meth:`RedisQueue.fail` did: scheduled a retry at ``retry_at``, or gave up (``dead``).

    When ``dead`` the job is gone from Redis and the caller writes the DLQ row in Postgres
    (:func:`opsconductor.lifecycle.queue.dlq.move_to_dlq`) with ``attempts`` and ``last_error``.
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
    nothing is ready); ``paused`` tells whether dispatch is drained;
    ``lease_expirations_total`` counts every lease that ever expired (since Redis last started
    empty), whoever reclaimed it.
    """

    ready_by_priority: dict[int, int]
    leased: int
    expired_leases: int
    delayed: int
    dead: int
    oldest_ready_age_s: float | None
    paused: bool
    lease_expirations_total: int = 0

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
