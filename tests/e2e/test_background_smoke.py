"""The background path end to end: api -> Postgres + Redis -> worker -> Postgres."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from opsc_test_actions import read_ledger

from opsconductor.client import Execution, ExecutionClient

from .conftest import Tenant, running_stack
from .plans import plan, probe_step
from .stack import Stack


@pytest.fixture(scope="module")
async def stack(e2e_dsn: str, e2e_pool: asyncpg.Pool, redis_url: str) -> AsyncIterator[Stack]:
    """This module's stack talks to a real Redis (under a key prefix of its own)."""
    async with running_stack(e2e_dsn, redis_url) as running:
        yield running


async def wait_terminal(
    client: ExecutionClient, execution: Execution, within_s: float
) -> Execution:
    deadline = time.monotonic() + within_s
    while True:
        current = await client.get(execution.execution_id, tenant_id=execution.tenant_id)
        if current.is_terminal or time.monotonic() > deadline:
            return current
        await asyncio.sleep(0.05)


async def test_long_plan_is_queued_then_run_by_a_worker(tenant: Tenant, ledger: Path) -> None:
    """Spec §2.2: a plan estimated above 10 s returns at once, queued with a job id, and a
    worker runs it to success."""
    long_plan = plan(
        probe_step("deploy", ["web-01"], ledger, hold_s=0.2, estimate_ms=60_000), sla="medium"
    )
    async with tenant.client("alice") as client:
        result = await client.submit(long_plan, tenant_id=tenant.id)
        assert result.execution_mode == "background"
        assert result.job_id is not None
        assert result.status == "queued"
        final = await wait_terminal(client, result, 30)
    assert final.status == "succeeded", (final.error_class, final.error_message)
    assert len(read_ledger(ledger)) == 1
