"""AdminService/VerifyAuditChain end to end: an execution run through the real api and worker has
an intact chain; edits made directly in Postgres are named at the right seq; only ``audit:read``
in the execution's tenant may ask, and another tenant's execution is not found."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from opsconductor.client import NotFoundError, PermissionDeniedError

from .conftest import Tenant
from .inspection import new_tenant
from .plans import plan, probe_step
from .stack import Stack


async def _finished(tenant: Tenant, ledger: Path) -> str:
    async with tenant.client("alice") as client:
        result = await client.submit(
            plan(probe_step("a", ["host:a"], ledger), probe_step("b", ["host:b"], ledger)),
            tenant_id=tenant.id,
        )
    assert result.status == "succeeded"
    return result.execution_id


async def test_a_finished_execution_verifies_and_edits_are_named_at_their_seq(
    tenant: Tenant, ledger: Path, e2e_pool: asyncpg.Pool
) -> None:
    execution_id = await _finished(tenant, ledger)
    async with tenant.client("ada") as auditor:
        verdict = await auditor.verify_audit_chain(execution_id, tenant_id=tenant.id)
        assert verdict.intact, verdict.detail
        assert verdict.events_checked == verdict.events_expected >= 4
        assert verdict.problem == ""
        assert verdict.broken_seq == 0
        assert len(verdict.head_hash) == 64

        await e2e_pool.execute(
            "UPDATE execution_events SET payload = '{}' WHERE execution_id = $1 AND seq = 2",
            execution_id,
        )
        altered = await auditor.verify_audit_chain(execution_id, tenant_id=tenant.id)
        assert (altered.intact, altered.problem, altered.broken_seq) == (False, "altered", 2)
        assert altered.events_checked == 1
        assert "event 2" in altered.detail

        await e2e_pool.execute(
            "DELETE FROM execution_events WHERE execution_id = $1 AND seq = 1", execution_id
        )
        missing = await auditor.verify_audit_chain(execution_id, tenant_id=tenant.id)
        assert (missing.problem, missing.broken_seq) == ("missing", 1)


async def test_only_audit_read_in_the_executions_tenant_may_verify(
    tenant: Tenant, ledger: Path, stack: Stack, e2e_pool: asyncpg.Pool
) -> None:
    execution_id = await _finished(tenant, ledger)
    other = await new_tenant(stack, e2e_pool)
    async with tenant.client("vera") as viewer:
        with pytest.raises(PermissionDeniedError):
            await viewer.verify_audit_chain(execution_id, tenant_id=tenant.id)
    async with other.client("ada") as foreign_admin:
        with pytest.raises(PermissionDeniedError):
            await foreign_admin.verify_audit_chain(execution_id, tenant_id=tenant.id)
        # Naming its own tenant: the other tenant's execution does not exist there.
        with pytest.raises(NotFoundError) as caught:
            await foreign_admin.verify_audit_chain(execution_id, tenant_id=other.id)
        assert tenant.id not in str(caught.value)
    async with tenant.client("ada") as auditor:
        with pytest.raises(NotFoundError):
            await auditor.verify_audit_chain("not-a-uuid", tenant_id=tenant.id)
