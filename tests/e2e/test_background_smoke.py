"""The background path end to end: api -> Postgres + Redis -> worker -> Postgres."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from uuid import UUID

import asyncpg
import pytest
from opsc_test_actions import read_ledger

from opsconductor.client import Execution, ExecutionClient

from .background import open_queue
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


async def test_cancelling_a_queued_job_takes_it_out_of_the_queue(
    tenant: Tenant, ledger: Path, e2e_pool: asyncpg.Pool
) -> None:
    """Cancelling a queued background execution ends it ``cancelled`` at once (steps skipped,
    ``cancelled_by`` set) and removes its job from Redis and ``execution_queue``: no worker ever
    runs it, even after dispatch resumes."""
    async with open_queue(tenant.stack) as queue:
        await queue.set_paused(True)
        try:
            async with tenant.client("alice") as client:
                queued = await client.submit(
                    plan(probe_step("s1", ["web-09"], ledger, estimate_ms=60_000), sla="medium"),
                    tenant_id=tenant.id,
                )
                assert queued.status == "queued"
                assert queued.job_id is not None
                assert await queue.exists(queued.job_id)
                cancelled = await client.cancel(
                    queued.execution_id, tenant_id=tenant.id, reason="not needed any more"
                )
                assert cancelled.status == "cancelled"
                assert cancelled.cancelled_by == "alice"
                assert [s.status for s in cancelled.steps] == ["skipped"]
                assert not await queue.exists(queued.job_id)
                rows = await e2e_pool.fetchval(
                    "SELECT count(*) FROM execution_queue WHERE execution_id = $1",
                    UUID(queued.execution_id),
                )
                assert rows == 0
        finally:
            await queue.set_paused(False)
        # Dispatch resumed: give a worker the chance to (wrongly) run it, then check it did not.
        async with tenant.client("alice") as client:
            other = await client.submit(
                plan(probe_step("s1", ["web-10"], ledger, estimate_ms=60_000), sla="medium"),
                tenant_id=tenant.id,
            )
            assert (await wait_terminal(client, other, 30)).status == "succeeded"
    assert [line["execution_id"] for line in read_ledger(ledger)] == [other.execution_id]
