"""Approval rows: the record type, tenant-scoped reads, and closing the requests of an execution.

The writers that decide, invalidate and expire approvals live in :mod:`.approvals`; this module
holds what both they and :mod:`.executions` need (a cancelled execution closes its open
requests here), so that neither imports the other.

Reads are tenant-scoped like execution reads: another tenant's approval is indistinguishable
from a missing one (:class:`NotFoundError`). ``find_approval_owner`` exists for audit decisions
only, never for reads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Final
from uuid import UUID

from opsconductor.common.errors import NotFoundError
from opsconductor.lifecycle.storage.events import append_event
from opsconductor.lifecycle.storage.execution_records import PoolOrConnection, transaction
from opsconductor.lifecycle.storage.paging import (
    decode_page_token,
    encode_page_token,
    invalid_page_request,
)
from opsconductor.lifecycle.storage.queries import query

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "ApprovalRecord",
    "ApprovalState",
    "approval_from_row",
    "as_approval_id",
    "close_pending_approvals",
    "find_approval_owner",
    "get_approval",
    "list_pending_approvals",
    "step_approval",
]

MAX_PAGE_SIZE: Final = 200
DEFAULT_PAGE_SIZE: Final = 50


class ApprovalState(StrEnum):
    """State of an approval; the values are those of the ``approval_state`` Postgres enum.

    Only ``pending`` ever changes, once (the first decision wins); ``approved`` may still become
    ``invalidated`` when the worker finds the binding broken before the first step.
    """

    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    INVALIDATED = "invalidated"
    EXPIRED = "expired"


@dataclass(frozen=True)
class ApprovalRecord:
    """One row of ``approvals``, with ``plan`` (the plan's JSON form) when the read joined it."""

    id: UUID
    tenant_id: str
    execution_id: UUID
    step_id: str | None
    level: int
    state: ApprovalState
    plan_hash: str
    plan_snapshot_hash: str
    requested_by: str
    runbook_url: str | None
    decided_by: str | None
    auth_method: str | None
    source_ip: str | None
    decided_at: datetime | None
    comment: str | None
    created_at: datetime
    expires_at: datetime
    plan: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def is_pending(self) -> bool:
        return self.state is ApprovalState.PENDING

    @property
    def event_prefix(self) -> str:
        """``approval`` for a whole-plan approval, ``step_approval`` for a level-3 step."""
        return "approval" if self.step_id is None else "step_approval"


def approval_from_row(row: Mapping[str, Any]) -> ApprovalRecord:
    """Build an :class:`ApprovalRecord` from an ``approvals`` row (plus an optional ``plan``)."""
    plan = row.get("plan")
    return ApprovalRecord(
        id=row["id"],
        tenant_id=row["tenant_id"],
        execution_id=row["execution_id"],
        step_id=row["step_id"],
        level=row["level"],
        state=ApprovalState(row["state"]),
        plan_hash=row["plan_hash"],
        plan_snapshot_hash=row["plan_snapshot_hash"],
        requested_by=row["requested_by"],
        runbook_url=row["runbook_url"],
        decided_by=row["decided_by"],
        auth_method=row["auth_method"],
        source_ip=row["source_ip"],
        decided_at=row["decided_at"],
        comment=row["comment"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        plan=plan if isinstance(plan, Mapping) else None,
    )


def as_approval_id(value: UUID | str) -> UUID:
    """``value`` as a UUID; a malformed id raises :class:`NotFoundError` like an unknown one."""
    if isinstance(value, UUID):
        return value
    try:
        return UUID(value)
    except (ValueError, TypeError, AttributeError) as exc:
        raise NotFoundError("approval not found", approval_id=str(value)[:64]) from exc


_SELECT_ONE = query("get_tenant_approval")
_SELECT_STEP = query("step_approval")
_LIST_PENDING = query("list_pending_approvals")
_CLOSE_PENDING = query("close_pending_approvals")
_OWNER = query("approval_owner")


async def get_approval(
    db: PoolOrConnection, tenant_id: str, approval_id: UUID | str
) -> ApprovalRecord:
    """One approval of ``tenant_id`` with its plan; :class:`NotFoundError` if absent or foreign."""
    aid = as_approval_id(approval_id)
    async with transaction(db) as conn:
        row = await conn.fetchrow(_SELECT_ONE, aid, tenant_id)
    if row is None:
        raise NotFoundError("approval not found", approval_id=str(aid))
    return approval_from_row(row)


async def find_approval_owner(
    db: PoolOrConnection, approval_id: UUID | str
) -> tuple[str, UUID] | None:
    """``(tenant_id, execution_id)`` of ``approval_id``, or None: for audit decisions only (a
    cross-tenant attempt is recorded under the tenant it targeted), never for reads."""
    try:
        aid = as_approval_id(approval_id)
    except NotFoundError:
        return None
    async with transaction(db) as conn:
        row = await conn.fetchrow(_OWNER, aid)
    return None if row is None else (row["tenant_id"], row["execution_id"])


async def step_approval(
    db: PoolOrConnection, tenant_id: str, execution_id: UUID, step_id: str
) -> ApprovalRecord | None:
    """The open approval of one step of a level-3 execution, else its latest one, else None."""
    async with transaction(db) as conn:
        row = await conn.fetchrow(_SELECT_STEP, execution_id, tenant_id, step_id)
    return None if row is None else approval_from_row(row)


async def list_pending_approvals(
    db: PoolOrConnection,
    tenant_id: str,
    *,
    page_size: int = DEFAULT_PAGE_SIZE,
    page_token: str | None = None,
) -> tuple[list[ApprovalRecord], str | None]:
    """One page of the tenant's undecided, unexpired approvals, oldest first, with their plans.

    Keyset pagination on ``(created_at, id)``; a page size of 0 means the default, capped at 200.
    The opaque token is bound to the tenant; a malformed or foreign token raises
    :class:`InvalidPageRequestError`.
    """
    if page_size < 0:
        raise invalid_page_request("page_size", "must not be negative")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    scope = hashlib.sha256(f"pending-approvals:{tenant_id}".encode()).hexdigest()[:16]
    after = decode_page_token(page_token, scope) if page_token else None
    async with transaction(db) as conn:
        rows = await conn.fetch(
            _LIST_PENDING,
            tenant_id,
            after[0] if after else None,
            after[1] if after else None,
            size + 1,
        )
    records = [approval_from_row(row) for row in rows[:size]]
    next_token = None
    if len(rows) > size:
        last = records[-1]
        next_token = encode_page_token(last.created_at, last.id, scope)
    return records, next_token


async def close_pending_approvals(
    conn: Any,
    execution_id: UUID,
    *,
    state: ApprovalState,
    by: str,
    reason: str,
) -> list[ApprovalRecord]:
    """Close every open request of an execution that ended without them (cancel, expiry).

    Call inside the transaction that ends the execution, with its row locked. Each closed request
    gets its ``approval_<state>`` event (``approval_invalidated``, ``approval_expired``).
    """
    if state not in (ApprovalState.INVALIDATED, ApprovalState.EXPIRED):
        raise ValueError(f"open approvals are closed as invalidated or expired, not {state}")
    closed = [approval_from_row(r) for r in await conn.fetch(_CLOSE_PENDING, execution_id, state)]
    for approval in closed:
        await append_event(
            conn,
            tenant_id=approval.tenant_id,
            execution_id=execution_id,
            actor_id=by,
            type=f"approval_{state.value}",
            payload={
                "approval_id": str(approval.id),
                "step_id": approval.step_id,
                "level": approval.level,
                "reason": reason,
            },
        )
    return closed
