"""The chaos soak, small: 60 plans under every kind of fault, in about a minute (issue 9).

The same run as ``make chaos`` (``tests/chaos``), sized down so that every change is checked
against it: all services real processes launched by the ``make run`` supervisor, 3 workers, a
Redis of its own that gets killed, workers SIGKILLed, SIGSTOPped past their lease and
SIGTERMed, the api SIGKILLed — and then nothing lost, stuck, run twice, leaked or disclosed.
"""

from __future__ import annotations

import pytest

from .driver import SoakConfig, run_soak

pytestmark = pytest.mark.slow

SMALL = SoakConfig(plans=60, seed=20261202, minutes=1.75)


@pytest.mark.timeout(170)
async def test_small_soak_loses_nothing_under_faults() -> None:
    """Every must-be-zero figure is zero, every fault kind was inflicted, and the faults did
    bite (services were restarted, the api's callers retried)."""
    verdict = await run_soak(SMALL)
    print("\n" + verdict.table())
    figures = verdict.figures
    assert verdict.failed() == [], verdict.table()
    assert set(figures["fault_kinds"]) == {
        "kill_worker",
        "pause_worker",
        "kill_api",
        "restart_redis",
        "term_worker",
    }, figures["fault_log"]
    assert figures["service_restarts"]["api"] >= 1
    assert figures["cross_tenant_attempts"] == figures["denied"] >= 4
    assert figures["side_effects"] > 0
    assert figures["elapsed_s"] < 120
