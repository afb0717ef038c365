"""The execution event log: an ordered, per-execution sequence written with each state change."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg

#: NOTIFY channel carrying "{execution_id}:{seq}" (or ":{event_id}" for events of no execution).
EVENTS_CHANNEL = "execution_events"

_NEXT_SEQ = "UPDATE executions SET event_seq = event_seq + 1 WHERE id = $1 RETURNING event_seq"
_INSERT = """
INSERT INTO execution_events (execution_id, tenant_id, actor_id, seq, type, payload)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING id
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
    seq = 0
    if execution_id is not None:
        seq = await conn.fetchval(_NEXT_SEQ, execution_id)
        if seq is None:
            raise LookupError(f"execution {execution_id} does not exist")
    event_id = await conn.fetchval(
        _INSERT, execution_id, tenant_id, actor_id, seq, type, payload or {}
    )
    note = f"{execution_id}:{seq}" if execution_id is not None else f":{event_id}"
    await conn.execute("SELECT pg_notify($1, $2)", EVENTS_CHANNEL, note)
    return int(seq)
