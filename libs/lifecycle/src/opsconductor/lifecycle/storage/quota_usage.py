"""What a tenant's quotas count, read under the tenant's quota lock (docs/security.md, "Fair
share and quotas").

Admission is race-proof because every admitting transaction first takes
:func:`lock_tenant_quota`, a transaction-scoped advisory lock per tenant: concurrent submits of
one tenant count and create one after the other, and each sees what the previous one committed
(READ COMMITTED takes a new snapshot per statement, after the lock was granted). The lock ends
with the transaction, so a crashed api holds nothing. What is counted are the rows themselves —
queue rows waiting, immediate executions in flight — so a slot is free again as soon as its row
moves on (dispatched, finished, failed by the reaper), never by a counter someone must remember
to decrement. Immediate executions in flight are counted by the statement that creates one
(``executions.create_immediate_execution``), which returns :class:`ImmediateUsage` when refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final

import asyncpg

from opsconductor.lifecycle.storage.queries import query

__all__ = [
    "QUOTA_LOCK_CLASS",
    "ImmediateUsage",
    "WaitingUsage",
    "count_waiting_jobs",
    "live_execution_exists",
    "lock_tenant_quota",
]

#: First key of the two-key advisory locks of quotas (a namespace: single-key advisory locks,
#: such as the reaper's and the migrations', never collide with two-key ones).
QUOTA_LOCK_CLASS: Final = 0x0F5A

_LOCK = query("lock_tenant_quota")
_WAITING_JOBS = query("count_waiting_jobs")
_LIVE_KEY = query("live_execution_exists")


@dataclass(frozen=True)
class ImmediateUsage:
    """A tenant's immediate executions in flight (``pending`` or ``running``)."""

    in_flight: int
    #: When the first of them is expected to end (start + estimate), None when there is none.
    soonest_end: datetime | None


@dataclass(frozen=True)
class WaitingUsage:
    """A tenant's background jobs waiting (ready or delayed), as a refused submit counted."""

    waiting: int


async def lock_tenant_quota(conn: asyncpg.Connection, tenant_id: str) -> None:
    """Take the tenant's quota lock until the end of the caller's transaction."""
    if not conn.is_in_transaction():
        raise RuntimeError("the quota lock is transaction-scoped: open a transaction first")
    await conn.execute(_LOCK, QUOTA_LOCK_CLASS, tenant_id)


async def count_waiting_jobs(conn: asyncpg.Connection, tenant_id: str) -> int:
    """Queue rows of the tenant not leased: ready or delayed (backoff, deferral)."""
    return int(await conn.fetchval(_WAITING_JOBS, tenant_id))


async def live_execution_exists(
    conn: asyncpg.Connection, tenant_id: str, idempotency_key: str
) -> bool:
    """Whether a submit with this key would find an execution (a duplicate is never refused)."""
    return bool(await conn.fetchval(_LIVE_KEY, tenant_id, idempotency_key))
