"""Worker faults on the background path, with real worker processes (issue 4 acceptance).

Every worker here leases jobs for 3 s (``OPSC_LEASE_S_OVERRIDE``, drills only) instead of the
policy's 35 s, so a dead or paused worker's job is free again within seconds; everything else —
Redis, Postgres, fencing, the probe's ledger of side effects — is the real thing. The stack's own
worker consumes nothing (``OPSC_CONSUMER_CONCURRENCY=0``): each test starts the workers it
needs, so which worker takes a job is never left to chance.

Probe ledger semantics: a call appends its line when it *ends*. A call SIGKILLed mid-hold leaves
no line; a call paused with SIGSTOP ends (and writes ``ok``) when resumed.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from opsc_test_actions import read_ledger

from . import background
from .background import (
    background_plan,
    completed_by_key,
    event_rows,
    execution_row,
    kill,
    log_events,
    open_queue,
    queue_row,
    run_reaper_once,
    step_rows,
    wait_exit,
    wait_job_gone,
    wait_step_running,
    wait_terminal,
)
from .conftest import Tenant, running_stack
from .inspection import wait_until
from .plans import plan, probe_step
from .stack import ServiceProcess, Stack

workers = background.workers


@pytest.fixture(scope="module")
async def stack(e2e_dsn: str, e2e_pool: asyncpg.Pool, redis_url: str) -> AsyncIterator[Stack]:
    """A real Redis (under this module's key prefix); the stack's worker consumes nothing."""
    async with running_stack(e2e_dsn, redis_url, OPSC_CONSUMER_CONCURRENCY="0") as running:
        yield running


def keys(execution_id: str, *step_ids: str) -> list[str]:
    return [f"{execution_id}:{step_id}" for step_id in step_ids]


async def test_sigkilled_worker_is_taken_over_after_its_lease_and_each_step_runs_once(
    tenant: Tenant, e2e_pool: asyncpg.Pool, ledger: Path, workers: background.Workers
) -> None:
    """Crash: worker-a is SIGKILLed while step 2 of 3 runs. Nothing happens until its lease
    expires; then worker-b takes the job over (a ``lease_taken_over`` event), keeps step 1's
    result, runs steps 2 and 3, and the execution ends ``succeeded`` as worker-b's. Every step
    completed exactly once per idempotency key: the killed call of step 2 never completed (no
    ledger line), worker-b's did."""
    worker_a = await workers.start("worker-a")
    async with tenant.client("alice") as client:
        submitted = await client.submit(background_plan(ledger), tenant_id=tenant.id)
        assert submitted.execution_mode == "background"
        exec_id, job_id = submitted.execution_id, submitted.job_id
        assert job_id is not None
        await wait_step_running(e2e_pool, exec_id, "s1", worker_id="worker-a")
        # Started before the crash: the job is leased, so worker-b can only take it over.
        starting_b = workers.start_soon("worker-b")
        await wait_step_running(e2e_pool, exec_id, "s2", worker_id="worker-a")
        kill(worker_a)
        async with open_queue(tenant.stack) as queue:
            job = await queue.get(job_id)
        assert job is not None
        assert job.worker_id == "worker-a"
        last_lease_deadline = job.lease_deadline  # worker-a can renew no more
        worker_b = await starting_b
        final = await wait_terminal(client, submitted, 40)

    assert final.status == "succeeded", (final.error_class, final.error_message)
    assert final.worker_id == "worker-b"
    lines = read_ledger(ledger)
    assert completed_by_key(lines) == dict.fromkeys(keys(exec_id, "s1", "s2", "s3"), 1)
    assert len(lines) == 3  # the call killed mid-hold left nothing
    by_step = {line["step_id"]: line["pid"] for line in lines}
    assert by_step == {
        "s1": worker_a.process.pid,
        "s2": worker_b.process.pid,
        "s3": worker_b.process.pid,
    }
    steps = await step_rows(e2e_pool, exec_id)
    assert {s: (r["status"], r["worker_id"]) for s, r in steps.items()} == {
        "s1": ("succeeded", "worker-a"),
        "s2": ("succeeded", "worker-b"),
        "s3": ("succeeded", "worker-b"),
    }
    takeovers = [e for e in await event_rows(e2e_pool, exec_id) if e["type"] == "lease_taken_over"]
    assert len(takeovers) == 1
    assert takeovers[0]["actor_id"] == "worker-b"
    assert takeovers[0]["payload"]["previous_worker_id"] == "worker-a"
    assert takeovers[0]["payload"]["steps_reset"] == ["s2"]
    # Not before worker-a's lease had run out.
    assert takeovers[0]["created_at"].timestamp() >= last_lease_deadline
    await wait_job_gone(e2e_pool, exec_id)


async def _pause_outside_a_transaction(worker: ServiceProcess, pool: asyncpg.Pool) -> None:
    """SIGSTOP ``worker`` at a moment it holds no open Postgres transaction (a paused holder of
    the execution's row lock would stall its successor, which is not what is tested here)."""

    async def paused_cleanly() -> bool:
        os.kill(worker.process.pid, signal.SIGSTOP)
        # Any client of this database mid-statement or mid-transaction might be the paused one.
        busy = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
            "AND (state = 'active' OR state LIKE 'idle in transaction%')"
        )
        if busy == 0:
            return True
        os.kill(worker.process.pid, signal.SIGCONT)
        return False

    await wait_until(paused_cleanly, within_s=10, what="a pause outside any transaction")


async def test_paused_worker_resumed_after_takeover_writes_nothing(
    tenant: Tenant, e2e_pool: asyncpg.Pool, ledger: Path, workers: background.Workers
) -> None:
    """Zombie: worker-a is SIGSTOPped during step 2, past its lease; worker-b takes over and
    finishes. Resumed with SIGCONT, worker-a completes its in-flight probe call (same step
    idempotency key — the system acted upon is what deduplicates it) but every Postgres write
    it then attempts is fenced off: the execution, its steps and its events stay exactly as
    worker-b left them, and worker-a logs ``lease_lost`` and keeps serving."""
    worker_a = await workers.start("worker-a")
    async with tenant.client("alice") as client:
        submitted = await client.submit(background_plan(ledger), tenant_id=tenant.id)
        exec_id, job_id = submitted.execution_id, submitted.job_id
        assert job_id is not None
        await wait_step_running(e2e_pool, exec_id, "s1", worker_id="worker-a")
        starting_b = workers.start_soon("worker-b")
        await wait_step_running(e2e_pool, exec_id, "s2", worker_id="worker-a")
        await _pause_outside_a_transaction(worker_a, e2e_pool)
        worker_b = await starting_b
        final = await wait_terminal(client, submitted, 40)
        assert final.status == "succeeded", (final.error_class, final.error_message)
        record_before = await execution_row(e2e_pool, exec_id)
        steps_before = await step_rows(e2e_pool, exec_id)
        events_before = await event_rows(e2e_pool, exec_id)

        os.kill(worker_a.process.pid, signal.SIGCONT)

        async def lease_lost() -> bool:
            return any(e.get("event") == "lease_lost" for e in log_events(worker_a))

        await wait_until(lease_lost, within_s=15, what="worker-a to log lease_lost")

        # Its lease renewal may notice first: the in-flight s2 call completes a moment later.
        async def late_call_done() -> bool:
            return completed_by_key(read_ledger(ledger)).get(f"{exec_id}:s2") == 2

        await wait_until(late_call_done, within_s=15, what="worker-a's in-flight s2 call to end")

        # Whatever worker-a still tries after noticing is fenced too; it is alive and well.
        async def a_quiet() -> bool:
            lines = [e for e in log_events(worker_a) if e.get("event") == "job_processing_failed"]
            assert not lines, lines
            return worker_a.process.poll() is None

        await wait_until(a_quiet, within_s=5, what="worker-a alive")
        after = await client.get(exec_id, tenant_id=tenant.id)

    assert after.status == "succeeded"
    assert after.worker_id == "worker-b"
    assert await execution_row(e2e_pool, exec_id) == record_before
    assert await step_rows(e2e_pool, exec_id) == steps_before
    events = await event_rows(e2e_pool, exec_id)
    assert events == events_before
    takeover = next(e["seq"] for e in events if e["type"] == "lease_taken_over")
    assert all(e["actor_id"] != "worker-a" for e in events if e["seq"] > takeover)
    assert events[-1]["type"] == "execution_completed"
    assert {s: r["worker_id"] for s, r in steps_before.items()} == {
        "s1": "worker-a",
        "s2": "worker-b",
        "s3": "worker-b",
    }
    # The side effects: s1 and s3 once; s2 by worker-b and, late, by the resumed worker-a.
    lines = read_ledger(ledger)
    assert completed_by_key(lines) == {
        f"{exec_id}:s1": 1,
        f"{exec_id}:s2": 2,
        f"{exec_id}:s3": 1,
    }
    s2 = sorted(
        (line for line in lines if line["step_id"] == "s2"), key=lambda line: line["end_ns"]
    )
    assert [line["pid"] for line in s2] == [worker_b.process.pid, worker_a.process.pid]


async def test_sigterm_requeues_the_job_unspent_and_another_worker_finishes_it(
    tenant: Tenant, e2e_pool: asyncpg.Pool, ledger: Path, workers: background.Workers
) -> None:
    """SIGTERM mid-job: worker-a finishes the step it is running, puts the job back without
    spending an attempt (Redis and ``execution_queue`` attempts stay 0; an
    ``execution_requeued`` event with reason ``shutdown``) and exits 0 within its 5 s grace
    period. worker-b then runs only what is left; the execution succeeds, each step once."""
    grace_s = 5.0
    worker_a = await workers.start("worker-a", OPSC_SHUTDOWN_GRACE_S=str(grace_s))
    async with tenant.client("alice") as client:
        submitted = await client.submit(background_plan(ledger), tenant_id=tenant.id)
        exec_id, job_id = submitted.execution_id, submitted.job_id
        assert job_id is not None
        await wait_step_running(e2e_pool, exec_id, "s2", worker_id="worker-a")
        signalled = time.monotonic()
        worker_a.process.send_signal(signal.SIGTERM)
        code = await wait_exit(worker_a, within_s=grace_s + 5)
        took = time.monotonic() - signalled
        assert code == 0
        assert took < grace_s, f"worker-a took {took:.2f} s to exit"

        # Between the two workers: back in line, no attempt spent.
        record = await execution_row(e2e_pool, exec_id)
        assert record["status"] == "queued"
        assert record["lease_token"] is None
        row = await queue_row(e2e_pool, exec_id)
        assert row is not None
        assert (row["state"], row["attempts"], row["lease_token"]) == ("ready", 0, None)
        async with open_queue(tenant.stack) as queue:
            job = await queue.get(job_id)
        assert job is not None
        assert (job.state, job.attempts, job.lease_expirations) == ("ready", 0, 0)
        steps = await step_rows(e2e_pool, exec_id)
        assert {s: r["status"] for s, r in steps.items()} == {
            "s1": "succeeded",
            "s2": "succeeded",
            "s3": "pending",
        }
        requeued = [
            e for e in await event_rows(e2e_pool, exec_id) if e["type"] == "execution_requeued"
        ]
        assert len(requeued) == 1
        assert requeued[0]["payload"]["reason"] == "shutdown"
        assert requeued[0]["actor_id"] == "worker-a"

        worker_b = await workers.start("worker-b")
        final = await wait_terminal(client, submitted, 30)

    assert final.status == "succeeded", (final.error_class, final.error_message)
    assert final.worker_id == "worker-b"
    lines = read_ledger(ledger)
    assert completed_by_key(lines) == dict.fromkeys(keys(exec_id, "s1", "s2", "s3"), 1)
    assert {line["step_id"]: line["pid"] for line in lines} == {
        "s1": worker_a.process.pid,
        "s2": worker_a.process.pid,
        "s3": worker_b.process.pid,
    }
    assert any(e.get("event") == "job_requeued_on_shutdown" for e in log_events(worker_a))


async def test_reaper_requeues_a_dead_workers_lease_then_fails_it_past_its_deadline(
    tenant: Tenant, e2e_pool: asyncpg.Pool, ledger: Path, workers: background.Workers
) -> None:
    """A running execution whose only worker was SIGKILLed, with no other worker: one reaper
    pass after the lease ran out requeues the job (a lease expiration counted, an attempt
    spent) while the execution, still within its 10 s ``fast`` deadline, stays running; one
    pass after deadline + grace (``OPSC_REAPER_DEADLINE_GRACE_S=1``) ends it ``failed``,
    timed out with ``EXECUTION_TIMEOUT``, the cut-off step failed, the rest skipped, and its job
    out of both Redis and ``execution_queue``."""
    worker_a = await workers.start("worker-a", OPSC_LEASE_S_OVERRIDE="2")
    short = plan(
        probe_step("s1", ["db-9"], ledger, hold_s=3.0),
        probe_step("s2", ["db-9"], ledger, hold_s=3.0),
        sla="fast",
    )
    async with tenant.client("alice") as client:
        submitted = await client.submit(short, tenant_id=tenant.id, requested_mode="background")
        assert submitted.execution_mode == "background"
        exec_id, job_id = submitted.execution_id, submitted.job_id
        assert job_id is not None
        await wait_step_running(e2e_pool, exec_id, "s1", worker_id="worker-a")
        kill(worker_a)

        async with open_queue(tenant.stack) as queue:

            async def lease_expired() -> bool:
                job = await queue.get(job_id)
                assert job is not None
                return job.lease_deadline is not None and job.lease_deadline < queue.now()

            await wait_until(lease_expired, within_s=10, what="worker-a's lease to run out")
            first = await run_reaper_once(tenant.stack, OPSC_REAPER_DEADLINE_GRACE_S="1")
            assert (first["leases_requeued"], first["deadlines_failed"]) == (1, 0), first
            job = await queue.get(job_id)
            assert job is not None
            assert (job.state, job.attempts, job.lease_expirations) == ("ready", 1, 1)
            record = await execution_row(e2e_pool, exec_id)
            assert record["status"] == "running"
            # Its followers learn of it now, not only when the deadline fails it.
            expired = [
                e for e in await event_rows(e2e_pool, exec_id) if e["type"] == "lease_expired"
            ]
            assert [(e["actor_id"], e["payload"]) for e in expired] == [
                ("reaper", {"worker_id": "worker-a", "lease_expirations": 1})
            ]

            async def overdue() -> bool:
                return bool(
                    await e2e_pool.fetchval(
                        "SELECT clock_timestamp() > deadline_at + interval '1.2 seconds' "
                        "FROM executions WHERE id = $1",
                        record["id"],
                    )
                )

            await wait_until(overdue, within_s=15, what="deadline + grace to pass", interval_s=0.1)
            second = await run_reaper_once(tenant.stack, OPSC_REAPER_DEADLINE_GRACE_S="1")
            assert second["deadlines_failed"] == 1, second
            assert await queue.get(job_id) is None
        final = await client.get(exec_id, tenant_id=tenant.id)

    assert final.status == "failed"
    assert final.timed_out
    assert final.error_class == "EXECUTION_TIMEOUT"
    steps = await step_rows(e2e_pool, exec_id)
    assert {s: (r["status"], r["error_class"]) for s, r in steps.items()} == {
        "s1": ("failed", "EXECUTION_TIMEOUT"),
        "s2": ("skipped", None),
    }
    assert await queue_row(e2e_pool, exec_id) is None
    events = await event_rows(e2e_pool, exec_id)
    assert events[-1]["type"] == "execution_completed"
    assert events[-1]["actor_id"] == "reaper"
    assert read_ledger(ledger) == []  # the only call was killed mid-hold
