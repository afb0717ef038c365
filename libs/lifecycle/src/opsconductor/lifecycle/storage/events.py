"""The execution event log: an ordered, per-execution sequence written with each state change."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg

#: NOTIFY channel carrying "{execution_id}:{seq}" (or ":{event_id}" for events of no execution).
EVENTS_CHANNEL = "execution_events"

# One round trip for an execution's event: take the next seq, insert, notify. The NOTIFY is
# queued in the same statement and delivered at commit, never for a rolled-back change.
_APPEND_FOR_EXECUTION = """
WITH next AS (
    UPDATE executions SET event_seq = event_seq + 1 WHERE id = $1 RETURNING id, event_seq
), inserted AS (
    INSERT INTO execution_events (execution_id, tenant_id, actor_id, seq, type, payload)
    SELECT next.id, $2, $3, next.event_seq, $4, $5 FROM next
    RETURNING seq
)
SELECT seq, pg_notify($6, $1::text || ':' || seq) FROM inserted
"""
_APPEND_UNBOUND = """
WITH inserted AS (
    INSERT INTO execution_events (execution_id, tenant_id, actor_id, seq, type, payload)
    VALUES (NULL, $1, $2, 0, $3, $4)
    RETURNING id
)
SELECT id, pg_notify($5, ':' || id) FROM inserted
"""


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
