"""Quota limits: service defaults, tenant-policy overrides (0 = none), the running limits the
workers' queue takes, and the retry hint of a refusal. Admission itself races against a real
Postgres in tests/integration/test_quotas.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from opsconductor.common.settings import ServiceSettings
from opsconductor.common.tenant_policy import TenantPolicies, TenantPolicyError
from opsconductor.policy.quotas import (
    MAX_RETRY_AFTER_S,
    MIN_RETRY_AFTER_S,
    QuotaLimits,
    TenantQuotas,
    retry_after,
)

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
DEFAULTS = QuotaLimits(max_queued=500, max_running=10, max_immediate=20)


def policies(doc: object) -> TenantPolicies:
    return TenantPolicies.from_document(doc)


def test_settings_give_the_documented_defaults() -> None:
    settings = ServiceSettings(service_name="t", database_url="postgresql://x@h/db")
    assert QuotaLimits.from_settings(settings) == DEFAULTS
    assert settings.quota_retry_after_s == 5.0
    tuned = ServiceSettings(
        service_name="t",
        database_url="postgresql://x@h/db",
        quota_max_queued=3,
        quota_max_running=0,
        quota_max_immediate=4,
    )
    assert QuotaLimits.from_settings(tuned) == QuotaLimits(3, 0, 4)


def test_a_tenant_without_an_entry_gets_the_defaults() -> None:
    quotas = TenantQuotas(DEFAULTS, policies(None))
    assert quotas.for_tenant("acme") == DEFAULTS
    assert quotas.running_limits() == (10, {})


def test_policy_defaults_then_tenant_entries_override_key_by_key() -> None:
    quotas = TenantQuotas(
        DEFAULTS,
        policies(
            {
                "defaults": {"quotas": {"max_running": 4}},
                "tenants": {
                    "big": {"quotas": {"max_queued": 5000, "max_running": 40}},
                    "batch": {"quotas": {"max_immediate": 0}},
                    "plain": {"shell": {"enabled": False}},
                },
            }
        ),
    )
    assert quotas.for_tenant("other") == QuotaLimits(500, 4, 20)
    assert quotas.for_tenant("big") == QuotaLimits(5000, 40, 20)
    assert quotas.for_tenant("batch") == QuotaLimits(500, 4, 0)
    assert quotas.for_tenant("plain") == QuotaLimits(500, 4, 20)
    # Only tenants whose running limit differs from the default travel to the dequeue script.
    assert quotas.running_limits() == (4, {"big": 40})


@pytest.mark.parametrize(
    "quota", [{"max_queued": -1}, {"max_running": "many"}, {"max_immediate": 10**9}, {"x": 1}]
)
def test_invalid_quotas_are_a_load_error(quota: dict[str, object]) -> None:
    with pytest.raises(TenantPolicyError, match="quotas"):
        policies({"tenants": {"acme": {"quotas": quota}}})


def test_the_retry_hint_is_the_time_until_the_first_run_in_flight_should_end() -> None:
    assert retry_after(NOW + timedelta(seconds=3.04), NOW, default_s=5) == 3.0
    assert retry_after(NOW - timedelta(seconds=30), NOW, default_s=5) == MIN_RETRY_AFTER_S
    assert retry_after(NOW + timedelta(hours=1), NOW, default_s=5) == MAX_RETRY_AFTER_S
    assert retry_after(None, NOW, default_s=5) == 5
