"""The database pool a service opens at start-up (before SERVING) and closes at shutdown."""

from __future__ import annotations

import asyncio
import socket

import pytest
from pydantic import SecretStr

from opsconductor.common.errors import StorageError
from opsconductor.common.rpc.resources import DatabasePool


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
