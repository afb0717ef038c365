"""The background path on the worker side: take jobs from the queue and run them, safely.

One dispatcher leases as many jobs as there are free slots (``concurrency``) in one Lua call
(:meth:`RedisQueue.dequeue_batch`: exactly what as many single dequeues would lease — priority,
fair share, running limits), hands the whole batch off in one statement and starts each job.
When nothing is ready it waits for an announcement of new work (push dispatch,
:mod:`opsconductor.lifecycle.queue.wakeups`), with polling only as the fallback (retries whose
backoff ended, deferred jobs, reclaimed leases, a lost pub/sub connection).

For each job, in order:

1. **Lease handoff and claim**, one statement for the batch (:func:`.handoff.hand_off`): the
   queue row mirrors the Redis lease, and a ``queued`` execution goes ``running`` with the lease
   token as its fencing token, its event and its steps. If the row is not visible yet (its
   submit has not committed) the job is deferred, not run; an execution running already (its
   worker died or was paused past its lease) is taken over on the careful path: steps it left
   running go back to pending, steps that succeeded are kept and skipped.
2. **Re-authorize** the submitter against Postgres (second RBAC tier) — never trusting the job.
3. **Run** with the shared runner, every write fenced by the lease token, the lease renewed
   at once to the policy's lease (that renewal's Postgres mirror is the handoff's) and then at
   half-life up to the policy's limit.
4. **Settle** — success or a final failure: the final transition deletes the job's row
   (fenced on the lease token) in its own statement, then Redis is acked; a worker dying in
   between leaves a Redis entry whose next holder finds it settled and only acks it. A
   retryable failure with attempts left: back to the queue
   after ``2^attempt`` s; the last attempt spent: dead-letter queue; a lost lease: walk away
   (the new holder owns every write); SIGTERM: requeue without spending an attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from opsconductor.common.auth import Principal
from opsconductor.common.errors import (
    LeaseRenewalLimitError,
    PermissionDeniedError,
    QueueUnavailableError,
    StaleLeaseError,
)
from opsconductor.common.fsm import ExecutionStatus
from opsconductor.common.tracing import context_from_traceparent, tracer
from opsconductor.lifecycle.execution_logging import bind_execution
from opsconductor.lifecycle.facade import (
    ExecutionLifecycle,
    ExecutionRecord,
    FirstRenewal,
    Handoff,
    LeasedJob,
    TimeoutPolicy,
    Wakeups,
    lease_seconds,
    renew_after,
)
from opsconductor.policy.rbac import Authorizer, submit_permissions

from . import metrics
from .runner import ExecutionRunner, RunResult

log = structlog.get_logger(__name__)

#: Until the lease handoff, a job is held this long; the handoff renews it to the policy's lease.
INITIAL_LEASE_S = 30.0
#: A job whose Postgres row is not visible yet is retried after this delay.
#: The api pushes to Redis just before it commits, so the row is usually visible a few ms later:
#: start short and double per delivery, up to DEFER_MAX_S.
DEFER_S = 0.02
DEFER_MAX_S = 2.0
#: An idle slot polls at most this far apart (the first polls are at ``poll_interval_s``).
IDLE_MAX_S = 0.5


class BackgroundConsumer:
    """Runs up to ``concurrency`` queued jobs at a time until ``stop`` is called."""

    def __init__(
        self,
        *,
        lifecycle: ExecutionLifecycle,
        runner: ExecutionRunner,
        authorizer: Authorizer,
        policies: Mapping[str, TimeoutPolicy],
        worker_id: str,
        concurrency: int = 4,
        poll_interval_s: float = 0.1,
        lease_s_override: float | None = None,
        wakeups: Wakeups | None = None,
    ) -> None:
        """``lease_s_override`` (drills and tests only) replaces every lease duration, the
        first one at dequeue included, so a dead worker's job comes back within seconds."""
        #: Every read and write of the queue and the executions goes through the lifecycle core.
        self._lifecycle = lifecycle
        self._runner = runner
        self._authorizer = authorizer
        self._policies = policies
        self._worker_id = worker_id
        self._concurrency = concurrency
        self._poll_interval_s = poll_interval_s
        self._lease_s_override = lease_s_override
        #: Wakes an idle slot when a job is announced (None: polling only).
        self._wakeups = wakeups
        self._initial_lease_s = lease_s_override or INITIAL_LEASE_S
        #: The lease the first renewal sets, written (and counted) by the handoff itself.
        self._renewal = FirstRenewal(override_s=lease_s_override, default_s=INITIAL_LEASE_S)
        self._stopping = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        #: The jobs running now, at most ``concurrency``.
        self._running: set[asyncio.Task[None]] = set()
        #: Set when a running job ends (the dispatcher may lease again).
        self._slot_freed = asyncio.Event()

    def start(self) -> None:
        self._dispatcher = asyncio.create_task(self._dispatch(), name="consumer-dispatch")

    async def stop(self, grace_s: float) -> None:
        """Stop taking jobs; running ones finish their current step and are requeued."""
        self._stopping.set()
        self._slot_freed.set()
        if self._wakeups is not None:
            self._wakeups.wake_all()
        if self._dispatcher is None:
            return
        deadline = asyncio.get_running_loop().time() + grace_s
        # The dispatcher first (it starts nothing once stopping), then every job it started.
        await asyncio.wait([self._dispatcher], timeout=grace_s)
        tasks = [self._dispatcher, *self._running]
        remaining = max(deadline - asyncio.get_running_loop().time(), 0.0)
        _done, pending = await asyncio.wait(tasks, timeout=remaining)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _dispatch(self) -> None:
        """Lease as many jobs as there are free slots in one script, hand them off in one
        statement, start each; idle, wait for an announcement (push) or the poll (fallback)."""
        idle = self._poll_interval_s
        while not self._stopping.is_set():
            free = self._concurrency - len(self._running)
            if free <= 0:
                await self._slot_freed.wait()
                self._slot_freed.clear()
                continue
            try:
                batch = await self._lifecycle.dequeue_batch(
                    self._worker_id, self._initial_lease_s, free
                )
            except QueueUnavailableError:
                log.warning("queue_unavailable", worker_id=self._worker_id)
                batch = []
                idle = min(idle * 2, 5.0)
            if not batch:
                if self._wakeups is not None:
                    # Push dispatch: woken when a job is announced; the poll is the fallback.
                    await self._wakeups.wait(idle)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), idle)
                idle = min(idle * 1.5, IDLE_MAX_S)
                continue
            idle = self._poll_interval_s
            try:
                handed = await self._lifecycle.hand_off(
                    batch, worker_id=self._worker_id, first_renewal=self._renewal
                )
            except Exception:
                # Postgres trouble: the leases expire and the jobs are retried.
                log.exception("job_handoff_failed", job_ids=[str(job.job_id) for job in batch])
                continue
            for one in handed:
                task = asyncio.create_task(self._run_handed(one), name=f"job-{one.job.job_id}")
                self._running.add(task)
                task.add_done_callback(self._job_ended)

    def _job_ended(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._slot_freed.set()

    async def _run_handed(self, handed: Handoff) -> None:
        job = handed.job
        try:
            with self._job_context(job) as bound:
                await self._process(job, bound, handed)
        except StaleLeaseError:
            log.warning("lease_lost", job_id=str(job.job_id), worker_id=self._worker_id)
        except Exception:
            # One job's trouble must not stop the others; its lease expires and it is retried.
            log.exception("job_processing_failed", job_id=str(job.job_id))

    async def process(self, job: LeasedJob) -> None:
        """Run one leased job to an outcome (see the module docstring).

        Every record logged for the job once its execution is known carries the execution's
        spec §7.2 fields (:mod:`opsconductor.lifecycle.execution_logging`), the submit's request id
        and this job's queue wait included; before (a deferral), its request id and execution.
        """
        with self._job_context(job) as bound:
            (handed,) = await self._lifecycle.hand_off(
                [job], worker_id=self._worker_id, first_renewal=self._renewal
            )
            await self._process(job, bound, handed)

    @contextlib.contextmanager
    def _job_context(self, job: LeasedJob) -> Iterator[contextlib.ExitStack]:
        # Until the execution can be read (a deferral: its submit or release has not committed),
        # the job's own correlation: the submit's request id, the execution, its tenant.
        with (
            structlog.contextvars.bound_contextvars(
                **{k: v for k, v in _job_fields(job, self._worker_id).items() if v is not None}
            ),
            contextlib.ExitStack() as bound,
        ):
            yield bound

    async def _process(self, job: LeasedJob, bound: contextlib.ExitStack, handed: Handoff) -> None:
        policy, record = await self._handoff(job, bound, handed)
        if record is None:
            return
        # The submit's correlation as the job carries it; the execution's copy for a job queued
        # before jobs carried it.
        record = replace(
            record,
            request_id=job.request_id or record.request_id,
            trace_context=job.trace_context or record.trace_context,
        )
        # Continue the submit's trace: the wait in the queue, then this run with its lock wait
        # and steps (no-ops unless tracing is configured).
        parent = context_from_traceparent(record.trace_context)
        attributes = {"opsc.exec_id": str(record.id), "opsc.job_id": str(job.job_id)}
        tracer().start_span(
            "queue_wait",
            context=parent,
            start_time=int(job.enqueued_at * 1e9),
            attributes=attributes,
        ).end()
        with tracer().start_as_current_span("execution", context=parent, attributes=attributes):
            await self._run_job(job, policy, record, handed)

    async def _run_job(
        self,
        job: LeasedJob,
        policy: TimeoutPolicy | None,
        record: ExecutionRecord,
        handed: Handoff,
    ) -> None:
        if not await self._authorized(job, record):
            return
        # The lease the handoff wrote for the first renewal, if it did (then no mirror is due).
        lease_s = handed.lease_s or self._lease_s(policy)
        run_over = asyncio.Event()
        renewer = asyncio.create_task(
            self._keep_lease(job, lease_s, mirrored=handed.lease_s is not None, stop=run_over)
        )
        try:
            result = await self._runner.execute(
                record,
                lease_token=job.lease_token,
                retry_allowed=job.attempts + 1 < job.max_attempts,
                stop_event=self._stopping,
                dead_letter=job,
            )
        except Exception:
            # The runner ended the execution failed with the error's class if it could: then
            # nothing is left to run, and redelivering the job would only fail again.
            if (await self._lifecycle.get(record.tenant_id, record.id)).is_terminal:
                await self._drop(job)
            raise
        finally:
            # The event as well as the cancel: a cancel that lands as a Redis call completes
            # can be lost (redis-py connects under asyncio timeouts), and the renewer would then
            # renew forever while this waits for it — the job never acked, its lease kept alive.
            run_over.set()
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
        await self._settle(job, result)

    def _lease_s(self, policy: TimeoutPolicy | None) -> float:
        if self._lease_s_override is not None:
            return self._lease_s_override
        return lease_seconds(policy) if policy is not None else INITIAL_LEASE_S

    async def _handoff(
        self, job: LeasedJob, bound: contextlib.ExitStack, handed: Handoff
    ) -> tuple[TimeoutPolicy | None, ExecutionRecord | None]:
        if handed.settled:
            # Settled (the row went with its final transition) but never acked in Redis.
            log.info("job_already_settled", job_id=str(job.job_id))
            await self._ack_ended(job)
            return None, None
        if not handed.leased:
            # Its submit has not committed yet (or never will: the reaper drops it then).
            delay = min(DEFER_S * 2 ** max(job.deliveries - 1, 0), DEFER_MAX_S)
            await self._lifecycle.defer(job, delay)
            log.info("job_deferred", job_id=str(job.job_id), reason="row_not_visible")
            return None, None
        record = handed.record
        if record is None:
            record = await self._claim_carefully(job, bound)
            if record is None:
                # Finished, cancelled or waiting for approval meanwhile: nothing to run.
                await self._drop(job)
                return None, None
        else:
            bound.enter_context(self._bind(job, record))
        metrics.QUEUE_WAIT.labels(str(job.priority)).observe(
            max(time.time() - job.enqueued_at, 0.0)
        )
        return self._policies.get(record.timeout_policy_id or ""), record

    def _bind(
        self, job: LeasedJob, record: ExecutionRecord
    ) -> contextlib.AbstractContextManager[Any]:
        return bind_execution(
            record,
            # The submit's request id as the job carries it (the execution's for a job
            # queued before jobs carried it).
            request_id=job.request_id,
            worker_id=self._worker_id,
            queue_wait_ms=int(max(time.time() - job.enqueued_at, 0.0) * 1000),
        )

    async def _claim_carefully(
        self, job: LeasedJob, bound: contextlib.ExitStack
    ) -> ExecutionRecord | None:
        """What the one-statement handoff leaves: a takeover of a running execution, or one
        with nothing to run. The fencing token first, then the claim, each checked row-locked."""
        await self._lifecycle.mirror_lease(job, worker_id=self._worker_id)
        # One read (for the policy) also gives the log fields, bound before the claim so that
        # its records carry them too.
        queued = await self._lifecycle.find(job.execution_id, with_steps=False)
        if queued is not None:
            bound.enter_context(self._bind(job, queued))
        policy = self._policies.get((queued.timeout_policy_id if queued else None) or "")
        return await self._lifecycle.claim(
            job.execution_id,
            lease_token=job.lease_token,
            worker_id=self._worker_id,
            budget=timedelta(milliseconds=policy.execution_timeout_ms if policy else 600_000),
        )

    async def _authorized(self, job: LeasedJob, record: ExecutionRecord) -> bool:
        """Second RBAC tier: the submitter must still hold what the plan needs (from Postgres)."""
        submitter = Principal(
            actor_id=record.actor_id, tenant_id=record.tenant_id, auth_method="queued_job"
        )
        try:
            await self._authorizer.authorize(
                submitter,
                tenant_id=record.tenant_id,
                permissions=submit_permissions(record.action_class),
                execution_id=record.id,
                resource="WorkerService/background",
            )
        except PermissionDeniedError as exc:
            await self._lifecycle.end_failed(
                record.id,
                by=self._worker_id,
                error_class=exc.reason,
                error_message=exc.message,
                expected_from=ExecutionStatus.RUNNING,
                lease_token=job.lease_token,
                skip_reason="permission_denied",
                release_locks=True,
            )
            await self._drop(job)
            return False
        return True

    async def _keep_lease(
        self, job: LeasedJob, lease_s: float, *, mirrored: bool, stop: asyncio.Event
    ) -> None:
        """Renew at half-life up to the policy's limit; the first renewal sets the real lease.

        ``mirrored``: the handoff already wrote the first renewal to Postgres. ``stop``: the
        run is over; no renewal starts after it is set."""
        while True:
            if job.lease_renewals:  # the first renewal is due at once: no wait to set up
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), renew_after(lease_s))
            if stop.is_set():
                return
            try:
                deadline = await self._lifecycle.renew_lease(job, lease_s)
            except LeaseRenewalLimitError:
                log.info("lease_renewal_limit", job_id=str(job.job_id))
                return
            except (QueueUnavailableError, StaleLeaseError) as exc:
                # Fenced writes stop a worker whose lease is gone; nothing more to do here.
                log.warning("lease_renewal_failed", job_id=str(job.job_id), error=exc.reason)
                return
            job = replace(job, lease_renewals=job.lease_renewals + 1, lease_deadline=deadline)
            if mirrored:
                mirrored = False
                continue
            await self._lifecycle.record_renewal(
                job,
                lease_expires_at=datetime.fromtimestamp(deadline, UTC),
                lease_renewals=job.lease_renewals,
            )

    async def _settle(self, job: LeasedJob, result: RunResult) -> None:
        """Mirror the outcome in both stores, each settle one call of the lifecycle core (the
        Postgres row locked first, the reaper's reconcile waits on it, then Redis, then the
        commit; a Redis failure rolls the Postgres side back and the lease simply expires).
        False from the core: the reaper or an operator already settled the job."""
        if not (result.interrupted or result.paused_step is not None or result.retryable):
            # Done: succeeded, cancelled, timed out, or failed for good. The final transition
            # deleted the job's row (fenced on the lease token) and committed: Redis is left.
            await self._ack_ended(job)
            return
        if result.interrupted:
            if await self._lifecycle.release_on_shutdown(job):
                log.info("job_requeued_on_shutdown", job_id=str(job.job_id))
            return
        if result.paused_step is not None and self._runner.approvals is not None:
            # Level 3: wait for the step's approval without a lease; approving it queues the
            # execution again. One transaction: the request and the job's removal.
            if await self._lifecycle.pause_for_approval(
                job, result.paused_step, ttl=self._runner.approvals.ttl, by=self._worker_id
            ):
                log.info("job_paused_for_approval", job_id=str(job.job_id))
            return
        if result.retried:
            await self._lifecycle.settle_retry(
                job, error_class=result.error_class, error_message=result.error_message
            )
            return
        # The last attempt of a retryable failure: dead-letter it for an operator.
        await self._lifecycle.dead_letter(
            job, error_class=result.error_class, error_message=result.error_message
        )

    async def _drop(self, job: LeasedJob) -> None:
        """The job has nothing (more) to run: out of both stores."""
        await self._lifecycle.ack(job)

    async def _ack_ended(self, job: LeasedJob) -> None:
        """The Redis ack of a job whose row went with its execution's end (committed).

        Failing, the entry stays leased until its lease expires; the worker that gets it next
        finds it settled (``Handoff.settled``) and acks it then. A stale token: the lease ended
        otherwise (taken over, or the reaper removed the job)."""
        try:
            if not await self._lifecycle.ack_ended(job):
                log.info("job_already_settled", job_id=str(job.job_id))
        except QueueUnavailableError:
            log.warning("job_ack_deferred", job_id=str(job.job_id), reason="queue_unavailable")


__all__ = ["BackgroundConsumer"]


def _job_fields(job: LeasedJob, worker_id: str) -> dict[str, str | None]:
    return {
        "request_id": job.request_id,
        "exec_id": str(job.execution_id),
        "tenant_id": job.tenant_id,
        "worker_id": worker_id,
    }
