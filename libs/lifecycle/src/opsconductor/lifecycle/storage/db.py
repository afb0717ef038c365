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


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool ``reset`` hook that sends nothing: one round trip saved on every release.

    Before calling it asyncpg has already rolled back a transaction left open and dropped the
    connection's listener callbacks (``Connection._reset``). Its default reset query
    (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``) undoes session state these
    services never leave on a pooled connection: no session ``SET`` (``SET LOCAL`` ends with its
    transaction), no cursors, ``LISTEN`` only on connections held for the process's life (the
    flag cache ``UNLISTEN``s before it gives its connection back), and session advisory locks
    only in the reaper, whose pool keeps the full reset (``session_reset=True``).
    """


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    command_timeout: float | None = 30.0,
    session_reset: bool = False,
) -> asyncpg.Pool:
    """Create an asyncpg pool whose connections encode and decode JSON/JSONB as Python values.

    ``session_reset``: run asyncpg's full session reset on every release (one more round trip
    each), for a pool whose users take session-level state such as advisory locks.
    """
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        command_timeout=command_timeout,
        reset=None if session_reset else _keep_session,
    )
    return pool
