"""Lease arithmetic from the timeout policy (spec §5.1: max(step_timeout + buffer, 2 × p95))."""

from __future__ import annotations

import pytest

from opsconductor.common.errors import FailedPreconditionError, OpsConductorError
from opsconductor.lifecycle.queue import LeaseRenewalLimitError, lease_seconds, renew_after
from opsconductor.lifecycle.storage.policies import TimeoutPolicy

POLICY = TimeoutPolicy(
    id="medium_modify",
    sla_class="medium",
    action_class="modify",
    execution_timeout_ms=30_000,
    step_timeout_ms=10_000,
    max_attempts=5,
    max_lease_renewals=3,
    lease_buffer_ms=5_000,
)


def test_without_history_the_lease_is_step_timeout_plus_buffer() -> None:
    assert lease_seconds(POLICY) == 15.0
    assert lease_seconds(POLICY, 0) == 15.0


def test_a_short_p95_does_not_shorten_the_lease() -> None:
    assert lease_seconds(POLICY, 7_000) == 15.0


def test_a_long_p95_doubles_into_the_lease() -> None:
    assert lease_seconds(POLICY, 9_000) == 18.0


def test_renewal_comes_at_half_the_lease() -> None:
    assert renew_after(15.0) == 7.5
    with pytest.raises(ValueError, match="positive"):
        renew_after(0)


def test_the_renewal_limit_error_is_a_domain_precondition_error() -> None:
    error = LeaseRenewalLimitError(job_id="j", lease_renewals=3)
    assert isinstance(error, FailedPreconditionError)
    assert isinstance(error, OpsConductorError)
    assert error.reason == "LEASE_RENEWAL_LIMIT"
    assert error.details == {"job_id": "j", "lease_renewals": 3}
    assert str(error).startswith("The job lease was renewed as often as")
