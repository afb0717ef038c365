"""The progress service's metrics against a real hub and Postgres: live subscribers by
transport, events handed out, the delivery lag of live events only (not of replays), and slow
subscribers cut off; labels are transports, never ids."""

from __future__ import annotations

import asyncio
from uuid import UUID

import asyncpg
from prometheus_client import REGISTRY

from opsconductor.common.errors import SubscriberLaggedError
from opsconductor.lifecycle.storage.event_reads import event_head
from opsconductor.progress.logic.hub import EventHub
from opsconductor.progress.logic.metrics import transport_of
from opsconductor.progress.logic.subscription import Subscription

from .test_progress_hub import TENANT, _append, _new_execution, make_hub

__all__ = ["make_hub"]  # the fixture, shared with the hub's tests


def sample(name: str, transport: str) -> float:
    return REGISTRY.get_sample_value(name, {"transport": transport}) or 0.0


async def subscribe(
    hub: EventHub, execution_id: UUID, resource: str, after_seq: int = 0
) -> Subscription:
    slot = await hub.acquire(TENANT, execution_id)
    head = await event_head(hub.pool, execution_id)
    assert head is not None
    return Subscription(
        hub,
        slot,
        execution_id,
        after_seq=after_seq,
        completed_seq=head.completed_seq,
        transport=transport_of(resource),
    )


async def drain(subscription: Subscription) -> int:
    count = 0
    async with asyncio.timeout(20):
        while await subscription.next() is not None:
            count += 1
    return count


def test_each_transports_resource_has_its_label_and_anything_else_is_other() -> None:
    assert [
        transport_of(r)
        for r in (
            "ProgressService/StreamEvents",
            "grpc-web/StreamEvents",
            "http/sse",
            "http/ws",
            "http/poll",
            "http/anything-new",
        )
    ] == ["grpc", "grpc_web", "sse", "websocket", "long_poll", "other"]


async def test_subscribers_deliveries_lag_and_slow_disconnects_by_transport(
    db_pool: asyncpg.Pool, make_hub: object
) -> None:
    # Room for 20 events: the live reader never falls that far behind, the idle one overflows.
    hub = await make_hub(buffer_size=20)  # type: ignore[operator]
    execution_id = await _new_execution(db_pool)
    names = (
        "opsc_progress_subscribers",
        "opsc_progress_events_delivered_total",
        "opsc_progress_delivery_lag_seconds_count",
        "opsc_progress_slow_subscriber_disconnects_total",
    )
    before = {(n, t): sample(n, t) for n in names for t in ("sse", "websocket", "long_poll")}

    def moved(name: str, transport: str) -> float:
        return sample(name, transport) - before[(name, transport)]

    live = await subscribe(hub, execution_id, "http/sse")
    slow = await subscribe(hub, execution_id, "http/ws")
    assert await slow.next(wait_s=0.01) is None  # replayed (nothing yet): now live
    assert (moved(names[0], "sse"), moved(names[0], "websocket")) == (1, 1)
    reader = asyncio.ensure_future(drain(live))
    for _ in range(59):
        await _append(db_pool, execution_id)
        await asyncio.sleep(0.005)
    await _append(db_pool, execution_id, "execution_completed")
    assert await reader == 60
    live.release()
    live.release()  # idempotent: counted down once
    try:
        async with asyncio.timeout(5):
            while await slow.next() is not None:
                pass
        raise AssertionError("the slow subscriber was not cut off")
    except SubscriberLaggedError:
        pass
    slow.release()
    # A late subscriber replays all 60: delivered, but no lag (they were committed before).
    late = await subscribe(hub, execution_id, "http/poll")
    assert await drain(late) == 60
    late.release()

    assert moved(names[1], "sse") == 60
    assert moved(names[2], "sse") == 60
    assert moved(names[3], "websocket") == 1
    assert moved(names[3], "sse") == 0
    assert (moved(names[1], "long_poll"), moved(names[2], "long_poll")) == (60, 0)
    assert [moved(names[0], t) for t in ("sse", "websocket", "long_poll")] == [0, 0, 0]
    assert REGISTRY.get_sample_value("opsc_progress_delivery_lag_seconds_sum", {"transport": "sse"})
