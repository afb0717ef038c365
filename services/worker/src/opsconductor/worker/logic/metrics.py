"""Prometheus metrics of executions, recorded by the worker where the outcome is known."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

EXECUTIONS = Counter(
    "opsc_executions_total",
    "Executions finished, by outcome.",
    ["mode", "sla_class", "action_class", "status"],
)
EXECUTION_DURATION = Histogram(
    "opsc_execution_duration_seconds",
    "Wall time of finished executions.",
    ["mode", "sla_class", "action_class", "status"],
    buckets=_BUCKETS,
)
STEP_DURATION = Histogram(
    "opsc_step_duration_seconds",
    "Wall time of finished steps, by action and SLA class (the dashboard's p95).",
    ["action", "sla_class", "status"],
    buckets=_BUCKETS,
)
TIMEOUTS = Counter(
    "opsc_execution_timeouts_total",
    "Executions failed because their timeout policy expired.",
    ["sla_class", "timeout_policy_id"],
)
# User cancellations are kept apart from system failures (spec §7.2).
CANCELLATIONS = Counter(
    "opsc_execution_cancellations_total",
    "Executions ended by a user's cancellation.",
    ["mode", "sla_class"],
)
FAILURES = Counter(
    "opsc_execution_failures_total",
    "Executions failed by the system or an action, by error class.",
    ["mode", "error_class"],
)
