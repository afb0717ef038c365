"""The worker's ``ImmediateExecutions`` (RunImmediate's logic) against the in-memory lifecycle:
it reads the execution itself and trusts nothing of the request but its id. Another tenant's
execution is a probe refused there, an unknown one is not found, a caller who is not its
submitter is refused (the denial recorded), a background execution is not run here; the rest
runs to its end."""

from __future__ import annotations

from uuid import uuid4

import pytest

from opsconductor.common.auth import Principal
from opsconductor.common.errors import (
    FailedPreconditionError,
    NotFoundError,
    PermissionDeniedError,
)
from opsconductor.common.fsm import ExecutionStatus
from opsconductor.lifecycle.approval_fake import InMemoryApprovals
from opsconductor.policy.rbac import DenialReason
from opsconductor.worker.logic.immediate import ImmediateExecutions
from tests.unit.worker_world import TENANT, World

ALICE = Principal(actor_id="alice", tenant_id=TENANT)


@pytest.fixture
def world() -> World:
    return World()


def immediate(world: World) -> ImmediateExecutions:
    return ImmediateExecutions(
        lifecycle=world.lifecycle,
        approvals=InMemoryApprovals(world.lifecycle),
        authorizer=world.roles,
        runner=world.runner,
    )


async def test_the_submitter_runs_an_immediate_execution_to_its_end(world: World) -> None:
    record = await world.immediate("ok", "ok")
    final = await immediate(world).run(ALICE, tenant_id=TENANT, execution_id=record.id)
    assert final.status is ExecutionStatus.SUCCEEDED
    assert world.scripted.calls == ["s1", "s2"]
    assert world.roles.denials == []


async def test_another_tenants_execution_is_a_probe_refused_and_an_unknown_one_not_found(
    world: World,
) -> None:
    record = await world.immediate("ok")
    world.roles.bindings[("t2", "alice")] = frozenset({"operator"})
    # Checked where the execution really lives, whatever tenant the request names.
    with pytest.raises(PermissionDeniedError):
        await immediate(world).run(
            Principal(actor_id="alice", tenant_id="t2"), tenant_id="t2", execution_id=record.id
        )
    assert world.roles.denials == [("alice", DenialReason.TENANT_MISMATCH)]
    with pytest.raises(NotFoundError):
        await immediate(world).run(ALICE, tenant_id=TENANT, execution_id=uuid4())
    assert world.lifecycle.executions[record.id].status is ExecutionStatus.PENDING
    assert world.scripted.calls == []


async def test_a_caller_who_did_not_submit_it_is_refused_and_the_denial_recorded(
    world: World,
) -> None:
    record = await world.immediate("ok")
    world.roles.bindings[(TENANT, "mallory")] = frozenset({"operator"})
    with pytest.raises(PermissionDeniedError):
        await immediate(world).run(
            Principal(actor_id="mallory", tenant_id=TENANT),
            tenant_id=TENANT,
            execution_id=record.id,
        )
    assert world.roles.denials == [("mallory", DenialReason.ACTOR_MISMATCH)]
    assert world.lifecycle.executions[record.id].status is ExecutionStatus.PENDING
    assert world.scripted.calls == []


async def test_a_background_execution_is_not_run_through_run_immediate(world: World) -> None:
    record, _ = await world.queued("ok")
    with pytest.raises(FailedPreconditionError, match="background"):
        await immediate(world).run(ALICE, tenant_id=TENANT, execution_id=record.id)
    assert world.lifecycle.executions[record.id].status is ExecutionStatus.QUEUED
    assert world.scripted.calls == []
