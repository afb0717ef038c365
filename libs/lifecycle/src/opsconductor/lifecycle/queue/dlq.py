"""The dead-letter queue: ``execution_dlq``, where jobs land after their last attempt.

* :func:`move_to_dlq` deletes the job's ``execution_queue`` row and inserts the DLQ row in one
  statement, so however often it runs (a retried worker, a racing reaper) an execution gets one
  DLQ entry per trip through the queue.
* :func:`list_dlq` pages entries newest first, filtered by tenant and error class.
* :func:`lock_open_entry` and :func:`mark_requeued` are the two halves of a requeue, for a caller
  that runs its own transaction in between: lock the entry (refusing one already requeued with
  :class:`DlqEntryRequeuedError`), do the work, mark it requeued (by whom, when), commit. The api's
  RequeueDlqEntry uses them to create a *new* execution of the same frozen plan (a dead-lettered
  execution is ``failed``, a terminal state, and never moves again), queued by the one queue
  recipe (:mod:`.enqueue`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from prometheus_client import Counter

from opsconductor.common.errors import (
    DlqEntryRequeuedError,
    NotFoundError,
)
from opsconductor.lifecycle.execution_metrics import counts_in_store
from opsconductor.lifecycle.storage.events import EVENTS_CHANNEL
from opsconductor.lifecycle.storage.execution_records import (
    PoolOrConnection,
    after_commit,
    connection,
    transaction,
)
from opsconductor.lifecycle.storage.executions import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
)
from opsconductor.lifecycle.storage.paging import (
    decode_page_token,
    encode_page_token,
    invalid_page_request,
)

#: Counted once per entry created, when its transaction commits (worker or reaper).
DLQ_MOVES = Counter("opsc_dlq_moves_total", "Executions moved to the dead-letter queue.")

__all__ = [
    "DlqEntry",
    "DlqEntryRequeuedError",
    "dlq_size",
    "get_dlq_entry",
    "list_dlq",
    "lock_open_entry",
    "mark_requeued",
    "move_to_dlq",
]

_MAX_ERROR_CLASS = 100  # execution_dlq.error_class is VARCHAR(100)
_MAX_ACTOR = 200  # execution_dlq.requeued_by is VARCHAR(200)

# The move and its moved_to_dlq event in one statement (seq handed out by the execution row as
# storage/events.py does; the audit hash is the insert trigger's; NOTIFY delivered at commit).
_MOVE_TEMPLATE = """
WITH gone AS (
    DELETE FROM execution_queue WHERE execution_id = $1 RETURNING tenant_id
), moved AS (
    INSERT INTO execution_dlq (execution_id, tenant_id, attempts, error_class, error_message,
                               last_error)
    SELECT $1, gone.tenant_id, $2::int, $3::varchar, $4::text, $5::jsonb FROM gone
    RETURNING id, tenant_id
), next AS (
    UPDATE executions e SET event_seq = e.event_seq + 1
    FROM moved WHERE e.id = $1
    RETURNING e.id, e.event_seq
), event AS (
    INSERT INTO execution_events (execution_id, tenant_id, actor_id, seq, type, payload)
    SELECT next.id, moved.tenant_id, NULL, next.event_seq, 'moved_to_dlq',
           jsonb_build_object('dlq_id', moved.id::text, 'attempts', $2::int,
                              'error_class', $3::varchar)
    FROM next, moved
    RETURNING execution_id, seq
){counted}
SELECT moved.id, moved.tenant_id,
       (SELECT count(pg_notify($6, event.execution_id::text || ':' || event.seq)) FROM event)
           AS notified
FROM moved
"""
_MOVE = _MOVE_TEMPLATE.format(counted="")
# The reaper's moves are counted by the moving statement (its process may be gone before a
# scrape; exported by the api as opsc_reaper_dlq_moves_total).
_MOVE_COUNTED = _MOVE_TEMPLATE.format(
    counted=""", counted AS (
    UPDATE metric_counters SET value = value + (SELECT count(*) FROM moved)
    WHERE name = 'reaper_dlq_moves' AND labels = '{}'::jsonb AND EXISTS (SELECT 1 FROM moved)
)"""
)
_OPEN_ENTRY = """
SELECT id FROM execution_dlq WHERE execution_id = $1 AND requeued_at IS NULL
ORDER BY created_at DESC, id DESC LIMIT 1
"""
_SELECT = "SELECT * FROM execution_dlq WHERE id = $1"
_SELECT_FOR_UPDATE = "SELECT * FROM execution_dlq WHERE id = $1 FOR UPDATE"
# Where an entry went when it was requeued as a new execution (the api's audit event).
_REQUEUED_AS = """
SELECT execution_id FROM execution_events
WHERE type = 'dlq_requeued' AND tenant_id = $2 AND payload->>'dlq_id' = $1
ORDER BY id DESC LIMIT 1
"""
_MARK_REQUEUED = """
UPDATE execution_dlq SET requeued_at = clock_timestamp(), requeued_by = $2
WHERE id = $1 RETURNING *
"""
_LIST = """
SELECT * FROM execution_dlq
WHERE ($1::varchar IS NULL OR tenant_id = $1)
  AND ($2::varchar IS NULL OR error_class = $2)
  AND ($3::boolean OR requeued_at IS NULL)
  AND ($4::timestamptz IS NULL OR (created_at, id) < ($4::timestamptz, $5::uuid))
ORDER BY created_at DESC, id DESC
LIMIT $6
"""
_SIZE = """
SELECT count(*) FROM execution_dlq
WHERE ($1::varchar IS NULL OR tenant_id = $1) AND ($2::boolean OR requeued_at IS NULL)
"""


@dataclass(frozen=True)
class DlqEntry:
    """One row of ``execution_dlq``; ``requeued_at``/``requeued_by`` are set once requeued."""

    id: UUID
    execution_id: UUID
    tenant_id: str
    attempts: int
    error_class: str | None
    error_message: str | None
    last_error: Any
    created_at: datetime
    requeued_at: datetime | None
    requeued_by: str | None


def _entry(row: Mapping[str, Any]) -> DlqEntry:
    return DlqEntry(**{name: row[name] for name in DlqEntry.__dataclass_fields__})


async def move_to_dlq(
    db: PoolOrConnection,
    execution_id: UUID,
    *,
    attempts: int,
    error_class: str | None,
    error_message: str | None,
    last_error: Mapping[str, Any] | None = None,
) -> UUID | None:
    """Move an execution's job from ``execution_queue`` to ``execution_dlq``; return the entry id.

    Idempotent: when the queue row is already gone (an earlier call moved it) the open entry's
    id is returned and nothing is written; None when there is neither a queue row nor an open
    entry. Concurrent calls serialise on the queue row, so exactly one inserts.
    """
    error = None if last_error is None else dict(last_error)
    klass = None if error_class is None else error_class[:_MAX_ERROR_CLASS]
    async with connection(db) as conn:
        stored = counts_in_store()
        moved = await conn.fetchrow(
            _MOVE_COUNTED if stored else _MOVE,
            execution_id,
            attempts,
            klass,
            error_message,
            error,
            EVENTS_CHANNEL,
        )
        if moved is None:
            dlq_id: UUID | None = await conn.fetchval(_OPEN_ENTRY, execution_id)
            return dlq_id
        if not stored:
            after_commit(conn, DLQ_MOVES.inc)
    moved_id: UUID = moved["id"]
    return moved_id


async def get_dlq_entry(
    db: PoolOrConnection, dlq_id: UUID, *, tenant_id: str | None = None
) -> DlqEntry:
    """One DLQ entry; :class:`NotFoundError` when absent (or another tenant's, if given)."""
    async with transaction(db) as conn:
        row = await conn.fetchrow(_SELECT, dlq_id)
    if row is None or (tenant_id is not None and row["tenant_id"] != tenant_id):
        raise NotFoundError("dead-letter entry not found", dlq_id=str(dlq_id))
    return _entry(row)


async def lock_open_entry(
    conn: PoolOrConnection, dlq_id: UUID, *, tenant_id: str | None = None
) -> DlqEntry:
    """Lock an entry that was not requeued yet, for the rest of the caller's transaction.

    Raises :class:`NotFoundError` (unknown entry, or another tenant's when ``tenant_id`` is
    given) and :class:`DlqEntryRequeuedError` when it was already requeued, naming by whom, when
    and, when known, the execution it became. Concurrent callers serialise on the row lock: the
    second one sees the first one's mark once it committed.
    """
    async with transaction(conn) as tx:
        row = await tx.fetchrow(_SELECT_FOR_UPDATE, dlq_id)
        if row is None or (tenant_id is not None and row["tenant_id"] != tenant_id):
            raise NotFoundError("dead-letter entry not found", dlq_id=str(dlq_id))
        if row["requeued_at"] is not None:
            became = await tx.fetchval(_REQUEUED_AS, str(dlq_id), row["tenant_id"])
            raise DlqEntryRequeuedError(
                f"dead-letter entry {dlq_id} was already requeued by {row['requeued_by']} at "
                f"{row['requeued_at'].isoformat()}"
                + (f" as execution {became}" if became is not None else ""),
                dlq_id=str(dlq_id),
                requeued_by=row["requeued_by"],
                requeued_at=row["requeued_at"].isoformat(),
                requeued_as=str(became) if became is not None else "",
            )
    return _entry(row)


async def mark_requeued(conn: PoolOrConnection, dlq_id: UUID, *, by: str) -> DlqEntry:
    """Record that ``by`` requeued the entry now; call it after :func:`lock_open_entry`."""
    async with transaction(conn) as tx:
        marked = await tx.fetchrow(_MARK_REQUEUED, dlq_id, by[:_MAX_ACTOR])
    if marked is None:
        raise NotFoundError("dead-letter entry not found", dlq_id=str(dlq_id))
    return _entry(marked)


async def list_dlq(
    db: PoolOrConnection,
    *,
    tenant_id: str | None = None,
    error_class: str | None = None,
    include_requeued: bool = False,
    page_size: int = DEFAULT_PAGE_SIZE,
    page_token: str | None = None,
) -> tuple[list[DlqEntry], str | None]:
    """One page of DLQ entries, newest first, and the next page's token (or None).

    Open entries only unless ``include_requeued``. Keyset pagination on ``(created_at, id)``; a
    page size of 0 means the default, capped at 200; the token is bound to the filters and a
    malformed or mismatched one raises :class:`InvalidPageRequestError`.
    """
    if page_size < 0:
        raise invalid_page_request("page_size", "must not be negative")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    scope = _scope(tenant_id, error_class, include_requeued)
    after = decode_page_token(page_token, scope) if page_token else None
    async with transaction(db) as conn:
        rows = await conn.fetch(
            _LIST,
            tenant_id,
            error_class,
            include_requeued,
            after[0] if after else None,
            after[1] if after else None,
            size + 1,
        )
    entries = [_entry(row) for row in rows[:size]]
    next_token = None
    if len(rows) > size:
        next_token = encode_page_token(entries[-1].created_at, entries[-1].id, scope)
    return entries, next_token


async def dlq_size(
    db: PoolOrConnection, *, tenant_id: str | None = None, include_requeued: bool = False
) -> int:
    """How many entries the DLQ holds (open ones unless ``include_requeued``): the DLQ gauge."""
    async with transaction(db) as conn:
        count = await conn.fetchval(_SIZE, tenant_id, include_requeued)
    return int(count)


def _scope(tenant_id: str | None, error_class: str | None, include_requeued: bool) -> str:
    canonical = json.dumps(["dlq", tenant_id, error_class, include_requeued])
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
