"""Secrets: resolved just in time in the worker, never persisted, logged or returned.

The worker runs with ``OPSC_SECRET_<NS>__E2E_DB_PASSWORD`` set to a planted value in the
namespace of ``SECRET_TENANT``, whose catalogue entry lets the probe action use it; a plan of
that tenant refers to it as ``{"$secret": "env:E2E_DB_PASSWORD"}``. The probe action receives
the resolved value (the ledger records its sha256 and that the masker knew it) and logs and
echoes it, so the masking at every sink is exercised. Besides the checks here, every e2e module
of this issue scans its whole database and every service log for the value when it ends
(``module_end_checks``).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from opsc_test_actions import read_ledger

from opsconductor.client import Execution
from opsconductor.common.masking import REDACTED

from . import inspection
from .conftest import PLANTED_SECRET, SECRET_TENANT, Tenant, bound_tenant
from .inspection import assert_secret_nowhere, database_text, secret_fragments
from .plans import plan, probe_step
from .stack import Stack

module_end_checks = inspection.module_end_checks
pytestmark = pytest.mark.usefixtures("module_end_checks")

SECRET_REF = {"$secret": "env:E2E_DB_PASSWORD"}


@pytest.fixture
async def tenant(stack: Stack, e2e_pool: asyncpg.Pool) -> Tenant:
    """The tenant that has the planted secret in its namespace and catalogue."""
    return await bound_tenant(SECRET_TENANT, stack, e2e_pool)


def secret_plan(ledger: Path, **params: Any) -> dict[str, Any]:
    return plan(probe_step("use-secret", ["db:primary"], ledger, emit=SECRET_REF, **params))


def assert_not_in_execution(execution: Execution) -> None:
    text = repr(asdict(execution))
    for fragment in secret_fragments():
        assert fragment not in text, "the secret came back to the caller"


async def test_secret_reference_is_resolved_for_the_action_and_never_returned(
    tenant: Tenant, ledger: Path
) -> None:
    """The step receives the real secret value (sha256 matches, the masker knew it), while the
    execution and steps returned by submit and get carry only the redaction marker."""
    async with tenant.client("alice") as client:
        done = await client.submit(secret_plan(ledger), tenant_id=tenant.id)
        fetched = await client.get(done.execution_id, tenant_id=tenant.id)
    assert done.status == "succeeded", (done.error_class, done.error_message)
    [line] = read_ledger(ledger)
    assert line["secret_seen"] is True
    assert line["emit_sha256"] == hashlib.sha256(PLANTED_SECRET.encode()).hexdigest()
    for execution in (done, fetched):
        assert_not_in_execution(execution)
        result = execution.steps[0].result
        assert result is not None
        assert result["emit"] == REDACTED


async def test_secret_stays_out_of_failures_too(tenant: Tenant, ledger: Path) -> None:
    """A step that fails after receiving the secret: the failure's message, error class and
    step output returned to the caller do not contain it either."""
    async with tenant.client("alice") as client:
        done = await client.submit(secret_plan(ledger, fail=True), tenant_id=tenant.id)
    assert done.status == "failed"
    assert done.steps[0].status == "failed"
    assert_not_in_execution(done)
    [line] = read_ledger(ledger)
    assert (line["outcome"], line["secret_seen"]) == ("failed", True)


async def test_secret_value_is_in_no_table_and_no_log_line(
    tenant: Tenant, ledger: Path, stack: Stack, e2e_pool: asyncpg.Pool
) -> None:
    """After runs that used the secret, every row of every table and every service log line so
    far is free of it — while the dump does hold the plan's secret *reference* and the worker
    did log the probe's (masked) use of it, so the scan looks where a leak would be."""
    async with tenant.client("alice") as client:
        done = await client.submit(secret_plan(ledger, hold_s=0.05), tenant_id=tenant.id)
    assert done.status == "succeeded"
    assert read_ledger(ledger)[0]["secret_seen"] is True

    dump = await database_text(e2e_pool)
    assert "env:E2E_DB_PASSWORD" in dump, "plan snapshots are missing from the dump"
    assert done.execution_id in dump
    emitted = [line for line in stack.logs().splitlines() if '"probe_emitted"' in line]
    assert emitted, "the worker never logged the probe's use of the secret"
    assert all(REDACTED in line for line in emitted)
    await assert_secret_nowhere(stack, e2e_pool)


async def test_the_scan_fails_when_the_value_is_in_a_table(
    tenant: Tenant, stack: Stack, e2e_pool: asyncpg.Pool
) -> None:
    """Control for the scan itself: with the value planted in an event row it fails, naming
    Postgres (the row is deleted again, so the module's final scan stays meaningful)."""
    row_id = await e2e_pool.fetchval(
        "INSERT INTO execution_events (tenant_id, type, payload) VALUES ($1, 'scan_control', $2) "
        "RETURNING id",
        tenant.id,
        {"note": f"value {PLANTED_SECRET} planted by the test"},
    )
    try:
        with pytest.raises(AssertionError, match="written to Postgres"):
            await assert_secret_nowhere(stack, e2e_pool)
    finally:
        await e2e_pool.execute("DELETE FROM execution_events WHERE id = $1", row_id)
    await assert_secret_nowhere(stack, e2e_pool)
