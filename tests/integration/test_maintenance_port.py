"""The reaper's port (``opsconductor.lifecycle.maintenance_port``), each behaviour run against
the in-memory fake the reaper's unit tests use AND the Postgres + Redis adapter the reaper
command uses: one test body for both, so the fake cannot promise what the real stores do not.
Both worlds run the queue on one FakeClock (leases and orphan ages exact); deadlines, expiries
and the dedup window are Postgres's ``now()``, so the tests pass a grace or a ttl that is
already past instead of waiting."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from opsconductor.common.fsm import ExecutionStatus, StepStatus
from opsconductor.lifecycle.approval_fake import InMemoryApprovals
from opsconductor.lifecycle.approval_port import (
    ApprovalDecision,
    ApprovalLifecycle,
    ApprovalState,
    PostgresApprovals,
)
from opsconductor.lifecycle.facade import ExecutionLifecycle, PostgresRedisLifecycle
from opsconductor.lifecycle.fake import InMemoryLifecycle
from opsconductor.lifecycle.maintenance_fake import InMemoryMaintenance
from opsconductor.lifecycle.maintenance_port import MaintenanceLifecycle, PostgresRedisMaintenance
from opsconductor.lifecycle.queue import RedisQueue, jobs
from opsconductor.lifecycle.storage.execution_records import ExecutionRecord
from opsconductor.lifecycle.storage.flags import update_flags
from opsconductor.lifecycle.storage.locks import LockRequest
from opsconductor.lifecycle.storage.policies import TimeoutPolicy, load_timeout_policies
from tests.integration.test_lifecycle_facade import fresh_tenant, new_execution
from tests.integration.test_queue_redis import FakeClock

S = ExecutionStatus
HOUR = timedelta(hours=1)
#: A grace already past: "older than -1 min" holds for anything made now.
PAST = timedelta(minutes=-1)


@dataclass
class Reaping:
    """One implementation of the three ports over the same stores, and probes of them."""

    kind: str
    lifecycle: ExecutionLifecycle
    maintenance: MaintenanceLifecycle
    approvals: ApprovalLifecycle
    clock: FakeClock
    #: ``in_redis(job_id)``: the job's Redis state, None when not there.
    in_redis: Callable[[UUID], Any]
    #: ``has_row(job_id)``: whether its ``execution_queue`` row exists.
    has_row: Callable[[UUID], Any]
    #: ``dlq(eid)``: (attempts, error_class) of the open DLQ entry, None if none.
    dlq: Callable[[UUID], Any]
    #: ``events(eid)``: the event types written for the execution.
    events: Callable[[UUID], Any]
    #: ``expire_lock(key)``: make a held lock's lease end a minute ago.
    expire_lock: Callable[[str], Any]
    #: ``pause_flag(on)``: set the ``dispatch_paused`` flag; ``queue_paused()``: Redis's pause.
    pause_flag: Callable[[bool], Any]
    queue_paused: Callable[[], Any]
    #: ``wipe(job_id)``: Redis forgets the job (restarted empty); ``orphan(record)``: a Redis
    #: entry with no row (a submit that never committed), its job id.
    wipe: Callable[[UUID], Any]
    orphan: Callable[[ExecutionRecord, TimeoutPolicy], Any]


@pytest.fixture
async def policy(db_pool: asyncpg.Pool) -> TimeoutPolicy:
    return (await load_timeout_policies(db_pool))["fast_read"]


@pytest.fixture(params=["fake", "postgres+redis"])
async def reaping(
    request: pytest.FixtureRequest, db_pool: asyncpg.Pool, redis_url: str, redis_prefix: str
) -> Any:
    clock = FakeClock()
    if request.param == "fake":
        core = InMemoryLifecycle()
        core.clock = clock
        maintenance = InMemoryMaintenance(core)

        async def fake_in_redis(job_id: UUID) -> str | None:
            entry = core.queue.get(job_id)
            return None if entry is None else entry.state

        async def fake_has_row(job_id: UUID) -> bool:
            return job_id in core.jobs

        async def fake_dlq(eid: UUID) -> tuple[int, str | None] | None:
            entry = core.dlq.get(eid)
            return None if entry is None else (entry.attempts, entry.error_class)

        async def fake_events(eid: UUID) -> list[str]:
            return core.executions[eid].events

        async def fake_expire_lock(key: str) -> None:
            lock = core.locks[key]
            core.locks[key] = replace(lock, expires_at=datetime.now(UTC) - timedelta(minutes=1))

        async def fake_pause_flag(on: bool) -> None:
            maintenance.dispatch_paused = on

        async def fake_queue_paused() -> bool:
            return maintenance.queue_paused

        async def fake_wipe(job_id: UUID) -> None:
            del core.queue[job_id]

        async def fake_orphan(record: ExecutionRecord, policy: TimeoutPolicy) -> UUID:
            return core.push_without_row(record, policy)

        yield Reaping(
            "fake",
            core,
            maintenance,
            InMemoryApprovals(core),
            clock,
            fake_in_redis,
            fake_has_row,
            fake_dlq,
            fake_events,
            fake_expire_lock,
            fake_pause_flag,
            fake_queue_paused,
            fake_wipe,
            fake_orphan,
        )
        return
    redis = Redis.from_url(redis_url)
    queue = RedisQueue(redis, prefix=redis_prefix, clock=clock)

    async def real_in_redis(job_id: UUID) -> str | None:
        found = await queue.get(job_id)
        return None if found is None else found.state

    async def real_has_row(job_id: UUID) -> bool:
        return await jobs.get_queue_row(db_pool, job_id) is not None

    async def real_dlq(eid: UUID) -> tuple[int, str | None] | None:
        row = await db_pool.fetchrow(
            "SELECT attempts, error_class FROM execution_dlq "
            "WHERE execution_id = $1 AND requeued_at IS NULL",
            eid,
        )
        return None if row is None else (row["attempts"], row["error_class"])

    async def real_events(eid: UUID) -> list[str]:
        rows = await db_pool.fetch(
            "SELECT type FROM execution_events WHERE execution_id = $1 ORDER BY id", eid
        )
        return [row["type"] for row in rows]

    async def real_expire_lock(key: str) -> None:
        await db_pool.execute(
            "UPDATE execution_locks SET acquired_at = now() - interval '2 minutes', "
            "expires_at = now() - interval '1 minute' WHERE lock_key = $1",
            key,
        )

    async def real_pause_flag(on: bool) -> None:
        await update_flags(db_pool, {"dispatch_paused": on}, by="test")

    async def real_wipe(job_id: UUID) -> None:
        assert await queue.remove(job_id)

    async def real_orphan(record: ExecutionRecord, policy: TimeoutPolicy) -> UUID:
        job_id = uuid4()
        await queue.enqueue(
            job_id,
            record.id,
            record.tenant_id,
            record.priority,
            policy.max_attempts,
            policy.max_lease_renewals,
        )
        return job_id

    try:
        yield Reaping(
            "postgres+redis",
            PostgresRedisLifecycle(db_pool, queue),
            PostgresRedisMaintenance(db_pool, queue),
            PostgresApprovals(db_pool),
            clock,
            real_in_redis,
            real_has_row,
            real_dlq,
            real_events,
            real_expire_lock,
            real_pause_flag,
            queue.is_paused,
            real_wipe,
            real_orphan,
        )
    finally:
        await redis.aclose()


async def submitted(reaping: Reaping, policy: TimeoutPolicy) -> tuple[ExecutionRecord, UUID]:
    """A background execution created and queued (row and Redis), as a submit leaves it."""
    lifecycle = reaping.lifecycle
    async with lifecycle.transaction() as tx:
        record, _ = await lifecycle.create(
            new_execution(fresh_tenant(), mode="background"), dedup_window=HOUR, tx=tx
        )
        queued = await lifecycle.enqueue(tx, record, policy, by="api", expected_from=S.PENDING)
    return queued.record, queued.job_id


async def found(reaping: Reaping, eid: UUID) -> ExecutionRecord:
    record = await reaping.lifecycle.find(eid)
    assert record is not None
    return record


async def test_one_pass_at_a_time(reaping: Reaping) -> None:
    async with reaping.maintenance.exclusive() as first:
        assert first
        async with reaping.maintenance.exclusive() as second:
            assert not second
    async with reaping.maintenance.exclusive() as again:
        assert again  # released with the first pass


def gauge(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    assert value is not None, f"{name}{labels} is not exported"
    return value


def queue_gauges(priority: int) -> tuple[float, float, float]:
    """(ready at ``priority``, leased, delayed) as the last publish left them."""
    return (
        gauge("opsc_queue_length", priority=str(priority)),
        gauge("opsc_queue_leased_jobs"),
        gauge("opsc_queue_delayed_jobs"),
    )


async def test_published_gauges_follow_a_job_from_ready_to_leased_to_the_dlq(
    reaping: Reaping, policy: TimeoutPolicy
) -> None:
    lifecycle, maintenance = reaping.lifecycle, reaping.maintenance
    await maintenance.publish_gauges()
    # This test's own database and queue prefix (or fake): both start empty.
    assert gauge("opsc_dlq_size") == 0
    assert gauge("opsc_queue_oldest_ready_age_seconds") == 0.0
    record, job_id = await submitted(reaping, policy)
    reaping.clock.now += 7
    await maintenance.publish_gauges()
    assert queue_gauges(record.priority) == (1, 0, 0)
    assert gauge("opsc_queue_oldest_ready_age_seconds") == pytest.approx(7, abs=0.5)
    (leased,) = await lifecycle.dequeue_batch("w1", 30.0, 1)
    assert leased.job_id == job_id
    await maintenance.publish_gauges()
    assert queue_gauges(record.priority) == (0, 1, 0)
    assert gauge("opsc_queue_oldest_ready_age_seconds") == 0.0
    # Every lease expires: the job ends dead, and dead-lettered it is in the DLQ gauge.
    for attempt in range(1, policy.max_attempts + 1):
        if attempt > 1:
            (again,) = await lifecycle.dequeue_batch("w1", 30.0, 1)
            assert again.job_id == job_id
        reaping.clock.now += 31
        await maintenance.reconcile(orphan_grace_s=300)
    (dead,) = await maintenance.dead_jobs(limit=10)
    await maintenance.dead_letter_lost(dead, error_class="LEASE_EXPIRED", error_message="lost")
    await maintenance.publish_gauges()
    assert queue_gauges(record.priority) == (0, 0, 0)
    assert gauge("opsc_dlq_size") == 1
    assert gauge("opsc_lease_expirations_total") == policy.max_attempts
    assert dead.job_id == job_id


async def test_an_expired_lease_is_requeued_then_dead_on_its_last_attempt_and_dead_lettered(
    reaping: Reaping, policy: TimeoutPolicy
) -> None:
    lifecycle, maintenance = reaping.lifecycle, reaping.maintenance
    record, job_id = await submitted(reaping, policy)
    (job,) = await lifecycle.dequeue_batch("w1", 30.0, 1)
    (handed,) = await lifecycle.hand_off([job], worker_id="w1")
    assert handed.record is not None
    assert await maintenance.expired_leases() == []
    reaping.clock.now += 31  # the worker is gone
    (expiring,) = await maintenance.expired_leases()
    assert (expiring.job_id, expiring.worker_id, expiring.lease_expirations) == (job_id, "w1", 0)
    report = await maintenance.reconcile(orphan_grace_s=300)
    assert (report.maintenance.reclaimed, report.maintenance.dead, report.repushed) == (1, 0, 0)
    after = await maintenance.job(job_id)
    assert after is not None
    assert (after.state, after.attempts, after.lease_expirations) == ("ready", 1, 1)
    # Announced only while the lease's worker still runs it.
    assert not await maintenance.record_lease_expired(
        record.id, worker_id="w2", lease_expirations=1
    )
    assert await maintenance.record_lease_expired(record.id, worker_id="w1", lease_expirations=1)
    assert (await reaping.events(record.id)).count("lease_expired") == 1
    assert await maintenance.dead_jobs(limit=10) == []
    # Every later lease expires too: the last one leaves the job dead, not ready.
    for attempt in range(2, policy.max_attempts + 1):
        (again,) = await lifecycle.dequeue_batch("w1", 30.0, 1)
        assert again.job_id == job_id
        reaping.clock.now += 31
        report = await maintenance.reconcile(orphan_grace_s=300)
        last = attempt == policy.max_attempts
        assert (report.maintenance.reclaimed, report.maintenance.dead) == (
            (0, 1) if last else (1, 0)
        )
    (dead,) = await maintenance.dead_jobs(limit=10)
    assert (dead.job_id, dead.state, dead.attempts) == (job_id, "dead", policy.max_attempts)
    await maintenance.dead_letter_lost(dead, error_class="LEASE_EXPIRED", error_message="lost")
    assert await reaping.dlq(record.id) == (policy.max_attempts, "LEASE_EXPIRED")
    ended = await found(reaping, record.id)
    assert (ended.status, ended.error_class, ended.lease_token) == (S.FAILED, "LEASE_EXPIRED", None)
    assert await reaping.in_redis(job_id) is None
    assert not await reaping.has_row(job_id)
    assert await maintenance.dead_jobs(limit=10) == []


async def test_after_a_redis_wipe_rows_are_pushed_again_and_old_orphans_dropped(
    reaping: Reaping, policy: TimeoutPolicy
) -> None:
    maintenance = reaping.maintenance
    record, job_id = await submitted(reaping, policy)
    await reaping.wipe(job_id)
    orphan_of, _ = await reaping.lifecycle.create(
        new_execution(fresh_tenant(), mode="background"), dedup_window=HOUR
    )
    orphan = await reaping.orphan(orphan_of, policy)
    report = await maintenance.reconcile(orphan_grace_s=300)
    assert (report.repushed, report.dropped) == (1, 0)  # the orphan is too young to judge
    repushed = await maintenance.job(job_id)
    assert repushed is not None
    assert (repushed.state, repushed.execution_id, repushed.attempts) == ("ready", record.id, 0)
    reaping.clock.now += 301
    report = await maintenance.reconcile(orphan_grace_s=300)
    assert report.dropped == 1
    assert await reaping.in_redis(orphan) is None
    assert await reaping.has_row(job_id)
    # The drain a wiped Redis forgot: the flag is the truth.
    assert await maintenance.reapply_drain() is None
    await reaping.pause_flag(True)
    assert await maintenance.reapply_drain() is True
    assert await reaping.queue_paused()
    assert await maintenance.reapply_drain() is None
    await reaping.pause_flag(False)
    assert await maintenance.reapply_drain() is False
    assert not await reaping.queue_paused()


async def test_an_overdue_execution_ends_failed_timed_out_and_its_job_leaves_both_stores(
    reaping: Reaping, policy: TimeoutPolicy
) -> None:
    maintenance = reaping.maintenance
    record, job_id = await submitted(reaping, policy)
    on_time, _ = await submitted(reaping, policy)
    for eid, budget in ((record.id, timedelta(minutes=-2)), (on_time.id, HOUR)):
        claimed = await reaping.lifecycle.claim(
            eid, lease_token=uuid4(), worker_id="w1", budget=budget
        )
        assert claimed is not None
    assert await maintenance.fail_overdue(grace=timedelta(seconds=30)) == [record.id]
    ended = await found(reaping, record.id)
    assert (ended.status, ended.error_class, ended.timed_out, ended.lease_token) == (
        S.FAILED,
        "EXECUTION_TIMEOUT",
        True,
        None,
    )
    assert (await found(reaping, on_time.id)).status is S.RUNNING
    assert await maintenance.fail_overdue(grace=timedelta(seconds=30)) == []
    assert await maintenance.remove_job(record.id) == job_id
    assert not await reaping.has_row(job_id)
    assert await reaping.in_redis(job_id) is None
    assert await maintenance.remove_job(record.id) is None


async def test_an_expired_approval_fails_the_execution_waiting_for_it(reaping: Reaping) -> None:
    tenant = fresh_tenant()
    waiting, _ = await reaping.lifecycle.create(
        replace(new_execution(tenant, mode="background"), approval_level=1), dedup_window=HOUR
    )
    expired = await reaping.approvals.request(waiting.id, ttl=timedelta(seconds=-1), by="api")
    open_, _ = await reaping.lifecycle.create(
        replace(new_execution(tenant, mode="background"), approval_level=1), dedup_window=HOUR
    )
    still_open = await reaping.approvals.request(open_.id, ttl=HOUR, by="api")
    assert await reaping.maintenance.expire_approvals() == 1
    assert (await reaping.approvals.get(tenant, expired.id)).state is ApprovalState.EXPIRED
    ended = await found(reaping, waiting.id)
    assert (ended.status, ended.error_class) == (S.FAILED, "APPROVAL_EXPIRED")
    assert {s.status for s in ended.steps} == {StepStatus.SKIPPED}
    assert ended.idempotency_retired_at is not None  # nothing ran: it may be requested again
    assert (await reaping.approvals.get(tenant, still_open.id)).state is ApprovalState.PENDING
    assert (await found(reaping, open_.id)).status is S.AWAITING_APPROVAL
    assert await reaping.maintenance.expire_approvals() == 0


async def test_immediate_executions_no_worker_started_end_failed_dispatch_lost(
    reaping: Reaping,
) -> None:
    maintenance, lifecycle = reaping.maintenance, reaping.lifecycle
    tenant = fresh_tenant()
    unstarted, _ = await lifecycle.create(new_execution(tenant), dedup_window=HOUR)
    background, _ = await lifecycle.create(
        new_execution(tenant, mode="background"), dedup_window=HOUR
    )
    assert await maintenance.fail_unstarted(grace=HOUR) == []  # too young
    assert await maintenance.fail_unstarted(grace=PAST) == [unstarted.id]
    lost = await found(reaping, unstarted.id)
    assert (lost.status, lost.error_class) == (S.FAILED, "DISPATCH_LOST")
    assert lost.idempotency_retired_at is not None
    assert (await found(reaping, background.id)).status is S.PENDING
    # Approved, and the approvals service died before the dispatch.
    gated, _ = await lifecycle.create(
        replace(new_execution(tenant), approval_level=1), dedup_window=HOUR
    )
    approval = await reaping.approvals.request(gated.id, ttl=HOUR, by="api")
    assert await maintenance.fail_undispatched(grace=PAST) == 0  # not decided yet
    await reaping.approvals.decide(
        approval.id,
        tenant_id=tenant,
        decision=ApprovalDecision(
            approve=True, decided_by="bob", auth_method="jwt", source_ip=None
        ),
    )
    assert await maintenance.fail_undispatched(grace=HOUR) == 0
    assert await maintenance.fail_undispatched(grace=PAST) == 1
    undispatched = await found(reaping, gated.id)
    assert (undispatched.status, undispatched.error_class) == (S.FAILED, "DISPATCH_LOST")
    assert undispatched.idempotency_retired_at is not None


async def test_expired_locks_and_keys_past_the_dedup_window_go(reaping: Reaping) -> None:
    maintenance, lifecycle = reaping.maintenance, reaping.lifecycle
    tenant = fresh_tenant()
    held = await lifecycle.acquire_locks(
        [LockRequest(tenant, f"host:{name}", "noop") for name in "ab"],
        owner_token=uuid4(),
        owner_execution_id=None,
        ttl=HOUR,
    )
    await reaping.expire_lock(held.keys[0])
    assert await maintenance.reap_expired_locks() == 1
    assert await maintenance.reap_expired_locks() == 0
    assert await lifecycle.release_locks(held) == 1  # the live one was kept
    record, _ = await lifecycle.create(new_execution(tenant, mode="background"), dedup_window=HOUR)
    assert await lifecycle.end_failed(record.id, by="api", error_class="X", error_message="x")
    assert (await found(reaping, record.id)).idempotency_retired_at is None
    assert await maintenance.retire_keys(HOUR) == 0
    assert await maintenance.retire_keys(PAST) == 1
    assert (await found(reaping, record.id)).idempotency_retired_at is not None
    assert await maintenance.retire_keys(PAST) == 0
