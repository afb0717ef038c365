"""Approvals as service logic sees them: a port beside :mod:`.facade`'s, its Postgres adapter,
and (:mod:`.approval_fake`) an in-memory stand-in for unit tests.

The approvals service's ``ApprovalDecisions`` and the api's ``ApprovalIntake`` hold an
:class:`ApprovalLifecycle` instead of a pool: request an approval (of the whole plan, in the
submit's transaction, or of one step of a level-3 execution), read one or a tenant's pending
page, find who owns an approval or an execution (for the audit of a refusal only), read the
execution a decision covers, decide (the first decision wins), and invalidate an approval whose
binding broke. The worker's ``ApprovalChecks`` and ``ImmediateExecutions`` hold one too: check
an execution's binding before its first step, whether a level-3 step was approved, whether the
caller granted the approval (an approver dispatching it), and keep a paused execution's locks.
A grant's release is the :class:`~opsconductor.lifecycle.facade.ExecutionLifecycle`'s
``enqueue``, called inside the decision's :meth:`ApprovalLifecycle.transaction` (the adapter's
is a Postgres transaction on the same pool, the fake's is
:class:`~opsconductor.lifecycle.fake.InMemoryLifecycle`'s, which keeps the requests with the
executions).

Each call delegates to the storage function that does it (:mod:`.storage.approvals`,
:mod:`.storage.approval_records`, :mod:`.storage.execution_reads`), statement for statement.
Every behaviour of the fake is also checked against this adapter on real Postgres
(``tests/integration/test_lifecycle_facade.py``, one test body for both).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any, Protocol
from uuid import UUID

from opsconductor.lifecycle.storage import approval_records, approvals, locks
from opsconductor.lifecycle.storage.approval_records import (
    DEFAULT_PAGE_SIZE,
    ApprovalRecord,
    ApprovalState,
)
from opsconductor.lifecycle.storage.approvals import ApprovalDecision, binding_mismatches
from opsconductor.lifecycle.storage.execution_reads import (
    as_execution_id,
    find_execution_tenant,
    get_execution,
)
from opsconductor.lifecycle.storage.execution_records import (
    ExecutionRecord,
    PoolOrConnection,
    transaction,
)
from opsconductor.lifecycle.storage.locks import LockSet

__all__ = [
    "ApprovalDecision",
    "ApprovalLifecycle",
    "ApprovalRecord",
    "ApprovalState",
    "PostgresApprovals",
    "as_execution_id",
    "binding_mismatches",
]


class ApprovalLifecycle(Protocol):
    """The approval operations service logic calls."""

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """A transaction to pass as ``tx`` (also to the execution lifecycle's ``enqueue``)."""
        ...

    async def request(
        self, execution_id: UUID, *, ttl: timedelta, by: str, tx: Any = None
    ) -> ApprovalRecord:
        """Open the whole-plan request of a ``pending`` execution (which then awaits it),
        bound to the execution's hashes, level and requester, expiring ``ttl`` from now;
        ``ConflictError`` when one is already open, ``FSMError`` from another status.
        ``tx``: the caller's transaction to join (the submit's), else its own."""
        ...

    async def request_step(
        self, execution_id: UUID, step_id: str, *, lease_token: UUID, ttl: timedelta, by: str
    ) -> ApprovalRecord | None:
        """Pause a running level-3 execution before ``step_id`` (fenced by ``lease_token``,
        which is cleared: ``StaleLeaseError`` when it no longer owns it); re-pausing reuses
        the open request. None when a cancellation was requested meanwhile (it ended)."""
        ...

    async def get(self, tenant_id: str, approval_id: UUID | str) -> ApprovalRecord:
        """One approval with its plan; ``NotFoundError`` if absent, malformed or foreign."""
        ...

    async def list_pending(
        self, tenant_id: str, *, page_size: int = DEFAULT_PAGE_SIZE, page_token: str | None = None
    ) -> tuple[list[ApprovalRecord], str | None]:
        """One page of the tenant's undecided, unexpired requests, oldest first, and the next
        page's token (None on the last); a page size of 0 means the default, capped at 200;
        ``InvalidPageRequestError`` for a negative size or a malformed or foreign token."""
        ...

    async def step_approval(
        self, tenant_id: str, execution_id: UUID, step_id: str
    ) -> ApprovalRecord | None:
        """The open request of one step, else its latest one, else None (also when foreign)."""
        ...

    async def approval_owner(self, approval_id: UUID | str) -> tuple[str, UUID] | None:
        """``(tenant_id, execution_id)`` of an approval, None if none: for audit only."""
        ...

    async def execution_owner(self, execution_id: UUID | str) -> str | None:
        """The tenant owning an execution, None if none: for audit only."""
        ...

    async def execution(self, tenant_id: str, execution_id: UUID) -> ExecutionRecord:
        """The execution an approval covers, without its steps; ``NotFoundError`` if foreign."""
        ...

    async def decide(
        self,
        approval_id: UUID | str,
        *,
        tenant_id: str,
        decision: ApprovalDecision,
        tx: Any = None,
    ) -> ApprovalRecord:
        """The first and only decision on a pending, unexpired approval (a compare-and-set).

        ``NotFoundError`` (absent or another tenant's), ``SelfApprovalError`` (the requester),
        ``ApprovalDecidedError`` (decided first by someone), ``ApprovalExpiredError``,
        ``ApprovalInvalidatedError``, ``FailedPreconditionError`` (the execution no longer
        waits); nothing changes then. A rejection ends the execution ``rejected``; a grant
        leaves its release to the caller, inside ``tx`` when it passes one.
        """
        ...

    async def invalidate(
        self, approval_id: UUID, *, by: str, reason: str, mismatched: list[str]
    ) -> ApprovalRecord | None:
        """Mark a pending or approved approval ``invalidated``; an execution still waiting for
        it ends ``failed`` (``APPROVAL_INVALIDATED``, key retired). None when already closed,
        ``NotFoundError`` for an unknown one."""
        ...

    # -- the worker's checks ----------------------------------------------------------------

    async def enforce_binding(self, record: ExecutionRecord, *, by: str) -> ApprovalRecord | None:
        """The approval bound to ``record`` if it is granted and covers exactly its plan
        (hashes and level); None at level 0. A mismatch invalidates it (an execution still
        waiting for it ends ``failed``) and raises ``ApprovalInvalidatedError``, as does no
        approval bound at all; one not granted raises ``FailedPreconditionError``."""
        ...

    async def step_approved(self, record: ExecutionRecord, step_id: str) -> bool:
        """Whether ``step_id`` of ``record`` has a request granted for this very plan."""
        ...

    async def granted_by(self, execution_id: UUID, *, actor_id: str, tenant_id: str) -> bool:
        """Whether ``actor_id`` granted the approval bound to ``execution_id`` in
        ``tenant_id`` (an approver may then dispatch it)."""
        ...

    async def extend_locks(self, lock_set: LockSet, ttl: timedelta) -> LockSet:
        """Keep a paused execution's locks ``ttl`` from now, all or nothing: a lock expired
        but not taken over is still its owner's; ``StaleLeaseError`` (nothing extended) when
        one is no longer held by ``lock_set``'s owner; ``ValueError`` for a ttl not positive."""
        ...


class PostgresApprovals:
    """:class:`ApprovalLifecycle` on Postgres."""

    def __init__(self, pool: PoolOrConnection) -> None:
        self._pool = pool

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Any]:
        async with transaction(self._pool) as conn:
            yield conn

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return self._transaction()

    async def request(
        self, execution_id: UUID, *, ttl: timedelta, by: str, tx: Any = None
    ) -> ApprovalRecord:
        return await approvals.request_approval(
            self._pool if tx is None else tx, execution_id, ttl=ttl, by=by
        )

    async def request_step(
        self, execution_id: UUID, step_id: str, *, lease_token: UUID, ttl: timedelta, by: str
    ) -> ApprovalRecord | None:
        return await approvals.request_step_approval(
            self._pool, execution_id, step_id, lease_token=lease_token, ttl=ttl, by=by
        )

    async def get(self, tenant_id: str, approval_id: UUID | str) -> ApprovalRecord:
        return await approval_records.get_approval(self._pool, tenant_id, approval_id)

    async def list_pending(
        self, tenant_id: str, *, page_size: int = DEFAULT_PAGE_SIZE, page_token: str | None = None
    ) -> tuple[list[ApprovalRecord], str | None]:
        return await approval_records.list_pending_approvals(
            self._pool, tenant_id, page_size=page_size, page_token=page_token
        )

    async def step_approval(
        self, tenant_id: str, execution_id: UUID, step_id: str
    ) -> ApprovalRecord | None:
        return await approval_records.step_approval(self._pool, tenant_id, execution_id, step_id)

    async def approval_owner(self, approval_id: UUID | str) -> tuple[str, UUID] | None:
        return await approval_records.find_approval_owner(self._pool, approval_id)

    async def execution_owner(self, execution_id: UUID | str) -> str | None:
        return await find_execution_tenant(self._pool, execution_id)

    async def execution(self, tenant_id: str, execution_id: UUID) -> ExecutionRecord:
        return await get_execution(self._pool, tenant_id, execution_id, with_steps=False)

    async def decide(
        self,
        approval_id: UUID | str,
        *,
        tenant_id: str,
        decision: ApprovalDecision,
        tx: Any = None,
    ) -> ApprovalRecord:
        return await approvals.decide(
            self._pool if tx is None else tx, approval_id, tenant_id=tenant_id, decision=decision
        )

    async def invalidate(
        self, approval_id: UUID, *, by: str, reason: str, mismatched: list[str]
    ) -> ApprovalRecord | None:
        return await approvals.invalidate_approval(
            self._pool, approval_id, by=by, reason=reason, mismatched=mismatched
        )

    async def enforce_binding(self, record: ExecutionRecord, *, by: str) -> ApprovalRecord | None:
        return await approvals.enforce_binding(self._pool, record, by=by)

    async def step_approved(self, record: ExecutionRecord, step_id: str) -> bool:
        return await approvals.step_approved(self._pool, record, step_id)

    async def granted_by(self, execution_id: UUID, *, actor_id: str, tenant_id: str) -> bool:
        return await approvals.granted_by(
            self._pool, execution_id, actor_id=actor_id, tenant_id=tenant_id
        )

    async def extend_locks(self, lock_set: LockSet, ttl: timedelta) -> LockSet:
        return await locks.extend_locks(self._pool, lock_set, ttl)
