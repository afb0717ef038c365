"""The Postgres side of the queue against real Postgres and Redis: the ``execution_queue`` mirror,
the lease handoff that fences the previous holder, the DLQ (spec §5.2: exactly one entry), DLQ
listing and requeue, the submit ordering rule, and the reaper's reconcile after Redis loses jobs.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID, uuid4

import asyncpg
import pytest
from redis.asyncio import Redis

from opsconductor.common.errors import (
    ConflictError,
    NotFoundError,
    QueueUnavailableError,
    StaleLeaseError,
)
from opsconductor.common.fsm import ExecutionStatus
from opsconductor.lifecycle.queue import RedisQueue, create_redis_client, jobs
from opsconductor.lifecycle.queue import dlq as dlq_repo
from opsconductor.lifecycle.queue.reconcile import reconcile_queue
from opsconductor.lifecycle.storage.execution_reads import InvalidPageRequestError
from opsconductor.lifecycle.storage.execution_records import transaction
from opsconductor.lifecycle.storage.executions import NewExecution, create_execution, transition
from tests.integration.test_queue_redis import T0, FakeClock

TENANT = "tenant-pg"
LATER = datetime.fromtimestamp(T0, UTC) + timedelta(minutes=5)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queue(redis_client: Redis, redis_prefix: str, clock: FakeClock) -> RedisQueue:
    return RedisQueue(redis_client, prefix=redis_prefix, clock=clock)


async def new_execution(
    db: asyncpg.Pool | asyncpg.Connection,
    *,
    tenant: str = TENANT,
    priority: int = 50,
    policy: str | None = "fast_read",
) -> UUID:
    record, _ = await create_execution(
        db,
        NewExecution(
            tenant_id=tenant,
            actor_id="alice",
            request_id=None,
            idempotency_key=hashlib.sha256(uuid4().bytes).hexdigest(),
            plan_hash="a" * 64,
            plan_snapshot={"name": "bg"},
            plan_snapshot_hash="b" * 64,
            execution_mode="background",
            sla_class="fast",
            action_class="read",
            approval_level=0,
            priority=priority,
            timeout_policy_id=policy,
            timeout_ms=10_000,
            estimated_duration_ms=60_000,
            record_only=False,
            initial_status=ExecutionStatus.QUEUED,
        ),
        dedup_window=timedelta(hours=24),
    )
    return record.id


async def submit(
    pool: asyncpg.Pool,
    queue: RedisQueue,
    *,
    tenant: str = TENANT,
    priority: int = 50,
    max_attempts: int = 3,
) -> jobs.QueueRow:
    """The submit recipe: execution + queue row, pushed to Redis before the commit."""
    async with transaction(pool) as conn:
        execution_id = await new_execution(conn, tenant=tenant, priority=priority)
        row = await jobs.insert_queue_row(
            conn,
            execution_id=execution_id,
            tenant_id=tenant,
            priority=priority,
            max_attempts=max_attempts,
        )
        await queue.enqueue(row.id, execution_id, tenant, priority, max_attempts, 1)
    return row


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


# -- execution_queue -------------------------------------------------------------------------------


async def test_a_queue_row_is_created_once_per_execution(db_pool: asyncpg.Pool) -> None:
    execution_id = await new_execution(db_pool)
    first = await jobs.insert_queue_row(
        db_pool, execution_id=execution_id, tenant_id=TENANT, priority=0, max_attempts=3
    )
    again = await jobs.insert_queue_row(
        db_pool, execution_id=execution_id, tenant_id=TENANT, priority=100, max_attempts=5
    )
    assert again == first
    assert (first.state, first.priority, first.attempts, first.lease_token) == ("ready", 0, 0, None)
    assert await jobs.get_queue_row_for_execution(db_pool, execution_id) == first
    assert await jobs.get_queue_row(db_pool, first.id) == first
    assert await jobs.get_queue_row(db_pool, uuid4()) is None
    assert await jobs.get_queue_row_for_execution(db_pool, uuid4()) is None


async def test_a_future_available_at_makes_the_row_delayed(db_pool: asyncpg.Pool) -> None:
    row = await jobs.insert_queue_row(
        db_pool,
        execution_id=await new_execution(db_pool),
        tenant_id=TENANT,
        priority=50,
        max_attempts=3,
        available_at=datetime.now(UTC) + timedelta(hours=1),
    )
    assert row.state == "delayed"


async def test_the_lease_handoff_fences_the_previous_holder(db_pool: asyncpg.Pool) -> None:
    """Zombie protection: once B's lease is recorded, A's fenced writes land nowhere."""
    execution_id = await new_execution(db_pool)
    row = await jobs.insert_queue_row(
        db_pool, execution_id=execution_id, tenant_id=TENANT, priority=50, max_attempts=3
    )
    token_a, token_b = uuid4(), uuid4()
    leased = await jobs.lease_row(
        db_pool,
        row.id,
        worker_id="worker-a",
        lease_token=token_a,
        lease_expires_at=LATER,
        attempts=0,
    )
    assert leased is not None
    assert (leased.state, leased.lease_owner, leased.lease_token) == ("leased", "worker-a", token_a)
    await transition(
        db_pool, execution_id, to=ExecutionStatus.RUNNING, by="worker-a", lease_token=token_a
    )
    taken = await jobs.lease_row(
        db_pool,
        row.id,
        worker_id="worker-b",
        lease_token=token_b,
        lease_expires_at=LATER,
        attempts=1,
    )
    assert taken is not None
    assert (taken.attempts, taken.lease_renewals) == (1, 0)
    execution = await db_pool.fetchrow(
        "SELECT lease_token, worker_id FROM executions WHERE id = $1", execution_id
    )
    # The worker id is the claim's to change (it names the previous holder in the takeover).
    assert (execution["lease_token"], execution["worker_id"]) == (token_b, None)
    with pytest.raises(StaleLeaseError):
        await transition(
            db_pool,
            execution_id,
            to=ExecutionStatus.SUCCEEDED,
            by="worker-a",
            lease_token=token_a,
        )
    assert not await jobs.renew_row(
        db_pool, row.id, lease_token=token_a, lease_expires_at=LATER, lease_renewals=1
    )
    assert not await jobs.delete_queue_row(db_pool, row.id, lease_token=token_a)
    assert not await jobs.release_row(db_pool, row.id, lease_token=token_a)
    assert not await jobs.retry_row(
        db_pool, row.id, lease_token=token_a, attempts=2, available_at=LATER, last_error=None
    )
    await transition(
        db_pool, execution_id, to=ExecutionStatus.SUCCEEDED, by="worker-b", lease_token=token_b
    )


async def test_a_row_not_visible_yet_is_not_leased(db_pool: asyncpg.Pool) -> None:
    assert (
        await jobs.lease_row(
            db_pool,
            uuid4(),
            worker_id="w",
            lease_token=uuid4(),
            lease_expires_at=LATER,
            attempts=0,
        )
        is None
    )


async def test_holder_writes_mirror_renew_retry_release_and_ack(db_pool: asyncpg.Pool) -> None:
    row = await jobs.insert_queue_row(
        db_pool,
        execution_id=await new_execution(db_pool),
        tenant_id=TENANT,
        priority=50,
        max_attempts=3,
    )
    token = uuid4()
    await jobs.lease_row(
        db_pool, row.id, worker_id="w", lease_token=token, lease_expires_at=LATER, attempts=0
    )
    later = LATER + timedelta(minutes=1)
    assert await jobs.renew_row(
        db_pool, row.id, lease_token=token, lease_expires_at=later, lease_renewals=1
    )
    renewed = await jobs.get_queue_row(db_pool, row.id)
    assert renewed is not None
    assert (renewed.lease_expires_at, renewed.lease_renewals) == (later, 1)
    error = {"message": "boom", "error_class": "HTTPError"}
    assert await jobs.retry_row(
        db_pool, row.id, lease_token=token, attempts=1, available_at=later, last_error=error
    )
    retried = await jobs.get_queue_row(db_pool, row.id)
    assert retried is not None
    assert (retried.state, retried.attempts, retried.available_at, retried.last_error) == (
        "delayed",
        1,
        later,
        error,
    )
    assert retried.lease_token is None
    token2 = uuid4()
    await jobs.lease_row(
        db_pool, row.id, worker_id="w", lease_token=token2, lease_expires_at=LATER, attempts=1
    )
    assert await jobs.release_row(db_pool, row.id, lease_token=token2)
    released = await jobs.get_queue_row(db_pool, row.id)
    assert released is not None
    assert (released.state, released.attempts, released.lease_owner) == ("ready", 1, None)
    token3 = uuid4()
    await jobs.lease_row(
        db_pool, row.id, worker_id="w", lease_token=token3, lease_expires_at=LATER, attempts=1
    )
    assert await jobs.release_row(
        db_pool, row.id, lease_token=token3, available_at=datetime.now(UTC) + timedelta(hours=1)
    )
    deferred = await jobs.get_queue_row(db_pool, row.id)
    assert deferred is not None
    assert deferred.state == "delayed"
    token4 = uuid4()
    await jobs.lease_row(
        db_pool, row.id, worker_id="w", lease_token=token4, lease_expires_at=LATER, attempts=1
    )
    assert await jobs.delete_queue_row(db_pool, row.id, lease_token=token4)
    assert await jobs.get_queue_row(db_pool, row.id) is None
    assert not await jobs.delete_queue_row(db_pool, row.id)


async def test_cancel_deletes_the_row_without_a_token(db_pool: asyncpg.Pool) -> None:
    row = await jobs.insert_queue_row(
        db_pool,
        execution_id=await new_execution(db_pool),
        tenant_id=TENANT,
        priority=50,
        max_attempts=3,
    )
    assert await jobs.delete_queue_row(db_pool, row.id)


async def test_queue_rows_are_listed_in_dispatch_order_with_their_renewal_limit(
    db_pool: asyncpg.Pool,
) -> None:
    rows = []
    for priority in (100, 0, 50, 0):
        rows.append(
            await jobs.insert_queue_row(
                db_pool,
                execution_id=await new_execution(db_pool, priority=priority),
                tenant_id=TENANT,
                priority=priority,
                max_attempts=3,
            )
        )
    listed = await jobs.list_queue_rows(db_pool)
    assert [r.id for r in listed] == [rows[1].id, rows[3].id, rows[2].id, rows[0].id]
    assert {r.max_lease_renewals for r in listed} == {1}  # fast_read allows one renewal
    missing = await jobs.queue_rows_missing(db_pool, {rows[1].id, rows[2].id})
    assert [r.id for r in missing] == [rows[3].id, rows[0].id]
    assert await jobs.existing_job_ids(db_pool, {rows[0].id, uuid4()}) == {rows[0].id}


# -- the submit ordering rule ----------------------------------------------------------------------


async def test_redis_down_at_submit_rolls_the_postgres_side_back(
    db_pool: asyncpg.Pool, tmp_path: Path, redis_prefix: str, clock: FakeClock
) -> None:
    from opsconductor.devstack.embedded import start_redis

    server = start_redis(tmp_path)
    client = create_redis_client(server.url, socket_timeout=1.0, retries=0)
    try:
        queue = RedisQueue(client, prefix=redis_prefix, clock=clock)
        server.stop()
        with pytest.raises(QueueUnavailableError):
            await submit(db_pool, queue)
        assert await db_pool.fetchval("SELECT count(*) FROM executions") == 0
        assert await db_pool.fetchval("SELECT count(*) FROM execution_queue") == 0
    finally:
        server.stop()
        await client.aclose()


# -- DLQ -------------------------------------------------------------------------------------------


async def run_and_fail(pool: asyncpg.Pool, queue: RedisQueue, clock: FakeClock) -> bool:
    """One worker attempt that fails, following the module recipe; True once dead-lettered."""
    clock.advance(3600)
    job = await queue.dequeue("worker-01", 300)
    assert job is not None
    row = await jobs.lease_row(
        pool,
        job.job_id,
        worker_id="worker-01",
        lease_token=job.lease_token,
        lease_expires_at=at(job.lease_deadline),
        attempts=job.attempts,
    )
    assert row is not None
    async with transaction(pool) as conn:
        await jobs.get_queue_row(conn, job.job_id, for_update=True)
        outcome = await queue.fail(
            job.job_id, job.lease_token, "Connection timeout", error_class="ConnectError"
        )
        if outcome.dead:
            await dlq_repo.move_to_dlq(
                conn,
                job.execution_id,
                attempts=outcome.attempts,
                error_class="ConnectError",
                error_message="Connection timeout",
                last_error=outcome.last_error,
            )
        else:
            assert outcome.retry_at is not None
            await jobs.retry_row(
                conn,
                job.job_id,
                lease_token=job.lease_token,
                attempts=outcome.attempts,
                available_at=at(outcome.retry_at),
                last_error=outcome.last_error,
            )
    return outcome.dead


async def test_spec_5_2_three_failures_leave_exactly_one_dlq_entry(
    db_pool: asyncpg.Pool, queue: RedisQueue, clock: FakeClock
) -> None:
    row = await submit(db_pool, queue, max_attempts=3)
    results = [await run_and_fail(db_pool, queue, clock) for _ in range(3)]
    assert results == [False, False, True]
    dlq_jobs = await db_pool.fetch(
        "SELECT * FROM execution_dlq WHERE execution_id = $1", row.execution_id
    )
    assert len(dlq_jobs) == 1
    entry = dlq_jobs[0]
    assert (entry["tenant_id"], entry["attempts"], entry["error_class"]) == (
        TENANT,
        3,
        "ConnectError",
    )
    assert entry["last_error"] == {"message": "Connection timeout", "error_class": "ConnectError"}
    assert await jobs.get_queue_row(db_pool, row.id) is None
    assert not await queue.exists(row.id)


async def test_moving_to_the_dlq_is_idempotent_under_a_race(db_pool: asyncpg.Pool) -> None:
    row = await jobs.insert_queue_row(
        db_pool,
        execution_id=await new_execution(db_pool),
        tenant_id=TENANT,
        priority=50,
        max_attempts=3,
    )
    ids = await asyncio.gather(
        *(
            dlq_repo.move_to_dlq(
                db_pool, row.execution_id, attempts=3, error_class="X" * 150, error_message="m"
            )
            for _ in range(10)
        )
    )
    assert len(set(ids)) == 1
    assert ids[0] is not None
    assert await db_pool.fetchval("SELECT count(*) FROM execution_dlq") == 1
    entry = await dlq_repo.get_dlq_entry(db_pool, ids[0])
    assert entry.error_class == "X" * 100
    assert (
        await dlq_repo.move_to_dlq(
            db_pool, uuid4(), attempts=1, error_class=None, error_message=None
        )
        is None
    )


async def dead_letter(pool: asyncpg.Pool, *, tenant: str, error_class: str) -> UUID:
    row = await jobs.insert_queue_row(
        pool,
        execution_id=await new_execution(pool, tenant=tenant),
        tenant_id=tenant,
        priority=50,
        max_attempts=3,
    )
    dlq_id = await dlq_repo.move_to_dlq(
        pool, row.execution_id, attempts=3, error_class=error_class, error_message="boom"
    )
    assert dlq_id is not None
    return dlq_id


async def test_the_dlq_lists_newest_first_filtered_and_paged(db_pool: asyncpg.Pool) -> None:
    made = [
        await dead_letter(db_pool, tenant=tenant, error_class=klass)
        for tenant, klass in [("t1", "A"), ("t2", "A"), ("t1", "B"), ("t1", "A"), ("t1", "A")]
    ]
    page, token = await dlq_repo.list_dlq(db_pool, tenant_id="t1", error_class="A", page_size=2)
    assert [e.id for e in page] == [made[4], made[3]]
    assert token is not None
    page2, token2 = await dlq_repo.list_dlq(
        db_pool, tenant_id="t1", error_class="A", page_size=2, page_token=token
    )
    assert [e.id for e in page2] == [made[0]]
    assert token2 is None
    everything, _ = await dlq_repo.list_dlq(db_pool)
    assert [e.id for e in everything] == made[::-1]
    assert await dlq_repo.dlq_size(db_pool) == 5
    assert await dlq_repo.dlq_size(db_pool, tenant_id="t2") == 1
    with pytest.raises(InvalidPageRequestError):
        await dlq_repo.list_dlq(db_pool, tenant_id="t2", page_token=token)
    with pytest.raises(InvalidPageRequestError):
        await dlq_repo.list_dlq(db_pool, page_token="not-a-token")
    with pytest.raises(InvalidPageRequestError):
        await dlq_repo.list_dlq(db_pool, page_size=-1)


async def test_a_dlq_entry_is_locked_open_and_marked_requeued_once(db_pool: asyncpg.Pool) -> None:
    """The two halves of a requeue (the api's RequeueDlqEntry runs the queue recipe between
    them): another tenant's or an unknown entry is "not found"; once marked, the entry is
    refused (a conflict naming who requeued it) and no longer counted as open."""
    dlq_id = await dead_letter(db_pool, tenant="t1", error_class="A")
    with pytest.raises(NotFoundError):
        await dlq_repo.lock_open_entry(db_pool, dlq_id, tenant_id="t2")
    with pytest.raises(NotFoundError):
        await dlq_repo.lock_open_entry(db_pool, uuid4())
    async with transaction(db_pool) as conn:
        locked = await dlq_repo.lock_open_entry(conn, dlq_id, tenant_id="t1")
        entry = await dlq_repo.mark_requeued(conn, locked.id, by="bob")
    assert entry.requeued_by == "bob"
    assert entry.requeued_at is not None
    assert entry.execution_id == locked.execution_id
    with pytest.raises(ConflictError, match="already requeued by bob"):
        await dlq_repo.lock_open_entry(db_pool, dlq_id)
    assert await dlq_repo.dlq_size(db_pool) == 0
    assert await dlq_repo.dlq_size(db_pool, include_requeued=True) == 1
    listed, _ = await dlq_repo.list_dlq(db_pool, include_requeued=True)
    assert [e.requeued_by for e in listed] == ["bob"]
    with pytest.raises(NotFoundError):
        await dlq_repo.mark_requeued(db_pool, uuid4(), by="bob")
    with pytest.raises(NotFoundError):
        await dlq_repo.get_dlq_entry(db_pool, dlq_id, tenant_id="t2")


# -- reconcile -------------------------------------------------------------------------------------


async def forget_everything(redis_client: Redis, queue: RedisQueue) -> None:
    """Redis restarted empty: drop every key of this queue (only ours, never a flush)."""
    keys = [key async for key in redis_client.scan_iter(match=f"{queue.key_prefix}*")]
    await redis_client.delete(*keys)


async def test_reconcile_re_pushes_every_row_redis_lost_in_dispatch_order(
    db_pool: asyncpg.Pool, queue: RedisQueue, redis_client: Redis, clock: FakeClock
) -> None:
    rows = [await submit(db_pool, queue, priority=p) for p in (100, 50, 0, 50)]
    # One was failed once (delayed for 2 s); one is held by a worker.
    assert not await run_and_fail(db_pool, queue, clock)  # the priority-0 job
    held = await queue.dequeue("worker-02", 300)
    assert held is not None
    await jobs.lease_row(
        db_pool,
        held.job_id,
        worker_id="worker-02",
        lease_token=held.lease_token,
        lease_expires_at=LATER,
        attempts=held.attempts,
    )
    await forget_everything(redis_client, queue)
    report = await reconcile_queue(queue, db_pool)
    assert (report.repushed, report.dropped) == (4, 0)
    assert await queue.all_job_ids() == {row.id for row in rows}
    assert (await reconcile_queue(queue, db_pool)).repushed == 0
    taken = []
    clock.advance(2)
    while (job := await queue.dequeue("worker-03", 300)) is not None:
        taken.append((job.job_id, job.attempts, job.max_lease_renewals))
    assert taken == [
        (rows[2].id, 1, 1),
        (rows[1].id, 0, 1),
        (rows[3].id, 0, 1),
        (rows[0].id, 0, 1),
    ]
    with pytest.raises(StaleLeaseError):
        await queue.ack(held.job_id, held.lease_token)


async def test_reconcile_rebuilds_the_tenant_ring_so_tenants_still_take_turns(
    db_pool: asyncpg.Pool, queue: RedisQueue, redis_client: Redis
) -> None:
    """After Redis lost everything, the re-pushed jobs are served fairly again: tenant B's one
    job comes out first (it joined the ring last, as a newcomer), not after A's backlog."""
    flood = [await submit(db_pool, queue, tenant="tenant-a", priority=0) for _ in range(6)]
    late = await submit(db_pool, queue, tenant="tenant-b", priority=100)
    await forget_everything(redis_client, queue)
    assert (await reconcile_queue(queue, db_pool)).repushed == 7
    assert await queue.tenant_ring() == ["tenant-b", "tenant-a"]
    taken = []
    while (job := await queue.dequeue("worker-01", 300)) is not None:
        taken.append(job.job_id)
    assert taken == [late.id, *(row.id for row in flood)]


async def test_an_upgrade_from_the_v1_layout_is_a_reconcile(
    db_pool: asyncpg.Pool,
    queue: RedisQueue,
    redis_client: Redis,
    redis_prefix: str,
) -> None:
    """Keys of the old single-line layout (``q:v1:``) are never read: the first reconcile
    re-pushes every ``execution_queue`` row into the new layout, each job is handed out once,
    and the old keys are left as they were for the operator to delete."""
    rows = [await submit(db_pool, queue, tenant=t) for t in ("tenant-a", "tenant-b")]
    await forget_everything(redis_client, queue)
    v1 = f"{redis_prefix}q:v1:"
    for row in rows:  # what a v1 api had written for the same jobs
        await redis_client.zadd(f"{v1}ready", {str(row.id): 50})
        await redis_client.hset(
            f"{v1}job:{row.id}", mapping={"job_id": str(row.id), "state": "ready"}
        )
    assert await queue.dequeue("worker-01", 300) is None
    assert (await reconcile_queue(queue, db_pool)).repushed == 2
    taken = []
    while (job := await queue.dequeue("worker-01", 300)) is not None:
        taken.append(job.job_id)
    assert sorted(taken) == sorted(row.id for row in rows)
    assert await redis_client.zcard(f"{v1}ready") == 2


async def test_reconcile_keeps_a_retry_delayed(
    db_pool: asyncpg.Pool, queue: RedisQueue, redis_client: Redis, clock: FakeClock
) -> None:
    row = await submit(db_pool, queue)
    assert not await run_and_fail(db_pool, queue, clock)
    await forget_everything(redis_client, queue)
    await reconcile_queue(queue, db_pool)
    snapshot = await queue.get(row.id)
    assert snapshot is not None
    assert (snapshot.state, snapshot.available_at) == ("delayed", clock.now + 2)


async def test_reconcile_drops_only_old_entries_whose_row_never_appeared(
    db_pool: asyncpg.Pool, queue: RedisQueue, clock: FakeClock
) -> None:
    kept = await submit(db_pool, queue)
    orphan = uuid4()
    await queue.enqueue(orphan, uuid4(), TENANT, 50, 3, 1)
    clock.advance(60)
    young = uuid4()  # its submit may still be about to commit
    await queue.enqueue(young, uuid4(), TENANT, 50, 3, 1)
    report = await reconcile_queue(queue, db_pool, orphan_grace_s=30)
    assert (report.repushed, report.dropped) == (0, 1)
    assert await queue.all_job_ids() == {kept.id, young}


async def test_reconcile_reclaims_expired_leases(
    db_pool: asyncpg.Pool, queue: RedisQueue, clock: FakeClock
) -> None:
    await submit(db_pool, queue)
    assert await queue.dequeue("worker-01", 5) is not None
    clock.advance(5)
    report = await reconcile_queue(queue, db_pool)
    assert report.maintenance.reclaimed == 1
    assert (await queue.stats()).ready == 1


async def wait_for_a_lock_waiter(pool: asyncpg.Pool, timeout: float = 10.0) -> None:
    """Poll until some session of this database waits on a row lock."""
    deadline = asyncio.get_running_loop().time() + timeout
    query = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    while not await pool.fetchval(query):
        assert asyncio.get_running_loop().time() < deadline, "nobody blocked on the row lock"
        await asyncio.sleep(0.01)


async def test_a_row_deleted_while_reconciling_is_not_re_pushed(
    db_pool: asyncpg.Pool, queue: RedisQueue, redis_client: Redis
) -> None:
    """The ack path holds the row lock; the reaper waits for it and then finds no row."""
    row = await submit(db_pool, queue)
    await forget_everything(redis_client, queue)
    listed = await jobs.queue_rows_missing(db_pool, set())
    async with transaction(db_pool) as conn:
        assert await jobs.delete_queue_row(conn, row.id)
        reaper = asyncio.create_task(reconcile_queue(queue, db_pool))
        await wait_for_a_lock_waiter(db_pool)
        assert not reaper.done()
    report = await reaper
    assert [r.id for r in listed] == [row.id]
    assert report.repushed == 0
    assert not await queue.exists(row.id)
