"""Spec §7.2 on every path an execution can take: each record of it, in the captured output of
every service process that touched it, carries the submit's ``request_id`` and every §7.2
field, bound once per execution (issue 12, Build 1).

Paths: immediate; background; approval-released at level 1 (run at once by the approvals
service through a worker) and level 2 (queued by the approval); level 3, resumed from the queue
after each step's approval; and a takeover, worker-a SIGKILLed mid-run and worker-b finishing.
The approval-released background execution is also one trace: one root (the api's submit) with
spans of the api, the approvals service, the worker, its queue wait and each step.

The stack's worker consumes nothing (``OPSC_CONSUMER_CONCURRENCY=0``; it serves the immediate
runs): each queued path starts the consumers it needs, so which worker runs a job is known.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from opsconductor.client import Execution
from opsconductor.lifecycle.execution_logging import SPEC_FIELDS
from opsconductor.lifecycle.storage.flags import update_flags

from . import approvals_support, background
from .approvals_support import deploy_plan, modify_plan, production_plan, wait_step_request
from .background import background_plan, kill, wait_step_running, wait_terminal
from .conftest import Tenant, running_stack
from .inspection import wait_until
from .plans import plan, probe_step
from .stack import Stack, service_env

workers = background.workers

#: A worker that dequeues a job before the transaction that queued it commits defers it: it
#: cannot read the execution yet, so those records carry the job's correlation only.
DEFERRAL = frozenset({"job_deferred", "job_released"})

SPANS = Path(tempfile.mkdtemp(prefix="opsc-e2e-spans-")) / "spans.jsonl"


def required_fields(record: dict[str, Any]) -> tuple[str, ...]:
    """The §7.2 fields a record must carry; a deferral logged before the job's queueing
    transaction committed can only know the job's own (the execution row is not readable yet)."""
    if record["event"] in DEFERRAL and "plan_hash" not in record:
        return ("request_id", "exec_id", "tenant_id", "worker_id")
    return tuple(SPEC_FIELDS)


@pytest.fixture(scope="module")
async def stack(e2e_dsn: str, e2e_pool: asyncpg.Pool, redis_url: str) -> AsyncIterator[Stack]:
    """api, approvals and a worker serving immediate runs only; every span to one file."""
    await update_flags(e2e_pool, {"max_approval_level": 3}, by="e2e")
    async with running_stack(
        e2e_dsn,
        redis_url,
        with_approvals=True,
        common_env={"OPSC_OTEL_EXPORTER": "file", "OPSC_OTEL_FILE": str(SPANS)},
        OPSC_CONSUMER_CONCURRENCY="0",
    ) as running:
        yield running


def _records(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of one process's output."""
    records = []
    for line in path.read_text(errors="replace").split("\n")[:-1]:
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def records_of(stack: Stack, execution_id: str) -> dict[str, list[dict[str, Any]]]:
    """Every record about the execution, by process log: any mentioning its id or the id of
    one of its jobs anywhere (``exec_id``, ``execution_id``, ``job_id``, a message...)."""
    logs = {path.stem: _records(path) for path in sorted(stack.log_dir.glob("*.log"))}
    ids = {execution_id} | {
        r["job_id"]
        for records in logs.values()
        for r in records
        if "job_id" in r and execution_id in (r.get("exec_id"), r.get("execution_id"))
    }
    found = {}
    for name, records in logs.items():
        mine = [r for r in records if any(i in json.dumps(r) for i in ids)]
        if mine:
            found[name] = mine
    return found


async def assert_correlated(
    stack: Stack,
    pool: asyncpg.Pool,
    execution: Execution,
    *,
    processes: set[str],
    final_record: str = "execution_finished",
) -> dict[str, list[dict[str, Any]]]:
    """Every record of ``execution`` in every process carries its submit's request id, its id
    and each §7.2 field; ``processes`` (log names) each logged some; returns them."""
    request_id = await pool.fetchval(
        "SELECT request_id FROM executions WHERE id = $1::uuid", execution.execution_id
    )
    assert request_id

    async def finished() -> dict[str, list[dict[str, Any]]] | None:
        found = records_of(stack, execution.execution_id)
        events = {r["event"] for records in found.values() for r in records}
        return found if final_record in events and processes <= set(found) else None

    found = await wait_until(finished, within_s=15, what=f"{final_record} of the execution")
    problems = []
    for process, records in found.items():
        for record in records:
            missing = [f for f in required_fields(record) if f not in record]
            if (
                missing
                or record["request_id"] != request_id
                or record["exec_id"] != execution.execution_id
            ):
                problems.append(
                    (
                        process,
                        record["event"],
                        record.get("request_id"),
                        record.get("exec_id"),
                        missing,
                    )
                )
    assert problems == [], f"request id {request_id}: {problems}"
    return found


async def trace_of(
    pool: asyncpg.Pool, execution: Execution, last_span: str
) -> tuple[str, list[dict[str, Any]]]:
    """The id of the submit's trace and its spans, once ``last_span`` was exported."""
    traceparent = await pool.fetchval(
        "SELECT trace_context FROM executions WHERE id = $1::uuid", execution.execution_id
    )
    assert traceparent
    trace_id = "0x" + traceparent.split("-")[1]

    async def complete() -> list[dict[str, Any]] | None:
        spans = [s for s in _records(SPANS) if s["context"]["trace_id"] == trace_id]
        return spans if last_span in {s["name"] for s in spans} else None

    spans = await wait_until(complete, within_s=20, what=last_span, interval_s=0.2)
    return trace_id, spans


def events_in(found: dict[str, list[dict[str, Any]]], process: str) -> list[str]:
    return [r["event"] for r in found.get(process, [])]


async def test_immediate_execution(tenant: Tenant, ledger: Path) -> None:
    async with tenant.client("alice") as client:
        done = await client.submit(
            plan(probe_step("one", ["host:imm"], ledger)), tenant_id=tenant.id
        )
    assert (done.status, done.execution_mode) == ("succeeded", "immediate")
    found = await assert_correlated(tenant.stack, tenant.pool, done, processes={"api", "worker"})
    assert "execution_created" in events_in(found, "api")
    worker = events_in(found, "worker")
    assert {"execution_started", "step_finished", "execution_finished"} <= set(worker), worker


async def test_background_execution(
    tenant: Tenant, ledger: Path, workers: background.Workers
) -> None:
    await workers.start("worker-bg")
    async with tenant.client("alice") as client:
        queued = await client.submit(
            background_plan(ledger, steps=2, hold_s=0.05), tenant_id=tenant.id
        )
        assert queued.execution_mode == "background"
        final = await wait_terminal(client, queued, 30)
    assert final.status == "succeeded"
    found = await assert_correlated(
        tenant.stack, tenant.pool, queued, processes={"api", "worker-bg"}
    )
    started = next(r for r in found["worker-bg"] if r["event"] == "execution_started")
    assert started["queue_wait_ms"] is not None
    assert started["worker_id"] == "worker-bg"


async def test_approval_released_immediate_execution_level_1(tenant: Tenant, ledger: Path) -> None:
    await approvals_support.with_approvers(tenant)
    async with tenant.client("alice") as client, tenant.approvals("bob") as bob:
        submitted = await client.submit(modify_plan(ledger), tenant_id=tenant.id)
        assert (submitted.approval_level, submitted.execution_mode) == (1, "immediate")
        await bob.approve(submitted.approval_id or "", tenant_id=tenant.id)
        final = await wait_terminal(client, submitted, 30)
    assert final.status == "succeeded", (final.error_class, final.error_message)
    found = await assert_correlated(
        tenant.stack, tenant.pool, submitted, processes={"api", "approvals", "worker"}
    )
    assert "approval_decided" in events_in(found, "approvals")
    # The approvals service's call to the worker continues the submit's trace.
    _trace_id, spans = await trace_of(tenant.pool, submitted, "step restart")
    by_id = {s["context"]["span_id"]: s for s in spans}
    named = {s["name"]: s for s in spans}
    released = named["approval_released"]
    assert by_id[released["parent_id"]]["name"].endswith("/SubmitExecution")
    run = next(
        s
        for s in spans
        if s["name"].endswith("/RunImmediate")
        and s["resource"]["attributes"]["service.name"] == "opsconductor-worker"
    )
    assert by_id[by_id[run["parent_id"]]["parent_id"]] is released  # through the gRPC client
    assert by_id[named["step restart"]["parent_id"]] is run
    assert [s["parent_id"] for s in spans].count(None) == 1


async def test_approval_released_background_execution_level_2_is_one_trace(
    tenant: Tenant, ledger: Path, workers: background.Workers
) -> None:
    await approvals_support.with_approvers(tenant)
    await workers.start("worker-l2")
    deploy = deploy_plan(ledger)
    for step in deploy["steps"]:
        step["params"]["estimate_ms"] = 11_000  # long enough to be queued
    async with tenant.client("dave") as client, tenant.approvals("bob") as bob:
        submitted = await client.submit(deploy, tenant_id=tenant.id)
        assert (submitted.approval_level, submitted.execution_mode) == (2, "background")
        await bob.approve(submitted.approval_id or "", tenant_id=tenant.id)
        final = await wait_terminal(client, submitted, 30)
    assert final.status == "succeeded", (final.error_class, final.error_message)
    await assert_correlated(
        tenant.stack, tenant.pool, submitted, processes={"api", "approvals", "worker-l2"}
    )
    # One trace: the submit is its root; the approval's release, the queue wait, the run and
    # its step are in it, from the api, the approvals service and the worker.
    trace_id, spans = await trace_of(tenant.pool, submitted, "execution")
    roots = [s for s in spans if s["parent_id"] is None]
    assert [r["name"] for r in roots] == [
        "/opsconductor.execution.v1.ExecutionService/SubmitExecution"
    ]
    by_id = {s["context"]["span_id"]: s for s in spans}
    named = {s["name"]: s for s in spans}
    service = {s["name"]: s["resource"]["attributes"]["service.name"] for s in spans}
    assert (service[roots[0]["name"]], service["approval_released"]) == (
        "opsconductor-api",
        "opsconductor-approvals",
    )
    assert service["queue_wait"] == service["execution"] == service["step deploy"]
    assert service["step deploy"] == "opsconductor-worker"
    released = named["approval_released"]
    assert by_id[released["parent_id"]] is roots[0]
    # Linked to the approver's call, a trace of its own.
    assert [link["context"]["trace_id"] for link in released["links"]] != [trace_id]
    assert len(released["links"]) == 1
    assert by_id[named["queue_wait"]["parent_id"]] is released
    assert by_id[named["execution"]["parent_id"]] is released
    assert by_id[named["step deploy"]["parent_id"]]["name"] == "execution"


async def test_level_3_execution_resumed_after_each_step_approval(
    tenant: Tenant, ledger: Path, workers: background.Workers
) -> None:
    await approvals_support.with_approvers(tenant)
    await workers.start("worker-l3")
    async with tenant.client("alice") as client, tenant.approvals("bob") as bob:
        submitted = await client.submit(production_plan(ledger, steps=2), tenant_id=tenant.id)
        assert submitted.approval_level == 3
        await bob.approve(submitted.approval_id or "", tenant_id=tenant.id)
        for step_id in ("s1", "s2"):
            await wait_step_request(bob, submitted, step_id)
            await bob.approve_step(submitted.execution_id, step_id, tenant_id=tenant.id)
        final = await wait_terminal(client, submitted, 30)
    assert final.status == "succeeded", (final.error_class, final.error_message)
    found = await assert_correlated(
        tenant.stack, tenant.pool, submitted, processes={"api", "approvals", "worker-l3"}
    )
    worker = events_in(found, "worker-l3")
    assert worker.count("execution_started") >= 3, worker  # the first run, then one per resume

    # One trace still: the plan's approval and each step's release it, each run continues it.
    async def all_runs() -> list[dict[str, Any]] | None:
        _id, now = await trace_of(tenant.pool, submitted, "step s2")
        return now if [s["name"] for s in now].count("execution") >= 3 else None

    spans = await wait_until(all_runs, within_s=20, what="every run's span")
    assert [s["parent_id"] for s in spans].count(None) == 1
    names = [s["name"] for s in spans]
    assert names.count("approval_released") == 3, names
    by_id = {s["context"]["span_id"]: s for s in spans}
    assert all(
        by_id[s["parent_id"]]["name"] == "approval_released"
        for s in spans
        if s["name"] in ("execution", "queue_wait")
    )


async def test_takeover_after_a_sigkilled_worker(
    tenant: Tenant, e2e_pool: asyncpg.Pool, ledger: Path, workers: background.Workers
) -> None:
    worker_a = await workers.start("worker-a")
    async with tenant.client("alice") as client:
        submitted = await client.submit(background_plan(ledger), tenant_id=tenant.id)
        await wait_step_running(e2e_pool, submitted.execution_id, "s1", worker_id="worker-a")
        starting_b = workers.start_soon("worker-b")
        await wait_step_running(e2e_pool, submitted.execution_id, "s2", worker_id="worker-a")
        kill(worker_a)
        await starting_b
        final = await wait_terminal(client, submitted, 40)
    assert (final.status, final.worker_id) == ("succeeded", "worker-b")
    found = await assert_correlated(
        tenant.stack, tenant.pool, submitted, processes={"api", "worker-a", "worker-b"}
    )
    assert "execution_started" in events_in(found, "worker-a")
    assert "execution_finished" in events_in(found, "worker-b")


async def test_a_queued_execution_cancelled_before_any_worker_took_it(
    tenant: Tenant, ledger: Path
) -> None:
    """No consumer runs: the api's CancelExecution ends it at once, and its records there are
    the execution's."""
    async with tenant.client("alice") as client:
        queued = await client.submit(background_plan(ledger, steps=1), tenant_id=tenant.id)
        cancelled = await client.cancel(queued.execution_id, tenant_id=tenant.id, reason="stop")
    assert cancelled.status == "cancelled"
    found = await assert_correlated(
        tenant.stack, tenant.pool, queued, processes={"api"}, final_record="execution_transitioned"
    )
    assert events_in(found, "api").count("execution_transitioned") >= 2  # queued, cancelled


async def test_a_rejected_execution(tenant: Tenant, ledger: Path) -> None:
    await approvals_support.with_approvers(tenant)
    async with tenant.client("alice") as client, tenant.approvals("bob") as bob:
        submitted = await client.submit(modify_plan(ledger), tenant_id=tenant.id)
        await bob.reject(submitted.approval_id or "", tenant_id=tenant.id, comment="no")
        final = await client.get(submitted.execution_id, tenant_id=tenant.id)
    assert final.status == "rejected"
    found = await assert_correlated(
        tenant.stack,
        tenant.pool,
        submitted,
        processes={"api", "approvals"},
        final_record="approval_decided",
    )
    assert "execution_transitioned" in events_in(found, "approvals")


async def run_reaper_logged(stack: Stack, **env: str) -> None:
    """One reaper pass (the CronJob's ``--once``) logging to ``reaper.log`` of the stack."""
    worker_env = stack.services["worker"].extra_env
    with (stack.log_dir / "reaper.log").open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "opsconductor.worker.reaper",
            "--once",
            env=service_env(stack.dsn, {**worker_env, **env}),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        assert await asyncio.wait_for(process.wait(), 60) == 0


async def test_an_execution_the_reaper_ends_after_its_worker_died(
    tenant: Tenant, e2e_pool: asyncpg.Pool, ledger: Path, workers: background.Workers
) -> None:
    """worker-a is SIGKILLed mid-run and nobody takes over before the deadline: the reaper's
    pass ends it failed (timed out), and its records of it are the execution's too."""
    worker_a = await workers.start("worker-a")
    async with tenant.client("alice") as client:
        submitted = await client.submit(background_plan(ledger), tenant_id=tenant.id)
        await wait_step_running(e2e_pool, submitted.execution_id, "s1", worker_id="worker-a")
        kill(worker_a)
        await e2e_pool.execute(
            "UPDATE executions SET deadline_at = now() - interval '1 hour' WHERE id = $1::uuid",
            submitted.execution_id,
        )
        await run_reaper_logged(tenant.stack, OPSC_REAPER_DEADLINE_GRACE_S="0")
        final = await wait_terminal(client, submitted, 10)
    assert (final.status, final.timed_out) == ("failed", True)
    found = await assert_correlated(
        tenant.stack,
        tenant.pool,
        submitted,
        processes={"api", "worker-a", "reaper"},
        final_record="execution_transitioned",
    )
    assert "execution_transitioned" in events_in(found, "reaper")


async def test_an_execution_whose_approval_expires(tenant: Tenant, ledger: Path) -> None:
    """Nobody decides: the reaper's pass expires the request and ends the execution failed."""
    await approvals_support.with_approvers(tenant)
    async with tenant.client("alice") as client:
        submitted = await client.submit(modify_plan(ledger), tenant_id=tenant.id)
        await tenant.pool.execute(
            "UPDATE approvals SET expires_at = clock_timestamp() WHERE id = $1::uuid",
            submitted.approval_id,
        )
        await run_reaper_logged(tenant.stack)
        final = await client.get(submitted.execution_id, tenant_id=tenant.id)
    assert (final.status, final.error_class) == ("failed", "APPROVAL_EXPIRED")
    found = await assert_correlated(
        tenant.stack,
        tenant.pool,
        submitted,
        processes={"api", "reaper"},
        final_record="execution_transitioned",
    )
    assert "execution_transitioned" in events_in(found, "reaper")
