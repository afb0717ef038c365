"""The ``noop`` and ``sleep`` built-ins: durations, cancellation, time limits, record-only."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import pytest

from opsconductor.actions.base import ActionContext, ActionTimeoutError
from opsconductor.actions.noop import NoopAction
from opsconductor.actions.sleep import SleepAction
from opsconductor.common.errors import PlanValidationError


def _ctx(
    params: Mapping[str, Any], *, timeout_s: float = 30.0, record_only: bool = False
) -> ActionContext:
    return ActionContext(
        execution_id="exec-1",
        step_id="s1",
        idempotency_key="exec-1:s1",
        tenant_id="tenant-a",
        targets=("host-1",),
        params=params,
        timeout_s=timeout_s,
        record_only=record_only,
        cancel_event=asyncio.Event(),
    )


async def test_noop_succeeds_and_estimates_a_few_ms() -> None:
    noop = NoopAction()
    assert (await noop.run(_ctx({"anything": [1, 2]}))).output == {"ok": True}
    assert noop.validate({"anything": 1}) == []
    assert noop.estimate_ms({}, 100) == 5


async def test_noop_record_only_reports_what_it_would_do() -> None:
    result = await NoopAction().run(_ctx({}, record_only=True))
    assert result.output == {
        "record_only": True,
        "would_run": {"action": "noop", "targets": ["host-1"]},
    }


async def test_sleep_waits_the_requested_time() -> None:
    started = time.monotonic()
    result = await SleepAction().run(_ctx({"seconds": 0.05}))
    assert time.monotonic() - started >= 0.05
    assert result.output["slept_ms"] >= 45
    assert not result.cancelled


async def test_sleep_returns_early_when_cancelled() -> None:
    ctx = _ctx({"seconds": 30})
    task = asyncio.create_task(SleepAction().run(ctx))
    started = time.monotonic()
    ctx.cancel_event.set()
    result = await task
    assert result.cancelled
    assert time.monotonic() - started < 5
    assert result.output["slept_ms"] < 5000


async def test_sleep_longer_than_the_step_budget_times_out() -> None:
    with pytest.raises(ActionTimeoutError) as info:
        await SleepAction().run(_ctx({"seconds": 60}, timeout_s=0.05))
    assert isinstance(info.value, TimeoutError)
    assert info.value.details == {"timeout_s": 0.05, "budget_exhausted": True}
    assert info.value.output is not None
    assert info.value.output.output["slept_ms"] >= 45


async def test_sleep_record_only_does_not_wait() -> None:
    started = time.monotonic()
    result = await SleepAction().run(_ctx({"seconds": 3600}, record_only=True))
    assert time.monotonic() - started < 1
    assert result.output == {"record_only": True, "would_run": {"action": "sleep", "seconds": 3600}}


def test_sleep_estimate_is_its_duration() -> None:
    assert SleepAction().estimate_ms({"seconds": 2.5}, 3) == 2500
    assert SleepAction().estimate_ms({"seconds": "bad"}, 1) == 0


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "params.seconds"),
        ({"seconds": -1}, "params.seconds"),
        ({"seconds": 3601}, "params.seconds"),
        ({"seconds": True}, "params.seconds"),
        ({"seconds": "5"}, "params.seconds"),
        ({"seconds": 1, "sec": 2}, "params.sec"),
    ],
)
def test_sleep_validation(params: dict[str, Any], field: str) -> None:
    assert [v.field for v in SleepAction().validate(params)] == [field]


def test_sleep_accepts_the_bounds() -> None:
    assert SleepAction().validate({"seconds": 0}) == []
    assert SleepAction().validate({"seconds": 3600}) == []


async def test_sleep_refuses_invalid_params_at_run() -> None:
    with pytest.raises(PlanValidationError):
        await SleepAction().run(_ctx({"seconds": -1}))
