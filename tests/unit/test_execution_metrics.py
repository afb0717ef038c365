"""Execution outcome metrics: bounded labels, the action label, and one count per outcome."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

from prometheus_client import REGISTRY

from opsconductor.common.fsm import ExecutionStatus
from opsconductor.lifecycle.execution_metrics import BoundedLabel, plan_action, record_finished
from opsconductor.lifecycle.storage.execution_records import ExecutionRecord

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _record(**changes: Any) -> ExecutionRecord:
    base = ExecutionRecord(
        id=uuid4(), tenant_id="t", actor_id="a", request_id=None, idempotency_key="k",
        idempotency_retired_at=None, plan_hash="h",
        plan_snapshot={"plan": {"steps": [{"action": "noop"}, {"action": "noop"}]}},
        plan_snapshot_hash="s", status=ExecutionStatus.SUCCEEDED, execution_mode="immediate",
        sla_class="medium", action_class="modify", approval_level=0, approval_id=None,
        priority=50, timeout_policy_id="medium_modify", timeout_ms=30_000, timed_out=False,
        estimated_duration_ms=None, deadline_at=None, record_only=False, attempts=1,
        created_at=T0, started_at=T0, ended_at=T0 + timedelta(seconds=2), updated_at=T0,
        cancelled_by=None, cancelled_at=None, cancel_reason=None, result_summary=None,
        error_class=None, error_message=None, worker_id=None, lease_renewals=0,
        cancel_checks_performed=0, last_transition_at=None, last_transition_by=None,
        last_transition_from=None, lease_token=None, event_seq=0,
    )  # fmt: skip
    return replace(base, **changes)


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_bounded_label_passes_values_until_its_limit_then_says_other() -> None:
    label = BoundedLabel(2)
    assert [label("A"), label("B"), label("A"), label("C"), label(None)] == [
        "A",
        "B",
        "A",
        "other",
        "other",
    ]
    assert BoundedLabel(5)(None) == "unknown"


def test_the_action_label_is_the_plans_one_action_or_mixed() -> None:
    assert plan_action({"plan": {"steps": [{"action": "http"}, {"action": "http"}]}}) == "http"
    assert plan_action({"plan": {"steps": [{"action": "http"}, {"action": "shell"}]}}) == "mixed"
    assert plan_action({"plan": {"steps": []}}) == "none"
    assert plan_action(None) == "none"
    assert plan_action({"plan": "not a mapping"}) == "none"


def test_a_user_cancellation_is_counted_as_cancelled_never_as_failed() -> None:
    labels = {"mode": "immediate", "sla_class": "medium"}
    user = _value("opsc_executions_cancelled_total", initiator="user", **labels)
    system = _value("opsc_executions_cancelled_total", initiator="system", **labels)
    failed = sum(
        m.value
        for family in REGISTRY.collect()
        if family.name == "opsc_executions_failed"
        for m in family.samples
        if m.name.endswith("_total")
    )
    record_finished(_record(status=ExecutionStatus.CANCELLED, cancel_initiator=None))
    record_finished(_record(status=ExecutionStatus.CANCELLED, cancel_initiator="system"))
    assert _value("opsc_executions_cancelled_total", initiator="user", **labels) == user + 1
    assert _value("opsc_executions_cancelled_total", initiator="system", **labels) == system + 1
    assert failed == sum(
        m.value
        for family in REGISTRY.collect()
        if family.name == "opsc_executions_failed"
        for m in family.samples
        if m.name.endswith("_total")
    )


def test_a_timeout_is_a_failure_and_a_timeout_and_its_duration_is_observed() -> None:
    before = (
        _value("opsc_executions_failed_total", error_class="EXECUTION_TIMEOUT", mode="background"),
        _value("opsc_executions_timed_out_total", mode="background", sla_class="medium"),
        _value(
            "opsc_execution_duration_seconds_count",
            action="noop",
            sla_class="medium",
            mode="background",
            status="failed",
        ),
    )
    record_finished(
        _record(
            status=ExecutionStatus.FAILED,
            execution_mode="background",
            timed_out=True,
            error_class="EXECUTION_TIMEOUT",
        )
    )
    after = (
        _value("opsc_executions_failed_total", error_class="EXECUTION_TIMEOUT", mode="background"),
        _value("opsc_executions_timed_out_total", mode="background", sla_class="medium"),
        _value(
            "opsc_execution_duration_seconds_count",
            action="noop",
            sla_class="medium",
            mode="background",
            status="failed",
        ),
    )
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]


def test_an_execution_that_never_started_has_no_duration() -> None:
    labels = {"action": "noop", "sla_class": "medium", "mode": "immediate", "status": "rejected"}
    before = _value("opsc_execution_duration_seconds_count", **labels)
    record_finished(_record(status=ExecutionStatus.REJECTED, started_at=None))
    assert _value("opsc_execution_duration_seconds_count", **labels) == before
    assert (
        _value(
            "opsc_executions_total",
            mode="immediate",
            sla_class="medium",
            action_class="modify",
            status="rejected",
        )
        >= 1
    )
