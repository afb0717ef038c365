"""What background-path fault tests share: extra worker processes, the queue, the reaper, rows.

* :class:`Workers` (the ``workers`` fixture: a module binds it with ``workers =
  background.workers``) starts named worker processes on the module's stack — short lease, one
  job at a time — and at the end of the test stops every one it started (resuming a paused one
  first), so each test starts with no consumer but its own.
* :func:`open_queue` reads the stack's Redis queue under the stack's key prefix.
* :func:`run_reaper_once` runs ``python -m opsconductor.worker.reaper --once`` as the CronJob
  would, with the worker's settings, and returns its ``reaper_pass`` report.
* Row readers for what the worker recorded: steps, events, the execution, its queue row.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from opsconductor.client import Execution, ExecutionClient
from opsconductor.lifecycle.queue.redis_queue import RedisQueue, create_redis_client

from .inspection import wait_until
from .plans import plan, probe_step
from .stack import ServiceProcess, Stack, service_env, start_worker

#: Lease of the workers of these tests (OPSC_LEASE_S_OVERRIDE): a dead worker's job is free
#: again this long after its last renewal, instead of the policy's 35 s.
LEASE_S = 3.0

#: Environment of every worker :class:`Workers` starts (overridable per worker).
WORKER_ENV = {
    "OPSC_CONSUMER_CONCURRENCY": "1",
    "OPSC_CONSUMER_POLL_INTERVAL_S": "0.05",
    "OPSC_LEASE_S_OVERRIDE": str(LEASE_S),
}


def stack_env(stack: Stack) -> dict[str, str]:
    """The ``OPSC_*`` settings the stack's worker runs with (database, Redis, queue prefix)."""
    return dict(stack.services["worker"].extra_env)


def background_plan(
    ledger: Path, *, steps: int = 3, hold_s: float = 1.5, sla: str = "medium", target: str = "db-1"
) -> dict[str, Any]:
    """``steps`` probe steps s1, s2, … on one target, each holding it ``hold_s`` seconds, and
    estimated at 11 s each so the api queues the plan."""
    return plan(
        *(
            probe_step(f"s{i}", [target], ledger, hold_s=hold_s, estimate_ms=11_000)
            for i in range(1, steps + 1)
        ),
        sla=sla,
    )


class Workers:
    """Worker processes started by one test; all stopped when the test ends."""

    def __init__(self, stack: Stack) -> None:
        self._stack = stack
        self._started: list[ServiceProcess] = []
        self._starting: list[asyncio.Task[ServiceProcess]] = []

    async def start(self, name: str, **env: str) -> ServiceProcess:
        """Start worker ``name`` (also its ``worker_id``) and wait until it serves."""
        service = await start_worker(self._stack, name, {**WORKER_ENV, **env})
        self._started.append(service)
        return service

    def start_soon(self, name: str, **env: str) -> asyncio.Task[ServiceProcess]:
        """:meth:`start` in the background (a process takes a second or two to serve)."""
        task = asyncio.create_task(self.start(name, **env))
        self._starting.append(task)
        return task

    async def stop_all(self) -> None:
        # A start still under way ends first, so no process outlives the test unstopped.
        await asyncio.gather(*self._starting, return_exceptions=True)
        for service in self._started:
            if service.process.poll() is None:
                # A paused worker would ignore SIGTERM until resumed.
                os.kill(service.process.pid, signal.SIGCONT)
            await service.stop_async(grace_s=10.0)
            self._stack.services.pop(service.name, None)


@pytest.fixture
async def workers(stack: Stack) -> AsyncIterator[Workers]:
    """Extra worker processes for this test (see :class:`Workers`)."""
    started = Workers(stack)
    try:
        yield started
    finally:
        await started.stop_all()


def kill(service: ServiceProcess) -> None:
    """SIGKILL a service and reap it: it dies mid-whatever, no clean-up runs."""
    service.process.kill()
    service.process.wait(10)


async def wait_exit(service: ServiceProcess, within_s: float) -> int:
    """Wait for a service process to exit; its exit status."""
    deadline = time.monotonic() + within_s
    while (code := service.process.poll()) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{service.name} still running after {within_s} s")
        await asyncio.sleep(0.02)
    return code


@asynccontextmanager
async def open_queue(stack: Stack) -> AsyncIterator[RedisQueue]:
    """The stack's queue (its Redis, its key prefix), closed on exit."""
    env = stack_env(stack)
    redis = create_redis_client(env["OPSC_REDIS_URL"])
    try:
        yield RedisQueue(redis, prefix=env["OPSC_QUEUE_PREFIX"])
    finally:
        await redis.aclose()


async def run_reaper_once(stack: Stack, **env: str) -> dict[str, Any]:
    """One reaper pass as a separate process with the worker's settings; its report."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "opsconductor.worker.reaper",
        "--once",
        env=service_env(stack.dsn, {**stack_env(stack), **env}),
        stdout=asyncio.subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    for line in text.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "reaper_pass":
                return dict(entry)
    raise AssertionError(f"the reaper logged no reaper_pass:\n{text}")


def log_events(service: ServiceProcess) -> list[dict[str, Any]]:
    """The JSON log lines a service wrote so far (a line still being written is left out, and
    so is one the masker left unparsable)."""
    complete = service.log_path.read_text(errors="replace").split("\n")[:-1]
    entries = []
    for line in complete:
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    return entries


async def wait_terminal(
    client: ExecutionClient, execution: Execution, within_s: float
) -> Execution:
    """Poll an execution until it is terminal; fail after ``within_s``."""

    async def terminal() -> Execution | None:
        current = await client.get(execution.execution_id, tenant_id=execution.tenant_id)
        return current if current.is_terminal else None

    return await wait_until(terminal, within_s=within_s, what="a terminal execution")


async def execution_row(pool: asyncpg.Pool, execution_id: str | UUID) -> dict[str, Any]:
    row = await pool.fetchrow("SELECT * FROM executions WHERE id = $1", UUID(str(execution_id)))
    assert row is not None
    return dict(row)


async def step_rows(pool: asyncpg.Pool, execution_id: str | UUID) -> dict[str, dict[str, Any]]:
    """The execution's steps by step id."""
    rows = await pool.fetch(
        "SELECT * FROM execution_steps WHERE execution_id = $1 ORDER BY position",
        UUID(str(execution_id)),
    )
    return {row["step_id"]: dict(row) for row in rows}


async def event_rows(pool: asyncpg.Pool, execution_id: str | UUID) -> list[dict[str, Any]]:
    """The execution's events in ``seq`` order."""
    rows = await pool.fetch(
        "SELECT * FROM execution_events WHERE execution_id = $1 ORDER BY seq",
        UUID(str(execution_id)),
    )
    return [dict(row) for row in rows]


async def queue_row(pool: asyncpg.Pool, execution_id: str | UUID) -> dict[str, Any] | None:
    row = await pool.fetchrow(
        "SELECT * FROM execution_queue WHERE execution_id = $1", UUID(str(execution_id))
    )
    return None if row is None else dict(row)


async def wait_job_gone(pool: asyncpg.Pool, execution_id: str | UUID) -> None:
    """Wait until the execution's queue row is gone (the worker settles a job right after it
    records the terminal state, so the two are not seen at the same instant)."""

    async def gone() -> bool:
        return await queue_row(pool, execution_id) is None

    await wait_until(gone, within_s=10, what="the job to leave execution_queue")


async def wait_step_running(
    pool: asyncpg.Pool, execution_id: str | UUID, step_id: str, *, worker_id: str
) -> None:
    """Wait until ``worker_id`` runs step ``step_id``."""

    async def running() -> bool:
        step = (await step_rows(pool, execution_id)).get(step_id)
        return step is not None and step["status"] == "running" and step["worker_id"] == worker_id

    await wait_until(running, within_s=30, what=f"{worker_id} running step {step_id}")


def completed_by_key(ledger: list[dict[str, Any]]) -> dict[str, int]:
    """How many probe calls completed (``ok``) per step idempotency key."""
    counts: dict[str, int] = {}
    for line in ledger:
        if line["outcome"] == "ok":
            counts[line["idempotency_key"]] = counts.get(line["idempotency_key"], 0) + 1
    return counts
