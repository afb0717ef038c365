"""A short-lived cache of role bindings, dropped whenever ``role_bindings`` changes.

The authorizer of each tier reads a principal's roles on every request; most requests of one
principal come in bursts, seconds apart at most. :class:`RoleCache` keeps what it read for its
age limit and forgets everything the moment Postgres notifies ``role_bindings_changed`` (a
trigger on every change, migration 0011): a revoked binding is refused by the next check once
the notification has arrived (milliseconds after the commit), and once the age limit has passed
at the latest even if it never does. While its listening connection is down the cache serves
nothing: every check reads Postgres, as without a cache, until the connection is back.

The worker, the second line of defence, keeps the default :data:`MAX_AGE_S`, under a second,
so that even a lost notification cannot let a revoked binding run anything a second later; the
api may keep roles longer (:data:`FRONT_DOOR_MAX_AGE_S`): the worker refuses what it let in.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, Final

import asyncpg
import structlog

from .db import connect
from .role_bindings import load_roles

__all__ = ["CHANNEL", "FRONT_DOOR_MAX_AGE_S", "MAX_AGE_S", "RoleCache"]

log = structlog.get_logger(__name__)

#: NOTIFY channel of migration 0011's trigger (any change of ``role_bindings``).
CHANNEL: Final = "role_bindings_changed"
#: The longest a cached binding is used: the bound on how late a revocation is seen if its
#: notification were lost (a second, the issue-10 requirement, with room to spare).
MAX_AGE_S: Final = 0.9
#: The api's age limit (its check is repeated by the worker's, which keeps MAX_AGE_S).
FRONT_DOOR_MAX_AGE_S: Final = 5.0
#: Entries kept at most; beyond it the cache starts over (a burst of distinct principals).
MAX_ENTRIES: Final = 10_000
#: Pause between attempts to get the listening connection back.
RECONNECT_S: Final = 1.0


class RoleCache:
    """Roles by (tenant, principal), each kept :data:`MAX_AGE_S`, all dropped on a change."""

    def __init__(
        self,
        dsn: str,
        *,
        max_age_s: float = MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._dsn = dsn
        self._max_age_s = max_age_s
        self._clock = clock
        self._conn: asyncpg.Connection | None = None
        self._entries: dict[tuple[str, str], tuple[float, frozenset[str]]] = {}
        # Bumped by every notification: a read that overlapped one is not kept.
        self._generation = 0
        self._reconnect: asyncio.Task[None] | None = None
        self._stopped = False
        self._heard = 0

    @property
    def listening(self) -> bool:
        """Whether changes are being heard (otherwise nothing is served from the cache)."""
        return self._conn is not None and not self._conn.is_closed()

    @property
    def changes_heard(self) -> int:
        """How many change notifications arrived so far."""
        return self._heard

    async def start(self) -> None:
        """Listen for changes; raises if Postgres cannot be reached (as the pool would)."""
        self._stopped = False
        await self._listen()

    async def stop(self) -> None:
        self._stopped = True
        if self._reconnect is not None:
            self._reconnect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect
            self._reconnect = None
        conn, self._conn = self._conn, None
        self._forget()
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(asyncpg.PostgresError, OSError):
                await conn.remove_listener(CHANNEL, self._on_change)
            await conn.close()

    async def roles(self, db: Any, tenant_id: str, principal: str) -> frozenset[str]:
        """The roles ``principal`` holds in ``tenant_id``: cached, or read through ``db``."""
        if not self.listening:
            return await load_roles(db, tenant_id, principal)
        key = (tenant_id, principal)
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None and now - entry[0] < self._max_age_s:
            return entry[1]
        generation = self._generation
        roles = await load_roles(db, tenant_id, principal)
        # Aged from before the read: a change committed while it ran may not be in it, and its
        # notification, if it came meanwhile, bumped the generation.
        if generation == self._generation and self.listening:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[key] = (now, roles)
        return roles

    async def _listen(self) -> None:
        conn = await connect(self._dsn)
        await conn.add_listener(CHANNEL, self._on_change)
        conn.add_termination_listener(self._on_lost)
        # Anything read before this point may predate a change nobody heard.
        self._forget()
        self._conn = conn

    def _forget(self) -> None:
        self._entries.clear()
        self._generation += 1

    def _on_change(self, _conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        self._heard += 1
        self._forget()

    def _on_lost(self, _conn: Any) -> None:
        self._conn = None
        self._forget()
        if self._stopped or (self._reconnect is not None and not self._reconnect.done()):
            return
        log.warning("role_cache_listener_lost")
        self._reconnect = asyncio.get_running_loop().create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        while not self._stopped and not self.listening:
            await asyncio.sleep(RECONNECT_S)
            try:
                await self._listen()
            except (asyncpg.PostgresError, OSError) as exc:
                log.warning("role_cache_listener_reconnect_failed", error=type(exc).__name__)
            else:
                log.info("role_cache_listener_restored")
