"""Push dispatch: idle consumers are woken when a job becomes ready, instead of only polling.

Whoever queues a job announces it (:meth:`RedisQueue.announce`: ``PUBLISH`` on
``{prefix}q:v1:wake``) once the Postgres transaction that created its row has committed —
announcing from inside the transaction would wake a worker that then finds no visible row and
has to defer the job. :class:`Wakeups` holds one pub/sub connection per worker process and
wakes **one** waiting consumer slot per message (all slots
for every message would make every idle slot of every worker race for the one job). A message
that arrives while no slot waits (they were all dequeuing) is kept, so the next slot to wait
returns at once: a job is never left waiting for a poll because its message came a moment too
early.

Polling stays the fallback and the only way for what no message announces (retries whose
backoff ended, deferred jobs, leases reclaimed after expiry, a lost pub/sub connection): a slot
waits at most its poll interval. Pub/sub is best effort by design: a message lost while the
connection is down only costs that poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

__all__ = ["Wakeups"]

log = structlog.get_logger(__name__)

#: Back-off after the pub/sub connection failed (doubling up to the cap).
_RETRY_S = 0.5
_RETRY_MAX_S = 5.0
#: How long one read of the pub/sub connection blocks (well under the client's socket timeout).
_LISTEN_TIMEOUT_S = 1.0


class Wakeups:
    """Wakes one waiting consumer slot per job announced on ``channel``
    (``RedisQueue.wake_channel``)."""

    def __init__(self, redis: Redis, channel: str, *, max_pending: int = 64) -> None:
        self._redis = redis
        self._channel = channel
        self._max_pending = max_pending
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._pending = 0
        self._task: asyncio.Task[None] | None = None
        #: Set once subscribed (tests wait for it; consumers do not need to).
        self.subscribed = asyncio.Event()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="queue-wakeups")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.wake_all()

    def wake_all(self) -> None:
        """Wake every waiting slot (the consumer is stopping)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def notify(self) -> None:
        """One job is ready: wake one waiting slot, or keep the news for the next one."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._pending = min(self._pending + 1, self._max_pending)

    async def wait(self, timeout_s: float) -> bool:
        """Until a job is announced (True) or ``timeout_s`` passed (False)."""
        if self._pending:
            self._pending -= 1
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        finally:
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        # Woken even if the timeout struck in the same instant: the message is not lost.
        return not waiter.cancelled()

    async def _listen(self) -> None:
        delay = _RETRY_S
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                self.subscribed.set()
                delay = _RETRY_S
                while True:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=_LISTEN_TIMEOUT_S
                    )
                    if message is not None and message.get("type") == "message":
                        self.notify()
            except (RedisError, OSError) as exc:
                self.subscribed.clear()
                log.warning("queue_wakeups_lost", error=type(exc).__name__, retry_s=delay)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX_S)
