"""The approvals service's composition root: builds every collaborator once, from settings.

Servicers are registered before the database is reachable (so health can say NOT_SERVING while
the process waits for it); they reach the use cases through this object once ``start`` ran.
"""

from __future__ import annotations

from opsconductor.approvals.logic.decisions import ApprovalDecisions
from opsconductor.approvals.logic.dispatch import ExecutionDispatcher
from opsconductor.approvals.settings import ApprovalsSettings
from opsconductor.client.tls import ClientTls
from opsconductor.client.worker import WorkerClient
from opsconductor.common.auth import TokenVerifier
from opsconductor.common.errors import StorageError
from opsconductor.lifecycle.approval_port import PostgresApprovals
from opsconductor.lifecycle.facade import PostgresRedisLifecycle
from opsconductor.lifecycle.queue.redis_queue import RedisQueue, open_queue
from opsconductor.lifecycle.storage.policies import load_timeout_policies
from opsconductor.policy.rbac import Authorizer, RbacPolicy
from opsconductor.rpc.resources import DatabasePool


class ApprovalsApp:
    """Everything the approvals service's servicers use."""

    def __init__(self, settings: ApprovalsSettings) -> None:
        self.settings = settings
        self.db = DatabasePool(settings.database_url, max_size=settings.db_pool_size)
        self.verifier = TokenVerifier.from_settings(settings)
        self._rbac_policy = RbacPolicy.load(settings.rbac_policy_file)
        self._worker: WorkerClient | None = None
        self._queue: RedisQueue | None = None
        self._dispatcher: ExecutionDispatcher | None = None
        self._decisions: ApprovalDecisions | None = None
        self._authorizer: Authorizer | None = None

    async def start(self) -> None:
        """Open the pool, load the timeout policies, connect to the worker and the queue."""
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
        self._dispatcher = ExecutionDispatcher(
            lifecycle=PostgresRedisLifecycle(pool, queue),
            worker=self._worker,
            policies=await load_timeout_policies(pool),
            margin_s=self.settings.dispatch_margin_s,
        )
        self._authorizer = Authorizer(pool, self._rbac_policy, tier="approvals")
        self._decisions = ApprovalDecisions(
            approvals=PostgresApprovals(pool),
            authorizer=self._authorizer,
            dispatcher=self._dispatcher,
        )

    async def stop(self) -> None:
        if self._dispatcher is not None:
            # Approved immediate executions started here: let them report their outcome.
            await self._dispatcher.drain(self.settings.shutdown_grace_s)
        if self._worker is not None:
            await self._worker.close()
        if self._queue is not None:
            await self._queue.aclose()
        await self.verifier.close()
        if self._authorizer is not None:
            await self._authorizer.flush_audit()  # aggregated denials not written yet
        await self.db.close()

    @property
    def decisions(self) -> ApprovalDecisions:
        if self._decisions is None:
            raise StorageError("the service is starting; retry shortly")
        return self._decisions
