"""Redis outages on the background path, against a Redis server this module starts and kills.

Redis is only the dispatch index; Postgres (``execution_queue``) is the truth. So a Redis that
comes back empty loses no job — one reaper pass re-pushes every queued job — and a Redis that is
down at submit refuses the background submission cleanly (``QUEUE_UNAVAILABLE``) without leaving
a phantom execution behind, so the same submit works once Redis is back. The stack's own worker
consumes nothing; each test starts the consumer it needs when it needs it.
"""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from opsc_test_actions import read_ledger

from opsconductor.client import QueueUnavailableError
from opsconductor.common.hashing import idempotency_key
from opsconductor.common.plan import parse_plan
from opsconductor.lifecycle.storage.flags import update_flags

from . import background
from .background import (
    background_plan,
    completed_by_key,
    open_queue,
    run_reaper_once,
    wait_job_gone,
    wait_terminal,
)
from .conftest import Tenant, running_stack
from .redis_server import RedisServer
from .stack import Stack

workers = background.workers


@pytest.fixture(scope="module")
async def dedicated_redis() -> AsyncIterator[RedisServer]:
    """A ``redis-server`` of this module only, on a free port, without persistence."""
    server = RedisServer(Path(tempfile.mkdtemp(prefix="opsc-e2e-redis-")))
    await server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
async def stack(
    e2e_dsn: str, e2e_pool: asyncpg.Pool, dedicated_redis: RedisServer
) -> AsyncIterator[Stack]:
    """The api and a non-consuming worker on the dedicated Redis."""
    async with running_stack(
        e2e_dsn, dedicated_redis.url, OPSC_CONSUMER_CONCURRENCY="0"
    ) as running:
        yield running


@pytest.fixture(autouse=True)
async def redis_up(dedicated_redis: RedisServer) -> None:
    """Every test starts with the dedicated Redis running (a previous one may have killed it)."""
    await dedicated_redis.start()


async def redis_ready_order(server: RedisServer, key_prefix: str) -> list[str]:
    """Job ids in the order the queue will hand them out (the ``ready`` zset)."""
    redis = server.client()
    try:
        members = await redis.zrange(f"{key_prefix}ready", 0, -1)
    finally:
        await redis.aclose()
    return [m.decode() if isinstance(m, bytes) else str(m) for m in members]


async def test_jobs_lost_with_a_flushed_redis_are_back_after_one_reaper_pass_and_all_run(
    tenant: Tenant,
    e2e_pool: asyncpg.Pool,
    ledger: Path,
    dedicated_redis: RedisServer,
    workers: background.Workers,
) -> None:
    """Redis loss: 5 background jobs are queued while dispatch is drained (``dispatch_paused``),
    Redis is FLUSHALLed — jobs and its copy of the drain gone — and one ``reaper --once`` pass
    re-applies the drain from Postgres and re-pushes every job from ``execution_queue``: same job
    ids, in their original order, no attempt spent. Resumed, the waiting worker runs them all to
    ``succeeded``, each step once."""
    submitted = []
    await update_flags(e2e_pool, {"dispatch_paused": True}, by="test")
    async with tenant.client("alice") as client, open_queue(tenant.stack) as queue:
        await queue.set_paused(True)
        starting = workers.start_soon("worker-a", OPSC_CONSUMER_CONCURRENCY="4")
        for i in range(5):
            queued = await client.submit(
                background_plan(ledger, steps=1, hold_s=0.1, target=f"db-{i}"),
                tenant_id=tenant.id,
            )
            assert queued.status == "queued"
            submitted.append(queued)
        job_ids = [queued.job_id for queued in submitted]
        assert {str(j) for j in await queue.all_job_ids()} == set(job_ids)
        redis = dedicated_redis.client()
        try:
            await redis.flushall()
        finally:
            await redis.aclose()
        assert await queue.all_job_ids() == set()
        assert not await queue.is_paused()

        report = await run_reaper_once(tenant.stack)
        assert report["repushed"] == 5, report
        assert await queue.is_paused()  # the drain survived the loss too

        assert {str(j) for j in await queue.all_job_ids()} == set(job_ids)
        jobs = [await queue.get(job_id) for job_id in job_ids if job_id]
        assert all(job is not None and job.state == "ready" for job in jobs)
        assert all(job is not None and job.attempts == 0 for job in jobs)
        ready = await redis_ready_order(dedicated_redis, queue.key_prefix)
        assert ready == job_ids  # FIFO survived the loss
        rows = await e2e_pool.fetch(
            "SELECT state, attempts FROM execution_queue WHERE tenant_id = $1", tenant.id
        )
        assert sorted((r["state"], r["attempts"]) for r in rows) == [("ready", 0)] * 5

        await starting
        await update_flags(e2e_pool, {"dispatch_paused": False}, by="test")
        await queue.set_paused(False)
        finals = [await wait_terminal(client, queued, 30) for queued in submitted]

    assert [final.status for final in finals] == ["succeeded"] * 5
    assert completed_by_key(read_ledger(ledger)) == {
        f"{queued.execution_id}:s1": 1 for queued in submitted
    }
    assert len(read_ledger(ledger)) == 5
    for queued in submitted:
        await wait_job_gone(e2e_pool, queued.execution_id)


async def test_submit_with_redis_down_persists_nothing_and_the_same_submit_runs_once_after(
    tenant: Tenant,
    e2e_pool: asyncpg.Pool,
    ledger: Path,
    dedicated_redis: RedisServer,
    workers: background.Workers,
) -> None:
    """Redis killed at submit: SubmitExecution of a background plan fails ``UNAVAILABLE`` /
    ``QUEUE_UNAVAILABLE`` and nothing is persisted — no execution holds the idempotency key, no
    queue row, no step. Once Redis is restarted (same port, empty), the very same submit is
    accepted and runs exactly once."""
    long_plan = background_plan(ledger, steps=1, hold_s=0.1, target=f"db-{secrets.token_hex(3)}")
    key = idempotency_key(parse_plan(long_plan), tenant.id, "alice")
    dedicated_redis.kill()
    async with tenant.client("alice") as client:
        with pytest.raises(QueueUnavailableError) as refused:
            await client.submit(long_plan, tenant_id=tenant.id)
        assert refused.value.reason == "QUEUE_UNAVAILABLE"
        assert (
            await e2e_pool.fetchval(
                "SELECT count(*) FROM executions WHERE idempotency_key = $1 OR tenant_id = $2",
                key,
                tenant.id,
            )
            == 0
        )
        assert (
            await e2e_pool.fetchval(
                "SELECT count(*) FROM execution_queue WHERE tenant_id = $1", tenant.id
            )
            == 0
        )

        await dedicated_redis.start()
        accepted = await client.submit(long_plan, tenant_id=tenant.id)
        assert accepted.status == "queued"
        assert accepted.execution_mode == "background"
        assert not accepted.deduplicated
        await workers.start("worker-a")
        final = await wait_terminal(client, accepted, 30)

    assert final.status == "succeeded", (final.error_class, final.error_message)
    assert final.idempotency_key == key
    assert (
        await e2e_pool.fetchval("SELECT count(*) FROM executions WHERE tenant_id = $1", tenant.id)
        == 1
    )
    lines = read_ledger(ledger)
    assert [line["idempotency_key"] for line in lines] == [f"{accepted.execution_id}:s1"]
