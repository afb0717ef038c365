"""The lifecycle port's behaviours, each run against the in-memory fake the unit tests use AND
the Postgres + Redis adapter the services use: one test body for both, so the fake cannot
promise what the real core does not do."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pytest
from redis.asyncio import Redis

from opsconductor.common.errors import FSMError, QueueUnavailableError
from opsconductor.common.fsm import ExecutionStatus
from opsconductor.lifecycle.facade import ExecutionLifecycle, PostgresRedisLifecycle
from opsconductor.lifecycle.fake import InMemoryLifecycle
from opsconductor.lifecycle.queue import RedisQueue, create_redis_client, jobs
from opsconductor.lifecycle.storage.execution_reads import get_execution
from opsconductor.lifecycle.storage.execution_records import ExecutionRecord, transaction
from opsconductor.lifecycle.storage.executions import NewExecution, create_execution
from opsconductor.lifecycle.storage.policies import TimeoutPolicy, load_timeout_policies

TENANT = "tenant-facade"


@dataclass(frozen=True)
class JobSeen:
    execution_id: UUID
    max_attempts: int
    max_lease_renewals: int
    request_id: str | None
    trace_context: str | None


@dataclass
class Core:
    """One implementation of the port plus the probes a test reads its effects with."""

    lifecycle: ExecutionLifecycle
    tx: Callable[[], contextlib.AbstractAsyncContextManager[Any]]
    status: Callable[[UUID], Any]
    job: Callable[[UUID], Any]
    key_retired: Callable[[UUID], Any]
    jobs_of: Callable[[UUID], Any]


async def new_record(pool: asyncpg.Pool, status: ExecutionStatus) -> ExecutionRecord:
    record, _ = await create_execution(
        pool,
        NewExecution(
            tenant_id=TENANT,
            actor_id="alice",
            request_id="req-facade",
            trace_context="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            idempotency_key=hashlib.sha256(uuid4().bytes).hexdigest(),
            plan_hash="a" * 64,
            plan_snapshot={"name": "facade"},
            plan_snapshot_hash="b" * 64,
            execution_mode="background",
            sla_class="fast",
            action_class="read",
            approval_level=1,
            priority=50,
            timeout_policy_id="fast_read",
            timeout_ms=10_000,
            estimated_duration_ms=60_000,
            record_only=False,
            initial_status=status,
        ),
        dedup_window=timedelta(hours=24),
    )
    return record


@pytest.fixture
async def redis_client(redis_url: str, redis_prefix: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=f"{redis_prefix}*", count=500)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
async def policy(db_pool: asyncpg.Pool) -> TimeoutPolicy:
    return (await load_timeout_policies(db_pool))["fast_read"]


def fake_core() -> tuple[Core, InMemoryLifecycle]:
    fake = InMemoryLifecycle()

    async def status(eid: UUID) -> ExecutionStatus:
        return fake.executions[eid].status

    async def job(job_id: UUID) -> JobSeen | None:
        found = fake.jobs.get(job_id)
        if found is None:
            return None
        return JobSeen(
            found.execution_id,
            found.max_attempts,
            found.max_lease_renewals,
            found.request_id,
            found.trace_context,
        )

    async def key_retired(eid: UUID) -> bool:
        return fake.executions[eid].key_retired

    async def jobs_of(eid: UUID) -> int:
        return sum(1 for j in fake.jobs.values() if j.execution_id == eid)

    core = Core(fake, contextlib.nullcontext, status, job, key_retired, jobs_of)
    return core, fake


def real_core(pool: asyncpg.Pool, queue: RedisQueue | None) -> Core:
    async def status(eid: UUID) -> ExecutionStatus:
        return (await get_execution(pool, TENANT, eid)).status

    async def job(job_id: UUID) -> JobSeen | None:
        row = await jobs.get_queue_row(pool, job_id)
        assert queue is not None
        pushed = await queue.get(job_id)
        if row is None:
            assert pushed is None
            return None
        assert pushed is not None
        assert pushed.max_attempts == row.max_attempts
        return JobSeen(
            row.execution_id,
            row.max_attempts,
            pushed.max_lease_renewals,
            pushed.request_id,
            pushed.trace_context,
        )

    async def key_retired(eid: UUID) -> bool:
        return (await get_execution(pool, TENANT, eid)).idempotency_retired_at is not None

    async def jobs_of(eid: UUID) -> int:
        found = await pool.fetchval(
            "SELECT count(*) FROM execution_queue WHERE execution_id = $1", eid
        )
        return int(found)

    return Core(
        PostgresRedisLifecycle(pool, queue),
        lambda: transaction(pool),
        status,
        job,
        key_retired,
        jobs_of,
    )


@pytest.fixture(params=["fake", "postgres+redis"])
async def world(
    request: pytest.FixtureRequest,
    db_pool: asyncpg.Pool,
    redis_client: Redis,
    redis_prefix: str,
) -> AsyncIterator[tuple[str, Core, Callable[[ExecutionStatus], Any]]]:
    """(kind, core, make): ``make(status)`` stores a new execution in that status."""
    if request.param == "fake":
        core, fake = fake_core()

        async def make_fake(status: ExecutionStatus) -> ExecutionRecord:
            return fake.add(await new_record(db_pool, status))

        yield request.param, core, make_fake
        return
    core = real_core(db_pool, RedisQueue(redis_client, prefix=redis_prefix))

    async def make_real(status: ExecutionStatus) -> ExecutionRecord:
        return await new_record(db_pool, status)

    yield request.param, core, make_real


async def test_enqueue_queues_the_execution_with_the_policys_budget_and_its_correlation(
    world: tuple[str, Core, Any], policy: TimeoutPolicy
) -> None:
    _, core, make = world
    record = await make(ExecutionStatus.AWAITING_APPROVAL)
    async with core.tx() as tx:
        job_id = await core.lifecycle.enqueue(
            tx,
            record,
            policy,
            by="bob",
            expected_from=ExecutionStatus.AWAITING_APPROVAL,
            event_payload={"reason": "approved"},
        )
    assert core.lifecycle.queue_configured
    assert await core.status(record.id) is ExecutionStatus.QUEUED
    assert await core.job(job_id) == JobSeen(
        record.id,
        policy.max_attempts,
        policy.max_lease_renewals,
        "req-facade",
        record.trace_context,
    )


async def test_enqueue_carries_a_given_traceparent_instead_of_the_executions(
    world: tuple[str, Core, Any], policy: TimeoutPolicy
) -> None:
    _, core, make = world
    record = await make(ExecutionStatus.PENDING)
    release = "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"
    async with core.tx() as tx:
        job_id = await core.lifecycle.enqueue(
            tx,
            record,
            policy,
            by="api",
            expected_from=ExecutionStatus.PENDING,
            trace_context=release,
        )
    seen = await core.job(job_id)
    assert seen is not None
    assert seen.trace_context == release


async def test_enqueue_from_another_status_is_refused_and_leaves_nothing(
    world: tuple[str, Core, Any], policy: TimeoutPolicy
) -> None:
    _, core, make = world
    record = await make(ExecutionStatus.PENDING)
    with pytest.raises(FSMError):
        async with core.tx() as tx:
            await core.lifecycle.enqueue(
                tx, record, policy, by="bob", expected_from=ExecutionStatus.AWAITING_APPROVAL
            )
    assert await core.status(record.id) is ExecutionStatus.PENDING
    assert await core.jobs_of(record.id) == 0


async def test_enqueue_while_the_queue_is_down_is_refused_and_leaves_nothing(
    world: tuple[str, Core, Any], policy: TimeoutPolicy, db_pool: asyncpg.Pool
) -> None:
    kind, core, make = world
    record = await make(ExecutionStatus.AWAITING_APPROVAL)
    dead = create_redis_client("redis://127.0.0.1:9/0", socket_timeout=0.5, retries=0)
    try:
        if kind == "fake":
            assert isinstance(core.lifecycle, InMemoryLifecycle)
            core.lifecycle.queue_up = False
        else:
            core = real_core(db_pool, RedisQueue(dead))
        with pytest.raises(QueueUnavailableError):
            async with core.tx() as tx:
                await core.lifecycle.enqueue(
                    tx, record, policy, by="bob", expected_from=ExecutionStatus.AWAITING_APPROVAL
                )
    finally:
        await dead.aclose()
    assert await core.status(record.id) is ExecutionStatus.AWAITING_APPROVAL
    assert await core.jobs_of(record.id) == 0


async def test_without_a_queue_nothing_can_be_enqueued(
    world: tuple[str, Core, Any], policy: TimeoutPolicy, db_pool: asyncpg.Pool
) -> None:
    kind, _, make = world
    record = await make(ExecutionStatus.PENDING)
    if kind == "fake":
        lifecycle: ExecutionLifecycle = InMemoryLifecycle(queue_configured=False)
        assert isinstance(lifecycle, InMemoryLifecycle)
        lifecycle.add(record)
    else:
        lifecycle = PostgresRedisLifecycle(db_pool, None)
    assert not lifecycle.queue_configured
    with pytest.raises(QueueUnavailableError):
        await lifecycle.enqueue(
            None, record, policy, by="api", expected_from=ExecutionStatus.PENDING
        )


async def test_end_unstarted_fails_it_and_retires_its_key_only_from_the_expected_status(
    world: tuple[str, Core, Any],
) -> None:
    _, core, make = world
    record = await make(ExecutionStatus.AWAITING_APPROVAL)
    assert not await core.lifecycle.end_unstarted(
        record.id,
        expected_from=ExecutionStatus.PENDING,
        by="approvals",
        error_class="WORKER_UNAVAILABLE",
        error_message="no worker",
    )
    assert await core.status(record.id) is ExecutionStatus.AWAITING_APPROVAL
    assert not await core.key_retired(record.id)
    assert await core.lifecycle.end_unstarted(
        record.id,
        expected_from=ExecutionStatus.AWAITING_APPROVAL,
        by="approvals",
        error_class="WORKER_UNAVAILABLE",
        error_message="no worker",
    )
    assert await core.status(record.id) is ExecutionStatus.FAILED
    assert await core.key_retired(record.id)
    assert not await core.lifecycle.end_unstarted(
        record.id,
        expected_from=ExecutionStatus.AWAITING_APPROVAL,
        by="approvals",
        error_class="WORKER_UNAVAILABLE",
        error_message="no worker",
    )
