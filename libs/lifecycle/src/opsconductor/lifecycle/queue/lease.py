"""Lease arithmetic: how long a worker leases a job and when it renews (DESIGN.md §4, spec §5.1).

``lease = max(step_timeout + buffer, 2 × p95_step_duration)``: long enough for the slowest
allowed step plus slack, and for twice the observed p95 of steps that usually run long. A worker
renews at :func:`renew_after` (half the lease, so one missed renewal still leaves time), up to the
policy's ``max_lease_renewals``; past that, :class:`LeaseRenewalLimitError`.
"""

from __future__ import annotations

from opsconductor.common.errors import (
    LeaseRenewalLimitError,
)
from opsconductor.lifecycle.storage.policies import TimeoutPolicy

__all__ = ["LeaseRenewalLimitError", "lease_seconds", "renew_after"]


def lease_seconds(policy: TimeoutPolicy, p95_step_ms: float | None = None) -> float:
    """Lease duration in seconds for a job run under ``policy``.

    ``max(step_timeout_ms + lease_buffer_ms, 2 × p95_step_ms)``; without an observed p95 (no
    history yet) the first term alone.
    """
    floor_ms = policy.step_timeout_ms + policy.lease_buffer_ms
    observed_ms = 2 * p95_step_ms if p95_step_ms is not None and p95_step_ms > 0 else 0.0
    return max(floor_ms, observed_ms) / 1000


def renew_after(lease_s: float) -> float:
    """Seconds after a grant or renewal at which the holder should renew: half the lease."""
    if lease_s <= 0:
        raise ValueError("a lease lasts a positive number of seconds")
    return lease_s / 2
