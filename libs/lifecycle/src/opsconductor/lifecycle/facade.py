"""The execution lifecycle as service logic sees it: a port, its Postgres + Redis adapter, and
(:mod:`.fake`) an in-memory stand-in for unit tests — procrastinate's ``JobManager`` over a
connector, in miniature.

Service logic holds an :class:`ExecutionLifecycle` instead of a pool and a queue, so its unit
tests run against :class:`~opsconductor.lifecycle.fake.InMemoryLifecycle`; every behaviour the
fake has is also checked against this adapter on real Postgres and Redis
(``tests/integration/test_lifecycle_facade.py``, one test body for both). It covers what the
approvals service's dispatcher needs so far: queue an execution inside the caller's transaction,
and end one no worker started.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol
from uuid import UUID

from opsconductor.common.errors import QueueUnavailableError
from opsconductor.common.fsm import ExecutionStatus
from opsconductor.lifecycle.queue.enqueue import enqueue_execution
from opsconductor.lifecycle.queue.redis_queue import RedisQueue
from opsconductor.lifecycle.storage.execution_leases import fail_unstarted_execution
from opsconductor.lifecycle.storage.execution_records import ExecutionRecord, PoolOrConnection
from opsconductor.lifecycle.storage.policies import TimeoutPolicy

__all__ = ["ExecutionLifecycle", "PostgresRedisLifecycle"]


class ExecutionLifecycle(Protocol):
    """The lifecycle operations service logic calls (the core owns every store behind them)."""

    @property
    def queue_configured(self) -> bool:
        """Whether background work can be queued at all (a Redis queue is configured)."""
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
    ) -> UUID:
        """Queue ``record`` inside the caller's transaction ``tx``; returns the job id.

        The queue recipe (:mod:`.queue.enqueue`): ``FSMError`` unless the execution is still
        ``expected_from``, ``QueueUnavailableError`` when the queue cannot take it — either way
        nothing is left behind once the caller's transaction rolls back.
        """
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
    ) -> UUID:
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
        return queued.job.id

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
