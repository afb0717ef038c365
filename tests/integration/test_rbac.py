"""RBAC against real Postgres: bindings decide, tenants are isolated, every denial is audited."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from opsconductor.common.auth import Principal
from opsconductor.common.errors import PermissionDeniedError, StorageError
from opsconductor.common.identifiers import audit_text
from opsconductor.devstack.pg_roundtrips import RoundTripCounter
from opsconductor.lifecycle.storage.audit import list_rbac_violations
from opsconductor.lifecycle.storage.db import create_pool
from opsconductor.lifecycle.storage.role_bindings import bind_role, load_roles, unbind_role
from opsconductor.policy.rbac import Authorizer, RbacPolicy, one_request, submit_permissions

TENANT_A = "tenant-a"
TENANT_B = "tenant-b"
MALLORY = Principal(actor_id="mallory", tenant_id=TENANT_A)


@pytest.fixture(scope="module")
def policy() -> RbacPolicy:
    return RbacPolicy.load()


@pytest.fixture
def api(db_pool: asyncpg.Pool, policy: RbacPolicy) -> Authorizer:
    return Authorizer(db_pool, policy, tier="api")


@pytest.fixture
def worker(db_pool: asyncpg.Pool, policy: RbacPolicy) -> Authorizer:
    return Authorizer(db_pool, policy, tier="worker")


async def _insert_execution(pool: asyncpg.Pool, tenant_id: str) -> uuid.UUID:
    execution_id: uuid.UUID = await pool.fetchval(
        """
        INSERT INTO executions (tenant_id, actor_id, idempotency_key, plan_hash, plan_snapshot,
                                plan_snapshot_hash, execution_mode, sla_class, action_class,
                                timeout_ms)
        VALUES ($1, 'owner', $2, $3, $4, $3, 'immediate', 'fast', 'read', 10000)
        RETURNING id
        """,
        tenant_id,
        uuid.uuid4().hex,
        "0" * 64,
        {"name": "p", "steps": []},
    )
    return execution_id


def _violations_count(tier: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "opsc_rbac_violations_total", {"tier": tier, "reason": reason}
    )
    return value or 0.0


async def _eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


async def _event_rows(pool: asyncpg.Pool) -> list[Any]:
    return list(
        await pool.fetch("SELECT * FROM execution_events WHERE type = 'rbac_violation' ORDER BY id")
    )


# --- allowed ------------------------------------------------------------------------------


async def test_bound_role_allows_its_permissions_and_records_nothing(
    db_pool: asyncpg.Pool, api: Authorizer
) -> None:
    alice = Principal("alice", TENANT_A)
    assert await bind_role(db_pool, TENANT_A, "alice", "operator", created_by="admin-1")
    before = _violations_count("api", "MISSING_PERMISSION")
    await api.authorize(alice, tenant_id=TENANT_A, permissions=submit_permissions("modify"))
    await api.authorize(alice, tenant_id=TENANT_A, permissions=["executions:read"])
    assert await api.roles_for(alice, TENANT_A) == {"operator"}
    assert await _event_rows(db_pool) == []
    assert _violations_count("api", "MISSING_PERMISSION") == before


async def test_permissions_of_all_bound_roles_combine(
    db_pool: asyncpg.Pool, api: Authorizer
) -> None:
    carol = Principal("carol", TENANT_A)
    await bind_role(db_pool, TENANT_A, "carol", "viewer")
    await bind_role(db_pool, TENANT_A, "carol", "approver")
    await api.authorize(
        carol, tenant_id=TENANT_A, permissions=["executions:read", "approvals:decide"]
    )


async def test_bind_and_unbind_report_whether_anything_changed(db_pool: asyncpg.Pool) -> None:
    assert await bind_role(db_pool, TENANT_A, "dave", "viewer")
    assert not await bind_role(db_pool, TENANT_A, "dave", "viewer")
    row = await db_pool.fetchrow(
        "SELECT created_by FROM role_bindings WHERE tenant_id = $1 AND principal = 'dave'",
        TENANT_A,
    )
    assert row["created_by"] == "system"
    assert await load_roles(db_pool, TENANT_A, "dave") == {"viewer"}
    assert await unbind_role(db_pool, TENANT_A, "dave", "viewer")
    assert not await unbind_role(db_pool, TENANT_A, "dave", "viewer")
    assert await load_roles(db_pool, TENANT_A, "dave") == frozenset()
    with pytest.raises(ValueError, match="role must not be empty"):
        await bind_role(db_pool, TENANT_A, "dave", "")


# --- denied within the tenant -------------------------------------------------------------


async def test_principal_without_binding_is_denied_and_audited(
    db_pool: asyncpg.Pool, api: Authorizer
) -> None:
    bob = Principal("bob", TENANT_A)
    before = _violations_count("api", "NO_ROLE_BINDING")
    with pytest.raises(PermissionDeniedError) as info:
        await api.authorize(
            bob,
            tenant_id=TENANT_A,
            permissions=["executions:read"],
            resource="ExecutionService/ListExecutions",
        )
    assert "has no role in tenant 'tenant-a'" in str(info.value)
    assert "executions:read" in str(info.value)
    assert info.value.details["denial_reason"] == "NO_ROLE_BINDING"
    assert isinstance(info.value, PermissionError)
    [violation] = await list_rbac_violations(db_pool, TENANT_A, actor_id="bob")
    assert violation.reason == "NO_ROLE_BINDING"
    assert violation.tier == "api"
    assert violation.missing == ("executions:read",)
    assert violation.payload["resource"] == "ExecutionService/ListExecutions"
    assert _violations_count("api", "NO_ROLE_BINDING") == before + 1


async def test_role_lacking_a_permission_is_denied_naming_what_is_missing(
    db_pool: asyncpg.Pool, worker: Authorizer
) -> None:
    """An operator may not run a deploy plan; the refusal names the missing permission."""
    await bind_role(db_pool, TENANT_A, "olga", "operator")
    olga = Principal("olga", TENANT_A)
    with pytest.raises(PermissionDeniedError) as info:
        await worker.authorize(olga, tenant_id=TENANT_A, permissions=submit_permissions("deploy"))
    assert "lacks actions:deploy in tenant 'tenant-a' (roles: operator)" in str(info.value)
    [violation] = await list_rbac_violations(db_pool, TENANT_A, actor_id="olga")
    assert violation.reason == "MISSING_PERMISSION"
    assert violation.tier == "worker"
    assert violation.missing == ("actions:deploy",)
    assert violation.payload["permissions"] == ["actions:deploy", "executions:submit"]


async def test_revoked_role_no_longer_allows(db_pool: asyncpg.Pool, api: Authorizer) -> None:
    """Roles are read from Postgres on every check, so a revocation takes effect at once."""
    erin = Principal("erin", TENANT_A)
    await bind_role(db_pool, TENANT_A, "erin", "viewer")
    await api.authorize(erin, tenant_id=TENANT_A, permissions=["events:read"])
    await unbind_role(db_pool, TENANT_A, "erin", "viewer")
    with pytest.raises(PermissionDeniedError):
        await api.authorize(erin, tenant_id=TENANT_A, permissions=["events:read"])


async def test_role_unknown_to_the_policy_grants_nothing_and_is_logged(
    db_pool: asyncpg.Pool, api: Authorizer
) -> None:
    await bind_role(db_pool, TENANT_A, "frank", "superuser")
    with capture_logs() as logs, pytest.raises(PermissionDeniedError) as info:
        await api.authorize(
            Principal("frank", TENANT_A), tenant_id=TENANT_A, permissions=["events:read"]
        )
    assert info.value.details["denial_reason"] == "MISSING_PERMISSION"
    assert any(e["event"] == "rbac_unknown_role" and e["roles"] == ["superuser"] for e in logs)


# --- cross-tenant -------------------------------------------------------------------------


async def test_cross_tenant_request_is_denied_and_filed_under_the_target_tenant(
    db_pool: asyncpg.Pool, api: Authorizer
) -> None:
    """Even an admin binding in the victim tenant does not help a token issued for another."""
    await bind_role(db_pool, TENANT_A, "mallory", "admin")
    await bind_role(db_pool, TENANT_B, "mallory", "admin")
    victim_execution = await _insert_execution(db_pool, TENANT_B)
    before = _violations_count("api", "TENANT_MISMATCH")

    with capture_logs() as logs, pytest.raises(PermissionDeniedError) as info:
        await api.authorize(
            MALLORY,
            tenant_id=TENANT_B,
            permissions=["executions:cancel"],
            execution_id=victim_execution,
            resource="ExecutionService/CancelExecution",
        )

    assert info.value.details["denial_reason"] == "TENANT_MISMATCH"
    # Tenant-neutral: the caller learns nothing about the tenant it aimed at.
    assert "authenticated for tenant 'tenant-a' and may act only in that tenant" in str(info.value)
    assert TENANT_B not in str(info.value)
    assert "tenant_id" not in info.value.details
    assert _violations_count("api", "TENANT_MISMATCH") == before + 1

    # The victim tenant's SOC sees it, by tenant and by actor; the attacker's tenant does not.
    by_tenant = await list_rbac_violations(db_pool, TENANT_B)
    by_actor = await list_rbac_violations(db_pool, TENANT_B, actor_id="mallory")
    assert by_tenant == by_actor
    [violation] = by_actor
    assert violation.tenant_id == TENANT_B
    assert violation.actor_id == "mallory"
    assert violation.actor_tenant == TENANT_A
    assert violation.execution_id == victim_execution
    assert violation.payload["requested_tenant"] == TENANT_B
    assert violation.payload["execution_id"] == str(victim_execution)
    assert violation.payload["resource"] == "ExecutionService/CancelExecution"
    assert violation.missing == ("executions:cancel",)
    assert await list_rbac_violations(db_pool, TENANT_A) == []
    assert await list_rbac_violations(db_pool, TENANT_B, actor_id="someone-else") == []

    # The event took the next place in the victim execution's event sequence.
    seq = await db_pool.fetchval(
        "SELECT seq FROM execution_events WHERE id = $1", violation.event_id
    )
    assert seq == 1

    [line] = [entry for entry in logs if entry["event"] == "rbac_violation"]
    assert line["log_level"] == "warning"
    assert line["actor_id"] == "mallory"
    assert line["actor_tenant"] == TENANT_A
    assert line["requested_tenant"] == TENANT_B
    assert line["reason"] == "TENANT_MISMATCH"
    assert line["tier"] == "api"
    assert line["missing"] == ["executions:cancel"]
    assert line["execution_id"] == str(victim_execution)


async def test_probe_for_an_execution_of_another_tenant_is_recorded_unlinked(
    db_pool: asyncpg.Pool, worker: Authorizer
) -> None:
    """An id that does not belong to the targeted tenant is kept in the payload, not linked."""
    own_execution = await _insert_execution(db_pool, TENANT_A)
    with pytest.raises(PermissionDeniedError):
        await worker.authorize(
            MALLORY,
            tenant_id=TENANT_B,
            permissions=["executions:read"],
            execution_id=own_execution,
        )
    [violation] = await list_rbac_violations(db_pool, TENANT_B, actor_id="mallory")
    assert violation.execution_id is None
    assert violation.payload["execution_id"] == str(own_execution)
    assert violation.tier == "worker"
    assert (
        await db_pool.fetchval("SELECT event_seq FROM executions WHERE id = $1", own_execution) == 0
    )


async def test_violation_survives_the_callers_rollback(
    db_pool: asyncpg.Pool, api: Authorizer
) -> None:
    async with db_pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.execute(
            "INSERT INTO role_bindings (tenant_id, principal, role) VALUES ($1, 'tmp', 'viewer')",
            TENANT_B,
        )
        with pytest.raises(PermissionDeniedError):
            await api.authorize(MALLORY, tenant_id=TENANT_B, permissions=["executions:submit"])
        await tx.rollback()
    assert await load_roles(db_pool, TENANT_B, "tmp") == frozenset()
    assert len(await list_rbac_violations(db_pool, TENANT_B, actor_id="mallory")) == 1


async def test_denial_while_the_caller_locks_the_execution_still_records_and_returns(
    db_pool: asyncpg.Pool, worker: Authorizer
) -> None:
    """A caller holding the execution row cannot deadlock the audit write: it is filed unlinked."""
    execution_id = await _insert_execution(db_pool, TENANT_B)
    async with db_pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM executions WHERE id = $1 FOR UPDATE", execution_id)
        with pytest.raises(PermissionDeniedError):
            await asyncio.wait_for(
                worker.authorize(
                    MALLORY,
                    tenant_id=TENANT_B,
                    permissions=["executions:read"],
                    execution_id=execution_id,
                ),
                timeout=10,
            )
    [violation] = await list_rbac_violations(db_pool, TENANT_B)
    assert violation.execution_id is None
    assert violation.payload["execution_id"] == str(execution_id)


async def test_cancelled_caller_does_not_erase_the_audit_record(
    db_pool: asyncpg.Pool, api: Authorizer
) -> None:
    """A client hanging up mid-denial still leaves the rbac_violation event behind."""
    execution_id = await _insert_execution(db_pool, TENANT_B)
    holder = await db_pool.acquire()
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM executions WHERE id = $1 FOR UPDATE", execution_id)
        task = asyncio.create_task(
            api.authorize(
                MALLORY,
                tenant_id=TENANT_B,
                permissions=["executions:read"],
                execution_id=execution_id,
            )
        )

        async def audit_write_is_waiting() -> bool:
            waiting = await db_pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND query LIKE '%SET event_seq = event_seq + 1%'"
            )
            return bool(waiting)

        await _eventually(audit_write_is_waiting)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await tx.rollback()
    finally:
        await db_pool.release(holder)

    async def recorded() -> bool:
        return len(await list_rbac_violations(db_pool, TENANT_B)) == 1

    await _eventually(recorded)
    [violation] = await list_rbac_violations(db_pool, TENANT_B)
    assert violation.execution_id == execution_id


async def test_fifty_concurrent_denials_are_fifty_events(
    db_pool: asyncpg.Pool, api: Authorizer
) -> None:
    execution_id = await _insert_execution(db_pool, TENANT_B)
    before = _violations_count("api", "TENANT_MISMATCH")
    results = await asyncio.gather(
        *(
            api.authorize(
                Principal(f"attacker-{i}", TENANT_A),
                tenant_id=TENANT_B,
                permissions=["executions:read"],
                execution_id=execution_id,
            )
            for i in range(50)
        ),
        return_exceptions=True,
    )
    assert all(isinstance(result, PermissionDeniedError) for result in results), results
    violations = await list_rbac_violations(db_pool, TENANT_B, limit=1000)
    assert len(violations) == 50
    assert {v.actor_id for v in violations} == {f"attacker-{i}" for i in range(50)}
    assert _violations_count("api", "TENANT_MISMATCH") == before + 50
    linked_seqs = [
        row["seq"]
        for row in await db_pool.fetch(
            "SELECT seq FROM execution_events WHERE execution_id = $1", execution_id
        )
    ]
    # Events linked to the execution got distinct, gap-free sequence numbers despite the race
    # (any that waited past the lock timeout were filed unlinked, still counted above).
    assert linked_seqs
    assert sorted(linked_seqs) == list(range(1, len(linked_seqs) + 1))


async def test_list_returns_newest_first_and_honours_the_limit(
    db_pool: asyncpg.Pool, api: Authorizer
) -> None:
    for i in range(3):
        with pytest.raises(PermissionDeniedError):
            await api.authorize(
                MALLORY, tenant_id=TENANT_B, permissions=["events:read"], resource=f"r{i}"
            )
    newest_two = await list_rbac_violations(db_pool, TENANT_B, limit=2)
    assert [v.payload["resource"] for v in newest_two] == ["r2", "r1"]
    with pytest.raises(ValueError, match="limit"):
        await list_rbac_violations(db_pool, TENANT_B, limit=0)


# --- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["t" * 150, "acme\x00", "\u202eacme"])
async def test_a_denial_aimed_at_an_unstorable_tenant_id_is_still_audited(
    db_pool: asyncpg.Pool, api: Authorizer, target: str
) -> None:
    """A tenant id no column can hold (too long, NUL, control characters) is denied and filed
    under its escaped, shortened form: every denial leaves its row."""
    with capture_logs() as logs, pytest.raises(PermissionDeniedError):
        await api.authorize(MALLORY, tenant_id=target, permissions=["executions:read"])
    assert not any(e["event"] == "rbac_violation_record_failed" for e in logs)
    rows = await db_pool.fetch(
        "SELECT tenant_id, payload FROM execution_events WHERE type = 'rbac_violation'"
    )
    assert len(rows) == 1
    filed = rows[0]["tenant_id"]
    assert len(filed) <= 100
    assert filed.isprintable()
    assert filed == audit_text(target)
    assert rows[0]["payload"]["requested_tenant"] == audit_text(target, 300)


async def test_database_failures_surface_as_storage_errors(db_dsn: str, policy: RbacPolicy) -> None:
    """Roles that cannot be read mean no decision: the check fails closed with StorageError."""
    from opsconductor.lifecycle.storage.db import create_pool

    pool = await create_pool(db_dsn, min_size=1, max_size=2)
    await pool.close()
    authorizer = Authorizer(pool, policy, tier="approvals")
    with pytest.raises(StorageError):
        await authorizer.authorize(
            Principal("alice", TENANT_A), tenant_id=TENANT_A, permissions=["approvals:decide"]
        )
    with pytest.raises(StorageError):
        await bind_role(pool, TENANT_A, "alice", "viewer")
    with pytest.raises(StorageError):
        await unbind_role(pool, TENANT_A, "alice", "viewer")
    with pytest.raises(StorageError):
        await list_rbac_violations(pool, TENANT_A)
    # A denial whose audit write cannot reach the database is still a denial.
    with capture_logs() as logs, pytest.raises(PermissionDeniedError):
        await authorizer.authorize(MALLORY, tenant_id=TENANT_B, permissions=["events:read"])
    assert any(e["event"] == "rbac_violation_record_failed" for e in logs)


async def test_one_request_reads_roles_once_and_the_next_request_sees_a_revocation(
    db_dsn: str, policy: RbacPolicy
) -> None:
    """Inside ``one_request`` each authorizer reads a principal's bindings once, however many
    checks it makes; the memo ends with the request, so the next request after a revocation is
    refused, and two authorizers (tiers) never share what they read."""
    alice = Principal(actor_id="alice", tenant_id=TENANT_A)
    needs = submit_permissions("read")
    async with RoundTripCounter.for_dsn(db_dsn) as counter:
        pool = await create_pool(counter.dsn(db_dsn), min_size=1, max_size=2)
        try:
            api = Authorizer(pool, policy, tier="api")
            worker = Authorizer(pool, policy, tier="worker")

            def reads() -> int:
                return sum("role_bindings" in rt.text for rt in counter.round_trips)

            await bind_role(pool, TENANT_A, "alice", "operator")
            before = reads()
            with one_request():
                for authorizer in (api, api, worker, worker):
                    await authorizer.authorize(alice, tenant_id=TENANT_A, permissions=needs)
            assert reads() - before == 2  # once per authorizer
            await unbind_role(pool, TENANT_A, "alice", "operator")
            with one_request(), pytest.raises(PermissionDeniedError):
                await worker.authorize(alice, tenant_id=TENANT_A, permissions=needs)
            # Outside a request nothing is remembered at all.
            await bind_role(pool, TENANT_A, "alice", "operator")
            await api.authorize(alice, tenant_id=TENANT_A, permissions=needs)
            await unbind_role(pool, TENANT_A, "alice", "operator")
            with pytest.raises(PermissionDeniedError):
                await api.authorize(alice, tenant_id=TENANT_A, permissions=needs)
            await api.flush_audit()
            await worker.flush_audit()
        finally:
            await pool.close()
