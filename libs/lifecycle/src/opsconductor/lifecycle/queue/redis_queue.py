"""The Redis side of the background queue: fair share, priorities, leases with fencing tokens.

Redis is a dispatch index; Postgres (``execution_queue``, :mod:`.jobs`) is the truth and the
reaper rebuilds Redis from it (:mod:`.reconcile`). Every state change is one Lua script, so no
client ever checks-then-acts. Keys, all under ``{prefix}q:v2:`` (``prefix`` defaults to
``opsc:``; the ``v2`` changes with any incompatible layout change):

==================  =====  =======================================================================
key                 type   content
==================  =====  =======================================================================
``ready``           zset   every ready job, all tenants: job id → ``priority × 10^13 + seq``
                           (``seq`` from ``INCR seq`` at enqueue) — stats and the index
``tready:{tenant}`` zset   the tenant's ready jobs, same scores: its own line, priority then FIFO
``ring``            list   tenants, each once, served round-robin: every tenant with ready jobs
                           (and one whose line just emptied, until its next turn)
``running``         hash   tenant → how many of its jobs are leased now
``leased``          zset   job id → lease deadline (ms)
``delayed``         zset   job id → time it becomes ready (ms): retries in backoff, deferrals
``dead``            zset   job id → when its last allowed lease expired (the reaper DLQs it)
``seq``             str    the FIFO counter
``paused``          str    present = dispatch drained: :meth:`RedisQueue.dequeue` returns None
``job:{job_id}``    hash   ``job_id execution_id tenant_id priority score state attempts
                           max_attempts lease_renewals max_lease_renewals lease_expirations
                           deliveries enqueued_at ready_at available_at lease_token worker_id
                           lease_deadline leased_at last_error request_id traceparent``
                           (times in ms; the last two only when the job was queued with them)
==================  =====  =======================================================================

Semantics (DESIGN.md §4, spec §5, docs/security.md "Fair share and quotas"):

* :meth:`~RedisQueue.dequeue` first makes due retries ready and reclaims expired leases, then
  leases a job with a fresh random token: the tenants of the ring take turns (the head is served
  and moves to the tail), each tenant's line is priority 0 before 50 before 100, FIFO within; a
  tenant already holding its running limit of leases is passed over (its jobs wait, nobody
  else's do). A tenant that was not in the ring joins it at the head — it has not been served
  for a whole round, so it goes next (fq_codel's "new flows"); one whose line empties keeps its
  place until its next turn, so emptying and refilling at once wins no extra turn. Priority
  orders a tenant's own jobs only: a flood of one tenant's urgent jobs delays another tenant's
  job by the jobs already running, not by the flood. A leased job is invisible to every other
  worker until its lease ends.
* A lease ends by ack (done), fail (an attempt spent: retry after ``2^attempts`` s, or dead after
  ``max_attempts``), release (graceful shutdown or deferral: no attempt spent) or expiry (the
  holder is presumed dead: an attempt is spent; the job is ready again, or dead when none is
  left). The token is the only proof of ownership: once a lease ended, the old token matches
  nothing and every call with it raises :class:`StaleLeaseError`. A lease past its deadline that
  nobody has reclaimed yet still belongs to its holder. Every end of a lease gives its tenant's
  running slot back, so a killed worker's slot returns with the expiry of its lease.
* Time comes from the injected ``clock`` (epoch seconds), passed to every script as "now", so
  every worker and the reaper judge deadlines by the caller's clock and tests can move time.
* Any Redis failure raises :class:`QueueUnavailableError` (``from`` the driver error).

Upgrade from the ``v1`` layout (one global ``ready`` line, no tenants): nothing is migrated in
Redis. The new code never reads ``q:v1:`` keys; the reaper's first pass finds every
``execution_queue`` row missing from ``q:v2:`` and re-pushes it with the attempts it spent, the
same path as a Redis restarted empty (:mod:`.reconcile`). A job an old worker still holds is
fenced by the Postgres lease token if a new worker takes it over. The ``q:v1:`` keys are left
for the operator to delete (docs/architecture.md).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from functools import cache
from importlib import resources
from typing import Any, Final
from uuid import UUID

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from opsconductor.common.errors import QueueUnavailableError, StaleLeaseError
from opsconductor.lifecycle.queue.lease import LeaseRenewalLimitError
from opsconductor.lifecycle.queue.records import (
    FailOutcome,
    LeasedJob,
    MaintenanceReport,
    QueuedJob,
    QueueStats,
    correlation_request_id,
    correlation_traceparent,
    decode_hash,
)
from opsconductor.lifecycle.queue.wakeups import Wakeups

__all__ = ["DEFAULT_PREFIX", "KEY_VERSION", "RedisQueue", "create_redis_client", "open_queue"]

log = structlog.get_logger(__name__)

DEFAULT_PREFIX: Final = "opsc:"
KEY_VERSION: Final = "v2"
MIN_PRIORITY: Final = 0
MAX_PRIORITY: Final = 100
_MAX_ERROR_CHARS: Final = 2000
_SCRIPT_KEYS: Final = ("ready", "leased", "delayed", "dead", "seq", "paused", "ring", "running")
_SCRIPTS: Final = (
    "enqueue",
    "dequeue",
    "renew",
    "ack",
    "fail",
    "release",
    "remove",
    "maintain",
    "stats",
    "job_ids",
)


@cache
def _script_source(name: str) -> str:
    lua = resources.files("opsconductor.lifecycle.queue") / "lua"
    return (lua / "prelude.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


def create_redis_client(
    url: str, *, socket_timeout: float = 5.0, retries: int = 2, max_connections: int | None = None
) -> Redis:
    """A ``redis.asyncio`` client suited to the queue: bounded timeouts and few quick retries.

    redis-py's default (10 retries with backoff) would hold a submit for seconds before it can
    answer ``QUEUE_UNAVAILABLE``; responses are left as bytes (the queue decodes them).
    """
    return Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), retries),
        max_connections=max_connections,
        health_check_interval=30,
    )


def _as_uuid(value: UUID | str) -> UUID:
    return value if isinstance(value, UUID) else UUID(str(value))


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _priority(value: int) -> int:
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise ValueError(f"priority must be in [{MIN_PRIORITY}, {MAX_PRIORITY}], got {value}")
    return int(value)


def _positive_ms(name: str, seconds: float) -> int:
    ms = _ms(seconds)
    if ms <= 0:
        raise ValueError(f"{name} must be at least 1 ms, got {seconds!r} s")
    return ms


class RedisQueue:
    """The priority queue with leases; see the module docstring for keys and semantics.

    ``redis`` is any ``redis.asyncio.Redis`` (bytes or decoded responses); ``clock`` returns epoch
    seconds; ``maintenance_batch`` bounds how many due retries and expired leases one script run
    moves (keeps every script short); ``max_backoff_s`` caps the ``2^attempts`` s retry delay.
    ``running_limit`` is how many leases one tenant may hold at once (0: no limit) and
    ``running_limits`` overrides it per tenant; only :meth:`dequeue` applies them, so they
    matter on the workers' queues.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        clock: Callable[[], float] = time.time,
        maintenance_batch: int = 100,
        max_backoff_s: float = 3600.0,
        running_limit: int = 0,
        running_limits: Mapping[str, int] | None = None,
    ) -> None:
        if maintenance_batch < 1:
            raise ValueError("maintenance_batch must be at least 1")
        overrides = dict(running_limits or {})
        if running_limit < 0 or any(limit < 0 for limit in overrides.values()):
            raise ValueError("running limits must not be negative (0 means no limit)")
        self._redis = redis
        self._clock = clock
        self._batch = maintenance_batch
        self._max_backoff_ms = _positive_ms("max_backoff_s", max_backoff_s)
        base = f"{prefix}q:{KEY_VERSION}:"
        #: Prefix of every key this queue owns.
        self.key_prefix = base
        # KEYS of every script, in the order prelude.lua names them.
        self._keys = [f"{base}{name}" for name in _SCRIPT_KEYS]
        self._dead_key = f"{base}dead"
        self._leased_key = f"{base}leased"
        self._paused_key = f"{base}paused"
        self._job_prefix = f"{base}job:"
        self._running_key = f"{base}running"
        self._ring_key = f"{base}ring"
        self._running_limit = running_limit
        # Encoded once: every dequeue hands the same limits to the script.
        self._running_limits_json = json.dumps(overrides, separators=(",", ":"))
        self._scripts: dict[str, AsyncScript] = {
            name: redis.register_script(_script_source(name)) for name in _SCRIPTS
        }

    def job_key(self, job_id: UUID | str) -> str:
        """The Redis key of one job's hash."""
        return f"{self._job_prefix}{_as_uuid(job_id)}"

    def now(self) -> float:
        """The queue's clock, in epoch seconds."""
        return self._clock()

    async def _run(self, name: str, *args: str | int) -> Any:
        now_ms = _ms(self._clock())
        return await self._call(
            name, self._scripts[name](keys=self._keys, args=[self.key_prefix, now_ms, *args])
        )

    async def _call(self, operation: str, awaitable: Awaitable[Any]) -> Any:
        try:
            return await awaitable
        except (RedisError, OSError) as exc:
            log.warning("queue_unavailable", operation=operation, error=type(exc).__name__)
            raise QueueUnavailableError(operation=operation, error=type(exc).__name__) from exc

    async def enqueue(
        self,
        job_id: UUID | str,
        execution_id: UUID | str,
        tenant_id: str,
        priority: int,
        max_attempts: int,
        max_lease_renewals: int,
        available_at: float | datetime | None = None,
        *,
        attempts: int = 0,
        request_id: str | None = None,
        trace_context: str | None = None,
    ) -> bool:
        """Queue a job; return False (and change nothing) if ``job_id`` is already queued.

        ``available_at`` (epoch seconds or an aware datetime) in the future delays the job until
        then. ``attempts`` already spent is for re-pushing a Postgres row after Redis lost it.
        ``request_id`` and ``trace_context`` (the W3C ``traceparent`` of the request that queued
        the job) travel with the job to the worker that leases it; a value that is not a valid
        request id / traceparent is left out (optional correlation never fails a submit), so a
        job's payload stays bounded (100 + 55 characters at most).
        """
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if max_lease_renewals < 0:
            raise ValueError("max_lease_renewals must not be negative")
        if not 0 <= attempts < max_attempts:
            raise ValueError(f"attempts must be in [0, max_attempts), got {attempts}")
        if isinstance(available_at, datetime):
            available_at = available_at.timestamp()
        job = _as_uuid(job_id)
        kept_request_id = correlation_request_id(request_id)
        kept_trace = correlation_traceparent(trace_context)
        if (request_id, trace_context) != (kept_request_id, kept_trace):
            log.warning(
                "job_correlation_dropped",
                job_id=str(job),
                request_id_dropped=request_id != kept_request_id,
                trace_context_dropped=trace_context != kept_trace,
            )
        created = await self._run(
            "enqueue",
            str(job),
            str(_as_uuid(execution_id)),
            tenant_id,
            _priority(priority),
            max_attempts,
            max_lease_renewals,
            _ms(available_at) if available_at is not None else 0,
            attempts,
            kept_request_id or "",
            kept_trace or "",
        )
        if created:
            log.info(
                "job_enqueued",
                job_id=str(job),
                execution_id=str(execution_id),
                tenant_id=tenant_id,
                priority=priority,
            )
        return bool(created)

    @property
    def wake_channel(self) -> str:
        """The pub/sub channel :meth:`announce` publishes on (see :mod:`.wakeups`)."""
        return f"{self.key_prefix}wake"

    async def announce(self) -> None:
        """Wake an idle consumer: a job was just queued and its row committed.

        Best effort: a lost announcement only leaves the job to the consumers' polling, so a
        Redis failure here is logged, never raised (the submit already succeeded).
        """
        try:
            await self._redis.publish(self.wake_channel, b"1")
        except (RedisError, OSError) as exc:
            log.info("queue_announce_failed", error=type(exc).__name__)

    async def dequeue(self, worker_id: str, lease_s: float) -> LeasedJob | None:
        """Lease the best ready job to ``worker_id`` for ``lease_s`` seconds, or return None.

        One script: due retries become ready and expired leases are reclaimed first, so a job
        whose holder died comes back here without waiting for the reaper; then the next tenant
        of the ring under its running limit gives its best job. None when nothing is ready (or
        every tenant with ready jobs is at its limit) or dispatch is paused.
        """
        leased = await self.dequeue_batch(worker_id, lease_s, 1)
        return leased[0] if leased else None

    async def dequeue_batch(self, worker_id: str, lease_s: float, count: int) -> list[LeasedJob]:
        """Lease up to ``count`` jobs in one script, each with its own lease token.

        Exactly what ``count`` :meth:`dequeue` calls in a row would lease, in the same order
        (each choice sees the leases before it: the tenants' ring has turned and running counts
        have grown), with the housekeeping done once. Fewer (none) when fewer are available.
        """
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        lease_ms = _positive_ms("lease_s", lease_s)
        raw = await self._run(
            "dequeue",
            lease_ms,
            worker_id,
            ",".join(str(uuid.uuid4()) for _ in range(count)),
            self._batch,
            self._running_limit,
            self._running_limits_json,
        )
        if raw is None:
            return []
        jobs = [LeasedJob.from_hash(fields) for fields in json.loads(raw)]
        for job in jobs:
            log.debug(
                "job_leased",
                job_id=str(job.job_id),
                execution_id=str(job.execution_id),
                worker_id=worker_id,
                attempts=job.attempts,
                lease_expirations=job.lease_expirations,
            )
        return jobs

    async def renew(self, job_id: UUID | str, lease_token: UUID | str, lease_s: float) -> float:
        """Extend a held lease to now + ``lease_s``; return the new deadline (epoch seconds).

        Raises :class:`StaleLeaseError` when the token no longer holds the job and
        :class:`LeaseRenewalLimitError` once ``max_lease_renewals`` renewals were granted.
        """
        lease_ms = _positive_ms("lease_s", lease_s)
        job = _as_uuid(job_id)
        result = await self._run("renew", str(job), str(lease_token), lease_ms)
        status = int(result[0])
        if status == 0:
            raise self._stale("renew", job)
        if status < 0:
            raise LeaseRenewalLimitError(job_id=str(job), lease_renewals=int(result[1]))
        log.debug("lease_renewed", job_id=str(job), lease_renewals=int(result[2]))
        return int(result[1]) / 1000

    async def ack(self, job_id: UUID | str, lease_token: UUID | str) -> None:
        """Remove a finished job; :class:`StaleLeaseError` if the token no longer holds it."""
        job = _as_uuid(job_id)
        if not await self._run("ack", str(job), str(lease_token)):
            raise self._stale("ack", job)
        log.debug("job_acked", job_id=str(job))

    async def fail(
        self,
        job_id: UUID | str,
        lease_token: UUID | str,
        error: str,
        *,
        error_class: str | None = None,
    ) -> FailOutcome:
        """Record a failed attempt: retry after ``2^attempts`` s, or give up after the last one.

        Attempt 1 retries after 2 s, attempt 2 after 4 s, attempt 3 after 8 s (capped at
        ``max_backoff_s``). When ``attempts`` reaches ``max_attempts`` the job is removed and the
        outcome is ``dead``: the caller writes the DLQ row. :class:`StaleLeaseError` if the token
        no longer holds the job.
        """
        job = _as_uuid(job_id)
        last_error: dict[str, Any] = {"message": error[:_MAX_ERROR_CHARS]}
        if error_class is not None:
            last_error["error_class"] = error_class
        result = await self._run(
            "fail", str(job), str(lease_token), json.dumps(last_error), self._max_backoff_ms
        )
        status = int(result[0])
        if status == 0:
            raise self._stale("fail", job)
        attempts, max_attempts = int(result[1]), int(result[2])
        dead = status == 2
        outcome = FailOutcome(
            job_id=job,
            attempts=attempts,
            max_attempts=max_attempts,
            dead=dead,
            retry_at=None if dead else int(result[3]) / 1000,
            last_error=last_error,
        )
        log.info(
            "job_dead" if dead else "job_retry_scheduled",
            job_id=str(job),
            attempts=attempts,
            max_attempts=max_attempts,
            retry_at=outcome.retry_at,
            error_class=error_class,
        )
        return outcome

    async def release(
        self, job_id: UUID | str, lease_token: UUID | str, *, delay_s: float = 0.0
    ) -> None:
        """End a lease without spending an attempt (graceful shutdown, or deferring a job).

        With ``delay_s`` 0 the job is ready at once, at its original place in line; otherwise
        it becomes ready after ``delay_s`` seconds (e.g. its Postgres row is not visible yet).
        :class:`StaleLeaseError` if the token no longer holds the job.
        """
        if delay_s < 0:
            raise ValueError("delay_s must not be negative")
        job = _as_uuid(job_id)
        if not await self._run("release", str(job), str(lease_token), _ms(delay_s)):
            raise self._stale("release", job)
        log.info("job_released", job_id=str(job), delay_s=delay_s)

    async def remove(self, job_id: UUID | str) -> bool:
        """Remove a job whatever its state (cancel, reconcile); return whether it was there.

        A holder of a removed job's lease gets :class:`StaleLeaseError` on its next call.
        """
        job = _as_uuid(job_id)
        removed = bool(await self._run("remove", str(job)))
        if removed:
            log.info("job_removed", job_id=str(job))
        return removed

    async def requeue_expired(self) -> MaintenanceReport:
        """The reaper's pass: make due retries ready and reclaim every expired lease.

        Runs the housekeeping half of :meth:`dequeue` in batches until nothing is left to move.
        """
        total = MaintenanceReport()
        while True:
            promoted, reclaimed, dead = await self._run("maintain", self._batch)
            batch = MaintenanceReport(int(promoted), int(reclaimed), int(dead))
            total += batch
            if max(batch.promoted, batch.reclaimed + batch.dead) < self._batch:
                break
        if total != MaintenanceReport():
            log.info(
                "queue_maintained",
                promoted=total.promoted,
                reclaimed=total.reclaimed,
                dead=total.dead,
            )
        return total

    async def expired_leases(self, limit: int = 1000) -> list[QueuedJob]:
        """Up to ``limit`` leased jobs whose lease deadline has passed, oldest first.

        A snapshot taken before :meth:`requeue_expired`: until a lease is reclaimed its holder
        may still renew it, so only a job whose ``lease_expirations`` grew since was reclaimed.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        members = await self._call(
            "expired_leases",
            self._redis.zrangebyscore(
                self._leased_key, "-inf", _ms(self._clock()), start=0, num=limit
            ),
        )
        jobs = []
        for member in members:
            job = await self.get(member.decode() if isinstance(member, bytes) else member)
            if job is not None:
                jobs.append(job)
        return jobs

    async def dead_jobs(self, limit: int = 100) -> list[QueuedJob]:
        """Up to ``limit`` jobs whose lease expired on their last attempt, oldest first.

        The reaper writes each one's DLQ row (and fails its execution) first, then calls
        :meth:`remove`; until then the job stays here.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        members = await self._call("dead_jobs", self._redis.zrange(self._dead_key, 0, limit - 1))
        jobs = []
        for member in members:
            job = await self.get(member.decode() if isinstance(member, bytes) else member)
            if job is not None:
                jobs.append(job)
        return jobs

    async def get(self, job_id: UUID | str) -> QueuedJob | None:
        """A snapshot of one job, or None when it is not in Redis."""
        raw = await self._call("get", self._redis.hgetall(self.job_key(job_id)))
        return QueuedJob.from_hash(decode_hash(raw)) if raw else None

    async def exists(self, job_id: UUID | str) -> bool:
        """Whether the job is in Redis (in any state)."""
        return bool(await self._call("exists", self._redis.exists(self.job_key(job_id))))

    async def all_job_ids(self) -> set[UUID]:
        """Every job id in the index (ready, leased, delayed, dead), from one snapshot."""
        groups: Sequence[Sequence[bytes | str]] = await self._run("job_ids")
        return {_as_uuid(m.decode() if isinstance(m, bytes) else m) for g in groups for m in g}

    async def stats(self) -> QueueStats:
        """Gauges from one consistent snapshot (see :class:`QueueStats`)."""
        per_priority, leased, expired, delayed, dead, oldest, paused, expirations = await self._run(
            "stats"
        )
        ready = {
            int(per_priority[i]): int(per_priority[i + 1]) for i in range(0, len(per_priority), 2)
        }
        oldest_age = None if int(oldest) < 0 else max(self._clock() - int(oldest) / 1000, 0.0)
        return QueueStats(
            ready_by_priority=ready,
            leased=int(leased),
            expired_leases=int(expired),
            delayed=int(delayed),
            dead=int(dead),
            oldest_ready_age_s=oldest_age,
            paused=bool(paused),
            lease_expirations_total=int(expirations),
        )

    async def set_paused(self, paused: bool) -> None:
        """Drain (True) or resume (False) dispatch; leases already granted are unaffected."""
        if paused:
            await self._call("set_paused", self._redis.set(self._paused_key, "1"))
        else:
            await self._call("set_paused", self._redis.delete(self._paused_key))
        log.info("queue_paused" if paused else "queue_resumed")

    async def is_paused(self) -> bool:
        """Whether dispatch is drained."""
        return bool(await self._call("is_paused", self._redis.exists(self._paused_key)))

    async def running_by_tenant(self) -> dict[str, int]:
        """How many leases each tenant holds now (tenants with none are absent)."""
        raw = await self._call("running_by_tenant", self._redis.hgetall(self._running_key))
        return {tenant: int(count) for tenant, count in decode_hash(raw).items()}

    async def tenant_ring(self) -> list[str]:
        """The ring, in the order dequeue looks at it: tenants with ready jobs, and tenants
        whose line emptied since their last turn (they leave at their next one)."""
        raw = await self._call("tenant_ring", self._redis.lrange(self._ring_key, 0, -1))
        return [m.decode() if isinstance(m, bytes) else str(m) for m in raw]

    def wakeups(self) -> Wakeups:
        """Push dispatch for this queue's consumers: woken by :meth:`announce` (not started)."""
        return Wakeups(self._redis, self.wake_channel)

    async def aclose(self) -> None:
        """Close the queue's Redis client (the one :func:`open_queue` made for it)."""
        await self._redis.aclose()

    def _stale(self, operation: str, job_id: UUID) -> StaleLeaseError:
        log.warning("lease_lost", operation=operation, job_id=str(job_id))
        return StaleLeaseError(job_id=str(job_id), operation=operation)


def open_queue(
    url: str,
    *,
    prefix: str = DEFAULT_PREFIX,
    running_limit: int = 0,
    running_limits: Mapping[str, int] | None = None,
) -> RedisQueue:
    """The queue on its own client (:func:`create_redis_client`): services hold the queue, never
    a Redis client, so no key is reached around the core; :meth:`RedisQueue.aclose` closes it."""
    return RedisQueue(
        create_redis_client(url),
        prefix=prefix,
        running_limit=running_limit,
        running_limits=running_limits,
    )
