"""The worker's composition root: built once at start-up from settings."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

from opsconductor.actions.registry import default_registry
from opsconductor.common.approval_policy import ApprovalPolicy
from opsconductor.common.auth import TokenVerifier
from opsconductor.common.errors import StorageError
from opsconductor.common.secrets import SecretResolver, SecretsSettings
from opsconductor.common.tenant_policy import TenantPolicies
from opsconductor.lifecycle.approval_port import PostgresApprovals
from opsconductor.lifecycle.facade import PostgresRedisLifecycle
from opsconductor.lifecycle.queue.redis_queue import RedisQueue, open_queue
from opsconductor.lifecycle.queue.wakeups import Wakeups
from opsconductor.lifecycle.storage.cancellation import CancelSignals
from opsconductor.lifecycle.storage.policies import load_timeout_policies
from opsconductor.lifecycle.storage.role_cache import RoleCache
from opsconductor.policy.quotas import TenantQuotas
from opsconductor.policy.rbac import Authorizer, RbacPolicy
from opsconductor.rpc.resources import DatabasePool
from opsconductor.worker.logic.approval_checks import ApprovalChecks
from opsconductor.worker.logic.consumer import BackgroundConsumer
from opsconductor.worker.logic.immediate import ImmediateExecutions
from opsconductor.worker.logic.runner import ExecutionRunner
from opsconductor.worker.settings import WorkerSettings


class WorkerApp:
    """Everything the worker's servicers use."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.db = DatabasePool(settings.database_url, max_size=settings.db_pool_size)
        self.verifier = TokenVerifier.from_settings(settings)
        self._rbac_policy = RbacPolicy.load(settings.rbac_policy_file)
        self._approval_policy = ApprovalPolicy.load(settings.approval_policy_file)
        self._tenant_policies = TenantPolicies.load(settings.tenant_policy_file)
        self._secrets = SecretResolver.from_settings(SecretsSettings())
        self._cancel_signals = CancelSignals(settings.database_url.get_secret_value())
        self._role_cache = RoleCache(settings.database_url.get_secret_value())
        self._immediate: ImmediateExecutions | None = None
        self._queue: RedisQueue | None = None
        self._consumer: BackgroundConsumer | None = None
        self._wakeups: Wakeups | None = None
        self._authorizer: Authorizer | None = None

    async def start(self) -> None:
        await self.db.open()
        await self.verifier.start()  # the JWKS, when configured
        pool = self.db.pool
        await self._cancel_signals.start()
        policies = await load_timeout_policies(pool)
        if self.settings.redis_url is not None and self.settings.consumer_concurrency > 0:
            # Each tenant's max_running applies where jobs are handed out: this queue's dequeue.
            running_limit, running_limits = TenantQuotas.from_settings(
                self.settings, self._tenant_policies
            ).running_limits()
            self._queue = open_queue(
                self.settings.redis_url.get_secret_value(),
                prefix=self.settings.queue_prefix,
                running_limit=running_limit,
                running_limits=running_limits,
            )
        # The lifecycle core: the only way the runner and the consumer reach the stores.
        lifecycle = PostgresRedisLifecycle(pool, self._queue)
        approvals = PostgresApprovals(pool)
        runner = ExecutionRunner(
            lifecycle=lifecycle,
            pool=pool,
            handlers=default_registry(),
            secrets=self._secrets,
            cancel_signals=self._cancel_signals,
            policies=policies,
            worker_id=self.worker_id,
            approvals=ApprovalChecks(
                approvals,
                ttl=timedelta(seconds=self._approval_policy.approval_ttl_s),
                worker_id=self.worker_id,
            ),
            tenant_policies=self._tenant_policies,
        )
        await self._role_cache.start()
        authorizer = self._authorizer = Authorizer(
            pool, self._rbac_policy, tier="worker", role_cache=self._role_cache
        )
        self._immediate = ImmediateExecutions(
            lifecycle=lifecycle, approvals=approvals, authorizer=authorizer, runner=runner
        )
        if self._queue is not None:
            # Push dispatch: an idle slot wakes when a job is announced, polling is the fallback.
            self._wakeups = self._queue.wakeups()
            self._wakeups.start()
            self._consumer = BackgroundConsumer(
                lifecycle=lifecycle,
                runner=runner,
                authorizer=authorizer,
                policies=policies,
                worker_id=self.worker_id,
                concurrency=self.settings.consumer_concurrency,
                poll_interval_s=self.settings.consumer_poll_interval_s,
                lease_s_override=self.settings.lease_s_override,
                wakeups=self._wakeups,
            )
            self._consumer.start()

    async def stop_consuming(self) -> None:
        """At the stop signal: take no more jobs; running ones checkpoint and requeue."""
        if self._consumer is not None:
            await self._consumer.stop(self.settings.shutdown_grace_s)

    async def stop(self) -> None:
        if self._consumer is not None:
            # Running jobs finish their current step and go back to the queue unspent.
            await self._consumer.stop(self.settings.shutdown_grace_s)
        if self._wakeups is not None:
            await self._wakeups.stop()
        if self._queue is not None:
            await self._queue.aclose()
        if self._immediate is not None:
            await self._immediate.drain(self.settings.shutdown_grace_s)
        await self._cancel_signals.stop()
        await self._role_cache.stop()
        await self.verifier.close()
        if self._authorizer is not None:
            await self._authorizer.flush_audit()  # aggregated denials not written yet
        await self.db.close()

    @property
    def immediate(self) -> ImmediateExecutions:
        if self._immediate is None:
            raise StorageError("the worker is starting; retry shortly")
        return self._immediate
