"""Approval integrity end to end (spec §6.2 and the issue's acceptance): the requester never
approves, other tenants cannot decide (audited), concurrent deciders leave exactly one decision,
and an approval never stretches to cover a plan other than the one a person saw."""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
from opsc_test_actions import read_ledger

from opsconductor.client import (
    Approval,
    ApprovalClient,
    ApprovalDecidedError,
    ApprovalInvalidatedError,
    ExecutionClient,
    ExecutionContext,
    FailedPreconditionError,
    SelfApprovalError,
    map_rpc_error,
)
from opsconductor.execution.v1 import worker_service_pb2, worker_service_pb2_grpc

from . import approvals_support
from .approvals_support import event_types, modify_plan, wait_status, with_approvers
from .conftest import Tenant, token
from .inspection import new_tenant, rbac_violations
from .plans import probe_step
from .stack import Stack

stack = approvals_support.approvals_stack


@dataclass
class ApprovalManager:
    """The spec snippet's ``approval_manager`` on the client: a request is a submit (the
    execution waits with its approval), a decision is the approver's ApproveRequest."""

    executions: ExecutionClient
    approvals: ApprovalClient
    tenant: Tenant

    async def request_approval(self, plan: dict[str, Any], context: ExecutionContext) -> Approval:
        execution = await self.executions.execute(plan, context)
        assert execution.status == "awaiting_approval"
        return await self.approvals.get_approval(
            execution.approval_id or "", tenant_id=context.tenant_id
        )

    async def approve(self, approval_id: str, approver_id: str) -> Approval:
        async with self.tenant.approvals(approver_id) as approver:
            return await approver.approve(approval_id, tenant_id=self.tenant.id)


async def test_requester_cannot_approve_their_own_execution(tenant: Tenant, ledger: Path) -> None:
    """ada (admin: may submit and decide) submits, then approves her own request: refused with
    SelfApprovalError (FAILED_PRECONDITION); the request stays pending and nothing runs."""
    async with tenant.client("ada") as client, tenant.approvals("ada") as own:
        submitted = await client.submit(modify_plan(ledger), tenant_id=tenant.id)
        with pytest.raises(SelfApprovalError):
            await own.approve(submitted.approval_id or "", tenant_id=tenant.id)
        with pytest.raises(SelfApprovalError):
            await own.reject(submitted.approval_id or "", tenant_id=tenant.id)
        still = await own.get_approval(submitted.approval_id or "", tenant_id=tenant.id)
        current = await client.get(submitted.execution_id, tenant_id=tenant.id)
    assert still.state == "pending"
    assert still.decided_by is None
    assert current.status == "awaiting_approval"
    assert read_ledger(ledger) == []


async def test_principal_of_another_tenant_cannot_decide_and_is_audited(
    tenant: Tenant, ledger: Path, stack: Stack
) -> None:
    """mallory, an approver of another tenant, approves (naming either tenant) and rejects a
    request of this tenant: PermissionError each time, each audited as rbac_violation (tier
    approvals) under this tenant, linked to the execution; the request stays pending."""
    other = await new_tenant(stack, tenant.pool)
    await other.bind("mallory", "approver")
    async with tenant.client("alice") as client, other.approvals("mallory") as mallory:
        submitted = await client.submit(modify_plan(ledger), tenant_id=tenant.id)
        approval_id = submitted.approval_id or ""
        for named in (tenant.id, other.id):
            with pytest.raises(PermissionError):
                await mallory.approve(approval_id, tenant_id=named)
        with pytest.raises(PermissionError):
            await mallory.reject(approval_id, tenant_id=tenant.id)
    violations = await rbac_violations(tenant.pool, tenant.id, "mallory")
    assert len(violations) == 3
    assert {v["tier"] for v in violations} == {"approvals"}
    assert {v["reason"] for v in violations} == {"TENANT_MISMATCH"}
    assert {str(v["linked_execution_id"]) for v in violations} == {submitted.execution_id}
    assert await rbac_violations(tenant.pool, other.id, "mallory") == []
    async with tenant.approvals("vera") as viewer:
        assert (await viewer.get_approval(approval_id, tenant_id=tenant.id)).state == "pending"


async def test_fifty_concurrent_decisions_leave_exactly_one(tenant: Tenant, ledger: Path) -> None:
    """50 concurrent approve/reject calls by two approvers on one request: exactly one
    succeeds, the 49 others get ApprovalDecidedError (FAILED_PRECONDITION); one decision event;
    the execution ends as that decision says."""
    await with_approvers(tenant)
    async with (
        tenant.client("alice") as client,
        tenant.approvals("bob") as bob,
        tenant.approvals("carol") as carol,
    ):
        submitted = await client.submit(modify_plan(ledger), tenant_id=tenant.id)
        approval_id = submitted.approval_id or ""
        calls = [
            (bob if i % 2 else carol).approve(approval_id, tenant_id=tenant.id)
            if i % 4 < 2
            else (bob if i % 2 else carol).reject(approval_id, tenant_id=tenant.id)
            for i in range(50)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        final = await wait_status(client, submitted, "succeeded", "rejected", "failed")
    winners = [r for r in results if isinstance(r, Approval)]
    losers = [r for r in results if not isinstance(r, Approval)]
    assert len(winners) == 1, results
    assert all(isinstance(r, ApprovalDecidedError) for r in losers), losers
    types = await event_types(tenant.pool, submitted.execution_id)
    assert types.count("approval_granted") + types.count("approval_rejected") == 1
    expected = "succeeded" if winners[0].state == "approved" else "rejected"
    assert final.status == expected
    assert len(read_ledger(ledger)) == (1 if expected == "succeeded" else 0)


async def test_spec_6_2_changed_plan_invalidates_the_approval(tenant: Tenant, ledger: Path) -> None:
    """§6.2, the spec's snippet on the client: request, approve, append a step, execute with
    the approval → ApprovalInvalidatedError."""
    await with_approvers(tenant)
    plan = modify_plan(ledger)
    context = ExecutionContext(tenant_id=tenant.id)
    async with tenant.client("alice") as executor, tenant.approvals("vera") as reader:
        approval_manager = ApprovalManager(executor, reader, tenant)
        approval = await approval_manager.request_approval(plan, context)
        await approval_manager.approve(approval.id, "bob")

        # Modify plan
        new_step = probe_step("verify", ["svc-1"], ledger, action_class="modify")
        plan["steps"].append(new_step)

        # Try to execute (should fail)
        with pytest.raises(ApprovalInvalidatedError):
            await executor.execute(plan, replace(context, approval_id=approval.id))


async def test_changed_plan_is_refused_every_time_and_the_approved_original_runs(
    tenant: Tenant, ledger: Path
) -> None:
    """After approval, the plan re-submitted with the approval id and a step added, a target
    changed or a param changed → ApprovalInvalidatedError each time, nothing new created; the
    approval stays approved and the original (already released) runs to success, once."""
    await with_approvers(tenant)
    original = modify_plan(ledger, hold_s=1.0)
    added = copy.deepcopy(original)
    added["steps"].append(probe_step("extra", ["svc-1"], ledger, action_class="modify"))
    retargeted = copy.deepcopy(original)
    retargeted["steps"][0]["targets"] = [{"ref": "svc-2"}]
    reparamed = copy.deepcopy(original)
    reparamed["steps"][0]["params"]["hold_s"] = 2.0
    async with tenant.client("alice") as client, tenant.approvals("bob") as bob:
        submitted = await client.submit(original, tenant_id=tenant.id)
        approval_id = submitted.approval_id or ""
        await bob.approve(approval_id, tenant_id=tenant.id)
        for changed in (added, retargeted, reparamed):
            with pytest.raises(ApprovalInvalidatedError) as refused:
                await client.submit(changed, tenant_id=tenant.id, approval_id=approval_id)
            assert refused.value.details["approval_state"] == "approved"
        final = await wait_status(client, submitted, "succeeded", "failed")
        approval = await bob.get_approval(approval_id, tenant_id=tenant.id)
    assert final.status == "succeeded", (final.error_class, final.error_message)
    assert approval.state == "approved"
    assert [line["step_id"] for line in read_ledger(ledger)] == ["restart"]
    count = await tenant.pool.fetchval(
        "SELECT count(*) FROM executions WHERE tenant_id = $1", tenant.id
    )
    assert count == 1


async def test_changed_plan_while_pending_invalidates_the_request(
    tenant: Tenant, ledger: Path
) -> None:
    """Before any decision, a changed plan presented with the approval id: refused, the request
    is invalidated (a new approval is needed) and its execution ends failed; approving it later
    is refused too."""
    await with_approvers(tenant)
    original = modify_plan(ledger)
    changed = copy.deepcopy(original)
    changed["steps"][0]["targets"] = [{"ref": "svc-9"}]
    async with tenant.client("alice") as client, tenant.approvals("bob") as bob:
        submitted = await client.submit(original, tenant_id=tenant.id)
        approval_id = submitted.approval_id or ""
        with pytest.raises(ApprovalInvalidatedError):
            await client.submit(changed, tenant_id=tenant.id, approval_id=approval_id)
        approval = await bob.get_approval(approval_id, tenant_id=tenant.id)
        failed = await client.get(submitted.execution_id, tenant_id=tenant.id)
        with pytest.raises(ApprovalInvalidatedError):
            await bob.approve(approval_id, tenant_id=tenant.id)
        # Without the stale id the changed plan gets a request of its own.
        fresh = await client.submit(changed, tenant_id=tenant.id)
    assert approval.state == "invalidated"
    assert (failed.status, failed.error_class) == ("failed", "APPROVAL_INVALIDATED")
    assert fresh.status == "awaiting_approval"
    assert fresh.approval_id not in (None, approval_id)
    assert "approval_invalidated" in await event_types(tenant.pool, submitted.execution_id)
    assert read_ledger(ledger) == []


async def test_only_the_requester_may_present_an_approval(tenant: Tenant, ledger: Path) -> None:
    """dave presenting alice's request with another plan is refused and audited (ACTOR_MISMATCH);
    alice's request is untouched."""
    async with tenant.client("alice") as alice, tenant.client("dave") as dave:
        submitted = await alice.submit(modify_plan(ledger), tenant_id=tenant.id)
        with pytest.raises(PermissionError):
            await dave.submit(
                modify_plan(ledger, target="svc-7"),
                tenant_id=tenant.id,
                approval_id=submitted.approval_id,
            )
        current = await alice.get(submitted.execution_id, tenant_id=tenant.id)
    assert current.status == "awaiting_approval"
    assert [v["reason"] for v in await rbac_violations(tenant.pool, tenant.id, "dave")] == [
        "ACTOR_MISMATCH"
    ]


async def run_immediate(stack: Stack, bearer: str, *, tenant_id: str, execution_id: str) -> None:
    """Call ``WorkerService.RunImmediate`` directly, as a forger would; raise the client's error."""
    async with grpc.aio.insecure_channel(stack.address("worker")) as channel:
        stub = worker_service_pb2_grpc.WorkerServiceStub(channel)
        request = worker_service_pb2.RunImmediateRequest(
            tenant_id=tenant_id, execution_id=execution_id
        )
        try:
            await stub.RunImmediate(
                request, metadata=(("authorization", f"Bearer {bearer}"),), timeout=30
            )
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc) from exc


async def test_binding_is_checked_again_when_a_person_approves(
    tenant: Tenant, ledger: Path
) -> None:
    """At dispatch: an approval row whose hash no longer matches its execution (tampered) is
    refused when approved — ApprovalInvalidatedError, the approval invalidated, the execution
    failed, nothing run."""
    await with_approvers(tenant)
    async with tenant.client("alice") as client, tenant.approvals("bob") as bob:
        submitted = await client.submit(modify_plan(ledger), tenant_id=tenant.id)
        await tenant.pool.execute(
            "UPDATE approvals SET plan_hash = repeat('f', 64) WHERE id = $1::uuid",
            submitted.approval_id,
        )
        with pytest.raises(ApprovalInvalidatedError):
            await bob.approve(submitted.approval_id or "", tenant_id=tenant.id)
        approval = await bob.get_approval(submitted.approval_id or "", tenant_id=tenant.id)
        final = await client.get(submitted.execution_id, tenant_id=tenant.id)
    assert approval.state == "invalidated"
    assert (final.status, final.error_class) == ("failed", "APPROVAL_INVALIDATED")
    assert read_ledger(ledger) == []


async def test_worker_refuses_what_no_valid_approval_covers(
    tenant: Tenant, ledger: Path, stack: Stack
) -> None:
    """In the worker, before anything runs: the submitter sending RunImmediate for her
    execution still awaiting approval is refused (FAILED_PRECONDITION) and nothing changes;
    once approved but with the execution's snapshot hash tampered, the worker refuses with
    ApprovalInvalidatedError, invalidates the approval and fails the execution."""
    async with tenant.client("alice") as client:
        submitted = await client.submit(modify_plan(ledger), tenant_id=tenant.id)
        with pytest.raises(FailedPreconditionError) as premature:
            await run_immediate(
                stack,
                token("alice", tenant.id),
                tenant_id=tenant.id,
                execution_id=submitted.execution_id,
            )
        assert not isinstance(premature.value, ApprovalInvalidatedError)
        assert (await client.get(submitted.execution_id, tenant_id=tenant.id)).status == (
            "awaiting_approval"
        )
        # A decision recorded without its dispatch, then the execution row tampered with.
        await tenant.pool.execute(
            "UPDATE approvals SET state = 'approved', decided_by = 'bob', auth_method = 'jwt', "
            "decided_at = now() WHERE id = $1::uuid",
            submitted.approval_id,
        )
        await tenant.pool.execute(
            "UPDATE executions SET plan_snapshot_hash = repeat('e', 64) WHERE id = $1::uuid",
            submitted.execution_id,
        )
        with pytest.raises(ApprovalInvalidatedError):
            await run_immediate(
                stack,
                token("alice", tenant.id),
                tenant_id=tenant.id,
                execution_id=submitted.execution_id,
            )
        final = await client.get(submitted.execution_id, tenant_id=tenant.id)
    state = await tenant.pool.fetchval(
        "SELECT state::text FROM approvals WHERE id = $1::uuid", submitted.approval_id
    )
    assert state == "invalidated"
    assert (final.status, final.error_class) == ("failed", "APPROVAL_INVALIDATED")
    assert read_ledger(ledger) == []


async def test_worker_lets_only_the_granting_approver_dispatch(
    tenant: Tenant, ledger: Path, stack: Stack
) -> None:
    """The worker reads the approval row, not the request: carol (an approver who did not grant
    it) is refused and audited; bob, who granted it, starts it and it succeeds."""
    await with_approvers(tenant)
    async with tenant.client("alice") as client:
        submitted = await client.submit(modify_plan(ledger), tenant_id=tenant.id)
        # The decision as the approvals service records it, without its dispatch.
        await tenant.pool.execute(
            "UPDATE approvals SET state = 'approved', decided_by = 'bob', auth_method = 'jwt', "
            "decided_at = now() WHERE id = $1::uuid",
            submitted.approval_id,
        )
        with pytest.raises(PermissionError):
            await run_immediate(
                stack,
                token("carol", tenant.id),
                tenant_id=tenant.id,
                execution_id=submitted.execution_id,
            )
        await run_immediate(
            stack, token("bob", tenant.id), tenant_id=tenant.id, execution_id=submitted.execution_id
        )
        final = await client.get(submitted.execution_id, tenant_id=tenant.id)
    assert final.status == "succeeded", (final.error_class, final.error_message)
    assert len(await rbac_violations(tenant.pool, tenant.id, "carol")) == 1
    assert len(read_ledger(ledger)) == 1
