"""Cancellation as a worker sees it: a cheap check between steps, and a live signal while waiting.

``request_cancel`` (executions.py) records the request and sends ``NOTIFY execution_cancel``. A
worker keeps one ``CancelSignals`` listener per process: each running execution gets an
``asyncio.Event`` that is set when its notification arrives, so a sleeping or waiting step
notices at once. The listener is an optimisation only: ``check_cancelled`` reads the row between
steps, so a notification lost with a dropped connection delays a cancel by one step at most.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any
from uuid import UUID

import asyncpg
import structlog

from opsconductor.common.errors import NotFoundError, StorageError
from opsconductor.lifecycle.storage.queries import query

from .db import connect
from .execution_records import PoolOrConnection
from .executions import CANCEL_CHANNEL

log = structlog.get_logger(__name__)

_CHECK = query("check_cancel_requested")


async def check_cancelled(db: PoolOrConnection, execution_id: UUID) -> bool:
    """Whether cancellation was requested; counts the check in ``cancel_checks_performed``."""
    try:
        cancelled = await db.fetchval(_CHECK, execution_id)
    except (asyncpg.PostgresError, OSError) as exc:
        raise StorageError("could not check for cancellation") from exc
    if cancelled is None:
        raise NotFoundError("execution not found", execution_id=str(execution_id))
    return bool(cancelled)


class CancelSignals:
    """One LISTEN connection fanning ``execution_cancel`` notifications out to watchers."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: asyncpg.Connection | None = None
        self._events: dict[str, set[asyncio.Event]] = {}

    async def start(self) -> None:
        self._conn = await connect(self._dsn)
        await self._conn.add_listener(CANCEL_CHANNEL, self._on_notify)

    async def stop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(asyncpg.PostgresError, OSError):
                await conn.remove_listener(CANCEL_CHANNEL, self._on_notify)
            await conn.close()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        for event in self._events.get(payload, ()):
            event.set()

    @contextlib.contextmanager
    def watch(self, execution_id: UUID) -> Iterator[asyncio.Event]:
        """An event set when cancellation of ``execution_id`` is requested, while in scope."""
        key = str(execution_id)
        event = asyncio.Event()
        self._events.setdefault(key, set()).add(event)
        try:
            yield event
        finally:
            watchers = self._events.get(key)
            if watchers is not None:
                watchers.discard(event)
                if not watchers:
                    del self._events[key]
