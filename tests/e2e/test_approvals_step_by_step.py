"""Level 3 (step by step) end to end: after the plan is approved, the worker pauses before each
step until that step is approved — giving its lease up but keeping the targets locked — and
resumes one step per approval; cancelling or rejecting while it waits releases its locks."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from opsc_test_actions import read_ledger

from opsconductor.client import Execution, ResourceBusyError

from . import approvals_support
from .approvals_support import event_types, production_plan, wait_status, wait_step_request
from .conftest import Tenant
from .inspection import wait_until
from .plans import plan, probe_step

stack = approvals_support.approvals_stack


async def locks_held(pool: asyncpg.Pool, execution: Execution) -> int:
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM execution_locks WHERE owner_execution_id = $1::uuid",
            execution.execution_id,
        )
    )


async def queue_rows(pool: asyncpg.Pool, execution: Execution) -> int:
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM execution_queue WHERE execution_id = $1::uuid",
            execution.execution_id,
        )
    )


async def test_three_step_plan_runs_one_step_per_approval(tenant: Tenant, ledger: Path) -> None:
    """A 3-step production plan: submit → plan approval → the worker pauses before s1; each
    ApproveStep runs exactly one more step (ledger), the execution waiting in between with no
    job in the queue and its lock held; after s3 it succeeds."""
    await approvals_support.with_approvers(tenant)
    async with tenant.client("alice") as client, tenant.approvals("bob") as bob:
        submitted = await client.submit(production_plan(ledger), tenant_id=tenant.id)
        assert (submitted.approval_level, submitted.execution_mode) == (3, "background")
        assert submitted.status == "awaiting_approval"
        await bob.approve(submitted.approval_id or "", tenant_id=tenant.id)
        for done, step_id in enumerate(("s1", "s2", "s3")):
            request = await wait_step_request(bob, submitted, step_id)
            assert (request.level, request.target_refs) == (3, ("prod-db",))
            waiting = await client.get(submitted.execution_id, tenant_id=tenant.id)
            assert waiting.status == "awaiting_approval"
            assert [line["step_id"] for line in read_ledger(ledger)] == ["s1", "s2", "s3"][:done]
            assert waiting.steps[done].status == "awaiting_approval"
            assert await locks_held(tenant.pool, submitted) == 1
            assert await queue_rows(tenant.pool, submitted) == 0
            granted = await bob.approve_step(
                submitted.execution_id, step_id, tenant_id=tenant.id, comment=f"go {step_id}"
            )
            assert (granted.state, granted.step_id, granted.decided_by) == (
                "approved",
                step_id,
                "bob",
            )
            assert granted.target_refs == ("prod-db",)
        final = await wait_status(client, submitted, "succeeded", "failed", "cancelled")
    assert final.status == "succeeded", (final.error_class, final.error_message)
    assert [line["step_id"] for line in read_ledger(ledger)] == ["s1", "s2", "s3"]

    async def released() -> bool:
        # The worker records the outcome first, then releases the locks in its `finally`.
        return await locks_held(tenant.pool, submitted) == 0

    await wait_until(released, within_s=10, what="the locks released after the run")
    types = await event_types(tenant.pool, submitted.execution_id)
    assert types.count("step_approval_requested") == 3
    assert types.count("step_approval_granted") == 3
    assert types[-1] == "execution_completed"


async def test_cancelling_while_waiting_for_a_step_releases_its_locks(
    tenant: Tenant, ledger: Path
) -> None:
    """Paused before s2 (s1 done), the execution holds its target's lock: another plan on that
    target is refused as busy. Cancelling it ends it cancelled at once, the step request is
    invalidated, the lock is gone, and the other plan now runs."""
    await approvals_support.with_approvers(tenant)
    rival = plan(probe_step("peek", ["prod-db"], ledger))
    async with tenant.client("alice") as client, tenant.approvals("bob") as bob:
        submitted = await client.submit(production_plan(ledger), tenant_id=tenant.id)
        await bob.approve(submitted.approval_id or "", tenant_id=tenant.id)
        await wait_step_request(bob, submitted, "s1")
        await bob.approve_step(submitted.execution_id, "s1", tenant_id=tenant.id)
        request = await wait_step_request(bob, submitted, "s2")
        assert await locks_held(tenant.pool, submitted) == 1
        with pytest.raises(ResourceBusyError):
            await client.submit(rival, tenant_id=tenant.id)

        cancelled = await client.cancel(submitted.execution_id, tenant_id=tenant.id, reason="stop")
        assert cancelled.status == "cancelled"
        assert await locks_held(tenant.pool, submitted) == 0
        invalidated = await bob.get_approval(request.approval_id, tenant_id=tenant.id)
        after = await client.submit(rival, tenant_id=tenant.id)
    assert invalidated.state == "invalidated"
    assert [s.status for s in cancelled.steps] == ["succeeded", "skipped", "skipped"]
    assert after.status == "succeeded", (after.error_class, after.error_message)
    assert [line["step_id"] for line in read_ledger(ledger)] == ["s1", "peek"]


async def test_rejecting_a_step_ends_the_execution_and_releases_its_locks(
    tenant: Tenant, ledger: Path
) -> None:
    """Rejecting the request of s1 ends the execution rejected, nothing ran, lock released."""
    await approvals_support.with_approvers(tenant)
    async with tenant.client("alice") as client, tenant.approvals("carol") as carol:
        submitted = await client.submit(production_plan(ledger, steps=2), tenant_id=tenant.id)
        await carol.approve(submitted.approval_id or "", tenant_id=tenant.id)
        request = await wait_step_request(carol, submitted, "s1")
        rejected = await carol.reject(request.approval_id, tenant_id=tenant.id, comment="no")
        final = await client.get(submitted.execution_id, tenant_id=tenant.id)
    assert (rejected.state, rejected.step_id) == ("rejected", "s1")
    assert final.status == "rejected"
    assert read_ledger(ledger) == []
    assert await locks_held(tenant.pool, submitted) == 0
