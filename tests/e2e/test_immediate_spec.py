"""Spec snippets §2.1, §3.1, §3.5 and §4.1 against the client, and the immediate path without Redis.

Every test talks to the real api (which hands immediate plans to the real worker) through the
typed client; Postgres is only read, except in the §4.1 snippet, which, as the spec writes it,
calls the storage layer's ``transition_status`` directly.
"""

from __future__ import annotations

import asyncio
import socket
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit
from uuid import UUID

import asyncpg
import pytest
from opsc_test_actions import read_ledger

from opsconductor.client import ExecutionClient, ExecutionContext, FSMError
from opsconductor.common.hashing import canonical_json, idempotency_key, plan_hash, snapshot_hash
from opsconductor.common.plan import parse_plan, to_wire_dict
from opsconductor.lifecycle.storage.executions import (
    NewExecution,
    create_execution,
    get_execution,
    transition_status,
)
from opsconductor.lifecycle.storage.locks import check_lock_status

from . import inspection
from .conftest import Tenant
from .inspection import tenant_row_counts, wait_until
from .plans import create_simple_query_plan, plan, probe_step
from .stack import Stack

module_end_checks = inspection.module_end_checks
pytestmark = pytest.mark.usefixtures("module_end_checks")


def create_plan(ledger: Path) -> dict[str, object]:
    return plan(probe_step("check", ["db:replica-1", "db:replica-2"], ledger))


def create_long_plan(ledger: Path, *, steps: int, target: str) -> dict[str, object]:
    """``steps`` probe steps of 0.5 s each on one target (so they run one after another)."""
    return plan(*(probe_step(f"step-{i}", [target], ledger, hold_s=0.5) for i in range(steps)))


async def test_spec_2_1_short_plan_runs_immediately_under_ten_seconds(
    tenant: Tenant, ledger: Path
) -> None:
    """§2.1: a short read plan comes back finished, in immediate mode, in well under 10 s."""
    plan_ = create_simple_query_plan(ledger)
    async with tenant.client("alice") as executor:
        context = ExecutionContext(tenant_id=tenant.id)
        started = time.monotonic()
        result = await executor.execute(plan_, context)
        elapsed = time.monotonic() - started
    assert result.execution_mode == "immediate"
    assert result.duration_ms < 10_000
    assert result.status == "succeeded", (result.error_class, result.error_message)
    assert result.timeout_policy_id == "fast_read"
    assert result.approval_level == 0
    assert elapsed < 10
    assert len(read_ledger(ledger)) == 1


async def test_spec_3_1_duplicate_submit_returns_the_same_execution_without_a_second_effect(
    tenant: Tenant, ledger: Path, e2e_pool: asyncpg.Pool
) -> None:
    """§3.1: submitting the same plan twice returns the same execution id, marked deduplicated
    the second time, and the side effect happens once."""
    plan_ = create_plan(ledger)
    context = ExecutionContext(tenant_id=tenant.id)
    async with tenant.client("alice") as executor:
        exec1 = await executor.execute(plan_, context)
        exec2 = await executor.execute(plan_, context)  # Duplicate submit
    assert exec1.execution_id == exec2.execution_id  # Same execution
    assert (exec1.deduplicated, exec2.deduplicated) == (False, True)
    assert exec2.status == exec1.status == "succeeded"
    assert exec2.plan_hash == exec1.plan_hash
    assert len(read_ledger(ledger)) == 1
    rows = await e2e_pool.fetchval(
        "SELECT count(*) FROM executions WHERE tenant_id = $1 AND idempotency_key = $2",
        tenant.id,
        exec1.idempotency_key,
    )
    assert rows == 1


async def _running_execution_id(client: ExecutionClient, tenant_id: str) -> str:
    """Wait until the tenant's one execution is running its first step; return its id."""

    async def first_step_running() -> str | None:
        page, _ = await client.list_executions(tenant_id=tenant_id, statuses=["running"])
        if not page:
            return None
        execution = await client.get(page[0].execution_id, tenant_id=tenant_id)
        if execution.steps and execution.steps[0].status == "running":
            return execution.execution_id
        return None

    return await wait_until(first_step_running, within_s=5, what="step 1 to be running")


async def test_spec_3_5_cancel_mid_run_ends_cancelled_skips_later_steps_and_frees_the_lock(
    tenant: Tenant, ledger: Path, e2e_pool: asyncpg.Pool
) -> None:
    """§3.5: cancelling a 10-step plan while ``execute`` awaits it: the awaited result is
    cancelled with ``cancelled_by``, the running step stops early on the live signal, later steps
    are skipped, the lock is released; cancelling again is a no-op returning the same record."""
    target = "server-01"
    plan_ = create_long_plan(ledger, steps=10, target=target)
    async with tenant.client("alice") as executor:
        started = time.monotonic()
        exec_task = asyncio.create_task(
            executor.execute(plan_, ExecutionContext(tenant_id=tenant.id))
        )
        exec_id = await _running_execution_id(executor, tenant.id)

        requested = await executor.cancel(exec_id, tenant_id=tenant.id, reason="User requested")
        assert requested.cancelled_by == "alice"
        assert requested.cancelled_at is not None

        result = await asyncio.wait_for(exec_task, timeout=10)
        elapsed = time.monotonic() - started
        again = await executor.cancel(exec_id, tenant_id=tenant.id, reason="twice")

    assert result.execution_id == exec_id
    assert result.status == "cancelled"
    assert result.cancelled_by == "alice"
    assert result.cancel_reason == "User requested"
    assert result.cancel_checks_performed >= 1
    assert elapsed < 4, "cancellation did not cut the 5 s plan short"
    statuses = [step.status for step in result.steps]
    ran = [s for s in statuses if s != "skipped"]
    assert statuses[: len(ran)] == ran, statuses  # what ran is a prefix; the rest was skipped
    assert 1 <= len(ran) <= 2, statuses
    assert statuses[-1] == "skipped"
    lines = read_ledger(ledger)
    assert len(lines) == len(ran)
    assert lines[-1]["outcome"] == "cancelled", "the running step did not see the live signal"

    # Verify mutex released
    lock_status = await check_lock_status(e2e_pool, tenant.id, target, "probe")
    assert lock_status is None  # Lock released

    # Idempotent: the second request changes nothing and is not an error.
    assert again.status == "cancelled"
    assert again.cancelled_by == "alice"
    assert again.cancelled_at == result.cancelled_at
    assert again.cancel_reason == "User requested"
    assert again.last_transition_at == result.last_transition_at


async def _pending_execution(pool: asyncpg.Pool, tenant: Tenant, ledger: Path) -> str:
    """An execution created but never dispatched (as the api creates it, before the worker)."""
    parsed = parse_plan(create_plan(ledger))
    snapshot = {"plan": to_wire_dict(parsed), "resolved": {}}
    record, created = await create_execution(
        pool,
        NewExecution(
            tenant_id=tenant.id,
            actor_id="alice",
            request_id=None,
            idempotency_key=idempotency_key(parsed, tenant.id, "alice"),
            plan_hash=plan_hash(parsed),
            plan_snapshot=snapshot,
            plan_snapshot_hash=snapshot_hash(snapshot),
            execution_mode="immediate",
            sla_class="fast",
            action_class="read",
            approval_level=0,
            priority=50,
            timeout_policy_id="fast_read",
            timeout_ms=10_000,
            estimated_duration_ms=5,
            record_only=False,
            steps=[
                (step.id, i, step.action, str(step.action_class))
                for i, step in enumerate(parsed.steps)
            ],
        ),
        dedup_window=timedelta(days=1),
    )
    assert created
    assert canonical_json(record.plan_snapshot) == canonical_json(snapshot)
    return str(record.id)


async def test_spec_4_1_pending_to_succeeded_is_an_illegal_transition_and_writes_nothing(
    tenant: Tenant, ledger: Path, e2e_pool: asyncpg.Pool
) -> None:
    """§4.1: ``transition_status`` from pending straight to succeeded raises
    ``FSMError("Illegal state transition …")`` and leaves the row and its events untouched."""
    exec_id = await _pending_execution(e2e_pool, tenant, ledger)
    before = await tenant_row_counts(e2e_pool, tenant.id)
    with pytest.raises(FSMError, match="Illegal state transition"):
        await transition_status(
            execution_id=exec_id,
            from_status="pending",
            to_status="succeeded",  # Illegal: must go through running
            actor_id="alice",
            db=e2e_pool,
        )
    record = await get_execution(e2e_pool, tenant.id, UUID(exec_id))
    assert record.status == "pending"
    assert record.last_transition_at is None
    assert await tenant_row_counts(e2e_pool, tenant.id) == before

    # The client's cancel ends a pending execution at once (no worker holds it).
    async with tenant.client("alice") as client:
        cancelled = await client.cancel(exec_id, tenant_id=tenant.id)
    assert cancelled.status == "cancelled"
    assert cancelled.last_transition_from == "pending"
    assert [s.status for s in cancelled.steps] == ["skipped"]
    assert read_ledger(ledger) == []


async def test_cancelling_a_finished_execution_is_a_no_op_returning_it_unchanged(
    tenant: Tenant, ledger: Path
) -> None:
    """§4.1 through the client: a terminal execution cannot move, so cancelling a succeeded one
    returns it as it was (no FSMError, no cancelled_by)."""
    async with tenant.client("alice") as client:
        done = await client.submit(create_plan(ledger), tenant_id=tenant.id)
        assert done.status == "succeeded"
        after = await client.cancel(done.execution_id, tenant_id=tenant.id, reason="too late")
        fetched = await client.get(done.execution_id, tenant_id=tenant.id)
    for record in (after, fetched):
        assert record.status == "succeeded"
        assert record.cancelled_by is None
        assert record.cancelled_at is None
        assert record.cancel_reason == ""
        assert record.ended_at == done.ended_at
        assert record.last_transition_at == done.last_transition_at


def _service_redis_url(stack: Stack, name: str) -> str:
    """The REDIS_URL a running service was started with (read from its environment)."""
    environ = Path(f"/proc/{stack.services[name].process.pid}/environ").read_bytes()
    for entry in environ.split(b"\0"):
        key, _, value = entry.partition(b"=")
        if key == b"OPSC_REDIS_URL":
            return value.decode()
    raise AssertionError(f"{name} was started without OPSC_REDIS_URL")


def _refuses_connections(url: str) -> bool:
    parts = urlsplit(url)
    assert parts.hostname
    assert parts.port
    with socket.socket() as sock:
        sock.settimeout(2)
        try:
            sock.connect((parts.hostname, parts.port))
        except ConnectionRefusedError:
            return True
    return False


async def test_immediate_plans_succeed_while_redis_is_unreachable(
    tenant: Tenant, ledger: Path, stack: Stack
) -> None:
    """§2.1 "does not depend on Redis": api and worker are configured with a REDIS_URL whose
    port refuses connections, and an immediate plan still runs and succeeds."""
    urls = {name: _service_redis_url(stack, name) for name in ("api", "worker")}
    assert len(set(urls.values())) == 1, urls
    url = urls["api"]
    assert url.startswith("redis://")
    assert _refuses_connections(url), f"something listens at {url}"
    async with tenant.client("alice") as client:
        result = await client.submit(create_plan(ledger), tenant_id=tenant.id)
    assert result.status == "succeeded", (result.error_class, result.error_message)
    assert result.execution_mode == "immediate"
    assert len(read_ledger(ledger)) == 1
    assert _refuses_connections(url)
