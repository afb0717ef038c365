"""The progress service's composition root: builds every collaborator once, from settings.

Servicers (gRPC) and the HTTP routes are registered before the database is reachable; they reach
the event access through this object once ``start`` ran.
"""

from __future__ import annotations

from opsconductor.common.auth import TokenVerifier
from opsconductor.common.errors import StorageError
from opsconductor.lifecycle.storage.db import connect
from opsconductor.policy.rbac import Authorizer, RbacPolicy
from opsconductor.progress.logic.access import EventAccess
from opsconductor.progress.logic.hub import EventHub, HubLimits
from opsconductor.progress.settings import ProgressSettings
from opsconductor.rpc.resources import DatabasePool


class ProgressApp:
    """Everything the progress service's transports use."""

    def __init__(self, settings: ProgressSettings) -> None:
        self.settings = settings
        self.db = DatabasePool(settings.database_url, max_size=settings.db_pool_size)
        self.verifier = TokenVerifier.from_settings(settings)
        self._rbac_policy = RbacPolicy.load(settings.rbac_policy_file)
        self._authorizer: Authorizer | None = None
        self._hub: EventHub | None = None
        self._access: EventAccess | None = None

    async def start(self) -> None:
        """Open the pool and the process's one listening connection."""
        await self.db.open()
        await self.verifier.start()  # the JWKS, when configured
        pool = self.db.pool
        dsn = self.settings.database_url.get_secret_value()
        self._hub = EventHub(
            pool,
            lambda: connect(dsn),
            HubLimits(
                max_subscribers=self.settings.max_subscribers,
                max_subscribers_per_tenant=self.settings.max_subscribers_per_tenant,
                buffer_size=self.settings.subscriber_buffer,
            ),
        )
        await self._hub.start()
        self._authorizer = Authorizer(pool, self._rbac_policy, tier="progress")
        self._access = EventAccess(pool=pool, authorizer=self._authorizer, hub=self._hub)

    async def stop(self) -> None:
        if self._hub is not None:
            await self._hub.close()
        await self.verifier.close()
        if self._authorizer is not None:
            await self._authorizer.flush_audit()  # aggregated denials not written yet
        await self.db.close()

    @property
    def started(self) -> bool:
        return self._access is not None

    @property
    def access(self) -> EventAccess:
        if self._access is None:
            raise StorageError("the service is starting; retry shortly")
        return self._access

    @property
    def hub(self) -> EventHub:
        if self._hub is None:
            raise StorageError("the service is starting; retry shortly")
        return self._hub
