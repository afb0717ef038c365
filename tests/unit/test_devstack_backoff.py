"""The restart rule of the ``make run`` supervisor and the worker address it hands out."""

from __future__ import annotations

from opsconductor.devstack.services import RestartBackoff
from opsconductor.devstack.supervisor import worker_target


def test_restart_delay_doubles_with_quick_deaths_up_to_the_cap() -> None:
    """0.5 s after a first death, doubling while the service keeps dying quickly, never past
    the cap (a crash loop cannot spin the CPU)."""
    backoff = RestartBackoff(first_s=0.5, max_s=8.0)
    assert [backoff.delay(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_worker_target_lists_every_worker_for_round_robin() -> None:
    """One worker: plain host:port. Several: a gRPC ipv4 address list, so the api and the
    approvals service spread runs over them and fail over from a dead one."""
    assert worker_target("127.0.0.1", [5001]) == "127.0.0.1:5001"
    assert worker_target("127.0.0.1", [5001, 5002]) == "ipv4:127.0.0.1:5001,127.0.0.1:5002"
    assert worker_target("localhost", [5001, 5002]) == "localhost:5001"
