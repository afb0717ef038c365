"""What a tenant's quotas count, read under the tenant's quota lock (docs/security.md, "Fair
share and quotas").

Admission is race-proof because every admitting statement first takes the tenant's quota lock,
a transaction-scoped two-key advisory lock (``pg_advisory_xact_lock(QUOTA_LOCK_CLASS,
hashtext(tenant_id))``: the immediate create's statement, and migration 0014's
``queued_admission()`` for a background submit): concurrent submits of one tenant count and
create one after the other, and each sees what the previous one committed (the count runs on a
snapshot taken once the lock is granted). The lock ends with the transaction, so a crashed api
holds nothing. What is counted are the rows themselves —
queue rows waiting, immediate executions in flight — so a slot is free again as soon as its row
moves on (dispatched, finished, failed by the reaper), never by a counter someone must remember
to decrement. Immediate executions in flight are counted by the statement that creates one
(``executions.create_immediate_execution``), which returns :class:`ImmediateUsage` when refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final

__all__ = ["QUOTA_LOCK_CLASS", "ImmediateUsage", "WaitingUsage"]

#: First key of the two-key advisory locks of quotas (a namespace: single-key advisory locks,
#: such as the reaper's and the migrations', never collide with two-key ones).
QUOTA_LOCK_CLASS: Final = 0x0F5A


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
