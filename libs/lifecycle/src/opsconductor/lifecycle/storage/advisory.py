"""Session-level Postgres advisory locks: one holder at a time across processes (the reaper)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from opsconductor.lifecycle.storage.queries import query

__all__ = ["try_advisory_lock"]

_TRY_LOCK = query("try_advisory_lock")
_UNLOCK = query("advisory_unlock")


@asynccontextmanager
async def try_advisory_lock(pool: asyncpg.Pool, key: int) -> AsyncIterator[bool]:
    """Try ``key`` without waiting; yields whether it is held, for the block's duration.

    The lock belongs to the session, so one connection is held for the whole block and the lock
    is released on it at the end (the pool must keep asyncpg's full reset: a session lock left
    behind by a crash of the block is then still dropped on release).
    """
    async with pool.acquire() as conn:
        if not await conn.fetchval(_TRY_LOCK, key):
            yield False
            return
        try:
            yield True
        finally:
            await conn.execute(_UNLOCK, key)
