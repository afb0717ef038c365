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
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, NamedTuple
from uuid import UUID, uuid4

import structlog

from opsconductor.common.errors import FSMError, NotFoundError, StorageError
from opsconductor.common.fsm import TERMINAL, ExecutionStatus, allowed_sources, check_transition
from opsconductor.common.hashing import step_idempotency_key
from opsconductor.lifecycle.execution_logging import bind_execution_fields
from opsconductor.lifecycle.execution_metrics import counts_in_store, record_finished
from opsconductor.lifecycle.storage.approval_records import ApprovalState, close_pending_approvals
from opsconductor.lifecycle.storage.events import EVENTS_CHANNEL, append_event
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
    step_from_json,
    transaction,
)
from opsconductor.lifecycle.storage.execution_steps import (
    finish_step,
    load_steps,
    skip_remaining_steps,
    start_step,
)
from opsconductor.lifecycle.storage.locks import release_execution_locks
from opsconductor.lifecycle.storage.queries import query
from opsconductor.lifecycle.storage.quota_usage import (
    QUOTA_LOCK_CLASS,
    ImmediateUsage,
    WaitingUsage,
)

#: Who asked for a cancellation: a person, or automation (a machine identity).
CancelInitiator = Literal["user", "system"]

__all__ = [
    "CANCEL_CHANNEL",
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "TRANSITION_FIELDS",
    "CancelInitiator",
    "CreatedQueued",
    "ExecutionRecord",
    "InvalidPageRequestError",
    "NewExecution",
    "NewStep",
    "PoolOrConnection",
    "StepRecord",
    "create_execution",
    "create_immediate_execution",
    "create_queued_execution",
    "finish_last_step",
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

_RETIRE_BATCH = query("retire_idempotency_keys")
# The two immediate creates differ only in how the tenant's usage is counted (see the template).
_CREATE_TEMPLATE = query("create_execution")
# Without admission: nothing counted, no lock.
_CREATE = _CREATE_TEMPLATE.replace("%USAGE%", query("create_usage_unlimited"))
# Admitting: the tenant's quota lock, then its in-flight executions counted under it.
_CREATE_ADMITTED = _CREATE_TEMPLATE.replace("%USAGE%", query("create_usage_admitted"))
_CREATE_QUEUED = query("create_queued_execution")
_REQUEST_CANCEL = query("request_cancel")
_INCREMENT_CANCEL_CHECKS = query("increment_cancel_checks")
_RETIRE_ONE = query("retire_idempotency_key")
_NOTIFY = query("notify")


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
    One statement (with its retries, when a concurrent creator won a race).
    """
    created = await _create(db, new, dedup_window, 0)
    assert not isinstance(created, ImmediateUsage)  # no limit, no refusal
    return created


async def create_immediate_execution(
    db: PoolOrConnection, new: NewExecution, *, dedup_window: timedelta, max_in_flight: int
) -> tuple[ExecutionRecord, bool] | ImmediateUsage:
    """:func:`create_execution`, admitted only while the tenant has fewer than
    ``max_in_flight`` (0: no limit) immediate executions ``pending`` or ``running``.

    Returns the tenant's usage instead, with nothing written, when it is at the limit; a
    duplicate of a live execution is returned, never refused (it takes no slot). Race-proof:
    the statement takes the tenant's quota lock (``QUOTA_LOCK_CLASS``'s, :mod:`.quota_usage`,
    held until its transaction ends: the statement's own, or the caller's) and counts on a snapshot
    taken once the lock is granted, so it sees every earlier admission of the tenant.
    """
    return await _create(db, new, dedup_window, max_in_flight, admit=True)


@dataclass(frozen=True)
class CreatedQueued:
    """What :func:`create_queued_execution` found or made: the execution (queued as created) and
    its queue job (None for a duplicate whose job has ended), and whether it was created."""

    record: ExecutionRecord
    created: bool
    job_id: UUID | None


def _create_params(
    execution_id: UUID, new: NewExecution, dedup_window: timedelta, limit: int
) -> tuple[Any, ...]:
    """The parameters every creating statement ($1-$28) shares: the execution, the key's
    dedup window, the tenant's limit and the steps as parallel arrays."""
    return (
        execution_id,
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
        dedup_window,
        _TERMINAL_VALUES,
        limit,
        [step[0] for step in new.steps],
        [step[1] for step in new.steps],
        [step[2] for step in new.steps],
        [step[3] for step in new.steps],
        [step_idempotency_key(execution_id, step[0]) for step in new.steps],
    )


async def create_queued_execution(
    conn: Any,
    new: NewExecution,
    *,
    dedup_window: timedelta,
    max_waiting: int,
    max_attempts: int,
    by: str,
) -> CreatedQueued | WaitingUsage:
    """Admit, create and queue a background execution in one statement, in the caller's
    transaction ``conn`` (the queue's Redis push comes after it, before the commit).

    The tenant's quota lock (held until the transaction ends), its waiting jobs counted against
    ``max_waiting`` (0: no limit), then as :func:`create_execution` but written ``queued`` (as
    :func:`transition` from ``pending`` by ``by`` would, its ``execution_queued`` event after
    ``execution_started``) with its ``execution_queue`` row (``max_attempts``). A duplicate of a
    live execution is returned with its job, never refused (it takes no slot); at the limit
    otherwise, the usage is returned with nothing written.
    """
    if not conn.is_in_transaction():
        raise RuntimeError("the quota lock is transaction-scoped: open a transaction first")
    if new.initial_status is not ExecutionStatus.PENDING:
        raise ValueError("a background submit queues a pending execution")
    for attempt in range(_CREATE_ATTEMPTS):
        execution_id = uuid4()
        row = await conn.fetchrow(
            _CREATE_QUEUED,
            *_create_params(execution_id, new, dedup_window, max_waiting),
            QUOTA_LOCK_CLASS,
            by,
            max_attempts,
        )
        if row["id"] is not None:
            steps = tuple(step_from_json(step) for step in row["steps_of_execution"] or ())
            record = execution_from_row(row, steps)
            if row["created"]:
                bind_execution_fields(record)
                log.info(
                    "execution_created",
                    execution_id=str(record.id),
                    tenant_id=record.tenant_id,
                    status=record.status.value,
                    mode=record.execution_mode,
                )
                # Created queued in one statement: the transition a two-step create would log
                # (and whose execution_queued event the statement wrote), logged as such.
                log.info(
                    "execution_transitioned",
                    execution_id=str(record.id),
                    from_status=ExecutionStatus.PENDING.value,
                    to_status=ExecutionStatus.QUEUED.value,
                    by=by,
                )
            return CreatedQueued(record, bool(row["created"]), row["job_id"])
        # At the limit with no live execution seen: the statement's snapshot predates the lock,
        # so a duplicate committed while it waited is invisible to it. Once more, on a snapshot
        # taken under the lock (held by this transaction now), before refusing.
        if max_waiting and row["waiting"] >= max_waiting and attempt > 0:
            return WaitingUsage(waiting=row["waiting"])
    raise StorageError("could not create or find the execution for this idempotency key")


async def _create(
    db: PoolOrConnection,
    new: NewExecution,
    dedup_window: timedelta,
    max_immediate_in_flight: int,
    *,
    admit: bool = False,
) -> tuple[ExecutionRecord, bool] | ImmediateUsage:
    if new.initial_status in TERMINAL:
        raise ValueError(f"an execution cannot start {new.initial_status}")
    for _ in range(_CREATE_ATTEMPTS):
        execution_id = uuid4()
        async with connection(db) as conn:
            row = await conn.fetchrow(
                _CREATE_ADMITTED if admit else _CREATE,
                *_create_params(execution_id, new, dedup_window, max_immediate_in_flight),
                *([QUOTA_LOCK_CLASS] if admit else []),
            )
        if row["id"] is not None:
            steps = tuple(step_from_json(step) for step in row["steps_of_execution"] or ())
            record = execution_from_row(row, steps)
            if not row["created"]:
                return record, False
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
        if max_immediate_in_flight and row["in_flight"] >= max_immediate_in_flight:
            return ImmediateUsage(in_flight=row["in_flight"], soonest_end=row["soonest_end"])
    raise StorageError("could not create or find the execution for this idempotency key")


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
    release_locks: bool = False,
) -> ExecutionRecord:
    """Move an execution to ``to`` under compare-and-set and record it; return the new row.

    Atomically: refuse with :class:`StaleLeaseError` when ``lease_token`` is given and no longer
    owns the execution; refuse with :class:`FSMError` when the current status is not in
    ``expected_from`` or the FSM forbids the move; then write the status,
    ``last_transition_at/by/from``, ``started_at`` (first entry into running), ``ended_at``
    (terminal), the whitelisted ``fields`` and append one event: ``event_type`` or the default
    for the target (``execution_running``, ``execution_queued``, ``approval_requested``, …).
    A terminal move always ends with ``execution_completed`` carrying the final status; a custom
    ``event_type`` for it is appended just before. ``tenant_id``, when given, scopes the lookup
    (another tenant's execution is "not found"). A refused move writes nothing. A terminal move
    made by the lease holder (``lease_token`` given), or with ``release_locks``, also releases
    every lock the execution holds; made by the lease holder, it also deletes the job's
    ``execution_queue`` row that this lease holds (see :data:`_DEQUEUE_MOVED`): the holder only
    has to ack Redis afterwards.

    The usual case is one statement (no transaction of its own): the compare-and-set, its
    events and the lock release are one ``UPDATE … RETURNING`` with its ``INSERT`` and
    ``DELETE`` in a CTE, atomic by itself.
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
    types = _event_types(target, event_type)
    release = target in TERMINAL and (lease_token is not None or release_locks)
    # The lease holder's end of the run is its job's end too: the queue row goes with it.
    dequeue = target in TERMINAL and lease_token is not None
    # The reaper's outcomes are counted by this statement, not in its (short-lived) process.
    stored = target in TERMINAL and counts_in_store()
    extra = dict(event_payload or {})
    row = None
    if sources:
        # The usual case in one statement: the row lock, the fencing and tenant checks and
        # the status compare-and-set are the UPDATE's own (re-checked on the newest row
        # version if a concurrent writer got there first).
        sql, params = _transition_update(
            target, values, fenced=True, release=release, stored=stored, dequeue=dequeue
        )
        async with connection(db) as conn:
            row = await conn.fetchrow(
                sql,
                execution_id,
                target.value,
                sorted(s.value for s in sources),
                by,
                types,
                extra,
                *params,
                lease_token,
                tenant_id,
            )
            if row is not None:
                _transitioned(conn, row, target, stored=stored)
    if row is None:
        async with atomic(db) as conn:
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
            sql, params = _transition_update(
                target,
                values,
                fenced=False,
                release=release,
                stored=stored,
                dequeue=dequeue,
                lease_token=lease_token,
            )
            row = await conn.fetchrow(
                sql, execution_id, target.value, [current.value], by, types, extra, *params
            )
            _transitioned(conn, row, target, stored=stored)
    record = execution_from_row(row)
    _log_transitioned(execution_id, row, target, by)
    return record


def _log_transitioned(execution_id: UUID, row: Any, target: ExecutionStatus, by: str) -> None:
    # One line per change: the locks the same statement released are a field of it.
    released = row["released_locks"]
    log.info(
        "execution_transitioned",
        execution_id=str(execution_id),
        from_status=row["last_transition_from"],
        to_status=target.value,
        by=by,
        **({"released_locks": sorted(released)} if released else {}),
    )


def _transitioned(conn: Any, row: Any, target: ExecutionStatus, *, stored: bool) -> None:
    if target in TERMINAL and not stored:
        # Counted once, by the process that ended it, when (and only if) it commits.
        after_commit(conn, functools.partial(record_finished, execution_from_row(row)))


def _event_types(target: ExecutionStatus, event_type: str | None) -> list[str]:
    """The events a move to ``target`` appends, in seq order."""
    final = _default_event_type(target)
    if target not in TERMINAL:
        return [event_type or final]
    if event_type is not None and event_type != final:
        return [event_type, final]
    return [final]


def _status_set(
    expected: ExecutionStatus | Collection[ExecutionStatus] | None,
) -> frozenset[ExecutionStatus] | None:
    if expected is None:
        return None
    if isinstance(expected, str):
        return frozenset({ExecutionStatus(expected)})
    return frozenset(ExecutionStatus(s) for s in expected)


# The transition statement is composed here, not named in a .sql file: its SET list names the
# caller's fields and its lock release, step finish and counter are CTEs added only when asked.
# Every event of a move carries the caller's payload ($6) with the new and previous status; a
# terminal move's last one (execution_completed) also says how it ended, unless the caller's
# payload already does. duration_ms as ExecutionRecord.duration_ms computes it (float seconds
# × 1000, truncated), so the event and the record agree to the millisecond.
_MOVE_PAYLOAD = (
    "$6::jsonb || jsonb_build_object('status', u.status, 'from', u.last_transition_from)"
)
_FINAL_PAYLOAD = f"""jsonb_build_object(
        'timed_out', u.timed_out,
        'duration_ms', trunc(extract(epoch FROM u.ended_at - u.started_at)::float8 * 1000)::bigint
    )
    || CASE WHEN u.error_class IS NULL THEN '{{}}'::jsonb
            ELSE jsonb_build_object('error_class', u.error_class) END
    || CASE WHEN u.cancelled_by IS NULL THEN '{{}}'::jsonb
            ELSE jsonb_build_object('cancelled_by', u.cancelled_by) END
    || {_MOVE_PAYLOAD}"""
# finish_last_step: the running step ends succeeded with the result, at the execution's end.
_FINISHED_STEP = """, fs AS (
    UPDATE execution_steps s
    SET status = 'succeeded', result = ${result}, error_class = NULL, error_message = NULL,
        ended_at = GREATEST(u.ended_at, s.started_at),
        duration_ms = (
            extract(epoch FROM GREATEST(u.ended_at, s.started_at) - s.started_at) * 1000
        )::bigint
    FROM u
    WHERE s.execution_id = u.id AND s.step_id = ${step_id} AND s.status = 'running'
    RETURNING s.*
)"""
# The payload finish_step gives a succeeded step's event.
_STEP_PAYLOAD = """jsonb_build_object(
        'step_id', fs.step_id, 'position', fs.position, 'action', fs.action,
        'attempt', fs.attempt, 'duration_ms', fs.duration_ms
    )"""
# The execution's locks, in the global key order (storage/locks.py), once the move is made.
_RELEASE_MOVED = """, released AS (
    DELETE FROM execution_locks
    WHERE lock_key IN (
        SELECT lock_key FROM execution_locks WHERE owner_execution_id = (SELECT id FROM u)
        ORDER BY lock_key COLLATE "C"
        FOR UPDATE
    ) AND owner_execution_id = (SELECT id FROM u)
    RETURNING lock_key
)"""

# The lease holder's terminal move also ends its job in Postgres: the queue row this lease holds
# (fenced on the token) is deleted by the same statement, and the holder acks Redis after the
# commit. Should it die in between, the Redis entry outlives the row: its lease expires, and the
# worker that gets it next finds no row and a terminal execution and only acks it (queue.handoff);
# nothing can run again, a terminal execution never moves. SKIP LOCKED: a row locked by someone
# else is being taken over (its token changes) or re-pushed by the reaper; either way it is not
# this lease's to delete now, and waiting for it while holding the execution row could deadlock
# with a takeover (queue row first, then the execution). Such a row is dropped by the worker
# that dequeues it next.
_DEQUEUE_MOVED = """, dequeued AS (
    DELETE FROM execution_queue WHERE id IN (
        SELECT q.id FROM execution_queue q, u
        WHERE q.execution_id = u.id AND q.lease_token = ${token}::uuid AND q.state = 'leased'
        FOR UPDATE OF q SKIP LOCKED
    )
    RETURNING id
)"""


# An outcome the reaper ends, counted where it happens (its process may not live until a
# scrape): one row per label set, incremented by the statement that ends the execution.
_COUNT_ENDED = """, counted AS (
    INSERT INTO metric_counters (name, labels, value)
    SELECT 'reaper_executions_ended', jsonb_build_object(
        'mode', u.execution_mode::text, 'sla_class', u.sla_class::text,
        'action_class', u.action_class, 'status', u.status::text,
        'error_class', CASE WHEN u.status = 'failed' THEN COALESCE(u.error_class, 'unknown')
                            ELSE '' END,
        'timed_out', u.status = 'failed' AND u.timed_out), 1
    FROM u
    ON CONFLICT (name, labels) DO UPDATE SET value = metric_counters.value + 1
)"""


def _transition_update(
    target: ExecutionStatus,
    values: Mapping[str, Any],
    *,
    fenced: bool,
    release: bool,
    finishing_step: bool = False,
    stored: bool = False,
    dequeue: bool = False,
    lease_token: UUID | None = None,
) -> tuple[str, list[Any]]:
    """One statement moving the row from one of ``$3`` (statuses) to ``$2`` with its events.

    ``$5`` are the event types in order (each takes the next ``seq``), ``$6`` the caller's
    payload. ``fenced``: two more parameters after the fields, the lease token and the tenant,
    each checked when not NULL (the single-statement path; the locking path checked them
    itself). ``release``: the execution's locks are deleted by the same statement.
    ``finishing_step`` (with ``fenced``): the running step named by the next parameter also
    ends ``succeeded`` with the result after it, its event first (:func:`finish_last_step`).
    ``stored``: the ended execution is counted in ``metric_counters`` by the same statement.
    ``dequeue``: the job's queue row held by the lease token is deleted by the same statement
    (:data:`_DEQUEUE_MOVED`); fenced, the token is the fencing one, else ``lease_token`` is
    passed as the last of the returned parameters.
    """
    sets = [
        "status = $2::execution_status",
        # The status before this UPDATE (SET expressions read the old row).
        "last_transition_from = status",
        "last_transition_by = $4",
        "last_transition_at = clock_timestamp()",
        "updated_at = clock_timestamp()",
        "event_seq = event_seq + cardinality($5::text[])",
    ]
    # clock_timestamp(), not now(): a transaction that began before the row was created must
    # still write times after created_at (valid_timing).
    if target is ExecutionStatus.RUNNING:
        sets.append("started_at = COALESCE(started_at, GREATEST(clock_timestamp(), created_at))")
    if target in TERMINAL:
        sets.append("ended_at = GREATEST(clock_timestamp(), started_at, created_at)")
    params: list[Any] = []
    for number, (column, value) in enumerate(sorted(values.items()), start=7):
        # Column names come from TRANSITION_FIELDS only, never from input.
        sets.append(f"{column} = ${number}")
        params.append(value)
    where = "id = $1 AND status = ANY($3::execution_status[])"
    if fenced:
        token, tenant = len(params) + 7, len(params) + 8
        where += (
            f" AND (${token}::uuid IS NULL OR lease_token IS NOT DISTINCT FROM ${token}::uuid)"
            f" AND (${tenant}::text IS NULL OR tenant_id = ${tenant}::text)"
        )
    dequeue_sql = ""
    if dequeue and fenced:
        dequeue_sql = _DEQUEUE_MOVED.format(token=len(params) + 7)
    elif dequeue:
        params.append(lease_token)
        dequeue_sql = _DEQUEUE_MOVED.format(token=len(params) + 6)
    step_id = step_result = 0
    finished_step = ""
    if finishing_step:
        step_id, step_result = len(params) + 9, len(params) + 10
        finished_step = ", (SELECT to_jsonb(fs) FROM fs) AS finished_step"
        # The execution row is locked first (this UPDATE), then the step's, as every step
        # writer does; step rows change only under the execution row's lock, so the status
        # seen here is the one the step UPDATE below finds.
        where += (
            " AND EXISTS (SELECT 1 FROM execution_steps"
            f" WHERE execution_id = $1 AND step_id = ${step_id} AND status = 'running')"
        )
    last_payload = _FINAL_PAYLOAD if target in TERMINAL else _MOVE_PAYLOAD
    # Rows are inserted in seq order: the audit chain trigger hashes each event onto the one
    # before it, which must already be there (an earlier row of the same INSERT is visible).
    sql = f"""
WITH u AS (
    UPDATE executions SET {", ".join(sets)} WHERE {where} RETURNING *
){_FINISHED_STEP.format(step_id=step_id, result=step_result) if finishing_step else ""}
, ev AS (
    INSERT INTO execution_events (execution_id, tenant_id, actor_id, seq, type, payload)
    SELECT u.id, u.tenant_id,
           {"CASE WHEN t.n = 1 THEN fs.worker_id ELSE $4 END" if finishing_step else "$4"},
           u.event_seq - cardinality($5::text[]) + t.n, t.type,
           CASE WHEN t.n = cardinality($5::text[]) THEN {last_payload}
                ELSE {_STEP_PAYLOAD if finishing_step else _MOVE_PAYLOAD} END
    FROM u{", fs" if finishing_step else ""}, unnest($5::text[]) WITH ORDINALITY AS t(type, n)
    ORDER BY t.n
    RETURNING execution_id, seq
){_RELEASE_MOVED if release else ""}{dequeue_sql}{_COUNT_ENDED if stored else ""}
SELECT u.*,
    (SELECT count(pg_notify('{EVENTS_CHANNEL}', ev.execution_id::text || ':' || ev.seq))
     FROM ev) AS notified,
    {"(SELECT array_agg(lock_key) FROM released)" if release else "NULL::text[]"}
        AS released_locks{finished_step}
FROM u
"""
    return sql, params


async def finish_last_step(
    db: PoolOrConnection,
    execution_id: UUID,
    step_id: str,
    *,
    result: Any,
    by: str,
    lease_token: UUID | None,
    fields: Mapping[str, Any],
    tenant_id: str,
) -> tuple[ExecutionRecord, StepRecord] | None:
    """The last step succeeded and so did the execution: record both in one statement.

    The step's ``step_succeeded`` and the execution's ``execution_completed`` (in that order),
    the execution's locks released (and, for the lease holder, its job's queue row deleted),
    exactly as :func:`.finish_step` then :func:`transition` to ``succeeded`` would. None when
    either would refuse (the execution is not running, ``lease_token`` no longer owns it, the
    step is not running): nothing is written, and the caller makes both writes one by one,
    which say why.
    """
    values = dict(fields)
    unknown = set(values) - TRANSITION_FIELDS
    if unknown:
        raise ValueError(f"columns not settable by a transition: {sorted(unknown)}")
    target = ExecutionStatus.SUCCEEDED
    stored = counts_in_store()  # a worker's path: False but for a worker run in a reaper pass
    sql, params = _transition_update(
        target,
        values,
        fenced=True,
        release=True,
        finishing_step=True,
        stored=stored,
        dequeue=lease_token is not None,
    )
    async with connection(db) as conn:
        row = await conn.fetchrow(
            sql,
            execution_id,
            target.value,
            [ExecutionStatus.RUNNING.value],
            by,
            ["step_succeeded", "execution_completed"],
            {},
            *params,
            lease_token,
            tenant_id,
            step_id,
            result,
        )
        if row is None:
            return None
        _transitioned(conn, row, target, stored=stored)
    record = execution_from_row(row)
    step = step_from_json(row["finished_step"])
    # No step_finished line here: the runner, the only caller, logs the step's (step_*).
    _log_transitioned(execution_id, row, target, by)
    return record, step


def _default_event_type(target: ExecutionStatus) -> str:
    if target in TERMINAL:
        return "execution_completed"
    if target is ExecutionStatus.AWAITING_APPROVAL:
        return "approval_requested"
    return f"execution_{target.value}"


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
        # The rest of the caller's task works on this execution: its records say so.
        bind_execution_fields(execution_from_row(row))
        await append_event(
            conn,
            tenant_id=tenant_id,
            execution_id=eid,
            actor_id=by,
            type="cancel_requested",
            payload={"by": by, "reason": reason, "status": status.value},
        )
        await conn.execute(_NOTIFY, CANCEL_CHANNEL, str(eid))
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
