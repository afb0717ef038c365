"""The reaper outlives its dependencies' outages (found by the chaos soak, issue 9).

A pass while Redis was restarting raised ``QueueUnavailableError`` out of ``reap_once`` and the
reaper loop of ``make run`` died with a traceback; every duty that needs only Postgres
(deadlines, expired locks, keys, approvals) was skipped with it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from datetime import timedelta

import asyncpg

from opsconductor.lifecycle.maintenance_port import PostgresRedisMaintenance
from opsconductor.lifecycle.queue.redis_queue import RedisQueue, create_redis_client
from opsconductor.worker.logic.reaper import reap_once


def _dead_redis_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


async def _expired_lock(pool: asyncpg.Pool) -> None:
    await pool.execute(
        "INSERT INTO execution_locks (lock_key, tenant_id, target_ref, action, owner_token, "
        "acquired_at, expires_at) VALUES ('lock:v1:t1:db-1:restart', 't1', 'db-1', 'restart', "
        "gen_random_uuid(), now() - interval '2 minutes', now() - interval '1 minute')"
    )


async def test_a_pass_with_redis_down_still_does_the_postgres_work(db_pool: asyncpg.Pool) -> None:
    """Redis unreachable: the pass does not raise, and the expired lock is still reaped."""
    await _expired_lock(db_pool)
    redis = create_redis_client(_dead_redis_url(), socket_timeout=0.5, retries=0)
    try:
        report = await reap_once(
            PostgresRedisMaintenance(db_pool, RedisQueue(redis, prefix="opsc-test:reaper:")),
            dedup_window=timedelta(days=1),
        )
    finally:
        await redis.aclose()
    assert report.locks_reaped == 1
    assert await db_pool.fetchval("SELECT count(*) FROM execution_locks") == 0


async def test_the_reaper_loop_keeps_running_while_redis_is_down(db_dsn: str) -> None:
    """``python -m opsconductor.worker.reaper --interval 0.2`` with Redis down: several passes
    log ``reaper_queue_unavailable`` and the process is still running (it used to exit 1)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "opsconductor.worker.reaper",
        "--interval",
        "0.2",
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("OPSC_")},
            "OPSC_DATABASE_URL": db_dsn,
            "OPSC_REDIS_URL": _dead_redis_url(),
            "OPSC_LOG_JSON": "true",
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    seen = 0
    try:
        async with asyncio.timeout(30):
            while seen < 3:
                line = await process.stdout.readline()
                assert line, "the reaper exited"
                seen += b"reaper_queue_unavailable" in line
        assert process.returncode is None
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
