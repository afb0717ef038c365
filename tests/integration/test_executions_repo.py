"""The executions repository against real Postgres: idempotent creation, the FSM under
compare-and-set, lease fencing, cancellation, steps, the event log contract and pagination."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pytest

from opsconductor.common.errors import FSMError, NotFoundError, StaleLeaseError, StorageError
from opsconductor.common.fsm import TERMINAL, TRANSITIONS, ExecutionStatus, StepStatus
from opsconductor.lifecycle.storage.db import connect
from opsconductor.lifecycle.storage.executions import (
    CANCEL_CHANNEL,
    MAX_PAGE_SIZE,
    ExecutionRecord,
    InvalidPageRequestError,
    NewExecution,
    NewStep,
    create_execution,
    finish_step,
    get_execution,
    increment_cancel_checks,
    list_executions,
    request_cancel,
    retire_idempotency_keys,
    skip_remaining_steps,
    start_step,
    transition,
    transition_status,
)

S = ExecutionStatus
WINDOW = timedelta(hours=24)
STEPS = (
    NewStep("s1", 0, "noop", "read"),
    NewStep("s2", 1, "noop", "read"),
    ("s3", 2, "sleep", "read"),
)


def new_execution(
    *,
    tenant: str = "t1",
    key: str | None = None,
    status: ExecutionStatus = S.PENDING,
    mode: str = "immediate",
    steps: Sequence[tuple[str, int, str, str]] = STEPS,
) -> NewExecution:
    key = key or hashlib.sha256(uuid4().bytes).hexdigest()
    return NewExecution(
        tenant_id=tenant,
        actor_id="alice",
        request_id="req-1",
        idempotency_key=key,
        plan_hash="a" * 64,
        plan_snapshot={"name": "plan", "steps": [s[0] for s in steps]},
        plan_snapshot_hash="b" * 64,
        execution_mode=mode,
        sla_class="fast",
        action_class="read",
        approval_level=0,
        priority=50,
        timeout_policy_id="fast_read",
        timeout_ms=10_000,
        estimated_duration_ms=200,
        record_only=False,
        initial_status=status,
        steps=steps,
    )


async def events(pool: asyncpg.Pool, execution_id: UUID) -> list[tuple[int, str, dict[str, Any]]]:
    rows = await pool.fetch(
        "SELECT seq, type, payload FROM execution_events WHERE execution_id = $1 ORDER BY seq",
        execution_id,
    )
    return [(r["seq"], r["type"], r["payload"]) for r in rows]


async def row_of(pool: asyncpg.Pool, execution_id: UUID) -> dict[str, Any]:
    return dict(await pool.fetchrow("SELECT * FROM executions WHERE id = $1", execution_id))


async def steps_of(pool: asyncpg.Pool, execution_id: UUID) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT * FROM execution_steps WHERE execution_id = $1 ORDER BY position", execution_id
    )
    return [dict(r) for r in rows]


async def in_status(pool: asyncpg.Pool, status: ExecutionStatus, **kw: Any) -> ExecutionRecord:
    """A fresh execution brought to ``status`` through legal transitions only."""
    start = status if status in {S.PENDING, S.QUEUED, S.AWAITING_APPROVAL, S.RUNNING} else None
    if start is not None:
        record, _ = await create_execution(
            pool, new_execution(status=start, **kw), dedup_window=WINDOW
        )
        return record
    source = S.AWAITING_APPROVAL if status is S.REJECTED else S.RUNNING
    record, _ = await create_execution(
        pool, new_execution(status=source, **kw), dedup_window=WINDOW
    )
    return await transition(pool, record.id, to=status, by="setup")


async def backdate(pool: asyncpg.Pool, execution_id: UUID, delta: timedelta) -> None:
    """Shift every timestamp of an execution into the past (as if it ran ``delta`` ago)."""
    await pool.execute(
        """UPDATE executions SET created_at = created_at - $2::interval,
               started_at = started_at - $2::interval, ended_at = ended_at - $2::interval
           WHERE id = $1""",
        execution_id,
        delta,
    )


# --- creation and idempotency ---------------------------------------------------------------


async def test_fifty_concurrent_identical_creates_yield_one_execution(
    db_pool: asyncpg.Pool,
) -> None:
    """50 racing creates with one key: one row, 50 identical ids, one creator, one started event."""
    new = new_execution()
    results = await asyncio.gather(
        *(create_execution(db_pool, new, dedup_window=WINDOW) for _ in range(50))
    )
    ids = {record.id for record, _ in results}
    assert len(ids) == 1
    assert sum(created for _, created in results) == 1
    (execution_id,) = ids
    assert await db_pool.fetchval("SELECT count(*) FROM executions") == 1
    assert await db_pool.fetchval("SELECT count(*) FROM execution_steps") == 3
    assert [t for _, t, _ in await events(db_pool, execution_id)] == ["execution_started"]
    assert all(len(record.steps) == 3 for record, _ in results)


async def test_creation_records_plan_steps_and_started_event(db_pool: asyncpg.Pool) -> None:
    """A new execution stores the snapshot and hashes, pending steps keyed execution_id:step_id,
    and an execution_started event carrying mode, status, hash, level, SLA and policy."""
    record, created = await create_execution(db_pool, new_execution(), dedup_window=WINDOW)
    assert created
    assert record.status is S.PENDING
    assert record.plan_hash == "a" * 64
    assert record.plan_snapshot == {"name": "plan", "steps": ["s1", "s2", "s3"]}
    assert [s.step_id for s in record.steps] == ["s1", "s2", "s3"]
    assert all(s.status is StepStatus.PENDING and s.attempt == 0 for s in record.steps)
    assert record.steps[1].idempotency_key == f"{record.id}:s2"
    assert record.event_seq == 1
    assert record.duration_ms is None
    assert not record.is_terminal
    [(seq, kind, payload)] = await events(db_pool, record.id)
    assert (seq, kind) == (1, "execution_started")
    assert payload == {
        "mode": "immediate",
        "status": "pending",
        "plan_hash": "a" * 64,
        "approval_level": 0,
        "sla_class": "fast",
        "timeout_policy_id": "fast_read",
    }


async def test_duplicate_create_returns_the_original_without_side_effects(
    db_pool: asyncpg.Pool,
) -> None:
    """A second create with the same key returns the first execution, created False, no event."""
    new = new_execution()
    first, _ = await create_execution(db_pool, new, dedup_window=WINDOW)
    again, created = await create_execution(db_pool, new, dedup_window=WINDOW)
    assert not created
    assert again.id == first.id
    assert [s.step_id for s in again.steps] == ["s1", "s2", "s3"]
    assert len(await events(db_pool, first.id)) == 1


async def test_same_key_in_two_tenants_makes_two_executions(db_pool: asyncpg.Pool) -> None:
    """Idempotency is tenant-scoped: one key in two tenants never collides."""
    key = "c" * 64
    a, created_a = await create_execution(
        db_pool, new_execution(tenant="ta", key=key), dedup_window=WINDOW
    )
    b, created_b = await create_execution(
        db_pool, new_execution(tenant="tb", key=key), dedup_window=WINDOW
    )
    assert created_a
    assert created_b
    assert a.id != b.id
    assert await db_pool.fetchval("SELECT count(*) FROM executions") == 2


async def test_execution_without_steps_is_created(db_pool: asyncpg.Pool) -> None:
    """A step-less execution (e.g. created before planning expands it) has no step rows."""
    record, created = await create_execution(db_pool, new_execution(steps=()), dedup_window=WINDOW)
    assert created
    assert record.steps == ()


async def test_an_execution_cannot_be_created_terminal(db_pool: asyncpg.Pool) -> None:
    """A terminal initial status would skip the event contract: refused, nothing written."""
    with pytest.raises(ValueError, match="cannot start"):
        await create_execution(db_pool, new_execution(status=S.SUCCEEDED), dedup_window=WINDOW)
    assert await db_pool.fetchval("SELECT count(*) FROM executions") == 0


async def test_after_the_dedup_window_the_same_plan_runs_again(db_pool: asyncpg.Pool) -> None:
    """A terminal execution that ended longer ago than the window is retired; a new one is made."""
    new = new_execution(key="d" * 64)
    old = await in_status(db_pool, S.SUCCEEDED, key="d" * 64)
    await backdate(db_pool, old.id, timedelta(hours=25))
    fresh, created = await create_execution(db_pool, new, dedup_window=WINDOW)
    assert created
    assert fresh.id != old.id
    assert (await row_of(db_pool, old.id))["idempotency_retired_at"] is not None
    again, created_again = await create_execution(db_pool, new, dedup_window=WINDOW)
    assert not created_again
    assert again.id == fresh.id


async def test_within_the_dedup_window_the_old_execution_is_returned(db_pool: asyncpg.Pool) -> None:
    """A terminal execution that ended inside the window still answers for its key."""
    old = await in_status(db_pool, S.FAILED, key="e" * 64)
    await backdate(db_pool, old.id, timedelta(hours=23))
    again, created = await create_execution(
        db_pool, new_execution(key="e" * 64), dedup_window=WINDOW
    )
    assert not created
    assert again.id == old.id
    assert again.status is S.FAILED
    assert (await row_of(db_pool, old.id))["idempotency_retired_at"] is None


async def test_an_unfinished_execution_is_never_retired(db_pool: asyncpg.Pool) -> None:
    """However old, a running execution keeps its key: the window counts from the end."""
    old = await in_status(db_pool, S.RUNNING, key="f" * 64)
    await backdate(db_pool, old.id, timedelta(days=3))
    again, created = await create_execution(
        db_pool, new_execution(key="f" * 64), dedup_window=WINDOW
    )
    assert not created
    assert again.id == old.id


async def test_racing_creates_after_the_window_make_exactly_one_new_execution(
    db_pool: asyncpg.Pool,
) -> None:
    """20 creates racing to retire an expired key and re-create: one new row, all see it."""
    old = await in_status(db_pool, S.SUCCEEDED, key="9" * 64)
    await backdate(db_pool, old.id, timedelta(days=2))
    new = new_execution(key="9" * 64)
    results = await asyncio.gather(
        *(create_execution(db_pool, new, dedup_window=WINDOW) for _ in range(20))
    )
    ids = {record.id for record, _ in results}
    assert len(ids) == 1
    assert old.id not in ids
    assert sum(created for _, created in results) == 1
    assert await db_pool.fetchval("SELECT count(*) FROM executions") == 2


async def test_reaper_retires_expired_keys_in_batches(db_pool: asyncpg.Pool) -> None:
    """retire_idempotency_keys retires every terminal key past the window and nothing else."""
    due = [await in_status(db_pool, status) for status in (S.SUCCEEDED, S.FAILED, S.CANCELLED)]
    recent = await in_status(db_pool, S.SUCCEEDED)
    running = await in_status(db_pool, S.RUNNING)
    for record in [*due, running]:
        await backdate(db_pool, record.id, timedelta(days=2))
    assert await retire_idempotency_keys(db_pool, WINDOW, batch_size=2) == 3
    retired = {
        r["id"]
        for r in await db_pool.fetch(
            "SELECT id FROM executions WHERE idempotency_retired_at IS NOT NULL"
        )
    }
    assert retired == {r.id for r in due}
    assert recent.id not in retired
    assert running.id not in retired
    assert await retire_idempotency_keys(db_pool, WINDOW) == 0


# --- FSM --------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", list(S))
async def test_every_illegal_transition_raises_and_writes_nothing(
    db_pool: asyncpg.Pool, source: ExecutionStatus
) -> None:
    """For each status, every target the FSM forbids raises FSMError; row and events unchanged."""
    record = await in_status(db_pool, source)
    before_row, before_events = await row_of(db_pool, record.id), await events(db_pool, record.id)
    illegal = [target for target in S if target not in TRANSITIONS[source]]
    assert illegal
    for target in illegal:
        with pytest.raises(FSMError, match="Illegal state transition"):
            await transition(db_pool, record.id, to=target, by="mallory")
    assert await row_of(db_pool, record.id) == before_row
    assert await events(db_pool, record.id) == before_events


async def test_spec_4_1_pending_to_succeeded_is_rejected(db_pool: asyncpg.Pool) -> None:
    """Spec §4.1 verbatim: transition_status(pending → succeeded) raises FSMError."""
    record = await in_status(db_pool, S.PENDING)
    with pytest.raises(FSMError, match="Illegal state transition"):
        await transition_status(
            execution_id=record.id,
            from_status="pending",
            to_status="succeeded",
            actor_id="alice",
            db=db_pool,
        )
    assert (await row_of(db_pool, record.id))["status"] == "pending"
    moved = await transition_status(
        execution_id=str(record.id),
        from_status="pending",
        to_status="running",
        actor_id="alice",
        db=db_pool,
    )
    assert moved.status is S.RUNNING


LEGAL = [(source, target) for source, targets in TRANSITIONS.items() for target in sorted(targets)]


@pytest.mark.parametrize(("source", "target"), LEGAL)
async def test_every_legal_transition_is_audited_with_one_event(
    db_pool: asyncpg.Pool, source: ExecutionStatus, target: ExecutionStatus
) -> None:
    """A legal move sets last_transition_at/by/from, start/end times, and appends one event."""
    record = await in_status(db_pool, source)
    seq_before = len(await events(db_pool, record.id))
    moved = await transition(db_pool, record.id, to=target, by="bob", worker_id="w-1")
    assert moved.status is target
    assert moved.last_transition_from is source
    assert moved.last_transition_by == "bob"
    assert moved.last_transition_at is not None
    assert moved.worker_id == "w-1"
    row = await row_of(db_pool, record.id)
    assert row["status"] == target.value
    assert row["last_transition_from"] == source.value
    assert row["event_seq"] == seq_before + 1
    new_events = (await events(db_pool, record.id))[seq_before:]
    assert len(new_events) == 1
    seq, kind, payload = new_events[0]
    assert seq == seq_before + 1 == moved.event_seq
    assert payload["status"] == target.value
    assert payload["from"] == source.value
    expected = {
        S.RUNNING: "execution_running",
        S.QUEUED: "execution_queued",
        S.AWAITING_APPROVAL: "approval_requested",
    }.get(target, "execution_completed")
    assert kind == expected
    if target is S.RUNNING:
        assert moved.started_at is not None
        assert moved.started_at >= moved.created_at
    if target in TERMINAL:
        assert moved.ended_at is not None
        assert payload["timed_out"] is False


async def test_started_at_is_kept_when_running_again_and_duration_is_recorded(
    db_pool: asyncpg.Pool,
) -> None:
    """A requeued execution keeps its first start; a terminal one gets ended_at and a duration."""
    record = await in_status(db_pool, S.RUNNING)
    first_start = record.started_at
    await transition(db_pool, record.id, to=S.QUEUED, by="reaper")
    again = await transition(db_pool, record.id, to=S.RUNNING, by="w-2")
    assert again.started_at == first_start
    done = await transition(db_pool, record.id, to=S.SUCCEEDED, by="w-2")
    assert done.ended_at is not None
    assert done.started_at is not None
    assert done.duration_ms is not None
    assert done.duration_ms >= 0
    assert (await events(db_pool, record.id))[-1][2]["duration_ms"] == done.duration_ms


async def test_expected_from_mismatch_raises_and_writes_nothing(db_pool: asyncpg.Pool) -> None:
    """A caller's expectation of the current status is part of the compare-and-set."""
    record = await in_status(db_pool, S.QUEUED)
    before = await row_of(db_pool, record.id)
    with pytest.raises(FSMError, match="Illegal state transition queued -> cancelled"):
        await transition(db_pool, record.id, to=S.CANCELLED, by="x", expected_from=S.RUNNING)
    with pytest.raises(FSMError):
        await transition(
            db_pool, record.id, to=S.FAILED, by="x", expected_from=[S.RUNNING, S.PENDING]
        )
    assert await row_of(db_pool, record.id) == before
    moved = await transition(
        db_pool, record.id, to=S.RUNNING, by="x", expected_from={S.QUEUED, S.PENDING}
    )
    assert moved.status is S.RUNNING


async def test_transition_writes_whitelisted_fields_and_refuses_others(
    db_pool: asyncpg.Pool,
) -> None:
    """Timeout, error and result columns are written with the status; other columns are not."""
    record = await in_status(db_pool, S.RUNNING)
    with pytest.raises(ValueError, match="tenant_id"):
        await transition(db_pool, record.id, to=S.FAILED, by="w", fields={"tenant_id": "t2"})
    failed = await transition(
        db_pool,
        record.id,
        to=S.FAILED,
        by="w",
        fields={
            "timed_out": True,
            "error_class": "ExecutionTimeoutError",
            "error_message": "took too long",
            "result_summary": {"steps_done": 1},
            "attempts": 2,
        },
        event_type="execution_timed_out",
        event_payload={"timeout_ms": 10_000},
    )
    assert failed.timed_out
    assert failed.error_class == "ExecutionTimeoutError"
    assert failed.result_summary == {"steps_done": 1}
    assert failed.attempts == 2
    tail = (await events(db_pool, record.id))[-2:]
    assert [kind for _, kind, _ in tail] == ["execution_timed_out", "execution_completed"]
    completed = tail[1][2]
    assert completed["status"] == "failed"
    assert completed["timed_out"] is True
    assert completed["error_class"] == "ExecutionTimeoutError"
    assert completed["timeout_ms"] == 10_000


async def test_custom_event_type_replaces_the_default_for_non_terminal_moves(
    db_pool: asyncpg.Pool,
) -> None:
    """A non-terminal move appends exactly one event, of the caller's type when given."""
    record = await in_status(db_pool, S.AWAITING_APPROVAL)
    await transition(db_pool, record.id, to=S.QUEUED, by="approver", event_type="approval_granted")
    assert [k for _, k, _ in await events(db_pool, record.id)] == [
        "execution_started",
        "approval_granted",
    ]


async def test_oversize_result_is_a_storage_error_and_nothing_is_written(
    db_pool: asyncpg.Pool,
) -> None:
    """The 10 KB result CHECK surfaces as StorageError; the transition rolls back whole."""
    record = await in_status(db_pool, S.RUNNING)
    before, before_events = await row_of(db_pool, record.id), await events(db_pool, record.id)
    with pytest.raises(StorageError) as info:
        await transition(
            db_pool,
            record.id,
            to=S.SUCCEEDED,
            by="w",
            fields={"result_summary": {"x": "y" * 20_000}},
        )
    assert isinstance(info.value.__cause__, asyncpg.CheckViolationError)
    assert await row_of(db_pool, record.id) == before
    assert await events(db_pool, record.id) == before_events


async def test_transition_is_tenant_scoped_and_unknown_ids_are_not_found(
    db_pool: asyncpg.Pool,
) -> None:
    """Another tenant's execution and a missing one both raise NotFoundError."""
    record = await in_status(db_pool, S.RUNNING, tenant="ta")
    with pytest.raises(NotFoundError):
        await transition(db_pool, record.id, to=S.SUCCEEDED, by="x", tenant_id="tb")
    with pytest.raises(NotFoundError):
        await transition(db_pool, uuid4(), to=S.SUCCEEDED, by="x")
    done = await transition(db_pool, record.id, to=S.SUCCEEDED, by="x", tenant_id="ta")
    assert done.status is S.SUCCEEDED


async def test_twenty_racing_terminal_transitions_have_exactly_one_winner(
    db_pool: asyncpg.Pool,
) -> None:
    """Compare-and-set: of 20 concurrent running → succeeded/failed/cancelled, one wins."""
    record = await in_status(db_pool, S.RUNNING)
    targets = [(S.SUCCEEDED, S.FAILED, S.CANCELLED)[i % 3] for i in range(20)]
    results = await asyncio.gather(
        *(
            transition(db_pool, record.id, to=t, by=f"w-{i}", expected_from=S.RUNNING)
            for i, t in enumerate(targets)
        ),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, ExecutionRecord)]
    assert len(winners) == 1
    assert all(isinstance(r, FSMError) for r in results if r is not winners[0])
    row = await row_of(db_pool, record.id)
    assert row["status"] == winners[0].status.value
    assert row["last_transition_by"] == winners[0].last_transition_by
    kinds = [k for _, k, _ in await events(db_pool, record.id)]
    assert kinds.count("execution_completed") == 1
    assert kinds[-1] == "execution_completed"


async def test_a_stale_lease_token_cannot_write(db_pool: asyncpg.Pool) -> None:
    """Fencing: with the wrong lease token a transition or step write raises StaleLeaseError and
    changes nothing; the current holder's token works."""
    queued = await in_status(db_pool, S.QUEUED)
    token, stale = uuid4(), uuid4()
    running = await transition(
        db_pool, queued.id, to=S.RUNNING, by="w-1", fields={"lease_token": token}
    )
    assert running.lease_token == token
    before, before_events = await row_of(db_pool, queued.id), await events(db_pool, queued.id)
    before_steps = await steps_of(db_pool, queued.id)
    with pytest.raises(StaleLeaseError):
        await transition(db_pool, queued.id, to=S.SUCCEEDED, by="w-0", lease_token=stale)
    with pytest.raises(StaleLeaseError):
        await start_step(db_pool, queued.id, "s1", worker_id="w-0", lease_token=stale)
    with pytest.raises(StaleLeaseError):
        await skip_remaining_steps(db_pool, queued.id, 0, lease_token=stale)
    assert await row_of(db_pool, queued.id) == before
    assert await events(db_pool, queued.id) == before_events
    assert await steps_of(db_pool, queued.id) == before_steps
    await start_step(db_pool, queued.id, "s1", worker_id="w-1", lease_token=token)
    with pytest.raises(StaleLeaseError):
        await finish_step(db_pool, queued.id, "s1", status=StepStatus.SUCCEEDED, lease_token=stale)
    await finish_step(db_pool, queued.id, "s1", status=StepStatus.SUCCEEDED, lease_token=token)
    done = await transition(db_pool, queued.id, to=S.SUCCEEDED, by="w-1", lease_token=token)
    assert done.status is S.SUCCEEDED


# --- cancellation -----------------------------------------------------------------------------


async def test_ten_concurrent_cancels_record_one_request(
    db_pool: asyncpg.Pool, db_dsn: str
) -> None:
    """request_cancel is idempotent under a race: cancelled_by/at set once, one event, one
    notification; the running execution stays running for its worker to finish."""
    record = await in_status(db_pool, S.RUNNING)
    listener = await connect(db_dsn)
    notes: list[str] = []
    await listener.add_listener(CANCEL_CHANNEL, lambda *args: notes.append(args[3]))
    try:
        results = await asyncio.gather(
            *(
                request_cancel(db_pool, record.id, tenant_id="t1", by=f"user-{i}", reason="stop")
                for i in range(10)
            )
        )
        deadline = time.monotonic() + 5
        while not notes and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        await listener.close()
    assert sum(new for _, new in results) == 1
    winner = next(r for r, new in results if new)
    row = await row_of(db_pool, record.id)
    assert row["cancelled_by"] == winner.cancelled_by
    assert row["cancelled_at"] is not None
    assert row["cancel_reason"] == "stop"
    assert row["status"] == "running"
    assert all(r.cancelled_by == winner.cancelled_by for r, _ in results)
    kinds = [k for _, k, _ in await events(db_pool, record.id)]
    assert kinds.count("cancel_requested") == 1
    assert notes == [str(record.id)]


async def test_cancelling_a_queued_execution_ends_it_cancelled(db_pool: asyncpg.Pool) -> None:
    """No worker holds a queued execution: cancel skips its steps and ends it, and
    execution_completed (status cancelled) is the last of strictly numbered events."""
    record = await in_status(db_pool, S.QUEUED)
    cancelled, new = await request_cancel(
        db_pool, str(record.id), tenant_id="t1", by="bob", reason="not needed"
    )
    assert new
    assert cancelled.status is S.CANCELLED
    assert cancelled.cancelled_by == "bob"
    assert all(s.status is StepStatus.SKIPPED for s in cancelled.steps)
    log = await events(db_pool, record.id)
    assert [seq for seq, _, _ in log] == list(range(1, len(log) + 1))
    assert [k for _, k, _ in log] == [
        "execution_started",
        "cancel_requested",
        "step_skipped",
        "step_skipped",
        "step_skipped",
        "execution_completed",
    ]
    assert log[-1][2]["status"] == "cancelled"
    assert log[-1][2]["cancelled_by"] == "bob"
    again, new_again = await request_cancel(
        db_pool, record.id, tenant_id="t1", by="eve", reason="x"
    )
    assert not new_again
    assert again.cancelled_by == "bob"
    assert len(await events(db_pool, record.id)) == len(log)


@pytest.mark.parametrize("status", [S.SUCCEEDED, S.FAILED, S.REJECTED])
async def test_cancelling_a_finished_execution_changes_nothing(
    db_pool: asyncpg.Pool, status: ExecutionStatus
) -> None:
    """A terminal execution is returned unchanged: no cancelled_by, no event."""
    record = await in_status(db_pool, status)
    before_events = await events(db_pool, record.id)
    same, new = await request_cancel(db_pool, record.id, tenant_id="t1", by="bob", reason=None)
    assert not new
    assert same.status is status
    assert same.cancelled_by is None
    assert (await row_of(db_pool, record.id))["cancelled_at"] is None
    assert await events(db_pool, record.id) == before_events


async def test_cancel_is_tenant_scoped(db_pool: asyncpg.Pool) -> None:
    """Cancelling another tenant's execution, or a malformed id, is NotFoundError."""
    record = await in_status(db_pool, S.RUNNING, tenant="ta")
    with pytest.raises(NotFoundError):
        await request_cancel(db_pool, record.id, tenant_id="tb", by="mallory", reason=None)
    with pytest.raises(NotFoundError):
        await request_cancel(db_pool, "not-a-uuid", tenant_id="ta", by="x", reason=None)
    assert (await row_of(db_pool, record.id))["cancelled_by"] is None


async def test_cancel_checks_are_counted(db_pool: asyncpg.Pool) -> None:
    """increment_cancel_checks adds up; an unknown execution is NotFoundError."""
    record = await in_status(db_pool, S.RUNNING)
    assert await increment_cancel_checks(db_pool, record.id) == 1
    assert await increment_cancel_checks(db_pool, record.id, 3) == 4
    with pytest.raises(NotFoundError):
        await increment_cancel_checks(db_pool, uuid4())


# --- steps and the event log contract ---------------------------------------------------------


async def test_a_full_run_has_events_one_to_n_started_first_completed_last(
    db_pool: asyncpg.Pool,
) -> None:
    """pending → running → steps → succeeded: seq 1..n, execution_started first,
    execution_completed (succeeded) last; nothing can be appended after it."""
    record = await in_status(db_pool, S.PENDING)
    await transition(db_pool, record.id, to=S.RUNNING, by="w-1", worker_id="w-1")
    for step_id in ("s1", "s2"):
        await start_step(db_pool, record.id, step_id, worker_id="w-1")
        await finish_step(
            db_pool, record.id, step_id, status=StepStatus.SUCCEEDED, result={"ok": 1}
        )
    await start_step(db_pool, record.id, "s3", worker_id="w-1")
    await finish_step(
        db_pool,
        record.id,
        "s3",
        status=StepStatus.FAILED,
        error_class="HandlerError",
        error_message="boom",
    )
    await transition(db_pool, record.id, to=S.SUCCEEDED, by="w-1")
    log = await events(db_pool, record.id)
    assert [seq for seq, _, _ in log] == list(range(1, 10))
    assert [k for _, k, _ in log] == [
        "execution_started",
        "execution_running",
        "step_started",
        "step_succeeded",
        "step_started",
        "step_succeeded",
        "step_started",
        "step_failed",
        "execution_completed",
    ]
    assert log[7][2]["error_class"] == "HandlerError"
    assert log[-1][2]["status"] == "succeeded"
    with pytest.raises(FSMError):
        await start_step(db_pool, record.id, "s3", worker_id="w-1")
    with pytest.raises(FSMError):
        await finish_step(db_pool, record.id, "s3", status=StepStatus.SUCCEEDED)
    with pytest.raises(FSMError):
        await skip_remaining_steps(db_pool, record.id, 0)
    with pytest.raises(FSMError):
        await transition(db_pool, record.id, to=S.FAILED, by="late")
    assert await events(db_pool, record.id) == log


async def test_step_rows_record_attempts_timing_results_and_errors(db_pool: asyncpg.Pool) -> None:
    """start_step counts attempts and clears a failed try; finish_step records the outcome."""
    record = await in_status(db_pool, S.RUNNING)
    started = await start_step(db_pool, record.id, "s1", worker_id="w-1")
    assert started.status is StepStatus.RUNNING
    assert started.attempt == 1
    assert started.worker_id == "w-1"
    assert started.started_at is not None
    failed = await finish_step(
        db_pool, record.id, "s1", status=StepStatus.FAILED, error_class="E", error_message="m"
    )
    assert failed.status is StepStatus.FAILED
    assert failed.error_message == "m"
    assert failed.duration_ms is not None
    assert failed.ended_at is not None
    retried = await start_step(db_pool, record.id, "s1", worker_id="w-2")
    assert retried.attempt == 2
    assert retried.error_class is None
    assert retried.ended_at is None
    ok = await finish_step(db_pool, record.id, "s1", status=StepStatus.SUCCEEDED, result=[1, 2])
    assert ok.result == [1, 2]
    assert ok.error_class is None
    assert ok.ended_at is not None
    assert ok.started_at is not None
    assert ok.ended_at >= ok.started_at


async def test_illegal_step_writes_raise_and_write_nothing(db_pool: asyncpg.Pool) -> None:
    """A succeeded step cannot restart, a pending one cannot finish, skipped is not an outcome,
    an unknown step is not found, and steps of a non-running execution cannot start."""
    record = await in_status(db_pool, S.RUNNING)
    await start_step(db_pool, record.id, "s1", worker_id="w")
    await finish_step(db_pool, record.id, "s1", status=StepStatus.SUCCEEDED)
    before_steps, before_events = (
        await steps_of(db_pool, record.id),
        await events(db_pool, record.id),
    )
    with pytest.raises(FSMError, match="succeeded -> running"):
        await start_step(db_pool, record.id, "s1", worker_id="w")
    with pytest.raises(FSMError, match="pending -> failed"):
        await finish_step(db_pool, record.id, "s2", status=StepStatus.FAILED)
    with pytest.raises(ValueError, match="not skipped"):
        await finish_step(db_pool, record.id, "s2", status=StepStatus.SKIPPED)
    with pytest.raises(NotFoundError):
        await start_step(db_pool, record.id, "nope", worker_id="w")
    with pytest.raises(NotFoundError):
        await start_step(db_pool, uuid4(), "s1", worker_id="w")
    queued = await in_status(db_pool, S.QUEUED)
    with pytest.raises(FSMError, match="execution is queued"):
        await start_step(db_pool, queued.id, "s1", worker_id="w")
    assert await steps_of(db_pool, record.id) == before_steps
    assert await events(db_pool, record.id) == before_events


async def test_oversize_step_result_is_refused_whole(db_pool: asyncpg.Pool) -> None:
    """A step result over 10 KB is a StorageError; the step stays running, no event."""
    record = await in_status(db_pool, S.RUNNING)
    await start_step(db_pool, record.id, "s1", worker_id="w")
    before = await events(db_pool, record.id)
    with pytest.raises(StorageError):
        await finish_step(
            db_pool, record.id, "s1", status=StepStatus.SUCCEEDED, result="x" * 20_000
        )
    assert (await steps_of(db_pool, record.id))[0]["status"] == "running"
    assert await events(db_pool, record.id) == before


async def test_skip_remaining_steps_skips_only_unstarted_later_steps(db_pool: asyncpg.Pool) -> None:
    """Cancellation between steps: steps from a position on that never ran become skipped, one
    step_skipped event each in position order; steps that ran keep their outcome."""
    record = await in_status(db_pool, S.RUNNING)
    await start_step(db_pool, record.id, "s1", worker_id="w")
    await finish_step(db_pool, record.id, "s1", status=StepStatus.SUCCEEDED)
    skipped = await skip_remaining_steps(db_pool, record.id, 0, reason="cancelled")
    assert [s.step_id for s in skipped] == ["s2", "s3"]
    assert [s["status"] for s in await steps_of(db_pool, record.id)] == [
        "succeeded",
        "skipped",
        "skipped",
    ]
    tail = (await events(db_pool, record.id))[-2:]
    assert [(k, p["step_id"], p["reason"]) for _, k, p in tail] == [
        ("step_skipped", "s2", "cancelled"),
        ("step_skipped", "s3", "cancelled"),
    ]
    assert await skip_remaining_steps(db_pool, record.id, 0) == []


async def test_repository_calls_join_the_callers_transaction(db_pool: asyncpg.Pool) -> None:
    """Given a connection in a transaction, create + transition roll back with the caller."""

    async def work_then_fail(conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            record, _ = await create_execution(conn, new_execution(), dedup_window=WINDOW)
            await transition(conn, record.id, to=S.RUNNING, by="w")
            raise RuntimeError("caller fails after the writes")

    async with db_pool.acquire() as conn:
        with pytest.raises(RuntimeError):
            await work_then_fail(conn)
    assert await db_pool.fetchval("SELECT count(*) FROM executions") == 0
    assert await db_pool.fetchval("SELECT count(*) FROM execution_events") == 0


# --- reads ------------------------------------------------------------------------------------


async def test_get_execution_is_tenant_scoped(db_pool: asyncpg.Pool) -> None:
    """get_execution returns a tenant's own execution; another tenant's, a missing id and a
    malformed id all raise the same NotFoundError."""
    record = await in_status(db_pool, S.RUNNING, tenant="ta")
    own = await get_execution(db_pool, "ta", record.id)
    assert own.id == record.id
    assert len(own.steps) == 3
    bare = await get_execution(db_pool, "ta", str(record.id), with_steps=False)
    assert bare.steps == ()
    assert bare.status is S.RUNNING
    errors = []
    for tenant, eid in (("tb", record.id), ("ta", uuid4()), ("ta", "garbage")):
        with pytest.raises(NotFoundError) as info:
            await get_execution(db_pool, tenant, eid)
        errors.append(str(info.value))
    assert len(set(errors)) == 1


async def test_pagination_walks_every_row_once_newest_first(db_pool: asyncpg.Pool) -> None:
    """120 executions in pages of 50: 50, 50, 20, no duplicates, no gaps, newest first; other
    tenants' executions never appear."""
    made = [
        (await create_execution(db_pool, new_execution(steps=()), dedup_window=WINDOW))[0]
        for _ in range(120)
    ]
    await create_execution(db_pool, new_execution(tenant="other", steps=()), dedup_window=WINDOW)
    seen: list[ExecutionRecord] = []
    sizes = []
    token = None
    while True:
        page, token = await list_executions(db_pool, "t1", page_size=50, page_token=token)
        sizes.append(len(page))
        seen.extend(page)
        if token is None:
            break
    assert sizes == [50, 50, 20]
    assert {r.id for r in seen} == {r.id for r in made}
    assert len(seen) == 120
    keys = [(r.created_at, str(r.id)) for r in seen]
    assert keys == sorted(keys, reverse=True)


async def test_list_filters_by_status_and_mode_across_pages(db_pool: asyncpg.Pool) -> None:
    """Status and mode filters apply on every page; the token keeps the filter."""
    for i in range(7):
        await in_status(db_pool, S.RUNNING, mode="background" if i % 2 else "immediate", steps=())
    for _ in range(3):
        await in_status(db_pool, S.QUEUED, mode="background", steps=())
    page1, token = await list_executions(
        db_pool, "t1", statuses=[S.RUNNING], mode="background", page_size=2
    )
    page2, token2 = await list_executions(
        db_pool, "t1", statuses=["running"], mode="background", page_size=2, page_token=token
    )
    assert token2 is None
    found = page1 + page2
    assert len(found) == 3
    assert all(r.status is S.RUNNING and r.execution_mode == "background" for r in found)
    both, _ = await list_executions(db_pool, "t1", statuses=["running", "queued"], page_size=0)
    assert len(both) == 10
    queued, _ = await list_executions(db_pool, "t1", statuses=[S.QUEUED])
    assert len(queued) == 3


async def test_page_size_is_capped(db_pool: asyncpg.Pool) -> None:
    """A huge page size returns at most 200 rows."""
    await db_pool.execute(
        """INSERT INTO executions (tenant_id, actor_id, idempotency_key, plan_hash, plan_snapshot,
               plan_snapshot_hash, execution_mode, sla_class, action_class, timeout_ms)
           SELECT 't1', 'a', md5(g::text), 'h', '{}'::jsonb, 'h', 'immediate', 'fast', 'read', 1
           FROM generate_series(1, 205) AS g"""
    )
    page, token = await list_executions(db_pool, "t1", page_size=10_000)
    assert len(page) == MAX_PAGE_SIZE
    assert token is not None


def _forge(data: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"page_token": "!!not base64!!"}, "page_token"),
        ({"page_token": base64.urlsafe_b64encode(b"\xff\xfe").decode()}, "page_token"),
        ({"page_token": _forge({"c": "yesterday", "i": "x", "s": "y"})}, "page_token"),
        ({"page_token": _forge(["a"])}, "page_token"),
        ({"page_size": -1}, "page_size"),
        ({"statuses": ["exploded"]}, "statuses"),
        ({"mode": "sometime"}, "mode"),
    ],
)
async def test_bad_list_requests_are_invalid_arguments(
    db_pool: asyncpg.Pool, kwargs: dict[str, Any], field: str
) -> None:
    """Malformed tokens, sizes, statuses and modes raise InvalidPageRequestError on that field."""
    with pytest.raises(InvalidPageRequestError) as info:
        await list_executions(db_pool, "t1", **kwargs)
    assert info.value.violations[0].field == field
    assert info.value.reason == "INVALID_ARGUMENT"
    assert isinstance(info.value, ValueError)


async def test_a_token_only_works_for_the_filters_and_tenant_it_was_issued_for(
    db_pool: asyncpg.Pool,
) -> None:
    """Reusing a page token with other filters or another tenant is refused, not misapplied."""
    for _ in range(3):
        await in_status(db_pool, S.RUNNING, steps=())
    _, token = await list_executions(db_pool, "t1", page_size=1)
    assert token is not None
    with pytest.raises(InvalidPageRequestError, match="other filters"):
        await list_executions(db_pool, "t1", page_size=1, page_token=token, mode="immediate")
    with pytest.raises(InvalidPageRequestError, match="other filters"):
        await list_executions(db_pool, "t2", page_size=1, page_token=token)
