"""AdminService operations: feature flags (the dark-launch and rollback switches).

Flags are global, so changing them is authorized in the system tenant (``_system``): an
operator needs a token for that tenant and a role granting ``admin:flags`` there. A tenant's own
admin cannot flip Stage E for everyone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opsconductor.common.auth import Principal
from opsconductor.common.rbac import Authorizer, Permission
from opsconductor.common.storage.execution_records import PoolOrConnection
from opsconductor.common.storage.flags import SYSTEM_TENANT, FeatureFlags, FlagCache, update_flags


class AdminOperations:
    def __init__(self, *, pool: PoolOrConnection, authorizer: Authorizer, flags: FlagCache) -> None:
        self._pool = pool
        self._authorizer = authorizer
        self._flags = flags

    async def get_flags(self, principal: Principal) -> FeatureFlags:
        await self._authorizer.authorize(
            principal,
            tenant_id=SYSTEM_TENANT,
            permissions={Permission.ADMIN_FLAGS},
            resource="AdminService/GetFeatureFlags",
        )
        self._flags.invalidate()
        return await self._flags.get()

    async def update_flags(self, principal: Principal, changes: Mapping[str, Any]) -> FeatureFlags:
        """Apply ``changes`` (validated; audited as ``feature_flags_updated``) and return all."""
        await self._authorizer.authorize(
            principal,
            tenant_id=SYSTEM_TENANT,
            permissions={Permission.ADMIN_FLAGS},
            resource="AdminService/UpdateFeatureFlags",
        )
        flags = await update_flags(self._pool, changes, by=principal.actor_id)
        self._flags.invalidate()
        return flags
