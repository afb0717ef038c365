"""The approvals repository against real Postgres: requests bound to the execution's hashes, the
one decision (compare-and-set, the ``approval_not_self`` CHECK), invalidation, expiry by the
reaper, level-3 pauses, and cancellation of a waiting execution releasing its locks."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace
from datetime import timedelta
from uuid import UUID, uuid4

import asyncpg
import pytest

from opsconductor.common.errors import (
    ApprovalDecidedError,
    ApprovalExpiredError,
    ApprovalInvalidatedError,
    ConflictError,
    FailedPreconditionError,
    NotFoundError,
    SelfApprovalError,
)
from opsconductor.common.fsm import ExecutionStatus, StepStatus
from opsconductor.lifecycle.maintenance_port import PostgresRedisMaintenance
from opsconductor.lifecycle.storage.approval_records import (
    ApprovalState,
    close_pending_approvals,
    find_approval_owner,
    get_approval,
    list_pending_approvals,
    step_approval,
)
from opsconductor.lifecycle.storage.approvals import (
    ApprovalDecision,
    binding_mismatches,
    decide,
    enforce_binding,
    expire_pending,
    granted_by,
    invalidate_approval,
    request_approval,
    request_step_approval,
    step_approved,
)
from opsconductor.lifecycle.storage.execution_leases import claim_execution
from opsconductor.lifecycle.storage.executions import (
    ExecutionRecord,
    NewExecution,
    create_execution,
    get_execution,
    request_cancel,
    transition,
)
from opsconductor.lifecycle.storage.locks import LockRequest, acquire_locks
from opsconductor.worker.logic.reaper import reap_once

S = ExecutionStatus
WINDOW = timedelta(hours=24)
TTL = timedelta(hours=1)
STEPS = (("s1", 0, "noop", "modify"), ("s2", 1, "noop", "modify"))


def grant(by: str = "bob", approve: bool = True) -> ApprovalDecision:
    return ApprovalDecision(
        approve=approve, decided_by=by, auth_method="jwt", source_ip="10.1.2.3", comment="ok"
    )


async def waiting_execution(
    pool: asyncpg.Pool, *, tenant: str = "t1", level: int = 1, mode: str = "background"
) -> tuple[ExecutionRecord, UUID]:
    """An execution created pending, then awaiting approval with its whole-plan request."""
    new = NewExecution(
        tenant_id=tenant,
        actor_id="alice",
        request_id=None,
        idempotency_key=hashlib.sha256(uuid4().bytes).hexdigest(),
        plan_hash="a" * 64,
        plan_snapshot={"plan": {"name": "p", "runbook_url": "https://runbooks/x", "steps": []}},
        plan_snapshot_hash="b" * 64,
        execution_mode=mode,
        sla_class="medium",
        action_class="modify",
        approval_level=level,
        priority=50,
        timeout_policy_id="medium_modify",
        timeout_ms=30_000,
        estimated_duration_ms=100,
        record_only=False,
        steps=STEPS,
    )
    record, _ = await create_execution(pool, new, dedup_window=WINDOW)
    approval = await request_approval(pool, record.id, ttl=TTL, by="api")
    return await get_execution(pool, tenant, record.id), approval.id


async def event_types(pool: asyncpg.Pool, execution_id: UUID) -> list[str]:
    rows = await pool.fetch(
        "SELECT type FROM execution_events WHERE execution_id = $1 ORDER BY seq", execution_id
    )
    return [row["type"] for row in rows]


async def test_request_binds_the_approval_to_the_execution_row(db_pool: asyncpg.Pool) -> None:
    """The request copies plan_hash, plan_snapshot_hash, level, requester and runbook URL from
    the execution row; the execution waits, linked to it; both changes are events."""
    record, approval_id = await waiting_execution(db_pool, level=2)
    approval = await get_approval(db_pool, "t1", approval_id)
    assert record.status is S.AWAITING_APPROVAL
    assert record.approval_id == approval_id
    assert (approval.plan_hash, approval.plan_snapshot_hash) == ("a" * 64, "b" * 64)
    assert (approval.level, approval.requested_by, approval.state) == (2, "alice", "pending")
    assert approval.runbook_url == "https://runbooks/x"
    assert approval.plan is not None
    assert approval.plan["name"] == "p"
    assert await event_types(db_pool, record.id) == ["execution_started", "approval_requested"]
    assert await find_approval_owner(db_pool, approval_id) == ("t1", record.id)
    with pytest.raises(NotFoundError):
        await get_approval(db_pool, "other-tenant", approval_id)


async def test_first_decision_wins_and_records_who_how_where(db_pool: asyncpg.Pool) -> None:
    """Approve records principal, auth method, source IP, time and comment; a later approve or
    reject gets ApprovalDecidedError and changes nothing."""
    record, approval_id = await waiting_execution(db_pool)
    decided = await decide(db_pool, approval_id, tenant_id="t1", decision=grant())
    assert decided.state is ApprovalState.APPROVED
    assert (decided.decided_by, decided.auth_method, decided.source_ip) == (
        "bob",
        "jwt",
        "10.1.2.3",
    )
    assert decided.decided_at is not None
    assert decided.comment == "ok"
    for second in (grant("carol"), grant("carol", approve=False)):
        with pytest.raises(ApprovalDecidedError):
            await decide(db_pool, approval_id, tenant_id="t1", decision=second)
    assert (await get_approval(db_pool, "t1", approval_id)).decided_by == "bob"
    assert (await event_types(db_pool, record.id)).count("approval_granted") == 1
    assert await granted_by(db_pool, record.id, actor_id="bob", tenant_id="t1")
    assert not await granted_by(db_pool, record.id, actor_id="carol", tenant_id="t1")


async def test_the_not_self_check_refuses_the_requester(db_pool: asyncpg.Pool) -> None:
    """Even without the service's own check, the approval_not_self CHECK stops the requester:
    SelfApprovalError, and the approval stays pending."""
    _record, approval_id = await waiting_execution(db_pool)
    with pytest.raises(SelfApprovalError):
        await decide(db_pool, approval_id, tenant_id="t1", decision=grant("alice"))
    assert (await get_approval(db_pool, "t1", approval_id)).state is ApprovalState.PENDING


async def test_concurrent_decisions_leave_exactly_one(db_pool: asyncpg.Pool) -> None:
    """20 concurrent approve/reject calls: one succeeds, 19 get ApprovalDecidedError."""
    record, approval_id = await waiting_execution(db_pool)
    results = await asyncio.gather(
        *(
            decide(
                db_pool,
                approval_id,
                tenant_id="t1",
                decision=grant(f"approver-{i}", approve=i % 2 == 0),
            )
            for i in range(20)
        ),
        return_exceptions=True,
    )
    wins = [r for r in results if not isinstance(r, BaseException)]
    assert len(wins) == 1
    assert all(isinstance(r, ApprovalDecidedError) for r in results if r not in wins)
    types = await event_types(db_pool, record.id)
    assert types.count("approval_granted") + types.count("approval_rejected") == 1


async def test_reject_ends_the_execution_rejected(db_pool: asyncpg.Pool) -> None:
    """A rejection ends the execution rejected (terminal), its steps skipped."""
    record, approval_id = await waiting_execution(db_pool)
    await decide(db_pool, approval_id, tenant_id="t1", decision=grant(approve=False))
    final = await get_execution(db_pool, "t1", record.id)
    assert final.status is S.REJECTED
    assert {s.status for s in final.steps} == {StepStatus.SKIPPED}
    types = await event_types(db_pool, record.id)
    assert types[-2:] == ["step_skipped", "execution_completed"]
    assert "approval_rejected" in types


async def test_expired_request_cannot_be_decided_and_the_reaper_fails_it(
    db_pool: asyncpg.Pool,
) -> None:
    """Past expires_at a decision gets ApprovalExpiredError; the reaper's pass expires the
    request, fails the execution (APPROVAL_EXPIRED) and retires its idempotency key."""
    record, approval_id = await waiting_execution(db_pool)
    await db_pool.execute(
        "UPDATE approvals SET expires_at = created_at + interval '1 microsecond' WHERE id = $1",
        approval_id,
    )
    with pytest.raises(ApprovalExpiredError):
        await decide(db_pool, approval_id, tenant_id="t1", decision=grant())
    report = await reap_once(PostgresRedisMaintenance(db_pool, None), dedup_window=WINDOW)
    assert report.approvals_expired == 1
    assert (await get_approval(db_pool, "t1", approval_id)).state is ApprovalState.EXPIRED
    final = await get_execution(db_pool, "t1", record.id)
    assert (final.status, final.error_class) == (S.FAILED, "APPROVAL_EXPIRED")
    assert final.idempotency_retired_at is not None
    assert "approval_expired" in await event_types(db_pool, record.id)
    assert await expire_pending(db_pool) == 0


async def test_invalidating_a_pending_request_fails_its_execution(db_pool: asyncpg.Pool) -> None:
    """invalidate_approval: state invalidated, the waiting execution failed with
    APPROVAL_INVALIDATED; a second call changes nothing."""
    record, approval_id = await waiting_execution(db_pool)
    closed = await invalidate_approval(db_pool, approval_id, by="alice", reason="plan_changed")
    assert closed is not None
    assert closed.state is ApprovalState.INVALIDATED
    final = await get_execution(db_pool, "t1", record.id)
    assert (final.status, final.error_class) == (S.FAILED, "APPROVAL_INVALIDATED")
    assert await invalidate_approval(db_pool, approval_id, by="alice", reason="again") is None
    with pytest.raises(ApprovalInvalidatedError):
        await decide(db_pool, approval_id, tenant_id="t1", decision=grant())


async def test_enforce_binding(db_pool: asyncpg.Pool) -> None:
    """Pending → FailedPrecondition (nothing changes); approved and matching → the approval;
    a tampered hash → ApprovalInvalidatedError and the approval invalidated."""
    record, approval_id = await waiting_execution(db_pool)
    with pytest.raises(FailedPreconditionError) as pending:
        await enforce_binding(db_pool, record, by="w1")
    assert not isinstance(pending.value, ApprovalInvalidatedError)
    await decide(db_pool, approval_id, tenant_id="t1", decision=grant())
    assert (await enforce_binding(db_pool, record, by="w1")) is not None
    await db_pool.execute("UPDATE executions SET plan_hash = $2 WHERE id = $1", record.id, "c" * 64)
    tampered = await get_execution(db_pool, "t1", record.id)
    with pytest.raises(ApprovalInvalidatedError) as broken:
        await enforce_binding(db_pool, tampered, by="w1")
    assert broken.value.details["mismatched"] == ["plan_hash"]
    assert (await get_approval(db_pool, "t1", approval_id)).state is ApprovalState.INVALIDATED


async def test_step_pause_then_cancel_releases_the_locks(db_pool: asyncpg.Pool) -> None:
    """Level 3: a running execution pauses before s1 (awaiting_approval, lease cleared, step
    awaiting_approval, request open); cancelling it invalidates the request and deletes the
    locks it still held."""
    record, approval_id = await waiting_execution(db_pool, level=3)
    await decide(db_pool, approval_id, tenant_id="t1", decision=grant())
    await transition(db_pool, record.id, to=S.QUEUED, by="bob", tenant_id="t1")
    token = uuid4()
    running = await claim_execution(
        db_pool, record.id, lease_token=token, worker_id="w1", budget=timedelta(seconds=30)
    )
    assert running is not None
    await acquire_locks(
        db_pool,
        [LockRequest("t1", "host-a", "noop")],
        owner_token=uuid4(),
        owner_execution_id=record.id,
        ttl=TTL,
    )
    assert not await step_approved(db_pool, running, "s1")
    paused = await request_step_approval(
        db_pool, record.id, "s1", lease_token=token, ttl=TTL, by="w1"
    )
    assert paused is not None
    assert paused.step_id == "s1"
    assert paused.level == 3
    waiting = await get_execution(db_pool, "t1", record.id)
    assert (waiting.status, waiting.lease_token) == (S.AWAITING_APPROVAL, None)
    assert waiting.steps[0].status is StepStatus.AWAITING_APPROVAL
    assert (await step_approval(db_pool, "t1", record.id, "s1")) == paused
    pending, _ = await list_pending_approvals(db_pool, "t1")
    assert [a.id for a in pending] == [paused.id]

    cancelled, _ = await request_cancel(db_pool, record.id, tenant_id="t1", by="alice", reason="x")
    assert cancelled.status is S.CANCELLED
    assert (await get_approval(db_pool, "t1", paused.id)).state is ApprovalState.INVALIDATED
    held = await db_pool.fetchval(
        "SELECT count(*) FROM execution_locks WHERE owner_execution_id = $1", record.id
    )
    assert held == 0


async def test_pending_list_is_tenant_scoped_and_paginated(db_pool: asyncpg.Pool) -> None:
    """Oldest first, pages of the asked size, a token valid for its tenant only."""
    ids = [(await waiting_execution(db_pool, tenant="t2"))[1] for _ in range(3)]
    await waiting_execution(db_pool, tenant="t3")
    first, token = await list_pending_approvals(db_pool, "t2", page_size=2)
    assert token is not None
    second, last = await list_pending_approvals(db_pool, "t2", page_size=2, page_token=token)
    assert [a.id for a in first + second] == ids
    assert last is None
    with pytest.raises(ValueError, match="page_token"):
        await list_pending_approvals(db_pool, "t3", page_token=token)


async def test_refusals_of_the_repository(db_pool: asyncpg.Pool) -> None:
    """A second open request, unknown or malformed ids, a decision on an execution that moved
    on, closing requests as anything but invalidated/expired, bad page requests."""
    record, approval_id = await waiting_execution(db_pool)
    with pytest.raises(ConflictError):
        await request_approval(db_pool, record.id, ttl=TTL, by="api")
    for missing in (uuid4(), "not-a-uuid"):
        with pytest.raises(NotFoundError):
            await decide(db_pool, missing, tenant_id="t1", decision=grant())
        assert await find_approval_owner(db_pool, missing) is None
    with pytest.raises(NotFoundError):
        await invalidate_approval(db_pool, uuid4(), by="x", reason="y")
    with pytest.raises(ValueError, match="closed as invalidated or expired"):
        async with db_pool.acquire() as conn:
            await close_pending_approvals(
                conn, record.id, state=ApprovalState.APPROVED, by="x", reason="y"
            )
    for bad in ({"page_size": -1}, {"page_token": "%%%"}):
        with pytest.raises(ValueError, match="page_"):
            await list_pending_approvals(db_pool, "t1", **bad)
    # The execution ended some other way while its request stayed open: nothing to decide.
    await transition(db_pool, record.id, to=S.FAILED, by="test", tenant_id="t1")
    assert (await get_approval(db_pool, "t1", approval_id)).is_pending
    with pytest.raises(FailedPreconditionError, match="no longer awaiting"):
        await decide(db_pool, approval_id, tenant_id="t1", decision=grant())
    assert (await get_approval(db_pool, "t1", approval_id)).is_pending


async def test_binding_mismatches_name_every_difference(db_pool: asyncpg.Pool) -> None:
    """Each field an approval binds is compared; a level-0 execution needs no approval and a
    level-1 one without any is refused as invalidated."""
    record, approval_id = await waiting_execution(db_pool)
    approval = await get_approval(db_pool, "t1", approval_id)
    assert binding_mismatches(approval, record) == []
    other = replace(
        record,
        id=uuid4(),
        plan_hash="c" * 64,
        plan_snapshot_hash="d" * 64,
        approval_level=3,
    )
    assert binding_mismatches(approval, other) == [
        "execution_id",
        "plan_hash",
        "plan_snapshot_hash",
        "level",
    ]
    assert await enforce_binding(db_pool, replace(record, approval_level=0), by="w") is None
    with pytest.raises(ApprovalInvalidatedError, match="none is bound"):
        await enforce_binding(db_pool, replace(record, approval_id=None), by="w")


async def test_a_repeated_pause_reuses_the_request_and_a_cancelled_run_does_not_pause(
    db_pool: asyncpg.Pool,
) -> None:
    """Re-pausing before the same step (after a takeover) reuses the open request; a run whose
    cancellation was requested while it paused ends cancelled instead, its locks released."""
    record, approval_id = await waiting_execution(db_pool, level=3)
    await decide(db_pool, approval_id, tenant_id="t1", decision=grant())
    await transition(db_pool, record.id, to=S.QUEUED, by="bob", tenant_id="t1")
    first = uuid4()
    await claim_execution(
        db_pool, record.id, lease_token=first, worker_id="w1", budget=timedelta(seconds=30)
    )
    opened = await request_step_approval(
        db_pool, record.id, "s1", lease_token=first, ttl=TTL, by="w1"
    )
    # As if a worker had resumed it without the step being approved (e.g. an operator requeue).
    await transition(db_pool, record.id, to=S.QUEUED, by="op", tenant_id="t1")
    second = uuid4()
    await claim_execution(
        db_pool, record.id, lease_token=second, worker_id="w2", budget=timedelta(seconds=30)
    )
    again = await request_step_approval(
        db_pool, record.id, "s1", lease_token=second, ttl=TTL, by="w2"
    )
    assert again is not None
    assert opened is not None
    assert again.id == opened.id

    await transition(db_pool, record.id, to=S.QUEUED, by="op", tenant_id="t1")
    third = uuid4()
    await claim_execution(
        db_pool, record.id, lease_token=third, worker_id="w3", budget=timedelta(seconds=30)
    )
    await acquire_locks(
        db_pool,
        [LockRequest("t1", "host-b", "noop")],
        owner_token=uuid4(),
        owner_execution_id=record.id,
        ttl=TTL,
    )
    await request_cancel(db_pool, record.id, tenant_id="t1", by="alice", reason="stop")
    assert (
        await request_step_approval(db_pool, record.id, "s2", lease_token=third, ttl=TTL, by="w3")
        is None
    )
    final = await get_execution(db_pool, "t1", record.id)
    assert final.status is S.CANCELLED
    held = await db_pool.fetchval(
        "SELECT count(*) FROM execution_locks WHERE owner_execution_id = $1", record.id
    )
    assert held == 0


async def test_reaper_fails_an_approved_immediate_execution_nobody_started(
    db_pool: asyncpg.Pool,
) -> None:
    """Approved, immediate, still waiting 5 minutes after the decision (its dispatcher died):
    the reaper ends it failed (DISPATCH_LOST) and retires its key; a fresh one is left alone."""
    stale, stale_approval = await waiting_execution(db_pool, mode="immediate")
    fresh, fresh_approval = await waiting_execution(db_pool, mode="immediate")
    for approval_id in (stale_approval, fresh_approval):
        await decide(db_pool, approval_id, tenant_id="t1", decision=grant())
    await db_pool.execute(
        "UPDATE approvals SET decided_at = decided_at - interval '10 minutes' WHERE id = $1",
        stale_approval,
    )
    report = await reap_once(PostgresRedisMaintenance(db_pool, None), dedup_window=WINDOW)
    assert report.approvals_undispatched == 1
    lost = await get_execution(db_pool, "t1", stale.id)
    assert (lost.status, lost.error_class) == (S.FAILED, "DISPATCH_LOST")
    assert lost.idempotency_retired_at is not None
    assert (await get_execution(db_pool, "t1", fresh.id)).status is S.AWAITING_APPROVAL
