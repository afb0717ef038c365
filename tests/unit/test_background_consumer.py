"""The worker's ``BackgroundConsumer`` (with the real runner) against the in-memory lifecycle: a
job leased, handed off, re-authorized, run and settled in both stores — success, a retry after
its backoff, the dead-letter queue on the last attempt, a cancellation, a lost lease, a shutdown,
a deferral while the submit has not committed, a permission revoked since the submit, a busy
target, a takeover of a dead worker's execution, a level-3 pause for a step approval. Each
port call the consumer makes is checked against the real Postgres + Redis core in
tests/integration/test_lifecycle_facade.py."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from datetime import timedelta
from uuid import uuid4

import pytest

from opsconductor.common.errors import QueueUnavailableError, ResourceBusyError, StaleLeaseError
from opsconductor.common.fsm import ExecutionStatus, StepStatus
from opsconductor.lifecycle.queue.lease import lease_seconds
from opsconductor.lifecycle.queue.records import LeasedJob
from opsconductor.lifecycle.storage.execution_records import ExecutionRecord
from opsconductor.lifecycle.storage.locks import LockRequest, LockSet
from opsconductor.policy.rbac import DenialReason
from opsconductor.worker.logic.approval_checks import ApprovalChecks
from opsconductor.worker.logic.consumer import DEFER_S, INITIAL_LEASE_S
from tests.unit.worker_world import TARGET, TENANT, WORKER, World, new_execution, plan_of


@pytest.fixture
def world() -> World:
    return World()


async def lease(world: World, worker_id: str = WORKER) -> LeasedJob:
    (job,) = await world.lifecycle.dequeue_batch(worker_id, INITIAL_LEASE_S, 1)
    return job


async def test_a_job_runs_to_success_and_leaves_both_stores(world: World) -> None:
    record, job_id = await world.queued("ok", "ok")
    job = await lease(world)
    assert job.job_id == job_id
    await world.consumer.process(job)
    execution = world.lifecycle.executions[record.id]
    assert execution.status is ExecutionStatus.SUCCEEDED
    assert execution.attempts == 1
    assert execution.result_summary is not None
    assert execution.result_summary["counts"] == {"succeeded": 2, "failed": 0, "skipped": 0}
    assert world.steps(record.id) == {"s1": "succeeded", "s2": "succeeded"}
    assert world.scripted.calls == ["s1", "s2"]
    # Acked: out of Redis and Postgres, its locks freed.
    assert job_id not in world.lifecycle.queue
    assert job_id not in world.lifecycle.jobs
    assert world.lifecycle.locks == {}
    assert [t[0] for t in execution.transitions] == [
        ExecutionStatus.QUEUED,
        ExecutionStatus.RUNNING,
        ExecutionStatus.SUCCEEDED,
    ]


async def test_a_failed_step_is_retried_after_its_backoff_then_dead_lettered_on_the_last_attempt(
    world: World,
) -> None:
    record, job_id = await world.queued("ok", "fail")
    for attempt in (1, 2):
        started = world.lifecycle.clock()
        await world.consumer.process(await lease(world))
        execution = world.lifecycle.executions[record.id]
        # Back in the queue with its attempt spent, ready again after 2^attempt s.
        assert execution.status is ExecutionStatus.QUEUED
        assert execution.error_class == "ACTION_FAILED"
        assert execution.lease_token is None
        entry = world.lifecycle.queue[job_id]
        assert (entry.state, entry.attempts) == ("delayed", attempt)
        assert entry.available_at == pytest.approx(started + 2**attempt, abs=0.5)
        assert entry.last_error == {"message": "the target said no", "error_class": "ACTION_FAILED"}
        row = world.lifecycle.jobs[job_id]
        assert (row.state, row.attempts, row.lease_token) == ("delayed", attempt, None)
        # The succeeded step is kept (the next run skips it), the failed one is pending again.
        assert world.steps(record.id) == {"s1": "succeeded", "s2": "pending"}
        assert await world.lifecycle.dequeue_batch(WORKER, INITIAL_LEASE_S, 1) == []
        world.advance(2**attempt)
    assert execution.events.count("retry_scheduled") == 2
    await world.consumer.process(await lease(world))
    execution = world.lifecycle.executions[record.id]
    assert execution.status is ExecutionStatus.FAILED
    assert execution.error_class == "ACTION_FAILED"
    # The last attempt: out of Redis, the row moved to the DLQ in the failure's transaction.
    assert job_id not in world.lifecycle.queue
    assert job_id not in world.lifecycle.jobs
    entry = world.lifecycle.dlq[record.id]
    assert (entry.attempts, entry.error_class) == (3, "ACTION_FAILED")
    assert execution.events[-1] == "moved_to_dlq"
    # The succeeded first step ran once; the failing one three times.
    assert world.scripted.calls == ["s1", "s2", "s2", "s2"]
    assert world.steps(record.id) == {"s1": "succeeded", "s2": "failed"}
    assert world.lifecycle.locks == {}


async def test_a_cancellation_during_a_step_skips_the_rest_and_acks_the_job(world: World) -> None:
    record, job_id = await world.queued("ok", "ok", "ok")

    async def cancel() -> None:
        await world.lifecycle.request_cancel(TENANT, record.id, by="bob", reason="changed mind")

    world.scripted.hooks["s1"] = cancel
    await world.consumer.process(await lease(world))
    execution = world.lifecycle.executions[record.id]
    assert execution.status is ExecutionStatus.CANCELLED
    assert world.scripted.calls == ["s1"]
    assert world.steps(record.id) == {"s1": "succeeded", "s2": "skipped", "s3": "skipped"}
    assert execution.cancel_checks_performed >= 1
    assert job_id not in world.lifecycle.queue
    assert job_id not in world.lifecycle.jobs
    assert world.lifecycle.locks == {}


async def test_a_job_cancelled_while_queued_is_dropped_without_running(world: World) -> None:
    record, job_id = await world.queued("ok")
    _, newly = await world.lifecycle.request_cancel(TENANT, record.id, by="bob", reason=None)
    assert newly
    assert world.lifecycle.executions[record.id].status is ExecutionStatus.CANCELLED
    await world.consumer.process(await lease(world))
    assert world.scripted.calls == []
    assert job_id not in world.lifecycle.queue
    assert job_id not in world.lifecycle.jobs


async def test_a_worker_whose_lease_was_taken_over_writes_nothing_more(world: World) -> None:
    record, job_id = await world.queued("ok", "ok")
    taken: list[LeasedJob] = []

    async def lose_the_lease() -> None:
        # This worker stalls past its lease: another one reclaims the job and takes over.
        world.advance(INITIAL_LEASE_S + 1)
        other = await lease(world, "w2")
        (handed,) = await world.lifecycle.hand_off([other], worker_id="w2")
        assert handed.leased
        assert handed.record is None  # running already: the careful path
        assert await world.lifecycle.mirror_lease(other, worker_id="w2")
        claimed = await world.lifecycle.claim(
            record.id, lease_token=other.lease_token, worker_id="w2", budget=timedelta(seconds=10)
        )
        assert claimed is not None
        taken.append(other)

    world.scripted.hooks["s1"] = lose_the_lease
    with pytest.raises(StaleLeaseError):
        await world.consumer.process(await lease(world))
    (other,) = taken
    execution = world.lifecycle.executions[record.id]
    # The new holder owns it: the old worker's step result, its second step, its settle and its
    # failure handling were all refused.
    assert execution.status is ExecutionStatus.RUNNING
    assert (execution.lease_token, execution.worker_id) == (other.lease_token, "w2")
    assert world.steps(record.id) == {"s1": "pending", "s2": "pending"}
    assert execution.events == ["lease_taken_over"]
    entry = world.lifecycle.queue[job_id]
    assert (entry.state, entry.lease_token, entry.attempts) == ("leased", other.lease_token, 1)
    assert world.lifecycle.jobs[job_id].lease_token == other.lease_token
    assert world.scripted.calls == ["s1"]


async def test_a_takeover_runs_only_what_the_dead_worker_left(world: World) -> None:
    record, job_id = await world.queued("ok", "ok")
    dead = await lease(world, "w0")
    (handed,) = await world.lifecycle.hand_off([dead], worker_id="w0")
    assert handed.record is not None
    await world.lifecycle.start_step(record.id, "s1", worker_id="w0", lease_token=dead.lease_token)
    await world.lifecycle.finish_step(
        record.id, "s1", status=StepStatus.SUCCEEDED, lease_token=dead.lease_token
    )
    await world.lifecycle.start_step(record.id, "s2", worker_id="w0", lease_token=dead.lease_token)
    # w0 dies; its lease expires and this worker gets the job (an attempt spent by the expiry).
    world.advance(INITIAL_LEASE_S + 1)
    job = await lease(world)
    assert (job.job_id, job.attempts, job.lease_expirations) == (job_id, 1, 1)
    await world.consumer.process(job)
    execution = world.lifecycle.executions[record.id]
    assert execution.status is ExecutionStatus.SUCCEEDED
    assert world.scripted.calls == ["s2"]  # the succeeded step is kept, not run again
    assert "lease_taken_over" in execution.events
    assert job_id not in world.lifecycle.queue
    assert job_id not in world.lifecycle.jobs


async def test_shutdown_between_steps_requeues_the_job_without_spending_an_attempt(
    world: World,
) -> None:
    record, job_id = await world.queued("ok", "ok")

    async def shut_down() -> None:
        await world.consumer.stop(grace_s=0)

    world.scripted.hooks["s1"] = shut_down
    await world.consumer.process(await lease(world))
    execution = world.lifecycle.executions[record.id]
    assert execution.status is ExecutionStatus.QUEUED
    assert execution.lease_token is None
    assert world.steps(record.id) == {"s1": "succeeded", "s2": "pending"}
    entry = world.lifecycle.queue[job_id]
    assert (entry.state, entry.attempts, entry.lease_token) == ("ready", 0, None)
    row = world.lifecycle.jobs[job_id]
    assert (row.state, row.lease_token) == ("ready", None)
    assert world.scripted.calls == ["s1"]
    # Ready at once, at its place in line, for the next worker (a second delivery, unspent).
    again = await lease(world, "w2")
    assert (again.job_id, again.attempts, again.deliveries) == (job_id, 0, 2)


async def test_a_job_whose_row_is_not_visible_yet_is_deferred_untouched(world: World) -> None:
    record, _ = await world.lifecycle.create(
        new_execution(plan_of("ok")), dedup_window=timedelta(hours=1)
    )
    job_id = world.lifecycle.push_without_row(record, world.policy)
    now = world.lifecycle.clock()
    await world.consumer.process(await lease(world))
    entry = world.lifecycle.queue[job_id]
    assert (entry.state, entry.attempts, entry.deliveries) == ("delayed", 0, 1)
    assert entry.available_at == now + DEFER_S
    assert world.lifecycle.executions[record.id].status is ExecutionStatus.PENDING
    assert world.scripted.calls == []


async def test_a_permission_revoked_since_the_submit_fails_the_execution_and_drops_the_job(
    world: World,
) -> None:
    record, job_id = await world.queued("ok", "ok")
    world.roles.bindings.clear()  # alice lost her role after submitting
    await world.consumer.process(await lease(world))
    execution = world.lifecycle.executions[record.id]
    assert execution.status is ExecutionStatus.FAILED
    assert execution.error_class == "PERMISSION_DENIED"
    assert world.scripted.calls == []
    assert world.steps(record.id) == {"s1": "skipped", "s2": "skipped"}
    assert world.roles.denials == [("alice", DenialReason.NO_ROLE_BINDING)]
    assert job_id not in world.lifecycle.queue
    assert job_id not in world.lifecycle.jobs


async def test_a_busy_target_puts_the_job_back_for_a_retry_with_nothing_run(world: World) -> None:
    record, job_id = await world.queued("ok")
    other = uuid4()
    await world.lifecycle.acquire_locks(
        [LockRequest(TENANT, TARGET, "scripted")],
        owner_token=uuid4(),
        owner_execution_id=other,
        ttl=timedelta(minutes=1),
    )
    await world.consumer.process(await lease(world))
    execution = world.lifecycle.executions[record.id]
    assert execution.status is ExecutionStatus.QUEUED
    assert execution.error_class == ResourceBusyError.reason
    assert world.scripted.calls == []
    entry = world.lifecycle.queue[job_id]
    assert (entry.state, entry.attempts) == ("delayed", 1)
    assert (world.lifecycle.jobs[job_id].state, world.lifecycle.jobs[job_id].attempts) == (
        "delayed",
        1,
    )
    assert record.id not in world.lifecycle.dlq
    # The other execution's lock is untouched.
    (held,) = world.lifecycle.locks.values()
    assert held.owner_execution_id == other


async def test_an_execution_timeout_fails_it_for_good_and_acks_the_job(world: World) -> None:
    record, job_id = await world.queued("ok", "hang", timeout_ms=100)
    await world.consumer.process(await lease(world))
    execution = world.lifecycle.executions[record.id]
    assert execution.status is ExecutionStatus.FAILED
    assert execution.timed_out
    assert execution.error_class == "EXECUTION_TIMEOUT"
    assert world.steps(record.id) == {"s1": "succeeded", "s2": "failed"}
    # Timeouts are final: no retry, no DLQ.
    assert job_id not in world.lifecycle.queue
    assert job_id not in world.lifecycle.jobs
    assert record.id not in world.lifecycle.dlq


async def test_a_step_over_the_policys_step_budget_times_the_execution_out_for_good() -> None:
    world = World(step_timeout_ms=50)
    record, job_id = await world.queued("hang", "ok")
    await world.consumer.process(await lease(world))
    execution = world.lifecycle.executions[record.id]
    assert execution.status is ExecutionStatus.FAILED
    assert execution.timed_out
    assert execution.error_class == "EXECUTION_TIMEOUT"
    assert world.steps(record.id) == {"s1": "failed", "s2": "skipped"}
    assert world.scripted.calls == ["s1"]
    assert job_id not in world.lifecycle.queue
    assert job_id not in world.lifecycle.jobs


async def test_the_lease_is_renewed_to_the_policys_lease_and_mirrored_in_postgres(
    world: World,
) -> None:
    """The first renewal, at once, sets the policy's lease in Redis; its Postgres mirror (queue
    row and execution counts) was written by the handoff, so it calls no record_renewal."""
    record, job_id = await world.queued("ok")
    renewed = asyncio.Event()
    renew = world.lifecycle.renew_lease
    mirrored: list[LeasedJob] = []

    async def renew_lease(job: LeasedJob, lease_s: float) -> float:
        deadline = await renew(job, lease_s)
        renewed.set()
        return deadline

    async def record_renewal(job: LeasedJob, **_kwargs: object) -> bool:
        mirrored.append(job)
        return True

    world.lifecycle.renew_lease = renew_lease  # type: ignore[method-assign]
    world.lifecycle.record_renewal = record_renewal  # type: ignore[method-assign]
    seen: list[tuple[int, int, float | None]] = []

    async def wait_for_the_renewal() -> None:
        await asyncio.wait_for(renewed.wait(), timeout=5)
        entry = world.lifecycle.queue[job_id]
        seen.append(
            (
                entry.lease_renewals,
                world.lifecycle.jobs[job_id].lease_renewals,
                entry.lease_deadline,
            )
        )

    world.scripted.hooks["s1"] = wait_for_the_renewal
    started = world.lifecycle.clock()
    await world.consumer.process(await lease(world))
    ((renewals, in_postgres, deadline),) = seen
    assert (renewals, in_postgres) == (1, 1)
    assert world.lifecycle.executions[record.id].lease_renewals == 1
    assert mirrored == []
    # The first renewal sets the policy's lease (budget plus buffer), not the initial 30 s.
    assert deadline is not None
    assert deadline - started == pytest.approx(lease_seconds(world.policy), abs=0.5)
    assert lease_seconds(world.policy) != INITIAL_LEASE_S
    assert world.lifecycle.executions[record.id].status is ExecutionStatus.SUCCEEDED


async def test_the_dispatcher_leases_batches_for_its_free_slots_and_runs_every_job(
    world: World,
) -> None:
    jobs = [await world.queued("ok") for _ in range(3)]
    ran: list[int] = []
    all_ran = asyncio.Event()

    async def count() -> None:
        ran.append(len(world.consumer._running))
        if len(ran) == len(jobs):
            all_ran.set()

    world.scripted.hooks["s1"] = count
    world.consumer.start()
    try:
        await asyncio.wait_for(all_ran.wait(), timeout=5)
    finally:
        await world.consumer.stop(grace_s=5)  # the running ones finish their (last) step
    assert max(ran) <= 2  # never more than ``concurrency`` at once
    for record, job_id in jobs:
        assert world.lifecycle.executions[record.id].status is ExecutionStatus.SUCCEEDED
        assert job_id not in world.lifecycle.queue
        assert job_id not in world.lifecycle.jobs


class StepApprovals(ApprovalChecks):
    """The worker's approval checks with the approvals store stood in for: the binding holds,
    the steps in ``approved`` are approved, and held locks are noted instead of extended."""

    def __init__(self, approved: set[str]) -> None:
        super().__init__(None, ttl=timedelta(hours=1), worker_id=WORKER)  # type: ignore[arg-type]
        self.approved = approved
        self.held: list[list[str]] = []

    async def verify(self, record: ExecutionRecord, *, background: bool) -> None:
        return None

    async def step_approved(self, record: ExecutionRecord, step_id: str) -> bool:
        return step_id in self.approved

    async def hold_locks(self, lock_set: LockSet) -> None:
        self.held.append(lock_set.keys)


async def test_a_level_3_run_pauses_before_a_step_not_approved_and_gives_the_job_up(
    world: World,
) -> None:
    approvals = world.runner.approvals = StepApprovals({"s1"})
    record, _ = await world.lifecycle.create(
        replace(new_execution(plan_of("ok", "ok")), approval_level=3),
        dedup_window=timedelta(hours=1),
    )
    async with world.lifecycle.transaction() as tx:
        job_id = (
            await world.lifecycle.enqueue(
                tx, record, world.policy, by="api", expected_from=ExecutionStatus.PENDING
            )
        ).job_id
    await world.consumer.process(await lease(world))
    execution = world.lifecycle.executions[record.id]
    assert execution.status is ExecutionStatus.AWAITING_APPROVAL
    assert execution.lease_token is None
    assert world.steps(record.id) == {"s1": "succeeded", "s2": "awaiting_approval"}
    assert world.scripted.calls == ["s1"]
    assert execution.events[-1] == "step_approval_requested"
    # The worker gave its lease up without spending an attempt; the targets stay locked.
    assert job_id not in world.lifecycle.queue
    assert job_id not in world.lifecycle.jobs
    (held,) = world.lifecycle.locks.values()
    assert held.owner_execution_id == record.id
    assert approvals.held == [[next(iter(world.lifecycle.locks))]]


async def test_a_worker_that_ends_a_run_but_cannot_ack_redis_leaves_a_settled_job_dropped_later(
    world: World,
) -> None:
    """The final transition took the row along and committed; the Redis ack fails (or the
    worker dies there). Once the lease expires the job is leased again, found settled and acked:
    nothing runs twice, nothing more is written."""
    record, job_id = await world.queued("ok")
    ack_ended = world.lifecycle.ack_ended

    async def unreachable(job: LeasedJob) -> bool:
        raise QueueUnavailableError(operation="ack", error="ConnectionError")

    world.lifecycle.ack_ended = unreachable  # type: ignore[method-assign]
    await world.consumer.process(await lease(world))
    assert world.lifecycle.executions[record.id].status is ExecutionStatus.SUCCEEDED
    assert job_id not in world.lifecycle.jobs
    assert world.lifecycle.queue[job_id].state == "leased"
    transitions = list(world.lifecycle.executions[record.id].transitions)
    world.lifecycle.ack_ended = ack_ended  # type: ignore[method-assign]
    world.advance(3600)
    again = await lease(world)
    assert again.job_id == job_id
    await world.consumer.process(again)
    assert job_id not in world.lifecycle.queue
    assert world.scripted.calls == ["s1"]
    assert world.lifecycle.executions[record.id].transitions == transitions


async def test_a_renewal_that_swallows_its_cancel_still_lets_the_job_be_acked(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first renewal is still in flight when the run ends, and the cancel sent to stop it
    is lost (a Redis call completing as the cancel lands: seen in make test, the job then never
    acked and its lease renewed on and on). The renewer stops anyway, the job is acked."""
    renew = world.lifecycle.renew_lease
    renewals = 0
    renewing = asyncio.Event()

    async def slow_renewal_deaf_to_its_cancel(job: LeasedJob, lease_s: float) -> float:
        nonlocal renewals
        renewals += 1
        renewing.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.2)
        return await renew(job, lease_s)

    monkeypatch.setattr(world.lifecycle, "renew_lease", slow_renewal_deaf_to_its_cancel)
    world.scripted.hooks["s1"] = renewing.wait  # the step ends while the renewal is in flight
    record, job_id = await world.queued("ok")
    await asyncio.wait_for(world.consumer.process(await lease(world)), 5)
    assert world.lifecycle.executions[record.id].status is ExecutionStatus.SUCCEEDED
    assert job_id not in world.lifecycle.queue
    assert renewals == 1
