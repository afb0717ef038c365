"""The security audit trail: ``rbac_violation`` events, written apart from any caller's transaction.

Violations are ordinary rows of ``execution_events`` (type ``rbac_violation``), filed under the
tenant that was *targeted*, so that tenant's SOC sees attempts against it. They are written on a
connection of their own, in a transaction of their own: a denied request usually rolls back, and
the record of the denial must survive that.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final
from uuid import UUID

import asyncpg

from opsconductor.common.errors import StorageError
from opsconductor.lifecycle.storage.events import append_event
from opsconductor.lifecycle.storage.queries import query

__all__ = [
    "RBAC_VIOLATION_EVENT",
    "RbacViolation",
    "list_rbac_violations",
    "record_rbac_violation",
]

RBAC_VIOLATION_EVENT: Final = "rbac_violation"
MAX_LIST_LIMIT: Final = 1000
#: How long to wait for the execution row (its event sequence) before filing the event unlinked.
LINK_LOCK_TIMEOUT_MS: Final = 1000

_DRIVER_ERRORS: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)

_EXECUTION_IN_TENANT = query("execution_in_tenant")
_SELECT_VIOLATIONS = query("list_rbac_violations")


@dataclass(frozen=True)
class RbacViolation:
    """One recorded denial, as the targeted tenant's auditors see it."""

    event_id: int
    tenant_id: str
    actor_id: str | None
    execution_id: UUID | None
    created_at: datetime
    payload: Mapping[str, Any] = field(repr=False)

    @property
    def reason(self) -> str:
        """Why it was denied: TENANT_MISMATCH, NO_ROLE_BINDING or MISSING_PERMISSION."""
        return str(self.payload.get("reason", ""))

    @property
    def tier(self) -> str:
        """Which tier denied it: api, worker or approvals."""
        return str(self.payload.get("tier", ""))

    @property
    def actor_tenant(self) -> str:
        """The tenant the actor authenticated for (differs from ``tenant_id`` on a mismatch)."""
        return str(self.payload.get("actor_tenant", ""))

    @property
    def missing(self) -> tuple[str, ...]:
        """The permissions that were not granted."""
        return tuple(self.payload.get("missing", ()))


async def _linkable_execution(
    conn: asyncpg.Connection, tenant_id: str, execution_id: UUID | None
) -> UUID | None:
    # An event may only hang off an execution of the tenant it is filed under: a probe for
    # another tenant's execution id is recorded, but not linked to (or revealed in) that row.
    if execution_id is None:
        return None
    found = await conn.fetchval(_EXECUTION_IN_TENANT, execution_id, tenant_id)
    return execution_id if found else None


async def record_rbac_violation(
    pool: asyncpg.Pool,
    *,
    tenant_id: str,
    actor_id: str,
    execution_id: UUID | None,
    payload: Mapping[str, Any],
) -> None:
    """File an ``rbac_violation`` event under ``tenant_id`` in a transaction of its own.

    The event is linked to ``execution_id`` when that execution exists in ``tenant_id``. Linking
    takes the execution row's lock (its event sequence); if the row stays locked — e.g. by the
    caller's own open transaction, which would otherwise wait on us forever — the event is filed
    unlinked instead (the id is in the payload either way). Raises :class:`StorageError`.
    """
    body = {**payload, "execution_id": str(execution_id) if execution_id else None}
    try:
        async with pool.acquire() as conn:
            try:
                async with conn.transaction():
                    # SET takes no bind parameter: the module's constant is composed in.
                    await conn.execute(f"SET LOCAL lock_timeout = {LINK_LOCK_TIMEOUT_MS}")
                    linked = await _linkable_execution(conn, tenant_id, execution_id)
                    await append_event(
                        conn,
                        tenant_id=tenant_id,
                        execution_id=linked,
                        actor_id=actor_id,
                        type=RBAC_VIOLATION_EVENT,
                        payload=body,
                    )
                    return
            except (asyncpg.LockNotAvailableError, LookupError):
                pass  # row locked too long, or deleted meanwhile: file it unlinked below
            async with conn.transaction():
                await append_event(
                    conn,
                    tenant_id=tenant_id,
                    execution_id=None,
                    actor_id=actor_id,
                    type=RBAC_VIOLATION_EVENT,
                    payload=body,
                )
    except _DRIVER_ERRORS as exc:
        raise StorageError("could not record rbac violation", tenant_id=tenant_id) from exc


async def list_rbac_violations(
    db: Any, tenant_id: str, actor_id: str | None = None, limit: int = 100
) -> list[RbacViolation]:
    """Newest-first violations filed under ``tenant_id``, optionally only those of ``actor_id``.

    ``db`` is a pool or a connection; ``limit`` is 1..1000.
    """
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIST_LIMIT}")
    try:
        rows = await db.fetch(_SELECT_VIOLATIONS, tenant_id, RBAC_VIOLATION_EVENT, actor_id, limit)
    except _DRIVER_ERRORS as exc:
        raise StorageError("could not list rbac violations", tenant_id=tenant_id) from exc
    return [
        RbacViolation(
            event_id=row["id"],
            tenant_id=row["tenant_id"],
            actor_id=row["actor_id"],
            execution_id=row["execution_id"],
            created_at=row["created_at"],
            payload=row["payload"],
        )
        for row in rows
    ]
