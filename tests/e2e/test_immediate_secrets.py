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
from opsc_test_actions.probe import echoes_of

from opsconductor.client import Execution
from opsconductor.common.masking import REDACTED

from . import inspection
from .conftest import FANCY_SECRET, PLANTED_SECRET, SECRET_TENANT, Tenant, bound_tenant
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


async def test_encoded_echoes_of_a_secret_are_masked_in_stored_results_and_logs(
    tenant: Tenant, ledger: Path, stack: Stack, e2e_pool: asyncpg.Pool
) -> None:
    """Issue 8, finding 4, through the real worker: the probe echoes a secret full of quotes,
    backslashes and non-ASCII JSON-escaped (also twice), URL-encoded, base64'd inside other
    bytes at every alignment and reversed, into its stored result and its log lines, and
    logs the UnicodeEncodeError encoding it raises. None of those echoes is stored, returned
    or logged; each stored echo holds the redaction marker instead."""
    fancy = {"$secret": "env:E2E_FANCY"}
    step = probe_step("echo", ["db:echo"], ledger, emit=fancy, emit_encoded=True)
    async with tenant.client("alice") as client:
        done = await client.submit(plan(step), tenant_id=tenant.id)
        fetched = await client.get(done.execution_id, tenant_id=tenant.id)
    assert done.status == "succeeded", (done.error_class, done.error_message)
    [line] = read_ledger(ledger)
    assert line["emit_sha256"] == hashlib.sha256(FANCY_SECRET.encode()).hexdigest()
    result = fetched.steps[0].result
    assert result is not None
    expected = echoes_of(FANCY_SECRET)
    assert set(result["echoes"]) == set(expected)
    for name, stored in result["echoes"].items():
        assert REDACTED in stored, name
        if name != "codec_error":
            assert stored != expected[name]
    assert "\\xe9" not in result["echoes"]["codec_error"]
    assert "codec can't encode character" in result["echoes"]["codec_error"]
    logged = [entry for entry in stack.logs().splitlines() if '"probe_echoes"' in entry]
    assert logged, "the worker never logged the probe's echoes"
    text = repr(asdict(done)) + repr(asdict(fetched)) + await database_text(e2e_pool)
    text += stack.logs()
    for name, echo in expected.items():
        if name != "codec_error":
            assert echo not in text, name
    assert "'\\xe9'" not in stack.logs()
