"""Execution records (storage) to ``Execution`` messages, shared by the api and the worker."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from opsconductor.execution.v1 import types_pb2
from opsconductor.lifecycle.storage.execution_records import ExecutionRecord, StepRecord
from opsconductor.rpc.plan_codec import plan_to_proto


def _enum(enum: Any, prefix: str, value: str | None) -> int:
    return 0 if not value else int(enum.Value(prefix + value.upper()))


def _stamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _struct(value: Any) -> struct_pb2.Struct | None:
    if not isinstance(value, Mapping):
        return None
    message = struct_pb2.Struct()
    json_format.ParseDict(dict(value), message)
    return message


def step_to_proto(step: StepRecord) -> types_pb2.ExecutionStep:
    message = types_pb2.ExecutionStep(
        step_id=step.step_id,
        position=step.position,
        action=step.action,
        attempt=step.attempt,
        duration_ms=step.duration_ms or 0,
        error_class=step.error_class or "",
        error_message=step.error_message or "",
        idempotency_key=step.idempotency_key,
        started_at=_stamp(step.started_at),
        ended_at=_stamp(step.ended_at),
        result=_struct(step.result),
    )
    message.status = _enum(types_pb2.StepStatus, "STEP_STATUS_", step.status)  # type: ignore[assignment]
    return message


def execution_to_proto(
    record: ExecutionRecord,
    *,
    job_id: str | None = None,
    deduplicated: bool = False,
    include_plan: bool = True,
) -> types_pb2.Execution:
    """The ``Execution`` message for ``record`` (plan from its snapshot, steps if loaded)."""
    message = types_pb2.Execution(
        execution_id=str(record.id),
        tenant_id=record.tenant_id,
        actor_id=record.actor_id,
        approval_level=record.approval_level,
        approval_id=str(record.approval_id) if record.approval_id else "",
        plan_hash=record.plan_hash,
        plan_snapshot_hash=record.plan_snapshot_hash,
        idempotency_key=record.idempotency_key,
        job_id=job_id or "",
        priority=record.priority,
        timeout_policy_id=record.timeout_policy_id or "",
        timed_out=record.timed_out,
        created_at=_stamp(record.created_at),
        started_at=_stamp(record.started_at),
        ended_at=_stamp(record.ended_at),
        duration_ms=record.duration_ms or 0,
        cancelled_by=record.cancelled_by or "",
        cancelled_at=_stamp(record.cancelled_at),
        cancel_reason=record.cancel_reason or "",
        result_summary=_struct(record.result_summary),
        error_class=record.error_class or "",
        error_message=record.error_message or "",
        worker_id=record.worker_id or "",
        lease_renewals=record.lease_renewals,
        cancel_checks_performed=record.cancel_checks_performed,
        attempts=record.attempts,
        last_transition_at=_stamp(record.last_transition_at),
        last_transition_by=record.last_transition_by or "",
        estimated_duration_ms=record.estimated_duration_ms or 0,
        record_only=record.record_only,
        deduplicated=deduplicated,
        steps=[step_to_proto(s) for s in record.steps],
    )
    message.status = _enum(types_pb2.ExecutionStatus, "EXECUTION_STATUS_", record.status)  # type: ignore[assignment]
    message.execution_mode = _enum(  # type: ignore[assignment]
        types_pb2.ExecutionMode, "EXECUTION_MODE_", record.execution_mode
    )
    message.sla_class = _enum(types_pb2.SlaClass, "SLA_CLASS_", record.sla_class)  # type: ignore[assignment]
    message.last_transition_from = _enum(  # type: ignore[assignment]
        types_pb2.ExecutionStatus, "EXECUTION_STATUS_", record.last_transition_from
    )
    plan = record.plan_snapshot.get("plan") if isinstance(record.plan_snapshot, Mapping) else None
    if include_plan and isinstance(plan, Mapping):
        message.plan.CopyFrom(plan_to_proto(plan))
    return message
