"""Reads of the execution event log: an execution's events after a seq, and audit listings.

The writers are in :mod:`.events`. Reads are ordered by ``seq`` within an execution (gapless
and monotonic, so "everything after N" is exact) and by ``id`` across a tenant. Every read is
scoped to a tenant: another tenant's events are indistinguishable from missing ones.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from opsconductor.lifecycle.storage.execution_records import PoolOrConnection, transaction
from opsconductor.lifecycle.storage.paging import invalid_page_request
from opsconductor.lifecycle.storage.queries import query

__all__ = [
    "DEFAULT_EVENT_PAGE_SIZE",
    "MAX_EVENT_PAGE_SIZE",
    "TERMINAL_EVENT",
    "EventRecord",
    "ExecutionEventHead",
    "event_head",
    "list_events",
    "read_events_after",
]

#: The last event of every execution; its payload carries the final status.
TERMINAL_EVENT = "execution_completed"
DEFAULT_EVENT_PAGE_SIZE = 100
MAX_EVENT_PAGE_SIZE = 500
_MAX_TYPES = 20
_MAX_NAME = 200


@dataclass(frozen=True)
class EventRecord:
    """One row of ``execution_events``."""

    id: int
    execution_id: UUID | None
    tenant_id: str
    actor_id: str | None
    seq: int
    type: str
    payload: Mapping[str, Any]
    created_at: datetime

    @property
    def is_terminal(self) -> bool:
        """True for ``execution_completed``: nothing of the execution's run follows it."""
        return self.type == TERMINAL_EVENT

    def to_json_dict(self) -> dict[str, Any]:
        """The event as the HTTP transports send it (the same fields as the protobuf)."""
        return {
            "execution_id": str(self.execution_id) if self.execution_id else "",
            "seq": self.seq,
            "type": self.type,
            "payload": dict(self.payload),
            "created_at": self.created_at.isoformat(),
            "tenant_id": self.tenant_id,
            "actor_id": self.actor_id or "",
        }


@dataclass(frozen=True)
class ExecutionEventHead:
    """Where an execution's event log stands: its last seq and, once ended, its terminal seq."""

    tenant_id: str
    last_seq: int
    #: Seq of ``execution_completed``, None while the execution runs.
    completed_seq: int | None


def event_from_row(row: Mapping[str, Any]) -> EventRecord:
    """An :class:`EventRecord` from an ``execution_events`` row."""
    return EventRecord(
        id=row["id"],
        execution_id=row["execution_id"],
        tenant_id=row["tenant_id"],
        actor_id=row["actor_id"],
        seq=row["seq"],
        type=row["type"],
        payload=row["payload"],
        created_at=row["created_at"],
    )


_AFTER = query("events_after")
_HEAD = query("event_head")


async def read_events_after(
    db: PoolOrConnection, execution_id: UUID, after_seq: int, *, limit: int = 500
) -> list[EventRecord]:
    """Up to ``limit`` events of ``execution_id`` with ``seq > after_seq``, in seq order.

    Not tenant-scoped: call it only for an execution whose tenant the caller was checked for.
    """
    async with transaction(db) as conn:
        rows = await conn.fetch(_AFTER, execution_id, after_seq, limit)
    return [event_from_row(row) for row in rows]


async def event_head(db: PoolOrConnection, execution_id: UUID) -> ExecutionEventHead | None:
    """The execution's tenant, last seq and terminal seq; None if it does not exist."""
    async with transaction(db) as conn:
        row = await conn.fetchrow(_HEAD, execution_id, TERMINAL_EVENT)
    if row is None:
        return None
    return ExecutionEventHead(row["tenant_id"], row["event_seq"], row["completed_seq"])


_LIST_EXECUTION = query("list_execution_events")
_LIST_TENANT = query("list_tenant_events")


async def list_events(
    db: PoolOrConnection,
    tenant_id: str,
    *,
    execution_id: UUID | None = None,
    types: Collection[str] = (),
    actor_id: str | None = None,
    after_seq: int = 0,
    page_size: int = DEFAULT_EVENT_PAGE_SIZE,
    page_token: str | None = None,
) -> tuple[list[EventRecord], str | None]:
    """One page of a tenant's events and the token of the next page (or None).

    With ``execution_id``: that execution's events after ``after_seq`` in seq order; without:
    every event of the tenant (audit queries: ``types=["rbac_violation"]``, ``actor_id``) in
    the order they were written. A page size of 0 means the default; it is capped at 500. The
    opaque token is bound to the filters it was issued for.
    """
    wanted = sorted(set(types))
    if len(wanted) > _MAX_TYPES or any(not t or len(t) > _MAX_NAME for t in wanted):
        raise invalid_page_request("types", f"at most {_MAX_TYPES} non-empty event type names")
    if actor_id is not None and len(actor_id) > _MAX_NAME:
        raise invalid_page_request("actor_id", f"at most {_MAX_NAME} characters")
    if page_size < 0:
        raise invalid_page_request("page_size", "must not be negative")
    if after_seq < 0:
        raise invalid_page_request("after_seq", "must not be negative")
    size = min(page_size or DEFAULT_EVENT_PAGE_SIZE, MAX_EVENT_PAGE_SIZE)
    scope = _fingerprint(tenant_id, execution_id, wanted, actor_id)
    after_key = _decode_token(page_token, scope) if page_token else 0
    seq_floor, id_floor = (max(after_seq, after_key), 0) if execution_id else (0, after_key)
    async with transaction(db) as conn:
        rows = await conn.fetch(
            _LIST_EXECUTION if execution_id else _LIST_TENANT,
            tenant_id,
            execution_id,
            wanted,
            actor_id,
            seq_floor,
            id_floor,
            size + 1,
        )
    events = [event_from_row(row) for row in rows[:size]]
    next_token = None
    if len(rows) > size:
        last = events[-1]
        next_token = _encode_token(last.seq if execution_id else last.id, scope)
    return events, next_token


def _fingerprint(
    tenant_id: str, execution_id: UUID | None, types: list[str], actor_id: str | None
) -> str:
    canonical = json.dumps(
        ["events", tenant_id, str(execution_id or ""), types, actor_id], separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _encode_token(key: int, scope: str) -> str:
    raw = json.dumps({"k": key, "s": scope}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_token(token: str, scope: str) -> int:
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        key = data["k"]
        token_scope = data["s"]
    except (binascii.Error, UnicodeError, ValueError, KeyError, TypeError) as exc:
        raise invalid_page_request("page_token", "is not a token this service issued") from exc
    if not isinstance(key, int) or isinstance(key, bool) or key < 0:
        raise invalid_page_request("page_token", "is not a token this service issued")
    if token_scope != scope:
        raise invalid_page_request("page_token", "was issued for another tenant or other filters")
    return key
