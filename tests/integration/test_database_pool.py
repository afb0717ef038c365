"""The database pool a service opens at start-up (before SERVING) and closes at shutdown."""

from __future__ import annotations

import asyncio
import socket

import pytest
from pydantic import SecretStr

from opsconductor.common.errors import StorageError
from opsconductor.devstack.pg_roundtrips import RoundTripCounter
from opsconductor.lifecycle.storage.db import create_pool
from opsconductor.rpc.resources import DatabasePool


async def test_pool_is_unavailable_until_opened_and_after_closed(db_dsn: str) -> None:
    """.pool raises StorageError (→ UNAVAILABLE) before open() and after close()."""
    db = DatabasePool(SecretStr(db_dsn), max_size=2)
    with pytest.raises(StorageError):
        _ = db.pool
    await db.open()
    try:
        assert await db.pool.fetchval("SELECT 41 + 1") == 42
        # The shared JSON codecs are installed: jsonb comes back as Python values.
        assert await db.pool.fetchval("""SELECT '{"a": [1, 2]}'::jsonb""") == {"a": [1, 2]}
    finally:
        await db.close()
    with pytest.raises(StorageError):
        _ = db.pool
    await db.close()  # idempotent


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_unreachable_database_is_retried_then_reported_without_the_dsn() -> None:
    """open() retries while the database refuses connections, then raises a StorageError that
    does not quote the DSN (it may hold a password)."""
    dsn = f"postgresql://app:sekret-pw@127.0.0.1:{_unused_port()}/opsc"
    db = DatabasePool(SecretStr(dsn), connect_timeout_s=0.3, retry_interval_s=0.05)
    with pytest.raises(StorageError) as caught:
        await asyncio.wait_for(db.open(), timeout=10)
    assert caught.value.details["attempts"] >= 2
    assert "sekret" not in str(caught.value)
    assert "sekret" not in repr(caught.value.details)


async def test_release_sends_nothing_yet_an_open_transaction_is_rolled_back(db_dsn: str) -> None:
    """The services' pools skip asyncpg's reset query (one round trip per release): a release
    sends no statement, and what must not outlive a borrower still does not — a transaction
    left open is rolled back by asyncpg itself before the (empty) reset hook."""
    async with RoundTripCounter.for_dsn(db_dsn) as counter:
        pool = await create_pool(counter.dsn(db_dsn), min_size=1, max_size=1)
        try:
            await pool.fetchval("SELECT 1")
            mark = counter.mark()
            for _ in range(3):
                assert await pool.fetchval("SELECT 1") == 1
            assert [rt.text for rt in counter.since(mark)] == ["SELECT 1"] * 3

            conn = await pool.acquire()
            await conn.execute("BEGIN")
            await conn.execute("CREATE TEMP TABLE left_open (x int)")
            await pool.release(conn)
            async with pool.acquire() as again:
                assert not again.is_in_transaction()
                assert await again.fetchval("SELECT to_regclass('pg_temp.left_open')") is None
        finally:
            await pool.close()


async def test_a_session_reset_pool_releases_session_state(db_dsn: str) -> None:
    """``session_reset=True`` (the reaper's pool: it holds a session advisory lock) keeps
    asyncpg's full reset: an advisory lock a borrower forgot is gone after release."""
    pool = await create_pool(db_dsn, min_size=1, max_size=1, session_reset=True)
    try:
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT pg_try_advisory_lock(4242)")
        async with pool.acquire() as conn:
            held = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242"
                " AND pid = pg_backend_pid()"
            )
            assert held == 0
    finally:
        await pool.close()
