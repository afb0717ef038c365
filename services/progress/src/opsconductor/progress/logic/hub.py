"""Fan-out of execution events: one LISTEN connection per process, one reader per execution.

Writers append an event and ``NOTIFY execution_events, '<execution_id>:<seq>'`` in the same
transaction (:mod:`opsconductor.lifecycle.storage.events`); the notification carries ids only.
This hub holds the process's single listening connection. For every execution that has live
subscribers it keeps one :class:`_Feed`, which on a notification reads the new rows once
(``seq > last``) and hands them to every subscriber's bounded buffer. A lost notification only
delays: the next one, the feed's periodic re-read or a reconnect of the listener reads every row
after the last one seen. A subscriber whose buffer is full is cut off with its position (it
resumes with ``after_seq``) instead of slowing the others.

Limits: live subscribers per tenant and per process; beyond them ``ResourceExhaustedError``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final
from uuid import UUID

import asyncpg
import structlog

from opsconductor.common.errors import ResourceExhaustedError, StorageError
from opsconductor.lifecycle.storage.event_reads import EventRecord, event_head, read_events_after
from opsconductor.lifecycle.storage.events import EVENTS_CHANNEL

log = structlog.get_logger(__name__)

#: What a failed read or reconnect raises: the storage layer's StorageError wraps the driver's.
_DB_ERRORS: Final = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, StorageError)

Connect = Callable[[], Awaitable[asyncpg.Connection]]


@dataclass(frozen=True)
class HubLimits:
    """How much the hub holds: subscribers, buffer size, and how often it re-reads."""

    max_subscribers: int = 5000
    max_subscribers_per_tenant: int = 500
    #: Events buffered per subscriber; a subscriber that falls this far behind is cut off.
    buffer_size: int = 1000
    #: A feed re-reads this often without a notification (the safety net for a lost one).
    reread_interval_s: float = 2.0
    #: Wait before reconnecting a lost listening connection.
    reconnect_delay_s: float = 0.5
    read_batch: int = 500


class Wake(enum.Enum):
    """Why :meth:`Slot.next` returned without an event."""

    TIMEOUT = "timeout"
    #: The listener reconnected: notifications may be lost, re-read from the database.
    POKE = "poke"
    #: The buffer overflowed: the subscriber is cut off.
    LAGGED = "lagged"


class Slot:
    """One live subscriber's place in the hub: its buffer and whether it was cut off.

    A deque and one Event rather than an ``asyncio.Queue``: with a thousand subscribers of one
    execution every event is offered a thousand times, and the waiting side must not create
    tasks per event.
    """

    def __init__(self, tenant_id: str, execution_id: UUID, buffer_size: int) -> None:
        self.tenant_id = tenant_id
        self.execution_id = execution_id
        self.buffer: collections.deque[EventRecord] = collections.deque()
        self._size = buffer_size
        #: Set when the buffer overflowed: the subscriber must resume from its position.
        self.lagged = False
        self._poked = False
        self._signal = asyncio.Event()

    def offer(self, event: EventRecord) -> None:
        if self.lagged:
            return
        if len(self.buffer) >= self._size:
            self.lagged = True
        else:
            self.buffer.append(event)
        self._signal.set()

    def _overflowed(self) -> bool:
        return self.lagged

    def rearm(self) -> None:
        """Forget an overflow the subscriber caught up with from the database (its buffer
        held only events it has read there): back to live delivery."""
        self.buffer.clear()
        self.lagged = False

    def poke(self) -> None:
        """The listener reconnected: re-read from the database, a notification may be lost."""
        self._poked = True
        self._signal.set()

    async def next(self, wait_s: float | None) -> EventRecord | Wake:
        """The next buffered event, or why there is none (after ``wait_s`` at the latest)."""
        while True:
            if self.buffer:
                return self.buffer.popleft()
            if self._overflowed():
                return Wake.LAGGED
            if self._poked:
                self._poked = False
                return Wake.POKE
            self._signal.clear()
            if wait_s is None:
                await self._signal.wait()  # no timer to arm and cancel per event
                continue
            if wait_s <= 0:
                return Wake.TIMEOUT
            try:
                async with asyncio.timeout(wait_s):
                    await self._signal.wait()
            except TimeoutError:
                return Wake.TIMEOUT


class _Feed:
    """The single reader of one execution's new events, shared by all its subscribers."""

    def __init__(self, hub: EventHub, execution_id: UUID) -> None:
        self._hub = hub
        self.execution_id = execution_id
        self.slots: set[Slot] = set()
        self.last_seq: int | None = None
        #: Resolved once ``last_seq`` is known: a subscriber replays only after that, so every
        #: event is either in its replay or delivered by this feed.
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._dirty = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    def notify(self, seq: int | None) -> None:
        if seq is None or self.last_seq is None or seq > self.last_seq:
            self._dirty.set()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        pool = self._hub.pool
        try:
            head = await event_head(pool, self.execution_id)
        except BaseException as exc:
            if not self.ready.done():
                self.ready.set_exception(exc)
            raise
        self.last_seq = head.last_seq if head else 0
        self.ready.set_result(None)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self._hub.limits.reread_interval_s)
            self._dirty.clear()
            try:
                await self._read_new(pool)
            except _DB_ERRORS as exc:
                # The next notification or re-read tries again; subscribers only wait longer.
                log.warning("progress_feed_read_failed", error=type(exc).__name__)

    async def _read_new(self, pool: asyncpg.Pool) -> None:
        while True:
            assert self.last_seq is not None
            rows = await read_events_after(
                pool, self.execution_id, self.last_seq, limit=self._hub.limits.read_batch
            )
            for event in rows:
                self.last_seq = event.seq
                for slot in tuple(self.slots):
                    slot.offer(event)
            if len(rows) < self._hub.limits.read_batch:
                return


class EventHub:
    """The process's event fan-out (see the module docstring)."""

    def __init__(self, pool: asyncpg.Pool, connect: Connect, limits: HubLimits) -> None:
        self.pool = pool
        self.limits = limits
        self._connect = connect
        self._feeds: dict[UUID, _Feed] = {}
        self._per_tenant: Counter[str] = Counter()
        self._count = 0
        self._conn: asyncpg.Connection | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self.notifications = 0

    @property
    def subscriber_count(self) -> int:
        return self._count

    async def start(self) -> None:
        """Open the listening connection (fails if the database is unreachable)."""
        await self._listen()
        self._supervisor = asyncio.ensure_future(self._keep_listening())

    async def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        for feed in list(self._feeds.values()):
            await feed.close()
        self._feeds.clear()
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()

    async def acquire(self, tenant_id: str, execution_id: UUID) -> Slot:
        """A slot for a new subscriber, or ``ResourceExhaustedError`` beyond a limit.

        Returns once the execution's feed knows where the log stands: the caller's replay,
        read after this, and the feed's deliveries then leave no gap between them.
        """
        if self._count >= self.limits.max_subscribers:
            raise ResourceExhaustedError(
                "this progress server follows as many subscribers as it may; retry later or "
                "use another replica",
                limit="subscribers_per_process",
                max=self.limits.max_subscribers,
            )
        if self._per_tenant[tenant_id] >= self.limits.max_subscribers_per_tenant:
            raise ResourceExhaustedError(
                "the tenant has as many live event subscriptions as it may; close one first",
                limit="subscribers_per_tenant",
                max=self.limits.max_subscribers_per_tenant,
            )
        slot = Slot(tenant_id, execution_id, self.limits.buffer_size)
        feed = self._feeds.get(execution_id)
        if feed is None:
            feed = self._feeds[execution_id] = _Feed(self, execution_id)
        feed.slots.add(slot)
        self._per_tenant[tenant_id] += 1
        self._count += 1
        try:
            await asyncio.shield(feed.ready)
        except BaseException:
            self.release(slot)
            raise
        return slot

    def disconnect_all(self) -> None:
        """Cut every subscriber off with its position (shutdown: they resume elsewhere)."""
        for feed in self._feeds.values():
            for slot in feed.slots:
                slot.lagged = True
                slot.poke()

    def release(self, slot: Slot) -> None:
        feed = self._feeds.get(slot.execution_id)
        if feed is None or slot not in feed.slots:
            return
        feed.slots.discard(slot)
        self._count -= 1
        self._per_tenant[slot.tenant_id] -= 1
        if self._per_tenant[slot.tenant_id] <= 0:
            del self._per_tenant[slot.tenant_id]
        if not feed.slots:
            del self._feeds[slot.execution_id]
            feed._task.cancel()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.notifications += 1
        execution, _, seq = payload.partition(":")
        if not execution:
            return  # an event of no execution (e.g. a refused submit): nobody streams those
        try:
            feed = self._feeds.get(UUID(execution))
            number = int(seq)
        except ValueError:
            return
        if feed is not None:
            feed.notify(number)

    def _on_lost(self, _conn: object) -> None:
        self._lost.set()

    async def _listen(self) -> None:
        conn = await self._connect()
        conn.add_termination_listener(self._on_lost)
        await conn.add_listener(EVENTS_CHANNEL, self._on_notify)
        self._conn = conn
        self._lost.clear()

    async def _keep_listening(self) -> None:
        """Reconnect a lost listener; then every feed re-reads (notifications were missed)."""
        while True:
            await self._lost.wait()
            log.warning("progress_listener_lost")
            while True:
                await asyncio.sleep(self.limits.reconnect_delay_s)
                try:
                    await self._listen()
                    break
                except _DB_ERRORS as exc:
                    log.warning("progress_listener_reconnect_failed", error=type(exc).__name__)
            log.info("progress_listener_reconnected", feeds=len(self._feeds))
            for feed in self._feeds.values():
                feed.notify(None)
                for slot in feed.slots:
                    slot.poke()
