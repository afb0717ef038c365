"""Gauges of the queue, the dead-letter queue and pending approvals, refreshed off the hot path.

They describe shared state (Redis and Postgres), not one process, so any process may publish
them: the api refreshes them every few seconds (:class:`GaugePublisher`; it runs
always, the reaper runs once a minute as a CronJob in Kubernetes) and the reaper after each
pass. Replicas publish the same values; dashboards and alerts take ``max`` over instances.
One refresh costs a Redis stats call and three small reads in Postgres, never on a request.

With them go the **stored counters**: events counted in the stores by the work itself, because
the process doing it may not live until the next scrape (the reaper CronJob): every lease that
expired (Redis, by the script that reclaims it, whether a worker's dequeue or the reaper does)
and every stale mutex reaped (Postgres ``metric_counters``, by the statement that deletes it),
and the executions a reaper pass ends and its DLQ moves (``metric_counters`` again, by the
ending statements, one row per label set). They are exported as counters
(``opsc_lease_expirations_total``, ``opsc_mutex_reaped_total``, ``opsc_reaper_*_total``) with
the values the last refresh read: monotonic but for a Redis restarted empty, which Prometheus
takes as a counter reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from typing import Any, Final

import structlog
from prometheus_client import REGISTRY, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from opsconductor.common.errors import QueueUnavailableError, StorageError
from opsconductor.lifecycle.execution_metrics import ACTION_CLASSES, MODES, SLA_CLASSES, STATUSES
from opsconductor.lifecycle.queue import dlq
from opsconductor.lifecycle.queue.records import QueueStats
from opsconductor.lifecycle.queue.redis_queue import RedisQueue
from opsconductor.lifecycle.storage.execution_records import PoolOrConnection, transaction
from opsconductor.lifecycle.storage.queries import query

__all__ = [
    "APPROVALS_PENDING",
    "DLQ_SIZE",
    "PRIORITIES",
    "QUEUE_DELAYED",
    "QUEUE_LEASED",
    "QUEUE_LENGTH",
    "QUEUE_OLDEST_AGE",
    "STORED_COUNTERS",
    "GaugePublisher",
    "StoredCounters",
    "publish_gauges",
    "set_queue_gauges",
]

log = structlog.get_logger(__name__)

#: The priorities the queue distinguishes (urgent, normal, bulk): the ``priority`` label.
PRIORITIES: Final = (0, 50, 100)

QUEUE_LENGTH: Final = Gauge(
    "opsc_queue_length", "Jobs ready to run (waiting for a worker), by priority.", ["priority"]
)
QUEUE_LEASED: Final = Gauge("opsc_queue_leased_jobs", "Jobs leased to a worker (running).")
QUEUE_DELAYED: Final = Gauge("opsc_queue_delayed_jobs", "Jobs waiting for a retry.")
QUEUE_OLDEST_AGE: Final = Gauge(
    "opsc_queue_oldest_ready_age_seconds", "How long the oldest ready job has been waiting."
)
DLQ_SIZE: Final = Gauge("opsc_dlq_size", "Dead-letter entries not requeued yet.")
APPROVALS_PENDING: Final = Gauge(
    "opsc_approvals_pending", "Approval requests waiting for a decision, by level.", ["level"]
)


class StoredCounters(Collector):
    """Counters whose truth is in the stores, exported as the last refresh read them (none
    before the first: an unknown count is not a zero)."""

    HELP: Final = {
        "opsc_lease_expirations": (
            "Job leases that expired (a worker died or stalled), counted in Redis where they "
            "were reclaimed."
        ),
        "opsc_mutex_reaped": "Expired execution locks (stale mutexes) deleted by the reaper.",
        "opsc_reaper_dlq_moves": (
            "Executions the reaper moved to the dead-letter queue, counted in Postgres."
        ),
    }
    #: The executions a reaper pass ended, from ``metric_counters`` rows: same labels as the
    #: worker's ``opsc_executions*`` counters (dashboards and rules add the two).
    OUTCOME_HELP: Final = {
        "opsc_reaper_executions": (
            "Executions the reaper ended (overdue, dead-lettered, approval expired, never"
            " dispatched), by mode, SLA class, action class and status; counted in Postgres."
        ),
        "opsc_reaper_executions_timed_out": (
            "Executions the reaper ended as timed out (deadline passed, worker gone), by mode and"
            " SLA class; counted in Postgres."
        ),
        "opsc_reaper_executions_failed": (
            "Executions the reaper ended failed, by error class and mode; counted in Postgres."
        ),
    }
    _OUTCOME_LABELS: Final = {
        "opsc_reaper_executions": ("mode", "sla_class", "action_class", "status"),
        "opsc_reaper_executions_timed_out": ("mode", "sla_class"),
        "opsc_reaper_executions_failed": ("error_class", "mode"),
    }

    def __init__(self) -> None:
        self._values: dict[str, int] = {}
        self._outcomes: list[tuple[dict[str, Any], int]] | None = None

    def set(self, name: str, value: int) -> None:
        if name not in self.HELP:
            raise ValueError(f"not a stored counter: {name}")
        self._values[name] = value

    def set_outcomes(self, rows: list[tuple[dict[str, Any], int]]) -> None:
        """The ``reaper_executions_ended`` rows: (labels, count) each."""
        self._outcomes = rows

    def describe(self) -> Iterator[CounterMetricFamily]:
        for name, text in self.HELP.items():
            yield CounterMetricFamily(name, text)
        for name, text in self.OUTCOME_HELP.items():
            yield CounterMetricFamily(name, text, labels=self._OUTCOME_LABELS[name])

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, text in self.HELP.items():
            if name in self._values:
                yield CounterMetricFamily(name, text, value=self._values[name])
        if self._outcomes is None:
            return
        sums = self._outcome_sums(self._outcomes)
        for name, text in self.OUTCOME_HELP.items():
            family = CounterMetricFamily(name, text, labels=self._OUTCOME_LABELS[name])
            for labels, value in sorted(sums[name].items()):
                family.add_metric(list(labels), value)
            yield family

    @classmethod
    def _outcome_sums(
        cls, rows: list[tuple[dict[str, Any], int]]
    ) -> dict[str, dict[tuple[str, ...], int]]:
        # Zeros for every enum-labelled series: a series born at 1 shows no increase().
        sums: dict[str, dict[tuple[str, ...], int]] = {
            "opsc_reaper_executions": {
                (mode, sla, action_class, status): 0
                for mode in MODES
                for sla in SLA_CLASSES
                for action_class in ACTION_CLASSES
                for status in STATUSES
            },
            "opsc_reaper_executions_timed_out": {
                (mode, sla): 0 for mode in MODES for sla in SLA_CLASSES
            },
            "opsc_reaper_executions_failed": {},
        }
        for labels, value in rows:
            mode, sla, status = str(labels["mode"]), str(labels["sla_class"]), labels["status"]
            key = (mode, sla, str(labels["action_class"]), str(status))
            total = sums["opsc_reaper_executions"]
            total[key] = total.get(key, 0) + value
            if status != "failed":
                continue
            failed = sums["opsc_reaper_executions_failed"]
            failed_key = (str(labels["error_class"]), mode)
            failed[failed_key] = failed.get(failed_key, 0) + value
            if labels.get("timed_out"):
                timed_out = sums["opsc_reaper_executions_timed_out"]
                timed_out[(mode, sla)] = timed_out.get((mode, sla), 0) + value
        return sums


STORED_COUNTERS: Final = StoredCounters()
REGISTRY.register(STORED_COUNTERS)

_STORED = query("stored_counters")

_PENDING_APPROVALS = query("pending_approvals_by_level")


async def publish_gauges(pool: PoolOrConnection, queue: RedisQueue | None) -> None:
    """Refresh every gauge of this module; a store that cannot be reached keeps its values."""
    try:
        DLQ_SIZE.set(await dlq.dlq_size(pool))
        async with transaction(pool) as conn:
            rows = await conn.fetch(_PENDING_APPROVALS)
            stored = await conn.fetch(_STORED)
        _set_stored(stored)
        pending = {int(row["level"]): int(row["n"]) for row in rows}
        for level in (1, 2, 3):
            APPROVALS_PENDING.labels(str(level)).set(pending.get(level, 0))
    except StorageError:
        log.warning("gauges_database_unavailable")
    if queue is None:
        return
    try:
        stats = await queue.stats()
    except QueueUnavailableError:
        log.warning("gauges_queue_unavailable")
        return
    set_queue_gauges(stats)


def set_queue_gauges(stats: QueueStats) -> None:
    """The queue's gauges (and its lease-expiration counter) from one ``stats()`` snapshot."""
    for priority in PRIORITIES:
        QUEUE_LENGTH.labels(str(priority)).set(stats.ready_by_priority.get(priority, 0))
    QUEUE_LEASED.set(stats.leased)
    QUEUE_DELAYED.set(stats.delayed)
    QUEUE_OLDEST_AGE.set(stats.oldest_ready_age_s or 0.0)
    STORED_COUNTERS.set("opsc_lease_expirations", stats.lease_expirations_total)


def _set_stored(rows: list[Any]) -> None:
    scalars = {row["name"]: int(row["value"]) for row in rows if not row["labels"]}
    STORED_COUNTERS.set("opsc_mutex_reaped", scalars.get("mutex_reaped", 0))
    STORED_COUNTERS.set("opsc_reaper_dlq_moves", scalars.get("reaper_dlq_moves", 0))
    STORED_COUNTERS.set_outcomes(
        [
            (_labels(row["labels"]), int(row["value"]))
            for row in rows
            if row["name"] == "reaper_executions_ended"
        ]
    )


def _labels(value: Any) -> dict[str, Any]:
    # asyncpg returns jsonb as text unless a codec is set on the connection.
    return dict(json.loads(value) if isinstance(value, str) else value)


class GaugePublisher:
    """Calls :func:`publish_gauges` every ``interval_s`` until stopped."""

    def __init__(
        self, pool: PoolOrConnection, queue: RedisQueue | None, *, interval_s: float
    ) -> None:
        self._pool = pool
        self._queue = queue
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="gauge-publisher")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await publish_gauges(self._pool, self._queue)
            except Exception:
                log.exception("gauges_refresh_failed")
            await asyncio.sleep(self._interval_s)
