"""The worker's one-statement lease handoff and claim (:mod:`opsconductor.lifecycle.queue.handoff`)
against real Postgres and Redis: several leased jobs handed off and claimed in ONE round trip
(counted on the wire), each execution running under its job's fencing token with its event in
the audit chain and its steps; what the statement must not claim (a row not visible yet, a
running execution to take over, a finished one) is reported and left untouched; the renewal
mirror in one statement, fenced.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import asyncpg
import pytest
from redis.asyncio import Redis

from opsconductor.common.errors import StaleLeaseError
from opsconductor.common.fsm import ExecutionStatus, StepStatus
from opsconductor.devstack.pg_roundtrips import RoundTripCounter
from opsconductor.lifecycle.queue import RedisQueue, handoff, jobs
from opsconductor.lifecycle.queue.lease import lease_seconds
from opsconductor.lifecycle.queue.records import LeasedJob
from opsconductor.lifecycle.storage.audit_chain import verify_chain
from opsconductor.lifecycle.storage.db import create_pool
from opsconductor.lifecycle.storage.execution_records import ExecutionRecord, transaction
from opsconductor.lifecycle.storage.executions import (
    NewExecution,
    NewStep,
    create_execution,
    request_cancel,
    transition,
)
from opsconductor.lifecycle.storage.policies import load_timeout_policies
from tests.integration.test_queue_postgres import TENANT, new_execution, submit
from tests.integration.test_queue_redis import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())


@pytest.fixture
def queue(redis_client: Redis, redis_prefix: str, clock: FakeClock) -> RedisQueue:
    return RedisQueue(redis_client, prefix=redis_prefix, clock=clock)


async def leased(queue: RedisQueue, n: int) -> list[LeasedJob]:
    out = []
    for _ in range(n):
        job = await queue.dequeue("worker-a", 30.0)
        assert job is not None
        out.append(job)
    return out


async def test_several_jobs_are_handed_off_and_claimed_in_one_round_trip(
    db_dsn: str, db_pool: asyncpg.Pool, queue: RedisQueue
) -> None:
    warm = await submit(db_pool, queue)
    rows = [await submit(db_pool, queue) for _ in range(3)]
    first, *batch = await leased(queue, 4)
    assert first.job_id == warm.id
    async with RoundTripCounter.for_dsn(db_dsn) as counter:
        pool = await create_pool(counter.dsn(db_dsn), min_size=1, max_size=1)
        try:
            # Warm: the statement prepared (and its types introspected) on the connection.
            await handoff.hand_off(pool, [first], worker_id="worker-a")
            mark = counter.mark()
            handed = await handoff.hand_off(pool, batch, worker_id="worker-a")
            seen = counter.since(mark)
        finally:
            await pool.close()
    assert len(seen) == 1, RoundTripCounter.summary(seen)
    assert [h.leased for h in handed] == [True] * 3
    assert [h.job.job_id for h in handed] == [job.job_id for job in batch]
    by_execution = {row.id: row.execution_id for row in rows}
    for h in handed:
        record = h.record
        assert record is not None
        assert record.id == by_execution[h.job.job_id]
        assert record.status is ExecutionStatus.RUNNING
        assert record.last_transition_from is ExecutionStatus.QUEUED
        assert (record.lease_token, record.worker_id, record.attempts) == (
            h.job.lease_token,
            "worker-a",
            1,
        )
        assert record.started_at is not None
        assert record.deadline_at is not None
        # fast_read's execution budget (the policy row), from the claim's clock.
        budget = await db_pool.fetchval(
            "SELECT execution_timeout_ms FROM timeout_policies WHERE id = 'fast_read'"
        )
        assert (
            abs((record.deadline_at - record.last_transition_at).total_seconds() - budget / 1000)
            < 1.0
        )
        queue_row = await jobs.get_queue_row(db_pool, h.job.job_id)
        assert queue_row is not None
        assert (queue_row.state, queue_row.lease_token, queue_row.lease_owner) == (
            "leased",
            h.job.lease_token,
            "worker-a",
        )
        events = await db_pool.fetch(
            "SELECT seq, type, payload FROM execution_events WHERE execution_id = $1 ORDER BY seq",
            record.id,
        )
        assert events[-1]["type"] == "execution_running"
        assert events[-1]["payload"] == {"status": "running", "from": "queued"}
        assert events[-1]["seq"] == record.event_seq
        assert (await verify_chain(db_pool, TENANT, record.id)).intact


async def test_the_claim_returns_the_steps_as_stored(
    db_pool: asyncpg.Pool, queue: RedisQueue
) -> None:
    async with transaction(db_pool) as conn:
        record, _ = await create_execution(
            conn,
            NewExecution(
                tenant_id=TENANT,
                actor_id="alice",
                request_id=None,
                idempotency_key=uuid4().hex,
                plan_hash="a" * 64,
                plan_snapshot={"name": "bg"},
                plan_snapshot_hash="b" * 64,
                execution_mode="background",
                sla_class="fast",
                action_class="read",
                approval_level=0,
                priority=50,
                timeout_policy_id="fast_read",
                timeout_ms=10_000,
                estimated_duration_ms=10,
                record_only=False,
                initial_status=ExecutionStatus.QUEUED,
                steps=[NewStep("two", 1, "noop", "read"), NewStep("one", 0, "noop", "read")],
            ),
            dedup_window=timedelta(hours=24),
        )
        row = await jobs.insert_queue_row(
            conn, execution_id=record.id, tenant_id=TENANT, priority=50, max_attempts=3
        )
        await queue.enqueue(row.id, record.id, TENANT, 50, 3, 1)
    # A step that succeeded on an earlier attempt comes back as such (the run skips it).
    await db_pool.execute(
        "UPDATE execution_steps SET status = 'succeeded', started_at = clock_timestamp(), "
        "ended_at = clock_timestamp(), duration_ms = 0, result = '{\"ok\": 1}' "
        "WHERE execution_id = $1 AND step_id = 'one'",
        record.id,
    )
    (handed,) = await handoff.hand_off(db_pool, await leased(queue, 1), worker_id="worker-a")
    assert handed.record is not None
    stored = await db_pool.fetch(
        "SELECT * FROM execution_steps WHERE execution_id = $1 ORDER BY position", record.id
    )
    steps = handed.record.steps
    assert [s.step_id for s in steps] == ["one", "two"]
    assert [s.status for s in steps] == [StepStatus.SUCCEEDED, StepStatus.PENDING]
    assert steps[0].result == {"ok": 1}
    for step, row in zip(steps, stored, strict=True):
        assert step.execution_id == record.id
        assert (step.created_at, step.started_at, step.ended_at) == (
            row["created_at"],
            row["started_at"],
            row["ended_at"],
        )
        assert step.idempotency_key == row["idempotency_key"]


async def test_a_job_whose_row_is_not_visible_is_reported_and_nothing_is_written(
    db_pool: asyncpg.Pool, queue: RedisQueue
) -> None:
    execution_id = await new_execution(db_pool)
    # Pushed by a submit that has not committed (here: never will).
    await queue.enqueue(uuid4(), execution_id, TENANT, 50, 3, 1)
    (handed,) = await handoff.hand_off(db_pool, await leased(queue, 1), worker_id="worker-a")
    assert (handed.leased, handed.record, handed.settled) == (False, None, False)
    status, token = await db_pool.fetchrow(
        "SELECT status, lease_token FROM executions WHERE id = $1", execution_id
    )
    assert (status, token) == ("queued", None)


async def test_a_running_or_finished_execution_is_left_to_the_careful_path(
    db_pool: asyncpg.Pool, queue: RedisQueue
) -> None:
    running, cancelled, fresh = [await submit(db_pool, queue) for _ in range(3)]
    previous = uuid4()
    await transition(
        db_pool,
        running.execution_id,
        to=ExecutionStatus.RUNNING,
        by="worker-dead",
        worker_id="worker-dead",
        fields={"lease_token": previous},
    )
    await request_cancel(db_pool, cancelled.execution_id, tenant_id=TENANT, by="bob", reason=None)
    events_before = await db_pool.fetchval("SELECT count(*) FROM execution_events")
    by_job = {
        h.job.job_id: h
        for h in await handoff.hand_off(db_pool, await leased(queue, 3), worker_id="worker-b")
    }
    assert by_job[fresh.id].record is not None
    for row in (running, cancelled):
        h = by_job[row.id]
        assert (h.leased, h.record) == (True, None)
        # The queue row mirrors the lease; the execution is not touched (no event, no token).
        queue_row = await jobs.get_queue_row(db_pool, row.id)
        assert queue_row is not None
        assert queue_row.lease_token == h.job.lease_token
    status, token, worker = await db_pool.fetchrow(
        "SELECT status, lease_token, worker_id FROM executions WHERE id = $1",
        running.execution_id,
    )
    assert (status, token, worker) == ("running", previous, "worker-dead")
    assert await db_pool.fetchval(
        "SELECT status FROM executions WHERE id = $1", cancelled.execution_id
    ) == ("cancelled")
    # Only the fresh one's execution_running.
    assert await db_pool.fetchval("SELECT count(*) FROM execution_events") == events_before + 1


async def test_the_renewal_mirror_is_fenced_on_the_lease_token(
    db_pool: asyncpg.Pool, queue: RedisQueue
) -> None:
    await submit(db_pool, queue)
    (h,) = await handoff.hand_off(db_pool, await leased(queue, 1), worker_id="worker-a")
    assert h.record is not None
    later = datetime.now(UTC) + timedelta(minutes=10)
    assert not await handoff.record_renewal(
        db_pool,
        h.job.job_id,
        h.record.id,
        lease_token=uuid4(),
        lease_expires_at=later,
        lease_renewals=1,
    )
    row = await jobs.get_queue_row(db_pool, h.job.job_id)
    assert row is not None
    assert row.lease_renewals == 0
    assert (
        await db_pool.fetchval("SELECT lease_renewals FROM executions WHERE id = $1", h.record.id)
        == 0
    )
    assert await handoff.record_renewal(
        db_pool,
        h.job.job_id,
        h.record.id,
        lease_token=h.job.lease_token,
        lease_expires_at=later,
        lease_renewals=1,
    )
    row = await jobs.get_queue_row(db_pool, h.job.job_id)
    assert row is not None
    assert (row.lease_renewals, row.lease_expires_at) == (1, later)
    assert (
        await db_pool.fetchval("SELECT lease_renewals FROM executions WHERE id = $1", h.record.id)
        == 1
    )


async def succeed(db: asyncpg.Pool, execution_id: UUID, lease_token: UUID) -> ExecutionRecord:
    """The lease holder's final transition of a claimed execution (as the runner makes it)."""
    return await transition(
        db,
        execution_id,
        to=ExecutionStatus.SUCCEEDED,
        by="worker-a",
        expected_from=ExecutionStatus.RUNNING,
        lease_token=lease_token,
        tenant_id=TENANT,
    )


async def test_the_first_renewal_is_written_by_the_handoff(
    db_pool: asyncpg.Pool, queue: RedisQueue
) -> None:
    """With a FirstRenewal the claim writes the lease the worker's immediate renewal sets (the
    policy's, as lease_seconds computes it; an override instead) and counts that renewal on the
    queue row and the execution; a job with no renewal left gets neither."""
    policy = (await load_timeout_policies(db_pool))["fast_read"]
    terms = handoff.FirstRenewal(override_s=None, default_s=30.0)
    await submit(db_pool, queue)
    (h,) = await handoff.hand_off(
        db_pool, await leased(queue, 1), worker_id="worker-a", first_renewal=terms
    )
    assert h.record is not None
    assert h.lease_s == lease_seconds(policy)
    assert h.record.lease_renewals == 1
    row = await jobs.get_queue_row(db_pool, h.job.job_id)
    assert row is not None
    assert row.lease_renewals == 1
    assert row.lease_expires_at is not None
    expected = h.record.last_transition_at + timedelta(seconds=lease_seconds(policy))
    assert abs((row.lease_expires_at - expected).total_seconds()) < 1.0
    # The renewal then touches Redis only, with the same lease.
    deadline = await queue.renew(h.job.job_id, h.job.lease_token, h.lease_s)
    assert deadline == pytest.approx(queue.now() + lease_seconds(policy), abs=0.01)

    await submit(db_pool, queue)
    (h,) = await handoff.hand_off(
        db_pool,
        await leased(queue, 1),
        worker_id="worker-a",
        first_renewal=handoff.FirstRenewal(override_s=2.5, default_s=30.0),
    )
    assert h.lease_s == 2.5

    # No renewal left (Redis would refuse it): the dequeue's lease, nothing counted.
    async with transaction(db_pool) as conn:
        execution_id = await new_execution(conn)
        queued = await jobs.insert_queue_row(
            conn, execution_id=execution_id, tenant_id=TENANT, priority=50, max_attempts=3
        )
        await queue.enqueue(queued.id, execution_id, TENANT, 50, 3, 0)
    (job,) = await leased(queue, 1)
    (h,) = await handoff.hand_off(db_pool, [job], worker_id="worker-a", first_renewal=terms)
    assert h.record is not None
    assert (h.lease_s, h.record.lease_renewals) == (None, 0)
    row = await jobs.get_queue_row(db_pool, job.job_id)
    assert row is not None
    assert (row.lease_renewals, row.lease_expires_at) == (
        0,
        datetime.fromtimestamp(job.lease_deadline, UTC),
    )


async def test_the_lease_holders_final_transition_deletes_its_queue_row(
    db_pool: asyncpg.Pool, queue: RedisQueue
) -> None:
    """The terminal move fenced on the lease token deletes the job's row in its own statement;
    a stale token changes nothing, the row included."""
    await submit(db_pool, queue)
    (h,) = await handoff.hand_off(db_pool, await leased(queue, 1), worker_id="worker-a")
    assert h.record is not None
    with pytest.raises(StaleLeaseError):
        await succeed(db_pool, h.record.id, uuid4())
    assert await jobs.get_queue_row(db_pool, h.job.job_id) is not None
    ended = await succeed(db_pool, h.record.id, h.job.lease_token)
    assert ended.status is ExecutionStatus.SUCCEEDED
    assert await jobs.get_queue_row(db_pool, h.job.job_id) is None


async def test_a_queue_row_locked_by_another_is_left_to_it_without_waiting(
    db_pool: asyncpg.Pool, queue: RedisQueue
) -> None:
    """A row someone else holds locked (a takeover's handoff, the reaper re-pushing it) is not
    waited for by the final transition (that could deadlock): the move commits, the row stays
    for the worker that dequeues it next."""
    await submit(db_pool, queue)
    (h,) = await handoff.hand_off(db_pool, await leased(queue, 1), worker_id="worker-a")
    assert h.record is not None
    async with db_pool.acquire() as other, other.transaction():
        await other.execute("SELECT 1 FROM execution_queue WHERE id = $1 FOR UPDATE", h.job.job_id)
        ended = await asyncio.wait_for(
            succeed(db_pool, h.record.id, h.job.lease_token),
            timeout=5.0,
        )
    assert ended.status is ExecutionStatus.SUCCEEDED
    assert await jobs.get_queue_row(db_pool, h.job.job_id) is not None


async def test_a_settled_job_left_in_redis_is_reported_settled_and_nothing_is_written(
    db_pool: asyncpg.Pool, queue: RedisQueue, clock: FakeClock
) -> None:
    """Its holder committed the end (row deleted) and died before the Redis ack: once the lease
    expires the job is dequeued again, and the handoff finds no row and an ended execution."""
    await submit(db_pool, queue)
    (h,) = await handoff.hand_off(db_pool, await leased(queue, 1), worker_id="worker-a")
    assert h.record is not None
    await succeed(db_pool, h.record.id, h.job.lease_token)
    events = await db_pool.fetchval(
        "SELECT count(*) FROM execution_events WHERE execution_id = $1", h.record.id
    )
    clock.now += 3600
    (again,) = await leased(queue, 1)
    assert again.job_id == h.job.job_id
    (settled,) = await handoff.hand_off(db_pool, [again], worker_id="worker-b")
    assert (settled.leased, settled.settled, settled.record) == (False, True, None)
    status, worker, seen = await db_pool.fetchrow(
        "SELECT status, worker_id, (SELECT count(*) FROM execution_events WHERE execution_id = $1)"
        " FROM executions WHERE id = $1",
        h.record.id,
    )
    assert (status, worker, seen) == ("succeeded", "worker-a", events)
