"""Batched leasing against a real Redis: ``dequeue_batch(n)`` leases exactly what n ``dequeue``
calls in a row would (tenants' turns, priority then FIFO within a tenant, running limits, due
retries and expired leases first), each job under its own token, and nothing when paused.

Two queues under two key prefixes get the same jobs in the same order; one is drained job by
job, the other in batches, and the sequences must be identical.
"""

from __future__ import annotations

import random
from uuid import UUID, uuid4

import pytest
from redis.asyncio import Redis

from opsconductor.common.errors import StaleLeaseError
from opsconductor.lifecycle.queue import RedisQueue
from tests.integration.test_queue_fairness import FakeClock


def twins(
    redis_client: Redis, redis_prefix: str, clock: FakeClock, running_limits: dict[str, int]
) -> tuple[RedisQueue, RedisQueue]:
    return (
        RedisQueue(
            redis_client, prefix=f"{redis_prefix}one:", clock=clock, running_limits=running_limits
        ),
        RedisQueue(
            redis_client,
            prefix=f"{redis_prefix}batch:",
            clock=clock,
            running_limits=running_limits,
        ),
    )


async def fill(queues: tuple[RedisQueue, ...], jobs: list[tuple[UUID, str, int]]) -> None:
    for job_id, tenant, priority in jobs:
        for queue in queues:
            assert await queue.enqueue(job_id, uuid4(), tenant, priority, 3, 1)


@pytest.mark.parametrize("batch", [1, 3, 7])
async def test_a_batch_leases_what_as_many_dequeues_in_a_row_would(
    redis_client: Redis, redis_prefix: str, batch: int
) -> None:
    clock = FakeClock()
    rng = random.Random(batch)
    one, batched = twins(redis_client, redis_prefix, clock, running_limits={"t-capped": 2})
    jobs = [
        (uuid4(), rng.choice(["t-a", "t-b", "t-capped", "t-c"]), rng.choice([0, 50, 100]))
        for _ in range(40)
    ]
    await fill((one, batched), jobs)
    # A retry due and an expired lease, both handled before the batch is chosen.
    expiring = await one.dequeue("w", 5.0)
    also = await batched.dequeue("w", 5.0)
    assert expiring is not None
    assert also is not None
    assert expiring.job_id == also.job_id
    clock.advance(10.0)

    singly: list[UUID] = []
    while (job := await one.dequeue("w", 60.0)) is not None:
        singly.append(job.job_id)
    in_batches: list[UUID] = []
    tokens: set[UUID] = set()
    while leased := await batched.dequeue_batch("w", 60.0, batch):
        assert len(leased) <= batch
        in_batches.extend(job.job_id for job in leased)
        tokens.update(job.lease_token for job in leased)
    assert in_batches == singly
    # t-capped holds at most 2 leases: the rest of its jobs wait in both queues alike.
    assert len(singly) < len(jobs)
    assert len(tokens) == len(in_batches)


async def test_each_job_of_a_batch_is_fenced_by_its_own_token(
    redis_client: Redis, redis_prefix: str
) -> None:
    clock = FakeClock()
    queue = RedisQueue(redis_client, prefix=redis_prefix, clock=clock)
    await fill((queue,), [(uuid4(), "t-a", 50) for _ in range(3)])
    first, second, third = await queue.dequeue_batch("w", 60.0, 5)
    await queue.ack(first.job_id, first.lease_token)
    with pytest.raises(StaleLeaseError):
        await queue.ack(second.job_id, third.lease_token)
    await queue.ack(second.job_id, second.lease_token)
    assert await queue.dequeue_batch("w", 60.0, 5) == []


async def test_a_paused_queue_leases_no_batch(redis_client: Redis, redis_prefix: str) -> None:
    queue = RedisQueue(redis_client, prefix=redis_prefix, clock=FakeClock())
    await fill((queue,), [(uuid4(), "t-a", 50)])
    await queue.set_paused(True)
    assert await queue.dequeue_batch("w", 60.0, 4) == []
    await queue.set_paused(False)
    assert len(await queue.dequeue_batch("w", 60.0, 4)) == 1
    with pytest.raises(ValueError, match="count"):
        await queue.dequeue_batch("w", 60.0, 0)
