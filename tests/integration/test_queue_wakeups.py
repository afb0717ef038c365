"""Push dispatch: an announced job wakes one idle consumer slot at once (real Redis pub/sub)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from opsconductor.lifecycle.queue.redis_queue import RedisQueue, create_redis_client
from opsconductor.lifecycle.queue.wakeups import Wakeups

#: Far longer than any wake-up may take: a slot that returns sooner was woken, not timed out.
LONG_POLL_S = 20.0


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = create_redis_client(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def wakeups(redis_client: Redis, redis_prefix: str) -> AsyncIterator[Wakeups]:
    queue = RedisQueue(redis_client, prefix=redis_prefix)
    w = Wakeups(redis_client, queue.wake_channel)
    w.start()
    await asyncio.wait_for(w.subscribed.wait(), 10)
    try:
        yield w
    finally:
        await w.stop()


async def test_an_announcement_wakes_a_waiting_slot_at_once(
    redis_client: Redis, redis_prefix: str, wakeups: Wakeups
) -> None:
    queue = RedisQueue(redis_client, prefix=redis_prefix)
    waiter = asyncio.create_task(wakeups.wait(LONG_POLL_S))
    await asyncio.sleep(0.05)  # the slot is waiting
    started = time.monotonic()
    await queue.announce()
    assert await asyncio.wait_for(waiter, LONG_POLL_S / 2)
    assert time.monotonic() - started < 2.0


async def test_each_announcement_wakes_one_slot_only(
    redis_client: Redis, redis_prefix: str, wakeups: Wakeups
) -> None:
    """Two idle slots, one job: one slot races for it, the other keeps waiting (no herd)."""
    queue = RedisQueue(redis_client, prefix=redis_prefix)
    slots = [asyncio.create_task(wakeups.wait(1.5)) for _ in range(2)]
    await asyncio.sleep(0.05)
    await queue.announce()
    results = await asyncio.gather(*slots)
    assert sorted(results) == [False, True]


async def test_an_announcement_no_slot_was_waiting_for_is_kept() -> None:
    """A job announced while every slot was busy dequeuing wakes the next slot to wait at
    once, instead of leaving the job to the next poll; a wait with nothing announced times
    out as the poll it replaces."""
    wakeups = Wakeups(Redis(), "unused")  # never started: notify() stands for a message
    wakeups.notify()
    started = time.monotonic()
    assert await wakeups.wait(LONG_POLL_S)
    assert time.monotonic() - started < 1.0
    assert not await wakeups.wait(0.05)
    # Stopping wakes a waiting slot at once.
    waiter = asyncio.create_task(wakeups.wait(LONG_POLL_S))
    await asyncio.sleep(0.01)
    wakeups.wake_all()
    assert await asyncio.wait_for(waiter, 1.0)


async def test_a_lost_announcement_costs_a_poll_not_an_error(redis_prefix: str) -> None:
    """Announcing on an unreachable Redis is logged, never raised: the submit has committed."""
    dead = create_redis_client("redis://127.0.0.1:1/0", socket_timeout=0.2, retries=0)
    try:
        await RedisQueue(dead, prefix=redis_prefix).announce()
    finally:
        await dead.aclose()
