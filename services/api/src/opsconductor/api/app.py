"""The api's composition root: builds every collaborator once, at start-up, from settings.

Servicers are registered before the database is reachable (so health can say NOT_SERVING while
the process waits for it); they reach the use cases through this object once ``start`` ran.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TypeVar

from opsconductor.actions.registry import default_registry
from opsconductor.api.logic.admin import AdminOperations
from opsconductor.api.logic.queries import ExecutionQueries
from opsconductor.api.logic.submission import Submissions
from opsconductor.api.settings import ApiSettings
from opsconductor.client.tls import ClientTls
from opsconductor.client.worker import WorkerClient
from opsconductor.common.approval_policy import ApprovalPolicy
from opsconductor.common.auth import TokenVerifier
from opsconductor.common.errors import StorageError
from opsconductor.common.secrets import SecretsSettings
from opsconductor.common.tenant_policy import TenantPolicies
from opsconductor.lifecycle.approval_port import PostgresApprovals
from opsconductor.lifecycle.facade import PostgresRedisLifecycle
from opsconductor.lifecycle.queue.gauges import GaugePublisher
from opsconductor.lifecycle.queue.redis_queue import RedisQueue, open_queue
from opsconductor.lifecycle.storage.execution_stats import ObservedDurations
from opsconductor.lifecycle.storage.flags import FlagCache
from opsconductor.lifecycle.storage.policies import load_timeout_policies
from opsconductor.lifecycle.storage.role_cache import FRONT_DOOR_MAX_AGE_S, RoleCache
from opsconductor.policy.quotas import TenantQuotas
from opsconductor.policy.rbac import Authorizer, RbacPolicy
from opsconductor.rpc.resources import DatabasePool


class ApiApp:
    """Everything the api's servicers use."""

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings
        self.db = DatabasePool(settings.database_url, max_size=settings.db_pool_size)
        self.verifier = TokenVerifier.from_settings(settings)
        self._rbac_policy = RbacPolicy.load(settings.rbac_policy_file)
        self._approval_policy = ApprovalPolicy.load(settings.approval_policy_file)
        self._tenant_policies = TenantPolicies.load(settings.tenant_policy_file)
        # Where each tenant's secrets may go; checked at submit (the api resolves none).
        self._secret_catalogue = SecretsSettings().catalogue()
        # Longer-lived than the worker's: the worker checks every run again within a second.
        self._role_cache = RoleCache(
            settings.database_url.get_secret_value(), max_age_s=FRONT_DOOR_MAX_AGE_S
        )
        self._worker: WorkerClient | None = None
        self._queue: RedisQueue | None = None
        self._flags: FlagCache | None = None
        self._submissions: Submissions | None = None
        self._queries: ExecutionQueries | None = None
        self._admin: AdminOperations | None = None
        self._authorizer: Authorizer | None = None
        self._gauges: GaugePublisher | None = None

    async def start(self) -> None:
        """Open the pool, load the timeout policies, listen for flag changes."""
        await self.db.open()
        await self.verifier.start()  # the JWKS, when configured
        pool = self.db.pool
        # gRPC channels bind to the running loop: build them here, not in __init__.
        self._worker = WorkerClient(
            self.settings.worker_target,
            tls=ClientTls.from_settings(self.settings),
            tls_reload_check_s=self.settings.tls_reload_check_s,
        )
        queue = None
        if self.settings.redis_url is not None:
            queue = self._queue = open_queue(
                self.settings.redis_url.get_secret_value(), prefix=self.settings.queue_prefix
            )
        self._flags = FlagCache(pool, ttl=self.settings.flag_cache_ttl_s)
        await self._flags.start()
        await self._role_cache.start()
        authorizer = self._authorizer = Authorizer(
            pool, self._rbac_policy, tier="api", role_cache=self._role_cache
        )
        policies = await load_timeout_policies(pool)
        dedup_window = timedelta(seconds=self.settings.dedup_window_s)
        lifecycle = PostgresRedisLifecycle(pool, queue)
        self._submissions = Submissions(
            pool=pool,
            authorizer=authorizer,
            actions=default_registry(),
            flags=self._flags,
            policies=policies,
            approval_policy=self._approval_policy,
            observed=ObservedDurations(pool),
            worker=self._worker,
            lifecycle=lifecycle,
            dedup_window=dedup_window,
            tenant_policies=self._tenant_policies,
            secret_catalogue=self._secret_catalogue,
            quotas=TenantQuotas.from_settings(self.settings, self._tenant_policies),
            approvals=PostgresApprovals(pool),
        )
        self._queries = ExecutionQueries(lifecycle=lifecycle, authorizer=authorizer)
        self._admin = AdminOperations(
            pool=pool,
            authorizer=authorizer,
            flags=self._flags,
            lifecycle=lifecycle,
            policies=policies,
            dedup_window=dedup_window,
        )
        self._gauges = GaugePublisher(pool, queue, interval_s=self.settings.gauge_refresh_s)
        self._gauges.start()

    async def stop(self) -> None:
        if self._gauges is not None:
            await self._gauges.stop()
        if self._flags is not None:
            await self._flags.close()
        if self._worker is not None:
            await self._worker.close()
        if self._queue is not None:
            await self._queue.aclose()
        await self._role_cache.stop()
        await self.verifier.close()
        if self._authorizer is not None:
            await self._authorizer.flush_audit()  # aggregated denials not written yet
        await self.db.close()

    @property
    def submissions(self) -> Submissions:
        return _ready(self._submissions)

    @property
    def queries(self) -> ExecutionQueries:
        return _ready(self._queries)

    @property
    def admin(self) -> AdminOperations:
        return _ready(self._admin)


T = TypeVar("T")


def _ready(value: T | None) -> T:
    if value is None:
        raise StorageError("the service is starting; retry shortly")
    return value
