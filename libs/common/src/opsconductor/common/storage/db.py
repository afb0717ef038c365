"""Connection pools with the codecs every repository relies on."""

from __future__ import annotations

import json
from typing import Any

import asyncpg


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


async def _init_connection(conn: asyncpg.Connection) -> None:
    # JSON/JSONB travel as Python objects; no repository does its own json.loads.
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(typename, encoder=_dumps, decoder=json.loads, schema="pg_catalog")


async def connect(dsn: str) -> asyncpg.Connection:
    """Open one connection with the shared codecs (for LISTEN and for one-off commands)."""
    conn: asyncpg.Connection = await asyncpg.connect(dsn)
    await _init_connection(conn)
    return conn


async def create_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 10, command_timeout: float | None = 30.0
) -> asyncpg.Pool:
    """Create an asyncpg pool whose connections encode and decode JSON/JSONB as Python values."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        command_timeout=command_timeout,
    )
    return pool
