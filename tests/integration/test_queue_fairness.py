"""Fair share in the Redis queue against a real Redis: tenants take turns (round-robin over the
ring of tenants with ready jobs; a tenant that was not in the ring goes first, one that just
emptied its line keeps its place until its next turn), priority orders a tenant's own line
only, and a tenant holding its running limit of leases is passed over until a lease ends — by
ack, fail, release, removal or expiry (a killed worker's slot comes back with its lease). See
docs/security.md "Fair share and quotas".

Time is a controllable clock handed to the queue: nothing here sleeps to let a lease expire.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter
from collections.abc import Mapping
from uuid import UUID, uuid4

import pytest
from redis.asyncio import Redis

from opsconductor.common.errors import StaleLeaseError
from opsconductor.lifecycle.queue import LeasedJob, RedisQueue

T0 = 1_700_000_000.0


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


def make_queue(
    redis_client: Redis,
    redis_prefix: str,
    clock: FakeClock,
    running_limit: int = 0,
    running_limits: Mapping[str, int] | None = None,
) -> RedisQueue:
    return RedisQueue(
        redis_client,
        prefix=redis_prefix,
        clock=clock,
        running_limit=running_limit,
        running_limits=running_limits,
    )


@pytest.fixture
def queue(redis_client: Redis, redis_prefix: str, clock: FakeClock) -> RedisQueue:
    return make_queue(redis_client, redis_prefix, clock)


async def put(queue: RedisQueue, tenant: str, *, priority: int = 50, max_attempts: int = 3) -> UUID:
    """Enqueue a fresh job of ``tenant``; return its job id."""
    job_id = uuid4()
    assert await queue.enqueue(job_id, uuid4(), tenant, priority, max_attempts, 1)
    return job_id


async def take(queue: RedisQueue, worker: str = "worker-01", lease_s: float = 300) -> LeasedJob:
    job = await queue.dequeue(worker, lease_s)
    assert job is not None
    return job


async def drain_all(queue: RedisQueue) -> list[LeasedJob]:
    taken = []
    while (job := await queue.dequeue("worker-01", 300)) is not None:
        taken.append(job)
    return taken


# -- turns -----------------------------------------------------------------------------------------


async def test_a_flood_of_one_tenants_urgent_jobs_delays_anothers_job_by_one_turn(
    queue: RedisQueue,
) -> None:
    """The finding: 40 priority-0 jobs of tenant A used to go before tenant B's one job. Now B's
    priority-100 job is the next one handed out: B was not in the ring, so it goes first, and
    A's priority orders only A's line."""
    flood = [await put(queue, "tenant-a", priority=0) for _ in range(40)]
    first = await take(queue)  # a worker is busy with one of A's jobs when B's arrives
    late = await put(queue, "tenant-b", priority=100)
    taken = [job.job_id for job in await drain_all(queue)]
    assert taken[0] == late
    assert [first.job_id, *taken[1:]] == flood  # A's own line kept its FIFO


async def test_three_tenants_take_turns_the_latest_newcomer_first(queue: RedisQueue) -> None:
    lines = {t: [await put(queue, t) for _ in range(5)] for t in ("t-a", "t-b", "t-c")}
    assert await queue.tenant_ring() == ["t-c", "t-b", "t-a"]
    taken = await drain_all(queue)
    assert [job.tenant_id for job in taken] == ["t-c", "t-b", "t-a"] * 5
    for tenant, line in lines.items():
        assert [job.job_id for job in taken if job.tenant_id == tenant] == line


async def test_within_a_tenant_priority_then_fifo_and_tenants_still_alternate(
    queue: RedisQueue,
) -> None:
    rng = random.Random(8)
    enqueued: dict[str, list[tuple[int, int, UUID]]] = {"t-a": [], "t-b": []}
    for n in range(120):
        tenant = rng.choice(("t-a", "t-b"))
        priority = rng.choice((0, 50, 100))
        enqueued[tenant].append((priority, n, await put(queue, tenant, priority=priority)))
    taken = await drain_all(queue)
    for tenant, jobs in enqueued.items():
        mine = [job.job_id for job in taken if job.tenant_id == tenant]
        assert mine == [job_id for _, _, job_id in sorted(jobs)]
    # Strict alternation while both have work; then the one left is served alone.
    shorter = min(len(jobs) for jobs in enqueued.values())
    head = [job.tenant_id for job in taken[: 2 * shorter]]
    assert all(head[i] != head[i + 1] for i in range(len(head) - 1))


async def test_a_tenant_served_dry_keeps_its_place_until_its_next_turn(
    queue: RedisQueue,
) -> None:
    """A's line empties as its job is taken, but A stays in the ring (at the tail): refilling at
    once does not make it a newcomer, so B, which arrives after, still goes first. A tenant
    whose turn comes with nothing ready leaves the ring."""
    a1 = await put(queue, "t-a")
    assert (await take(queue)).job_id == a1
    assert await queue.tenant_ring() == ["t-a"]
    a2 = await put(queue, "t-a")
    b1 = await put(queue, "t-b")
    assert await queue.tenant_ring() == ["t-b", "t-a"]
    assert [job.job_id for job in await drain_all(queue)] == [b1, a2]
    assert await queue.tenant_ring() == []  # the last dequeue found both lines empty


async def test_emptying_and_refilling_a_line_gains_no_extra_turns(queue: RedisQueue) -> None:
    """A tenant that submits one job each time its previous one was taken (the way to look
    "new" at every dequeue) still gets every other turn, not every turn."""
    for _ in range(8):
        await put(queue, "t-a")
    served = []
    c_waiting = False
    for _ in range(8):
        if not c_waiting:  # C refills the moment its line is empty
            await put(queue, "t-c")
            c_waiting = True
        job = await take(queue)
        served.append(job.tenant_id)
        c_waiting = c_waiting and job.tenant_id != "t-c"
    assert served == ["t-c", "t-a"] * 4


async def test_a_released_or_retried_job_goes_back_to_its_tenants_line(
    queue: RedisQueue, clock: FakeClock
) -> None:
    a1 = await put(queue, "t-a")
    a2 = await put(queue, "t-a")
    job = await take(queue)
    assert job.job_id == a1
    await queue.release(a1, job.lease_token)
    assert await queue.tenant_ring() == ["t-a"]
    again = await take(queue)
    assert again.job_id == a1  # its place in line kept
    await queue.fail(a1, again.lease_token, "boom")
    assert (await take(queue)).job_id == a2
    assert await queue.dequeue("worker-01", 300) is None  # a1 is in backoff
    assert await queue.tenant_ring() == []
    clock.advance(2)  # the retry is due: promoted into A's line, A back in the ring
    assert await queue.tenant_ring() == []  # promotion happens in the next dequeue
    assert (await take(queue)).job_id == a1


# -- running limits --------------------------------------------------------------------------------


async def test_a_tenant_at_its_running_limit_is_passed_over_until_a_lease_ends(
    redis_client: Redis, redis_prefix: str, clock: FakeClock
) -> None:
    queue = make_queue(redis_client, redis_prefix, clock, running_limit=2)
    a_jobs = [await put(queue, "t-a") for _ in range(4)]
    b_jobs = [await put(queue, "t-b") for _ in range(4)]
    held = [await take(queue) for _ in range(4)]
    assert [job.tenant_id for job in held] == ["t-b", "t-a"] * 2
    assert await queue.running_by_tenant() == {"t-a": 2, "t-b": 2}
    assert await queue.dequeue("worker-01", 300) is None  # both at their limit
    stats = await queue.stats()
    assert (stats.ready, stats.leased) == (4, 4)
    await queue.ack(held[1].job_id, held[1].lease_token)
    assert await queue.running_by_tenant() == {"t-a": 1, "t-b": 2}
    nxt = await take(queue)
    assert nxt.job_id == a_jobs[2]
    assert await queue.dequeue("worker-01", 300) is None
    # Waiting, not lost: without limits the rest comes out, B's line in order.
    unlimited = make_queue(redis_client, redis_prefix, clock)
    rest = [job.job_id for job in await drain_all(unlimited)]
    assert rest == [b_jobs[2], a_jobs[3], b_jobs[3]]


async def test_per_tenant_overrides_replace_the_default_limit(
    redis_client: Redis, redis_prefix: str, clock: FakeClock
) -> None:
    queue = make_queue(
        redis_client, redis_prefix, clock, running_limit=1, running_limits={"big": 3, "free": 0}
    )
    for tenant in ("small", "big", "free"):
        for _ in range(5):
            await put(queue, tenant)
    taken = await drain_all(queue)
    assert Counter(job.tenant_id for job in taken) == {"small": 1, "big": 3, "free": 5}
    assert await queue.running_by_tenant() == {"small": 1, "big": 3, "free": 5}


async def test_every_end_of_a_lease_gives_the_slot_back(
    redis_client: Redis, redis_prefix: str, clock: FakeClock
) -> None:
    """ack, fail (retry and dead), release, remove and expiry each free the tenant's slot."""
    queue = make_queue(redis_client, redis_prefix, clock, running_limit=1)

    async def held() -> LeasedJob:
        await put(queue, "t-a", max_attempts=2)
        job = await take(queue, lease_s=10)
        assert await queue.running_by_tenant() == {"t-a": 1}
        return job

    job = await held()
    await queue.ack(job.job_id, job.lease_token)
    assert await queue.running_by_tenant() == {}

    job = await held()
    await queue.release(job.job_id, job.lease_token, delay_s=60)
    assert await queue.running_by_tenant() == {}
    await queue.remove(job.job_id)

    job = await held()
    outcome = await queue.fail(job.job_id, job.lease_token, "boom")
    assert not outcome.dead
    assert await queue.running_by_tenant() == {}
    clock.advance(2)
    again = await take(queue, lease_s=10)
    assert again.job_id == job.job_id
    outcome = await queue.fail(again.job_id, again.lease_token, "boom")
    assert outcome.dead
    assert await queue.running_by_tenant() == {}

    job = await held()
    assert await queue.remove(job.job_id)
    assert await queue.running_by_tenant() == {}
    with pytest.raises(StaleLeaseError):
        await queue.ack(job.job_id, job.lease_token)

    # A killed worker: nobody acks; the expired lease is reclaimed and the slot comes back.
    job = await held()
    blocked = await put(queue, "t-a")
    assert await queue.dequeue("worker-02", 10) is None
    clock.advance(11)
    successor = await take(queue, "worker-02", lease_s=10)
    assert successor.job_id == job.job_id  # reclaimed, back at its place, ahead of `blocked`
    assert successor.lease_expirations == 1
    assert await queue.running_by_tenant() == {"t-a": 1}
    await queue.ack(successor.job_id, successor.lease_token)
    assert (await take(queue)).job_id == blocked


async def test_the_reaper_pass_gives_a_dead_workers_slot_back_without_a_dequeue(
    redis_client: Redis, redis_prefix: str, clock: FakeClock
) -> None:
    queue = make_queue(redis_client, redis_prefix, clock, running_limit=1)
    await put(queue, "t-a", max_attempts=1)
    await take(queue, lease_s=5)
    clock.advance(6)
    report = await queue.requeue_expired()
    assert report.dead == 1  # its last attempt: dead, waiting for the DLQ move
    assert await queue.running_by_tenant() == {}


async def test_every_tenant_at_its_limit_means_nothing_to_hand_out_and_nothing_is_lost(
    redis_client: Redis, redis_prefix: str, clock: FakeClock
) -> None:
    queue = make_queue(redis_client, redis_prefix, clock, running_limit=1)
    for tenant in ("t-a", "t-b", "t-c"):
        await put(queue, tenant)
        await put(queue, tenant)
    first = [await take(queue) for _ in range(3)]
    assert await queue.dequeue("worker-01", 300) is None
    assert sorted(await queue.tenant_ring()) == ["t-a", "t-b", "t-c"]
    for job in first:
        await queue.ack(job.job_id, job.lease_token)
    assert sorted(job.tenant_id for job in await drain_all(queue)) == ["t-a", "t-b", "t-c"]


async def test_negative_running_limits_are_refused(redis_client: Redis) -> None:
    with pytest.raises(ValueError, match="running limits"):
        RedisQueue(redis_client, running_limit=-1)
    with pytest.raises(ValueError, match="running limits"):
        RedisQueue(redis_client, running_limits={"t": -2})


# -- index integrity -------------------------------------------------------------------------------


async def test_removing_queued_jobs_empties_the_ring_and_leaves_no_key(
    queue: RedisQueue, redis_client: Redis
) -> None:
    jobs = [await put(queue, t) for t in ("t-a", "t-b", "t-a")]
    delayed = uuid4()
    await queue.enqueue(delayed, uuid4(), "t-c", 50, 3, 1, queue.now() + 60)
    held = await take(queue)
    for job_id in [*jobs, delayed]:
        assert await queue.remove(job_id)
    assert not await queue.remove(held.job_id)
    assert await queue.tenant_ring() == []
    assert await queue.running_by_tenant() == {}
    left = {key async for key in redis_client.scan_iter(match=f"{queue.key_prefix}*")}
    assert left == {f"{queue.key_prefix}seq".encode()}


async def test_debris_in_a_tenants_line_is_skipped_and_cleaned(
    queue: RedisQueue, redis_client: Redis
) -> None:
    """A member of a tenant's line that is not ready any more (e.g. an interrupted cleanup left
    it) is not handed out; the tenant's real jobs are, and the ring forgets an emptied line."""
    ghost, real = uuid4(), await put(queue, "t-a")
    tready = f"{queue.key_prefix}tready:t-a"
    await redis_client.zadd(tready, {str(ghost): 0})  # ahead of the real job
    assert (await take(queue)).job_id == real
    await redis_client.zadd(tready, {str(ghost): 0})  # t-a is still in the ring: debris only
    assert await queue.dequeue("worker-01", 300) is None
    assert await queue.tenant_ring() == []
    assert not await redis_client.exists(tready)


async def test_a_ring_entry_without_a_line_is_dropped(
    queue: RedisQueue, redis_client: Redis
) -> None:
    await redis_client.rpush(f"{queue.key_prefix}ring", "t-ghost")
    job_id = await put(queue, "t-a")
    assert (await take(queue)).job_id == job_id
    assert await queue.tenant_ring() == ["t-ghost", "t-a"]
    assert await queue.dequeue("worker-01", 300) is None
    assert await queue.tenant_ring() == []


async def test_twenty_racing_workers_over_five_tenants_lease_each_job_once_within_limits(
    redis_url: str, redis_prefix: str, redis_client: Redis, clock: FakeClock
) -> None:
    tenants = [f"t-{n}" for n in range(5)]
    setup = make_queue(redis_client, redis_prefix, clock)
    expected = {
        await put(setup, random.choice(tenants), priority=random.choice((0, 50, 100)))
        for _ in range(200)
    }
    clients = [Redis.from_url(redis_url) for _ in range(20)]
    start = asyncio.Event()
    peak: Counter[str] = Counter()

    async def worker(n: int) -> list[UUID]:
        mine = make_queue(clients[n], redis_prefix, clock, running_limit=3)
        await clients[n].ping()
        await start.wait()
        taken = []
        while (job := await mine.dequeue(f"worker-{n:02}", 300)) is not None:
            running = await mine.running_by_tenant()
            for tenant, count in running.items():
                peak[tenant] = max(peak[tenant], count)
            taken.append(job.job_id)
            await mine.ack(job.job_id, job.lease_token)
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
    assert max(peak.values()) <= 3
    assert await setup.running_by_tenant() == {}
    assert await setup.tenant_ring() == []
