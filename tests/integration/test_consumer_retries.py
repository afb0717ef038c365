"""Retries, the dead-letter queue and DLQ requeue, with a queue clock the test moves.

The worker's real ``BackgroundConsumer`` (real runner, real ``probe`` action, real Postgres and
Redis) processes jobs the api's real ``Submissions`` queued; only the queue's clock is the
test's, so the ``2^attempt`` s backoff is checked to the millisecond without waiting for it.
The requeue side is the api's ``AdminOperations`` (spec §4.1: a dead-lettered execution is
``failed``, a terminal state; a requeue creates a new execution of the same frozen plan).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import pytest
import structlog.testing
from opsc_test_actions import read_ledger
from redis.asyncio import Redis

from opsconductor.actions.planning import ExecutionMode
from opsconductor.actions.registry import default_registry
from opsconductor.api.logic.admin import AdminOperations, parse_dlq_id
from opsconductor.api.logic.dlq_requeue import DLQ_REQUEUED_EVENT, DeadLetterNotRequeueableError
from opsconductor.api.logic.submission import Submissions, SubmitRequest
from opsconductor.client.worker import WorkerClient
from opsconductor.common.approval_policy import ApprovalPolicy
from opsconductor.common.auth import Principal
from opsconductor.common.errors import (
    ConflictError,
    FeatureDisabledError,
    InvalidArgumentError,
    QueueUnavailableError,
)
from opsconductor.common.secrets import SecretResolver
from opsconductor.lifecycle.facade import PostgresRedisLifecycle
from opsconductor.lifecycle.queue import RedisQueue, create_redis_client, jobs
from opsconductor.lifecycle.queue.dlq import DlqEntryRequeuedError, list_dlq, move_to_dlq
from opsconductor.lifecycle.storage.audit_chain import verify_chain
from opsconductor.lifecycle.storage.cancellation import CancelSignals
from opsconductor.lifecycle.storage.execution_reads import get_execution
from opsconductor.lifecycle.storage.execution_stats import ObservedDurations
from opsconductor.lifecycle.storage.executions import retire_idempotency_key
from opsconductor.lifecycle.storage.flags import SYSTEM_TENANT, FlagCache, update_flags
from opsconductor.lifecycle.storage.policies import TimeoutPolicy, load_timeout_policies
from opsconductor.lifecycle.storage.role_bindings import bind_role, unbind_role
from opsconductor.policy.rbac import Authorizer, RbacPolicy
from opsconductor.worker.logic.consumer import INITIAL_LEASE_S, BackgroundConsumer
from opsconductor.worker.logic.runner import ExecutionRunner
from tests.integration.test_queue_redis import FakeClock

TENANT = "tenant-retry"
WORKER = "worker-retry"
SUBMITTER = Principal(actor_id="alice", tenant_id=TENANT)
SYSTEM_ADMIN = Principal(actor_id="root", tenant_id=SYSTEM_TENANT)


@dataclass
class Rig:
    pool: asyncpg.Pool
    queue: RedisQueue
    clock: FakeClock
    policies: dict[str, TimeoutPolicy]
    submissions: Submissions
    consumer: BackgroundConsumer
    admin: AdminOperations
    flags: FlagCache
    authorizer: Authorizer

    def admin_with_queue(self, queue: RedisQueue) -> AdminOperations:
        """AdminOperations on another queue (e.g. an unreachable Redis)."""
        return AdminOperations(
            pool=self.pool,
            authorizer=self.authorizer,
            flags=self.flags,
            lifecycle=PostgresRedisLifecycle(self.pool, queue),
            policies=self.policies,
            dedup_window=timedelta(hours=24),
        )


@pytest.fixture
async def rig(
    db_pool: asyncpg.Pool, db_dsn: str, redis_client: Redis, redis_prefix: str
) -> AsyncIterator[Rig]:
    await update_flags(db_pool, {"stage_e_enabled": True, "all_tenants_enabled": True}, by="test")
    await bind_role(db_pool, TENANT, SUBMITTER.actor_id, "operator", created_by="test")
    await bind_role(db_pool, SYSTEM_TENANT, SYSTEM_ADMIN.actor_id, "admin", created_by="test")
    clock = FakeClock(start=float(int(time.time())))
    queue = RedisQueue(redis_client, prefix=redis_prefix, clock=clock)
    policies = await load_timeout_policies(db_pool)
    rbac = RbacPolicy.load()
    flags = FlagCache(db_pool)
    api_authorizer = Authorizer(db_pool, rbac, tier="api")
    # Never called: every plan here runs in the background.
    worker_port = WorkerClient("127.0.0.1:9")
    cancel_signals = CancelSignals(db_dsn)
    await cancel_signals.start()
    lifecycle = PostgresRedisLifecycle(db_pool, queue)
    runner = ExecutionRunner(
        lifecycle=lifecycle,
        pool=db_pool,
        handlers=default_registry(),
        secrets=SecretResolver([]),
        cancel_signals=cancel_signals,
        policies=policies,
        worker_id=WORKER,
    )
    try:
        yield Rig(
            pool=db_pool,
            queue=queue,
            clock=clock,
            policies=policies,
            submissions=Submissions(
                pool=db_pool,
                authorizer=api_authorizer,
                actions=default_registry(),
                flags=flags,
                policies=policies,
                approval_policy=ApprovalPolicy.load(),
                observed=ObservedDurations(db_pool),
                worker=worker_port,
                lifecycle=lifecycle,
                dedup_window=timedelta(hours=24),
            ),
            consumer=BackgroundConsumer(
                lifecycle=lifecycle,
                runner=runner,
                authorizer=Authorizer(db_pool, rbac, tier="worker"),
                policies=policies,
                worker_id=WORKER,
                concurrency=1,
            ),
            admin=AdminOperations(
                pool=db_pool,
                authorizer=api_authorizer,
                flags=flags,
                lifecycle=lifecycle,
                policies=policies,
                dedup_window=timedelta(hours=24),
            ),
            flags=flags,
            authorizer=api_authorizer,
        )
    finally:
        await cancel_signals.stop()
        await worker_port.close()


def probe_plan(ledger: Path, *, sla: str = "medium", **params: Any) -> dict[str, Any]:
    return {
        "name": f"retry-{ledger.parent.name}-{sla}",
        "sla_class": sla,
        "steps": [
            {
                "id": "probe",
                "action": "probe",
                "action_class": "read",
                "targets": [{"ref": "db:retry"}],
                "params": {"ledger": str(ledger), **params},
            }
        ],
    }


async def submit(rig: Rig, plan: dict[str, Any]) -> tuple[UUID, UUID]:
    """Queue ``plan`` in the background; returns (execution id, job id)."""
    result = await rig.submissions.submit(
        SUBMITTER,
        "",
        SubmitRequest(tenant_id=TENANT, plan=plan, requested_mode=ExecutionMode.BACKGROUND),
    )
    assert result.job_id is not None
    assert result.execution.status == "queued"
    return result.execution.id, result.job_id


async def run_next(rig: Rig) -> UUID:
    """Dequeue the job that is due now and let the consumer process it; returns its job id."""
    job = await rig.queue.dequeue(WORKER, INITIAL_LEASE_S)
    assert job is not None, "no job was due"
    await rig.consumer.process(job)
    return job.job_id


async def dead_letter(rig: Rig, plan: dict[str, Any]) -> tuple[UUID, UUID]:
    """Submit an always-failing ``plan`` and run it until dead-lettered; (execution, dlq id)."""
    execution_id, job_id = await submit(rig, plan)
    while True:
        await run_next(rig)
        row = await jobs.get_queue_row(rig.pool, job_id)
        if row is None:
            break
        rig.clock.now = row.available_at.timestamp()
    dlq_id = await rig.pool.fetchval(
        "SELECT id FROM execution_dlq WHERE execution_id = $1", execution_id
    )
    assert dlq_id is not None
    return execution_id, dlq_id


async def event_types(pool: asyncpg.Pool, execution_id: UUID) -> list[str]:
    rows = await pool.fetch(
        "SELECT type FROM execution_events WHERE execution_id = $1 ORDER BY seq", execution_id
    )
    return [row["type"] for row in rows]


async def test_a_failing_job_is_dead_lettered_after_exactly_max_attempts_with_doubling_backoff(
    rig: Rig, tmp_path: Path
) -> None:
    """Spec §5.2 with sla medium (max_attempts 5): attempts start 2, 4, 8 and 16 s apart on the
    queue's clock, the job is not handed out a millisecond before its backoff ends, and after
    the fifth failure it is in ``execution_dlq`` once, its execution ``failed``."""
    ledger = tmp_path / "ledger.jsonl"
    execution_id, job_id = await submit(rig, probe_plan(ledger, fail=True))
    policy = rig.policies["medium_read"]
    assert policy.max_attempts == 5
    started_at: list[float] = []
    recorded_delays: list[float] = []
    for attempt in range(1, policy.max_attempts + 1):
        started_at.append(rig.clock.now)
        assert await run_next(rig) == job_id
        row = await jobs.get_queue_row(rig.pool, job_id)
        if attempt == policy.max_attempts:
            assert row is None, "the last attempt must leave the queue"
            break
        assert row is not None
        assert (row.state, row.attempts) == ("delayed", attempt)
        retry_at = row.available_at.timestamp()
        recorded_delays.append(retry_at - rig.clock.now)
        rig.clock.now = retry_at - 0.001
        assert await rig.queue.dequeue(WORKER, INITIAL_LEASE_S) is None, "handed out too early"
        rig.clock.now = retry_at

    assert recorded_delays == pytest.approx([2, 4, 8, 16], abs=0.001)
    gaps = [b - a for a, b in itertools.pairwise(started_at)]
    assert gaps == pytest.approx([2, 4, 8, 16], abs=0.001)

    outcomes = read_ledger(ledger)
    assert [line["outcome"] for line in outcomes] == ["failed"] * 5
    assert {line["idempotency_key"] for line in outcomes} == {f"{execution_id}:probe"}
    entries = await rig.pool.fetch(
        "SELECT * FROM execution_dlq WHERE execution_id = $1", execution_id
    )
    assert len(entries) == 1
    assert entries[0]["attempts"] == 5
    assert entries[0]["requeued_at"] is None
    record = await get_execution(rig.pool, TENANT, execution_id)
    assert (record.status, record.attempts) == ("failed", 5)
    assert record.error_class == entries[0]["error_class"] == "ACTION_FAILED"
    types = await event_types(rig.pool, execution_id)
    assert types.count("execution_requeued") == 4
    # Each retry is announced with its attempt; the DLQ move is the event before the end.
    assert types.count("retry_scheduled") == 4
    assert types[-2:] == ["moved_to_dlq", "execution_completed"]
    assert not await rig.queue.exists(job_id)
    # Each settle wrote its event with it (one statement each): payloads and the audit chain.
    payloads = {
        row["type"]: row["payload"]
        for row in await rig.pool.fetch(
            "SELECT type, payload FROM execution_events WHERE execution_id = $1 ORDER BY seq",
            execution_id,
        )
    }
    assert payloads["moved_to_dlq"] == {
        "dlq_id": str(entries[0]["id"]),
        "attempts": 5,
        "error_class": "ACTION_FAILED",
    }
    last_retry = payloads["retry_scheduled"]
    assert (last_retry["attempts"], last_retry["error_class"]) == (4, "ACTION_FAILED")
    assert datetime.fromisoformat(last_retry["available_at"]).timestamp() == pytest.approx(
        started_at[-1], abs=0.001
    )
    assert (await verify_chain(rig.pool, TENANT, execution_id)).intact


async def test_a_requeued_dead_letter_runs_again_as_a_new_execution_with_a_fresh_budget(
    rig: Rig, tmp_path: Path
) -> None:
    """RequeueDlqEntry creates a new execution of the same frozen plan (same hashes and key,
    the old key retired), queued with a fresh budget, linked both ways and audited on the NEW
    execution; the dead-lettered execution is left exactly as it ended."""
    ledger = tmp_path / "ledger.jsonl"
    old_id, dlq_id = await dead_letter(rig, probe_plan(ledger, sla="fast", fail=True))
    old_before = await get_execution(rig.pool, TENANT, old_id)
    old_events = await event_types(rig.pool, old_id)

    result = await rig.admin.requeue_dlq(SYSTEM_ADMIN, dlq_id, request_id="req-requeue-1")

    new = result.execution
    assert new.id != old_id
    assert (new.status, new.execution_mode, new.attempts) == ("queued", "background", 0)
    assert (new.tenant_id, new.actor_id, new.request_id) == (TENANT, "alice", "req-requeue-1")
    assert new.plan_snapshot == old_before.plan_snapshot
    assert (new.plan_hash, new.plan_snapshot_hash, new.idempotency_key) == (
        old_before.plan_hash,
        old_before.plan_snapshot_hash,
        old_before.idempotency_key,
    )
    assert new.last_transition_by == "root"
    assert [s.step_id for s in new.steps] == ["probe"]
    assert result.entry.requeued_by == "root"
    assert result.entry.requeued_at is not None

    old_after = await get_execution(rig.pool, TENANT, old_id)
    assert old_after.idempotency_retired_at is not None
    assert (old_after.status, old_after.event_seq) == ("failed", old_before.event_seq)
    assert await event_types(rig.pool, old_id) == old_events
    assert old_events[-1] == "execution_completed"

    assert await event_types(rig.pool, new.id) == [
        "execution_started",
        DLQ_REQUEUED_EVENT,
        "execution_queued",
    ]
    audit = await rig.pool.fetchrow(
        "SELECT actor_id, payload FROM execution_events WHERE execution_id = $1 AND type = $2",
        new.id,
        DLQ_REQUEUED_EVENT,
    )
    assert audit["actor_id"] == "root"
    assert audit["payload"]["requeued_from"] == str(old_id)
    assert audit["payload"]["dlq_id"] == str(dlq_id)
    assert audit["payload"]["job_id"] == str(result.job_id)

    row = await jobs.get_queue_row(rig.pool, result.job_id)
    assert row is not None
    assert (row.execution_id, row.attempts, row.max_attempts, row.state) == (new.id, 0, 3, "ready")
    snapshot = await rig.queue.get(result.job_id)
    assert snapshot is not None
    assert (snapshot.state, snapshot.attempts, snapshot.max_attempts) == ("ready", 0, 3)
    assert await list_dlq(rig.pool) == ([], None)

    # The new execution really runs (and, the probe failing for good, spends its own budget).
    assert await run_next(rig) == result.job_id
    assert [line["execution_id"] for line in read_ledger(ledger)][-1] == str(new.id)
    assert (await jobs.get_queue_row(rig.pool, result.job_id)) is not None

    with pytest.raises(DlqEntryRequeuedError, match=f"as execution {new.id}"):
        await rig.admin.requeue_dlq(SYSTEM_ADMIN, dlq_id)


async def test_concurrent_requeues_of_one_entry_create_exactly_one_execution(
    rig: Rig, tmp_path: Path
) -> None:
    """Twenty admins requeueing the same entry at once: one wins, the others are refused with
    DLQ_ENTRY_ALREADY_REQUEUED, and only one new execution and one job exist."""
    old_id, dlq_id = await dead_letter(
        rig, probe_plan(tmp_path / "ledger.jsonl", sla="fast", fail=True)
    )
    outcomes = await asyncio.gather(
        *(rig.admin.requeue_dlq(SYSTEM_ADMIN, dlq_id) for _ in range(20)), return_exceptions=True
    )
    winners = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, DlqEntryRequeuedError)]
    assert len(winners) == 1, outcomes
    assert len(refused) == 19, outcomes
    assert all(e.reason == "DLQ_ENTRY_ALREADY_REQUEUED" for e in refused)
    executions = await rig.pool.fetchval(
        "SELECT count(*) FROM executions WHERE tenant_id = $1", TENANT
    )
    assert executions == 2
    assert await rig.pool.fetchval("SELECT count(*) FROM execution_queue") == 1
    assert await rig.queue.all_job_ids() == {winners[0].job_id}
    assert old_id != winners[0].execution.id


async def test_a_requeue_that_cannot_reach_redis_leaves_no_trace(rig: Rig, tmp_path: Path) -> None:
    """Redis down at requeue: QUEUE_UNAVAILABLE, and the entry is still open, no execution was
    created and the old key is still live (the same requeue works once Redis is back)."""
    old_id, dlq_id = await dead_letter(
        rig, probe_plan(tmp_path / "ledger.jsonl", sla="fast", fail=True)
    )
    dead = create_redis_client("redis://127.0.0.1:9/0", socket_timeout=0.5, retries=0)
    try:
        with pytest.raises(QueueUnavailableError):
            await rig.admin_with_queue(RedisQueue(dead)).requeue_dlq(SYSTEM_ADMIN, dlq_id)
    finally:
        await dead.aclose()
    assert await rig.pool.fetchval("SELECT count(*) FROM executions") == 1
    entries, _ = await list_dlq(rig.pool)
    assert [(e.id, e.requeued_at) for e in entries] == [(dlq_id, None)]
    old = await get_execution(rig.pool, TENANT, old_id)
    assert old.idempotency_retired_at is None
    result = await rig.admin.requeue_dlq(SYSTEM_ADMIN, dlq_id)
    assert result.execution.status == "queued"


async def test_a_requeue_is_refused_while_a_live_execution_of_the_plan_holds_its_key(
    rig: Rig, tmp_path: Path
) -> None:
    """The plan was submitted again after the dead-lettered run's key was retired: requeueing
    the old entry would run it twice, so it is refused (CONFLICT) and nothing changes."""
    plan = probe_plan(tmp_path / "ledger.jsonl", sla="fast", fail=True)
    old_id, dlq_id = await dead_letter(rig, plan)
    assert await retire_idempotency_key(rig.pool, old_id)
    live_id, _ = await submit(rig, plan)
    with pytest.raises(ConflictError, match=str(live_id)):
        await rig.admin.requeue_dlq(SYSTEM_ADMIN, dlq_id)
    entries, _ = await list_dlq(rig.pool)
    assert [e.id for e in entries] == [dlq_id]
    assert await rig.pool.fetchval("SELECT count(*) FROM executions") == 2


async def test_requeue_refusals_name_their_reason_and_leave_the_entry_open(
    rig: Rig, tmp_path: Path
) -> None:
    """A requeue is refused, with a reason saying what to do, when: the id is no UUID; the
    tenant is no longer enabled for Stage E; the execution's timeout policy is gone; it needed
    an approval; it has not ended; no queue is configured. Each refusal changes nothing."""
    with pytest.raises(InvalidArgumentError, match="dlq_id"):
        parse_dlq_id("not-a-uuid")
    old_id, dlq_id = await dead_letter(
        rig, probe_plan(tmp_path / "ledger.jsonl", sla="fast", fail=True)
    )

    await update_flags(rig.pool, {"all_tenants_enabled": False}, by="test")
    rig.flags.invalidate()
    with pytest.raises(FeatureDisabledError):
        await rig.admin.requeue_dlq(SYSTEM_ADMIN, dlq_id)
    await update_flags(rig.pool, {"all_tenants_enabled": True}, by="test")
    rig.flags.invalidate()

    no_policies = AdminOperations(
        pool=rig.pool,
        authorizer=rig.authorizer,
        flags=rig.flags,
        lifecycle=PostgresRedisLifecycle(rig.pool, rig.queue),
        policies={},
    )
    with pytest.raises(DeadLetterNotRequeueableError, match="no longer exists"):
        await no_policies.requeue_dlq(SYSTEM_ADMIN, dlq_id)

    no_queue = AdminOperations(
        pool=rig.pool,
        authorizer=rig.authorizer,
        flags=rig.flags,
        lifecycle=PostgresRedisLifecycle(rig.pool, None),
    )
    with pytest.raises(QueueUnavailableError):
        await no_queue.requeue_dlq(SYSTEM_ADMIN, dlq_id)
    with pytest.raises(QueueUnavailableError):
        await no_queue.queue_stats(SYSTEM_ADMIN)
    with pytest.raises(QueueUnavailableError):
        await no_queue.set_drain(SYSTEM_ADMIN, True)

    await rig.pool.execute("UPDATE executions SET approval_level = 1 WHERE id = $1", old_id)
    with pytest.raises(DeadLetterNotRequeueableError, match="approval level 1"):
        await rig.admin.requeue_dlq(SYSTEM_ADMIN, dlq_id)

    # An entry whose execution has not ended (written by hand: the consumer never does that).
    queued_id, _ = await submit(rig, probe_plan(tmp_path / "other.jsonl", hold_s=0.0))
    early = await move_to_dlq(
        rig.pool, queued_id, attempts=1, error_class="X", error_message="early"
    )
    assert early is not None
    with pytest.raises(DeadLetterNotRequeueableError, match="still queued"):
        await rig.admin.requeue_dlq(SYSTEM_ADMIN, early)

    entries, _ = await list_dlq(rig.pool)
    assert {e.id for e in entries} == {dlq_id, early}
    assert all(e.requeued_at is None for e in entries)
    assert await rig.pool.fetchval("SELECT count(*) FROM executions") == 2
    assert not (await rig.queue.stats()).paused


async def test_a_submitter_revoked_while_queued_is_refused_by_the_worker_and_the_job_dropped(
    rig: Rig, tmp_path: Path
) -> None:
    """Second RBAC tier: the worker re-authorizes the submitter from Postgres; one whose role
    was removed after the submit gets nothing run. The execution ends failed with the denial's
    reason, its steps skipped (one event each, reason ``permission_denied``), and the job leaves
    both stores."""
    ledger = tmp_path / "ledger.jsonl"
    execution_id, job_id = await submit(rig, probe_plan(ledger))
    assert await unbind_role(rig.pool, TENANT, SUBMITTER.actor_id, "operator")

    assert await run_next(rig) == job_id

    assert not ledger.exists(), "nothing may run for a revoked submitter"
    record = await get_execution(rig.pool, TENANT, execution_id)
    assert (record.status, record.error_class) == ("failed", "PERMISSION_DENIED")
    assert record.worker_id == WORKER
    assert [s.status for s in record.steps] == ["skipped"]
    assert await event_types(rig.pool, execution_id) == [
        "execution_started",
        "execution_queued",
        "execution_running",
        "rbac_violation",
        "step_skipped",
        "execution_completed",
    ]
    reason = await rig.pool.fetchval(
        "SELECT payload->>'reason' FROM execution_events"
        " WHERE execution_id = $1 AND type = 'step_skipped'",
        execution_id,
    )
    assert reason == "permission_denied"
    assert await jobs.get_queue_row(rig.pool, job_id) is None
    assert not await rig.queue.exists(job_id)


async def test_a_finished_job_leaves_both_stores(rig: Rig, tmp_path: Path) -> None:
    """Success: the final transition deletes the queue row (fenced), then Redis is acked;
    nothing is left in either store."""
    execution_id, job_id = await submit(rig, probe_plan(tmp_path / "ledger.jsonl"))
    await run_next(rig)
    record = await get_execution(rig.pool, TENANT, execution_id)
    assert record.status == "succeeded"
    assert await jobs.get_queue_row(rig.pool, job_id) is None
    assert not await rig.queue.exists(job_id)


async def test_an_ack_redis_refuses_commits_the_outcome_alone_and_the_job_is_dropped_later(
    rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis fails at the ack: the outcome stays committed (never turned into a failure) with
    the queue row deleted by the final transition, and the Redis entry keeps the job's lease;
    once the lease expires the job is delivered again, found settled (no row, execution ended)
    and acked, nothing run twice and nothing written for it."""
    ledger = tmp_path / "ledger.jsonl"
    execution_id, job_id = await submit(rig, probe_plan(ledger))

    async def unreachable(*_args: object, **_kwargs: object) -> None:
        raise QueueUnavailableError(operation="ack", error="ConnectionError")

    monkeypatch.setattr(rig.queue, "ack", unreachable)
    # The consumer says so (it logs it and goes on with other jobs).
    with structlog.testing.capture_logs() as logs:
        await run_next(rig)
    assert "job_ack_deferred" in [entry["event"] for entry in logs]
    record = await get_execution(rig.pool, TENANT, execution_id)
    assert record.status == "succeeded"
    assert await jobs.get_queue_row(rig.pool, job_id) is None
    left = await rig.queue.get(job_id)
    assert left is not None
    assert left.state == "leased"
    events = await event_types(rig.pool, execution_id)
    monkeypatch.undo()
    rig.clock.now += INITIAL_LEASE_S * 100
    assert await run_next(rig) == job_id
    assert await jobs.get_queue_row(rig.pool, job_id) is None
    assert not await rig.queue.exists(job_id)
    assert [line["outcome"] for line in read_ledger(ledger)] == ["ok"]
    assert (await get_execution(rig.pool, TENANT, execution_id)).status == "succeeded"
    assert await event_types(rig.pool, execution_id) == events
