"""Stored counters (lease expirations, mutexes reaped): exported as counters with the values the
last refresh read, nothing before the first read, and only the names they know."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from opsconductor.lifecycle.queue.gauges import StoredCounters


def test_exported_as_counters_once_read_and_never_before() -> None:
    counters = StoredCounters()
    registry = CollectorRegistry()
    registry.register(counters)
    assert b"opsc_lease_expirations" not in generate_latest(registry)  # unknown is not zero
    counters.set("opsc_lease_expirations", 0)
    counters.set("opsc_mutex_reaped", 7)
    text = generate_latest(registry).decode()
    assert "# TYPE opsc_lease_expirations_total counter" in text
    assert "opsc_lease_expirations_total 0.0" in text
    assert "opsc_mutex_reaped_total 7.0" in text
    assert registry.get_sample_value("opsc_mutex_reaped_total") == 7


def test_an_unknown_name_is_refused() -> None:
    with pytest.raises(ValueError, match="not a stored counter"):
        StoredCounters().set("opsc_something_else", 1)


def test_the_reaper_outcomes_export_the_worker_counters_labels_with_zeros() -> None:
    """Rows of ``reaper_executions_ended`` become opsc_reaper_executions{,_failed,_timed_out}
    with the worker counters' labels; every enum series exists at 0 from the first read (a
    series born at 1 shows no increase), and nothing before it."""
    counters = StoredCounters()
    registry = CollectorRegistry()
    registry.register(counters)
    assert b"opsc_reaper_executions" not in generate_latest(registry)
    counters.set_outcomes([])
    timed_out = {"mode": "background", "sla_class": "fast"}
    assert registry.get_sample_value("opsc_reaper_executions_timed_out_total", timed_out) == 0
    base = {"mode": "background", "sla_class": "fast", "action_class": "read"}
    counters.set_outcomes(
        [
            ({**base, "status": "failed", "error_class": "EXECUTION_TIMEOUT", "timed_out": 1}, 2),
            ({**base, "status": "failed", "error_class": "LEASE_EXPIRED", "timed_out": 0}, 1),
        ]
    )
    get = registry.get_sample_value
    assert get("opsc_reaper_executions_total", {**base, "status": "failed"}) == 3
    assert get("opsc_reaper_executions_total", {**base, "status": "succeeded"}) == 0
    assert get("opsc_reaper_executions_timed_out_total", timed_out) == 2
    failed = "opsc_reaper_executions_failed_total"
    assert get(failed, {"error_class": "EXECUTION_TIMEOUT", "mode": "background"}) == 2
    assert get(failed, {"error_class": "LEASE_EXPIRED", "mode": "background"}) == 1
