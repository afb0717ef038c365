"""Execution and step records, and the transaction and fencing plumbing their writers share.

The writers live in :mod:`.executions` (execution rows) and :mod:`.execution_steps` (step rows);
both import from here, and :mod:`.executions` re-exports everything public, so callers only ever
import ``opsconductor.lifecycle.storage.executions``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, TypeAlias
from uuid import UUID

import asyncpg
import structlog

from opsconductor.common.errors import NotFoundError, StaleLeaseError, StorageError
from opsconductor.common.fsm import TERMINAL, ExecutionStatus, StepStatus
from opsconductor.lifecycle.storage.queries import query

#: A pool (a connection is borrowed per call) or a connection (the call runs on it, inside any
#: transaction already open there, as a savepoint, so the caller's commit or rollback decides).
PoolOrConnection: TypeAlias = asyncpg.Pool | asyncpg.Connection

_DRIVER_ERRORS: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)

log = structlog.get_logger(__name__)

_LOCK_EXECUTION = query("lock_execution")


@dataclass(frozen=True)
class StepRecord:
    """One row of ``execution_steps``."""

    execution_id: UUID
    step_id: str
    position: int
    action: str
    action_class: str
    status: StepStatus
    idempotency_key: str
    attempt: int
    worker_id: str | None
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    duration_ms: int | None
    result: Any
    error_class: str | None
    error_message: str | None


@dataclass(frozen=True)
class ExecutionRecord:
    """One row of ``executions`` (every column), optionally with its steps in position order."""

    id: UUID
    tenant_id: str
    actor_id: str
    request_id: str | None
    idempotency_key: str
    idempotency_retired_at: datetime | None
    plan_hash: str
    plan_snapshot: dict[str, Any]
    plan_snapshot_hash: str
    status: ExecutionStatus
    execution_mode: str
    sla_class: str
    action_class: str
    approval_level: int
    approval_id: UUID | None
    priority: int
    timeout_policy_id: str | None
    timeout_ms: int
    timed_out: bool
    estimated_duration_ms: int | None
    deadline_at: datetime | None
    record_only: bool
    attempts: int
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    updated_at: datetime
    cancelled_by: str | None
    cancelled_at: datetime | None
    cancel_reason: str | None
    result_summary: Any
    error_class: str | None
    error_message: str | None
    worker_id: str | None
    lease_renewals: int
    cancel_checks_performed: int
    last_transition_at: datetime | None
    last_transition_by: str | None
    last_transition_from: ExecutionStatus | None
    lease_token: UUID | None
    event_seq: int
    steps: tuple[StepRecord, ...] = ()
    #: ``user`` or ``system`` once cancelled (migration 0006); None otherwise.
    cancel_initiator: str | None = None
    #: W3C traceparent of the request that created it (migration 0008); None: not traced.
    trace_context: str | None = None

    @property
    def duration_ms(self) -> int | None:
        """Wall time from start to end in milliseconds, once both are known."""
        if self.started_at is None or self.ended_at is None:
            return None
        return int((self.ended_at - self.started_at).total_seconds() * 1000)

    @property
    def is_terminal(self) -> bool:
        """Whether the execution has reached a final status."""
        return self.status in TERMINAL


def step_from_row(row: Mapping[str, Any]) -> StepRecord:
    """Build a :class:`StepRecord` from an ``execution_steps`` row."""
    return StepRecord(
        execution_id=row["execution_id"],
        step_id=row["step_id"],
        position=row["position"],
        action=row["action"],
        action_class=row["action_class"],
        status=StepStatus(row["status"]),
        idempotency_key=row["idempotency_key"],
        attempt=row["attempt"],
        worker_id=row["worker_id"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        duration_ms=row["duration_ms"],
        result=row["result"],
        error_class=row["error_class"],
        error_message=row["error_message"],
    )


def _timestamp(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def step_from_json(row: Mapping[str, Any]) -> StepRecord:
    """Build a :class:`StepRecord` from ``to_jsonb(execution_steps row)`` (see
    a ``steps_of_execution`` column): the steps travel with their execution in one row."""
    return StepRecord(
        execution_id=UUID(row["execution_id"]),
        step_id=row["step_id"],
        position=row["position"],
        action=row["action"],
        action_class=row["action_class"],
        status=StepStatus(row["status"]),
        idempotency_key=row["idempotency_key"],
        attempt=row["attempt"],
        worker_id=row["worker_id"],
        created_at=datetime.fromisoformat(row["created_at"]),
        started_at=_timestamp(row["started_at"]),
        ended_at=_timestamp(row["ended_at"]),
        duration_ms=row["duration_ms"],
        result=row["result"],
        error_class=row["error_class"],
        error_message=row["error_message"],
    )


def steps_from_column(row: Mapping[str, Any]) -> tuple[StepRecord, ...]:
    """The steps a read "with steps" selected with ``row`` (its ``steps_of_execution`` column)."""
    return tuple(step_from_json(step) for step in row["steps_of_execution"])


def execution_from_row(
    row: Mapping[str, Any], steps: tuple[StepRecord, ...] = ()
) -> ExecutionRecord:
    """Build an :class:`ExecutionRecord` from an ``executions`` row (``SELECT *``)."""
    last_from = row["last_transition_from"]
    return ExecutionRecord(
        id=row["id"],
        tenant_id=row["tenant_id"],
        actor_id=row["actor_id"],
        request_id=row["request_id"],
        idempotency_key=row["idempotency_key"],
        idempotency_retired_at=row["idempotency_retired_at"],
        plan_hash=row["plan_hash"],
        plan_snapshot=row["plan_snapshot"],
        plan_snapshot_hash=row["plan_snapshot_hash"],
        status=ExecutionStatus(row["status"]),
        execution_mode=row["execution_mode"],
        sla_class=row["sla_class"],
        action_class=row["action_class"],
        approval_level=row["approval_level"],
        approval_id=row["approval_id"],
        priority=row["priority"],
        timeout_policy_id=row["timeout_policy_id"],
        timeout_ms=row["timeout_ms"],
        timed_out=row["timed_out"],
        estimated_duration_ms=row["estimated_duration_ms"],
        deadline_at=row["deadline_at"],
        record_only=row["record_only"],
        attempts=row["attempts"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        updated_at=row["updated_at"],
        cancelled_by=row["cancelled_by"],
        cancelled_at=row["cancelled_at"],
        cancel_reason=row["cancel_reason"],
        result_summary=row["result_summary"],
        error_class=row["error_class"],
        error_message=row["error_message"],
        worker_id=row["worker_id"],
        lease_renewals=row["lease_renewals"],
        cancel_checks_performed=row["cancel_checks_performed"],
        last_transition_at=row["last_transition_at"],
        last_transition_by=row["last_transition_by"],
        last_transition_from=ExecutionStatus(last_from) if last_from is not None else None,
        lease_token=row["lease_token"],
        event_seq=row["event_seq"],
        steps=steps,
        cancel_initiator=row.get("cancel_initiator"),
        trace_context=row.get("trace_context"),
    )


@asynccontextmanager
async def transaction(db: PoolOrConnection) -> AsyncIterator[Any]:
    """Yield a connection inside a transaction, mapping driver errors to :class:`StorageError`.

    ``db`` may be a pool (a connection is taken for the duration) or a connection; on a
    connection already in a transaction this nests as a savepoint, so callers can group several
    repository calls into one atomic unit.
    """
    try:
        if isinstance(db, asyncpg.Pool):
            async with (
                db.acquire() as conn,
                _collecting_after_commit(conn),
                conn.transaction(),
            ):
                yield conn
        else:
            async with _collecting_after_commit(db), db.transaction():
                yield db
    except _DRIVER_ERRORS as exc:
        raise StorageError(f"database error: {type(exc).__name__}") from exc


# Callbacks to run once the outermost transaction opened by `transaction` on a connection
# commits: one list per nesting level (savepoint); a level that rolls back drops its own.
_after_commit: dict[int, list[list[Callable[[], None]]]] = {}


def after_commit(conn: Any, callback: Callable[[], None]) -> None:
    """Run ``callback`` (in-process bookkeeping: metrics) once ``conn``'s transaction commits.

    Dropped if that transaction (or the savepoint it was registered in) rolls back; run at once
    when no :func:`transaction` is open on ``conn``. A failing callback is logged, never raised:
    the write it describes has committed.
    """
    levels = _after_commit.get(id(conn))
    if levels:
        levels[-1].append(callback)
    else:
        _run_callbacks([callback])


@asynccontextmanager
async def _collecting_after_commit(conn: Any) -> AsyncIterator[None]:
    levels = _after_commit.setdefault(id(conn), [])
    levels.append([])
    committed = False
    try:
        yield
        committed = True
    finally:
        mine = levels.pop()
        if not levels:
            del _after_commit[id(conn)]
            if committed:
                _run_callbacks(mine)
        elif committed:
            levels[-1].extend(mine)


def _run_callbacks(callbacks: list[Callable[[], None]]) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:
            log.exception("after_commit_callback_failed")


@asynccontextmanager
async def atomic(db: PoolOrConnection) -> AsyncIterator[Any]:
    """Like :func:`transaction`, but on a connection already inside a transaction the
    statements simply join it, without a savepoint (two round trips fewer): for writers whose
    callers never catch their errors to go on in the same transaction, so the caller's
    transaction stands or falls with them either way."""
    if not isinstance(db, asyncpg.Pool) and db.is_in_transaction():
        try:
            yield db
        except _DRIVER_ERRORS as exc:
            raise StorageError(f"database error: {type(exc).__name__}") from exc
        return
    async with transaction(db) as conn:
        yield conn


@asynccontextmanager
async def connection(db: PoolOrConnection) -> AsyncIterator[Any]:
    """Yield a connection, opening no transaction; driver errors become :class:`StorageError`.

    For reads and single statements: a statement is atomic on its own, and under READ COMMITTED
    (the default) each statement of a transaction takes its own snapshot anyway, so ``BEGIN`` and
    ``COMMIT`` around reads would only cost two round trips. On a connection already in a
    transaction the statements simply join it.
    """
    try:
        if isinstance(db, asyncpg.Pool):
            async with db.acquire() as conn:
                yield conn
        else:
            yield db
    except _DRIVER_ERRORS as exc:
        raise StorageError(f"database error: {type(exc).__name__}") from exc


async def lock_execution(
    conn: Any, execution_id: UUID, *, lease_token: UUID | None = None
) -> Mapping[str, Any]:
    """Lock an execution row for the rest of the transaction; enforce lease fencing.

    Raises :class:`NotFoundError` if the row does not exist and :class:`StaleLeaseError` when
    ``lease_token`` is given and is not the token currently recorded on the execution (another
    worker took the job over, or the lease was cleared): nothing may be written then.
    """
    row: Mapping[str, Any] | None = await conn.fetchrow(_LOCK_EXECUTION, execution_id)
    if row is None:
        raise NotFoundError("execution not found", execution_id=str(execution_id))
    if lease_token is not None and row["lease_token"] != lease_token:
        raise StaleLeaseError(
            "lease token no longer owns this execution", execution_id=str(execution_id)
        )
    return row
