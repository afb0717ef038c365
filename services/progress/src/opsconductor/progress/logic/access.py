"""Who may read which events: the one gate every transport (gRPC, WebSocket, SSE, long-poll,
grpc-web) goes through before a subscription or a listing.

Like every read of the api: the caller needs ``events:read`` in the tenant it names, and the
execution must be that tenant's. A request naming the caller's own tenant for another tenant's
execution is a probe: it is authorized against the tenant that owns the execution, so it is
refused and audited there (``rbac_violation``, TENANT_MISMATCH) and the caller learns nothing
that tenant's name. Tenant-wide listings (audit queries) need ``audit:read``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from uuid import UUID

import asyncpg

from opsconductor.common.auth import Principal
from opsconductor.common.errors import NotFoundError
from opsconductor.lifecycle.storage.event_reads import EventRecord, event_head, list_events
from opsconductor.lifecycle.storage.execution_reads import as_execution_id, find_execution_tenant
from opsconductor.lifecycle.storage.paging import invalid_page_request
from opsconductor.policy.rbac import Authorizer, Permission
from opsconductor.progress.logic.hub import EventHub
from opsconductor.progress.logic.metrics import transport_of
from opsconductor.progress.logic.subscription import Subscription

#: The largest ``after_seq`` accepted (a BIGINT column).
_MAX_SEQ = 2**63 - 1


@dataclass(frozen=True)
class EventQuery:
    """A ListEvents request in domain terms."""

    execution_id: str = ""
    types: Collection[str] = ()
    actor_id: str = ""
    after_seq: int = 0
    page_size: int = 0
    page_token: str = ""


class EventAccess:
    """Authorized subscriptions and listings of execution events."""

    def __init__(self, *, pool: asyncpg.Pool, authorizer: Authorizer, hub: EventHub) -> None:
        self._pool = pool
        self._authorizer = authorizer
        self._hub = hub

    async def subscribe(
        self,
        principal: Principal,
        tenant_id: str,
        execution_id: str,
        *,
        after_seq: int,
        resource: str,
    ) -> Subscription:
        """A live subscription to one execution's events after ``after_seq``.

        ``resource`` names the transport in the audit record (e.g. ``"ProgressService/
        StreamEvents"``, ``"http/sse"``). Raises ``PermissionDeniedError`` (audited),
        ``NotFoundError``, ``InvalidArgumentError`` or ``ResourceExhaustedError``. The caller
        must :meth:`Subscription.release` it.
        """
        _check_seq(after_seq)
        eid = await self._authorize_execution(principal, tenant_id, execution_id, resource)
        slot = await self._hub.acquire(tenant_id, eid)
        try:
            head = await event_head(self._pool, eid)
            if head is None or head.tenant_id != tenant_id:
                raise NotFoundError("execution not found", execution_id=str(eid))
        except BaseException:
            self._hub.release(slot)
            raise
        return Subscription(
            self._hub,
            slot,
            eid,
            after_seq=after_seq,
            completed_seq=head.completed_seq,
            transport=transport_of(resource),
        )

    async def list(
        self, principal: Principal, tenant_id: str, query: EventQuery, *, resource: str
    ) -> tuple[list[EventRecord], str | None]:
        """One page of events: one execution's (``events:read``) or the tenant's audit trail
        (``audit:read``) when no execution is named."""
        _check_seq(query.after_seq)
        eid: UUID | None = None
        if query.execution_id:
            eid = await self._authorize_execution(
                principal, tenant_id, query.execution_id, resource
            )
        else:
            await self._authorizer.authorize(
                principal,
                tenant_id=tenant_id,
                permissions={Permission.AUDIT_READ},
                resource=resource,
            )
        return await list_events(
            self._pool,
            tenant_id,
            execution_id=eid,
            types=list(query.types),
            actor_id=query.actor_id or None,
            after_seq=query.after_seq,
            page_size=query.page_size,
            page_token=query.page_token or None,
        )

    async def _authorize_execution(
        self, principal: Principal, tenant_id: str, execution_id: str, resource: str
    ) -> UUID:
        eid = as_execution_id(execution_id)
        owner = await self._owner(eid)
        await self._authorizer.authorize(
            principal,
            tenant_id=owner or tenant_id,
            permissions={Permission.EVENTS_READ},
            execution_id=eid if owner else None,
            resource=resource,
        )
        if owner != tenant_id:
            raise NotFoundError("execution not found", execution_id=str(eid))
        return eid

    async def _owner(self, execution_id: UUID) -> str | None:
        return await find_execution_tenant(self._pool, execution_id)


def _check_seq(after_seq: int) -> None:
    if not 0 <= after_seq <= _MAX_SEQ:
        raise invalid_page_request("after_seq", "must be 0 (from the start) or a seq received")
