"""The immediate path end to end: api -> worker -> Postgres, with Redis unreachable."""

from __future__ import annotations

from pathlib import Path

from opsc_test_actions import read_ledger

from .conftest import Tenant
from .plans import create_simple_query_plan


async def test_simple_query_runs_immediately_and_returns_its_result(
    tenant: Tenant, ledger: Path
) -> None:
    """Spec §2.1: a short plan runs immediately and its result comes back synchronously."""
    async with tenant.client("alice") as client:
        result = await client.submit(create_simple_query_plan(ledger), tenant_id=tenant.id)
    assert result.execution_mode == "immediate"
    assert result.status == "succeeded", (result.error_class, result.error_message)
    assert result.duration_ms < 10_000
    assert [s.status for s in result.steps] == ["succeeded"]
    assert len(read_ledger(ledger)) == 1
