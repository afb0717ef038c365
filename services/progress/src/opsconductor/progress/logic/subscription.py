"""One subscriber's view of an execution's events: replay after a seq, then follow live.

Exactly once and in order, whatever the hub delivers: the subscription keeps the seq of the last
event it handed out and takes only its successor. Older events from the hub are dropped; a gap
(a notification lost, the listener reconnected) is filled from the database. It ends after
``execution_completed``; an execution that ended before ``after_seq`` ends it at once.
"""

from __future__ import annotations

import time
from uuid import UUID

import asyncpg

from opsconductor.common.errors import SubscriberLaggedError
from opsconductor.lifecycle.storage.event_reads import EventRecord, read_events_after
from opsconductor.progress.logic import metrics
from opsconductor.progress.logic.hub import EventHub, Slot, Wake

_REPLAY_BATCH = 500


class Subscription:
    """Replay-then-live events of one execution for one subscriber (release it when done)."""

    def __init__(
        self,
        hub: EventHub,
        slot: Slot,
        execution_id: UUID,
        *,
        after_seq: int,
        completed_seq: int | None,
        transport: str = "other",
    ) -> None:
        self._hub = hub
        self._slot = slot
        self._transport = transport
        #: Events committed after this are live: their delivery lag is measured.
        self._since = time.time()
        self._released = False
        metrics.SUBSCRIBERS.labels(transport).inc()
        self.execution_id = execution_id
        #: Seq of the last event handed out: resuming with ``after_seq=position`` misses nothing.
        self.position = after_seq
        #: True once the terminal event was handed out (or had been before ``after_seq``).
        self.done = completed_seq is not None and completed_seq <= after_seq
        self._pending: list[EventRecord] = []
        #: Read the database before waiting on the hub: at first (the replay), after a gap
        #: or a reconnect of the listener, and while a replay page came back full.
        self._must_read = True

    @property
    def _pool(self) -> asyncpg.Pool:
        return self._hub.pool

    @property
    def ready(self) -> bool:
        """True when :meth:`next` has an event to hand out without waiting for one."""
        return not self.done and bool(self._pending or self._slot.buffer)

    def release(self) -> None:
        """Leave the hub (idempotent)."""
        self._hub.release(self._slot)
        if not self._released:
            self._released = True
            metrics.SUBSCRIBERS.labels(self._transport).dec()

    async def next(self, wait_s: float | None = None) -> EventRecord | None:
        """The next event; None when nothing came within ``wait_s`` (a heartbeat is due) or
        after the end (``done``). Raises :class:`SubscriberLaggedError` when cut off."""
        while not self.done:
            if not self._pending and self._must_read:
                self._pending = await read_events_after(
                    self._pool, self.execution_id, self.position, limit=_REPLAY_BATCH
                )
                self._must_read = len(self._pending) == _REPLAY_BATCH
                if self._slot.lagged and not self._must_read:
                    # It overflowed while we read the database: we are not slow, only late.
                    # Events dropped with the buffer were committed before: one more read.
                    self._slot.rearm()
                    self._must_read = True
            if not self._pending:
                woke = await self._slot.next(wait_s)
                while isinstance(woke, EventRecord) and woke.seq <= self.position:
                    woke = await self._slot.next(wait_s)  # replayed already
                if woke is Wake.TIMEOUT:
                    return None
                if woke is Wake.LAGGED:
                    metrics.SLOW_DISCONNECTS.labels(self._transport).inc()
                    raise SubscriberLaggedError(
                        execution_id=str(self.execution_id), after_seq=self.position
                    )
                if isinstance(woke, EventRecord) and woke.seq == self.position + 1:
                    self._pending = [woke]
                else:
                    self._must_read = True  # a gap (a later event) or a poke
                continue
            event = self._pending.pop(0)
            if event.seq != self.position + 1:
                self._pending.clear()  # not the successor: re-read from where we are
                self._must_read = True
                continue
            self.position = event.seq
            if event.is_terminal:
                self.done = True
                self._pending.clear()
            self._count(event)
            return event
        return None

    def _count(self, event: EventRecord) -> None:
        metrics.EVENTS_DELIVERED.labels(self._transport).inc()
        committed = event.created_at.timestamp()
        if committed >= self._since:
            metrics.DELIVERY_LAG.labels(self._transport).observe(max(time.time() - committed, 0.0))
