"""Fixtures the integration tests share (the session-wide servers are in ``tests/conftest.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis


@pytest.fixture
async def redis_client(redis_url: str, redis_prefix: str) -> AsyncIterator[Redis]:
    """A client of the run's Redis; this test's keys (``redis_prefix``) are deleted after it."""
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        # Only this test's own keys: the server may be shared.
        keys = [key async for key in client.scan_iter(match=f"{redis_prefix}*", count=500)]
        if keys:
            await client.delete(*keys)
        await client.aclose()
