"""The Redis queue against a real Redis: leases, priorities, retries with backoff, renewals,
fencing, drain, stats, real races and a Redis outage (spec §5.1-§5.3, DESIGN.md §4).

Time is a controllable clock handed to the queue: nothing here sleeps to let a lease expire.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from uuid import UUID, uuid4

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from opsconductor.common.errors import QueueUnavailableError, StaleLeaseError
from opsconductor.lifecycle.queue import (
    LeasedJob,
    LeaseRenewalLimitError,
    MaintenanceReport,
    RedisQueue,
    create_redis_client,
)

T0 = 1_700_000_000.0
TENANT = "tenant-q"


class FakeClock:
    """Epoch seconds that move only when a test says so."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queue(redis_client: Redis, redis_prefix: str, clock: FakeClock) -> RedisQueue:
    return RedisQueue(redis_client, prefix=redis_prefix, clock=clock)


async def put(
    queue: RedisQueue,
    *,
    priority: int = 50,
    max_attempts: int = 3,
    max_lease_renewals: int = 1,
    available_at: float | None = None,
) -> tuple[UUID, UUID]:
    """Enqueue a fresh job; return (job_id, execution_id)."""
    job_id, execution_id = uuid4(), uuid4()
    assert await queue.enqueue(
        job_id, execution_id, TENANT, priority, max_attempts, max_lease_renewals, available_at
    )
    return job_id, execution_id


async def take(queue: RedisQueue, worker: str = "worker-01", lease_s: float = 300) -> LeasedJob:
    job = await queue.dequeue(worker, lease_s)
    assert job is not None
    return job


# -- spec snippets ---------------------------------------------------------------------------------


async def test_spec_5_1_a_leased_job_is_invisible_to_other_workers(queue: RedisQueue) -> None:
    job_id, execution_id = await put(queue, priority=50)
    job1 = await queue.dequeue(worker_id="worker-01", lease_s=300)
    job2 = await queue.dequeue(worker_id="worker-02", lease_s=300)
    assert job2 is None
    assert job1 is not None
    assert (job1.job_id, job1.execution_id, job1.tenant_id) == (job_id, execution_id, TENANT)
    assert job1.worker_id == "worker-01"
    assert job1.lease_deadline == T0 + 300
    assert (job1.attempts, job1.deliveries, job1.lease_expirations) == (0, 1, 0)


async def test_spec_5_3_an_expired_lease_comes_back_to_the_next_worker(
    queue: RedisQueue, clock: FakeClock
) -> None:
    await put(queue)
    job_data = await take(queue, "worker-01", lease_s=5)
    clock.advance(6)  # the worker "crashed": its lease lapses, nobody sleeps
    job_data2 = await queue.dequeue(worker_id="worker-02", lease_s=300)
    assert job_data2 is not None
    assert job_data2.execution_id == job_data.execution_id
    assert job_data2.lease_token != job_data.lease_token
    assert (job_data2.lease_expirations, job_data2.attempts, job_data2.deliveries) == (1, 1, 2)
    # The first holder is fenced out of every lease operation.
    with pytest.raises(StaleLeaseError):
        await queue.ack(job_data.job_id, job_data.lease_token)
    with pytest.raises(StaleLeaseError):
        await queue.renew(job_data.job_id, job_data.lease_token, 5)


async def test_a_lease_is_not_reclaimed_before_its_deadline(
    queue: RedisQueue, clock: FakeClock
) -> None:
    await put(queue)
    await take(queue, lease_s=5)
    clock.advance(4.999)
    assert await queue.dequeue("worker-02", 300) is None
    clock.advance(0.001)
    assert await queue.dequeue("worker-02", 300) is not None


async def test_spec_5_2_three_failures_of_a_three_attempt_job_make_it_dead(
    queue: RedisQueue, clock: FakeClock
) -> None:
    job_id, _ = await put(queue, max_attempts=3)
    outcomes = []
    for _ in range(3):
        clock.advance(3600)  # past any backoff
        job = await take(queue)
        outcomes.append(await queue.fail(job_id, job.lease_token, "Connection timeout"))
    assert [o.dead for o in outcomes] == [False, False, True]
    assert [o.attempts for o in outcomes] == [1, 2, 3]
    assert outcomes[-1].retry_at is None
    assert outcomes[-1].last_error == {"message": "Connection timeout"}
    assert not await queue.exists(job_id)
    clock.advance(3600)
    assert await queue.dequeue("worker-01", 300) is None


# -- ordering --------------------------------------------------------------------------------------


async def test_300_jobs_of_mixed_priorities_come_out_by_priority_then_fifo(
    queue: RedisQueue,
) -> None:
    rng = random.Random(4)
    enqueued: list[tuple[int, int, UUID]] = []
    for n in range(300):
        priority = rng.choice((0, 50, 100))
        job_id, _ = await put(queue, priority=priority)
        enqueued.append((priority, n, job_id))
    taken = [(await take(queue)).job_id for _ in range(300)]
    assert taken == [job_id for _, _, job_id in sorted(enqueued)]
    assert await queue.dequeue("worker-01", 300) is None


async def test_a_released_job_keeps_its_place_in_line(queue: RedisQueue) -> None:
    first, _ = await put(queue)
    second, _ = await put(queue)
    job = await take(queue)
    assert job.job_id == first
    await queue.release(first, job.lease_token)
    assert (await take(queue)).job_id == first
    assert (await take(queue)).job_id == second


# -- retries and backoff ---------------------------------------------------------------------------


async def test_failures_back_off_2_4_8_seconds_then_the_job_is_dead(
    queue: RedisQueue, clock: FakeClock
) -> None:
    job_id, _ = await put(queue, max_attempts=4)
    for attempt, delay in enumerate((2, 4, 8), start=1):
        job = await take(queue)
        assert job.attempts == attempt - 1
        failed_at = clock.now
        outcome = await queue.fail(job_id, job.lease_token, "boom", error_class="HTTPError")
        assert (outcome.dead, outcome.attempts, outcome.retry_at) == (
            False,
            attempt,
            failed_at + delay,
        )
        clock.now = failed_at + delay - 0.1
        assert await queue.dequeue("worker-01", 300) is None, f"dequeued before {delay} s"
        clock.now = failed_at + delay
    job = await take(queue)
    assert job.last_error == {"message": "boom", "error_class": "HTTPError"}
    outcome = await queue.fail(job_id, job.lease_token, "boom")
    assert (outcome.dead, outcome.attempts, outcome.max_attempts) == (True, 4, 4)


async def test_backoff_is_capped(redis_client: Redis, redis_prefix: str, clock: FakeClock) -> None:
    queue = RedisQueue(redis_client, prefix=redis_prefix, clock=clock, max_backoff_s=3)
    job_id, _ = await put(queue, max_attempts=5)
    for _ in range(3):
        job = await take(queue)
        outcome = await queue.fail(job_id, job.lease_token, "boom")
        assert outcome.retry_at == clock.now + min(2**outcome.attempts, 3)
        clock.advance(3)


async def test_an_expiry_on_the_last_attempt_makes_the_job_dead_for_the_reaper(
    queue: RedisQueue, clock: FakeClock
) -> None:
    job_id, execution_id = await put(queue, max_attempts=1)
    await take(queue, "worker-01", lease_s=5)
    clock.advance(5)
    assert await queue.dequeue("worker-02", 300) is None
    [dead] = await queue.dead_jobs()
    assert (dead.job_id, dead.execution_id, dead.state) == (job_id, execution_id, "dead")
    assert (dead.attempts, dead.lease_expirations, dead.worker_id) == (1, 1, None)
    assert dead.last_error is not None
    assert dead.last_error["error_class"] == "LeaseExpired"
    assert "worker-01" in dead.last_error["message"]
    assert (await queue.stats()).dead == 1
    assert await queue.remove(job_id)
    assert await queue.dead_jobs() == []


# -- leases: renewal and fencing -------------------------------------------------------------------


async def test_renewals_extend_the_lease_up_to_the_policy_limit(
    queue: RedisQueue, clock: FakeClock
) -> None:
    job_id, _ = await put(queue, max_lease_renewals=2)
    job = await take(queue, lease_s=10)
    assert job.renewals_left == 2
    for renewal in (1, 2):
        clock.advance(8)
        deadline = await queue.renew(job_id, job.lease_token, 10)
        assert deadline == clock.now + 10
        snapshot = await queue.get(job_id)
        assert snapshot is not None
        assert (snapshot.lease_renewals, snapshot.lease_deadline) == (renewal, deadline)
    clock.advance(8)  # past the original and first deadlines: the renewed lease still holds
    assert await queue.dequeue("worker-02", 10) is None
    with pytest.raises(LeaseRenewalLimitError) as raised:
        await queue.renew(job_id, job.lease_token, 10)
    assert raised.value.details == {"job_id": str(job_id), "lease_renewals": 2}
    assert raised.value.reason == "LEASE_RENEWAL_LIMIT"
    clock.advance(2)
    taken = await take(queue, "worker-02")
    assert (taken.job_id, taken.lease_renewals, taken.renewals_left) == (job_id, 0, 2)


async def test_a_job_with_no_renewals_allowed_cannot_be_renewed(queue: RedisQueue) -> None:
    job_id, _ = await put(queue, max_lease_renewals=0)
    job = await take(queue)
    with pytest.raises(LeaseRenewalLimitError):
        await queue.renew(job_id, job.lease_token, 10)


async def test_a_lapsed_lease_nobody_reclaimed_still_belongs_to_its_holder(
    queue: RedisQueue, clock: FakeClock
) -> None:
    job_id, _ = await put(queue)
    job = await take(queue, lease_s=5)
    clock.advance(30)
    assert await queue.renew(job_id, job.lease_token, 5) == clock.now + 5
    await queue.ack(job_id, job.lease_token)
    assert not await queue.exists(job_id)


async def test_a_stale_token_is_refused_by_every_lease_operation(queue: RedisQueue) -> None:
    job_id, _ = await put(queue)
    job = await take(queue)
    stale = uuid4()
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: queue.ack(job_id, stale),
        lambda: queue.renew(job_id, stale, 10),
        lambda: queue.fail(job_id, stale, "boom"),
        lambda: queue.release(job_id, stale),
    ]
    for call in calls:
        with pytest.raises(StaleLeaseError) as raised:
            await call()
        assert raised.value.details["job_id"] == str(job_id)
    snapshot = await queue.get(job_id)
    assert snapshot is not None
    assert (snapshot.state, snapshot.attempts, snapshot.worker_id) == ("leased", 0, "worker-01")
    await queue.ack(job_id, job.lease_token)  # the real holder is unaffected


async def test_operations_on_an_unknown_job_are_stale(queue: RedisQueue) -> None:
    with pytest.raises(StaleLeaseError):
        await queue.ack(uuid4(), uuid4())
    with pytest.raises(StaleLeaseError):
        await queue.fail(uuid4(), uuid4(), "boom")


async def test_ack_removes_the_job_and_a_second_ack_is_stale(queue: RedisQueue) -> None:
    job_id, _ = await put(queue)
    job = await take(queue)
    await queue.ack(job_id, str(job.lease_token))
    assert not await queue.exists(job_id)
    with pytest.raises(StaleLeaseError):
        await queue.ack(job_id, job.lease_token)


async def test_release_does_not_spend_an_attempt(queue: RedisQueue, clock: FakeClock) -> None:
    job_id, _ = await put(queue, max_attempts=1)
    for deliveries in (1, 2, 3):
        job = await take(queue)
        assert (job.attempts, job.deliveries) == (0, deliveries)
        await queue.release(job_id, job.lease_token)
    job = await take(queue)
    await queue.release(job_id, job.lease_token, delay_s=1.5)
    assert await queue.dequeue("worker-01", 300) is None
    clock.advance(1.5)
    assert (await take(queue)).attempts == 0


async def test_a_removed_job_is_gone_and_its_holder_is_fenced_out(queue: RedisQueue) -> None:
    queued, _ = await put(queue)
    leased, _ = await put(queue, priority=0)
    job = await take(queue)
    assert job.job_id == leased
    assert await queue.remove(queued)
    assert await queue.remove(leased)
    assert not await queue.remove(uuid4())
    assert await queue.all_job_ids() == set()
    with pytest.raises(StaleLeaseError):
        await queue.ack(leased, job.lease_token)


# -- enqueue ---------------------------------------------------------------------------------------


async def test_enqueue_is_idempotent_per_job_id(queue: RedisQueue) -> None:
    job_id, execution_id = uuid4(), uuid4()
    assert await queue.enqueue(job_id, execution_id, TENANT, 50, 3, 1)
    assert not await queue.enqueue(str(job_id), execution_id, TENANT, 0, 3, 1)
    job = await take(queue)
    assert (job.job_id, job.priority) == (job_id, 50)
    assert await queue.dequeue("worker-01", 300) is None


async def test_a_job_enqueued_for_later_waits_until_then(
    queue: RedisQueue, clock: FakeClock
) -> None:
    job_id, _ = await put(queue, available_at=T0 + 10)
    snapshot = await queue.get(job_id)
    assert snapshot is not None
    assert (snapshot.state, snapshot.available_at) == ("delayed", T0 + 10)
    clock.advance(9.9)
    assert await queue.dequeue("worker-01", 300) is None
    clock.advance(0.1)
    assert (await take(queue)).job_id == job_id


async def test_a_past_available_at_is_ready_at_once(queue: RedisQueue) -> None:
    job_id, _ = await put(queue, available_at=T0 - 60)
    assert (await take(queue)).job_id == job_id


async def test_re_pushed_attempts_are_kept(queue: RedisQueue, clock: FakeClock) -> None:
    job_id = uuid4()
    await queue.enqueue(job_id, uuid4(), TENANT, 50, 3, 1, attempts=2)
    job = await take(queue)
    assert job.attempts == 2
    assert (await queue.fail(job_id, job.lease_token, "boom")).dead


async def test_queues_with_different_prefixes_do_not_see_each_other(
    redis_client: Redis, redis_prefix: str, clock: FakeClock
) -> None:
    one = RedisQueue(redis_client, prefix=f"{redis_prefix}a:", clock=clock)
    two = RedisQueue(redis_client, prefix=f"{redis_prefix}b:", clock=clock)
    job_id, _ = await put(one)
    assert one.key_prefix == f"{redis_prefix}a:q:v2:"
    assert one.job_key(job_id) == f"{redis_prefix}a:q:v2:job:{job_id}"
    assert await two.dequeue("worker-01", 300) is None
    assert (await take(one)).job_id == job_id


# -- drain, stats, introspection -------------------------------------------------------------------


async def test_a_paused_queue_hands_out_nothing_until_resumed(
    queue: RedisQueue, clock: FakeClock
) -> None:
    job_id, _ = await put(queue)
    await queue.set_paused(True)
    assert await queue.is_paused()
    assert await queue.dequeue("worker-01", 300) is None
    assert (await queue.stats()).paused
    await queue.set_paused(False)
    assert not await queue.is_paused()
    assert (await take(queue)).job_id == job_id


async def test_a_paused_queue_still_reclaims_expired_leases(
    queue: RedisQueue, clock: FakeClock
) -> None:
    job_id, _ = await put(queue)
    await take(queue, lease_s=5)
    await queue.set_paused(True)
    clock.advance(5)
    assert await queue.dequeue("worker-02", 300) is None
    snapshot = await queue.get(job_id)
    assert snapshot is not None
    assert snapshot.state == "ready"


async def test_stats_report_every_state_and_the_oldest_ready_age(
    queue: RedisQueue, clock: FakeClock
) -> None:
    empty = await queue.stats()
    assert (empty.ready, empty.leased, empty.oldest_ready_age_s, empty.paused) == (
        0,
        0,
        None,
        False,
    )
    await put(queue, priority=100)
    clock.advance(10)
    for priority in (0, 0, 50, 100):
        await put(queue, priority=priority)
    await put(queue, available_at=T0 + 3600)
    clock.advance(5)
    leased = await take(queue, lease_s=1)  # the first priority-0 job
    await take(queue, lease_s=600)  # the second
    clock.advance(2)
    stats = await queue.stats()
    assert leased.priority == 0
    assert stats.ready_by_priority == {50: 1, 100: 2}
    assert stats.ready == 3
    assert (stats.leased, stats.expired_leases, stats.delayed, stats.dead) == (2, 1, 1, 0)
    assert stats.oldest_ready_age_s == pytest.approx(17)


async def test_all_job_ids_get_and_exists_cover_every_state(
    queue: RedisQueue, clock: FakeClock
) -> None:
    ready, _ = await put(queue, priority=100)
    leased, _ = await put(queue, priority=0)
    delayed, _ = await put(queue, available_at=T0 + 60)
    job = await take(queue)
    assert job.job_id == leased
    assert await queue.all_job_ids() == {ready, leased, delayed}
    assert await queue.exists(delayed)
    assert not await queue.exists(uuid4())
    assert await queue.get(uuid4()) is None
    states = {}
    for job_id in (ready, leased, delayed):
        snapshot = await queue.get(job_id)
        assert snapshot is not None
        states[job_id] = snapshot.state
    assert states == {ready: "ready", leased: "leased", delayed: "delayed"}


async def test_requeue_expired_reclaims_and_promotes_in_batches_without_a_dequeue(
    redis_client: Redis, redis_prefix: str, clock: FakeClock
) -> None:
    queue = RedisQueue(redis_client, prefix=redis_prefix, clock=clock, maintenance_batch=2)
    for _ in range(5):
        await put(queue)
    leases = [await take(queue, lease_s=5) for _ in range(5)]
    delayed = [await put(queue, available_at=T0 + 1) for _ in range(3)]
    last, _ = await put(queue, max_attempts=1)
    await take(queue, lease_s=5)
    clock.advance(5)
    report = await queue.requeue_expired()
    assert report == MaintenanceReport(promoted=3, reclaimed=5, dead=1)
    assert await queue.requeue_expired() == MaintenanceReport()
    stats = await queue.stats()
    assert (stats.ready, stats.leased, stats.delayed, stats.dead) == (8, 0, 0, 1)
    assert [job.job_id for job in await queue.dead_jobs()] == [last]
    assert len(leases) + len(delayed) == stats.ready


# -- races -----------------------------------------------------------------------------------------


async def test_twenty_racing_workers_lease_each_of_200_jobs_exactly_once(
    redis_url: str, redis_prefix: str, queue: RedisQueue, clock: FakeClock
) -> None:
    expected = {(await put(queue, priority=random.choice((0, 50, 100))))[0] for _ in range(200)}
    clients = [Redis.from_url(redis_url) for _ in range(20)]
    start = asyncio.Event()

    async def worker(n: int) -> list[UUID]:
        mine = RedisQueue(clients[n], prefix=redis_prefix, clock=clock)
        await clients[n].ping()  # connected before the race starts
        await start.wait()
        taken = []
        while (job := await mine.dequeue(f"worker-{n:02}", 300)) is not None:
            taken.append(job.job_id)
        return taken

    try:
        tasks = [asyncio.create_task(worker(n)) for n in range(20)]
        await asyncio.sleep(0)
        start.set()
        results = await asyncio.gather(*tasks)
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))
    counts = Counter(itertools.chain.from_iterable(results))
    assert set(counts) == expected
    assert set(counts.values()) == {1}
    assert sum(1 for taken in results if taken) > 1, "no race happened"


async def test_racing_fail_and_reclaim_spend_exactly_one_attempt(
    redis_url: str, redis_prefix: str, queue: RedisQueue, clock: FakeClock
) -> None:
    """A holder failing just as its expired lease is reclaimed: one of them wins, never both."""
    for _ in range(50):
        job_id, _ = await put(queue, max_attempts=5)
        job = await take(queue, lease_s=1)
        clock.advance(1)
        results = await asyncio.gather(
            queue.fail(job_id, job.lease_token, "boom"),
            queue.dequeue("worker-02", 300),
            return_exceptions=True,
        )
        snapshot = await queue.get(job_id)
        assert snapshot is not None
        assert snapshot.attempts == 1, results
        await queue.remove(job_id)


# -- outages ---------------------------------------------------------------------------------------


async def test_redis_down_raises_queue_unavailable_and_recovers_after_a_script_flush(
    tmp_path: Path, redis_prefix: str, clock: FakeClock
) -> None:
    from opsconductor.devstack.embedded import start_redis

    server = start_redis(tmp_path)  # our own server: the shared one is never stopped
    client = create_redis_client(server.url, socket_timeout=1.0, retries=0)
    queue = RedisQueue(client, prefix=redis_prefix, clock=clock)
    try:
        job_id, _ = await put(queue)
        await client.script_flush()  # scripts vanish on a restart or failover: reloaded
        job = await take(queue)
        server.stop()
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: queue.enqueue(uuid4(), uuid4(), TENANT, 50, 3, 1),
            lambda: queue.dequeue("worker-01", 300),
            lambda: queue.renew(job_id, job.lease_token, 10),
            lambda: queue.ack(job_id, job.lease_token),
            lambda: queue.stats(),
            lambda: queue.exists(job_id),
            lambda: queue.get(job_id),
            lambda: queue.set_paused(True),
            lambda: queue.all_job_ids(),
            lambda: queue.dead_jobs(),
        ]
        for call in calls:
            with pytest.raises(QueueUnavailableError) as raised:
                await call()
            assert isinstance(raised.value.__cause__, RedisError | OSError)
            assert raised.value.reason == "QUEUE_UNAVAILABLE"
    finally:
        server.stop()
        await client.aclose()


async def test_decoded_responses_work_too(
    redis_url: str, redis_prefix: str, clock: FakeClock
) -> None:
    client = Redis.from_url(redis_url, decode_responses=True)
    queue = RedisQueue(client, prefix=redis_prefix, clock=clock)
    try:
        job_id, execution_id = await put(queue)
        dead, _ = await put(queue, max_attempts=1)
        job = await take(queue)
        assert (job.job_id, job.execution_id) == (job_id, execution_id)
        leased = await take(queue, lease_s=1)
        clock.advance(1)
        await queue.requeue_expired()
        assert [j.job_id for j in await queue.dead_jobs()] == [leased.job_id] == [dead]
        assert await queue.all_job_ids() == {job_id, dead}
    finally:
        keys = [key async for key in client.scan_iter(match=f"{redis_prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_every_expired_lease_is_counted_once_whoever_reclaims_it(
    queue: RedisQueue, clock: FakeClock
) -> None:
    """The stored count behind opsc_lease_expirations_total: a worker's dequeue reclaiming two
    leases (one of them the job's last attempt: dead), then the reaper's pass another, each
    counted once; a lease that ended well (ack) and a pass with nothing expired add nothing."""
    assert (await queue.stats()).lease_expirations_total == 0
    retried, _ = await put(queue, max_attempts=3)
    last_try, _ = await put(queue, max_attempts=1)
    await take(queue, "worker-01", lease_s=5)
    await take(queue, "worker-01", lease_s=5)
    clock.advance(6)
    assert (await take(queue, "worker-02", lease_s=5)).job_id == retried
    assert (await queue.stats()).lease_expirations_total == 2
    assert [job.job_id for job in await queue.dead_jobs()] == [last_try]
    clock.advance(6)
    assert (await queue.requeue_expired()).reclaimed == 1
    assert (await queue.stats()).lease_expirations_total == 3
    job = await take(queue, "worker-03", lease_s=5)
    await queue.ack(job.job_id, job.lease_token)
    assert await queue.requeue_expired() == MaintenanceReport()
    assert (await queue.stats()).lease_expirations_total == 3
