"""Prometheus metrics of steps, recorded by the worker where a step's outcome is known.

Execution outcomes are counted by the terminal transition in whichever service ends one
(:mod:`opsconductor.lifecycle.execution_metrics`).
"""

from __future__ import annotations

from prometheus_client import Histogram

from opsconductor.lifecycle.execution_metrics import DURATION_BUCKETS

STEP_DURATION = Histogram(
    "opsc_step_duration_seconds",
    "Wall time of finished steps, by action and SLA class (the dashboard's p95).",
    ["action", "sla_class", "status"],
    buckets=DURATION_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "opsc_queue_wait_seconds",
    "Time from enqueue until a worker starts the job (each time it is started), by priority.",
    ["priority"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
