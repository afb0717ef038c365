"""The executions repository: the single place where execution state is written.

- :func:`create_execution` is idempotent and race-safe: one ``INSERT … ON CONFLICT DO NOTHING`` on
  the partial unique index ``ux_exec_tenant_idem``, then a read of the winner, never
  read-then-write. The dedup window retires a terminal execution's key in the same transaction.
- :func:`transition` is the only status writer: it locks the row, enforces lease fencing and the
  FSM of :mod:`opsconductor.common.fsm`, writes the new status with its ``last_transition_*`` audit
  columns under a compare-and-set, and appends the matching event, all in one transaction.
- :func:`request_cancel` is idempotent; ``cancelled_by``/``cancelled_at`` are set by one statement.
- Step rows are written by :mod:`.execution_steps` and reads live in :mod:`.execution_reads`;
  both are re-exported here, so callers import this module only.

Every function takes a connection (joining the caller's transaction as a savepoint) or a pool.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Literal, NamedTuple
from uuid import UUID

import structlog

from opsconductor.common.errors import FSMError, NotFoundError, StorageError
from opsconductor.common.fsm import TERMINAL, ExecutionStatus, allowed_sources, check_transition
from opsconductor.common.hashing import step_idempotency_key
from opsconductor.lifecycle.execution_logging import bind_execution_fields
from opsconductor.lifecycle.execution_metrics import record_finished
from opsconductor.lifecycle.storage.approval_records import ApprovalState, close_pending_approvals
from opsconductor.lifecycle.storage.events import append_event
from opsconductor.lifecycle.storage.execution_reads import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    InvalidPageRequestError,
    as_execution_id,
    get_execution,
    list_executions,
)
from opsconductor.lifecycle.storage.execution_records import (
    ExecutionRecord,
    PoolOrConnection,
    StepRecord,
    after_commit,
    atomic,
    connection,
    execution_from_row,
    lock_execution,
    step_from_row,
    transaction,
)
from opsconductor.lifecycle.storage.execution_steps import (
    finish_step,
    load_steps,
    skip_remaining_steps,
    start_step,
)
from opsconductor.lifecycle.storage.locks import release_execution_locks

#: Who asked for a cancellation: a person, or automation (a machine identity).
CancelInitiator = Literal["user", "system"]

__all__ = [
    "CANCEL_CHANNEL",
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "TRANSITION_FIELDS",
    "CancelInitiator",
    "ExecutionRecord",
    "InvalidPageRequestError",
    "NewExecution",
    "NewStep",
    "PoolOrConnection",
    "StepRecord",
    "create_execution",
    "finish_step",
    "get_execution",
    "increment_cancel_checks",
    "list_executions",
    "load_steps",
    "request_cancel",
    "retire_idempotency_key",
    "retire_idempotency_keys",
    "skip_remaining_steps",
    "start_step",
    "transition",
    "transition_status",
]

log = structlog.get_logger(__name__)

#: NOTIFY channel carrying the id of an execution whose cancellation was just requested.
CANCEL_CHANNEL = "execution_cancel"

#: Columns a transition may set besides status and its audit columns.
TRANSITION_FIELDS = frozenset(
    {
        "worker_id",
        "timed_out",
        "error_class",
        "error_message",
        "result_summary",
        "attempts",
        "lease_token",
        "deadline_at",
        "approval_id",
        "lease_renewals",
    }
)

_TERMINAL_VALUES = sorted(status.value for status in TERMINAL)
# Statuses with no worker attached: a cancel request ends them at once.
_CANCEL_AT_ONCE = frozenset(
    {ExecutionStatus.PENDING, ExecutionStatus.QUEUED, ExecutionStatus.AWAITING_APPROVAL}
)
# A conflicting key can be retired between our INSERT and our SELECT; then we simply go again.
_CREATE_ATTEMPTS = 3

_RETIRE_EXPIRED_KEY = """
UPDATE executions SET idempotency_retired_at = now()
WHERE tenant_id = $1 AND idempotency_key = $2 AND idempotency_retired_at IS NULL
  AND status = ANY($3::execution_status[]) AND ended_at < now() - $4::interval
"""
_RETIRE_BATCH = """
WITH due AS (
    SELECT id FROM executions
    WHERE idempotency_retired_at IS NULL AND ended_at IS NOT NULL
      AND ended_at < now() - $1::interval AND status = ANY($2::execution_status[])
    ORDER BY ended_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE executions e SET idempotency_retired_at = now() FROM due WHERE e.id = due.id
"""
_INSERT = """
INSERT INTO executions (
    tenant_id, actor_id, request_id, idempotency_key, plan_hash, plan_snapshot,
    plan_snapshot_hash, status, execution_mode, sla_class, action_class, approval_level,
    priority, timeout_policy_id, timeout_ms, estimated_duration_ms, record_only, started_at,
    trace_context
)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8::execution_status, $9::execution_mode, $10::sla_class,
        $11, $12, $13, $14, $15, $16, $17,
        CASE WHEN $8::execution_status = 'running' THEN now() END, $18)
ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_retired_at IS NULL DO NOTHING
RETURNING *
"""
_SELECT_LIVE_KEY = """
SELECT * FROM executions
WHERE tenant_id = $1 AND idempotency_key = $2 AND idempotency_retired_at IS NULL
"""
_INSERT_STEPS = """
INSERT INTO execution_steps (execution_id, step_id, position, action, action_class, idempotency_key)
SELECT $1, s.step_id, s.position, s.action, s.action_class, s.idempotency_key
FROM unnest($2::text[], $3::int[], $4::text[], $5::text[], $6::text[])
    AS s(step_id, position, action, action_class, idempotency_key)
RETURNING *
"""
_REQUEST_CANCEL = """
UPDATE executions
SET cancelled_by = $3, cancelled_at = GREATEST(clock_timestamp(), created_at),
    cancel_reason = $4, cancel_initiator = $6, updated_at = clock_timestamp()
WHERE id = $1 AND tenant_id = $2 AND cancelled_at IS NULL
  AND status <> ALL($5::execution_status[])
RETURNING *
"""
_INCREMENT_CANCEL_CHECKS = """
UPDATE executions SET cancel_checks_performed = cancel_checks_performed + $2
WHERE id = $1 RETURNING cancel_checks_performed
"""


class NewStep(NamedTuple):
    """A step row to create with its execution; plain 4-tuples in this order work too."""

    step_id: str
    position: int
    action: str
    action_class: str


@dataclass(frozen=True)
class NewExecution:
    """Everything resolved at submit time that an execution row is created with."""

    tenant_id: str
    actor_id: str
    request_id: str | None
    idempotency_key: str
    plan_hash: str
    plan_snapshot: dict[str, Any]
    plan_snapshot_hash: str
    execution_mode: str
    sla_class: str
    action_class: str
    approval_level: int
    priority: int
    timeout_policy_id: str | None
    timeout_ms: int
    estimated_duration_ms: int | None
    record_only: bool
    initial_status: ExecutionStatus = ExecutionStatus.PENDING
    steps: Sequence[tuple[str, int, str, str]] = field(default_factory=tuple)
    #: W3C traceparent of the creating request (tracing on), continued by the worker.
    trace_context: str | None = None


async def create_execution(
    db: PoolOrConnection, new: NewExecution, *, dedup_window: timedelta
) -> tuple[ExecutionRecord, bool]:
    """Create the execution for ``new.idempotency_key`` unless a live one exists; return it.

    Returns ``(record, created)``. Concurrent identical calls all get the same execution and only
    the creator writes steps and the ``execution_started`` event. A terminal execution of the same
    key that ended more than ``dedup_window`` ago is retired first, so the plan can run again.
    """
    if new.initial_status in TERMINAL:
        raise ValueError(f"an execution cannot start {new.initial_status}")
    for _ in range(_CREATE_ATTEMPTS):
        async with atomic(db) as conn:
            await conn.execute(
                _RETIRE_EXPIRED_KEY,
                new.tenant_id,
                new.idempotency_key,
                _TERMINAL_VALUES,
                dedup_window,
            )
            row = await conn.fetchrow(
                _INSERT,
                new.tenant_id,
                new.actor_id,
                new.request_id,
                new.idempotency_key,
                new.plan_hash,
                new.plan_snapshot,
                new.plan_snapshot_hash,
                new.initial_status.value,
                new.execution_mode,
                new.sla_class,
                new.action_class,
                new.approval_level,
                new.priority,
                new.timeout_policy_id,
                new.timeout_ms,
                new.estimated_duration_ms,
                new.record_only,
                new.trace_context,
            )
            if row is not None:
                record = await _finish_creation(conn, execution_from_row(row), new)
                # From here the caller's task works on this execution: its records say so.
                bind_execution_fields(record)
                log.info(
                    "execution_created",
                    execution_id=str(record.id),
                    tenant_id=record.tenant_id,
                    status=record.status.value,
                    mode=record.execution_mode,
                )
                return record, True
            existing = await conn.fetchrow(_SELECT_LIVE_KEY, new.tenant_id, new.idempotency_key)
            if existing is not None:
                steps = await load_steps(conn, existing["id"])
                return execution_from_row(existing, steps), False
    raise StorageError("could not create or find the execution for this idempotency key")


async def _finish_creation(
    conn: Any, record: ExecutionRecord, new: NewExecution
) -> ExecutionRecord:
    steps: tuple[StepRecord, ...] = ()
    if new.steps:
        rows = await conn.fetch(
            _INSERT_STEPS,
            record.id,
            [step[0] for step in new.steps],
            [step[1] for step in new.steps],
            [step[2] for step in new.steps],
            [step[3] for step in new.steps],
            [step_idempotency_key(record.id, step[0]) for step in new.steps],
        )
        steps = tuple(sorted((step_from_row(r) for r in rows), key=lambda s: s.position))
    seq = await append_event(
        conn,
        tenant_id=record.tenant_id,
        execution_id=record.id,
        actor_id=record.actor_id,
        type="execution_started",
        payload={
            "mode": record.execution_mode,
            "status": record.status.value,
            "plan_hash": record.plan_hash,
            "approval_level": record.approval_level,
            "sla_class": record.sla_class,
            "timeout_policy_id": record.timeout_policy_id,
        },
    )
    return replace(record, steps=steps, event_seq=seq)


async def retire_idempotency_keys(
    db: PoolOrConnection, dedup_window: timedelta, *, batch_size: int = 1000
) -> int:
    """Retire the keys of terminal executions that ended over ``dedup_window`` ago (reaper job).

    Works in batches of ``batch_size`` rows, each its own transaction, skipping rows another
    transaction holds; returns how many keys were retired.
    """
    total = 0
    while True:
        async with transaction(db) as conn:
            status = await conn.execute(_RETIRE_BATCH, dedup_window, _TERMINAL_VALUES, batch_size)
        retired = int(status.split()[-1])
        total += retired
        if retired < batch_size:
            break
    if total:
        log.info("idempotency_keys_retired", count=total)
    return total


_RETIRE_ONE = """
UPDATE executions SET idempotency_retired_at = clock_timestamp(), updated_at = clock_timestamp()
WHERE id = $1 AND idempotency_retired_at IS NULL AND status = ANY($2::execution_status[])
"""


async def retire_idempotency_key(db: PoolOrConnection, execution_id: UUID) -> bool:
    """Retire one terminal execution's key now (nothing ran, e.g. its target was busy).

    The same plan can then be submitted again at once instead of replaying this failure for the
    whole dedup window. Returns whether a key was retired (never for a non-terminal execution).
    """
    async with connection(db) as conn:
        status = await conn.execute(_RETIRE_ONE, execution_id, _TERMINAL_VALUES)
    return bool(str(status).split()[-1] == "1")


async def transition(
    db: PoolOrConnection,
    execution_id: UUID,
    *,
    to: ExecutionStatus,
    by: str,
    expected_from: ExecutionStatus | Collection[ExecutionStatus] | None = None,
    lease_token: UUID | None = None,
    worker_id: str | None = None,
    fields: Mapping[str, Any] | None = None,
    event_type: str | None = None,
    event_payload: Mapping[str, Any] | None = None,
    tenant_id: str | None = None,
) -> ExecutionRecord:
    """Move an execution to ``to`` under compare-and-set and record it; return the new row.

    In one transaction: lock the row; refuse with :class:`StaleLeaseError` when ``lease_token``
    is given and no longer owns the execution; refuse with :class:`FSMError` when the current
    status is not in ``expected_from`` or the FSM forbids the move; then write the status,
    ``last_transition_at/by/from``, ``started_at`` (first entry into running), ``ended_at``
    (terminal), the whitelisted ``fields`` and append one event: ``event_type`` or the default
    for the target (``execution_running``, ``execution_queued``, ``approval_requested``, …).
    A terminal move always ends with ``execution_completed`` carrying the final status; a custom
    ``event_type`` for it is appended just before. ``tenant_id``, when given, scopes the lookup
    (another tenant's execution is "not found"). A refused move writes nothing. A terminal move
    made by the lease holder (``lease_token`` given) also releases every lock the execution
    holds.
    """
    target = ExecutionStatus(to)
    values = dict(fields or {})
    unknown = set(values) - TRANSITION_FIELDS
    if unknown:
        raise ValueError(f"columns not settable by a transition: {sorted(unknown)}")
    if worker_id is not None:
        values["worker_id"] = worker_id
    allowed_from = _status_set(expected_from)
    # Legal and expected sources: the compare-and-set below moves only from one of these.
    sources = allowed_sources(target) & (allowed_from or frozenset(ExecutionStatus))
    async with atomic(db) as conn:
        row = None
        if sources:
            # The usual case in one statement: the row lock, the fencing and tenant checks and
            # the status compare-and-set are the UPDATE's own (re-checked on the newest row
            # version if a concurrent writer got there first).
            sql, params = _transition_update(target, values, fenced=True)
            row = await conn.fetchrow(
                sql,
                execution_id,
                target.value,
                sorted(s.value for s in sources),
                by,
                *params,
                lease_token,
                tenant_id,
            )
        if row is None:
            # Refused (or raced): lock the row and say exactly why, as before; a move that is
            # legal once the row is locked goes ahead.
            locked = await lock_execution(conn, execution_id, lease_token=lease_token)
            if tenant_id is not None and locked["tenant_id"] != tenant_id:
                raise NotFoundError("execution not found", execution_id=str(execution_id))
            current = ExecutionStatus(locked["status"])
            if allowed_from is not None and current not in allowed_from:
                raise FSMError(
                    f"Illegal state transition {current.value} -> {target.value}",
                    from_status=current.value,
                    to_status=target.value,
                    expected_from=sorted(s.value for s in allowed_from),
                )
            check_transition(current, target)
            sql, params = _transition_update(target, values, fenced=False)
            row = await conn.fetchrow(sql, execution_id, target.value, [current.value], by, *params)
        record = execution_from_row(row)
        current = ExecutionStatus(row["last_transition_from"])
        seq = await _append_transition_events(
            conn, record, current, by, event_type, dict(event_payload or {})
        )
        if target in TERMINAL and lease_token is not None:
            # The lease holder ends it: no other worker may act for it any more, so every lock
            # it holds goes, including those a paused level-3 run kept between two approvals.
            await release_execution_locks(conn, execution_id)
        if target in TERMINAL:
            # Counted once, by the process that ended it, when (and only if) it commits.
            after_commit(conn, functools.partial(record_finished, record))
    log.info(
        "execution_transitioned",
        execution_id=str(execution_id),
        from_status=current.value,
        to_status=target.value,
        by=by,
    )
    return replace(record, event_seq=seq)


def _status_set(
    expected: ExecutionStatus | Collection[ExecutionStatus] | None,
) -> frozenset[ExecutionStatus] | None:
    if expected is None:
        return None
    if isinstance(expected, str):
        return frozenset({ExecutionStatus(expected)})
    return frozenset(ExecutionStatus(s) for s in expected)


def _transition_update(
    target: ExecutionStatus, values: Mapping[str, Any], *, fenced: bool
) -> tuple[str, list[Any]]:
    """``UPDATE … RETURNING *`` moving the row from one of ``$3`` (statuses) to ``$2``.

    ``fenced``: two more parameters after the fields, the lease token and the tenant, each
    checked when not NULL (the single-statement path; the locking path checked them itself).
    """
    sets = [
        "status = $2::execution_status",
        # The status before this UPDATE (SET expressions read the old row).
        "last_transition_from = status",
        "last_transition_by = $4",
        "last_transition_at = clock_timestamp()",
        "updated_at = clock_timestamp()",
    ]
    # clock_timestamp(), not now(): a transaction that began before the row was created must
    # still write times after created_at (valid_timing).
    if target is ExecutionStatus.RUNNING:
        sets.append("started_at = COALESCE(started_at, GREATEST(clock_timestamp(), created_at))")
    if target in TERMINAL:
        sets.append("ended_at = GREATEST(clock_timestamp(), started_at, created_at)")
    params: list[Any] = []
    for number, (column, value) in enumerate(sorted(values.items()), start=5):
        # Column names come from TRANSITION_FIELDS only, never from input.
        sets.append(f"{column} = ${number}")
        params.append(value)
    where = "id = $1 AND status = ANY($3::execution_status[])"
    if fenced:
        token, tenant = len(params) + 5, len(params) + 6
        where += (
            f" AND (${token}::uuid IS NULL OR lease_token IS NOT DISTINCT FROM ${token}::uuid)"
            f" AND (${tenant}::text IS NULL OR tenant_id = ${tenant}::text)"
        )
    sql = f"UPDATE executions SET {', '.join(sets)} WHERE {where} RETURNING *"
    return sql, params


def _default_event_type(target: ExecutionStatus) -> str:
    if target in TERMINAL:
        return "execution_completed"
    if target is ExecutionStatus.AWAITING_APPROVAL:
        return "approval_requested"
    return f"execution_{target.value}"


async def _append_transition_events(
    conn: Any,
    record: ExecutionRecord,
    previous: ExecutionStatus,
    by: str,
    event_type: str | None,
    extra: dict[str, Any],
) -> int:
    payload = {**extra, "status": record.status.value, "from": previous.value}
    final = _default_event_type(record.status)
    seq = 0
    if record.status in TERMINAL:
        if event_type is not None and event_type != final:
            seq = await append_event(
                conn,
                tenant_id=record.tenant_id,
                execution_id=record.id,
                actor_id=by,
                type=event_type,
                payload=payload,
            )
        payload.setdefault("timed_out", record.timed_out)
        payload.setdefault("duration_ms", record.duration_ms)
        if record.error_class is not None:
            payload.setdefault("error_class", record.error_class)
        if record.cancelled_by is not None:
            payload.setdefault("cancelled_by", record.cancelled_by)
    else:
        final = event_type or final
    seq = await append_event(
        conn,
        tenant_id=record.tenant_id,
        execution_id=record.id,
        actor_id=by,
        type=final,
        payload=payload,
    )
    return seq


async def transition_status(
    *,
    execution_id: UUID | str,
    from_status: ExecutionStatus | str,
    to_status: ExecutionStatus | str,
    actor_id: str,
    db: PoolOrConnection,
) -> ExecutionRecord:
    """Spec §4.1 form of :func:`transition`: ``from_status`` → ``to_status``, else FSMError."""
    return await transition(
        db,
        as_execution_id(execution_id),
        to=ExecutionStatus(to_status),
        by=actor_id,
        expected_from=ExecutionStatus(from_status),
    )


async def request_cancel(
    db: PoolOrConnection,
    execution_id: UUID | str,
    *,
    tenant_id: str,
    by: str,
    reason: str | None,
    initiator: CancelInitiator = "user",
) -> tuple[ExecutionRecord, bool]:
    """Record a cancellation request once; return ``(record, newly_requested)``.

    ``initiator`` says who asked: a person (``user``) or automation (``system``); metrics keep
    the two apart.

    ``cancelled_by``/``cancelled_at`` are set together by one statement, only if unset and the
    execution is not terminal; then a ``cancel_requested`` event is appended and
    ``pg_notify('execution_cancel', id)`` wakes a worker running it. An execution no worker holds
    (pending, queued, awaiting approval) has its steps skipped, its open approval requests
    invalidated and the locks it holds (a paused level-3 execution) released, and ends
    ``cancelled`` at once; a running one is finished by its worker. Repeated or late calls
    return the record unchanged.
    """
    eid = as_execution_id(execution_id)
    async with transaction(db) as conn:
        row = await conn.fetchrow(
            _REQUEST_CANCEL, eid, tenant_id, by, reason, _TERMINAL_VALUES, initiator
        )
        if row is None:
            return await get_execution(conn, tenant_id, eid), False
        status = ExecutionStatus(row["status"])
        await append_event(
            conn,
            tenant_id=tenant_id,
            execution_id=eid,
            actor_id=by,
            type="cancel_requested",
            payload={"by": by, "reason": reason, "status": status.value},
        )
        await conn.execute("SELECT pg_notify($1, $2)", CANCEL_CHANNEL, str(eid))
        if status in _CANCEL_AT_ONCE:
            await skip_remaining_steps(conn, eid, 0, reason="cancelled")
            # An execution waiting for a decision: its open request can no longer be decided,
            # and a level-3 execution paused between steps still holds its targets' locks.
            await close_pending_approvals(
                conn, eid, state=ApprovalState.INVALIDATED, by=by, reason="execution_cancelled"
            )
            await release_execution_locks(conn, eid)
            await transition(
                conn,
                eid,
                to=ExecutionStatus.CANCELLED,
                by=by,
                expected_from=status,
                event_payload={"reason": reason},
            )
        record = await get_execution(conn, tenant_id, eid)
    log.info("execution_cancel_requested", execution_id=str(eid), by=by, status=status.value)
    return record, True


async def increment_cancel_checks(db: PoolOrConnection, execution_id: UUID, n: int = 1) -> int:
    """Count ``n`` more cancellation checks on an execution; return the new total."""
    async with connection(db) as conn:
        total = await conn.fetchval(_INCREMENT_CANCEL_CHECKS, execution_id, n)
    if total is None:
        raise NotFoundError("execution not found", execution_id=str(execution_id))
    return int(total)
