"""The lifecycle port's behaviours, each run against the in-memory fake the unit tests use AND
the Postgres + Redis adapter the services use: one test body for both, so the fake cannot
promise what the real core does not do."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pytest
from redis.asyncio import Redis

from opsconductor.common.errors import (
    ApprovalDecidedError,
    ApprovalExpiredError,
    ApprovalInvalidatedError,
    ConflictError,
    DlqEntryRequeuedError,
    FailedPreconditionError,
    FSMError,
    LeaseRenewalLimitError,
    NotFoundError,
    QueueUnavailableError,
    ResourceBusyError,
    SelfApprovalError,
    StaleLeaseError,
)
from opsconductor.common.fsm import ExecutionStatus, StepStatus
from opsconductor.lifecycle.approval_fake import InMemoryApprovals
from opsconductor.lifecycle.approval_port import (
    ApprovalDecision,
    ApprovalLifecycle,
    ApprovalRecord,
    ApprovalState,
    PostgresApprovals,
)
from opsconductor.lifecycle.facade import (
    CreatedQueued,
    DeadLetter,
    DlqEntry,
    ExecutionLifecycle,
    FirstRenewal,
    PostgresRedisLifecycle,
    WaitingUsage,
)
from opsconductor.lifecycle.fake import InMemoryLifecycle
from opsconductor.lifecycle.queue import RedisQueue, create_redis_client, jobs
from opsconductor.lifecycle.queue.lease import lease_seconds
from opsconductor.lifecycle.queue.records import LeasedJob
from opsconductor.lifecycle.storage.execution_reads import get_execution
from opsconductor.lifecycle.storage.execution_records import ExecutionRecord, transaction
from opsconductor.lifecycle.storage.executions import NewExecution, create_execution, transition
from opsconductor.lifecycle.storage.locks import LockRequest, LockSet
from opsconductor.lifecycle.storage.paging import InvalidPageRequestError
from opsconductor.lifecycle.storage.policies import TimeoutPolicy, load_timeout_policies
from opsconductor.lifecycle.storage.quota_usage import ImmediateUsage
from tests.integration.test_queue_redis import FakeClock

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
    #: ``waiting(tx, tenant)``: the tenant's jobs not leased, seen from ``tx`` (None: committed).
    waiting: Callable[[Any, str], Any]
    #: ``key_live(tx, tenant, key)``: whether an execution holds the key unretired.
    key_live: Callable[[Any, str, str], Any]


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

    async def waiting(tx: Any, tenant_id: str) -> int:
        return sum(
            1 for j in fake.jobs.values() if j.tenant_id == tenant_id and j.state != "leased"
        )

    async def key_live(tx: Any, tenant_id: str, key: str) -> bool:
        return any(
            r.tenant_id == tenant_id
            and r.idempotency_key == key
            and not fake.executions[eid].key_retired
            for eid, r in fake.records.items()
        )

    core = Core(fake, contextlib.nullcontext, status, job, key_retired, jobs_of, waiting, key_live)
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

    async def waiting(tx: Any, tenant_id: str) -> int:
        found = await (tx or pool).fetchval(
            "SELECT count(*) FROM execution_queue WHERE tenant_id = $1 AND state <> 'leased'",
            tenant_id,
        )
        return int(found)

    async def key_live(tx: Any, tenant_id: str, key: str) -> bool:
        return bool(
            await (tx or pool).fetchval(
                "SELECT EXISTS (SELECT 1 FROM executions WHERE tenant_id = $1"
                " AND idempotency_key = $2 AND idempotency_retired_at IS NULL)",
                tenant_id,
                key,
            )
        )

    return Core(
        PostgresRedisLifecycle(pool, queue),
        lambda: transaction(pool),
        status,
        job,
        key_retired,
        jobs_of,
        waiting,
        key_live,
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
        queued = await core.lifecycle.enqueue(
            tx,
            record,
            policy,
            by="bob",
            expected_from=ExecutionStatus.AWAITING_APPROVAL,
            event_payload={"reason": "approved"},
        )
    job_id = queued.job_id
    assert queued.record.id == record.id
    assert queued.record.status is ExecutionStatus.QUEUED
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
        job_id = (
            await core.lifecycle.enqueue(
                tx,
                record,
                policy,
                by="api",
                expected_from=ExecutionStatus.PENDING,
                trace_context=release,
            )
        ).job_id
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


def new_execution(
    tenant_id: str,
    *,
    key: str | None = None,
    mode: str = "immediate",
    status: ExecutionStatus = ExecutionStatus.PENDING,
) -> NewExecution:
    return NewExecution(
        tenant_id=tenant_id,
        actor_id="alice",
        request_id="req-create",
        trace_context=None,
        idempotency_key=key or hashlib.sha256(uuid4().bytes).hexdigest(),
        plan_hash="c" * 64,
        plan_snapshot={"name": "create"},
        plan_snapshot_hash="d" * 64,
        execution_mode=mode,
        sla_class="fast",
        action_class="read",
        approval_level=0,
        priority=50,
        timeout_policy_id="fast_read",
        timeout_ms=10_000,
        estimated_duration_ms=1_000,
        record_only=False,
        initial_status=status,
        steps=[("first", 0, "noop", "read"), ("second", 1, "noop", "read")],
    )


def fresh_tenant() -> str:
    # Fake and real worlds share one database per run: admission counts per tenant.
    return f"tenant-{uuid4().hex[:12]}"


async def test_create_is_idempotent_per_tenant_and_key_and_get_reads_it_with_its_steps(
    world: tuple[str, Core, Any],
) -> None:
    _, core, _ = world
    tenant = fresh_tenant()
    new = new_execution(tenant)
    record, created = await core.lifecycle.create(new, dedup_window=timedelta(hours=1))
    assert created
    assert record.status is ExecutionStatus.PENDING
    assert [(s.step_id, s.position, s.status.value) for s in record.steps] == [
        ("first", 0, "pending"),
        ("second", 1, "pending"),
    ]
    again, created_again = await core.lifecycle.create(new, dedup_window=timedelta(hours=1))
    assert not created_again
    assert again.id == record.id
    assert [s.step_id for s in again.steps] == ["first", "second"]
    other, other_created = await core.lifecycle.create(
        new_execution(fresh_tenant(), key=new.idempotency_key), dedup_window=timedelta(hours=1)
    )
    assert other_created  # the same key in another tenant is another execution
    assert other.id != record.id
    read = await core.lifecycle.get(tenant, record.id)
    assert (read.id, read.status, read.idempotency_key, read.execution_mode) == (
        record.id,
        ExecutionStatus.PENDING,
        new.idempotency_key,
        "immediate",
    )
    assert [s.step_id for s in read.steps] == ["first", "second"]
    with pytest.raises(NotFoundError):
        await core.lifecycle.get(other.tenant_id, record.id)  # another tenant's: not found
    with pytest.raises(NotFoundError):
        await core.lifecycle.get(tenant, uuid4())


async def test_a_terminal_execution_gives_its_key_up_only_after_the_dedup_window(
    world: tuple[str, Core, Any], db_pool: asyncpg.Pool
) -> None:
    kind, core, _ = world
    tenant = fresh_tenant()
    new = new_execution(tenant)
    first, _ = await core.lifecycle.create(new, dedup_window=timedelta(hours=1))
    await core.lifecycle.create(new_execution(tenant), dedup_window=timedelta(hours=1))
    # Ended (nothing ran): within the window the key still answers with the ended execution.
    assert await core.lifecycle.end_unstarted(
        first.id,
        expected_from=ExecutionStatus.PENDING,
        by="api",
        error_class="WORKER_UNAVAILABLE",
        error_message="no worker",
    )
    ended = await core.lifecycle.get(tenant, first.id)
    assert ended.status is ExecutionStatus.FAILED
    assert ended.idempotency_retired_at is not None  # end_unstarted retires it at once
    again, created = await core.lifecycle.create(new, dedup_window=timedelta(hours=1))
    assert created
    assert again.id != first.id
    # Failed in turn, its key kept (as a run that failed keeps it): within the window the key
    # answers with it; past the window (0 here) a create retires it and makes a new one.
    if kind == "fake":
        assert isinstance(core.lifecycle, InMemoryLifecycle)
        core.lifecycle._move(again.id, ExecutionStatus.FAILED, by="worker", payload=None)
    else:
        await transition(db_pool, again.id, to=ExecutionStatus.FAILED, by="worker")
    dup, dup_created = await core.lifecycle.create(new, dedup_window=timedelta(hours=1))
    assert (dup.id, dup_created, dup.status) == (again.id, False, ExecutionStatus.FAILED)
    assert dup.idempotency_retired_at is None
    fresh, fresh_created = await core.lifecycle.create(new, dedup_window=timedelta(0))
    assert fresh_created
    assert fresh.id not in (first.id, again.id)
    assert (await core.lifecycle.get(tenant, again.id)).idempotency_retired_at is not None


async def test_create_admitted_refuses_a_new_immediate_execution_at_the_limit_but_never_a_duplicate(
    world: tuple[str, Core, Any],
) -> None:
    _, core, _ = world
    tenant = fresh_tenant()
    new = new_execution(tenant)
    admitted = await core.lifecycle.create_admitted(
        new, dedup_window=timedelta(hours=1), max_in_flight=1
    )
    assert not isinstance(admitted, ImmediateUsage)
    record, created = admitted
    assert created
    # Background executions take no immediate slot.
    await core.lifecycle.create(new_execution(tenant, mode="background"), dedup_window=timedelta(1))
    second = new_execution(tenant)
    refused = await core.lifecycle.create_admitted(
        second, dedup_window=timedelta(hours=1), max_in_flight=1
    )
    assert isinstance(refused, ImmediateUsage)
    assert refused.in_flight == 1
    # Nothing written: the refused key is free, and a duplicate of the first is never refused.
    duplicate = await core.lifecycle.create_admitted(
        new, dedup_window=timedelta(hours=1), max_in_flight=1
    )
    assert not isinstance(duplicate, ImmediateUsage)
    assert duplicate == (duplicate[0], False)
    assert duplicate[0].id == record.id
    unlimited = await core.lifecycle.create_admitted(
        second, dedup_window=timedelta(hours=1), max_in_flight=0
    )
    assert not isinstance(unlimited, ImmediateUsage)
    assert unlimited[1]  # created: the refusal above left no row behind for its key
    # Once the first ended, its slot is free again.
    assert await core.lifecycle.end_unstarted(
        record.id,
        expected_from=ExecutionStatus.PENDING,
        by="api",
        error_class="X",
        error_message="x",
    )
    assert await core.lifecycle.end_unstarted(
        unlimited[0].id,
        expected_from=ExecutionStatus.PENDING,
        by="api",
        error_class="X",
        error_message="x",
    )
    third = await core.lifecycle.create_admitted(
        new_execution(tenant), dedup_window=timedelta(hours=1), max_in_flight=1
    )
    assert not isinstance(third, ImmediateUsage)


async def test_queued_job_finds_the_job_enqueue_made_inside_and_after_the_transaction(
    world: tuple[str, Core, Any], policy: TimeoutPolicy
) -> None:
    _, core, _ = world
    tenant = fresh_tenant()
    record, _ = await core.lifecycle.create(
        new_execution(tenant, mode="background"), dedup_window=timedelta(hours=1)
    )
    assert await core.lifecycle.queued_job(record.id) is None
    async with core.tx() as tx:
        queued = await core.lifecycle.enqueue(
            tx, record, policy, by="api", expected_from=ExecutionStatus.PENDING
        )
        assert await core.lifecycle.queued_job(record.id, tx=tx) == queued.job_id
    assert queued.record.status is ExecutionStatus.QUEUED
    assert await core.lifecycle.queued_job(record.id) == queued.job_id
    assert (await core.lifecycle.get(tenant, record.id)).status is ExecutionStatus.QUEUED


async def test_announce_wakes_a_listener_and_never_raises_while_the_queue_is_down(
    world: tuple[str, Core, Any], db_pool: asyncpg.Pool, redis_client: Redis, redis_prefix: str
) -> None:
    kind, core, _ = world
    if kind == "fake":
        assert isinstance(core.lifecycle, InMemoryLifecycle)
        await core.lifecycle.announce()
        assert core.lifecycle.announcements == 1
        core.lifecycle.queue_up = False
        await core.lifecycle.announce()
    else:
        queue = RedisQueue(redis_client, prefix=redis_prefix)
        pubsub = redis_client.pubsub()
        await pubsub.subscribe(queue.wake_channel)
        try:
            await pubsub.get_message(timeout=1.0)  # the subscribe confirmation
            await core.lifecycle.announce()
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2.0)
            assert message is not None
            assert message["channel"] == queue.wake_channel.encode()
        finally:
            await pubsub.unsubscribe()
            await pubsub.aclose()
        dead = create_redis_client("redis://127.0.0.1:9/0", socket_timeout=0.5, retries=0)
        try:
            await real_core(db_pool, RedisQueue(dead)).lifecycle.announce()
        finally:
            await dead.aclose()
    # Without a queue there is no one to wake: a no-op.
    await PostgresRedisLifecycle(db_pool, None).announce()


async def test_a_transaction_that_raises_leaves_nothing_of_what_was_done_in_it(
    world: tuple[str, Core, Any], policy: TimeoutPolicy
) -> None:
    _, core, _ = world
    tenant = fresh_tenant()
    new = new_execution(tenant, mode="background")
    created: list[UUID] = []

    async def give_up() -> None:
        async with core.lifecycle.transaction() as tx:
            record, _ = await core.lifecycle.create(new, dedup_window=timedelta(hours=1), tx=tx)
            created.append(record.id)
            await core.lifecycle.enqueue(
                tx, record, policy, by="api", expected_from=ExecutionStatus.PENDING
            )
            assert await core.waiting(tx, tenant) == 1
            raise LookupError("the caller gives up")

    with pytest.raises(LookupError):
        await give_up()
    (created_id,) = created
    with pytest.raises(NotFoundError):
        await core.lifecycle.get(tenant, created_id)
    assert await core.lifecycle.queued_job(created_id) is None
    async with core.lifecycle.transaction() as tx:
        assert await core.waiting(tx, tenant) == 0
        assert not await core.key_live(tx, tenant, new.idempotency_key)
    # What commits stays.
    async with core.lifecycle.transaction() as tx:
        kept, made = await core.lifecycle.create(new, dedup_window=timedelta(hours=1), tx=tx)
    assert made
    assert (await core.lifecycle.get(tenant, kept.id)).status is ExecutionStatus.PENDING


async def test_create_queued_counts_only_the_tenants_own_waiting_jobs(
    world: tuple[str, Core, Any], policy: TimeoutPolicy
) -> None:
    _, core, _ = world
    tenant, other = fresh_tenant(), fresh_tenant()

    async def submit(tenant_id: str) -> CreatedQueued | WaitingUsage:
        async with core.lifecycle.transaction() as tx:
            return await core.lifecycle.create_queued(
                tx,
                new_execution(tenant_id, mode="background"),
                policy,
                dedup_window=timedelta(hours=1),
                max_waiting=1,
                by="api",
            )

    assert isinstance(await submit(other), CreatedQueued)
    assert (await core.waiting(None, other), await core.waiting(None, tenant)) == (1, 0)
    # The other tenant at its limit takes none of this tenant's slots.
    mine = await submit(tenant)
    assert isinstance(mine, CreatedQueued)
    assert mine.created
    assert await submit(tenant) == WaitingUsage(waiting=1)
    assert await submit(other) == WaitingUsage(waiting=1)


async def start_running(kind: str, core: Core, pool: asyncpg.Pool, eid: UUID) -> None:
    """The worker's start (not in the port yet): pending -> running."""
    if kind == "fake":
        assert isinstance(core.lifecycle, InMemoryLifecycle)
        core.lifecycle._move(eid, ExecutionStatus.RUNNING, by="w1", payload=None)
    else:
        await transition(pool, eid, to=ExecutionStatus.RUNNING, by="w1", worker_id="w1")


async def test_a_step_starts_and_finishes_only_while_its_execution_runs(
    world: tuple[str, Core, Any], db_pool: asyncpg.Pool
) -> None:
    kind, core, _ = world
    tenant = fresh_tenant()
    record, _ = await core.lifecycle.create(new_execution(tenant), dedup_window=timedelta(1))
    with pytest.raises(FSMError):
        await core.lifecycle.start_step(record.id, "first", worker_id="w1")  # still pending
    await start_running(kind, core, db_pool, record.id)
    with pytest.raises(FSMError):  # not started yet
        await core.lifecycle.finish_step(record.id, "first", status=StepStatus.SUCCEEDED)
    started = await core.lifecycle.start_step(record.id, "first", worker_id="w1")
    assert (started.status, started.attempt, started.worker_id) == (StepStatus.RUNNING, 1, "w1")
    assert started.started_at is not None
    with pytest.raises(ValueError, match="succeeded or failed"):
        await core.lifecycle.finish_step(record.id, "first", status=StepStatus.SKIPPED)
    done = await core.lifecycle.finish_step(
        record.id, "first", status=StepStatus.SUCCEEDED, result={"ok": True}
    )
    assert (done.status, done.result, done.error_class) == (
        StepStatus.SUCCEEDED,
        {"ok": True},
        None,
    )
    assert done.duration_ms is not None
    assert done.duration_ms >= 0
    with pytest.raises(FSMError):  # a succeeded step never starts again
        await core.lifecycle.start_step(record.id, "first", worker_id="w1")
    steps = {s.step_id: s.status for s in (await core.lifecycle.get(tenant, record.id)).steps}
    assert steps == {"first": StepStatus.SUCCEEDED, "second": StepStatus.PENDING}
    with pytest.raises(NotFoundError):
        await core.lifecycle.start_step(record.id, "nope", worker_id="w1")


async def test_a_failed_step_may_start_again_with_its_attempt_counted(
    world: tuple[str, Core, Any], db_pool: asyncpg.Pool
) -> None:
    kind, core, _ = world
    tenant = fresh_tenant()
    record, _ = await core.lifecycle.create(new_execution(tenant), dedup_window=timedelta(1))
    await start_running(kind, core, db_pool, record.id)
    await core.lifecycle.start_step(record.id, "first", worker_id="w1")
    failed = await core.lifecycle.finish_step(
        record.id, "first", status=StepStatus.FAILED, error_class="BOOM", error_message="boom"
    )
    assert (failed.status, failed.error_class, failed.error_message) == (
        StepStatus.FAILED,
        "BOOM",
        "boom",
    )
    again = await core.lifecycle.start_step(record.id, "first", worker_id="w2")
    assert (again.attempt, again.worker_id, again.error_class, again.result) == (
        2,
        "w2",
        None,
        None,
    )


async def test_a_step_write_with_a_lease_token_that_does_not_own_the_execution_is_refused(
    world: tuple[str, Core, Any], db_pool: asyncpg.Pool
) -> None:
    kind, core, _ = world
    tenant = fresh_tenant()
    record, _ = await core.lifecycle.create(new_execution(tenant), dedup_window=timedelta(1))
    await start_running(kind, core, db_pool, record.id)
    with pytest.raises(StaleLeaseError):
        await core.lifecycle.start_step(record.id, "first", worker_id="w1", lease_token=uuid4())
    steps = {s.step_id: s.status for s in (await core.lifecycle.get(tenant, record.id)).steps}
    assert steps["first"] is StepStatus.PENDING


async def test_no_step_is_written_once_its_execution_ended(
    world: tuple[str, Core, Any], db_pool: asyncpg.Pool
) -> None:
    kind, core, _ = world
    tenant = fresh_tenant()
    record, _ = await core.lifecycle.create(new_execution(tenant), dedup_window=timedelta(1))
    await start_running(kind, core, db_pool, record.id)
    await core.lifecycle.start_step(record.id, "first", worker_id="w1")
    if kind == "fake":
        assert isinstance(core.lifecycle, InMemoryLifecycle)
        core.lifecycle._move(record.id, ExecutionStatus.CANCELLED, by="bob", payload=None)
    else:
        await transition(db_pool, record.id, to=ExecutionStatus.CANCELLED, by="bob")
    with pytest.raises(FSMError):
        await core.lifecycle.finish_step(record.id, "first", status=StepStatus.SUCCEEDED)


async def test_create_queued_admits_creates_and_queues_and_a_duplicate_gets_the_same_job(
    world: tuple[str, Core, Any], policy: TimeoutPolicy, db_pool: asyncpg.Pool
) -> None:
    kind, core, _ = world
    tenant = fresh_tenant()
    new = new_execution(tenant, mode="background")
    window = timedelta(hours=1)
    async with core.lifecycle.transaction() as tx:
        made = await core.lifecycle.create_queued(
            tx, new, policy, dedup_window=window, max_waiting=1, by="api"
        )
    assert isinstance(made, CreatedQueued)
    assert made.created
    assert made.job_id is not None
    assert made.record.status is ExecutionStatus.QUEUED
    assert (await core.lifecycle.get(tenant, made.record.id)).status is ExecutionStatus.QUEUED
    assert len(made.record.steps) == len(new.steps)
    seen = await core.job(made.job_id)
    assert seen is not None
    assert (seen.execution_id, seen.max_attempts, seen.max_lease_renewals) == (
        made.record.id,
        policy.max_attempts,
        policy.max_lease_renewals,
    )
    # A duplicate at the limit: the same execution and job, nothing queued again.
    async with core.lifecycle.transaction() as tx:
        again = await core.lifecycle.create_queued(
            tx, new, policy, dedup_window=window, max_waiting=1, by="api"
        )
    assert isinstance(again, CreatedQueued)
    assert (again.record.id, again.created, again.job_id) == (made.record.id, False, made.job_id)
    assert await core.jobs_of(made.record.id) == 1
    # Another plan at the limit: the usage, nothing written.
    other = new_execution(tenant, mode="background")
    async with core.lifecycle.transaction() as tx:
        refused = await core.lifecycle.create_queued(
            tx, other, policy, dedup_window=window, max_waiting=1, by="api"
        )
        assert refused == WaitingUsage(waiting=1)
        assert not await core.key_live(tx, tenant, other.idempotency_key)
    # The queue down: refused, and the transaction's rollback leaves nothing behind.
    dead = create_redis_client("redis://127.0.0.1:9/0", socket_timeout=0.5, retries=0)
    try:
        if kind == "fake":
            assert isinstance(core.lifecycle, InMemoryLifecycle)
            core.lifecycle.queue_up = False
        else:
            core = real_core(db_pool, RedisQueue(dead))
        with pytest.raises(QueueUnavailableError):
            async with core.lifecycle.transaction() as tx:
                await core.lifecycle.create_queued(
                    tx, other, policy, dedup_window=window, max_waiting=0, by="api"
                )
    finally:
        await dead.aclose()
    async with core.lifecycle.transaction() as tx:
        assert not await core.key_live(tx, tenant, other.idempotency_key)
        assert await core.waiting(tx, tenant) == 1
    # Outside a transaction: refused (the quota lock is transaction-scoped).
    with pytest.raises(RuntimeError):
        await core.lifecycle.create_queued(
            None, other, policy, dedup_window=window, max_waiting=0, by="api"
        )


# -- Approvals (opsconductor.lifecycle.approval_port): the approvals service's port ----------

TTL = timedelta(hours=1)
S = ExecutionStatus


@pytest.fixture
def approvals(world: tuple[str, Core, Any], db_pool: asyncpg.Pool) -> ApprovalLifecycle:
    """The approval port of ``world``'s kind, over the same executions."""
    kind, core, _ = world
    if kind == "fake":
        assert isinstance(core.lifecycle, InMemoryLifecycle)
        return InMemoryApprovals(core.lifecycle)
    return PostgresApprovals(db_pool)


def decision(by: str = "bob", *, approve: bool = True) -> ApprovalDecision:
    return ApprovalDecision(
        approve=approve, decided_by=by, auth_method="jwt", source_ip="10.1.2.3", comment="ok"
    )


async def waiting_for_approval(
    core: Core, approvals: ApprovalLifecycle, tenant: str, *, level: int = 1, ttl: timedelta = TTL
) -> tuple[ExecutionRecord, ApprovalRecord]:
    """A new background execution of alice's awaiting its whole-plan request."""
    new = replace(
        new_execution(tenant, mode="background"),
        approval_level=level,
        plan_snapshot={"plan": {"name": "gated", "runbook_url": "https://runbooks/x"}},
    )
    record, _ = await core.lifecycle.create(new, dedup_window=TTL)
    return record, await approvals.request(record.id, ttl=ttl, by="api")


async def grant_and_release(
    lifecycle: ExecutionLifecycle,
    approvals: ApprovalLifecycle,
    approval: ApprovalRecord,
    record: ExecutionRecord,
    policy: TimeoutPolicy,
) -> tuple[ApprovalRecord, UUID]:
    """What ApprovalDecisions does for a background execution: grant and queue, one
    transaction."""
    async with approvals.transaction() as tx:
        granted = await approvals.decide(
            approval.id, tenant_id=approval.tenant_id, decision=decision(), tx=tx
        )
        queued = await lifecycle.enqueue(
            tx, record, policy, by="bob", expected_from=S.AWAITING_APPROVAL
        )
    return granted, queued.job_id


async def running_with_lease(core: Core, eid: UUID) -> UUID:
    """The worker's claim of a queued execution: running, and the token that owns it."""
    token = uuid4()
    claimed = await core.lifecycle.claim(
        eid, lease_token=token, worker_id="w1", budget=timedelta(seconds=30)
    )
    assert claimed is not None
    assert claimed.status is S.RUNNING
    return token


async def test_a_request_is_bound_to_the_execution_row_and_read_only_in_its_tenant(
    world: tuple[str, Core, Any], approvals: ApprovalLifecycle
) -> None:
    _, core, _ = world
    tenant = fresh_tenant()
    record, approval = await waiting_for_approval(core, approvals, tenant, level=2)
    assert (approval.tenant_id, approval.execution_id, approval.step_id) == (
        tenant,
        record.id,
        None,
    )
    assert (approval.level, approval.state, approval.requested_by) == (
        2,
        ApprovalState.PENDING,
        "alice",
    )
    assert (approval.plan_hash, approval.plan_snapshot_hash) == (record.plan_hash, "d" * 64)
    assert approval.runbook_url == "https://runbooks/x"
    assert approval.expires_at > approval.created_at
    waiting = await core.lifecycle.get(tenant, record.id)
    assert (waiting.status, waiting.approval_id) == (S.AWAITING_APPROVAL, approval.id)
    read = await approvals.get(tenant, approval.id)
    assert read == approval
    assert read.plan is not None
    assert read.plan["name"] == "gated"
    assert await approvals.get(tenant, str(approval.id)) == approval
    for foreign_or_unknown in ((fresh_tenant(), approval.id), (tenant, uuid4()), (tenant, "x")):
        with pytest.raises(NotFoundError):
            await approvals.get(*foreign_or_unknown)
    # Owners, for the audit of a refusal only.
    assert await approvals.approval_owner(approval.id) == (tenant, record.id)
    assert await approvals.approval_owner(str(uuid4())) is None
    assert await approvals.approval_owner("not-a-uuid") is None
    assert await approvals.execution_owner(record.id) == tenant
    assert await approvals.execution_owner(str(record.id)) == tenant
    assert await approvals.execution_owner(uuid4()) is None
    assert await approvals.execution_owner("not-a-uuid") is None
    # The execution a decision covers, without its steps; another tenant's is not found.
    covered = await approvals.execution(tenant, record.id)
    assert (covered.id, covered.status, covered.approval_id, covered.steps) == (
        record.id,
        S.AWAITING_APPROVAL,
        approval.id,
        (),
    )
    with pytest.raises(NotFoundError):
        await approvals.execution(fresh_tenant(), record.id)
    # One open request per execution; none for an execution that is not pending.
    with pytest.raises(ConflictError):
        await approvals.request(record.id, ttl=TTL, by="api")
    ended, _ = await core.lifecycle.create(
        replace(new_execution(tenant), approval_level=1), dedup_window=TTL
    )
    await core.lifecycle.end_unstarted(
        ended.id, expected_from=S.PENDING, by="api", error_class="X", error_message="x"
    )
    with pytest.raises(FSMError):
        await approvals.request(ended.id, ttl=TTL, by="api")
    assert await approvals.step_approval(tenant, ended.id, "first") is None
    assert await approvals.list_pending(tenant) == ([read], None)
    with pytest.raises(NotFoundError):
        await approvals.request(uuid4(), ttl=TTL, by="api")


async def test_the_first_of_two_racing_decisions_wins_and_the_loser_is_told(
    world: tuple[str, Core, Any], approvals: ApprovalLifecycle
) -> None:
    _, core, _ = world
    tenant = fresh_tenant()
    record, approval = await waiting_for_approval(core, approvals, tenant)
    results = await asyncio.gather(
        approvals.decide(approval.id, tenant_id=tenant, decision=decision("bob")),
        approvals.decide(approval.id, tenant_id=tenant, decision=decision("carol", approve=False)),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, ApprovalRecord)]
    assert len(winners) == 1, results
    assert [type(r) for r in results if not isinstance(r, ApprovalRecord)] == [ApprovalDecidedError]
    (won,) = winners
    assert (won.decided_by, won.auth_method, won.source_ip, won.comment) == (
        won.decided_by,
        "jwt",
        "10.1.2.3",
        "ok",
    )
    assert won.decided_at is not None
    stored = await approvals.get(tenant, approval.id)
    assert (stored.state, stored.decided_by) == (won.state, won.decided_by)
    expected = S.AWAITING_APPROVAL if won.state is ApprovalState.APPROVED else S.REJECTED
    assert (await core.lifecycle.get(tenant, record.id)).status is expected
    with pytest.raises(ApprovalDecidedError):
        await approvals.decide(approval.id, tenant_id=tenant, decision=decision("dave"))


async def test_a_decision_is_refused_when_foreign_by_the_requester_or_not_awaited(
    world: tuple[str, Core, Any], approvals: ApprovalLifecycle, db_pool: asyncpg.Pool
) -> None:
    kind, core, _ = world
    tenant = fresh_tenant()
    record, approval = await waiting_for_approval(core, approvals, tenant)
    with pytest.raises(NotFoundError):  # another tenant's, as an unknown one
        await approvals.decide(approval.id, tenant_id=fresh_tenant(), decision=decision())
    for unknown in (uuid4(), "not-a-uuid"):
        with pytest.raises(NotFoundError):
            await approvals.decide(unknown, tenant_id=tenant, decision=decision())
    with pytest.raises(SelfApprovalError):
        await approvals.decide(approval.id, tenant_id=tenant, decision=decision("alice"))
    assert (await approvals.get(tenant, approval.id)).state is ApprovalState.PENDING
    # The execution no longer waits (cancelled meanwhile): refused, the request left as it was.
    if kind == "fake":
        assert isinstance(core.lifecycle, InMemoryLifecycle)
        core.lifecycle._move(record.id, S.CANCELLED, by="alice", payload=None)
    else:
        await transition(db_pool, record.id, to=S.CANCELLED, by="alice")
    with pytest.raises(FailedPreconditionError) as refused:
        await approvals.decide(approval.id, tenant_id=tenant, decision=decision())
    assert type(refused.value) is FailedPreconditionError
    assert (await approvals.get(tenant, approval.id)).state is ApprovalState.PENDING


@pytest.mark.parametrize("level", [1, 3])
async def test_a_rejection_ends_the_execution_rejected_its_steps_skipped_its_key_kept(
    world: tuple[str, Core, Any], approvals: ApprovalLifecycle, level: int
) -> None:
    _, core, _ = world
    tenant = fresh_tenant()
    record, approval = await waiting_for_approval(core, approvals, tenant, level=level)
    rejected = await approvals.decide(
        approval.id, tenant_id=tenant, decision=decision(approve=False)
    )
    assert (rejected.state, rejected.decided_by, rejected.level) == (
        ApprovalState.REJECTED,
        "bob",
        level,
    )
    ended = await core.lifecycle.get(tenant, record.id)
    assert ended.status is S.REJECTED
    assert {s.status for s in ended.steps} == {StepStatus.SKIPPED}
    assert ended.idempotency_retired_at is None
    assert await core.lifecycle.queued_job(record.id) is None


async def test_an_expired_request_is_neither_decided_nor_listed(
    world: tuple[str, Core, Any], approvals: ApprovalLifecycle
) -> None:
    _, core, _ = world
    tenant = fresh_tenant()
    record, approval = await waiting_for_approval(
        core, approvals, tenant, ttl=timedelta(seconds=-1)
    )
    with pytest.raises(ApprovalExpiredError):
        await approvals.decide(approval.id, tenant_id=tenant, decision=decision())
    assert await approvals.list_pending(tenant) == ([], None)
    assert (await core.lifecycle.get(tenant, record.id)).status is S.AWAITING_APPROVAL


async def test_a_grant_and_its_release_commit_together_or_not_at_all(
    world: tuple[str, Core, Any],
    approvals: ApprovalLifecycle,
    policy: TimeoutPolicy,
    db_pool: asyncpg.Pool,
) -> None:
    kind, core, _ = world
    tenant = fresh_tenant()
    record, approval = await waiting_for_approval(core, approvals, tenant)

    # The queue down: the release fails, and the decision made in the same transaction with it.
    dead = create_redis_client("redis://127.0.0.1:9/0", socket_timeout=0.5, retries=0)
    try:
        down = core.lifecycle
        if kind == "fake":
            assert isinstance(down, InMemoryLifecycle)
            down.queue_up = False
        else:
            down = PostgresRedisLifecycle(db_pool, RedisQueue(dead))
        with pytest.raises(QueueUnavailableError):
            await grant_and_release(down, approvals, approval, record, policy)
    finally:
        await dead.aclose()
        if isinstance(core.lifecycle, InMemoryLifecycle):
            core.lifecycle.queue_up = True
    assert (await approvals.get(tenant, approval.id)).state is ApprovalState.PENDING
    assert (await core.lifecycle.get(tenant, record.id)).status is S.AWAITING_APPROVAL
    assert await core.lifecycle.queued_job(record.id) is None
    granted, job_id = await grant_and_release(core.lifecycle, approvals, approval, record, policy)
    assert granted.state is ApprovalState.APPROVED
    assert (await core.lifecycle.get(tenant, record.id)).status is S.QUEUED
    assert await core.lifecycle.queued_job(record.id) == job_id
    assert await approvals.list_pending(tenant) == ([], None)


async def test_invalidating_ends_an_execution_still_waiting_and_leaves_a_released_one(
    world: tuple[str, Core, Any], approvals: ApprovalLifecycle, policy: TimeoutPolicy
) -> None:
    _, core, _ = world
    tenant = fresh_tenant()
    record, approval = await waiting_for_approval(core, approvals, tenant)
    invalidated = await approvals.invalidate(
        approval.id, by="bob", reason="binding_mismatch", mismatched=["plan_hash"]
    )
    assert invalidated is not None
    assert invalidated.state is ApprovalState.INVALIDATED
    ended = await core.lifecycle.get(tenant, record.id)
    assert (ended.status, ended.error_class) == (S.FAILED, "APPROVAL_INVALIDATED")
    assert {s.status for s in ended.steps} == {StepStatus.SKIPPED}
    assert ended.idempotency_retired_at is not None  # nothing ran: it may be requested again
    assert (await approvals.get(tenant, approval.id)).state is ApprovalState.INVALIDATED
    with pytest.raises(ApprovalInvalidatedError):
        await approvals.decide(approval.id, tenant_id=tenant, decision=decision())
    # Already closed: nothing more to do.
    assert await approvals.invalidate(approval.id, by="bob", reason="x", mismatched=[]) is None
    with pytest.raises(NotFoundError):
        await approvals.invalidate(uuid4(), by="bob", reason="x", mismatched=[])
    # An approved one whose execution was released: invalidated, the execution left to its
    # worker (which checks the binding before the first step).
    released, granted = await waiting_for_approval(core, approvals, tenant)
    await grant_and_release(core.lifecycle, approvals, granted, released, policy)
    closed = await approvals.invalidate(granted.id, by="w1", reason="x", mismatched=["level"])
    assert closed is not None
    assert closed.state is ApprovalState.INVALIDATED
    assert (await core.lifecycle.get(tenant, released.id)).status is S.QUEUED


async def test_pending_requests_are_paged_oldest_first_per_tenant(
    world: tuple[str, Core, Any], approvals: ApprovalLifecycle
) -> None:
    _, core, _ = world
    tenant, other = fresh_tenant(), fresh_tenant()
    ids = [(await waiting_for_approval(core, approvals, tenant))[1].id for _ in range(3)]
    await waiting_for_approval(core, approvals, other)
    first, token = await approvals.list_pending(tenant, page_size=2)
    assert [a.id for a in first] == ids[:2]
    assert token is not None
    assert all(a.plan is not None for a in first)
    rest, last = await approvals.list_pending(tenant, page_size=2, page_token=token)
    assert ([a.id for a in rest], last) == (ids[2:], None)
    everything, none = await approvals.list_pending(tenant, page_size=0)  # 0: the default
    assert ([a.id for a in everything], none) == (ids, None)
    with pytest.raises(InvalidPageRequestError):
        await approvals.list_pending(tenant, page_size=-1)
    with pytest.raises(InvalidPageRequestError):
        await approvals.list_pending(tenant, page_token="garbage")
    with pytest.raises(InvalidPageRequestError):  # issued for another tenant's listing
        await approvals.list_pending(other, page_size=2, page_token=token)
    # A decided request leaves the listing.
    await approvals.decide(ids[0], tenant_id=tenant, decision=decision(approve=False))
    after, _ = await approvals.list_pending(tenant)
    assert [a.id for a in after] == ids[1:]


async def test_a_level_3_step_pause_is_fenced_and_its_request_read_per_step(
    world: tuple[str, Core, Any],
    approvals: ApprovalLifecycle,
    policy: TimeoutPolicy,
) -> None:
    _, core, _ = world
    tenant = fresh_tenant()
    record, approval = await waiting_for_approval(core, approvals, tenant, level=3)
    await grant_and_release(core.lifecycle, approvals, approval, record, policy)
    token = await running_with_lease(core, record.id)
    with pytest.raises(StaleLeaseError):
        await approvals.request_step(record.id, "first", lease_token=uuid4(), ttl=TTL, by="w1")
    assert (await core.lifecycle.get(tenant, record.id)).status is S.RUNNING
    paused = await approvals.request_step(record.id, "first", lease_token=token, ttl=TTL, by="w1")
    assert paused is not None
    assert (paused.step_id, paused.level, paused.state, paused.requested_by) == (
        "first",
        3,
        ApprovalState.PENDING,
        "alice",
    )
    waiting = await core.lifecycle.get(tenant, record.id)
    assert (waiting.status, waiting.lease_token) == (S.AWAITING_APPROVAL, None)
    steps = {s.step_id: s.status for s in waiting.steps}
    assert steps == {"first": StepStatus.AWAITING_APPROVAL, "second": StepStatus.PENDING}
    assert await approvals.step_approval(tenant, record.id, "first") == paused
    assert await approvals.step_approval(tenant, record.id, "second") is None
    assert await approvals.step_approval(fresh_tenant(), record.id, "first") is None
    # The lease was cleared: the paused worker can write nothing more.
    with pytest.raises(StaleLeaseError):
        await approvals.request_step(record.id, "second", lease_token=token, ttl=TTL, by="w1")
    # Once decided, the step's latest request is still the one read.
    await approvals.decide(paused.id, tenant_id=tenant, decision=decision("carol"))
    decided = await approvals.step_approval(tenant, record.id, "first")
    assert decided is not None
    assert (decided.id, decided.state, decided.decided_by) == (
        paused.id,
        ApprovalState.APPROVED,
        "carol",
    )
    pending, _ = await approvals.list_pending(tenant)
    assert pending == []


async def test_invalidating_the_plans_approval_of_a_paused_execution_closes_its_step_request(
    world: tuple[str, Core, Any],
    approvals: ApprovalLifecycle,
    policy: TimeoutPolicy,
) -> None:
    _, core, _ = world
    tenant = fresh_tenant()
    record, approval = await waiting_for_approval(core, approvals, tenant, level=3)
    await grant_and_release(core.lifecycle, approvals, approval, record, policy)
    token = await running_with_lease(core, record.id)
    paused = await approvals.request_step(record.id, "second", lease_token=token, ttl=TTL, by="w1")
    assert paused is not None
    closed = await approvals.invalidate(
        approval.id, by="w1", reason="binding_mismatch", mismatched=["plan_hash"]
    )
    assert closed is not None
    ended = await core.lifecycle.get(tenant, record.id)
    assert (ended.status, ended.error_class) == (S.FAILED, "APPROVAL_INVALIDATED")
    step = await approvals.step_approval(tenant, record.id, "second")
    assert step is not None
    assert (step.id, step.state) == (paused.id, ApprovalState.INVALIDATED)
    with pytest.raises(ApprovalInvalidatedError):
        await approvals.decide(paused.id, tenant_id=tenant, decision=decision())


async def test_a_step_pause_after_a_cancellation_was_requested_ends_the_execution_cancelled(
    world: tuple[str, Core, Any], approvals: ApprovalLifecycle, policy: TimeoutPolicy
) -> None:
    _, core, _ = world
    tenant = fresh_tenant()
    record, approval = await waiting_for_approval(core, approvals, tenant, level=3)
    await grant_and_release(core.lifecycle, approvals, approval, record, policy)
    token = await running_with_lease(core, record.id)
    _, requested = await core.lifecycle.request_cancel(tenant, record.id, by="alice", reason="x")
    assert requested
    assert (
        await approvals.request_step(record.id, "first", lease_token=token, ttl=TTL, by="w1")
        is None
    )
    ended = await core.lifecycle.get(tenant, record.id)
    assert (ended.status, ended.lease_token) == (S.CANCELLED, None)
    assert {s.status for s in ended.steps} == {StepStatus.SKIPPED}
    assert await approvals.step_approval(tenant, record.id, "first") is None


# The worker's approval checks on the same port: ApprovalChecks and ImmediateExecutions.


async def test_the_binding_check_reads_the_stored_request_and_a_mismatch_invalidates_it(
    world: tuple[str, Core, Any], approvals: ApprovalLifecycle, policy: TimeoutPolicy
) -> None:
    _, core, _ = world
    tenant = fresh_tenant()
    record, approval = await waiting_for_approval(core, approvals, tenant)
    waiting = await core.lifecycle.get(tenant, record.id)
    with pytest.raises(FailedPreconditionError) as not_granted:
        await approvals.enforce_binding(waiting, by="w1")
    assert not_granted.value.details["state"] == "pending"
    assert (await approvals.get(tenant, approval.id)).state is ApprovalState.PENDING
    await grant_and_release(core.lifecycle, approvals, approval, record, policy)
    queued = await core.lifecycle.get(tenant, record.id)
    bound = await approvals.enforce_binding(queued, by="w1")
    assert bound is not None
    assert (bound.id, bound.state) == (approval.id, ApprovalState.APPROVED)
    assert await approvals.enforce_binding(replace(queued, approval_level=0), by="w1") is None
    with pytest.raises(ApprovalInvalidatedError):
        await approvals.enforce_binding(replace(queued, approval_id=None), by="w1")
    # What the worker holds differs from the request: the approval is invalidated; the
    # released execution is left to the worker, which ends it.
    with pytest.raises(ApprovalInvalidatedError) as broken:
        await approvals.enforce_binding(replace(queued, plan_hash="e" * 64), by="w1")
    assert broken.value.details["mismatched"] == ["plan_hash"]
    assert (await approvals.get(tenant, approval.id)).state is ApprovalState.INVALIDATED
    assert (await core.lifecycle.get(tenant, record.id)).status is S.QUEUED
    # A mismatch on one still waiting ends it failed with the approval.
    other, _ = await waiting_for_approval(core, approvals, tenant, level=2)
    stored = await core.lifecycle.get(tenant, other.id)
    with pytest.raises(ApprovalInvalidatedError) as lowered:
        await approvals.enforce_binding(replace(stored, approval_level=3), by="w1")
    assert lowered.value.details["mismatched"] == ["level"]
    ended = await core.lifecycle.get(tenant, other.id)
    assert (ended.status, ended.error_class) == (S.FAILED, "APPROVAL_INVALIDATED")


async def test_who_granted_an_approval_and_which_steps_were_approved_for_this_plan(
    world: tuple[str, Core, Any], approvals: ApprovalLifecycle, policy: TimeoutPolicy
) -> None:
    _, core, _ = world
    tenant = fresh_tenant()
    record, approval = await waiting_for_approval(core, approvals, tenant, level=3)
    assert not await approvals.granted_by(record.id, actor_id="bob", tenant_id=tenant)
    await grant_and_release(core.lifecycle, approvals, approval, record, policy)
    assert await approvals.granted_by(record.id, actor_id="bob", tenant_id=tenant)
    assert not await approvals.granted_by(record.id, actor_id="carol", tenant_id=tenant)
    assert not await approvals.granted_by(record.id, actor_id="bob", tenant_id=fresh_tenant())
    assert not await approvals.granted_by(uuid4(), actor_id="bob", tenant_id=tenant)
    token = await running_with_lease(core, record.id)
    running = await core.lifecycle.get(tenant, record.id)
    assert not await approvals.step_approved(running, "first")
    paused = await approvals.request_step(record.id, "first", lease_token=token, ttl=TTL, by="w1")
    assert paused is not None
    assert not await approvals.step_approved(running, "first")  # requested, not decided
    await approvals.decide(paused.id, tenant_id=tenant, decision=decision("carol"))
    assert await approvals.step_approved(running, "first")
    assert not await approvals.step_approved(running, "second")
    assert not await approvals.step_approved(replace(running, plan_hash="e" * 64), "first")
    assert not await approvals.step_approved(replace(running, plan_snapshot_hash="f" * 64), "first")


async def test_a_paused_executions_locks_are_extended_all_or_nothing_under_their_owner(
    world: tuple[str, Core, Any], approvals: ApprovalLifecycle, db_pool: asyncpg.Pool
) -> None:
    kind, core, _ = world
    tenant = fresh_tenant()
    a, b = (LockRequest(tenant, f"host:{name}", "noop") for name in "ab")
    owner = uuid4()
    short = timedelta(seconds=30)
    held = await core.lifecycle.acquire_locks(
        [a, b], owner_token=owner, owner_execution_id=None, ttl=short
    )

    async def expiry(key: str) -> datetime:
        if kind == "fake":
            assert isinstance(core.lifecycle, InMemoryLifecycle)
            return core.lifecycle.locks[key].expires_at
        found = await db_pool.fetchval(
            "SELECT expires_at FROM execution_locks WHERE lock_key = $1", key
        )
        assert isinstance(found, datetime)
        return found

    before = datetime.now(UTC)
    extended = await approvals.extend_locks(held, TTL)
    assert extended.owner_token == owner
    assert extended.keys == held.keys
    assert [lock.fencing_token for lock in extended.locks] == [
        lock.fencing_token for lock in held.locks
    ]
    for lock in extended.locks:
        assert lock.expires_at >= before + TTL - timedelta(seconds=5)
        assert await expiry(lock.lock_key) == lock.expires_at
    assert await approvals.extend_locks(LockSet(owner), TTL) == LockSet(owner)
    with pytest.raises(ValueError, match="positive"):
        await approvals.extend_locks(held, timedelta(0))
    # One of them released and taken by someone else: nothing extended, the loss named.
    first_key = held.keys[0]
    assert await core.lifecycle.release_locks(LockSet(owner, held.locks[:1])) == 1
    await core.lifecycle.acquire_locks([a], owner_token=uuid4(), owner_execution_id=None, ttl=short)
    kept = await expiry(held.keys[1])
    with pytest.raises(StaleLeaseError) as lost:
        await approvals.extend_locks(held, TTL * 2)
    assert lost.value.details["lost_keys"] == [first_key]
    assert await expiry(held.keys[1]) == kept


# --- The worker: Redis lease, handoff and claim, runs, steps, locks, settle -------------------
# The operations ExecutionRunner and BackgroundConsumer call (their unit tests run them against
# the fake: tests/unit/test_execution_runner.py, tests/unit/test_background_consumer.py). Both
# worlds run the queue on one FakeClock, so backoffs and deadlines are exact.


@dataclass(frozen=True)
class RedisSeen:
    state: str
    attempts: int
    deliveries: int
    available_at: float | None


@dataclass(frozen=True)
class RowSeen:
    state: str
    attempts: int
    lease_token: UUID | None
    lease_renewals: int


@dataclass
class Worker:
    """A world for the worker's operations: the port and probes of both stores."""

    kind: str
    lifecycle: ExecutionLifecycle
    clock: FakeClock
    redis: Callable[[UUID], Any]
    row: Callable[[UUID], Any]
    dlq: Callable[[UUID], Any]


@pytest.fixture(params=["fake", "postgres+redis"])
async def worker(
    request: pytest.FixtureRequest, db_pool: asyncpg.Pool, redis_client: Redis, redis_prefix: str
) -> Worker:
    clock = FakeClock()
    if request.param == "fake":
        fake = InMemoryLifecycle()
        fake.clock = clock

        async def fake_redis(job_id: UUID) -> RedisSeen | None:
            entry = fake.queue.get(job_id)
            if entry is None:
                return None
            return RedisSeen(entry.state, entry.attempts, entry.deliveries, entry.available_at)

        async def fake_row(job_id: UUID) -> RowSeen | None:
            row = fake.jobs.get(job_id)
            if row is None:
                return None
            return RowSeen(row.state, row.attempts, row.lease_token, row.lease_renewals)

        async def fake_dlq(eid: UUID) -> tuple[int, str | None] | None:
            entry = fake.dlq.get(eid)
            return None if entry is None else (entry.attempts, entry.error_class)

        return Worker("fake", fake, clock, fake_redis, fake_row, fake_dlq)
    queue = RedisQueue(redis_client, prefix=redis_prefix, clock=clock)

    async def real_redis(job_id: UUID) -> RedisSeen | None:
        found = await queue.get(job_id)
        if found is None:
            return None
        return RedisSeen(found.state, found.attempts, found.deliveries, found.available_at)

    async def real_row(job_id: UUID) -> RowSeen | None:
        row = await jobs.get_queue_row(db_pool, job_id)
        if row is None:
            return None
        return RowSeen(row.state, row.attempts, row.lease_token, row.lease_renewals)

    async def real_dlq(eid: UUID) -> tuple[int, str | None] | None:
        row = await db_pool.fetchrow(
            "SELECT attempts, error_class FROM execution_dlq "
            "WHERE execution_id = $1 AND requeued_at IS NULL",
            eid,
        )
        return None if row is None else (row["attempts"], row["error_class"])

    return Worker(
        "postgres+redis",
        PostgresRedisLifecycle(db_pool, queue),
        clock,
        real_redis,
        real_row,
        real_dlq,
    )


async def submitted(
    worker: Worker, policy: TimeoutPolicy, *, approval_level: int = 0
) -> tuple[ExecutionRecord, UUID]:
    """A background execution created and queued (row and Redis), as a submit leaves it."""
    lifecycle = worker.lifecycle
    new = replace(new_execution(fresh_tenant(), mode="background"), approval_level=approval_level)
    async with lifecycle.transaction() as tx:
        record, _ = await lifecycle.create(
            new,
            dedup_window=timedelta(hours=1),
            tx=tx,
        )
        queued = await lifecycle.enqueue(
            tx, record, policy, by="api", expected_from=ExecutionStatus.PENDING
        )
    return queued.record, queued.job_id


async def claimed(
    worker: Worker, policy: TimeoutPolicy, worker_id: str = "w1", *, approval_level: int = 0
) -> tuple[ExecutionRecord, LeasedJob]:
    """A submitted job leased and handed off: its execution running under the job's token."""
    _, job_id = await submitted(worker, policy, approval_level=approval_level)
    (job,) = await worker.lifecycle.dequeue_batch(worker_id, 30.0, 1)
    assert job.job_id == job_id
    (handed,) = await worker.lifecycle.hand_off([job], worker_id=worker_id)
    assert handed.record is not None
    return handed.record, job


async def test_hand_off_claims_a_queued_job_and_reports_one_whose_row_is_not_visible(
    worker: Worker, policy: TimeoutPolicy
) -> None:
    lifecycle = worker.lifecycle
    record, job_id = await submitted(worker, policy)

    async def give_up_after_the_push() -> None:
        async with lifecycle.transaction() as tx:
            ghost, _ = await lifecycle.create(
                new_execution(fresh_tenant(), mode="background"),
                dedup_window=timedelta(hours=1),
                tx=tx,
            )
            await lifecycle.enqueue(
                tx, ghost, policy, by="api", expected_from=ExecutionStatus.PENDING
            )
            raise LookupError("the submit gives up after the push")

    # A submit that pushed to Redis and then rolled back: a job whose row never appears.
    with pytest.raises(LookupError):
        await give_up_after_the_push()
    batch = await lifecycle.dequeue_batch("w1", 30.0, 5)
    assert len(batch) == 2
    assert all(job.attempts == 0 and job.deliveries == 1 for job in batch)
    handed = await lifecycle.hand_off(batch, worker_id="w1")
    assert [h.job for h in handed] == batch  # one answer per job, in order
    by_job = {h.job.job_id: h for h in handed}
    ours = by_job.pop(job_id)
    (unseen,) = by_job.values()
    assert ours.leased
    assert ours.record is not None
    assert (ours.record.id, ours.record.status, ours.record.lease_token) == (
        record.id,
        ExecutionStatus.RUNNING,
        ours.job.lease_token,
    )
    assert (ours.record.worker_id, ours.record.attempts) == ("w1", 1)
    assert [s.step_id for s in ours.record.steps] == ["first", "second"]
    assert await worker.row(job_id) == RowSeen("leased", 0, ours.job.lease_token, 0)
    assert (await worker.redis(job_id)).state == "leased"
    # The row-less job: not leased, nothing claimed; deferred, it waits its delay unspent.
    assert not unseen.leased
    assert unseen.record is None
    assert await worker.row(unseen.job.job_id) is None
    await lifecycle.defer(unseen.job, 0.5)
    assert await worker.redis(unseen.job.job_id) == RedisSeen("delayed", 0, 1, worker.clock() + 0.5)
    assert await lifecycle.dequeue_batch("w1", 30.0, 5) == []
    worker.clock.advance(0.5)
    (again,) = await lifecycle.dequeue_batch("w1", 30.0, 5)
    assert (again.job_id, again.attempts, again.deliveries) == (unseen.job.job_id, 0, 2)
    with pytest.raises(StaleLeaseError):
        await lifecycle.defer(unseen.job, 0.5)  # the first delivery's token is spent


async def test_hand_off_leaves_a_running_execution_to_the_careful_claim_which_takes_it_over(
    worker: Worker, policy: TimeoutPolicy
) -> None:
    lifecycle = worker.lifecycle
    record, job = await claimed(worker, policy, "w1")
    await lifecycle.start_step(record.id, "first", worker_id="w1", lease_token=job.lease_token)
    # w1 stalls past its lease: w2 gets the job (the expiry spends an attempt).
    worker.clock.advance(31)
    (taken,) = await lifecycle.dequeue_batch("w2", 30.0, 1)
    assert (taken.job_id, taken.attempts, taken.lease_expirations) == (job.job_id, 1, 1)
    (handed,) = await lifecycle.hand_off([taken], worker_id="w2")
    assert handed.leased
    assert handed.record is None  # running: not the one statement's to claim
    assert await lifecycle.mirror_lease(taken, worker_id="w2")
    over = await lifecycle.claim(
        record.id, lease_token=taken.lease_token, worker_id="w2", budget=timedelta(seconds=10)
    )
    assert over is not None
    assert (over.status, over.lease_token, over.worker_id, over.attempts) == (
        ExecutionStatus.RUNNING,
        taken.lease_token,
        "w2",
        2,
    )
    # The step w1 left running starts again; w1's token writes nothing any more.
    assert {s.step_id: s.status for s in over.steps}["first"] is StepStatus.PENDING
    with pytest.raises(StaleLeaseError):
        await lifecycle.finish_step(
            record.id, "first", status=StepStatus.SUCCEEDED, lease_token=job.lease_token
        )
    with pytest.raises(StaleLeaseError):
        await lifecycle.renew_lease(job, 30.0)
    assert not await lifecycle.record_renewal(
        job, lease_expires_at=datetime.now(UTC), lease_renewals=1
    )
    assert not await lifecycle.ack(job, settled_only=True)
    with pytest.raises(StaleLeaseError):
        await lifecycle.ack(job)  # Redis refuses: the row's delete is rolled back
    assert await worker.row(job.job_id) == RowSeen("leased", 1, taken.lease_token, 0)
    with pytest.raises(StaleLeaseError):
        await lifecycle.end_failed(
            record.id, by="w1", error_class="X", error_message="x", lease_token=job.lease_token
        )
    assert (await lifecycle.get(record.tenant_id, record.id)).status is ExecutionStatus.RUNNING


async def test_claim_refuses_an_execution_with_nothing_to_run(
    worker: Worker, policy: TimeoutPolicy
) -> None:
    lifecycle = worker.lifecycle
    record, job_id = await submitted(worker, policy)
    (job,) = await lifecycle.dequeue_batch("w1", 30.0, 1)
    cancelled, newly = await lifecycle.request_cancel(
        record.tenant_id, record.id, by="bob", reason="not needed"
    )
    assert newly
    assert cancelled.status is ExecutionStatus.CANCELLED
    (handed,) = await lifecycle.hand_off([job], worker_id="w1")
    assert (handed.leased, handed.record) == (True, None)
    assert await lifecycle.mirror_lease(job, worker_id="w1")
    budget = timedelta(seconds=10)
    assert (
        await lifecycle.claim(record.id, lease_token=job.lease_token, worker_id="w1", budget=budget)
        is None
    )
    assert (
        await lifecycle.claim(uuid4(), lease_token=job.lease_token, worker_id="w1", budget=budget)
        is None
    )
    # Nothing to run: dropped from both stores.
    assert await lifecycle.ack(job)
    assert await worker.row(job_id) is None
    assert await worker.redis(job_id) is None
    # Once settled, every other settle finds no row and touches nothing.
    assert not await lifecycle.settle_retry(job, error_class="X", error_message="x")
    assert not await lifecycle.dead_letter(job, error_class="X", error_message="x")
    assert not await lifecycle.release_on_shutdown(job)
    assert not await lifecycle.ack(job, settled_only=True)


async def test_renewals_extend_the_lease_up_to_the_policys_limit_and_are_mirrored(
    worker: Worker, policy: TimeoutPolicy
) -> None:
    lifecycle = worker.lifecycle
    record, job = await claimed(worker, policy)
    for renewals in range(1, policy.max_lease_renewals + 1):
        deadline = await lifecycle.renew_lease(job, 12.0)
        assert deadline == pytest.approx(worker.clock() + 12.0)
        assert await lifecycle.record_renewal(
            job,
            lease_expires_at=datetime.fromtimestamp(deadline, UTC),
            lease_renewals=renewals,
        )
    with pytest.raises(LeaseRenewalLimitError):
        await lifecycle.renew_lease(job, 12.0)
    row = await worker.row(job.job_id)
    assert row.lease_renewals == policy.max_lease_renewals
    found = await lifecycle.find(record.id, with_steps=False)
    assert found is not None
    assert found.lease_renewals == policy.max_lease_renewals
    assert found.steps == ()


async def test_a_retry_spends_an_attempt_and_waits_its_backoff_in_both_stores(
    worker: Worker, policy: TimeoutPolicy
) -> None:
    lifecycle = worker.lifecycle
    record, job = await claimed(worker, policy)
    await lifecycle.start_step(record.id, "first", worker_id="w1", lease_token=job.lease_token)
    await lifecycle.finish_step(
        record.id, "first", status=StepStatus.SUCCEEDED, lease_token=job.lease_token
    )
    await lifecycle.start_step(record.id, "second", worker_id="w1", lease_token=job.lease_token)
    await lifecycle.finish_step(
        record.id,
        "second",
        status=StepStatus.FAILED,
        error_class="ACTION_FAILED",
        error_message="no",
        lease_token=job.lease_token,
    )
    requeued = await lifecycle.requeue(
        record.id,
        lease_token=job.lease_token,
        by="w1",
        reason="retry",
        error_class="ACTION_FAILED",
        error_message="no",
    )
    assert (requeued.status, requeued.lease_token, requeued.error_class) == (
        ExecutionStatus.QUEUED,
        None,
        "ACTION_FAILED",
    )
    # The succeeded step is kept for the next run; the failed one is pending again.
    assert {s.step_id: s.status for s in requeued.steps} == {
        "first": StepStatus.SUCCEEDED,
        "second": StepStatus.PENDING,
    }
    assert await lifecycle.settle_retry(job, error_class="ACTION_FAILED", error_message="no")
    assert await worker.redis(job.job_id) == RedisSeen("delayed", 1, 1, worker.clock() + 2)
    assert await worker.row(job.job_id) == RowSeen("delayed", 1, None, 0)
    assert await lifecycle.dequeue_batch("w1", 30.0, 1) == []
    worker.clock.advance(2)
    (again,) = await lifecycle.dequeue_batch("w1", 30.0, 1)
    assert (again.job_id, again.attempts) == (job.job_id, 1)
    (handed,) = await lifecycle.hand_off([again], worker_id="w1")
    assert handed.record is not None
    assert handed.record.attempts == 2


async def test_the_last_attempt_is_dead_lettered_with_the_executions_failure(
    worker: Worker, policy: TimeoutPolicy
) -> None:
    lifecycle = worker.lifecycle
    once = replace(policy, max_attempts=1)
    record, job = await claimed(worker, once)
    await lifecycle.start_step(record.id, "first", worker_id="w1", lease_token=job.lease_token)
    ended = await lifecycle.end_run(
        record.id,
        to=ExecutionStatus.FAILED,
        by="w1",
        lease_token=job.lease_token,
        fields={"error_class": "ACTION_FAILED", "error_message": "no"},
        tenant_id=record.tenant_id,
        dead_letter=DeadLetter(job, "ACTION_FAILED", "no"),
    )
    assert (ended.status, ended.error_class) == (ExecutionStatus.FAILED, "ACTION_FAILED")
    assert await worker.dlq(record.id) == (1, "ACTION_FAILED")
    assert await worker.row(job.job_id) is None
    assert await worker.redis(job.job_id) is None
    # The settle that follows finds nothing left to do.
    assert not await lifecycle.dead_letter(job, error_class="ACTION_FAILED", error_message="no")


async def test_dead_letter_as_a_settle_moves_the_row_and_the_end_run_refuses_a_stale_token(
    worker: Worker, policy: TimeoutPolicy
) -> None:
    lifecycle = worker.lifecycle
    record, job = await claimed(worker, replace(policy, max_attempts=1))
    with pytest.raises(StaleLeaseError):
        await lifecycle.end_run(
            record.id,
            to=ExecutionStatus.FAILED,
            by="w1",
            lease_token=uuid4(),
            fields={"error_class": "X", "error_message": "x"},
            tenant_id=record.tenant_id,
            dead_letter=DeadLetter(job, "X", "x"),
        )
    # Refused as a whole: the dead-letter in its transaction was rolled back too (Redis, which
    # changed first, is not: the job is gone there; the reaper reconciles such a row).
    assert (await lifecycle.get(record.tenant_id, record.id)).status is ExecutionStatus.RUNNING
    assert await worker.dlq(record.id) is None
    assert await worker.row(job.job_id) is not None
    fresh, other = await claimed(worker, replace(policy, max_attempts=1))
    assert await lifecycle.dead_letter(other, error_class="X", error_message="x")
    assert await worker.dlq(fresh.id) == (1, "X")
    assert await worker.row(other.job_id) is None
    assert await worker.redis(other.job_id) is None


async def test_release_on_shutdown_puts_the_job_back_unspent(
    worker: Worker, policy: TimeoutPolicy
) -> None:
    lifecycle = worker.lifecycle
    record, job = await claimed(worker, policy)
    requeued = await lifecycle.requeue(
        record.id, lease_token=job.lease_token, by="w1", reason="shutdown"
    )
    assert (requeued.status, requeued.error_class) == (ExecutionStatus.QUEUED, None)
    assert await lifecycle.release_on_shutdown(job)
    assert await worker.redis(job.job_id) == RedisSeen("ready", 0, 1, None)
    row = await worker.row(job.job_id)
    assert (row.state, row.attempts, row.lease_token) == ("ready", 0, None)
    (again,) = await lifecycle.dequeue_batch("w2", 30.0, 1)
    assert (again.job_id, again.attempts, again.deliveries) == (job.job_id, 0, 2)
    with pytest.raises(StaleLeaseError):
        await lifecycle.requeue(record.id, lease_token=job.lease_token, by="w1", reason="shutdown")


async def test_a_cancel_ends_an_unheld_execution_at_once_and_flags_a_running_one(
    worker: Worker, policy: TimeoutPolicy
) -> None:
    lifecycle = worker.lifecycle
    record, job = await claimed(worker, policy)
    queued, _ = await submitted(worker, policy)
    ended, newly = await lifecycle.request_cancel(
        queued.tenant_id, queued.id, by="bob", reason=None
    )
    assert (ended.status, newly, ended.cancelled_by) == (ExecutionStatus.CANCELLED, True, "bob")
    assert {s.status for s in ended.steps} == {StepStatus.SKIPPED}
    _, again = await lifecycle.request_cancel(queued.tenant_id, queued.id, by="bob", reason=None)
    assert not again
    token = job.lease_token
    first = await lifecycle.start_step_unless_cancelled(
        record.id, "first", worker_id="w1", lease_token=token
    )
    assert first is not None
    assert first.status is StepStatus.RUNNING
    assert not await lifecycle.cancel_requested(record.id)
    running, newly = await lifecycle.request_cancel(
        record.tenant_id, record.id, by="bob", reason="stop"
    )
    assert (running.status, newly) == (ExecutionStatus.RUNNING, True)  # its worker ends it
    assert await lifecycle.cancel_requested(record.id)
    await lifecycle.finish_step(record.id, "first", status=StepStatus.SUCCEEDED, lease_token=token)
    assert (
        await lifecycle.start_step_unless_cancelled(
            record.id, "second", worker_id="w1", lease_token=token
        )
        is None
    )
    skipped = await lifecycle.skip_remaining_steps(record.id, lease_token=token, reason="cancelled")
    assert [s.step_id for s in skipped] == ["second"]
    done = await lifecycle.end_run(
        record.id,
        to=ExecutionStatus.CANCELLED,
        by="w1",
        lease_token=token,
        fields={},
        tenant_id=record.tenant_id,
    )
    assert done.status is ExecutionStatus.CANCELLED
    assert (await lifecycle.find(record.id)) is not None
    checks = (await lifecycle.get(record.tenant_id, record.id)).cancel_checks_performed
    assert checks == 4  # every check counted, the ones with a start included
    assert [s.status for s in await lifecycle.load_steps(record.id)] == [
        StepStatus.SUCCEEDED,
        StepStatus.SKIPPED,
    ]
    with pytest.raises(FSMError):
        await lifecycle.skip_remaining_steps(record.id, lease_token=None, reason="late")


async def test_end_failed_ends_a_run_once_with_its_steps_and_locks(
    worker: Worker, policy: TimeoutPolicy
) -> None:
    lifecycle = worker.lifecycle
    record, job = await claimed(worker, policy)
    token = job.lease_token
    request = LockRequest(record.tenant_id, "host:facade", "noop")
    await lifecycle.acquire_locks(
        [request], owner_token=uuid4(), owner_execution_id=record.id, ttl=timedelta(minutes=1)
    )
    await lifecycle.start_step(record.id, "first", worker_id="w1", lease_token=token)
    assert not await lifecycle.end_failed(
        record.id,
        by="w1",
        error_class="X",
        error_message="x",
        expected_from=ExecutionStatus.QUEUED,
        lease_token=token,
    )
    assert await lifecycle.end_failed(
        record.id,
        by="w1",
        error_class="BUG",
        error_message="the worker failed",
        lease_token=token,
        fail_running_steps=True,
        clear_lease=True,
        release_locks=True,
    )
    ended = await lifecycle.get(record.tenant_id, record.id)
    assert (ended.status, ended.error_class, ended.lease_token) == (
        ExecutionStatus.FAILED,
        "BUG",
        None,
    )
    assert {s.step_id: s.status for s in ended.steps} == {
        "first": StepStatus.FAILED,
        "second": StepStatus.SKIPPED,
    }
    # Its locks are free for another owner; a second end changes nothing.
    await lifecycle.acquire_locks(
        [request], owner_token=uuid4(), owner_execution_id=uuid4(), ttl=timedelta(minutes=1)
    )
    assert not await lifecycle.end_failed(record.id, by="w1", error_class="X", error_message="x")


async def test_the_last_step_and_the_execution_succeed_in_one_write_or_not_at_all(
    worker: Worker, policy: TimeoutPolicy
) -> None:
    lifecycle = worker.lifecycle
    record, job = await claimed(worker, policy)
    token = job.lease_token
    await lifecycle.acquire_locks(
        [LockRequest(record.tenant_id, "host:last", "noop")],
        owner_token=uuid4(),
        owner_execution_id=record.id,
        ttl=timedelta(minutes=1),
    )
    for step_id in ("first", "second"):
        await lifecycle.start_step(record.id, step_id, worker_id="w1", lease_token=token)
    await lifecycle.finish_step(record.id, "first", status=StepStatus.SUCCEEDED, lease_token=token)
    fields = {"result_summary": {"counts": {"succeeded": 2}}}
    kwargs: dict[str, Any] = {"by": "w1", "fields": fields, "tenant_id": record.tenant_id}
    assert (
        await lifecycle.finish_last_step(
            record.id, "second", result={"ok": 1}, lease_token=uuid4(), **kwargs
        )
        is None
    )
    assert (
        await lifecycle.finish_last_step(
            record.id, "first", result={"ok": 1}, lease_token=token, **kwargs
        )
        is None
    )  # not running
    both = await lifecycle.finish_last_step(
        record.id, "second", result={"ok": 1}, lease_token=token, **kwargs
    )
    assert both is not None
    final, step = both
    assert (final.status, final.result_summary) == (
        ExecutionStatus.SUCCEEDED,
        fields["result_summary"],
    )
    assert (step.step_id, step.status, step.result) == ("second", StepStatus.SUCCEEDED, {"ok": 1})
    await lifecycle.acquire_locks(  # freed with the end
        [LockRequest(record.tenant_id, "host:last", "noop")],
        owner_token=uuid4(),
        owner_execution_id=None,
        ttl=timedelta(minutes=1),
    )
    # The job's row went with the end; what is left is the Redis ack.
    assert await worker.row(job.job_id) is None
    assert await lifecycle.ack_ended(job)
    assert await worker.redis(job.job_id) is None


async def test_locks_are_all_or_nothing_not_reentrant_and_freed_only_by_their_owner(
    worker: Worker,
) -> None:
    lifecycle = worker.lifecycle
    tenant = fresh_tenant()
    a, b, c = (LockRequest(tenant, f"host:{name}", "noop") for name in "abc")
    ttl = timedelta(minutes=1)
    first, holder = uuid4(), uuid4()
    held = await lifecycle.acquire_locks(
        [b, a, a], owner_token=first, owner_execution_id=holder, ttl=ttl
    )
    assert held.keys == sorted({a.key, b.key})
    with pytest.raises(ResourceBusyError) as busy:
        await lifecycle.acquire_locks([b, c], owner_token=uuid4(), owner_execution_id=None, ttl=ttl)
    assert busy.value.details["lock_key"] == b.key
    assert busy.value.details["held_by_execution_id"] == str(holder)
    # Nothing kept of the refused set: c is free.
    taken_c = await lifecycle.acquire_locks(
        [c], owner_token=uuid4(), owner_execution_id=None, ttl=ttl
    )
    with pytest.raises(ResourceBusyError):  # not re-entrant for an owner of no execution
        await lifecycle.acquire_locks(
            [c], owner_token=taken_c.owner_token, owner_execution_id=None, ttl=ttl
        )
    assert await lifecycle.release_locks(LockSet(uuid4(), held.locks)) == 0  # not the owner
    # The same execution re-takes its own (resumed, or taken over): the old owner is out.
    again = await lifecycle.acquire_locks(
        [a], owner_token=uuid4(), owner_execution_id=holder, ttl=ttl
    )
    assert await lifecycle.release_locks(held) == 1  # b only: a is the new owner's now
    assert await lifecycle.release_locks(again) == 1
    assert await lifecycle.release_locks(held) == 0
    assert await lifecycle.release_locks(taken_c) == 1
    with pytest.raises(ValueError, match="ttl"):
        await lifecycle.acquire_locks(
            [a], owner_token=first, owner_execution_id=None, ttl=timedelta(0)
        )


async def test_an_immediate_start_runs_a_pending_execution_once(worker: Worker) -> None:
    lifecycle = worker.lifecycle
    tenant = fresh_tenant()
    record, _ = await lifecycle.create(new_execution(tenant), dedup_window=timedelta(hours=1))
    started = await lifecycle.start_run(record, worker_id="w1")
    assert (started.status, started.worker_id) == (ExecutionStatus.RUNNING, "w1")
    assert started.deadline_at is not None
    assert started.started_at is not None
    with pytest.raises(FSMError):
        await lifecycle.start_run(record, worker_id="w2")
    assert not await lifecycle.retire_key(record.id)  # running: its key stays
    await lifecycle.end_failed(record.id, by="w1", error_class="BUSY", error_message="busy")
    assert await lifecycle.retire_key(record.id)
    assert not await lifecycle.retire_key(record.id)
    assert (await lifecycle.get(tenant, record.id)).idempotency_retired_at is not None


async def test_a_level_3_pause_requests_the_step_approval_and_gives_the_job_up(
    worker: Worker, policy: TimeoutPolicy
) -> None:
    lifecycle = worker.lifecycle
    record, job = await claimed(worker, policy, approval_level=3)
    token = job.lease_token
    await lifecycle.start_step(record.id, "first", worker_id="w1", lease_token=token)
    await lifecycle.finish_step(record.id, "first", status=StepStatus.SUCCEEDED, lease_token=token)
    assert await lifecycle.pause_for_approval(job, "second", ttl=timedelta(hours=1), by="w1")
    paused = await lifecycle.get(record.tenant_id, record.id)
    assert (paused.status, paused.lease_token) == (ExecutionStatus.AWAITING_APPROVAL, None)
    assert {s.step_id: s.status for s in paused.steps} == {
        "first": StepStatus.SUCCEEDED,
        "second": StepStatus.AWAITING_APPROVAL,
    }
    assert await worker.row(job.job_id) is None
    assert await worker.redis(job.job_id) is None
    assert not await lifecycle.pause_for_approval(job, "second", ttl=timedelta(hours=1), by="w1")
    # Cancelled while its step ran: the pause ends it cancelled instead.
    other, other_job = await claimed(worker, policy, approval_level=3)
    await lifecycle.request_cancel(other.tenant_id, other.id, by="bob", reason=None)
    assert await lifecycle.pause_for_approval(other_job, "first", ttl=timedelta(hours=1), by="w1")
    ended = await lifecycle.get(other.tenant_id, other.id)
    assert (ended.status, ended.lease_token) == (ExecutionStatus.CANCELLED, None)
    assert {s.status for s in ended.steps} == {StepStatus.SKIPPED}
    assert await worker.row(other_job.job_id) is None


async def test_a_settle_while_redis_is_down_leaves_the_postgres_side_as_it_was(
    worker: Worker, policy: TimeoutPolicy, db_pool: asyncpg.Pool
) -> None:
    record, job = await claimed(worker, replace(policy, max_attempts=1))
    dead = create_redis_client("redis://127.0.0.1:9/0", socket_timeout=0.5, retries=0)
    try:
        if worker.kind == "fake":
            assert isinstance(worker.lifecycle, InMemoryLifecycle)
            worker.lifecycle.queue_up = False
            down: ExecutionLifecycle = worker.lifecycle
        else:
            down = PostgresRedisLifecycle(db_pool, RedisQueue(dead))
        with pytest.raises(QueueUnavailableError):
            await down.dequeue_batch("w1", 30.0, 1)
        with pytest.raises(QueueUnavailableError):
            await down.ack(job)
        with pytest.raises(QueueUnavailableError):
            await down.settle_retry(job, error_class="X", error_message="x")
        with pytest.raises(QueueUnavailableError):
            await down.release_on_shutdown(job)
        with pytest.raises(QueueUnavailableError):
            await down.end_run(
                record.id,
                to=ExecutionStatus.FAILED,
                by="w1",
                lease_token=job.lease_token,
                fields={"error_class": "X", "error_message": "x"},
                tenant_id=record.tenant_id,
                dead_letter=DeadLetter(job, "X", "x"),
            )
    finally:
        await dead.aclose()
        if isinstance(worker.lifecycle, InMemoryLifecycle):
            worker.lifecycle.queue_up = True
    # Every refusal rolled its Postgres side back: the lease simply runs on (or expires).
    assert await worker.row(job.job_id) == RowSeen("leased", 0, job.lease_token, 0)
    assert (await worker.redis(job.job_id)).state == "leased"
    assert await worker.dlq(record.id) is None
    assert (await worker.lifecycle.get(record.tenant_id, record.id)).status is (
        ExecutionStatus.RUNNING
    )
    # Its last lease expiring, the job is dead in Redis, for the reaper to dead-letter.
    worker.clock.advance(31)
    assert await worker.lifecycle.dequeue_batch("w2", 30.0, 1) == []
    assert (await worker.redis(job.job_id)).state == "dead"
    with pytest.raises(ValueError, match="count"):
        await worker.lifecycle.dequeue_batch("w2", 30.0, 0)


async def test_the_careful_claim_also_starts_a_queued_execution_and_its_lease_needs_its_row(
    worker: Worker, policy: TimeoutPolicy
) -> None:
    lifecycle = worker.lifecycle
    record, job_id = await submitted(worker, policy)
    (job,) = await lifecycle.dequeue_batch("w1", 30.0, 1)
    assert await lifecycle.mirror_lease(job, worker_id="w1")
    started = await lifecycle.claim(
        record.id, lease_token=job.lease_token, worker_id="w1", budget=timedelta(seconds=10)
    )
    assert started is not None
    assert (started.status, started.lease_token, started.attempts) == (
        ExecutionStatus.RUNNING,
        job.lease_token,
        1,
    )
    await lifecycle.end_failed(
        record.id, by="w1", error_class="X", error_message="x", lease_token=job.lease_token
    )
    with pytest.raises(FSMError):  # ended, its token kept: refused by status, not by lease
        await lifecycle.requeue(record.id, lease_token=job.lease_token, by="w1", reason="retry")
    assert await lifecycle.ack(job)
    # A lease whose row is gone (or never came) is not mirrored anywhere.
    assert not await lifecycle.mirror_lease(job, worker_id="w1")
    with pytest.raises(ValueError, match="delay_s"):
        await lifecycle.defer(job, -1.0)
    assert await worker.row(job_id) is None


async def test_cancelling_an_execution_awaiting_approval_closes_its_request(
    world: tuple[str, Core, Any], approvals: ApprovalLifecycle
) -> None:
    _, core, _ = world
    tenant = fresh_tenant()
    record, approval = await waiting_for_approval(core, approvals, tenant)
    _, requested = await core.lifecycle.request_cancel(tenant, record.id, by="alice", reason="x")
    assert requested
    assert (await core.lifecycle.get(tenant, record.id)).status is S.CANCELLED
    assert (await approvals.get(tenant, approval.id)).state is ApprovalState.INVALIDATED
    with pytest.raises(ApprovalInvalidatedError):
        await approvals.decide(approval.id, tenant_id=tenant, decision=decision())
    assert await approvals.list_pending(tenant) == ([], None)


async def test_the_workers_level_3_pause_opens_the_request_the_approvals_port_decides(
    worker: Worker, policy: TimeoutPolicy, db_pool: asyncpg.Pool
) -> None:
    lifecycle = worker.lifecycle
    if worker.kind == "fake":
        assert isinstance(lifecycle, InMemoryLifecycle)
        approvals: ApprovalLifecycle = InMemoryApprovals(lifecycle)
    else:
        approvals = PostgresApprovals(db_pool)
    record, job = await claimed(worker, policy, approval_level=3)
    assert await lifecycle.pause_for_approval(job, "second", ttl=TTL, by="w1")
    paused = await approvals.step_approval(record.tenant_id, record.id, "second")
    assert paused is not None
    assert (paused.level, paused.state, paused.requested_by, paused.plan_hash) == (
        3,
        ApprovalState.PENDING,
        record.actor_id,
        record.plan_hash,
    )
    assert [a.id for a in (await approvals.list_pending(record.tenant_id))[0]] == [paused.id]
    granted = await approvals.decide(paused.id, tenant_id=record.tenant_id, decision=decision())
    assert granted.state is ApprovalState.APPROVED
    assert (await lifecycle.get(record.tenant_id, record.id)).status is S.AWAITING_APPROVAL


async def test_a_run_its_lease_holder_ends_takes_its_row_along_and_its_redis_entry_is_settled(
    world: tuple[str, Core, Any], policy: TimeoutPolicy
) -> None:
    """The handoff writes and counts the first renewal (the policy's lease); the holder's end of
    the run deletes the job's row with it; handed off again before the Redis ack (its holder
    died), the job is reported settled and nothing is written; ack_ended acks it once."""
    kind, core, _ = world
    if kind == "fake":
        assert isinstance(core.lifecycle, InMemoryLifecycle)
        core.lifecycle.policies[policy.id] = policy
    tenant = fresh_tenant()
    async with core.lifecycle.transaction() as tx:
        made = await core.lifecycle.create_queued(
            tx,
            new_execution(tenant, mode="background"),
            policy,
            dedup_window=timedelta(hours=1),
            max_waiting=10,
            by="api",
        )
    assert isinstance(made, CreatedQueued)
    (job,) = await core.lifecycle.dequeue_batch("w1", 30.0, 1)
    assert job.job_id == made.job_id
    renewal = FirstRenewal(override_s=None, default_s=30.0)
    (handed,) = await core.lifecycle.hand_off([job], worker_id="w1", first_renewal=renewal)
    assert handed.record is not None
    assert (handed.lease_s, handed.record.lease_renewals) == (lease_seconds(policy), 1)
    await core.lifecycle.renew_lease(job, lease_seconds(policy))
    ended = await core.lifecycle.end_run(
        made.record.id,
        to=ExecutionStatus.SUCCEEDED,
        by="w1",
        lease_token=job.lease_token,
        fields={},
        tenant_id=tenant,
    )
    assert ended.status is ExecutionStatus.SUCCEEDED
    assert await core.jobs_of(made.record.id) == 0
    (late,) = await core.lifecycle.hand_off([job], worker_id="w2", first_renewal=renewal)
    assert (late.leased, late.settled, late.record) == (False, True, None)
    after = await core.lifecycle.get(tenant, made.record.id)
    assert (after.status, after.worker_id) == (ExecutionStatus.SUCCEEDED, "w1")
    assert await core.lifecycle.ack_ended(job)
    assert not await core.lifecycle.ack_ended(job)


async def test_a_request_joins_the_submits_transaction_and_goes_with_its_rollback(
    world: tuple[str, Core, Any], approvals: ApprovalLifecycle
) -> None:
    _, core, _ = world
    tenant = fresh_tenant()
    new = replace(new_execution(tenant, mode="background"), approval_level=1)
    opened: list[ApprovalRecord] = []

    async def submit(give_up: bool) -> ExecutionRecord:
        # What the api's approval path does: create, open the request, read it back, one tx.
        async with core.lifecycle.transaction() as tx:
            record, _ = await core.lifecycle.create(new, dedup_window=TTL, tx=tx)
            opened.append(await approvals.request(record.id, ttl=TTL, by="api", tx=tx))
            waiting = await core.lifecycle.get(tenant, record.id, tx=tx)
            if give_up:
                raise LookupError("the submit fails after the request")
        return waiting

    with pytest.raises(LookupError):
        await submit(give_up=True)
    with pytest.raises(NotFoundError):
        await approvals.get(tenant, opened[0].id)
    with pytest.raises(NotFoundError):
        await core.lifecycle.get(tenant, opened[0].execution_id)
    waiting = await submit(give_up=False)
    assert (waiting.status, waiting.approval_id) == (S.AWAITING_APPROVAL, opened[1].id)
    assert await approvals.list_pending(tenant) == (
        [await approvals.get(tenant, opened[1].id)],
        None,
    )


async def test_the_workers_reads_and_checks_of_an_unknown_execution(worker: Worker) -> None:
    lifecycle = worker.lifecycle
    unknown = uuid4()
    assert await lifecycle.find(unknown) is None
    assert await lifecycle.find(unknown, with_steps=False) is None
    with pytest.raises(NotFoundError):
        await lifecycle.cancel_requested(unknown)
    with pytest.raises(NotFoundError):
        await lifecycle.start_step_unless_cancelled(unknown, "first", worker_id="w1")
    with pytest.raises(NotFoundError):
        await lifecycle.end_failed(unknown, by="w1", error_class="X", error_message="x")


# --- The api: reads, cancel, the dead-letter queue, queue stats and drain -------------------


async def test_cancel_of_a_queued_execution_ends_it_and_takes_its_job_out_of_both_stores(
    worker: Worker, policy: TimeoutPolicy
) -> None:
    lifecycle = worker.lifecycle
    record, job_id = await submitted(worker, policy)
    cancelled = await lifecycle.cancel(
        record.tenant_id, record.id, by="bob", reason="not needed", initiator="user"
    )
    assert (cancelled.status, cancelled.cancelled_by) == (ExecutionStatus.CANCELLED, "bob")
    assert (cancelled.cancel_reason, cancelled.cancel_initiator) == ("not needed", "user")
    assert {s.status for s in cancelled.steps} == {StepStatus.SKIPPED}
    assert await worker.row(job_id) is None
    assert await worker.redis(job_id) is None
    assert await lifecycle.dequeue_batch("w1", 30.0, 5) == []
    # Idempotent: a second cancel (another caller) changes nothing and is still answered.
    again = await lifecycle.cancel(
        record.tenant_id, record.id, by="carol", reason=None, initiator="system"
    )
    assert (again.status, again.cancelled_by) == (ExecutionStatus.CANCELLED, "bob")
    assert (again.cancel_reason, again.cancel_initiator) == ("not needed", "user")


async def test_cancel_of_a_running_execution_is_recorded_and_its_leased_job_stays_with_its_worker(
    worker: Worker, policy: TimeoutPolicy
) -> None:
    lifecycle = worker.lifecycle
    record, job = await claimed(worker, policy)
    requested = await lifecycle.cancel(
        record.tenant_id, record.id, by="ci-bot", reason="stop", initiator="system"
    )
    assert (requested.status, requested.cancelled_by) == (ExecutionStatus.RUNNING, "ci-bot")
    assert (requested.cancel_reason, requested.cancel_initiator) == ("stop", "system")
    assert requested.cancelled_at is not None
    # Its worker ends the run at its next check; the job is still its to settle.
    assert (await worker.row(job.job_id)).state == "leased"
    assert (await worker.redis(job.job_id)).state == "leased"
    assert await lifecycle.cancel_requested(record.id)


async def test_cancel_of_an_ended_execution_or_of_another_tenants_changes_nothing(
    worker: Worker, policy: TimeoutPolicy
) -> None:
    lifecycle = worker.lifecycle
    record, job = await claimed(worker, policy)
    await lifecycle.end_run(
        record.id,
        to=ExecutionStatus.SUCCEEDED,
        by="w1",
        lease_token=job.lease_token,
        fields={},
        tenant_id=record.tenant_id,
    )
    ended = await lifecycle.cancel(
        record.tenant_id, record.id, by="bob", reason="late", initiator="user"
    )
    assert (ended.status, ended.cancelled_by, ended.cancelled_at) == (
        ExecutionStatus.SUCCEEDED,
        None,
        None,
    )
    queued, _ = await submitted(worker, policy)
    with pytest.raises(NotFoundError):
        await lifecycle.cancel(
            fresh_tenant(), queued.id, by="mallory", reason=None, initiator="user"
        )
    assert (await lifecycle.get(queued.tenant_id, queued.id)).status is ExecutionStatus.QUEUED


async def test_cancel_while_redis_is_down_still_ends_the_execution_and_drops_its_row(
    worker: Worker, policy: TimeoutPolicy, db_pool: asyncpg.Pool
) -> None:
    record, job_id = await submitted(worker, policy)
    dead = create_redis_client("redis://127.0.0.1:9/0", socket_timeout=0.5, retries=0)
    try:
        if worker.kind == "fake":
            assert isinstance(worker.lifecycle, InMemoryLifecycle)
            worker.lifecycle.queue_up = False
            down: ExecutionLifecycle = worker.lifecycle
        else:
            down = PostgresRedisLifecycle(db_pool, RedisQueue(dead))
        cancelled = await down.cancel(
            record.tenant_id, record.id, by="bob", reason=None, initiator="user"
        )
    finally:
        await dead.aclose()
    assert cancelled.status is ExecutionStatus.CANCELLED
    assert await worker.row(job_id) is None
    # Left in Redis: a worker that still dequeues it finds its execution ended (settled).
    assert (await worker.redis(job_id)).state == "ready"


async def test_list_executions_pages_one_tenants_executions_newest_first_with_filters(
    worker: Worker,
) -> None:
    lifecycle = worker.lifecycle
    tenant = fresh_tenant()
    made = []
    for mode in ("immediate", "background", "immediate"):
        record, _ = await lifecycle.create(
            new_execution(tenant, mode=mode), dedup_window=timedelta(hours=1)
        )
        made.append(record)
    await lifecycle.create(new_execution(fresh_tenant()), dedup_window=timedelta(hours=1))
    await lifecycle.cancel(tenant, made[0].id, by="bob", reason=None, initiator="user")
    first, token = await lifecycle.list_executions(
        tenant, statuses=(), mode=None, page_size=2, page_token=None
    )
    assert [r.id for r in first] == [made[2].id, made[1].id]
    assert token is not None
    rest, end = await lifecycle.list_executions(
        tenant, statuses=(), mode=None, page_size=2, page_token=token
    )
    assert ([r.id for r in rest], end) == ([made[0].id], None)
    assert rest[0].status is ExecutionStatus.CANCELLED
    immediate, _ = await lifecycle.list_executions(
        tenant, statuses=(), mode="immediate", page_size=0, page_token=None
    )
    assert [r.id for r in immediate] == [made[2].id, made[0].id]
    pending, _ = await lifecycle.list_executions(
        tenant, statuses=(ExecutionStatus.PENDING,), mode=None, page_size=0, page_token=None
    )
    assert [r.id for r in pending] == [made[2].id, made[1].id]
    # A token is bound to its listing; bad filters and sizes are refused.
    for bad in (
        {"statuses": (), "mode": "immediate", "page_size": 2, "page_token": token},
        {"statuses": (), "mode": "sometimes", "page_size": 0, "page_token": None},
        {"statuses": (), "mode": None, "page_size": -1, "page_token": None},
        {"statuses": ("stalled",), "mode": None, "page_size": 0, "page_token": None},
        {"statuses": (), "mode": None, "page_size": 0, "page_token": "not-a-token"},
    ):
        with pytest.raises(InvalidPageRequestError):
            await lifecycle.list_executions(tenant, **bad)  # type: ignore[arg-type]
    assert await lifecycle.list_executions(
        fresh_tenant(), statuses=(), mode=None, page_size=0, page_token=None
    ) == ([], None)


async def dead_lettered(
    worker: Worker, policy: TimeoutPolicy, error_class: str = "Boom"
) -> tuple[ExecutionRecord, UUID]:
    """A background execution that ended failed on its last attempt: (record, its DLQ id)."""
    lifecycle = worker.lifecycle
    record, job = await claimed(worker, policy)
    await lifecycle.end_run(
        record.id,
        to=ExecutionStatus.FAILED,
        by="w1",
        lease_token=job.lease_token,
        fields={"error_class": error_class, "error_message": "it broke"},
        tenant_id=record.tenant_id,
        dead_letter=DeadLetter(job, error_class, "it broke"),
    )
    (entry,), _ = await lifecycle.dead_letters(
        tenant_id=record.tenant_id, error_class=None, page_size=0, page_token=None
    )
    assert (entry.execution_id, entry.tenant_id, entry.attempts) == (record.id, record.tenant_id, 1)
    assert (entry.error_class, entry.error_message) == (error_class, "it broke")
    assert entry.requeued_at is None
    return record, entry.id


async def test_dead_letters_list_and_read_one_tenants_open_entries(
    worker: Worker, policy: TimeoutPolicy
) -> None:
    lifecycle = worker.lifecycle
    before = await lifecycle.open_dead_letters()
    record, dlq_id = await dead_lettered(worker, policy, "Boom")
    other, other_id = await dead_lettered(worker, policy, "Bang")
    assert await lifecycle.open_dead_letters() == before + 2
    listed, _ = await lifecycle.dead_letters(
        tenant_id=None, error_class="Bang", page_size=200, page_token=None
    )
    assert other_id in {e.id for e in listed}
    assert dlq_id not in {e.id for e in listed}
    assert await lifecycle.dead_letters(
        tenant_id=record.tenant_id, error_class="Bang", page_size=0, page_token=None
    ) == ([], None)
    entry = await lifecycle.dead_letter_entry(dlq_id, tenant_id=record.tenant_id)
    assert (entry.id, entry.execution_id) == (dlq_id, record.id)
    assert (await lifecycle.dead_letter_entry(dlq_id, tenant_id=None)).id == dlq_id
    for tenant, unknown in ((other.tenant_id, dlq_id), (None, uuid4())):
        with pytest.raises(NotFoundError):
            await lifecycle.dead_letter_entry(unknown, tenant_id=tenant)
        with pytest.raises(NotFoundError):
            async with lifecycle.transaction() as tx:
                await lifecycle.lock_dead_letter(tx, unknown, tenant_id=tenant)
    with pytest.raises(InvalidPageRequestError):
        await lifecycle.dead_letters(
            tenant_id=None, error_class=None, page_size=-1, page_token=None
        )


async def requeue(
    worker: Worker, policy: TimeoutPolicy, dlq_id: UUID, tenant_id: str
) -> tuple[Any, Any]:
    """The api's requeue through the port: lock, retire the old key, create, requeue."""
    lifecycle = worker.lifecycle
    async with lifecycle.transaction() as tx:
        entry = await lifecycle.lock_dead_letter(tx, dlq_id, tenant_id=tenant_id)
        old = await lifecycle.get(entry.tenant_id, entry.execution_id, tx=tx)
        assert await lifecycle.retire_key(old.id, tx=tx)
        new = replace(
            new_execution(old.tenant_id, key=old.idempotency_key, mode="background"),
            steps=[(s.step_id, s.position, s.action, s.action_class) for s in old.steps],
        )
        record, created = await lifecycle.create(new, dedup_window=timedelta(hours=1), tx=tx)
        assert created
        return await lifecycle.requeue_dead_letter(
            tx, entry, record, policy, by="admin", event_payload={"dlq_id": str(dlq_id)}
        )


async def test_requeue_of_a_dead_letter_queues_a_new_execution_and_marks_the_entry_once(
    worker: Worker, policy: TimeoutPolicy
) -> None:
    lifecycle = worker.lifecycle
    old, dlq_id = await dead_lettered(worker, policy)
    before = await lifecycle.open_dead_letters()
    queued, marked = await requeue(worker, policy, dlq_id, old.tenant_id)
    assert queued.record.id != old.id
    assert queued.record.status is ExecutionStatus.QUEUED
    assert (marked.id, marked.requeued_by) == (dlq_id, "admin")
    assert marked.requeued_at is not None
    assert (await worker.row(queued.job_id)).state == "ready"
    assert (await worker.redis(queued.job_id)).state == "ready"
    # The old execution never moves again; its entry is no longer open.
    assert (await lifecycle.get(old.tenant_id, old.id)).status is ExecutionStatus.FAILED
    assert await lifecycle.open_dead_letters() == before - 1
    assert await lifecycle.dead_letters(
        tenant_id=old.tenant_id, error_class=None, page_size=0, page_token=None
    ) == ([], None)
    assert (await lifecycle.dead_letter_entry(dlq_id, tenant_id=None)).requeued_by == "admin"
    # A second requeue is refused, naming the execution the first one made.
    with pytest.raises(DlqEntryRequeuedError) as refused:
        async with lifecycle.transaction() as tx:
            await lifecycle.lock_dead_letter(tx, dlq_id, tenant_id=None)
    assert refused.value.details["requeued_as"] == str(queued.record.id)
    assert refused.value.details["requeued_by"] == "admin"


async def test_requeue_while_redis_is_down_leaves_the_entry_open_and_nothing_queued(
    worker: Worker, policy: TimeoutPolicy, db_pool: asyncpg.Pool
) -> None:
    old, dlq_id = await dead_lettered(worker, policy)
    dead = create_redis_client("redis://127.0.0.1:9/0", socket_timeout=0.5, retries=0)
    up = worker.lifecycle
    try:
        if worker.kind == "fake":
            assert isinstance(up, InMemoryLifecycle)
            up.queue_up = False
        else:
            worker = replace(worker, lifecycle=PostgresRedisLifecycle(db_pool, RedisQueue(dead)))
        with pytest.raises(QueueUnavailableError):
            await requeue(worker, policy, dlq_id, old.tenant_id)
    finally:
        await dead.aclose()
    if isinstance(up, InMemoryLifecycle):
        up.queue_up = True
    entry = await up.dead_letter_entry(dlq_id, tenant_id=old.tenant_id)
    assert entry.requeued_at is None
    listed, _ = await up.list_executions(
        old.tenant_id, statuses=(), mode=None, page_size=0, page_token=None
    )
    assert [r.id for r in listed] == [old.id]  # the new execution was rolled back
    assert (await up.get(old.tenant_id, old.id)).idempotency_retired_at is None


async def test_queue_stats_count_ready_and_leased_jobs_and_a_drain_stops_dispatch(
    worker: Worker, policy: TimeoutPolicy
) -> None:
    lifecycle = worker.lifecycle
    for _ in range(3):
        await submitted(worker, policy)
    (job,) = await lifecycle.dequeue_batch("w1", 30.0, 1)
    stats = await lifecycle.queue_stats()
    assert (stats.ready_by_priority, stats.leased, stats.delayed, stats.dead) == ({50: 2}, 1, 0, 0)
    assert stats.oldest_ready_age_s is not None
    assert not stats.paused
    await lifecycle.set_dispatch_paused(True)
    assert (await lifecycle.queue_stats()).paused
    assert await lifecycle.dequeue_batch("w1", 30.0, 5) == []
    await lifecycle.renew_lease(job, 30.0)  # a lease already granted is unaffected
    await lifecycle.set_dispatch_paused(False)
    assert not (await lifecycle.queue_stats()).paused
    assert len(await lifecycle.dequeue_batch("w1", 30.0, 5)) == 2


async def test_without_a_queue_stats_drain_and_requeue_are_unavailable(
    worker: Worker, db_pool: asyncpg.Pool, policy: TimeoutPolicy
) -> None:
    if worker.kind == "fake":
        lifecycle: ExecutionLifecycle = InMemoryLifecycle(queue_configured=False)
    else:
        lifecycle = PostgresRedisLifecycle(db_pool, None)
    with pytest.raises(QueueUnavailableError):
        await lifecycle.queue_stats()
    with pytest.raises(QueueUnavailableError):
        await lifecycle.set_dispatch_paused(True)
    # Nothing can be requeued; a cancel still ends an execution (there is no queue to leave).
    tenant = fresh_tenant()
    record, _ = await lifecycle.create(
        new_execution(tenant, mode="background"), dedup_window=timedelta(hours=1)
    )
    entry = DlqEntry(
        id=uuid4(),
        execution_id=uuid4(),
        tenant_id=tenant,
        attempts=1,
        error_class=None,
        error_message=None,
        last_error=None,
        created_at=datetime.now(UTC),
        requeued_at=None,
        requeued_by=None,
    )
    with pytest.raises(QueueUnavailableError):
        async with lifecycle.transaction() as tx:
            await lifecycle.requeue_dead_letter(
                tx, entry, record, policy, by="root", event_payload={}
            )
    assert (await lifecycle.get(tenant, record.id)).status is ExecutionStatus.PENDING
    cancelled = await lifecycle.cancel(tenant, record.id, by="bob", reason=None, initiator="user")
    assert cancelled.status is ExecutionStatus.CANCELLED


async def test_a_runs_lock_is_taken_with_its_first_steps_start_or_nothing_is(
    worker: Worker, policy: TimeoutPolicy
) -> None:
    """lock_and_start_step: the lock, the cancel check and the start in one write, each refusal
    leaving the key as it was and the step not started."""
    lifecycle = worker.lifecycle
    record, job = await claimed(worker, policy)
    token, ttl = job.lease_token, timedelta(minutes=1)
    key = LockRequest(record.tenant_id, "host:fold", "noop")

    async def checks() -> int:
        return (await lifecycle.get(record.tenant_id, record.id)).cancel_checks_performed

    async def first_status() -> StepStatus:
        steps = {s.step_id: s.status for s in await lifecycle.load_steps(record.id)}
        return steps["first"]

    def start(
        lease: UUID | None,
        owner: UUID,
        step_id: str = "first",
        *,
        eid: UUID = record.id,
        lease_for: timedelta = ttl,
    ) -> Any:
        return lifecycle.lock_and_start_step(
            eid,
            step_id,
            worker_id="w1",
            lease_token=lease,
            lock=key,
            owner_token=owner,
            ttl=lease_for,
        )

    other = uuid4()
    holder = await lifecycle.acquire_locks(
        [key], owner_token=uuid4(), owner_execution_id=other, ttl=ttl
    )
    with pytest.raises(ResourceBusyError) as busy:
        await start(token, uuid4())
    assert (busy.value.details["lock_key"], busy.value.details["held_by_execution_id"]) == (
        key.key,
        str(other),
    )
    # Busy: nothing counted or started, the holder's lock untouched.
    assert (await checks(), await first_status()) == (0, StepStatus.PENDING)
    assert await lifecycle.release_locks(holder) == 1
    # A lease that does not own the execution: refused, the lock it took freed again.
    with pytest.raises(StaleLeaseError):
        await start(uuid4(), uuid4())
    assert await first_status() is StepStatus.PENDING
    free = await lifecycle.acquire_locks(
        [key], owner_token=uuid4(), owner_execution_id=other, ttl=ttl
    )
    assert await lifecycle.release_locks(free) == 1
    # The lock an earlier run of this execution left (its worker died) is taken over.
    earlier = await lifecycle.acquire_locks(
        [key], owner_token=uuid4(), owner_execution_id=record.id, ttl=ttl
    )
    owner = uuid4()
    held, step = await start(token, owner)
    assert await lifecycle.release_locks(earlier) == 0
    assert held.fencing_tokens[key.key] > earlier.fencing_tokens[key.key]
    assert step is not None
    assert (step.step_id, step.status, step.attempt) == ("first", StepStatus.RUNNING, 1)
    assert held.owner_token == owner
    assert held.keys == [key.key]
    assert held.expires_at is not None
    assert held.expires_at > datetime.now(UTC)
    # Held for this run: not for another execution, and it outranks every earlier grant.
    with pytest.raises(ResourceBusyError):
        await lifecycle.acquire_locks([key], owner_token=uuid4(), owner_execution_id=other, ttl=ttl)
    assert held.fencing_tokens[key.key] > holder.fencing_tokens[key.key]
    assert await checks() == 2  # the refused start's check counted too, as ever
    # Cancelled before its next start: the lock is taken, nothing started; the end frees it.
    await lifecycle.finish_step(record.id, "first", status=StepStatus.SUCCEEDED, lease_token=token)
    await lifecycle.release_locks(held)
    await lifecycle.request_cancel(record.tenant_id, record.id, by="bob", reason="stop")
    again, none = await start(token, uuid4(), "second")
    assert none is None
    assert await checks() == 3
    with pytest.raises(ResourceBusyError):
        await lifecycle.acquire_locks([key], owner_token=uuid4(), owner_execution_id=other, ttl=ttl)
    await lifecycle.skip_remaining_steps(record.id, lease_token=token, reason="cancelled")
    await lifecycle.end_run(
        record.id,
        to=ExecutionStatus.CANCELLED,
        by="w1",
        lease_token=token,
        fields={},
        tenant_id=record.tenant_id,
    )
    assert await lifecycle.release_locks(again) == 0  # freed by the end
    # An unknown execution takes nothing; a lease must be positive.
    with pytest.raises(NotFoundError):
        await start(None, uuid4(), eid=uuid4())
    with pytest.raises(ValueError, match="ttl"):
        await start(None, uuid4(), lease_for=timedelta(0))
    free = await lifecycle.acquire_locks(
        [key], owner_token=uuid4(), owner_execution_id=other, ttl=ttl
    )
    assert await lifecycle.release_locks(free) == 1
