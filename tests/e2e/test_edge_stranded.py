"""Nothing stays pending (issue 8, finding 5), with real processes.

The worker is paused (SIGSTOP) so the api's hand-over hangs, and the api is killed (SIGKILL)
between creating two immediate executions and handing them over: both rows are ``pending`` with
no worker, and no process is left that would ever dispatch them. Then:

* a resubmit of the first plan, through a fresh api to a fresh worker, hands the stranded
  execution over again and returns its outcome at once — not after ~25 s of waiting, and not
  the stuck row reported as "deduplicated";
* the reaper fails the second one (``DISPATCH_LOST``) and retires its key, so the same plan runs
  again as a new execution.

And a hand-over the worker refuses (its own RBAC check) ends the row it never started at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from opsconductor.client import ExecutionClient, PermissionDeniedError

from . import inspection
from .conftest import Tenant, dead_redis_url, running_stack, token
from .inspection import wait_until
from .stack import Stack, service_env, start_service, start_worker

module_end_checks = inspection.module_end_checks
pytestmark = pytest.mark.usefixtures("module_end_checks")


@pytest.fixture(scope="module")
async def stack(e2e_dsn: str, e2e_pool: asyncpg.Pool) -> AsyncIterator[Stack]:
    """This module's own stack: its worker gets paused and its api killed."""
    async with running_stack(e2e_dsn, dead_redis_url()) as running:
        try:
            yield running
        finally:
            # A stopped process cannot act on SIGTERM: let the paused worker go first.
            worker = running.services["worker"].process
            if worker.poll() is None:
                os.kill(worker.pid, signal.SIGCONT)


def _noop_plan(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "sla_class": "fast",
        "steps": [
            {"id": "s1", "action": "noop", "action_class": "read", "targets": [{"ref": "srv-1"}]}
        ],
    }


async def _pending(pool: asyncpg.Pool, tenant_id: str, name: str) -> asyncpg.Record | None:
    return await pool.fetchrow(
        "SELECT id, status, worker_id FROM executions WHERE tenant_id = $1 "
        "AND plan_snapshot->'plan'->>'name' = $2",
        tenant_id,
        name,
    )


async def test_stranded_immediate_executions_are_handed_over_again_or_reaped(
    stack: Stack, tenant: Tenant, e2e_pool: asyncpg.Pool
) -> None:
    """Kill the api between create and dispatch; the resubmit runs it, the reaper ends the rest."""
    worker = stack.services["worker"]
    api = stack.services["api"]
    os.kill(worker.process.pid, signal.SIGSTOP)
    first, second = _noop_plan("stranded-a"), _noop_plan("stranded-b")
    client = ExecutionClient(api.address, token("alice", tenant.id))
    submits = [
        asyncio.ensure_future(client.submit(plan, tenant_id=tenant.id)) for plan in (first, second)
    ]
    for plan in (first, second):
        row = await wait_until(
            lambda plan=plan: _pending(e2e_pool, tenant.id, plan["name"]),
            within_s=15,
            what=f"{plan['name']} to be created",
        )
        assert row["status"] == "pending"
    api.process.kill()  # SIGKILL: no chance to fail what it created
    api.process.wait(10)
    for submit in submits:
        with pytest.raises(Exception):  # noqa: B017, PT011 - the connection just died
            await submit
    await client.close()

    worker2 = await start_worker(stack, "worker2")
    api2 = await start_service(
        "api2",
        stack,
        {**api.extra_env, "OPSC_WORKER_TARGET": worker2.address},
        module="api",
    )
    stranded = await _pending(e2e_pool, tenant.id, "stranded-a")
    assert stranded is not None
    assert stranded["status"] == "pending"
    async with ExecutionClient(api2.address, token("alice", tenant.id)) as retry:
        started = time.monotonic()
        result = await retry.submit(first, tenant_id=tenant.id)
        elapsed = time.monotonic() - started
    assert str(result.execution_id) == str(stranded["id"])
    assert result.status == "succeeded"
    assert result.deduplicated
    assert elapsed < 5.0, elapsed

    env = service_env(stack.dsn, {"OPSC_REAPER_UNSTARTED_GRACE_S": "0"})
    # One short pass of the real reaper command (no Redis: this stack has none).
    reaper = subprocess.run(
        [sys.executable, "-m", "opsconductor.worker.reaper", "--once"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert reaper.returncode == 0, reaper.stderr.decode(errors="replace")[-2000:]
    reaped = await e2e_pool.fetchrow(
        "SELECT status, error_class, idempotency_retired_at FROM executions WHERE id = $1",
        (await _pending(e2e_pool, tenant.id, "stranded-b"))["id"],
    )
    assert reaped["status"] == "failed"
    assert reaped["error_class"] == "DISPATCH_LOST"
    assert reaped["idempotency_retired_at"] is not None
    async with ExecutionClient(api2.address, token("alice", tenant.id)) as retry:
        again = await retry.submit(second, tenant_id=tenant.id)
    assert again.status == "succeeded"
    assert not again.deduplicated
    os.kill(worker.process.pid, signal.SIGCONT)  # its late hand-overs now find nothing to run


async def test_a_hand_over_the_worker_refuses_ends_the_pending_row_and_frees_its_key(
    stack: Stack, tenant: Tenant, e2e_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """The api allows, the worker's own RBAC check refuses (its policy grants operators
    nothing): the row no worker started ends ``failed`` with the refusal's class at once and
    its key is retired — it used to stay ``pending`` for good, holding the key."""
    policy = tmp_path / "strict_rbac.yaml"
    policy.write_text(
        "version: 1\nroles:\n  operator:\n    permissions: [executions:read]\n", encoding="utf-8"
    )
    strict = await start_worker(stack, "worker-strict", {"OPSC_RBAC_POLICY_FILE": str(policy)})
    api = await start_service(
        "api-strict",
        stack,
        {**stack.services["api"].extra_env, "OPSC_WORKER_TARGET": strict.address},
        module="api",
    )
    plan = _noop_plan("refused-by-worker")
    async with ExecutionClient(api.address, token("alice", tenant.id)) as client:
        with pytest.raises(PermissionDeniedError):
            await client.submit(plan, tenant_id=tenant.id)
    row = await _pending(e2e_pool, tenant.id, "refused-by-worker")
    assert row is not None
    assert row["status"] == "failed"
    stored = await e2e_pool.fetchrow(
        "SELECT error_class, idempotency_retired_at FROM executions WHERE id = $1", row["id"]
    )
    assert stored["error_class"] == "PERMISSION_DENIED"
    assert stored["idempotency_retired_at"] is not None
