"""Priority order end to end: one worker process taking one job at a time starts 300 queued jobs
in priority order (0 before 50 before 100), first in first out within each priority.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from opsc_test_actions import read_ledger

from opsconductor.lifecycle.storage.flags import SYSTEM_TENANT

from .conftest import Tenant, running_stack
from .inspection import wait_until
from .plans import plan, probe_step
from .stack import Stack

JOBS = 300
PRIORITIES = (0, 50, 100)


@pytest.fixture(scope="module")
async def stack(e2e_dsn: str, e2e_pool: asyncpg.Pool, redis_url: str) -> AsyncIterator[Stack]:
    """A real Redis and ONE worker that runs one background job at a time."""
    async with running_stack(e2e_dsn, redis_url, OPSC_CONSUMER_CONCURRENCY="1") as running:
        yield running


async def test_300_jobs_start_in_priority_order_and_fifo_within_a_priority(
    tenant: Tenant, ledger: Path, stack: Stack, e2e_pool: asyncpg.Pool
) -> None:
    """Submitted one by one with mixed priorities while dispatch is drained, then released: the
    executions' ``started_at`` (and the probe ledger's start times) follow (priority, submit
    order) exactly."""
    system = Tenant(id=SYSTEM_TENANT, stack=stack, pool=e2e_pool)
    await system.bind("root", "admin")
    await tenant.bind("alice", "responder")  # priority 0 needs executions:urgent
    rng = random.Random(20240611)
    priorities = [rng.choice(PRIORITIES) for _ in range(JOBS)]
    assert set(priorities) == set(PRIORITIES)
    async with system.client("root") as root, tenant.client("alice") as alice:
        assert await root.set_drain(True)
        try:
            submitted = []
            for index, priority in enumerate(priorities):
                queued = await alice.submit(
                    plan(
                        probe_step("probe", ["db:prio"], ledger, estimate_ms=11_000),
                        sla="medium",
                        name=f"prio-{index:03d}-p{priority}",
                    ),
                    tenant_id=tenant.id,
                    priority=priority,
                )
                assert (queued.status, queued.execution_mode) == ("queued", "background")
                submitted.append(queued.execution_id)
            stats = await root.get_queue_stats()
            assert stats.ready_by_priority == {p: priorities.count(p) for p in PRIORITIES}
        finally:
            await root.set_drain(False)

        async def all_succeeded() -> bool:
            count = await e2e_pool.fetchval(
                "SELECT count(*) FROM executions WHERE tenant_id = $1 AND status = 'succeeded'",
                tenant.id,
            )
            return bool(count == JOBS)

        await wait_until(all_succeeded, within_s=180, what="all 300 jobs", interval_s=0.5)

    expected = [
        execution_id
        for _, _, execution_id in sorted(
            (priority, index, execution_id)
            for index, (priority, execution_id) in enumerate(
                zip(priorities, submitted, strict=True)
            )
        )
    ]
    rows = await e2e_pool.fetch(
        "SELECT id::text AS id, started_at FROM executions WHERE tenant_id = $1 "
        "ORDER BY started_at, id",
        tenant.id,
    )
    assert len({row["started_at"] for row in rows}) == JOBS, "two jobs started at once"
    assert [row["id"] for row in rows] == expected
    by_start = sorted(read_ledger(ledger), key=lambda line: line["start_ns"])
    assert [line["execution_id"] for line in by_start] == expected
