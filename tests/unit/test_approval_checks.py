"""The worker's approval checks (``ApprovalChecks``) and an approver's dispatch of an immediate
execution (``ImmediateExecutions``) on the approvals port's in-memory fake: a binding that does
not cover the plan invalidates the approval, one not granted refuses the run, a level-3 step
runs only once approved for this very plan, a paused execution's locks are kept (or, lost,
only logged), and the approver who granted it may start it while anyone else is refused."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest

from opsconductor.common.auth import Principal
from opsconductor.common.errors import (
    ApprovalInvalidatedError,
    FailedPreconditionError,
    PermissionDeniedError,
)
from opsconductor.common.fsm import ExecutionStatus
from opsconductor.lifecycle.approval_fake import InMemoryApprovals
from opsconductor.lifecycle.approval_port import ApprovalDecision, ApprovalState
from opsconductor.lifecycle.storage.execution_records import ExecutionRecord
from opsconductor.lifecycle.storage.locks import LockRequest
from opsconductor.worker.logic.approval_checks import PAUSED_LOCK_BUFFER, ApprovalChecks
from opsconductor.worker.logic.immediate import ImmediateExecutions
from tests.unit.worker_world import TENANT, WORKER, World, new_execution, plan_of

TTL = timedelta(hours=1)


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def approvals(world: World) -> InMemoryApprovals:
    return InMemoryApprovals(world.lifecycle)


@pytest.fixture
def checks(world: World, approvals: InMemoryApprovals) -> ApprovalChecks:
    world.runner.approvals = ApprovalChecks(approvals, ttl=TTL, worker_id=WORKER)
    return world.runner.approvals


async def awaiting(
    world: World, approvals: InMemoryApprovals, *, mode: str = "immediate", level: int = 1
) -> ExecutionRecord:
    """A new execution of alice's awaiting its whole-plan approval."""
    record, _ = await world.lifecycle.create(
        replace(new_execution(plan_of("ok"), mode=mode), approval_level=level),
        dedup_window=TTL,
    )
    await approvals.request(record.id, ttl=TTL, by="api")
    return world.lifecycle._current(record.id)


async def grant(approvals: InMemoryApprovals, record: ExecutionRecord, by: str = "bob") -> None:
    assert record.approval_id is not None
    await approvals.decide(
        record.approval_id,
        tenant_id=record.tenant_id,
        decision=ApprovalDecision(approve=True, decided_by=by, auth_method="jwt", source_ip=None),
    )


async def test_a_binding_that_does_not_cover_the_plan_invalidates_the_approval(
    world: World, approvals: InMemoryApprovals, checks: ApprovalChecks
) -> None:
    record = await awaiting(world, approvals, mode="background")
    await grant(approvals, record)
    assert await checks.verify(record, background=True) is None
    refused = await checks.verify(replace(record, plan_hash="e" * 64), background=True)
    assert isinstance(refused, ApprovalInvalidatedError)
    assert record.approval_id is not None
    assert approvals.approvals[record.approval_id].state is ApprovalState.INVALIDATED
    # No approval bound at all is refused the same way; a level-0 execution needs none.
    missing = await checks.verify(replace(record, approval_id=None), background=True)
    assert isinstance(missing, ApprovalInvalidatedError)
    assert await checks.verify(replace(record, approval_level=0), background=True) is None


async def test_an_approval_not_granted_refuses_the_run_and_level_3_runs_only_in_background(
    world: World, approvals: InMemoryApprovals, checks: ApprovalChecks
) -> None:
    record = await awaiting(world, approvals)
    with pytest.raises(FailedPreconditionError) as refused:
        await checks.require_granted(record)
    assert refused.value.details["state"] == "pending"
    assert record.approval_id is not None
    assert approvals.approvals[record.approval_id].state is ApprovalState.PENDING
    level3 = await checks.verify(replace(record, approval_level=3), background=False)
    assert isinstance(level3, FailedPreconditionError)


async def test_a_step_counts_as_approved_only_for_this_very_plan(
    world: World, approvals: InMemoryApprovals, checks: ApprovalChecks
) -> None:
    record = await awaiting(world, approvals, mode="background", level=3)
    step = approvals.core.new_approval(record, "s1", TTL)
    assert not await checks.step_approved(record, "s1")
    approvals.approvals[step.id] = replace(step, state=ApprovalState.APPROVED, decided_by="bob")
    assert await checks.step_approved(record, "s1")
    assert not await checks.step_approved(record, "s2")
    assert not await checks.step_approved(replace(record, plan_hash="e" * 64), "s1")


async def test_a_paused_executions_locks_are_kept_past_its_step_approvals_expiry(
    world: World, checks: ApprovalChecks
) -> None:
    owner = uuid4()
    held = await world.lifecycle.acquire_locks(
        [LockRequest(TENANT, "host:one", "restart")],
        owner_token=owner,
        owner_execution_id=uuid4(),
        ttl=timedelta(seconds=30),
    )
    before = datetime.now(UTC)
    await checks.hold_locks(held)
    (lock,) = world.lifecycle.locks.values()
    assert lock.expires_at >= before + TTL + PAUSED_LOCK_BUFFER
    assert lock.owner_token == owner
    # Taken over by someone else meanwhile: nothing extended, nothing raised (they lapse).
    world.lifecycle.locks[held.keys[0]] = replace(lock, owner_token=uuid4(), expires_at=before)
    await checks.hold_locks(held)
    assert world.lifecycle.locks[held.keys[0]].expires_at == before


async def test_the_approver_who_granted_it_starts_an_immediate_execution_and_nobody_else(
    world: World, approvals: InMemoryApprovals, checks: ApprovalChecks
) -> None:
    world.roles.bindings[(TENANT, "bob")] = frozenset({"approver"})
    world.roles.bindings[(TENANT, "carol")] = frozenset({"approver"})
    immediate = ImmediateExecutions(
        lifecycle=world.lifecycle, approvals=approvals, authorizer=world.roles, runner=world.runner
    )
    record = await awaiting(world, approvals)
    # Not granted yet: the approver path is not open, and bob is no submitter.
    bob = Principal(actor_id="bob", tenant_id=TENANT)
    with pytest.raises(PermissionDeniedError):
        await immediate.run(bob, tenant_id=TENANT, execution_id=record.id)
    await grant(approvals, record, by="bob")
    with pytest.raises(PermissionDeniedError):  # another approver did not grant it
        await immediate.run(
            Principal(actor_id="carol", tenant_id=TENANT), tenant_id=TENANT, execution_id=record.id
        )
    assert world.lifecycle.executions[record.id].status is ExecutionStatus.AWAITING_APPROVAL
    final = await immediate.run(bob, tenant_id=TENANT, execution_id=record.id)
    assert final.status is ExecutionStatus.SUCCEEDED
    assert world.scripted.calls == ["s1"]
