"""The reaper's pass (``reap_once``) against the maintenance port's in-memory fake: one pass at a
time; an expired lease is requeued and announced while attempts remain, and dead-lettered (its
execution failed) on the last; an overdue execution's job leaves both stores; an expired
approval fails the execution waiting for it; Redis down leaves the Postgres work done; the
drain a wiped Redis forgot is put back before anything is re-pushed."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest

from opsconductor.common.fsm import ExecutionStatus
from opsconductor.lifecycle.approval_fake import InMemoryApprovals
from opsconductor.lifecycle.maintenance_fake import InMemoryMaintenance
from opsconductor.lifecycle.storage.locks import LockRequest
from opsconductor.worker.logic.reaper import ReaperReport, reap_once
from tests.unit.worker_world import POLICY, TENANT, World, new_execution, plan_of

WINDOW = timedelta(days=1)


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def stores(world: World) -> InMemoryMaintenance:
    return InMemoryMaintenance(world.lifecycle)


async def test_a_second_pass_is_skipped_while_one_runs(
    world: World, stores: InMemoryMaintenance
) -> None:
    async with stores.exclusive() as held:
        assert held
        assert await reap_once(stores, dedup_window=WINDOW) == ReaperReport(skipped=True)
    assert stores.gauges_published == 0  # the skipped pass did nothing
    report = await reap_once(stores, dedup_window=WINDOW)
    assert not report.skipped
    assert stores.gauges_published == 1


async def test_an_expired_lease_is_requeued_while_attempts_remain_then_dead_lettered(
    world: World, stores: InMemoryMaintenance
) -> None:
    record, job_id = await world.queued("ok")
    lifecycle = world.lifecycle
    (job,) = await lifecycle.dequeue_batch("w1", 30.0, 1)
    await lifecycle.hand_off([job], worker_id="w1")
    world.advance(31)  # its worker died
    report = await reap_once(stores, dedup_window=WINDOW)
    assert (report.leases_requeued, report.dead_lettered) == (1, 0)
    assert lifecycle.queue[job_id].state == "ready"
    assert lifecycle.executions[record.id].events.count("lease_expired") == 1
    for _ in range(2, POLICY.max_attempts):
        await lifecycle.dequeue_batch("w1", 30.0, 1)
        world.advance(31)
        assert (await reap_once(stores, dedup_window=WINDOW)).leases_requeued == 1
    # The last attempt's lease expires too: dead, then out of Redis into the DLQ.
    await lifecycle.dequeue_batch("w1", 30.0, 1)
    world.advance(31)
    report = await reap_once(stores, dedup_window=WINDOW)
    assert (report.leases_requeued, report.dead_lettered) == (0, 1)
    ended = lifecycle.executions[record.id]
    assert (ended.status, ended.error_class) == (ExecutionStatus.FAILED, "LEASE_EXPIRED")
    assert lifecycle.dlq[record.id].attempts == POLICY.max_attempts
    assert job_id not in lifecycle.queue
    assert job_id not in lifecycle.jobs


async def test_an_overdue_execution_fails_timed_out_and_its_job_leaves_both_stores(
    world: World, stores: InMemoryMaintenance
) -> None:
    record, job_id = await world.queued("ok")
    claimed = await world.lifecycle.claim(
        record.id, lease_token=uuid4(), worker_id="w1", budget=timedelta(minutes=-2)
    )
    assert claimed is not None
    report = await reap_once(stores, dedup_window=WINDOW)
    assert report.deadlines_failed == 1
    ended = world.lifecycle.executions[record.id]
    assert (ended.status, ended.timed_out) == (ExecutionStatus.FAILED, True)
    assert job_id not in world.lifecycle.jobs
    assert job_id not in world.lifecycle.queue


async def test_an_expired_approval_fails_the_execution_waiting_for_it(
    world: World, stores: InMemoryMaintenance
) -> None:
    record, _ = await world.lifecycle.create(
        replace(new_execution(plan_of("ok")), approval_level=1), dedup_window=WINDOW
    )
    await InMemoryApprovals(world.lifecycle).request(record.id, ttl=timedelta(seconds=-1), by="api")
    report = await reap_once(stores, dedup_window=WINDOW)
    assert report.approvals_expired == 1
    ended = world.lifecycle.executions[record.id]
    assert (ended.status, ended.error_class, ended.key_retired) == (
        ExecutionStatus.FAILED,
        "APPROVAL_EXPIRED",
        True,
    )


async def test_with_redis_down_the_postgres_work_is_still_done(
    world: World, stores: InMemoryMaintenance
) -> None:
    held = await world.lifecycle.acquire_locks(
        [LockRequest(TENANT, "host:one", "restart")],
        owner_token=uuid4(),
        owner_execution_id=None,
        ttl=timedelta(minutes=1),
    )
    key = held.keys[0]
    world.lifecycle.locks[key] = replace(
        world.lifecycle.locks[key], expires_at=datetime.now(UTC) - timedelta(minutes=1)
    )
    unstarted = await world.immediate("ok")
    world.lifecycle.queue_up = False
    report = await reap_once(stores, dedup_window=WINDOW, unstarted_grace=timedelta(minutes=-1))
    assert (report.locks_reaped, report.unstarted_failed, report.leases_requeued) == (1, 1, 0)
    assert world.lifecycle.executions[unstarted.id].error_class == "DISPATCH_LOST"


async def test_the_drain_a_wiped_redis_forgot_is_put_back_and_wiped_jobs_pushed_again(
    world: World, stores: InMemoryMaintenance
) -> None:
    _, job_id = await world.queued("ok")
    del world.lifecycle.queue[job_id]  # Redis restarted empty
    stores.dispatch_paused = True
    report = await reap_once(stores, dedup_window=WINDOW)
    assert report.repushed == 1
    assert stores.queue_paused
    assert world.lifecycle.queue[job_id].state == "ready"
