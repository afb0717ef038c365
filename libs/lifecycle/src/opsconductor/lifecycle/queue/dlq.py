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
from opsconductor.lifecycle.storage.queries import query

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

# The reaper's moves are also counted by the moving statement: the template's %COUNTED% is
# empty, or the counter's CTE.
_MOVE_TEMPLATE = query("move_to_dlq")
_MOVE = _MOVE_TEMPLATE.replace("%COUNTED%", "")
_MOVE_COUNTED = _MOVE_TEMPLATE.replace("%COUNTED%", query("move_to_dlq_counter").rstrip("\n"))
_OPEN_ENTRY = query("open_dlq_entry")
_SELECT = query("get_dlq_entry")
_SELECT_FOR_UPDATE = query("lock_dlq_entry")
_REQUEUED_AS = query("dlq_requeued_as")
_MARK_REQUEUED = query("mark_dlq_requeued")
_LIST = query("list_dlq")
_SIZE = query("dlq_size")


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
