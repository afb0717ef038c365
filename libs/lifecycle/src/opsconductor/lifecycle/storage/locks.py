"""The per-asset mutex: leased locks in Postgres with owner tokens and fencing tokens.

One row of ``execution_locks`` per held key ``lock:v1:{tenant_id}:{target_ref}:{action}``. The lock
lives in Postgres (not Redis) because the immediate path must work with Redis down.

Guarantees:

* **Mutual exclusion.** Acquire is one ``INSERT … ON CONFLICT DO UPDATE … WHERE expired``: it
  creates a free key or takes over an *expired* one, never a live one. All keys of a plan are taken
  in one transaction, all or nothing; if any is held, nothing is kept and
  :class:`~opsconductor.common.errors.ResourceBusyError` is raised at once (spec §3.2: no waiting
  unless the caller asks for it with ``wait``). A run's single key may instead be taken by its
  first step's start statement (``execution_steps.lock_and_start_step``), the same way.
* **No deadlock.** Every statement that locks rows (acquire, extend, release) touches them in one
  global order (``lock_key`` under the "C" collation); the reaper skips rows others have locked.
  A cycle of waiters would need keys to grow all the way round the cycle, which is impossible.
* **Owner tags.** Release and extend match the owner token, so nobody frees a lock they do not
  hold, and an owner whose lease lapsed and was taken over frees nothing of the new holder's.
* **Fencing.** Every grant, including a takeover, draws a new ``fencing_token`` from a sequence, so
  a later holder always has a strictly larger token than the one it displaced.
* **Release always happens** with :func:`held_locks`: in ``finally``, shielded from cancellation.
  Locks whose holder died lapse at ``expires_at``; :func:`reap_expired_locks` deletes them.

All times come from the database clock (``now()``), so workers' clocks never disagree about expiry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeAlias
from uuid import UUID, uuid4

import asyncpg
import structlog
from prometheus_client import Histogram
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)

from opsconductor.common.errors import ResourceBusyError, StaleLeaseError, StorageError
from opsconductor.common.tracing import tracer
from opsconductor.lifecycle.storage.queries import query

log = structlog.get_logger(__name__)

#: A pool (a connection is borrowed per call) or a connection (the call runs on it, inside any
#: transaction already open there, so the caller's commit or rollback decides).
PoolOrConnection: TypeAlias = asyncpg.Pool | asyncpg.Connection

LOCK_KEY_PREFIX = "lock:v1"
# Column widths of execution_locks; checked here so an oversize name is a ValueError, not a
# truncation error from the driver.
MAX_TENANT_ID = 100
MAX_TARGET_REF = 300
MAX_ACTION = 100

LOCK_WAIT = Histogram(
    "opsc_lock_wait_seconds",
    "Time to take an execution's locks (all or nothing), by outcome: acquired, busy, error.",
    ["outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

_ACQUIRE = query("acquire_locks")
_HOLDERS = query("lock_holders")
_RELEASE = query("release_locks")
_EXTEND = query("extend_locks")
_STATUS = query("lock_status")
_REAP = query("reap_locks")

# Releases that outlived a cancelled caller; strong references so they are not garbage collected.
_background_releases: set[asyncio.Task[int]] = set()


def lock_key(tenant_id: str, target_ref: str, action: str) -> str:
    """Return the lock key ``lock:v1:{tenant_id}:{target_ref}:{action}``.

    ``tenant_id`` and ``action`` may not contain ``:`` (``target_ref`` may, e.g. ``host:port``),
    so a key names exactly one (tenant, target, action): two tenants never share a key.

    Raises:
        ValueError: a part is empty, too long, or (tenant, action) contains ``:``.
    """
    for name, value, limit in (
        ("tenant_id", tenant_id, MAX_TENANT_ID),
        ("target_ref", target_ref, MAX_TARGET_REF),
        ("action", action, MAX_ACTION),
    ):
        if not value:
            raise ValueError(f"{name} must not be empty")
        if len(value) > limit:
            raise ValueError(f"{name} is longer than {limit} characters")
    if ":" in tenant_id or ":" in action:
        raise ValueError("tenant_id and action must not contain ':'")
    return f"{LOCK_KEY_PREFIX}:{tenant_id}:{target_ref}:{action}"


@dataclass(frozen=True)
class LockRequest:
    """One lock a plan needs: ``action`` on ``target_ref`` of ``tenant_id``."""

    tenant_id: str
    target_ref: str
    action: str

    def __post_init__(self) -> None:
        lock_key(self.tenant_id, self.target_ref, self.action)  # validate early

    @property
    def key(self) -> str:
        """This request's lock key."""
        return lock_key(self.tenant_id, self.target_ref, self.action)


@dataclass(frozen=True)
class HeldLock:
    """One granted lock: its key, its owner, its fencing token and when its lease ends."""

    lock_key: str
    owner_token: UUID
    fencing_token: int
    expires_at: datetime


@dataclass(frozen=True)
class LockSet:
    """The locks one plan holds, all under one owner token, sorted by key."""

    owner_token: UUID
    locks: tuple[HeldLock, ...] = ()

    @property
    def keys(self) -> list[str]:
        """The held keys, in lock order."""
        return [held.lock_key for held in self.locks]

    @property
    def fencing_tokens(self) -> dict[str, int]:
        """Fencing token per key: pass it with every write the lock protects."""
        return {held.lock_key: held.fencing_token for held in self.locks}

    @property
    def expires_at(self) -> datetime | None:
        """The earliest lease end (when the set stops being whole), None for an empty set."""
        return min((held.expires_at for held in self.locks), default=None)


@dataclass(frozen=True)
class LockStatus:
    """A live lock as others see it (the owner token is deliberately not exposed)."""

    lock_key: str
    owner_execution_id: UUID | None
    fencing_token: int
    acquired_at: datetime
    expires_at: datetime


def sorted_requests(requests: Iterable[LockRequest]) -> list[LockRequest]:
    """Deduplicate ``requests`` by key and sort them in lock order."""
    by_key = {request.key: request for request in requests}
    return [by_key[key] for key in sorted(by_key)]


@contextmanager
def storage_errors(operation: str) -> Iterator[None]:
    """Turn driver and connection errors into StorageError, keeping the cause."""
    try:
        yield
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise StorageError(f"lock {operation} failed: {type(exc).__name__}") from exc


@asynccontextmanager
async def _connection(pool_or_conn: PoolOrConnection) -> AsyncIterator[Any]:
    if isinstance(pool_or_conn, asyncpg.Pool):
        async with pool_or_conn.acquire() as conn:
            yield conn
    else:
        yield pool_or_conn


def _atomic(conn: Any, rows: int) -> AbstractAsyncContextManager[Any]:
    """A transaction when several rows must change all or nothing. A one-row statement is
    atomic by itself: skipping BEGIN/COMMIT saves two round trips on the common one-target path.
    """
    return conn.transaction() if rows > 1 else nullcontext()


def check_ttl(ttl: timedelta) -> None:
    if ttl <= timedelta(0):
        raise ValueError("ttl must be positive")


async def _acquire_once(
    pool_or_conn: PoolOrConnection,
    requests: list[LockRequest],
    owner_token: UUID,
    owner_execution_id: UUID | None,
    ttl: timedelta,
) -> LockSet:
    keys = [request.key for request in requests]
    with storage_errors("acquire"):
        async with _connection(pool_or_conn) as conn, _atomic(conn, len(keys)):
            rows = await conn.fetch(
                _ACQUIRE,
                keys,
                [request.tenant_id for request in requests],
                [request.target_ref for request in requests],
                [request.action for request in requests],
                owner_token,
                owner_execution_id,
                ttl,
            )
            if len(rows) == len(keys):
                granted = {row["lock_key"]: row for row in rows}
                return LockSet(
                    owner_token,
                    tuple(
                        HeldLock(
                            key,
                            owner_token,
                            granted[key]["fencing_token"],
                            granted[key]["expires_at"],
                        )
                        for key in keys
                    ),
                )
            # Raising inside the transaction rolls back every key this call did take, so a
            # busy plan keeps nothing.
            taken = {row["lock_key"] for row in rows}
            raise await busy_error(conn, keys, taken, owner_token, owner_execution_id)


def _busy_error(keys: list[str], taken: set[str], holders: list[Any]) -> ResourceBusyError:
    # Every row of another owner is a key we could not take; if its holder has released it
    # since, we still name the first key we missed.
    busy_key = holders[0]["lock_key"] if holders else next(k for k in keys if k not in taken)
    held_by: UUID | None = holders[0]["owner_execution_id"] if holders else None
    log.info("lock_busy", lock_key=busy_key, held_by_execution_id=held_by)
    return ResourceBusyError(
        f"{busy_key} is locked by another execution; retry once it has finished",
        lock_key=busy_key,
        held_by_execution_id=str(held_by) if held_by is not None else None,
    )


async def acquire_locks(
    pool_or_conn: PoolOrConnection,
    requests: Iterable[LockRequest],
    *,
    owner_token: UUID,
    owner_execution_id: UUID | None,
    ttl: timedelta,
    wait: timedelta | None = None,
) -> LockSet:
    """Take every lock in ``requests`` for ``owner_token``, all or nothing.

    Duplicate requests count once. A lock whose lease has expired is taken over with a new,
    larger fencing token. Locks are not re-entrant: a key this owner already holds is busy too
    (use :func:`extend_locks` to keep a lease). Without ``wait`` a held lock fails the call at
    once; with ``wait`` the whole set is retried with jittered exponential backoff until
    ``wait`` has passed.

    Raises:
        ResourceBusyError: a key is held by another owner (details ``lock_key``,
            ``held_by_execution_id``); nothing was kept.
        StorageError: the database failed.
        ValueError: ``ttl`` is not positive.
    """
    check_ttl(ttl)
    ordered = sorted_requests(requests)
    if not ordered:
        return LockSet(owner_token)
    with timed_acquire(len(ordered)) as timing:
        if wait is None:
            lock_set = await _acquire_once(
                pool_or_conn, ordered, owner_token, owner_execution_id, ttl
            )
        else:
            retrying = AsyncRetrying(
                retry=retry_if_exception_type(ResourceBusyError),
                stop=stop_after_delay(wait.total_seconds()),
                wait=wait_random_exponential(multiplier=0.005, max=0.25),
                reraise=True,
            )
            lock_set = await retrying(
                _acquire_once, pool_or_conn, ordered, owner_token, owner_execution_id, ttl
            )
        timing.outcome = "acquired"
    log_acquired(lock_set, owner_execution_id)
    return lock_set


@dataclass
class AcquireTiming:
    """How an acquisition timed by :func:`timed_acquire` ended: acquired, busy or error."""

    outcome: str = "busy"


@contextmanager
def timed_acquire(count: int) -> Iterator[AcquireTiming]:
    """Time one acquisition of ``count`` locks (``opsc_lock_wait_seconds``, a ``lock_wait``
    span); the caller sets ``outcome = "acquired"`` once they are held, a StorageError makes it
    ``error``, anything else leaves it ``busy``."""
    started = time.perf_counter()
    timing = AcquireTiming()
    span = tracer().start_span("lock_wait", attributes={"opsc.locks": count})
    try:
        yield timing
    except StorageError:
        timing.outcome = "error"
        raise
    finally:
        LOCK_WAIT.labels(timing.outcome).observe(time.perf_counter() - started)
        span.set_attribute("opsc.outcome", timing.outcome)
        span.end()


def log_acquired(lock_set: LockSet, owner_execution_id: UUID | None) -> None:
    log.debug(
        "locks_acquired",
        lock_keys=lock_set.keys,
        owner_execution_id=owner_execution_id,
        fencing_tokens=lock_set.fencing_tokens,
    )


async def busy_error(
    conn: Any, keys: list[str], taken: set[str], owner_token: UUID, owner_execution_id: UUID | None
) -> ResourceBusyError:
    """The busy answer for ``keys`` of which only ``taken`` were granted: who holds the rest."""
    holders = await conn.fetch(_HOLDERS, keys, owner_token, owner_execution_id)
    return _busy_error(keys, taken, holders)


async def _delete_owned(pool_or_conn: PoolOrConnection, keys: list[str], owner_token: UUID) -> int:
    if not keys:
        return 0
    with storage_errors("release"):
        async with _connection(pool_or_conn) as conn:
            status: str = await conn.execute(_RELEASE, keys, owner_token)
    released = int(status.rsplit(" ", 1)[-1])  # "DELETE <count>"
    log.debug("locks_released", lock_keys=keys, released=released)
    return released


async def release_locks(pool_or_conn: PoolOrConnection, lock_set: LockSet) -> int:
    """Delete the locks of ``lock_set`` that its owner still holds; return how many.

    Locks already gone (reaped, or taken over after expiry) are skipped silently: only rows
    carrying the owner's token are deleted, so a stale owner never frees a newer holder's lock.

    Raises:
        StorageError: the database failed (the locks then lapse at their expiry).
    """
    return await _delete_owned(pool_or_conn, lock_set.keys, lock_set.owner_token)


async def extend_locks(
    pool_or_conn: PoolOrConnection, lock_set: LockSet, ttl: timedelta
) -> LockSet:
    """Push the lease of every lock in ``lock_set`` to ``now() + ttl``, all or nothing.

    A lock that expired but was not taken over is still the owner's and is extended.

    Raises:
        StaleLeaseError: some key is no longer held by this owner (details ``lost_keys``);
            nothing was extended, and the caller must stop acting under these locks.
        StorageError: the database failed.
        ValueError: ``ttl`` is not positive.
    """
    check_ttl(ttl)
    if not lock_set.locks:
        return lock_set
    keys = lock_set.keys
    with storage_errors("extend"):
        async with _connection(pool_or_conn) as conn, _atomic(conn, len(keys)):
            rows = await conn.fetch(_EXTEND, keys, lock_set.owner_token, ttl)
            extended = {row["lock_key"]: row for row in rows}
            lost = [key for key in keys if key not in extended]
            if lost:
                # Raising inside the transaction rolls back the keys that were extended.
                log.warning("lock_lease_lost", lost_keys=lost)
                raise StaleLeaseError(f"lock lease lost for {', '.join(lost)}", lost_keys=lost)
    return LockSet(
        lock_set.owner_token,
        tuple(
            HeldLock(
                key,
                lock_set.owner_token,
                extended[key]["fencing_token"],
                extended[key]["expires_at"],
            )
            for key in keys
        ),
    )


async def check_lock_status(
    pool_or_conn: PoolOrConnection, tenant_id: str, target_ref: str, action: str
) -> LockStatus | None:
    """Return the live lock on (tenant, target, action), or None when it is free or expired."""
    key = lock_key(tenant_id, target_ref, action)
    with storage_errors("status"):
        async with _connection(pool_or_conn) as conn:
            row = await conn.fetchrow(_STATUS, key)
    if row is None:
        return None
    return LockStatus(
        lock_key=row["lock_key"],
        owner_execution_id=row["owner_execution_id"],
        fencing_token=row["fencing_token"],
        acquired_at=row["acquired_at"],
        expires_at=row["expires_at"],
    )


async def reap_expired_locks(pool_or_conn: PoolOrConnection) -> int:
    """Delete every expired lock and return how many went; safe to run from many workers at once.

    Each reaped lock is counted once in ``metric_counters`` (``mutex_reaped``, exported as
    ``opsc_mutex_reaped_total``), however many reapers race: a row locked by another reaper (or
    by an acquirer taking it over) is skipped.
    """
    with storage_errors("reap"):
        async with _connection(pool_or_conn) as conn:
            rows = await conn.fetch(_REAP)
    count = len(rows)
    if count:
        log.info("locks_reaped", count=count, lock_keys=[row["lock_key"] for row in rows])
    else:
        log.debug("locks_reaped", count=0)
    return count


_RELEASE_EXECUTION = query("release_execution_locks")


async def release_execution_locks(pool_or_conn: PoolOrConnection, execution_id: UUID) -> int:
    """Delete every lock held on behalf of ``execution_id``, whatever its owner token.

    For executions that hold locks with no worker attached: a level-3 execution paused for a
    step approval keeps its locks until it resumes, and frees them here when it ends while
    waiting (cancelled, rejected, expired). Rows are locked in the global key order.
    """
    with storage_errors("release"):
        async with _connection(pool_or_conn) as conn:
            rows = await conn.fetch(_RELEASE_EXECUTION, execution_id)
    if rows:
        log.info(
            "execution_locks_released",
            execution_id=str(execution_id),
            lock_keys=[row["lock_key"] for row in rows],
        )
    return len(rows)


async def _release_quietly(
    pool_or_conn: PoolOrConnection, keys: list[str], owner_token: UUID
) -> int:
    try:
        return await _delete_owned(pool_or_conn, keys, owner_token)
    except StorageError:
        # Raising here would hide the body's own outcome; the leases lapse at expires_at.
        log.exception("locks_release_failed", lock_keys=keys)
        return 0


async def release_surviving_cancellation(
    pool_or_conn: PoolOrConnection, keys: list[str], owner_token: UUID
) -> None:
    """Release in a task of its own so a cancellation of the caller cannot stop it midway."""
    release = asyncio.create_task(_release_quietly(pool_or_conn, keys, owner_token))
    _background_releases.add(release)
    release.add_done_callback(_background_releases.discard)
    # If the caller is cancelled again while waiting, shield() lets the release run on.
    await asyncio.shield(release)


@asynccontextmanager
async def held_locks(
    pool_or_conn: PoolOrConnection,
    requests: Iterable[LockRequest],
    *,
    ttl: timedelta,
    owner_token: UUID | None = None,
    owner_execution_id: UUID | None = None,
    wait: timedelta | None = None,
) -> AsyncIterator[LockSet]:
    """Hold the locks of ``requests`` for the ``async with`` body, then always release them.

    Release runs on success, on exception and on cancellation (shielded, so it completes even
    when the task is cancelled). A failed release is logged (``locks_release_failed``), never
    raised over the body's outcome: those locks lapse at their expiry. ``owner_token`` defaults
    to a fresh one; see :func:`acquire_locks` for ``wait`` and errors.
    """
    owner = owner_token if owner_token is not None else uuid4()
    ordered = sorted_requests(requests)
    try:
        lock_set = await acquire_locks(
            pool_or_conn,
            ordered,
            owner_token=owner,
            owner_execution_id=owner_execution_id,
            ttl=ttl,
            wait=wait,
        )
    except asyncio.CancelledError:
        # Cancelled while acquiring: the commit may have landed before the cancellation did.
        # By now the borrowed connection has settled, so deleting by owner token is exact.
        await release_surviving_cancellation(pool_or_conn, [r.key for r in ordered], owner)
        raise
    try:
        yield lock_set
    finally:
        await release_surviving_cancellation(pool_or_conn, lock_set.keys, owner)
