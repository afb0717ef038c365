"""The execution lifecycle as service logic sees it: a port, its Postgres + Redis adapter, and
(:mod:`.fake`) an in-memory stand-in for unit tests — procrastinate's ``JobManager`` over a
connector, in miniature.

Service logic holds an :class:`ExecutionLifecycle` instead of a pool and a queue, so its unit
tests run against :class:`~opsconductor.lifecycle.fake.InMemoryLifecycle`; every behaviour the
fake has is also checked against this adapter on real Postgres and Redis
(``tests/integration/test_lifecycle_facade.py``, one test body for both). It covers what the
approvals service's dispatcher and the api's submissions need so far: create an execution
idempotently (optionally admitted under the tenant's immediate quota), read it, find its queue job,
queue it inside the caller's transaction (or, for a background submit, admit, create and queue
it in one statement), wake a consumer, and end one no worker started; and,
in a transaction it opens, the tenant's quota lock and its waiting jobs; start and finish a step
of a running execution. Each
call delegates to the storage and queue function that does it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol
from uuid import UUID

from opsconductor.common.errors import QueueUnavailableError
from opsconductor.common.fsm import ExecutionStatus, StepStatus
from opsconductor.lifecycle.queue import jobs
from opsconductor.lifecycle.queue.enqueue import enqueue_execution, submit_queued
from opsconductor.lifecycle.queue.redis_queue import RedisQueue
from opsconductor.lifecycle.storage import execution_steps, quota_usage
from opsconductor.lifecycle.storage.execution_leases import fail_unstarted_execution
from opsconductor.lifecycle.storage.execution_reads import get_execution
from opsconductor.lifecycle.storage.execution_records import (
    ExecutionRecord,
    PoolOrConnection,
    StepRecord,
    transaction,
)
from opsconductor.lifecycle.storage.executions import (
    CreatedQueued,
    NewExecution,
    create_execution,
    create_immediate_execution,
)
from opsconductor.lifecycle.storage.policies import TimeoutPolicy
from opsconductor.lifecycle.storage.quota_usage import ImmediateUsage, WaitingUsage

__all__ = [
    "CreatedQueued",
    "ExecutionLifecycle",
    "PostgresRedisLifecycle",
    "Queued",
    "WaitingUsage",
]


@dataclass(frozen=True)
class Queued:
    """A queued execution: its row as the transition to ``queued`` wrote it, and its job."""

    record: ExecutionRecord
    job_id: UUID


class ExecutionLifecycle(Protocol):
    """The lifecycle operations service logic calls (the core owns every store behind them)."""

    @property
    def queue_configured(self) -> bool:
        """Whether background work can be queued at all (a Redis queue is configured)."""
        ...

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """A transaction to pass as ``tx``: everything done in it is undone if it raises."""
        ...

    async def lock_tenant_quota(self, tx: Any, tenant_id: str) -> None:
        """Take the tenant's quota lock until ``tx`` ends (``RuntimeError`` without one)."""
        ...

    async def waiting_jobs(self, tx: Any, tenant_id: str) -> int:
        """The tenant's queue jobs not leased: ready or delayed."""
        ...

    async def key_is_live(self, tx: Any, tenant_id: str, idempotency_key: str) -> bool:
        """Whether the tenant has an execution holding this idempotency key."""
        ...

    async def create(
        self, new: NewExecution, *, dedup_window: timedelta, tx: Any = None
    ) -> tuple[ExecutionRecord, bool]:
        """``(record, created)``: the execution of ``new``'s key, created unless one is live
        (a terminal one that ended over ``dedup_window`` ago has its key retired first).
        ``tx``: the caller's transaction to join, else its own."""
        ...

    async def create_admitted(
        self,
        new: NewExecution,
        *,
        dedup_window: timedelta,
        max_in_flight: int,
        tx: Any = None,
    ) -> tuple[ExecutionRecord, bool] | ImmediateUsage:
        """:meth:`create`, admitted only while the tenant has fewer than ``max_in_flight``
        (0: no limit) immediate executions pending or running; else the usage, nothing written.
        A duplicate of a live execution is returned, never refused."""
        ...

    async def create_queued(
        self,
        tx: Any,
        new: NewExecution,
        policy: TimeoutPolicy,
        *,
        dedup_window: timedelta,
        max_waiting: int,
        by: str,
    ) -> CreatedQueued | WaitingUsage:
        """A background submit inside the caller's transaction ``tx``: under the tenant's quota
        lock, :meth:`create` then :meth:`enqueue` from ``pending`` (the job with ``policy``'s
        budget) while the tenant has fewer than ``max_waiting`` (0: no limit) jobs waiting;
        else the usage, nothing written. A duplicate of a live execution is returned with its
        job (None once it has none), never refused, nothing queued again.
        ``QueueUnavailableError`` when the queue cannot take it (rolled back with ``tx``)."""
        ...

    async def get(self, tenant_id: str, execution_id: UUID, *, tx: Any = None) -> ExecutionRecord:
        """The execution with its steps; ``NotFoundError`` if absent or another tenant's."""
        ...

    async def queued_job(self, execution_id: UUID, *, tx: Any = None) -> UUID | None:
        """The id of the execution's queue job, None when it has none."""
        ...

    async def announce(self) -> None:
        """Wake an idle consumer once a queued job is committed (best effort, never raises)."""
        ...

    async def enqueue(
        self,
        tx: Any,
        record: ExecutionRecord,
        policy: TimeoutPolicy,
        *,
        by: str,
        expected_from: ExecutionStatus,
        event_payload: Mapping[str, Any] | None = None,
        trace_context: str | None = None,
    ) -> Queued:
        """Queue ``record`` inside the caller's transaction ``tx``.

        The queue recipe (:mod:`.queue.enqueue`): ``FSMError`` unless the execution is still
        ``expected_from``, ``QueueUnavailableError`` when the queue cannot take it — either way
        nothing is left behind once the caller's transaction rolls back.
        """
        ...

    async def start_step(
        self,
        execution_id: UUID,
        step_id: str,
        *,
        worker_id: str | None,
        lease_token: UUID | None = None,
    ) -> StepRecord:
        """Mark a step of a ``running`` execution running (attempt + 1); ``FSMError`` when the
        execution is not running or the step already succeeded or was skipped,
        ``StaleLeaseError`` when ``lease_token`` no longer owns it, ``NotFoundError`` for an
        unknown step."""
        ...

    async def finish_step(
        self,
        execution_id: UUID,
        step_id: str,
        *,
        status: StepStatus,
        result: Any = None,
        error_class: str | None = None,
        error_message: str | None = None,
        lease_token: UUID | None = None,
    ) -> StepRecord:
        """Record a running step's outcome (``succeeded`` or ``failed``; ``ValueError`` for any
        other); ``FSMError`` unless the execution runs and the step is running."""
        ...

    async def end_unstarted(
        self,
        execution_id: UUID,
        *,
        expected_from: ExecutionStatus,
        by: str,
        error_class: str,
        error_message: str,
    ) -> bool:
        """End ``failed`` an execution no worker started, its idempotency key retired; False,
        changing nothing, when it is no longer ``expected_from``."""
        ...


class PostgresRedisLifecycle:
    """:class:`ExecutionLifecycle` on Postgres (the truth) and the Redis queue (dispatch)."""

    def __init__(self, pool: PoolOrConnection, queue: RedisQueue | None) -> None:
        self._pool = pool
        self._queue = queue

    @property
    def queue_configured(self) -> bool:
        return self._queue is not None

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Any]:
        async with transaction(self._pool) as conn:
            yield conn

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return self._transaction()

    async def lock_tenant_quota(self, tx: Any, tenant_id: str) -> None:
        if tx is None:
            raise RuntimeError("the quota lock is transaction-scoped: open a transaction first")
        await quota_usage.lock_tenant_quota(tx, tenant_id)

    async def waiting_jobs(self, tx: Any, tenant_id: str) -> int:
        return await quota_usage.count_waiting_jobs(tx, tenant_id)

    async def key_is_live(self, tx: Any, tenant_id: str, idempotency_key: str) -> bool:
        return await quota_usage.live_execution_exists(tx, tenant_id, idempotency_key)

    async def create(
        self, new: NewExecution, *, dedup_window: timedelta, tx: Any = None
    ) -> tuple[ExecutionRecord, bool]:
        return await create_execution(
            self._pool if tx is None else tx, new, dedup_window=dedup_window
        )

    async def create_admitted(
        self,
        new: NewExecution,
        *,
        dedup_window: timedelta,
        max_in_flight: int,
        tx: Any = None,
    ) -> tuple[ExecutionRecord, bool] | ImmediateUsage:
        return await create_immediate_execution(
            self._pool if tx is None else tx,
            new,
            dedup_window=dedup_window,
            max_in_flight=max_in_flight,
        )

    async def create_queued(
        self,
        tx: Any,
        new: NewExecution,
        policy: TimeoutPolicy,
        *,
        dedup_window: timedelta,
        max_waiting: int,
        by: str,
    ) -> CreatedQueued | WaitingUsage:
        if self._queue is None:
            raise QueueUnavailableError("no queue is configured for background execution")
        if tx is None:
            raise RuntimeError("the quota lock is transaction-scoped: open a transaction first")
        return await submit_queued(
            tx,
            self._queue,
            new,
            policy,
            dedup_window=dedup_window,
            max_waiting=max_waiting,
            by=by,
        )

    async def get(self, tenant_id: str, execution_id: UUID, *, tx: Any = None) -> ExecutionRecord:
        return await get_execution(self._pool if tx is None else tx, tenant_id, execution_id)

    async def queued_job(self, execution_id: UUID, *, tx: Any = None) -> UUID | None:
        row = await jobs.get_queue_row_for_execution(self._pool if tx is None else tx, execution_id)
        return None if row is None else row.id

    async def announce(self) -> None:
        if self._queue is not None:
            await self._queue.announce()

    async def enqueue(
        self,
        tx: Any,
        record: ExecutionRecord,
        policy: TimeoutPolicy,
        *,
        by: str,
        expected_from: ExecutionStatus,
        event_payload: Mapping[str, Any] | None = None,
        trace_context: str | None = None,
    ) -> Queued:
        if self._queue is None:
            raise QueueUnavailableError("no queue is configured for background execution")
        queued = await enqueue_execution(
            tx,
            self._queue,
            record,
            policy,
            by=by,
            expected_from=expected_from,
            event_payload=event_payload,
            trace_context=trace_context,
        )
        return Queued(queued.record, queued.job.id)

    async def start_step(
        self,
        execution_id: UUID,
        step_id: str,
        *,
        worker_id: str | None,
        lease_token: UUID | None = None,
    ) -> StepRecord:
        return await execution_steps.start_step(
            self._pool, execution_id, step_id, worker_id=worker_id, lease_token=lease_token
        )

    async def finish_step(
        self,
        execution_id: UUID,
        step_id: str,
        *,
        status: StepStatus,
        result: Any = None,
        error_class: str | None = None,
        error_message: str | None = None,
        lease_token: UUID | None = None,
    ) -> StepRecord:
        return await execution_steps.finish_step(
            self._pool,
            execution_id,
            step_id,
            status=status,
            result=result,
            error_class=error_class,
            error_message=error_message,
            lease_token=lease_token,
        )

    async def end_unstarted(
        self,
        execution_id: UUID,
        *,
        expected_from: ExecutionStatus,
        by: str,
        error_class: str,
        error_message: str,
    ) -> bool:
        return await fail_unstarted_execution(
            self._pool,
            execution_id,
            expected_from=expected_from,
            by=by,
            error_class=error_class,
            error_message=error_message,
        )
