"""Approval levels and the approval flow end to end (spec §6.1): a plan that needs a person is
created awaiting approval and the submit returns at once; once another principal approves it,
it proceeds without a second submit (immediate plans through the worker, background plans
through the queue); a rejection ends it; every request and decision is recorded."""

from __future__ import annotations

from pathlib import Path

import grpc.aio
import pytest
from opsc_test_actions import read_ledger

from opsconductor.client import (
    Approval,
    ApprovalLevelNotEnabledError,
    FailedPreconditionError,
    PlanValidationError,
)
from opsconductor.common.approval_policy import determine_approval_level
from opsconductor.common.plan import parse_plan
from opsconductor.execution.v1 import approval_service_pb2, approval_service_pb2_grpc
from opsconductor.lifecycle.storage.flags import update_flags

from . import approvals_support
from .approvals_support import (
    RUNBOOK,
    Stopwatch,
    deploy_plan,
    event_types,
    modify_plan,
    production_plan,
    wait_status,
    with_approvers,
)
from .conftest import Tenant, token
from .inspection import new_tenant, tenant_row_counts, wait_until
from .plans import create_simple_query_plan, plan, probe_step
from .stack import Stack

stack = approvals_support.approvals_stack


def create_query_plan(ledger: Path) -> dict[str, object]:
    return create_simple_query_plan(ledger)


def create_restart_plan(ledger: Path) -> dict[str, object]:
    return modify_plan(ledger)


def create_deploy_plan(ledger: Path) -> dict[str, object]:
    return deploy_plan(ledger)


async def test_spec_6_1_approval_levels(tenant: Tenant, ledger: Path) -> None:
    """§6.1: read-only → 0, modify → 1, deploy → 2 (the spec's snippet), production targets → 3;
    the api's preview reports the same levels, and level 3 always runs in background."""
    plan_readonly = parse_plan(create_query_plan(ledger))
    assert determine_approval_level(plan_readonly) == 0  # Auto-execute

    plan_modify = parse_plan(create_restart_plan(ledger))
    assert determine_approval_level(plan_modify) == 1  # Confirmation

    plan_deploy = parse_plan(create_deploy_plan(ledger))
    assert determine_approval_level(plan_deploy) == 2  # Plan review

    assert determine_approval_level(parse_plan(production_plan(ledger))) == 3
    async with tenant.client("dave") as client:
        levels = [
            (await client.preview(p, tenant_id=tenant.id)).approval_level
            for p in (
                create_query_plan(ledger),
                create_restart_plan(ledger),
                create_deploy_plan(ledger),
            )
        ]
        step_by_step = await client.preview(production_plan(ledger), tenant_id=tenant.id)
    assert levels == [0, 1, 2]
    assert (step_by_step.approval_level, step_by_step.execution_mode) == (3, "background")


async def test_level_0_runs_at_once_without_any_approval(tenant: Tenant, ledger: Path) -> None:
    """Level 0 (read-only) auto-executes: succeeded on return, no approval row."""
    async with tenant.client("alice") as client:
        result = await client.submit(create_query_plan(ledger), tenant_id=tenant.id)
    assert (result.status, result.approval_level, result.approval_id) == ("succeeded", 0, None)
    assert (await tenant_row_counts(tenant.pool, tenant.id))["approvals"] == 0


async def test_immediate_plan_waits_then_runs_once_another_principal_approves(
    tenant: Tenant, ledger: Path
) -> None:
    """Level 1: submit returns at once awaiting_approval with the approval id, nothing runs (a
    duplicate submit returns the same execution and request); bob approves (no second submit)
    → the worker runs it → succeeded; the approval records bob, his auth method and address,
    the time and the comment; each step is an event."""
    await with_approvers(tenant)
    async with tenant.client("alice") as client, tenant.approvals("bob") as approvals:
        clock = Stopwatch()
        restart = modify_plan(ledger)
        submitted = await client.submit(restart, tenant_id=tenant.id)
        assert clock.elapsed_s < 5
        again = await client.submit(restart, tenant_id=tenant.id)
        assert again.deduplicated
        assert (again.execution_id, again.approval_id) == (
            submitted.execution_id,
            submitted.approval_id,
        )
        assert (submitted.status, submitted.execution_mode) == ("awaiting_approval", "immediate")
        assert submitted.approval_level == 1
        assert submitted.approval_id
        assert read_ledger(ledger) == []

        approved = await approvals.approve(
            submitted.approval_id, tenant_id=tenant.id, comment="restart agreed in CHG-42"
        )
        assert (approved.state, approved.decided_by, approved.requested_by) == (
            "approved",
            "bob",
            "alice",
        )
        final = await wait_status(client, submitted, "succeeded", "failed", "cancelled")
        recorded = await approvals.get_approval(submitted.approval_id, tenant_id=tenant.id)
    assert final.status == "succeeded", (final.error_class, final.error_message)
    assert len(read_ledger(ledger)) == 1
    assert recorded.decided_by == "bob"
    assert recorded.auth_method
    assert recorded.source_ip == "127.0.0.1"
    assert recorded.decided_at is not None
    assert recorded.comment == "restart agreed in CHG-42"
    assert (recorded.plan_hash, recorded.plan_snapshot_hash) == (
        submitted.plan_hash,
        submitted.plan_snapshot_hash,
    )
    types = await event_types(tenant.pool, submitted.execution_id)
    assert types[:3] == ["execution_started", "approval_requested", "approval_granted"]
    assert types[-1] == "execution_completed"
    granted = await tenant.pool.fetchval(
        "SELECT actor_id FROM execution_events WHERE execution_id = $1::uuid "
        "AND type = 'approval_granted'",
        submitted.execution_id,
    )
    assert granted == "bob"


async def test_pending_list_shows_plan_level_runbook_targets_and_actions(
    tenant: Tenant, ledger: Path
) -> None:
    """ListPendingApprovals (tenant scoped) shows what a reviewer needs: the plan, its level,
    the runbook URL, the targets and the actions; GetApproval shows the same."""
    await with_approvers(tenant)
    async with tenant.client("dave") as client, tenant.approvals("vera") as viewer:
        submitted = await client.submit(deploy_plan(ledger), tenant_id=tenant.id)
        pending, next_token = await viewer.list_pending_approvals(tenant_id=tenant.id)
        one = await viewer.get_approval(submitted.approval_id or "", tenant_id=tenant.id)
    assert submitted.status == "awaiting_approval"
    assert next_token == ""
    assert [a.approval_id for a in pending] == [submitted.approval_id]
    shown: Approval = pending[0]
    assert shown == one
    assert (shown.level, shown.state, shown.runbook_url) == (2, "pending", RUNBOOK)
    assert shown.target_refs == ("web-1", "web-2")
    assert shown.actions == ("probe",)
    assert shown.plan is not None
    assert shown.plan["description"] == "roll out v2"
    assert [s["id"] for s in shown.plan["steps"]] == ["deploy"]
    assert shown.expires_at is not None
    assert shown.created_at is not None


async def test_background_plan_is_queued_when_approved(tenant: Tenant, ledger: Path) -> None:
    """An approved background plan goes onto the queue in the decision's transaction and a
    worker runs it; the queue transition is recorded as made by the approver."""
    await with_approvers(tenant)
    long_plan = plan(
        probe_step("migrate", ["db-9"], ledger, action_class="modify", estimate_ms=60_000),
        sla="medium",
    )
    async with tenant.client("alice") as client, tenant.approvals("carol") as approvals:
        submitted = await client.submit(long_plan, tenant_id=tenant.id)
        assert (submitted.status, submitted.execution_mode) == ("awaiting_approval", "background")
        await approvals.approve(submitted.approval_id or "", tenant_id=tenant.id)
        final = await wait_status(client, submitted, "succeeded", "failed")
    assert final.status == "succeeded", (final.error_class, final.error_message)
    queued_by = await tenant.pool.fetchval(
        "SELECT actor_id FROM execution_events WHERE execution_id = $1::uuid "
        "AND type = 'execution_queued'",
        submitted.execution_id,
    )
    assert queued_by == "carol"
    assert len(read_ledger(ledger)) == 1


async def test_rejected_plan_ends_rejected_and_nothing_runs(tenant: Tenant, ledger: Path) -> None:
    """Reject (with a comment) → the execution is rejected (terminal), its step skipped, and a
    later approve is refused."""
    await with_approvers(tenant)
    async with tenant.client("alice") as client, tenant.approvals("bob") as approvals:
        submitted = await client.submit(modify_plan(ledger), tenant_id=tenant.id)
        rejected = await approvals.reject(
            submitted.approval_id or "", tenant_id=tenant.id, comment="not during the freeze"
        )
        final = await client.get(submitted.execution_id, tenant_id=tenant.id)
        with pytest.raises(FailedPreconditionError):
            await approvals.with_token(token("carol", tenant.id)).approve(
                submitted.approval_id or "", tenant_id=tenant.id
            )
    assert (rejected.state, rejected.comment) == ("rejected", "not during the freeze")
    assert final.status == "rejected"
    assert final.is_terminal
    assert [s.status for s in final.steps] == ["skipped"]
    assert read_ledger(ledger) == []
    assert (await event_types(tenant.pool, submitted.execution_id))[-1] == "execution_completed"


async def test_level_2_plan_without_runbook_is_rejected_at_submit(
    tenant: Tenant, ledger: Path
) -> None:
    """A deploy plan (level 2) with no runbook URL: INVALID_ARGUMENT naming runbook_url, and
    nothing is written."""
    async with tenant.client("dave") as client:
        with pytest.raises(PlanValidationError) as refused:
            await client.submit(deploy_plan(ledger, runbook=None), tenant_id=tenant.id)
    assert [v.field for v in refused.value.violations] == ["runbook_url"]
    counts = await tenant_row_counts(tenant.pool, tenant.id)
    assert counts["executions"] == counts["approvals"] == 0


async def test_forwarded_for_header_is_ignored_from_an_untrusted_peer(
    tenant: Tenant, ledger: Path, stack: Stack
) -> None:
    """With no trusted proxy configured, X-Forwarded-For cannot forge the recorded address:
    the decision records the peer's own address."""
    await with_approvers(tenant)
    async with tenant.client("alice") as client:
        submitted = await client.submit(modify_plan(ledger), tenant_id=tenant.id)
        async with grpc.aio.insecure_channel(stack.address("approvals")) as channel:
            stub = approval_service_pb2_grpc.ApprovalServiceStub(channel)
            response = await stub.Approve(
                approval_service_pb2.ApproveRequest(
                    tenant_id=tenant.id, approval_id=submitted.approval_id or ""
                ),
                metadata=(
                    ("authorization", f"Bearer {token('bob', tenant.id)}"),
                    ("x-forwarded-for", "203.0.113.9"),
                ),
                timeout=30,
            )
        await wait_status(client, submitted, "succeeded", "failed")
    assert response.approval.source_ip == "127.0.0.1"


async def test_levels_above_the_enabled_one_are_refused(
    tenant: Tenant, ledger: Path, stack: Stack
) -> None:
    """Feature gate: with max_approval_level 1, a level-2 plan is refused with
    FAILED_PRECONDITION / APPROVAL_LEVEL_NOT_ENABLED and nothing is written; a level-1 plan is
    still accepted. (The api sees flag changes within seconds: a scratch tenant's submits show
    when it does.)"""
    scratch = await new_tenant(stack, tenant.pool)

    async def level_2_refused(refused: bool) -> bool:
        async with scratch.client("dave") as probe:
            try:
                await probe.submit(deploy_plan(ledger), tenant_id=scratch.id)
            except ApprovalLevelNotEnabledError:
                return refused
            return not refused

    await update_flags(tenant.pool, {"max_approval_level": 1}, by="e2e")
    try:
        await wait_until(lambda: level_2_refused(True), within_s=10, what="the gate at level 1")
        async with tenant.client("dave") as client:
            with pytest.raises(ApprovalLevelNotEnabledError) as refused:
                await client.submit(deploy_plan(ledger), tenant_id=tenant.id)
            assert refused.value.reason == "APPROVAL_LEVEL_NOT_ENABLED"
            assert (await tenant_row_counts(tenant.pool, tenant.id))["executions"] == 0
            accepted = await client.submit(modify_plan(ledger), tenant_id=tenant.id)
            assert accepted.status == "awaiting_approval"
    finally:
        await update_flags(tenant.pool, {"max_approval_level": 3}, by="e2e")
        await wait_until(lambda: level_2_refused(False), within_s=10, what="the gate at level 3")
