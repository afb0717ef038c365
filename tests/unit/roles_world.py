"""What the unit tests of the api's and the approvals service's use cases share: the real
authorizer with its role bindings given instead of read from Postgres (its audit rows kept in a
list), and the timeout policy of a medium modify plan."""

from __future__ import annotations

from collections.abc import Mapping

from opsconductor.common.auth import Principal
from opsconductor.lifecycle.storage.policies import TimeoutPolicy
from opsconductor.policy.denial_audit import DenialAuditLimiter, DenialRecord
from opsconductor.policy.rbac import Authorizer, RbacPolicy, Tier

MEDIUM_MODIFY = TimeoutPolicy(
    id="medium_modify",
    sla_class="medium",
    action_class="modify",
    step_timeout_ms=5_000,
    execution_timeout_ms=30_000,
    max_attempts=3,
    max_lease_renewals=4,
    lease_buffer_ms=1_000,
)


class Roles(Authorizer):
    """The real authorizer: ``bindings`` maps (tenant, actor) to roles; every denial it audits
    lands in ``audited``."""

    def __init__(self, bindings: Mapping[tuple[str, str], frozenset[str]], *, tier: Tier) -> None:
        self.audited: list[DenialRecord] = []
        self.bindings = dict(bindings)

        async def write(record: DenialRecord) -> None:
            self.audited.append(record)

        super().__init__(
            None,  # type: ignore[arg-type]
            RbacPolicy.load(),
            tier=tier,
            denial_audit=DenialAuditLimiter(write),
        )

    async def roles_for(self, principal: Principal, tenant_id: str) -> frozenset[str]:
        if principal.tenant_id != tenant_id:
            return frozenset()
        return self.bindings.get((tenant_id, principal.actor_id), frozenset())
