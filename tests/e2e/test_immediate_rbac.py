"""Authentication and both RBAC tiers (spec §3.3), end to end.

The api checks every call; the worker checks again against Postgres and trusts nothing in the
request, which the forged-request test proves by calling ``WorkerService`` directly. Every
refusal is ``PERMISSION_DENIED`` (a ``PermissionError`` in the client) and leaves an
``rbac_violation`` event filed under the tenant that was targeted.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import grpc.aio
import pytest
from opsc_test_actions import read_ledger
from pydantic import SecretStr

from opsconductor.client import (
    AuthenticationError,
    ExecutionClient,
    ExecutionContext,
    NotFoundError,
    PermissionDeniedError,
    map_rpc_error,
)
from opsconductor.common.auth import issue_token
from opsconductor.execution.v1 import worker_service_pb2, worker_service_pb2_grpc
from opsconductor.lifecycle.storage.execution_reads import get_execution
from opsconductor.lifecycle.storage.execution_records import ExecutionRecord
from opsconductor.lifecycle.storage.executions import NewExecution, create_execution
from opsconductor.lifecycle.storage.role_bindings import unbind_role

from . import inspection
from .conftest import Tenant, token
from .inspection import new_tenant, rbac_violations, tenant_row_counts
from .plans import plan, probe_step
from .stack import AUDIENCE, HS256_KEY, Stack

module_end_checks = inspection.module_end_checks
pytestmark = pytest.mark.usefixtures("module_end_checks")


def create_plan(ledger: Path) -> dict[str, Any]:
    return plan(probe_step("check", ["srv-1"], ledger))


async def run_immediate(
    stack: Stack, bearer: str | None, *, tenant_id: str, execution_id: str
) -> None:
    """Call ``WorkerService.RunImmediate`` directly, as a forger would; raise the client's error."""
    metadata = () if bearer is None else (("authorization", f"Bearer {bearer}"),)
    async with grpc.aio.insecure_channel(stack.address("worker")) as channel:
        stub = worker_service_pb2_grpc.WorkerServiceStub(channel)
        request = worker_service_pb2.RunImmediateRequest(
            tenant_id=tenant_id, execution_id=execution_id
        )
        try:
            await stub.RunImmediate(request, metadata=metadata, timeout=30)
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc) from exc


async def test_spec_3_3_forged_request_to_the_worker_is_refused_and_audited(
    tenant: Tenant, ledger: Path, stack: Stack, e2e_pool: asyncpg.Pool
) -> None:
    """§3.3: an actor of tenant A (attacker) sends RunImmediate straight to the worker for an
    execution of tenant B (victim), naming either tenant: the worker refuses with a
    PermissionError before touching it, and files rbac_violation events (tier worker) under B."""
    victim = tenant
    attacker_tenant = await new_tenant(stack, e2e_pool)
    await attacker_tenant.bind("attacker", "operator")
    async with victim.client("alice") as client:
        done = await client.submit(create_plan(ledger), tenant_id=victim.id)
    assert done.status == "succeeded"
    forged_token = token("attacker", attacker_tenant.id)

    for named_tenant in (victim.id, attacker_tenant.id):
        # Worker should reject (defense in depth)
        with pytest.raises(PermissionError) as denied:
            await run_immediate(
                stack, forged_token, tenant_id=named_tenant, execution_id=done.execution_id
            )
        assert isinstance(denied.value, PermissionDeniedError)

    # Verify rbac_violation events logged, under the victim's tenant
    events = await rbac_violations(e2e_pool, victim.id, "attacker")
    assert len(events) == 2
    for event in events:
        assert event["tier"] == "worker"
        assert event["reason"] == "TENANT_MISMATCH"
        assert event["actor_tenant"] == attacker_tenant.id
        assert event["resource"] == "WorkerService/RunImmediate"
        assert event["execution_id"] == done.execution_id
        assert str(event["linked_execution_id"]) == done.execution_id
    assert await rbac_violations(e2e_pool, attacker_tenant.id, "attacker") == []

    async with victim.client("alice") as client:
        after = await client.get(done.execution_id, tenant_id=victim.id)
    assert (after.status, after.last_transition_at) == (done.status, done.last_transition_at)
    assert len(read_ledger(ledger)) == 1, "the forged request ran the plan again"


async def test_worker_refuses_run_immediate_from_anyone_but_the_submitter(
    tenant: Tenant, ledger: Path, stack: Stack, e2e_pool: asyncpg.Pool
) -> None:
    """Inside the tenant too, the worker trusts no caller: a viewer, a principal without any
    role and another operator are each refused (audited with tier worker); nothing runs."""
    await tenant.bind("olga", "operator")
    async with tenant.client("alice") as client:
        done = await client.submit(create_plan(ledger), tenant_id=tenant.id)
    expected = {"vera": "MISSING_PERMISSION", "nobody": "NO_ROLE_BINDING", "olga": "ACTOR_MISMATCH"}
    for actor, reason in expected.items():
        with pytest.raises(PermissionDeniedError):
            await run_immediate(
                stack,
                token(actor, tenant.id),
                tenant_id=tenant.id,
                execution_id=done.execution_id,
            )
        events = await rbac_violations(e2e_pool, tenant.id, actor)
        assert [(e["tier"], e["reason"]) for e in events] == [("worker", reason)]
    assert len(read_ledger(ledger)) == 1


async def pending_copy(pool: asyncpg.Pool, record: ExecutionRecord) -> UUID:
    """A pending immediate execution of the same plan and submitter, as the api creates one."""
    new = NewExecution(
        tenant_id=record.tenant_id,
        actor_id=record.actor_id,
        request_id=None,
        idempotency_key=secrets.token_hex(32),
        plan_hash=record.plan_hash,
        plan_snapshot=record.plan_snapshot,
        plan_snapshot_hash=record.plan_snapshot_hash,
        execution_mode="immediate",
        sla_class=record.sla_class,
        action_class=record.action_class,
        approval_level=0,
        priority=record.priority,
        timeout_policy_id=record.timeout_policy_id,
        timeout_ms=record.timeout_ms,
        estimated_duration_ms=record.estimated_duration_ms,
        record_only=record.record_only,
        steps=[(s.step_id, s.position, s.action, s.action_class) for s in record.steps],
    )
    created, _ = await create_execution(pool, new, dedup_window=timedelta(hours=1))
    return created.id


async def test_the_worker_refuses_a_revoked_binding_within_a_second(
    tenant: Tenant, ledger: Path, stack: Stack, e2e_pool: asyncpg.Pool
) -> None:
    """Both tiers cache roles (under a second, dropped on any change of role_bindings): alice
    runs a plan, so each holds her roles; she loses her role, and within a second RunImmediate
    straight to the worker (no api in front to catch it) refuses her executions."""
    async with tenant.client("alice") as client:
        done = await client.submit(create_plan(ledger), tenant_id=tenant.id)
    first = await get_execution(e2e_pool, tenant.id, done.execution_id)
    pending = [await pending_copy(e2e_pool, first) for _ in range(10)]
    await unbind_role(e2e_pool, tenant.id, "alice", "operator")
    revoked = time.monotonic()
    bearer = token("alice", tenant.id)
    for execution_id in pending:
        try:
            await run_immediate(stack, bearer, tenant_id=tenant.id, execution_id=str(execution_id))
        except PermissionDeniedError:
            break
        assert time.monotonic() - revoked < 1.0, "the worker still ran them a second later"
    else:
        raise AssertionError("the worker never refused the revoked submitter")
    assert time.monotonic() - revoked < 1.0
    events = await rbac_violations(e2e_pool, tenant.id, "alice")
    assert [(e["tier"], e["reason"]) for e in events] == [("worker", "NO_ROLE_BINDING")]
    # The api's cache dropped her roles too: a submit is refused at the front door.
    async with tenant.client("alice") as client:
        with pytest.raises(PermissionDeniedError):
            await client.submit(create_plan(ledger), tenant_id=tenant.id)


async def test_api_refuses_and_audits_every_cross_tenant_call(
    tenant: Tenant, ledger: Path, stack: Stack, e2e_pool: asyncpg.Pool
) -> None:
    """An operator of tenant A asking the api for anything of tenant B — submit, get, list,
    cancel — gets PERMISSION_DENIED, each refusal is an rbac_violation (tier api) under B, and
    nothing of B changes. Naming its own tenant with B's execution id finds nothing."""
    victim = tenant
    other = await new_tenant(stack, e2e_pool)
    async with victim.client("alice") as client:
        done = await client.submit(create_plan(ledger), tenant_id=victim.id)
    before = await tenant_row_counts(e2e_pool, victim.id)
    calls: dict[str, Callable[[ExecutionClient], Awaitable[object]]] = {
        "SubmitExecution": lambda c: c.submit(create_plan(ledger), tenant_id=victim.id),
        "GetExecution": lambda c: c.get(done.execution_id, tenant_id=victim.id),
        "ListExecutions": lambda c: c.list_executions(tenant_id=victim.id),
        "CancelExecution": lambda c: c.cancel(done.execution_id, tenant_id=victim.id),
    }
    async with other.client("alice") as intruder:
        for call in calls.values():
            with pytest.raises(PermissionError):
                await call(intruder)
        # Naming its own tenant with B's execution id: B's execution does not exist there.
        with pytest.raises(NotFoundError):
            await intruder.get(done.execution_id, tenant_id=other.id)
        with pytest.raises(NotFoundError):
            await intruder.cancel(done.execution_id, tenant_id=other.id)

    events = await rbac_violations(e2e_pool, victim.id, "alice")
    assert [e["resource"] for e in events] == [f"ExecutionService/{name}" for name in calls]
    for event in events:
        assert (event["tier"], event["reason"]) == ("api", "TENANT_MISMATCH")
        assert event["actor_tenant"] == other.id
    after = await tenant_row_counts(e2e_pool, victim.id)
    assert after == {**before, "execution_events": before["execution_events"] + len(calls)}
    assert await tenant_row_counts(e2e_pool, other.id) == dict.fromkeys(before, 0)
    async with victim.client("alice") as client:
        unchanged = await client.get(done.execution_id, tenant_id=victim.id)
    assert unchanged.status == "succeeded"
    assert unchanged.cancelled_by is None
    assert len(read_ledger(ledger)) == 1


class AnonymousClient(ExecutionClient):
    """A client whose calls carry no authorization metadata at all."""

    def _metadata(self, token: str | None = None) -> tuple[tuple[str, str], ...]:
        return ()


def _expired(tenant_id: str) -> str:
    return issue_token(
        actor_id="alice",
        tenant_id=tenant_id,
        audience=AUDIENCE,
        hs256_key=SecretStr(HS256_KEY),
        ttl=-timedelta(minutes=5),
    )


def _wrong_key(tenant_id: str) -> str:
    return issue_token(
        actor_id="alice",
        tenant_id=tenant_id,
        audience=AUDIENCE,
        hs256_key=SecretStr("not-the-e2e-signing-key-0123456789abcdef"),
    )


def _wrong_audience(tenant_id: str) -> str:
    return issue_token(
        actor_id="alice",
        tenant_id=tenant_id,
        audience="some-other-service",
        hs256_key=SecretStr(HS256_KEY),
    )


BAD_TOKENS: dict[str, Callable[[str], str | None]] = {
    "missing": lambda _tenant: None,
    "empty": lambda _tenant: "",
    "garbage": lambda _tenant: "not.a.jwt",
    "expired": _expired,
    "wrong_key": _wrong_key,
    "wrong_audience": _wrong_audience,
}


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
async def test_every_rpc_refuses_a_missing_expired_or_badly_signed_token(
    kind: str, tenant: Tenant, ledger: Path, stack: Stack, e2e_pool: asyncpg.Pool
) -> None:
    """UNAUTHENTICATED (AuthenticationError) on every ExecutionService RPC and on the worker's
    RunImmediate, for a missing, empty, malformed, expired, wrongly signed or wrong-audience
    token; nothing is written, not even an audit event."""
    async with tenant.client("alice") as client:
        done = await client.submit(create_plan(ledger), tenant_id=tenant.id)
    before = await tenant_row_counts(e2e_pool, tenant.id)
    bearer = BAD_TOKENS[kind](tenant.id)
    eid, tid = done.execution_id, tenant.id
    calls: dict[str, Callable[[ExecutionClient], Awaitable[object]]] = {
        "submit": lambda c: c.submit(create_plan(ledger), tenant_id=tid),
        "execute": lambda c: c.execute(create_plan(ledger), ExecutionContext(tenant_id=tid)),
        "get": lambda c: c.get(eid, tenant_id=tid),
        "list": lambda c: c.list_executions(tenant_id=tid),
        "cancel": lambda c: c.cancel(eid, tenant_id=tid),
        "preview": lambda c: c.preview(create_plan(ledger), tenant_id=tid),
    }
    unauthenticated = (
        AnonymousClient(stack.address("api"), "")
        if bearer is None
        else ExecutionClient(stack.address("api"), bearer)
    )
    async with unauthenticated:
        for call in calls.values():
            with pytest.raises(AuthenticationError):
                await call(unauthenticated)
    with pytest.raises(AuthenticationError):
        await run_immediate(stack, bearer, tenant_id=tid, execution_id=eid)
    assert await tenant_row_counts(e2e_pool, tenant.id) == before
    assert len(read_ledger(ledger)) == 1


async def test_viewer_cannot_submit_but_can_read(
    tenant: Tenant, ledger: Path, e2e_pool: asyncpg.Pool
) -> None:
    """vera (viewer) is refused on submit with PERMISSION_DENIED, audited as MISSING_PERMISSION
    with nothing else written and nothing run; she can get and list alice's executions."""
    async with tenant.client("alice") as client:
        done = await client.submit(create_plan(ledger), tenant_id=tenant.id)
    before = await tenant_row_counts(e2e_pool, tenant.id)
    async with tenant.client("vera") as viewer:
        with pytest.raises(PermissionDeniedError):
            await viewer.submit(create_plan(ledger), tenant_id=tenant.id)
        with pytest.raises(PermissionDeniedError):
            await viewer.cancel(done.execution_id, tenant_id=tenant.id)
        fetched = await viewer.get(done.execution_id, tenant_id=tenant.id)
        listed, _ = await viewer.list_executions(tenant_id=tenant.id)
    events = await rbac_violations(e2e_pool, tenant.id, "vera")
    assert [(e["tier"], e["reason"], e["resource"]) for e in events] == [
        ("api", "MISSING_PERMISSION", "ExecutionService/SubmitExecution"),
        ("api", "MISSING_PERMISSION", "ExecutionService/CancelExecution"),
    ]
    assert "executions:submit" in events[0]["missing"]
    after = await tenant_row_counts(e2e_pool, tenant.id)
    assert after == {**before, "execution_events": before["execution_events"] + 2}
    assert len(read_ledger(ledger)) == 1
    assert fetched.execution_id == done.execution_id
    assert [s.step_id for s in fetched.steps] == ["check"]
    assert [e.execution_id for e in listed] == [done.execution_id]
