"""The progress fan-out against real Postgres: one LISTEN connection, every event exactly once
and in order whatever races, a lost notification or listener only delays, a slow subscriber is
cut off with a resumable position, and the subscriber limits answer RESOURCE_EXHAUSTED."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from uuid import UUID

import asyncpg
import pytest

from opsconductor.common.errors import ResourceExhaustedError, SubscriberLaggedError
from opsconductor.lifecycle.storage.db import connect
from opsconductor.lifecycle.storage.event_reads import event_head
from opsconductor.lifecycle.storage.events import append_event
from opsconductor.progress.http.event_frames import EventFrames
from opsconductor.progress.http.streams import _sse_body
from opsconductor.progress.logic.hub import EventHub, HubLimits
from opsconductor.progress.logic.subscription import Subscription

TENANT = "tenant-hub"


async def _new_execution(pool: asyncpg.Pool) -> UUID:
    execution_id: UUID = await pool.fetchval(
        """
        INSERT INTO executions (tenant_id, actor_id, idempotency_key, plan_hash, plan_snapshot,
            plan_snapshot_hash, execution_mode, sla_class, action_class, timeout_ms)
        VALUES ($1, 'alice', md5(random()::text) || md5(random()::text), $2, $3, $4,
                'background', 'medium', 'read', 30000)
        RETURNING id
        """,
        TENANT,
        "a" * 64,
        {"name": "hub", "steps": []},
        "b" * 64,
    )
    return execution_id


async def _append(pool: asyncpg.Pool, execution_id: UUID, type_: str = "tick") -> int:
    async with pool.acquire() as conn, conn.transaction():
        return await append_event(
            conn, tenant_id=TENANT, execution_id=execution_id, actor_id="w", type=type_
        )


async def _append_silently(pool: asyncpg.Pool, execution_id: UUID) -> None:
    """An event committed without its NOTIFY: what a lost notification looks like."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """
            WITH next AS (
                UPDATE executions SET event_seq = event_seq + 1 WHERE id = $1
                RETURNING id, event_seq
            )
            INSERT INTO execution_events (execution_id, tenant_id, seq, type)
            SELECT id, $2, event_seq, 'silent' FROM next
            """,
            execution_id,
            TENANT,
        )


@pytest.fixture
async def make_hub(db_pool: asyncpg.Pool, db_dsn: str) -> AsyncIterator[object]:
    hubs: list[EventHub] = []

    async def make(**limits: object) -> EventHub:
        defaults: dict[str, object] = {"reread_interval_s": 30.0, "reconnect_delay_s": 0.05}
        hub = EventHub(db_pool, lambda: connect(db_dsn), HubLimits(**{**defaults, **limits}))  # type: ignore[arg-type]
        await hub.start()
        hubs.append(hub)
        return hub

    yield make
    for hub in hubs:
        await hub.close()


async def _subscribe(hub: EventHub, execution_id: UUID, after_seq: int = 0) -> Subscription:
    slot = await hub.acquire(TENANT, execution_id)
    head = await event_head(hub.pool, execution_id)
    assert head is not None
    return Subscription(
        hub, slot, execution_id, after_seq=after_seq, completed_seq=head.completed_seq
    )


async def _drain(subscription: Subscription, timeout: float = 20) -> list[int]:
    seqs = []
    async with asyncio.timeout(timeout):
        while (event := await subscription.next()) is not None:
            seqs.append(event.seq)
    subscription.release()
    return seqs


async def _read_into(subscription: Subscription, seqs: list[int]) -> None:
    async with asyncio.timeout(5):
        while (event := await subscription.next()) is not None:
            seqs.append(event.seq)


async def test_subscribers_joining_during_a_burst_each_get_every_event_once_in_order(
    db_pool: asyncpg.Pool, make_hub: object
) -> None:
    """20 subscribers join at random moments while 150 events are written by 3 concurrent
    writers; each receives 1..n exactly once, in order, and stops after the terminal event."""
    hub = await make_hub()  # type: ignore[operator]
    execution_id = await _new_execution(db_pool)
    rng = random.Random(7)

    async def writer() -> None:
        for _ in range(50):
            await _append(db_pool, execution_id)
            if rng.random() < 0.3:
                await asyncio.sleep(0)

    async def late_subscriber(delay: float) -> list[int]:
        await asyncio.sleep(delay)
        return await _drain(await _subscribe(hub, execution_id))

    readers = [asyncio.ensure_future(late_subscriber(rng.random() * 0.3)) for _ in range(20)]
    await asyncio.gather(*(writer() for _ in range(3)))
    last = await _append(db_pool, execution_id, "execution_completed")
    await _append(db_pool, execution_id, "rbac_violation")  # after the end: not streamed
    results = await asyncio.gather(*readers)
    assert last == 151
    assert all(seqs == list(range(1, 152)) for seqs in results)
    assert hub.subscriber_count == 0


async def test_one_listen_connection_serves_every_subscriber(
    db_pool: asyncpg.Pool, make_hub: object
) -> None:
    """50 subscribers over 5 executions: the process still holds one LISTEN session."""
    hub = await make_hub()  # type: ignore[operator]
    executions = [await _new_execution(db_pool) for _ in range(5)]
    subscriptions = [await _subscribe(hub, executions[i % 5]) for i in range(50)]
    listeners = await db_pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND query LIKE 'LISTEN%'"
    )
    assert listeners == 1
    for subscription in subscriptions:
        subscription.release()


async def test_a_lost_notification_only_delays_the_event(
    db_pool: asyncpg.Pool, make_hub: object
) -> None:
    """An event whose NOTIFY never came reaches the subscriber by the feed's periodic re-read;
    the next notified event follows it in order."""
    hub = await make_hub(reread_interval_s=0.2)  # type: ignore[operator]
    execution_id = await _new_execution(db_pool)
    subscription = await _subscribe(hub, execution_id)
    await _append(db_pool, execution_id)
    await _append_silently(db_pool, execution_id)
    async with asyncio.timeout(5):
        first = await subscription.next()
        second = await subscription.next()
    assert first is not None
    assert second is not None
    assert (first.seq, second.seq, second.type) == (1, 2, "silent")
    await _append(db_pool, execution_id, "execution_completed")
    assert await _drain(subscription) == [3]


async def test_a_killed_listener_reconnects_and_nothing_is_missed(
    db_pool: asyncpg.Pool, make_hub: object
) -> None:
    """The listening session is terminated by the server; events written meanwhile arrive
    after the hub reconnects, and later ones live."""
    hub = await make_hub()  # type: ignore[operator]
    execution_id = await _new_execution(db_pool)
    subscription = await _subscribe(hub, execution_id)
    await _append(db_pool, execution_id)
    async with asyncio.timeout(5):
        assert (await subscription.next()).seq == 1  # type: ignore[union-attr]
    killed = await db_pool.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND query LIKE 'LISTEN%'"
    )
    assert killed == 1
    for _ in range(3):
        await _append(db_pool, execution_id)
    await _append(db_pool, execution_id, "execution_completed")
    assert await _drain(subscription) == [2, 3, 4, 5]


async def test_a_slow_subscriber_is_cut_off_with_its_position_and_resumes(
    db_pool: asyncpg.Pool, make_hub: object
) -> None:
    """A subscriber that stops reading overflows its 5-event buffer: it gets what it had, then
    SubscriberLaggedError naming its last seq; a fast one beside it gets all 30 meanwhile, and
    the slow one resuming from its position gets the rest exactly once."""
    hub = await make_hub(buffer_size=5)  # type: ignore[operator]
    execution_id = await _new_execution(db_pool)
    slow = await _subscribe(hub, execution_id)
    assert await slow.next(wait_s=0.01) is None  # replayed (nothing yet): now live
    fast = await _subscribe(hub, execution_id)
    fast_reader = asyncio.ensure_future(_drain(fast))
    for _ in range(29):
        await _append(db_pool, execution_id)
        await asyncio.sleep(0.005)
    await _append(db_pool, execution_id, "execution_completed")
    assert await fast_reader == list(range(1, 31))
    got: list[int] = []
    with pytest.raises(SubscriberLaggedError) as lagged:
        await _read_into(slow, got)
    slow.release()
    position = lagged.value.details["after_seq"]
    assert got == list(range(1, position + 1))
    assert 1 <= position < 30
    resumed = await _subscribe(hub, execution_id, after_seq=position)
    assert await _drain(resumed) == list(range(position + 1, 31))


async def test_subscriber_limits_per_tenant_and_per_process(
    db_pool: asyncpg.Pool, make_hub: object
) -> None:
    """Beyond 2 per tenant or 3 per process: ResourceExhaustedError naming the limit; a
    released slot can be taken again."""
    hub = await make_hub(max_subscribers=3, max_subscribers_per_tenant=2)  # type: ignore[operator]
    execution_id = await _new_execution(db_pool)
    a1 = await hub.acquire("a", execution_id)
    await hub.acquire("a", execution_id)
    with pytest.raises(ResourceExhaustedError) as per_tenant:
        await hub.acquire("a", execution_id)
    assert per_tenant.value.details["limit"] == "subscribers_per_tenant"
    await hub.acquire("b", execution_id)
    with pytest.raises(ResourceExhaustedError) as per_process:
        await hub.acquire("c", execution_id)
    assert per_process.value.details["limit"] == "subscribers_per_process"
    hub.release(a1)
    hub.release(a1)  # idempotent
    await hub.acquire("c", execution_id)
    assert hub.subscriber_count == 3


async def test_subscribing_after_the_end_yields_nothing(
    db_pool: asyncpg.Pool, make_hub: object
) -> None:
    """after_seq at (or past) the terminal event: the subscription is done at once."""
    hub = await make_hub()  # type: ignore[operator]
    execution_id = await _new_execution(db_pool)
    await _append(db_pool, execution_id)
    await _append(db_pool, execution_id, "execution_completed")
    assert await _drain(await _subscribe(hub, execution_id, after_seq=2)) == []
    assert await _drain(await _subscribe(hub, execution_id, after_seq=1)) == [2]


async def test_idle_subscription_returns_none_for_a_heartbeat(
    db_pool: asyncpg.Pool, make_hub: object
) -> None:
    """With nothing new within the timeout, next() returns None and the subscription goes on."""
    hub = await make_hub()  # type: ignore[operator]
    execution_id = await _new_execution(db_pool)
    subscription = await _subscribe(hub, execution_id)
    assert await subscription.next(wait_s=0.05) is None
    assert not subscription.done
    await _append(db_pool, execution_id, "execution_completed")
    assert await _drain(subscription) == [1]


async def test_a_subscriber_late_to_a_burst_catches_up_from_the_database(
    db_pool: asyncpg.Pool, make_hub: object
) -> None:
    """A subscriber that joins and reads only after its buffer overflowed is not slow: it
    replays from the database and then follows live, missing nothing."""
    hub = await make_hub(buffer_size=3)  # type: ignore[operator]
    execution_id = await _new_execution(db_pool)
    late = await _subscribe(hub, execution_id)
    for _ in range(10):
        await _append(db_pool, execution_id)
    await asyncio.sleep(0.2)  # the feed delivers (and overflows) meanwhile
    first = await late.next()
    assert first is not None
    assert first.seq == 1
    await _append(db_pool, execution_id, "execution_completed")
    assert await _drain(late) == list(range(2, 12))


def _sse_ids(chunk: str | bytes) -> list[int]:
    text = chunk.decode() if isinstance(chunk, bytes) else chunk
    return [int(line[4:]) for line in text.split("\n") if line.startswith("id: ")]


async def _sse_chunks(subscription: Subscription, frames: EventFrames) -> list[str | bytes]:
    async with asyncio.timeout(10):
        return [chunk async for chunk in _sse_body(subscription, frames, heartbeat_s=5)]


async def _wait_buffered(subscription: Subscription, count: int) -> None:
    async with asyncio.timeout(10):
        while len(subscription._slot.buffer) < count:
            await asyncio.sleep(0.01)


async def test_sse_sends_what_a_subscriber_has_buffered_in_one_chunk(
    db_pool: asyncpg.Pool, make_hub: object
) -> None:
    """A subscriber behind by 11 events (the fan-out was busy) gets them in one chunk, in
    order, each once, with the end of the stream; the frames are encoded once for every
    subscriber (the same bytes)."""
    hub = await make_hub()  # type: ignore[operator]
    execution_id = await _new_execution(db_pool)
    first, second = await _subscribe(hub, execution_id), await _subscribe(hub, execution_id)
    for subscription in (first, second):
        assert await subscription.next(wait_s=0.01) is None  # replayed (nothing yet): now live
    for _ in range(10):
        await _append(db_pool, execution_id)
    await _append(db_pool, execution_id, "execution_completed")
    await _wait_buffered(first, 11)
    await _wait_buffered(second, 11)
    frames = EventFrames()
    chunks = await _sse_chunks(first, frames)
    assert chunks[0] == "retry: 2000\n\n"
    assert len(chunks) == 2
    assert _sse_ids(chunks[1]) == list(range(1, 12))
    assert isinstance(chunks[1], bytes)
    assert chunks[1].endswith(b"event: end\ndata: {}\n\n")
    assert hub.subscriber_count == 1  # the stream released its slot
    event = second._slot.buffer[0]
    assert frames.sse(event) is frames.sse(second._slot.buffer[0])  # encoded once
    chunks = await _sse_chunks(second, frames)
    assert _sse_ids(chunks[1]) == list(range(1, 12))


async def test_sse_cuts_a_slow_subscriber_off_after_what_it_had_and_it_resumes(
    db_pool: asyncpg.Pool, make_hub: object
) -> None:
    """Batching keeps the slow-subscriber rule: a 5-event buffer overflowed by 30 events gives
    the 5 it held, then ``event: lagged`` with that position; resuming from it (as
    Last-Event-ID does) gives the other 25 exactly once."""
    hub = await make_hub(buffer_size=5)  # type: ignore[operator]
    execution_id = await _new_execution(db_pool)
    slow = await _subscribe(hub, execution_id)
    assert await slow.next(wait_s=0.01) is None
    for _ in range(29):
        await _append(db_pool, execution_id)
    await _append(db_pool, execution_id, "execution_completed")
    async with asyncio.timeout(10):
        while not slow._slot.lagged:
            await asyncio.sleep(0.01)
    chunks = await _sse_chunks(slow, EventFrames())
    text = "".join(c.decode() if isinstance(c, bytes) else c for c in chunks)
    assert _sse_ids(text) == [1, 2, 3, 4, 5]
    last_line = text.rstrip("\n").split("\n")
    assert last_line[-2] == "event: lagged"
    assert json.loads(last_line[-1].removeprefix("data: "))["after_seq"] == 5
    resumed = await _subscribe(hub, execution_id, after_seq=5)
    chunks = await _sse_chunks(resumed, EventFrames())
    assert [seq for chunk in chunks for seq in _sse_ids(chunk)] == list(range(6, 31))


async def test_a_failed_read_does_not_end_the_feed(db_pool: asyncpg.Pool, make_hub: object) -> None:
    """A feed whose re-read fails (the events table gone for a moment: the storage layer reports
    StorageError) keeps going: once reads work again its subscriber gets every later event."""
    hub = await make_hub(reread_interval_s=0.1)  # type: ignore[operator]
    execution_id = await _new_execution(db_pool)
    subscription = await _subscribe(hub, execution_id)
    await _append(db_pool, execution_id)
    async with asyncio.timeout(5):
        first = await subscription.next()
    assert first is not None
    await db_pool.execute("ALTER TABLE execution_events RENAME TO execution_events_away")
    try:
        await asyncio.sleep(0.5)  # several re-reads fail meanwhile
    finally:
        await db_pool.execute("ALTER TABLE execution_events_away RENAME TO execution_events")
    await _append(db_pool, execution_id)
    await _append(db_pool, execution_id, "execution_completed")
    assert [first.seq, *await _drain(subscription, timeout=5)] == [1, 2, 3]
