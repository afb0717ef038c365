"""AdminService operations: feature flags, the dead-letter queue, queue health and drain.

Flags, queue stats and drain are global, so they are authorized in the system tenant
(``_system``): an operator needs a token for that tenant and a role granting ``admin:flags`` or
``admin:queue`` there. A tenant's own admin cannot flip Stage E or stop dispatch for everyone.

The dead-letter queue is also open to tenant admins, for their own tenant only: a principal of a
tenant holding ``admin:dlq`` there may list that tenant's entries (naming it in the request) and
requeue them (another tenant's entry is "not found"). A system admin (``admin:dlq`` in
``_system``) sees and requeues every tenant's entries.

Drain sets the ``dispatch_paused`` flag (the durable, audited record) and the queue's Redis
paused flag (what workers obey: ``dequeue`` hands out nothing) in one transaction, the Redis
call last before the commit, so the two never disagree because of a failed call.

The dead-letter queue, the queue's gauges and its drain flag are the lifecycle core's: they go
through the lifecycle port (:mod:`opsconductor.lifecycle.facade`), never the queue's tables or
Redis keys. Feature flags, their history and the audit-chain check are not lifecycle state and
read and write their own stores (``lifecycle.storage.flags``, ``flag_history``, ``audit_chain``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

import structlog

from opsconductor.common.auth import Principal
from opsconductor.common.errors import (
    FeatureDisabledError,
    InvalidArgumentError,
    QueueUnavailableError,
)
from opsconductor.lifecycle.facade import (
    DlqEntry,
    ExecutionLifecycle,
    PoolOrConnection,
    QueueStats,
    TimeoutPolicy,
    as_execution_id,
)
from opsconductor.lifecycle.storage.audit_chain import ChainVerdict, verify_chain
from opsconductor.lifecycle.storage.execution_records import transaction
from opsconductor.lifecycle.storage.flag_history import FlagChange, list_flag_changes
from opsconductor.lifecycle.storage.flags import (
    SYSTEM_TENANT,
    FeatureFlags,
    FlagCache,
    update_flags,
)
from opsconductor.policy.rbac import Authorizer, Permission

from .dlq_requeue import RequeueResult, requeue_dead_letter

log = structlog.get_logger(__name__)

_MAX_ERROR_CLASS = 100  # execution_dlq.error_class is VARCHAR(100)
_MAX_TENANT = 100


@dataclass(frozen=True)
class QueueOverview:
    """GetQueueStats' answer: the Redis gauges plus the DLQ size (open entries, Postgres)."""

    stats: QueueStats
    dlq_size: int


def parse_dlq_id(value: str) -> UUID:
    """A DLQ entry id from a request; :class:`InvalidArgumentError` when it is not a UUID."""
    try:
        return UUID(value)
    except ValueError:
        raise InvalidArgumentError("dlq_id must be a UUID", field="dlq_id") from None


class AdminOperations:
    """The AdminService use cases, each authorized first (and audited if refused)."""

    def __init__(
        self,
        *,
        pool: PoolOrConnection,
        authorizer: Authorizer,
        flags: FlagCache,
        lifecycle: ExecutionLifecycle,
        policies: Mapping[str, TimeoutPolicy] | None = None,
        dedup_window: timedelta = timedelta(hours=24),
    ) -> None:
        self._pool = pool
        self._authorizer = authorizer
        self._flags = flags
        self._lifecycle = lifecycle
        self._policies = dict(policies or {})
        self._dedup_window = dedup_window

    # -- feature flags ----------------------------------------------------------------------

    async def get_flags(self, principal: Principal) -> FeatureFlags:
        await self._authorize_system(principal, Permission.ADMIN_FLAGS, "GetFeatureFlags")
        self._flags.invalidate()
        return await self._flags.get()

    async def update_flags(self, principal: Principal, changes: Mapping[str, Any]) -> FeatureFlags:
        """Apply ``changes`` (validated; audited as ``feature_flags_updated``) and return all.

        A change of ``dispatch_paused`` also drains or resumes the queue, as SetDrain does.
        """
        await self._authorize_system(principal, Permission.ADMIN_FLAGS, "UpdateFeatureFlags")
        async with transaction(self._pool) as conn:
            flags = await update_flags(conn, changes, by=principal.actor_id)
            if "dispatch_paused" in changes and self._lifecycle.queue_configured:
                await self._lifecycle.set_dispatch_paused(flags.dispatch_paused)
        self._flags.invalidate()
        return flags

    async def flag_history(
        self, principal: Principal, *, flag: str, page_size: int, page_token: str
    ) -> tuple[list[FlagChange], str | None]:
        """Every write of a flag (of ``flag`` only, if not empty), newest first."""
        await self._authorize_system(principal, Permission.ADMIN_FLAGS, "ListFlagChanges")
        return await list_flag_changes(
            self._pool, flag=flag or None, page_size=page_size, page_token=page_token or None
        )

    # -- queue ------------------------------------------------------------------------------

    async def queue_stats(self, principal: Principal) -> QueueOverview:
        """Redis gauges (ready per priority, leased, delayed, oldest wait, paused) + DLQ size.

        :class:`QueueUnavailableError` when Redis cannot be reached (or none is configured).
        """
        await self._authorize_system(principal, Permission.ADMIN_QUEUE, "GetQueueStats")
        stats = await self._lifecycle.queue_stats()
        size = await self._lifecycle.open_dead_letters()
        flags = await self._flags.get()
        if flags.dispatch_paused != stats.paused:
            # E.g. Redis restarted empty while drained: workers obey Redis, so say it loudly.
            log.warning(
                "dispatch_pause_mismatch",
                flag_dispatch_paused=flags.dispatch_paused,
                redis_paused=stats.paused,
            )
        return QueueOverview(stats=stats, dlq_size=size)

    async def set_drain(self, principal: Principal, drain: bool) -> bool:
        """Stop (``drain``) or resume dispatching; returns whether dispatch is now paused.

        Leases already granted are unaffected: running jobs finish. Audited through the
        ``feature_flags_updated`` event of the ``dispatch_paused`` flag.
        """
        await self._authorize_system(principal, Permission.ADMIN_QUEUE, "SetDrain")
        self._require_queue()
        async with transaction(self._pool) as conn:
            await update_flags(conn, {"dispatch_paused": drain}, by=principal.actor_id)
            await self._lifecycle.set_dispatch_paused(drain)
        self._flags.invalidate()
        log.info("dispatch_drained" if drain else "dispatch_resumed", by=principal.actor_id)
        return drain

    # -- dead-letter queue ------------------------------------------------------------------

    async def list_dlq(
        self,
        principal: Principal,
        *,
        tenant_id: str,
        error_class: str,
        page_size: int,
        page_token: str,
    ) -> tuple[list[DlqEntry], str | None]:
        """One page of open DLQ entries, newest first; ``tenant_id``/``error_class`` filter.

        A tenant admin must name their own tenant; a system admin may name any or none.
        """
        if len(tenant_id) > _MAX_TENANT:
            raise InvalidArgumentError("tenant_id is too long", field="tenant_id")
        if len(error_class) > _MAX_ERROR_CLASS:
            raise InvalidArgumentError("error_class is too long", field="error_class")
        await self._authorize_dlq(principal, tenant_id or None, "ListDlqEntries")
        return await self._lifecycle.dead_letters(
            tenant_id=tenant_id or None,
            error_class=error_class or None,
            page_size=page_size,
            page_token=page_token or None,
        )

    async def requeue_dlq(
        self, principal: Principal, dlq_id: UUID, *, request_id: str | None = None
    ) -> RequeueResult:
        """Re-run a dead-lettered execution as a new one with a fresh budget (audited).

        See :mod:`.dlq_requeue`. A tenant admin can only reach their own tenant's entries; the
        tenant must still be enabled for Stage E (a rollback stops requeues as it stops submits).
        """
        scope = await self._authorize_dlq(principal, None, "RequeueDlqEntry", own_tenant=True)
        flags = await self._flags.get()
        entry = await self._lifecycle.dead_letter_entry(dlq_id, tenant_id=scope)
        if not flags.tenant_enabled(entry.tenant_id):
            raise FeatureDisabledError(
                f"Stage E execution is not enabled for tenant {entry.tenant_id!r}",
                tenant_id=entry.tenant_id,
            )
        return await requeue_dead_letter(
            self._lifecycle,
            self._policies,
            dlq_id=dlq_id,
            by=principal.actor_id,
            tenant_scope=scope,
            request_id=request_id,
            record_only=flags.record_only(entry.tenant_id),
            dedup_window=self._dedup_window,
        )

    # -- audit --------------------------------------------------------------------------------

    async def verify_audit_chain(
        self, principal: Principal, tenant_id: str, execution_id: str
    ) -> ChainVerdict:
        """Verify one execution's event chain (``audit:read`` in its tenant).

        Another tenant's execution is "not found", as for every tenant-scoped read.
        """
        eid = as_execution_id(execution_id)
        await self._authorizer.authorize(
            principal,
            tenant_id=tenant_id,
            permissions={Permission.AUDIT_READ},
            resource="AdminService/VerifyAuditChain",
        )
        verdict = await verify_chain(self._pool, tenant_id, eid)
        if not verdict.intact:
            log.warning(
                "audit_chain_broken",
                tenant_id=tenant_id,
                exec_id=str(eid),
                broken_seq=verdict.broken_seq,
                problem=str(verdict.problem),
                by=principal.actor_id,
            )
        return verdict

    # -- authorization ----------------------------------------------------------------------

    async def _authorize_system(
        self, principal: Principal, permission: Permission, rpc: str
    ) -> None:
        await self._authorizer.authorize(
            principal,
            tenant_id=SYSTEM_TENANT,
            permissions={permission},
            resource=f"AdminService/{rpc}",
        )

    async def _authorize_dlq(
        self, principal: Principal, tenant_id: str | None, rpc: str, *, own_tenant: bool = False
    ) -> str | None:
        """Authorize ``admin:dlq``; return the one tenant the caller may see (None: all).

        A system principal is checked in ``_system`` and may see every tenant (or the one it
        filters on). Any other principal is checked in ``tenant_id`` — its own tenant when
        ``own_tenant`` — and a request naming no tenant is checked in ``_system``, where a
        tenant's token is refused (and audited) as a tenant mismatch.
        """
        if principal.tenant_id == SYSTEM_TENANT:
            await self._authorize_system(principal, Permission.ADMIN_DLQ, rpc)
            return tenant_id
        target = principal.tenant_id if own_tenant else tenant_id or SYSTEM_TENANT
        await self._authorizer.authorize(
            principal,
            tenant_id=target,
            permissions={Permission.ADMIN_DLQ},
            resource=f"AdminService/{rpc}",
        )
        return target

    def _require_queue(self) -> None:
        if not self._lifecycle.queue_configured:
            raise QueueUnavailableError("no queue is configured for background execution")
