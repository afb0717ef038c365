"""Session-level Postgres advisory locks: one holder at a time across processes (the reaper)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

__all__ = ["try_advisory_lock"]


@asynccontextmanager
async def try_advisory_lock(pool: asyncpg.Pool, key: int) -> AsyncIterator[bool]:
    """Try ``key`` without waiting; yields whether it is held, for the block's duration.

    The lock belongs to the session, so one connection is held for the whole block and the lock
    is released on it at the end (the pool must keep asyncpg's full reset: a session lock left
    behind by a crash of the block is then still dropped on release).
    """
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
            yield False
            return
        try:
            yield True
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", key)
