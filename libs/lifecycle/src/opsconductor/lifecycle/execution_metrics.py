"""Prometheus metrics of execution outcomes, recorded by whichever service ends an execution.

An execution ends in the worker (it ran), the api (cancelled before a worker took it), the
approvals service (rejected, approval expired) or the reaper (overdue, dead-lettered): the
terminal transition (:func:`opsconductor.lifecycle.storage.executions.transition`) calls
:func:`record_finished` once its transaction has committed, in the process that made it. So
each execution is counted exactly once, by one process, in-process (no query, no round trip);
a dashboard sums over instances. The catalogue of every metric name is docs/observability.md.

Labels are bounded: statuses, modes, SLA and action classes are enums; ``action`` is a
registered action name (or ``mixed`` for a plan of several); ``error_class`` values are capped
per process (:class:`BoundedLabel`), a new value beyond the cap counting as ``other``. No ids.

The reaper is the exception: in Kubernetes it is a CronJob whose process is gone before any
scrape. Inside :func:`counted_in_store` (its passes) a terminal transition is counted in
Postgres instead, by the statement that makes it (``metric_counters``, name
``reaper_executions_ended``, one row per label set), and the api exports those rows as the
``opsc_reaper_*`` counters (:mod:`opsconductor.lifecycle.queue.gauges`): never in both places.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import Counter, Histogram

if TYPE_CHECKING:  # the storage layer imports this module, not the other way round
    from opsconductor.lifecycle.storage.execution_records import ExecutionRecord

__all__ = [
    "ACTION_CLASSES",
    "DURATION_BUCKETS",
    "EXECUTIONS",
    "EXECUTIONS_CANCELLED",
    "EXECUTIONS_FAILED",
    "EXECUTIONS_TIMED_OUT",
    "EXECUTION_DURATION",
    "MODES",
    "SLA_CLASSES",
    "STATUSES",
    "BoundedLabel",
    "counted_in_store",
    "counts_in_store",
    "plan_action",
    "record_finished",
]

#: Seconds; the fast SLA is 10 s, medium 30 s, long 10 min.
DURATION_BUCKETS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

EXECUTIONS: Final = Counter(
    "opsc_executions_total",
    "Executions ended, by mode, SLA class, action class and final status.",
    ["mode", "sla_class", "action_class", "status"],
)
EXECUTION_DURATION: Final = Histogram(
    "opsc_execution_duration_seconds",
    "Run time (start to end) of ended executions that started, by action, SLA class, mode and"
    " final status.",
    ["action", "sla_class", "mode", "status"],
    buckets=DURATION_BUCKETS,
)
EXECUTIONS_TIMED_OUT: Final = Counter(
    "opsc_executions_timed_out_total",
    "Executions failed because their timeout policy's budget ran out (also counted as failed).",
    ["mode", "sla_class"],
)
# A person's cancellation is not a failure and not the system's doing (spec §7.2).
EXECUTIONS_CANCELLED: Final = Counter(
    "opsc_executions_cancelled_total",
    "Executions ended cancelled, by who initiated it: user (a person) or system (automation).",
    ["initiator", "mode", "sla_class"],
)
EXECUTIONS_FAILED: Final = Counter(
    "opsc_executions_failed_total",
    "Executions ended failed (timeouts included), by error class. Never a cancellation.",
    ["error_class", "mode"],
)


_IN_STORE: ContextVar[bool] = ContextVar("opsc_outcomes_counted_in_store", default=False)


@contextlib.contextmanager
def counted_in_store() -> Iterator[None]:
    """Within: outcomes are counted in ``metric_counters`` by the statement that ends them, not
    in this process (for a process that may not live until the next scrape: the reaper)."""
    reset = _IN_STORE.set(True)
    try:
        yield
    finally:
        _IN_STORE.reset(reset)


def counts_in_store() -> bool:
    """Whether outcomes ended here are counted in the store (see :func:`counted_in_store`)."""
    return _IN_STORE.get()


MODES: Final = ("immediate", "background")
SLA_CLASSES: Final = ("fast", "medium", "long")
ACTION_CLASSES: Final = ("read", "modify", "deploy")
STATUSES: Final = ("succeeded", "failed", "cancelled", "rejected")


def _export_zeros() -> None:
    """Create every series of the enum-labelled counters at 0, at import.

    A series born at 1 shows no increase to ``rate()``/``increase()``, so the first timeout or
    cancellation of a process would be invisible to the timeout-rate alert without its zero.
    """
    for mode in MODES:
        for sla in SLA_CLASSES:
            EXECUTIONS_TIMED_OUT.labels(mode, sla)
            for initiator in ("user", "system"):
                EXECUTIONS_CANCELLED.labels(initiator, mode, sla)
            for action_class in ACTION_CLASSES:
                for status in STATUSES:
                    EXECUTIONS.labels(mode, sla, action_class, status)


_export_zeros()


class BoundedLabel:
    """Pass label values through until ``limit`` distinct ones were seen, then ``other``.

    For values that are bounded in practice but not by construction (error classes named by
    action plugins): one process never exports more than ``limit + 1`` series of them.
    """

    OVERFLOW: Final = "other"

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str | None) -> str:
        text = value or "unknown"
        if text in self._seen:
            return text
        with self._lock:
            if len(self._seen) < self._limit:
                self._seen.add(text)
                return text
        return self.OVERFLOW


_ERROR_CLASSES: Final = BoundedLabel(50)
_ACTIONS: Final = BoundedLabel(50)
_MIXED: Final = "mixed"


def plan_action(plan_snapshot: Mapping[str, Any] | None) -> str:
    """The ``action`` label of an execution: its plan's one action, ``mixed`` if several."""
    plan = plan_snapshot.get("plan") if isinstance(plan_snapshot, Mapping) else None
    steps = plan.get("steps") if isinstance(plan, Mapping) else None
    actions = {
        str(step.get("action"))
        for step in steps or ()
        if isinstance(step, Mapping) and step.get("action")
    }
    if len(actions) == 1:
        return _ACTIONS(actions.pop())
    return _MIXED if actions else "none"


def cancel_initiator(record: ExecutionRecord) -> str:
    """``user`` or ``system``; a cancellation recorded before initiators were kept is a user's."""
    return record.cancel_initiator or "user"


def record_finished(record: ExecutionRecord) -> None:
    """Count one ended execution (call once its terminal transition has committed)."""
    status = str(record.status)
    mode = record.execution_mode
    EXECUTIONS.labels(mode, record.sla_class, record.action_class, status).inc()
    duration_ms = record.duration_ms
    if duration_ms is not None:
        EXECUTION_DURATION.labels(
            plan_action(record.plan_snapshot), record.sla_class, mode, status
        ).observe(duration_ms / 1000)
    if status == "cancelled":
        EXECUTIONS_CANCELLED.labels(cancel_initiator(record), mode, record.sla_class).inc()
    elif status == "failed":
        EXECUTIONS_FAILED.labels(_ERROR_CLASSES(record.error_class), mode).inc()
        if record.timed_out:
            EXECUTIONS_TIMED_OUT.labels(mode, record.sla_class).inc()
