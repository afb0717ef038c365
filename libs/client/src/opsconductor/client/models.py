"""What the client returns: plain frozen dataclasses with string enums, never pb2 messages."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from opsconductor.contract.plan_codec import plan_from_proto
from opsconductor.execution.v1 import admin_service_pb2, execution_service_pb2, types_pb2


def enum_text(enum: Any, value: int, prefix: str) -> str:
    """``EXECUTION_STATUS_QUEUED`` -> ``"queued"``; 0 -> ``""``."""
    return "" if value == 0 else str(enum.Name(value)).removeprefix(prefix).lower()


def _time(message: Any, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    stamp: Timestamp = getattr(message, field)
    return stamp.ToDatetime(tzinfo=datetime.now().astimezone().tzinfo).astimezone()


def _struct(message: Any, field: str) -> dict[str, Any] | None:
    if not message.HasField(field):
        return None
    return json_format.MessageToDict(getattr(message, field))


@dataclass(frozen=True)
class ExecutionStep:
    step_id: str
    position: int
    action: str
    status: str
    attempt: int
    idempotency_key: str
    duration_ms: int
    result: dict[str, Any] | None
    error_class: str
    error_message: str
    started_at: datetime | None
    ended_at: datetime | None

    @classmethod
    def from_proto(cls, m: types_pb2.ExecutionStep) -> ExecutionStep:
        return cls(
            step_id=m.step_id,
            position=m.position,
            action=m.action,
            status=enum_text(types_pb2.StepStatus, m.status, "STEP_STATUS_"),
            attempt=m.attempt,
            idempotency_key=m.idempotency_key,
            duration_ms=m.duration_ms,
            result=_struct(m, "result"),
            error_class=m.error_class,
            error_message=m.error_message,
            started_at=_time(m, "started_at"),
            ended_at=_time(m, "ended_at"),
        )


@dataclass(frozen=True)
class Execution:
    """One execution as the service reports it. ``status``/``execution_mode`` are lower-case."""

    execution_id: str
    tenant_id: str
    actor_id: str
    status: str
    execution_mode: str
    sla_class: str
    approval_level: int
    approval_id: str | None
    plan_hash: str
    plan_snapshot_hash: str
    idempotency_key: str
    job_id: str | None
    priority: int
    timeout_policy_id: str
    timed_out: bool
    duration_ms: int
    estimated_duration_ms: int
    cancelled_by: str | None
    cancel_reason: str
    error_class: str
    error_message: str
    result_summary: dict[str, Any] | None
    worker_id: str
    lease_renewals: int
    cancel_checks_performed: int
    attempts: int
    record_only: bool
    deduplicated: bool
    last_transition_by: str
    last_transition_from: str
    created_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    cancelled_at: datetime | None
    last_transition_at: datetime | None
    steps: tuple[ExecutionStep, ...]
    #: The plan's JSON form, as submitted (secrets as references only).
    plan: dict[str, Any] | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in {"succeeded", "failed", "cancelled", "rejected"}

    @classmethod
    def from_proto(cls, m: types_pb2.Execution) -> Execution:
        return cls(
            execution_id=m.execution_id,
            tenant_id=m.tenant_id,
            actor_id=m.actor_id,
            status=enum_text(types_pb2.ExecutionStatus, m.status, "EXECUTION_STATUS_"),
            execution_mode=enum_text(types_pb2.ExecutionMode, m.execution_mode, "EXECUTION_MODE_"),
            sla_class=enum_text(types_pb2.SlaClass, m.sla_class, "SLA_CLASS_"),
            approval_level=m.approval_level,
            approval_id=m.approval_id or None,
            plan_hash=m.plan_hash,
            plan_snapshot_hash=m.plan_snapshot_hash,
            idempotency_key=m.idempotency_key,
            job_id=m.job_id or None,
            priority=m.priority,
            timeout_policy_id=m.timeout_policy_id,
            timed_out=m.timed_out,
            duration_ms=m.duration_ms,
            estimated_duration_ms=m.estimated_duration_ms,
            cancelled_by=m.cancelled_by or None,
            cancel_reason=m.cancel_reason,
            error_class=m.error_class,
            error_message=m.error_message,
            result_summary=_struct(m, "result_summary"),
            worker_id=m.worker_id,
            lease_renewals=m.lease_renewals,
            cancel_checks_performed=m.cancel_checks_performed,
            attempts=m.attempts,
            record_only=m.record_only,
            deduplicated=m.deduplicated,
            last_transition_by=m.last_transition_by,
            last_transition_from=enum_text(
                types_pb2.ExecutionStatus, m.last_transition_from, "EXECUTION_STATUS_"
            ),
            created_at=_time(m, "created_at"),
            started_at=_time(m, "started_at"),
            ended_at=_time(m, "ended_at"),
            cancelled_at=_time(m, "cancelled_at"),
            last_transition_at=_time(m, "last_transition_at"),
            steps=tuple(ExecutionStep.from_proto(s) for s in m.steps),
            plan=plan_from_proto(m.plan) if m.HasField("plan") else None,
        )


@dataclass(frozen=True)
class Preview:
    """What SubmitExecution would decide for a plan, computed without executing it."""

    execution_mode: str
    approval_level: int
    timeout_policy_id: str
    plan_hash: str
    idempotency_key: str
    estimated_duration_ms: int
    can_parallelize: bool
    execution_timeout_ms: int
    step_timeout_ms: int
    action_class: str

    @classmethod
    def from_proto(cls, m: execution_service_pb2.PreviewPlanResponse) -> Preview:
        return cls(
            execution_mode=enum_text(types_pb2.ExecutionMode, m.execution_mode, "EXECUTION_MODE_"),
            approval_level=m.approval_level,
            timeout_policy_id=m.timeout_policy_id,
            plan_hash=m.plan_hash,
            idempotency_key=m.idempotency_key,
            estimated_duration_ms=m.estimated_duration_ms,
            can_parallelize=m.can_parallelize,
            execution_timeout_ms=m.execution_timeout_ms,
            step_timeout_ms=m.step_timeout_ms,
            action_class=enum_text(types_pb2.ActionClass, m.action_class, "ACTION_CLASS_"),
        )


@dataclass(frozen=True)
class FeatureFlags:
    stage_e_enabled: bool
    all_tenants_enabled: bool
    enabled_tenants: tuple[str, ...]
    record_only_tenants: tuple[str, ...]
    max_approval_level: int
    dispatch_paused: bool

    @classmethod
    def from_proto(cls, m: admin_service_pb2.FeatureFlags) -> FeatureFlags:
        return cls(
            stage_e_enabled=m.stage_e_enabled,
            all_tenants_enabled=m.all_tenants_enabled,
            enabled_tenants=tuple(m.enabled_tenants),
            record_only_tenants=tuple(m.record_only_tenants),
            max_approval_level=m.max_approval_level,
            dispatch_paused=m.dispatch_paused,
        )


@dataclass(frozen=True)
class ExecutionEvent:
    execution_id: str
    seq: int
    type: str
    payload: dict[str, Any]
    created_at: datetime | None
    tenant_id: str
    actor_id: str

    @classmethod
    def from_proto(cls, m: types_pb2.ExecutionEvent) -> ExecutionEvent:
        return cls(
            execution_id=m.execution_id,
            seq=m.seq,
            type=m.type,
            payload=_struct(m, "payload") or {},
            created_at=_time(m, "created_at"),
            tenant_id=m.tenant_id,
            actor_id=m.actor_id,
        )


@dataclass(frozen=True)
class DlqEntry:
    """A dead-lettered execution: its last attempt failed. ``requeued_*`` set once requeued."""

    dlq_id: str
    execution_id: str
    tenant_id: str
    attempts: int
    error_class: str
    error_message: str
    created_at: datetime | None
    requeued_at: datetime | None
    requeued_by: str | None
    last_error: dict[str, Any] | None

    @classmethod
    def from_proto(cls, m: admin_service_pb2.DlqEntry) -> DlqEntry:
        return cls(
            dlq_id=m.dlq_id,
            execution_id=m.execution_id,
            tenant_id=m.tenant_id,
            attempts=m.attempts,
            error_class=m.error_class,
            error_message=m.error_message,
            created_at=_time(m, "created_at"),
            requeued_at=_time(m, "requeued_at"),
            requeued_by=m.requeued_by or None,
            last_error=_struct(m, "last_error"),
        )


@dataclass(frozen=True)
class DlqRequeue:
    """What RequeueDlqEntry did: the entry (now requeued) and the new execution and its job."""

    entry: DlqEntry
    execution_id: str
    job_id: str

    @classmethod
    def from_proto(cls, m: admin_service_pb2.RequeueDlqEntryResponse) -> DlqRequeue:
        return cls(entry=DlqEntry.from_proto(m.entry), execution_id=m.execution_id, job_id=m.job_id)


@dataclass(frozen=True)
class QueueStats:
    """Queue gauges: ready jobs per priority, leased, delayed, open DLQ entries, oldest wait."""

    ready_by_priority: dict[int, int]
    leased: int
    delayed: int
    dlq_size: int
    oldest_ready_age_seconds: float
    dispatch_paused: bool

    @property
    def ready(self) -> int:
        """Ready jobs of every priority."""
        return sum(self.ready_by_priority.values())

    @classmethod
    def from_proto(cls, m: admin_service_pb2.GetQueueStatsResponse) -> QueueStats:
        return cls(
            ready_by_priority={p.priority: p.ready for p in m.priorities},
            leased=m.leased,
            delayed=m.delayed,
            dlq_size=m.dlq_size,
            oldest_ready_age_seconds=m.oldest_ready_age_seconds,
            dispatch_paused=m.dispatch_paused,
        )


@dataclass(frozen=True)
class AuditChainVerdict:
    """VerifyAuditChain's answer: intact, or the first broken link of an execution's events.

    ``problem`` is ``""`` when intact, else ``"altered"``, ``"missing"`` or ``"unchained"``;
    ``broken_seq`` is 0 when intact.
    """

    intact: bool
    events_checked: int
    events_expected: int
    head_hash: str
    broken_seq: int
    problem: str
    detail: str

    @classmethod
    def from_proto(cls, m: admin_service_pb2.VerifyAuditChainResponse) -> AuditChainVerdict:
        return cls(
            intact=m.intact,
            events_checked=m.events_checked,
            events_expected=m.events_expected,
            head_hash=m.head_hash,
            broken_seq=m.broken_seq,
            problem=enum_text(
                admin_service_pb2.AuditChainProblem, m.problem, "AUDIT_CHAIN_PROBLEM_"
            ),
            detail=m.detail,
        )


@dataclass(frozen=True)
class FlagChange:
    """One write of one feature flag: who, when, from what to what.

    ``old_value`` is None when the flag had no row (its default applied), ``new_value`` None
    when the row was deleted (back to the default).
    """

    change_id: str
    flag: str
    old_value: Any
    new_value: Any
    changed_by: str
    changed_at: datetime | None

    @classmethod
    def from_proto(cls, m: admin_service_pb2.FlagChange) -> FlagChange:
        def value(field: str) -> Any:
            if not m.HasField(field):
                return None
            return json_format.MessageToDict(getattr(m, field))

        return cls(
            change_id=m.change_id,
            flag=m.flag,
            old_value=value("old_value"),
            new_value=value("new_value"),
            changed_by=m.changed_by,
            changed_at=_time(m, "changed_at"),
        )
