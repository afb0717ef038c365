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
