"""Per-tenant quotas: the limits in force and their race-proof admission (docs/security.md,
"Fair share and quotas").

Three limits per tenant, each a service default (settings ``quota_max_*``) that the tenant
policy's ``quotas`` section may override (:class:`TenantQuotas`), 0 meaning none:

* ``max_queued`` — background jobs waiting. Checked at submit, counted in the statement that
  creates and queues the execution (``executions.create_queued_execution``); beyond it the
  submit is refused (:meth:`TenantQuotas.queued_refusal`).
* ``max_immediate`` — immediate executions in flight (``pending``/``running``). Checked at
  submit (:meth:`TenantQuotas.create_immediate`, counted in the statement that creates the
  execution); beyond it the submit is refused.
* ``max_running`` — background jobs leased at once. Not a refusal: the queue's dequeue passes a
  tenant at its limit over (:meth:`TenantQuotas.running_limits` configures the workers' queue).

A refusal is :class:`~opsconductor.common.errors.QuotaExceededError` (``RESOURCE_EXHAUSTED``
with a ``RetryInfo``), raised inside the submit's transaction before anything is written, so it
leaves no row behind. A duplicate of an execution that exists is never refused: it creates
nothing. Admission holds the tenant's quota lock (:mod:`.storage.quota_usage`) until the
submit commits, so 50 racing submits against a limit of 10 admit exactly 10.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from opsconductor.common.errors import QuotaExceededError
from opsconductor.common.settings import ServiceSettings
from opsconductor.common.tenant_policy import QuotaPolicy, TenantPolicies
from opsconductor.lifecycle.storage.execution_records import ExecutionRecord, PoolOrConnection
from opsconductor.lifecycle.storage.executions import NewExecution, create_immediate_execution
from opsconductor.lifecycle.storage.quota_usage import ImmediateUsage

__all__ = ["MAX_RETRY_AFTER_S", "MIN_RETRY_AFTER_S", "QuotaLimits", "TenantQuotas", "retry_after"]

#: Bounds of the retry hint of an immediate refusal (estimated from the runs in flight).
MIN_RETRY_AFTER_S = 1.0
MAX_RETRY_AFTER_S = 60.0


@dataclass(frozen=True)
class QuotaLimits:
    """One tenant's effective limits (0: none)."""

    max_queued: int
    max_running: int
    max_immediate: int

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> QuotaLimits:
        """The service defaults."""
        return cls(
            max_queued=settings.quota_max_queued,
            max_running=settings.quota_max_running,
            max_immediate=settings.quota_max_immediate,
        )

    def overridden_by(self, policy: QuotaPolicy) -> QuotaLimits:
        """These limits with every value ``policy`` sets replacing the default."""
        return QuotaLimits(
            max_queued=self.max_queued if policy.max_queued is None else policy.max_queued,
            max_running=self.max_running if policy.max_running is None else policy.max_running,
            max_immediate=self.max_immediate
            if policy.max_immediate is None
            else policy.max_immediate,
        )


def retry_after(soonest_end: datetime | None, now: datetime, *, default_s: float) -> float:
    """Seconds to wait before retrying: until the first run in flight should end, within
    [MIN_RETRY_AFTER_S, MAX_RETRY_AFTER_S], or ``default_s`` when nothing tells."""
    if soonest_end is None:
        return default_s
    wait = (soonest_end - now).total_seconds()
    return round(min(max(wait, MIN_RETRY_AFTER_S), MAX_RETRY_AFTER_S), 1)


class TenantQuotas:
    """Every tenant's limits (service defaults, then the tenant policy) and their admission."""

    def __init__(
        self, defaults: QuotaLimits, policies: TenantPolicies, *, retry_after_s: float = 5.0
    ) -> None:
        self._base = defaults.overridden_by(policies.defaults.quotas)
        self._tenants = {
            tenant: defaults.overridden_by(policy.quotas)
            for tenant, policy in policies.tenants.items()
        }
        self._retry_after_s = retry_after_s

    @classmethod
    def from_settings(cls, settings: ServiceSettings, policies: TenantPolicies) -> TenantQuotas:
        return cls(
            QuotaLimits.from_settings(settings),
            policies,
            retry_after_s=settings.quota_retry_after_s,
        )

    def for_tenant(self, tenant_id: str) -> QuotaLimits:
        """The effective limits of ``tenant_id``."""
        return self._tenants.get(tenant_id, self._base)

    def running_limits(self) -> tuple[int, dict[str, int]]:
        """``(default, {tenant: limit})`` of ``max_running``, as ``RedisQueue`` takes them."""
        default = self._base.max_running
        return default, {
            tenant: limits.max_running
            for tenant, limits in self._tenants.items()
            if limits.max_running != default
        }

    def queued_refusal(self, tenant_id: str, limit: int, waiting: int) -> QuotaExceededError:
        """The refusal of a background submit of ``tenant_id`` with ``waiting`` jobs waiting,
        at ``limit``."""
        return QuotaExceededError(
            f"tenant {tenant_id!r} has {waiting} background jobs waiting, its limit "
            f"(quota max_queued); retry in {self._retry_after_s:g} s, once some have started",
            retry_after_s=self._retry_after_s,
            quota="queued",
            limit=limit,
            in_use=waiting,
            tenant_id=tenant_id,
        )

    async def create_immediate(
        self, db: PoolOrConnection, new: NewExecution, *, dedup_window: timedelta
    ) -> tuple[ExecutionRecord, bool]:
        """Admit and create an immediate execution of ``new.tenant_id`` in one statement: the
        tenant's quota lock, the count, the creation (or the duplicate, never refused), nothing
        written when refused (``db``: a pool, or a connection whose transaction it joins).

        Raises :class:`QuotaExceededError` when the tenant is at ``max_immediate``.
        """
        limit = self.for_tenant(new.tenant_id).max_immediate
        created = await create_immediate_execution(
            db, new, dedup_window=dedup_window, max_in_flight=limit
        )
        if isinstance(created, ImmediateUsage):
            raise self.immediate_refusal(new.tenant_id, limit, created)
        return created

    def immediate_refusal(
        self, tenant_id: str, limit: int, usage: ImmediateUsage
    ) -> QuotaExceededError:
        """The refusal of an immediate submit of ``tenant_id`` at ``limit`` (``usage``: what
        the creating statement counted)."""
        wait = retry_after(usage.soonest_end, datetime.now(UTC), default_s=self._retry_after_s)
        return QuotaExceededError(
            f"tenant {tenant_id!r} has {usage.in_flight} immediate executions in flight, its "
            f"limit (quota max_immediate); retry in {wait:g} s, when one has finished",
            retry_after_s=wait,
            quota="immediate",
            limit=limit,
            in_use=usage.in_flight,
            tenant_id=tenant_id,
        )
