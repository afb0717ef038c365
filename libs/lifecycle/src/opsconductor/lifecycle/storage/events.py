"""The execution event log: an ordered, per-execution sequence written with each state change."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg

from opsconductor.lifecycle.storage.queries import query

#: NOTIFY channel carrying "{execution_id}:{seq}" (or ":{event_id}" for events of no execution).
EVENTS_CHANNEL = "execution_events"

_APPEND_FOR_EXECUTION = query("append_event")
_APPEND_UNBOUND = query("append_unbound_event")


async def append_event(
    conn: asyncpg.Connection,
    *,
    tenant_id: str,
    execution_id: UUID | None,
    actor_id: str | None,
    type: str,
    payload: dict[str, Any] | None = None,
) -> int:
    """Append one event and notify listeners; returns its per-execution ``seq`` (0 if none).

    Call it inside the transaction that makes the change it records, so the event exists exactly
    when the change does. The NOTIFY is delivered at commit, never for a rolled-back change.
    """
    if execution_id is None:
        await conn.fetchrow(
            _APPEND_UNBOUND, tenant_id, actor_id, type, payload or {}, EVENTS_CHANNEL
        )
        return 0
    row = await conn.fetchrow(
        _APPEND_FOR_EXECUTION,
        execution_id,
        tenant_id,
        actor_id,
        type,
        payload or {},
        EVENTS_CHANNEL,
    )
    if row is None:
        raise LookupError(f"execution {execution_id} does not exist")
    return int(row["seq"])
