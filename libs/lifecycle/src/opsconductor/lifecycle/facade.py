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
it in one statement, under the tenant's quota lock), wake a consumer, and end one no worker
started; start and finish a step of a running execution. Each call delegates to the storage and
queue function that does it.

The worker's runner and consumer hold it too (the section "The worker" of each class): the Redis
lease (dequeue a batch, renew, defer), the lease handoff and claim (the batch's one statement,
the careful claim of a takeover), the run (start, steps, the cancel check, locks, end, requeue,
"end as failed") and each settle of a job (ack, retry with backoff, dead-letter, release on
shutdown, pause for a step approval) as ONE call: the Postgres row locked first, then Redis,
then the commit, so a Redis failure rolls the Postgres side back. The statements are the
storage functions' own: moving a caller onto the port adds no round trip.

The api's reads, cancel and admin hold it as well (the section "The api"): list a tenant's
executions, cancel (the request, and a job it ended taken out of the queue's row and Redis), the
dead-letter queue (list, read, count, and a requeue's lock and re-run in the caller's
transaction), the queue's gauges and its drain flag.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

import structlog

from opsconductor.common.errors import QueueUnavailableError, StaleLeaseError
from opsconductor.common.fsm import ExecutionStatus, StepStatus
from opsconductor.lifecycle.queue import dlq, handoff, jobs
from opsconductor.lifecycle.queue.dlq import DlqEntry
from opsconductor.lifecycle.queue.enqueue import enqueue_execution, submit_queued
from opsconductor.lifecycle.queue.handoff import FirstRenewal, Handoff
from opsconductor.lifecycle.queue.lease import lease_seconds, renew_after
from opsconductor.lifecycle.queue.records import LeasedJob, QueueStats
from opsconductor.lifecycle.queue.redis_queue import RedisQueue
from opsconductor.lifecycle.queue.wakeups import Wakeups
from opsconductor.lifecycle.storage import (
    cancellation,
    execution_failures,
    execution_leases,
    execution_steps,
    executions,
    locks,
)
from opsconductor.lifecycle.storage.approvals import request_step_approval
from opsconductor.lifecycle.storage.cancellation import CancelSignals
from opsconductor.lifecycle.storage.events import append_event
from opsconductor.lifecycle.storage.execution_leases import fail_unstarted_execution
from opsconductor.lifecycle.storage.execution_reads import (
    as_execution_id,
    find_execution,
    get_execution,
    list_executions,
)
from opsconductor.lifecycle.storage.execution_records import (
    ExecutionRecord,
    PoolOrConnection,
    StepRecord,
    transaction,
)
from opsconductor.lifecycle.storage.executions import (
    CancelInitiator,
    CreatedQueued,
    NewExecution,
    create_execution,
    create_immediate_execution,
)
from opsconductor.lifecycle.storage.locks import LockRequest, LockSet, sorted_requests
from opsconductor.lifecycle.storage.policies import TimeoutPolicy
from opsconductor.lifecycle.storage.quota_usage import ImmediateUsage, WaitingUsage

# Besides the port, what its callers take from the core (records, the pure lease rules, the
# cancel and wake-up listeners), so that the worker's runner and consumer import no storage or
# queue module themselves (an import-linter contract in pyproject.toml).
__all__ = [
    "DLQ_REQUEUED_EVENT",
    "CancelInitiator",
    "CancelSignals",
    "CreatedQueued",
    "DeadLetter",
    "DlqEntry",
    "ExecutionLifecycle",
    "ExecutionRecord",
    "FirstRenewal",
    "Handoff",
    "LeasedJob",
    "LockRequest",
    "LockSet",
    "NewExecution",
    "PoolOrConnection",
    "PostgresRedisLifecycle",
    "QueueStats",
    "Queued",
    "StepRecord",
    "TimeoutPolicy",
    "WaitingUsage",
    "Wakeups",
    "as_execution_id",
    "lease_seconds",
    "renew_after",
    "sorted_requests",
]

log = structlog.get_logger(__name__)

#: Type of the event a DLQ requeue appends to the new execution (it names the old one).
DLQ_REQUEUED_EVENT = "dlq_requeued"


@dataclass(frozen=True)
class Queued:
    """A queued execution: its row as the transition to ``queued`` wrote it, and its job."""

    record: ExecutionRecord
    job_id: UUID


@dataclass(frozen=True)
class DeadLetter:
    """The job to dead-letter with an execution's final failure, and why it failed."""

    job: LeasedJob
    error_class: str | None
    error_message: str | None


class ExecutionLifecycle(Protocol):
    """The lifecycle operations service logic calls (the core owns every store behind them)."""

    @property
    def queue_configured(self) -> bool:
        """Whether background work can be queued at all (a Redis queue is configured)."""
        ...

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """A transaction to pass as ``tx``: everything done in it is undone if it raises."""
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

    # --- The api: reads, cancel, the dead-letter queue, queue stats and drain ---------------
    # (issue 10 Build 1). The api's ExecutionQueries and AdminOperations hold the port for these;
    # each is the storage/queue function the api called itself before, same statements.

    async def list_executions(
        self,
        tenant_id: str,
        *,
        statuses: Collection[ExecutionStatus],
        mode: str | None,
        page_size: int,
        page_token: str | None,
    ) -> tuple[list[ExecutionRecord], str | None]:
        """One page of the tenant's executions (without steps), newest first, and the next
        page's token (None: last page). Page size 0 is the default (50), capped at 200; a bad
        status, mode, negative size or a token of another listing: ``InvalidPageRequestError``."""
        ...

    async def cancel(
        self,
        tenant_id: str,
        execution_id: UUID,
        *,
        by: str,
        reason: str | None,
        initiator: CancelInitiator,
    ) -> ExecutionRecord:
        """A user's (or automation's) cancel: :meth:`request_cancel` (idempotent; a terminal
        execution is returned unchanged), and a job it ended ``cancelled`` at once leaves the
        queue — its row, then its Redis entry (best effort: a worker that still dequeues it finds
        it terminal). A job a worker has leased stays: its worker ends the run."""
        ...

    async def dead_letters(
        self,
        *,
        tenant_id: str | None,
        error_class: str | None,
        page_size: int,
        page_token: str | None,
    ) -> tuple[list[DlqEntry], str | None]:
        """One page of open DLQ entries (of one tenant / error class when given), newest
        first, and the next page's token; ``InvalidPageRequestError`` as for listings."""
        ...

    async def dead_letter_entry(self, dlq_id: UUID, *, tenant_id: str | None) -> DlqEntry:
        """One DLQ entry; ``NotFoundError`` if absent or (``tenant_id`` given) another tenant's."""
        ...

    async def open_dead_letters(self) -> int:
        """How many DLQ entries are open (not requeued)."""
        ...

    async def lock_dead_letter(self, tx: Any, dlq_id: UUID, *, tenant_id: str | None) -> DlqEntry:
        """Lock an open DLQ entry for the rest of ``tx``; ``NotFoundError`` (absent or another
        tenant's), ``DlqEntryRequeuedError`` once requeued (naming by whom and as what)."""
        ...

    async def requeue_dead_letter(
        self,
        tx: Any,
        entry: DlqEntry,
        record: ExecutionRecord,
        policy: TimeoutPolicy,
        *,
        by: str,
        event_payload: Mapping[str, Any],
    ) -> tuple[Queued, DlqEntry]:
        """Queue ``record`` (a new ``pending`` execution re-running ``entry``'s) inside ``tx`` by
        the queue recipe, with a ``dlq_requeued`` event (``event_payload`` plus the ``job_id``)
        and the entry marked requeued by ``by`` before the move to ``queued``; the marked entry.
        ``QueueUnavailableError`` when the queue cannot take it (rolled back with ``tx``)."""
        ...

    async def queue_stats(self) -> QueueStats:
        """The queue's gauges (ready per priority, leased, delayed, dead, oldest wait, paused);
        ``QueueUnavailableError`` when no queue is configured or it cannot be reached."""
        ...

    async def set_dispatch_paused(self, paused: bool) -> None:
        """Drain (True) or resume dispatch in the queue (workers obey it); call it last in the
        transaction that records the flag, so a failure rolls the flag back."""
        ...

    # --- The worker: Redis lease, handoff and claim, runs, steps, locks, settle -------------
    # (issue 10 Build 1). Each call is one storage/queue function, or one transaction where
    # an outcome spans Postgres and Redis (row locked first, then Redis, then the commit: a
    # Redis failure rolls the Postgres side back and the lease simply expires).

    async def dequeue_batch(self, worker_id: str, lease_s: float, count: int) -> list[LeasedJob]:
        """Lease up to ``count`` ready jobs to ``worker_id`` for ``lease_s`` (fewer, none, when
        fewer are ready); ``QueueUnavailableError`` when the queue cannot be reached."""
        ...

    async def renew_lease(self, job: LeasedJob, lease_s: float) -> float:
        """Extend ``job``'s Redis lease to now + ``lease_s``; the new deadline (epoch s).
        ``StaleLeaseError`` once its token lost the job, ``LeaseRenewalLimitError`` past the
        policy's renewals."""
        ...

    async def record_renewal(
        self, job: LeasedJob, *, lease_expires_at: datetime, lease_renewals: int
    ) -> bool:
        """Mirror a renewal in Postgres (queue row and execution), fenced on the lease token;
        False when the token no longer holds the row."""
        ...

    async def defer(self, job: LeasedJob, delay_s: float) -> None:
        """Give a lease back without spending an attempt, the job ready again after
        ``delay_s`` (its row was not visible yet); ``StaleLeaseError`` once the token lost it."""
        ...

    async def hand_off(
        self,
        batch: Sequence[LeasedJob],
        *,
        worker_id: str,
        first_renewal: FirstRenewal | None = None,
    ) -> list[Handoff]:
        """Lease handoff and claim of a batch in one statement (:mod:`.queue.handoff`): one
        :class:`Handoff` per job, in order — not leased (no row yet: defer it; or ``settled``,
        its execution ended: only ack it in Redis), leased and claimed (a ``pending``/``queued``
        execution now ``running``, fenced by the job's token), or leased only (anything else:
        :meth:`claim` decides). With ``first_renewal`` a claimed job's immediate renewal is
        written and counted here (``Handoff.lease_s``): renew it with :meth:`renew_lease` only."""
        ...

    async def mirror_lease(self, job: LeasedJob, *, worker_id: str) -> bool:
        """The careful path's first write: the queue row leased to ``job``'s token (the token
        is the execution's fencing token from now on); False when the row is not visible."""
        ...

    async def find(self, execution_id: UUID, *, with_steps: bool = True) -> ExecutionRecord | None:
        """The execution whatever its tenant (for the service's own checks), None if absent."""
        ...

    async def claim(
        self, execution_id: UUID, *, lease_token: UUID, worker_id: str, budget: timedelta
    ) -> ExecutionRecord | None:
        """The careful claim: a running execution is taken over (its running steps back to
        pending, ``lease_taken_over``), a queued or pending one goes running; None when there
        is nothing to run (gone, terminal, waiting for an approval)."""
        ...

    async def start_run(self, record: ExecutionRecord, *, worker_id: str) -> ExecutionRecord:
        """Immediate path: ``pending`` (or approved ``awaiting_approval``) → ``running``, its
        deadline set from its budget; ``FSMError`` from any other status."""
        ...

    async def request_cancel(
        self, tenant_id: str, execution_id: UUID, *, by: str, reason: str | None
    ) -> tuple[ExecutionRecord, bool]:
        """Record a cancellation once: ``(record, newly_requested)``. One no worker holds
        (pending, queued, awaiting approval) ends ``cancelled`` at once, its steps skipped and
        its locks freed; a running one is ended by its worker at its next check."""
        ...

    async def cancel_requested(self, execution_id: UUID) -> bool:
        """The cancellation check between steps (counted in ``cancel_checks_performed``)."""
        ...

    async def start_step_unless_cancelled(
        self,
        execution_id: UUID,
        step_id: str,
        *,
        worker_id: str | None,
        lease_token: UUID | None = None,
    ) -> StepRecord | None:
        """:meth:`cancel_requested` then :meth:`start_step` in one statement; None (nothing
        started) when a cancellation was requested."""
        ...

    async def lock_and_start_step(
        self,
        execution_id: UUID,
        step_id: str,
        *,
        worker_id: str | None,
        lease_token: UUID | None,
        lock: LockRequest,
        owner_token: UUID,
        ttl: timedelta,
    ) -> tuple[LockSet, StepRecord | None]:
        """A run's one lock (on behalf of ``execution_id``, as :meth:`acquire_locks` takes it),
        then :meth:`start_step_unless_cancelled`, in one statement: ``(locks, step)``, the step
        None when a cancellation was requested (the lock is held: the run's end frees it).
        ``ResourceBusyError`` when the key is held (nothing taken, checked or started),
        ``NotFoundError`` for an unknown execution (nothing taken); any other refusal of the
        start frees the lock before it propagates."""
        ...

    async def load_steps(self, execution_id: UUID) -> tuple[StepRecord, ...]:
        """The execution's steps as stored, by position."""
        ...

    async def skip_remaining_steps(
        self, execution_id: UUID, *, lease_token: UUID | None, reason: str
    ) -> list[StepRecord]:
        """Every step not started yet (pending, awaiting approval) ends ``skipped``."""
        ...

    async def finish_last_step(
        self,
        execution_id: UUID,
        step_id: str,
        *,
        result: Any,
        by: str,
        lease_token: UUID | None,
        fields: Mapping[str, Any],
        tenant_id: str,
    ) -> tuple[ExecutionRecord, StepRecord] | None:
        """The last step succeeded and so did the execution, in one write (its locks freed);
        None, nothing written, when either write would be refused."""
        ...

    async def end_run(
        self,
        execution_id: UUID,
        *,
        to: ExecutionStatus,
        by: str,
        lease_token: UUID | None,
        fields: Mapping[str, Any],
        tenant_id: str,
        dead_letter: DeadLetter | None = None,
    ) -> ExecutionRecord:
        """End a ``running`` execution ``to`` a terminal status, its locks freed, fenced on
        ``lease_token``. With ``dead_letter`` (the last attempt failed retryably), in the same
        transaction and first: its job leaves Redis and its row moves to the DLQ."""
        ...

    async def requeue(
        self,
        execution_id: UUID,
        *,
        lease_token: UUID,
        by: str,
        reason: str,
        error_class: str | None = None,
        error_message: str | None = None,
    ) -> ExecutionRecord:
        """A running execution back to ``queued`` (retry or shutdown), fenced; succeeded steps
        kept, the others pending again, the fencing token cleared."""
        ...

    async def end_failed(
        self,
        execution_id: UUID,
        *,
        by: str,
        error_class: str,
        error_message: str,
        expected_from: ExecutionStatus | None = None,
        lease_token: UUID | None = None,
        skip_reason: str | None = None,
        fail_running_steps: bool = False,
        clear_lease: bool = False,
        release_locks: bool = False,
    ) -> bool:
        """End an execution ``failed`` ("end as failed"); False, changing nothing, once it is
        terminal or not ``expected_from``. ``lease_token``: only while it owns the execution
        (``StaleLeaseError``); steps not started end skipped (with an event each when
        ``skip_reason`` is given), running ones failed with ``fail_running_steps``."""
        ...

    async def retire_key(self, execution_id: UUID, *, tx: Any = None) -> bool:
        """Give an ended execution's idempotency key up (the same plan may be submitted
        again); False for one not terminal or already retired. ``tx``: the caller's
        transaction to join (a DLQ requeue's), else its own."""
        ...

    async def acquire_locks(
        self,
        requests: Iterable[LockRequest],
        *,
        owner_token: UUID,
        owner_execution_id: UUID | None,
        ttl: timedelta,
    ) -> LockSet:
        """Every lock of ``requests``, all or nothing (``ResourceBusyError``, nothing kept).
        Not re-entrant, but the same ``owner_execution_id`` re-takes its own (a new owner)."""
        ...

    async def release_locks(self, lock_set: LockSet) -> int:
        """Free the locks its owner still holds; how many."""
        ...

    async def ack(self, job: LeasedJob, *, settled_only: bool = False) -> bool:
        """Settle ``job`` done: out of both stores (the fenced row delete, then Redis).
        ``settled_only``: when no row of this lease is left, leave Redis alone and return
        False."""
        ...

    async def ack_ended(self, job: LeasedJob) -> bool:
        """Settle ``job`` whose run ended by its lease holder's final write (:meth:`end_run`,
        :meth:`finish_last_step`: that write deleted its row, committed): the Redis ack alone.
        False when the token no longer holds it in Redis (its lease ended otherwise);
        ``QueueUnavailableError`` leaves it leased, and the handoff that gets it again reports
        it ``settled``."""
        ...

    async def release_on_shutdown(self, job: LeasedJob) -> bool:
        """Settle: back to the queue without spending an attempt; False when no row is left
        (the reaper or an operator settled it)."""
        ...

    async def pause_for_approval(
        self, job: LeasedJob, step_id: str, *, ttl: timedelta, by: str
    ) -> bool:
        """Settle a level-3 run stopped before ``step_id``: its step approval requested (the
        execution ``awaiting_approval``, its token cleared) and its job out of both stores,
        in one transaction; False when no row is left."""
        ...

    async def settle_retry(
        self, job: LeasedJob, *, error_class: str | None, error_message: str | None
    ) -> bool:
        """Settle a retryable failure: the attempt spent, the job ready again after its
        backoff (``2^attempts`` s), both stores; False when no row is left."""
        ...

    async def dead_letter(
        self,
        job: LeasedJob,
        *,
        error_class: str | None,
        error_message: str | None,
    ) -> bool:
        """Settle the last attempt of a retryable failure: the job leaves Redis, its row moves
        to the DLQ; False when no row is left."""
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

    # --- The api: reads, cancel, the dead-letter queue, queue stats and drain ---------------

    async def list_executions(
        self,
        tenant_id: str,
        *,
        statuses: Collection[ExecutionStatus],
        mode: str | None,
        page_size: int,
        page_token: str | None,
    ) -> tuple[list[ExecutionRecord], str | None]:
        return await list_executions(
            self._pool,
            tenant_id,
            statuses=statuses,
            mode=mode,
            page_size=page_size,
            page_token=page_token,
        )

    async def cancel(
        self,
        tenant_id: str,
        execution_id: UUID,
        *,
        by: str,
        reason: str | None,
        initiator: CancelInitiator,
    ) -> ExecutionRecord:
        record, _changed = await executions.request_cancel(
            self._pool, execution_id, tenant_id=tenant_id, by=by, reason=reason, initiator=initiator
        )
        if record.status is ExecutionStatus.CANCELLED:
            row = await jobs.get_queue_row_for_execution(self._pool, record.id)
            if row is not None and row.state != "leased":
                await jobs.delete_queue_row(self._pool, row.id)
                if self._queue is not None:
                    try:
                        await self._queue.remove(row.id)
                    except QueueUnavailableError:
                        log.warning("cancelled_job_left_in_redis", job_id=str(row.id))
        return record

    async def dead_letters(
        self,
        *,
        tenant_id: str | None,
        error_class: str | None,
        page_size: int,
        page_token: str | None,
    ) -> tuple[list[DlqEntry], str | None]:
        return await dlq.list_dlq(
            self._pool,
            tenant_id=tenant_id,
            error_class=error_class,
            page_size=page_size,
            page_token=page_token,
        )

    async def dead_letter_entry(self, dlq_id: UUID, *, tenant_id: str | None) -> DlqEntry:
        return await dlq.get_dlq_entry(self._pool, dlq_id, tenant_id=tenant_id)

    async def open_dead_letters(self) -> int:
        return await dlq.dlq_size(self._pool)

    async def lock_dead_letter(self, tx: Any, dlq_id: UUID, *, tenant_id: str | None) -> DlqEntry:
        return await dlq.lock_open_entry(tx, dlq_id, tenant_id=tenant_id)

    async def requeue_dead_letter(
        self,
        tx: Any,
        entry: DlqEntry,
        record: ExecutionRecord,
        policy: TimeoutPolicy,
        *,
        by: str,
        event_payload: Mapping[str, Any],
    ) -> tuple[Queued, DlqEntry]:
        if self._queue is None:
            raise QueueUnavailableError("no queue is configured for background execution")
        marked: list[DlqEntry] = []

        async def audit(job: jobs.QueueRow) -> None:
            # Before the transition: the new execution's log reads started, dlq_requeued, queued.
            await append_event(
                tx,
                tenant_id=record.tenant_id,
                execution_id=record.id,
                actor_id=by,
                type=DLQ_REQUEUED_EVENT,
                payload={**event_payload, "job_id": str(job.id)},
            )
            marked.append(await dlq.mark_requeued(tx, entry.id, by=by))

        # The recipe pushes to Redis last: a Redis failure rolls everything above back.
        queued = await enqueue_execution(
            tx,
            self._queue,
            record,
            policy,
            by=by,
            expected_from=ExecutionStatus.PENDING,
            before_queued=audit,
        )
        return Queued(queued.record, queued.job.id), marked[0]

    async def queue_stats(self) -> QueueStats:
        return await self._worker_queue().stats()

    async def set_dispatch_paused(self, paused: bool) -> None:
        await self._worker_queue().set_paused(paused)

    # --- The worker: Redis lease, handoff and claim, runs, steps, locks, settle -------------

    def _worker_queue(self) -> RedisQueue:
        if self._queue is None:
            raise QueueUnavailableError("no queue is configured for background execution")
        return self._queue

    async def dequeue_batch(self, worker_id: str, lease_s: float, count: int) -> list[LeasedJob]:
        return await self._worker_queue().dequeue_batch(worker_id, lease_s, count)

    async def renew_lease(self, job: LeasedJob, lease_s: float) -> float:
        return await self._worker_queue().renew(job.job_id, job.lease_token, lease_s)

    async def record_renewal(
        self, job: LeasedJob, *, lease_expires_at: datetime, lease_renewals: int
    ) -> bool:
        return await handoff.record_renewal(
            self._pool,
            job.job_id,
            job.execution_id,
            lease_token=job.lease_token,
            lease_expires_at=lease_expires_at,
            lease_renewals=lease_renewals,
        )

    async def defer(self, job: LeasedJob, delay_s: float) -> None:
        await self._worker_queue().release(job.job_id, job.lease_token, delay_s=delay_s)

    async def hand_off(
        self,
        batch: Sequence[LeasedJob],
        *,
        worker_id: str,
        first_renewal: FirstRenewal | None = None,
    ) -> list[Handoff]:
        return await handoff.hand_off(
            self._pool, batch, worker_id=worker_id, first_renewal=first_renewal
        )

    async def mirror_lease(self, job: LeasedJob, *, worker_id: str) -> bool:
        row = await jobs.lease_row(
            self._pool,
            job.job_id,
            worker_id=worker_id,
            lease_token=job.lease_token,
            lease_expires_at=datetime.fromtimestamp(job.lease_deadline, UTC),
            attempts=job.attempts,
        )
        return row is not None

    async def find(self, execution_id: UUID, *, with_steps: bool = True) -> ExecutionRecord | None:
        return await find_execution(self._pool, execution_id, with_steps=with_steps)

    async def claim(
        self, execution_id: UUID, *, lease_token: UUID, worker_id: str, budget: timedelta
    ) -> ExecutionRecord | None:
        return await execution_leases.claim_execution(
            self._pool, execution_id, lease_token=lease_token, worker_id=worker_id, budget=budget
        )

    async def start_run(self, record: ExecutionRecord, *, worker_id: str) -> ExecutionRecord:
        return await executions.transition(
            self._pool,
            record.id,
            to=ExecutionStatus.RUNNING,
            by=worker_id,
            # An approved execution starts from awaiting_approval (checked by the caller).
            expected_from={ExecutionStatus.PENDING, ExecutionStatus.AWAITING_APPROVAL},
            worker_id=worker_id,
            fields={"deadline_at": datetime.now(UTC) + timedelta(milliseconds=record.timeout_ms)},
            tenant_id=record.tenant_id,
        )

    async def request_cancel(
        self, tenant_id: str, execution_id: UUID, *, by: str, reason: str | None
    ) -> tuple[ExecutionRecord, bool]:
        return await executions.request_cancel(
            self._pool, execution_id, tenant_id=tenant_id, by=by, reason=reason
        )

    async def cancel_requested(self, execution_id: UUID) -> bool:
        return await cancellation.check_cancelled(self._pool, execution_id)

    async def start_step_unless_cancelled(
        self,
        execution_id: UUID,
        step_id: str,
        *,
        worker_id: str | None,
        lease_token: UUID | None = None,
    ) -> StepRecord | None:
        return await execution_steps.start_step_unless_cancelled(
            self._pool, execution_id, step_id, worker_id=worker_id, lease_token=lease_token
        )

    async def lock_and_start_step(
        self,
        execution_id: UUID,
        step_id: str,
        *,
        worker_id: str | None,
        lease_token: UUID | None,
        lock: LockRequest,
        owner_token: UUID,
        ttl: timedelta,
    ) -> tuple[LockSet, StepRecord | None]:
        return await execution_steps.lock_and_start_step(
            self._pool,
            execution_id,
            step_id,
            worker_id=worker_id,
            lease_token=lease_token,
            lock=lock,
            owner_token=owner_token,
            ttl=ttl,
        )

    async def load_steps(self, execution_id: UUID) -> tuple[StepRecord, ...]:
        return await execution_steps.load_steps(self._pool, execution_id)

    async def skip_remaining_steps(
        self, execution_id: UUID, *, lease_token: UUID | None, reason: str
    ) -> list[StepRecord]:
        return await execution_steps.skip_remaining_steps(
            self._pool, execution_id, 0, lease_token=lease_token, reason=reason
        )

    async def finish_last_step(
        self,
        execution_id: UUID,
        step_id: str,
        *,
        result: Any,
        by: str,
        lease_token: UUID | None,
        fields: Mapping[str, Any],
        tenant_id: str,
    ) -> tuple[ExecutionRecord, StepRecord] | None:
        return await executions.finish_last_step(
            self._pool,
            execution_id,
            step_id,
            result=result,
            by=by,
            lease_token=lease_token,
            fields=fields,
            tenant_id=tenant_id,
        )

    async def end_run(
        self,
        execution_id: UUID,
        *,
        to: ExecutionStatus,
        by: str,
        lease_token: UUID | None,
        fields: Mapping[str, Any],
        tenant_id: str,
        dead_letter: DeadLetter | None = None,
    ) -> ExecutionRecord:
        async def move(db: PoolOrConnection) -> ExecutionRecord:
            return await executions.transition(
                db,
                execution_id,
                to=to,
                by=by,
                expected_from=ExecutionStatus.RUNNING,
                lease_token=lease_token,
                fields=fields,
                tenant_id=tenant_id,
                # The same statement frees the run's locks (held on behalf of the execution).
                release_locks=True,
            )

        if dead_letter is None:
            return await move(self._pool)  # one statement: atomic without a transaction
        # moved_to_dlq precedes execution_completed and neither exists without the other.
        async with transaction(self._pool) as conn:
            await self._dead_letter_in(
                conn, dead_letter.job, dead_letter.error_class, dead_letter.error_message
            )
            return await move(conn)

    async def requeue(
        self,
        execution_id: UUID,
        *,
        lease_token: UUID,
        by: str,
        reason: str,
        error_class: str | None = None,
        error_message: str | None = None,
    ) -> ExecutionRecord:
        return await execution_leases.requeue_execution(
            self._pool,
            execution_id,
            lease_token=lease_token,
            by=by,
            reason=reason,
            error_class=error_class,
            error_message=error_message,
        )

    async def end_failed(
        self,
        execution_id: UUID,
        *,
        by: str,
        error_class: str,
        error_message: str,
        expected_from: ExecutionStatus | None = None,
        lease_token: UUID | None = None,
        skip_reason: str | None = None,
        fail_running_steps: bool = False,
        clear_lease: bool = False,
        release_locks: bool = False,
    ) -> bool:
        return await execution_failures.end_failed(
            self._pool,
            execution_id,
            by=by,
            error_class=error_class,
            error_message=error_message,
            expected_from=expected_from,
            lease_token=lease_token,
            skip_reason=skip_reason,
            fail_running_steps=fail_running_steps,
            clear_lease=clear_lease,
            release_locks=release_locks,
        )

    async def retire_key(self, execution_id: UUID, *, tx: Any = None) -> bool:
        return await executions.retire_idempotency_key(
            self._pool if tx is None else tx, execution_id
        )

    async def acquire_locks(
        self,
        requests: Iterable[LockRequest],
        *,
        owner_token: UUID,
        owner_execution_id: UUID | None,
        ttl: timedelta,
    ) -> LockSet:
        return await locks.acquire_locks(
            self._pool,
            requests,
            owner_token=owner_token,
            owner_execution_id=owner_execution_id,
            ttl=ttl,
        )

    async def release_locks(self, lock_set: LockSet) -> int:
        return await locks.release_locks(self._pool, lock_set)

    async def _ack_in(self, conn: Any, job: LeasedJob, *, settled_only: bool) -> bool:
        """Out of both stores in ``conn``'s transaction: the fenced row delete (its lock), then
        Redis, so a Redis failure rolls the delete back."""
        deleted = await jobs.delete_queue_row(conn, job.job_id, lease_token=job.lease_token)
        if settled_only and not deleted:
            return False
        await self._worker_queue().ack(job.job_id, job.lease_token)
        return True

    async def ack(self, job: LeasedJob, *, settled_only: bool = False) -> bool:
        async with transaction(self._pool) as conn:
            return await self._ack_in(conn, job, settled_only=settled_only)

    async def ack_ended(self, job: LeasedJob) -> bool:
        try:
            await self._worker_queue().ack(job.job_id, job.lease_token)
        except StaleLeaseError:
            return False
        return True

    async def release_on_shutdown(self, job: LeasedJob) -> bool:
        async with transaction(self._pool) as conn:
            if await jobs.get_queue_row(conn, job.job_id, for_update=True) is None:
                return False
            await self._worker_queue().release(job.job_id, job.lease_token)
            await jobs.release_row(conn, job.job_id, lease_token=job.lease_token)
            return True

    async def pause_for_approval(
        self, job: LeasedJob, step_id: str, *, ttl: timedelta, by: str
    ) -> bool:
        async with transaction(self._pool) as conn:
            if await jobs.get_queue_row(conn, job.job_id, for_update=True) is None:
                return False
            await request_step_approval(
                conn, job.execution_id, step_id, lease_token=job.lease_token, ttl=ttl, by=by
            )
            await self._ack_in(conn, job, settled_only=False)
            return True

    async def settle_retry(
        self, job: LeasedJob, *, error_class: str | None, error_message: str | None
    ) -> bool:
        async with transaction(self._pool) as conn:
            if await jobs.get_queue_row(conn, job.job_id, for_update=True) is None:
                return False
            outcome = await self._worker_queue().fail(
                job.job_id, job.lease_token, error_message or "", error_class=error_class
            )
            await jobs.retry_row(
                conn,
                job.job_id,
                lease_token=job.lease_token,
                attempts=outcome.attempts,
                available_at=datetime.fromtimestamp(outcome.retry_at or 0, UTC),
                last_error=outcome.last_error,
            )
            return True

    async def dead_letter(
        self,
        job: LeasedJob,
        *,
        error_class: str | None,
        error_message: str | None,
    ) -> bool:
        async with transaction(self._pool) as conn:
            return await self._dead_letter_in(conn, job, error_class, error_message)

    async def _dead_letter_in(
        self, conn: Any, job: LeasedJob, error_class: str | None, error_message: str | None
    ) -> bool:
        """Row locked first, then Redis, then the DLQ row, in ``conn``'s transaction."""
        if await jobs.get_queue_row(conn, job.job_id, for_update=True) is None:
            return False  # the reaper or an operator already settled it
        outcome = await self._worker_queue().fail(
            job.job_id, job.lease_token, error_message or "", error_class=error_class
        )
        await dlq.move_to_dlq(
            conn,
            job.execution_id,
            attempts=outcome.attempts,
            error_class=error_class,
            error_message=error_message,
            last_error=outcome.last_error,
        )
        return True


if TYPE_CHECKING:  # mypy checks that the adapter implements the whole port, signatures included
    _PORT: type[ExecutionLifecycle] = PostgresRedisLifecycle
