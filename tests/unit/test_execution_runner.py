"""The worker's ``ExecutionRunner`` against the in-memory lifecycle, on the immediate path
(``run``) and as the consumer calls it (``execute`` with a lease token): its steps in order, its
locks taken and always freed, the policy's budgets, cancellation between steps, a busy target, a
failed or crashing step, a stored plan that no longer parses and a lease lost mid-run. The port
calls it makes are checked against the real Postgres + Redis core in
tests/integration/test_lifecycle_facade.py."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta
from uuid import uuid4

import pytest

from opsconductor.common.errors import (
    ExecutionTimeoutError,
    FSMError,
    PlanValidationError,
    ResourceBusyError,
    StaleLeaseError,
)
from opsconductor.common.fsm import ExecutionStatus
from opsconductor.lifecycle.storage.locks import LockRequest
from opsconductor.worker.logic.consumer import INITIAL_LEASE_S
from tests.unit.worker_world import TARGET, TENANT, WORKER, World, new_execution, plan_of


@pytest.fixture
def world() -> World:
    return World()


async def test_an_immediate_run_starts_runs_every_step_and_ends_succeeded(world: World) -> None:
    record = await world.immediate("ok", "ok")
    final = await world.runner.run(record)
    assert final.status is ExecutionStatus.SUCCEEDED
    assert [(s.step_id, s.status.value) for s in final.steps] == [
        ("s1", "succeeded"),
        ("s2", "succeeded"),
    ]
    assert final.steps[1].result == {"ok": True, "step": "s2"}
    execution = world.lifecycle.executions[record.id]
    assert execution.worker_id == WORKER
    assert execution.started_at is not None
    assert execution.deadline_at is not None
    assert execution.result_summary is not None
    assert execution.result_summary["steps"] == {"s1": "succeeded", "s2": "succeeded"}
    assert world.scripted.calls == ["s1", "s2"]
    assert world.lifecycle.locks == {}  # freed by the final transition
    # Two steps, one cancellation check before each (with the start, one statement).
    assert execution.cancel_checks_performed == 2


async def test_an_execution_already_started_is_not_run_twice(world: World) -> None:
    record = await world.immediate("ok")
    await world.runner.run(record)
    with pytest.raises(FSMError):
        await world.runner.run(record)
    assert world.scripted.calls == ["s1"]


async def test_a_failed_step_fails_the_execution_and_skips_the_rest(world: World) -> None:
    record = await world.immediate("fail", "ok")
    final = await world.runner.run(record)
    assert final.status is ExecutionStatus.FAILED
    assert (final.error_class, final.error_message) == ("ACTION_FAILED", "the target said no")
    assert world.steps(record.id) == {"s1": "failed", "s2": "skipped"}
    assert world.scripted.calls == ["s1"]
    assert world.lifecycle.locks == {}


async def test_a_crashing_handler_fails_its_step_with_the_bugs_class(world: World) -> None:
    record = await world.immediate("crash")
    final = await world.runner.run(record)
    assert final.status is ExecutionStatus.FAILED
    assert final.error_class == "RuntimeError"
    assert world.steps(record.id) == {"s1": "failed"}


async def test_a_busy_target_fails_it_unrun_and_frees_its_key_for_a_resubmit(world: World) -> None:
    holder = uuid4()
    await world.lifecycle.acquire_locks(
        [LockRequest(TENANT, TARGET, "scripted")],
        owner_token=uuid4(),
        owner_execution_id=holder,
        ttl=timedelta(minutes=1),
    )
    record = await world.immediate("ok")
    with pytest.raises(ResourceBusyError) as busy:
        await world.runner.run(record)
    assert busy.value.details["held_by_execution_id"] == str(holder)
    execution = world.lifecycle.executions[record.id]
    assert execution.status is ExecutionStatus.FAILED
    assert execution.error_class == ResourceBusyError.reason
    assert execution.key_retired  # the same plan may be submitted again
    assert world.scripted.calls == []
    assert world.steps(record.id) == {"s1": "skipped"}
    (held,) = world.lifecycle.locks.values()
    assert held.owner_execution_id == holder  # never another's lock


async def test_the_execution_budget_stops_a_hanging_step_and_times_it_out(world: World) -> None:
    record = await world.immediate("ok", "hang", "ok", timeout_ms=100)
    with pytest.raises(ExecutionTimeoutError):
        await world.runner.run(record)
    execution = world.lifecycle.executions[record.id]
    assert execution.status is ExecutionStatus.FAILED
    assert execution.timed_out
    assert world.steps(record.id) == {"s1": "succeeded", "s2": "failed", "s3": "skipped"}
    assert world.lifecycle.records[record.id].steps[1].error_class == "EXECUTION_TIMEOUT"
    assert world.scripted.calls == ["s1", "s2"]
    assert world.lifecycle.locks == {}


async def test_a_cancellation_between_steps_ends_it_cancelled(world: World) -> None:
    record = await world.immediate("ok", "ok")

    async def cancel() -> None:
        await world.lifecycle.request_cancel(TENANT, record.id, by="bob", reason=None)

    world.scripted.hooks["s1"] = cancel
    final = await world.runner.run(record)
    assert final.status is ExecutionStatus.CANCELLED
    assert world.steps(record.id) == {"s1": "succeeded", "s2": "skipped"}
    assert world.scripted.calls == ["s1"]
    assert world.lifecycle.locks == {}


async def test_a_stored_plan_that_no_longer_parses_fails_the_execution_at_once(
    world: World,
) -> None:
    record = await world.immediate("ok")
    started = await world.lifecycle.start_run(record, worker_id=WORKER)
    broken = replace(started, plan_snapshot={"plan": {"name": "x", "steps": "not a list"}})
    with pytest.raises(PlanValidationError):
        await world.runner.execute(broken, lease_token=None, retry_allowed=False)
    execution = world.lifecycle.executions[record.id]
    # Never left running for the reaper to call a timeout: failed with the true class.
    assert execution.status is ExecutionStatus.FAILED
    assert execution.error_class == PlanValidationError.reason
    assert execution.lease_token is None
    assert world.scripted.calls == []


async def test_with_a_lease_a_retryable_failure_requeues_and_a_lost_lease_writes_nothing(
    world: World,
) -> None:
    record, job_id = await world.queued("fail")
    (job,) = await world.lifecycle.dequeue_batch(WORKER, INITIAL_LEASE_S, 1)
    (handed,) = await world.lifecycle.hand_off([job], worker_id=WORKER)
    assert handed.record is not None
    result = await world.runner.execute(
        handed.record, lease_token=job.lease_token, retry_allowed=True
    )
    assert result.retried
    assert result.retryable
    assert result.record.status is ExecutionStatus.QUEUED
    assert world.lifecycle.executions[record.id].lease_token is None
    # The token is cleared: the same run's token can write nothing more.
    with pytest.raises(StaleLeaseError):
        await world.runner.execute(handed.record, lease_token=job.lease_token, retry_allowed=True)
    assert world.lifecycle.executions[record.id].status is ExecutionStatus.QUEUED
    assert world.scripted.calls == ["s1"]
    assert job_id in world.lifecycle.jobs


async def test_a_plan_of_several_keys_takes_them_all_or_none_before_its_first_step(
    world: World,
) -> None:
    """Several keys are taken on their own, in one all-or-nothing call (one key folds into
    the first step's start): a busy second key keeps nothing of the first and runs nothing."""
    plan = plan_of("ok")
    plan["steps"][0]["targets"] = [{"ref": "host:two"}, {"ref": TARGET}]
    holder = uuid4()
    await world.lifecycle.acquire_locks(
        [LockRequest(TENANT, "host:two", "scripted")],
        owner_token=uuid4(),
        owner_execution_id=holder,
        ttl=timedelta(minutes=1),
    )
    record, _ = await world.lifecycle.create(
        new_execution(plan, mode="immediate"), dedup_window=timedelta(hours=1)
    )
    with pytest.raises(ResourceBusyError):
        await world.runner.run(record)
    assert world.scripted.calls == []
    assert world.lifecycle.executions[record.id].cancel_checks_performed == 0
    (held,) = world.lifecycle.locks.values()
    assert held.owner_execution_id == holder  # host:one was not kept
    world.lifecycle.locks.clear()
    record, _ = await world.lifecycle.create(
        new_execution(plan, mode="immediate"), dedup_window=timedelta(hours=1)
    )
    final = await world.runner.run(record)
    assert final.status is ExecutionStatus.SUCCEEDED
    assert world.lifecycle.locks == {}


@pytest.mark.parametrize("busy", [False, True])
async def test_a_shutdown_before_the_first_step_still_takes_the_locks_first(
    world: World, busy: bool
) -> None:
    """Stopping before the first step (nothing to fold the lock into): the lock is taken on its
    own first, so a busy target still ends the run as busy (a spent attempt); a free one is
    given back unspent, its lock freed."""
    if busy:
        await world.lifecycle.acquire_locks(
            [LockRequest(TENANT, TARGET, "scripted")],
            owner_token=uuid4(),
            owner_execution_id=uuid4(),
            ttl=timedelta(minutes=1),
        )
    await world.queued("ok")
    (job,) = await world.lifecycle.dequeue_batch(WORKER, INITIAL_LEASE_S, 1)
    (handed,) = await world.lifecycle.hand_off([job], worker_id=WORKER)
    assert handed.record is not None
    stop = asyncio.Event()
    stop.set()
    result = await world.runner.execute(
        handed.record, lease_token=job.lease_token, retry_allowed=True, stop_event=stop
    )
    assert world.scripted.calls == []
    assert result.record.status is ExecutionStatus.QUEUED
    assert (result.busy is not None, result.interrupted, result.retried) == (busy, not busy, busy)
    assert len(world.lifecycle.locks) == (1 if busy else 0)  # only the other holder's
