"""ProgressService over gRPC against real processes: the spec §7.1 contract, resume exactly
once, tenant isolation (audited), and the audit listing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from opsconductor.client import (
    ExecutionClient,
    ExecutionEvent,
    NotFoundError,
    PermissionDeniedError,
    PlanValidationError,
    ProgressTracker,
)

from .conftest import Tenant, running_stack, token
from .plans import plan, probe_step
from .stack import Stack


@pytest.fixture(scope="module")
async def stack(e2e_dsn: str, e2e_pool: asyncpg.Pool, redis_url: str) -> AsyncIterator[Stack]:
    async with running_stack(e2e_dsn, redis_url, with_progress=True) as running:
        yield running


def progress_client(tenant: Tenant, actor: str, *, tenant_id: str | None = None) -> ExecutionClient:
    return ExecutionClient(tenant.stack.address("progress"), token(actor, tenant_id or tenant.id))


def create_deploy_plan(ledger: Path, *, target_count: int) -> dict[str, object]:
    """A background plan over ``target_count`` targets: one probe step per target."""
    return plan(
        *(
            probe_step(f"t{i}", [f"web-{i:02d}"], ledger, hold_s=0.05, estimate_ms=11_000)
            for i in range(target_count)
        ),
        sla="medium",
    )


def test_the_progress_process_runs_on_uvloop(stack: Stack) -> None:
    """The default event loop of the progress process is uvloop's (cheaper fan-out)."""
    lines = (stack.log_dir / "progress.log").read_text().splitlines()
    started = [
        record
        for record in (json.loads(line) for line in lines if line.startswith("{"))
        if record.get("event") == "server_started"
    ]
    assert [record["event_loop"] for record in started] == ["uvloop"]


async def test_spec_7_1_first_event_started_last_completed(tenant: Tenant, ledger: Path) -> None:
    """Spec §7.1 snippet over gRPC: subscribe to a running background execution; the first event
    is execution_started, the last execution_completed with the final status; seqs are 1..n."""
    async with tenant.client("alice") as executor, progress_client(tenant, "vera") as client:
        submitted = await executor.submit(
            create_deploy_plan(ledger, target_count=10), tenant_id=tenant.id
        )
        exec_id = submitted.execution_id
        progress_tracker = ProgressTracker(client, tenant_id=tenant.id)

        events = []
        async with asyncio.timeout(60):
            async for event in progress_tracker.subscribe(exec_id):
                events.append(event)
                if event["type"] == "execution_completed":
                    break

    assert len(events) > 0
    assert events[0]["type"] == "execution_started"
    assert events[-1]["type"] == "execution_completed"
    assert events[-1]["payload"]["status"] == "succeeded"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    types = [e["type"] for e in events]
    assert "execution_queued" in types
    assert "execution_running" in types
    assert types.count("step_started") == 10
    assert types.count("step_succeeded") == 10


async def test_stream_ends_by_itself_after_the_terminal_event(tenant: Tenant, ledger: Path) -> None:
    """The stream closes after execution_completed (no break needed); subscribing after the
    end with the terminal seq yields nothing and ends at once."""
    async with tenant.client("alice") as executor, progress_client(tenant, "vera") as client:
        submitted = await executor.submit(
            create_deploy_plan(ledger, target_count=2), tenant_id=tenant.id
        )
        async with asyncio.timeout(60):
            events = [
                e async for e in client.stream_events(submitted.execution_id, tenant_id=tenant.id)
            ]
            assert events[-1].type == "execution_completed"
            after = [
                e
                async for e in client.stream_events(
                    submitted.execution_id, tenant_id=tenant.id, after_seq=events[-1].seq
                )
            ]
    assert after == []


async def test_resume_after_disconnect_gets_every_later_event_exactly_once(
    tenant: Tenant, ledger: Path
) -> None:
    """A subscriber that hangs up mid-execution and resubscribes with its last seq receives
    every later event exactly once, in order: together, exactly the execution's log."""
    async with tenant.client("alice") as executor, progress_client(tenant, "vera") as client:
        submitted = await executor.submit(
            create_deploy_plan(ledger, target_count=6), tenant_id=tenant.id
        )
        first: list[int] = []
        async with asyncio.timeout(60):
            async for event in client.stream_events(submitted.execution_id, tenant_id=tenant.id):
                first.append(event.seq)
                if event.type == "step_succeeded":
                    break  # hang up mid-run
            rest = [
                e.seq
                async for e in client.stream_events(
                    submitted.execution_id, tenant_id=tenant.id, after_seq=first[-1]
                )
            ]
        listed, _ = await client.list_events(
            tenant_id=tenant.id, execution_id=submitted.execution_id, page_size=500
        )
    completed = next(e.seq for e in listed if e.type == "execution_completed")
    assert first + rest == list(range(1, completed + 1))


async def test_another_tenant_cannot_stream_or_list_and_the_attempt_is_audited(
    tenant: Tenant, ledger: Path, e2e_pool: asyncpg.Pool
) -> None:
    """Tenant B's principal is refused A's events whichever tenant it names, on StreamEvents and
    ListEvents; each attempt is an rbac_violation filed under A, naming the RPC."""
    intruder_tenant = f"other-{tenant.id[::-1]}"
    async with tenant.client("alice") as executor:
        submitted = await executor.submit(
            create_deploy_plan(ledger, target_count=1), tenant_id=tenant.id
        )
    eid = submitted.execution_id
    async with progress_client(tenant, "mallory", tenant_id=intruder_tenant) as intruder:
        for named in (tenant.id, intruder_tenant):
            with pytest.raises(PermissionDeniedError) as denied:
                async for _ in intruder.stream_events(eid, tenant_id=named):
                    pass
            assert tenant.id not in str(denied.value)
            with pytest.raises(PermissionDeniedError):
                await intruder.list_events(tenant_id=named, execution_id=eid)
    rows = await e2e_pool.fetch(
        "SELECT payload FROM execution_events WHERE tenant_id = $1 AND type = 'rbac_violation' "
        "AND actor_id = 'mallory'",
        tenant.id,
    )
    resources = sorted(r["payload"]["resource"] for r in rows)
    assert resources == ["ProgressService/ListEvents"] * 2 + ["ProgressService/StreamEvents"] * 2
    assert {r["payload"]["tier"] for r in rows} == {"progress"}


async def test_audit_listing_of_rbac_violations_by_actor_needs_audit_read(
    tenant: Tenant, ledger: Path
) -> None:
    """ListEvents without an execution is the tenant's audit trail: an admin finds a viewer's
    refused submit by type and actor, page by page; a viewer may not query it."""
    async with tenant.client("vera") as viewer:
        for _ in range(3):
            with pytest.raises(PermissionDeniedError):
                await viewer.submit(create_deploy_plan(ledger, target_count=1), tenant_id=tenant.id)
    async with progress_client(tenant, "ada") as admin:
        seen = []
        page_token = ""
        while True:
            events, page_token = await admin.list_events(
                tenant_id=tenant.id,
                types=["rbac_violation"],
                actor_id="vera",
                page_size=2,
                page_token=page_token,
            )
            seen.extend(events)
            if not page_token:
                break
        assert len(seen) == 3
        assert {e.actor_id for e in seen} == {"vera"}
        with pytest.raises(PlanValidationError):
            await admin.list_events(tenant_id=tenant.id, page_token="not-a-token")
    async with progress_client(tenant, "vera") as viewer:
        with pytest.raises(PermissionDeniedError):
            await viewer.list_events(tenant_id=tenant.id, types=["rbac_violation"])


async def test_unknown_or_malformed_execution_is_not_found(tenant: Tenant) -> None:
    """A stream of an id that does not exist, or is no id, is NOT_FOUND; a negative after_seq
    is INVALID_ARGUMENT naming the field."""
    async with progress_client(tenant, "vera") as client:
        for bad in ("00000000-0000-0000-0000-000000000000", "nope"):
            with pytest.raises(NotFoundError):
                async for _ in client.stream_events(bad, tenant_id=tenant.id):
                    pass
        with pytest.raises(PlanValidationError) as invalid:
            async for _ in client.stream_events(
                "00000000-0000-0000-0000-000000000000", tenant_id=tenant.id, after_seq=-1
            ):
                pass
    assert [v.field for v in invalid.value.violations] == ["after_seq"]


async def _follow(
    client: ExecutionClient, tenant_id: str, execution_id: str
) -> list[ExecutionEvent]:
    async with asyncio.timeout(60):
        return [e async for e in client.stream_events(execution_id, tenant_id=tenant_id)]


async def test_immediate_and_cancelled_executions_keep_the_event_contract(
    tenant: Tenant, ledger: Path
) -> None:
    """Every path opens with execution_started and closes with execution_completed carrying the
    final status, seqs 1..n without a gap: an immediate run, and a background run cancelled
    while its first step holds the target (cancel_requested, steps skipped, then the end)."""
    async with tenant.client("alice") as executor, progress_client(tenant, "vera") as client:
        immediate = await executor.submit(
            plan(probe_step("q", ["db-1"], ledger)), tenant_id=tenant.id
        )
        assert immediate.execution_mode == "immediate"
        long_run = await executor.submit(
            plan(
                probe_step("hold", ["db-2"], ledger, hold_s=20, estimate_ms=11_000),
                probe_step("after", ["db-2"], ledger, estimate_ms=11_000),
                sla="medium",
            ),
            tenant_id=tenant.id,
        )
        async with asyncio.timeout(30):
            async for event in client.stream_events(long_run.execution_id, tenant_id=tenant.id):
                if event.type == "step_started":
                    break
        await executor.cancel(long_run.execution_id, tenant_id=tenant.id, reason="stop")
        for execution, status in ((immediate, "succeeded"), (long_run, "cancelled")):
            events = await _follow(client, tenant.id, execution.execution_id)
            types = [e.type for e in events]
            assert types[0] == "execution_started"
            assert types[-1] == "execution_completed"
            assert events[-1].payload["status"] == status
            assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert "cancel_requested" in types
        assert "step_skipped" in types


async def test_a_retried_background_execution_streams_its_retry(
    tenant: Tenant, ledger: Path
) -> None:
    """A background step failing once (real worker, real queue): the stream shows the failed
    step, ``retry_scheduled`` with the attempts spent and when it runs again, the execution back
    in the queue (``execution_requeued``), the step started again and succeeding, then the end;
    seqs 1..n."""
    async with tenant.client("alice") as executor, progress_client(tenant, "vera") as client:
        submitted = await executor.submit(
            plan(
                probe_step("flaky", ["db-3"], ledger, fail_times=1, estimate_ms=11_000),
                sla="medium",
            ),
            tenant_id=tenant.id,
        )
        assert submitted.execution_mode == "background"
        events = await _follow(client, tenant.id, submitted.execution_id)
    types = [e.type for e in events]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert types[0] == "execution_started"
    assert events[-1].type == "execution_completed"
    assert events[-1].payload["status"] == "succeeded"
    failed = types.index("step_failed")
    retry = types.index("retry_scheduled")
    requeued = types.index("execution_requeued")
    assert failed < retry < types.index("step_succeeded")
    assert failed < requeued < types.index("step_succeeded")
    assert types.count("retry_scheduled") == 1
    assert types.count("step_started") == 2
    assert events[retry].payload["attempts"] == 1
    assert events[retry].payload["available_at"]
