"""Mode decision: estimate_duration + can_parallelize choose immediate (<= 10 s) or background."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from opsconductor.actions.base import ActionContext, ActionResult
from opsconductor.actions.planning import (
    IMMEDIATE_LIMIT_MS,
    ExecutionMode,
    can_parallelize,
    decide_mode,
    estimate_duration,
)
from opsconductor.common.errors import FieldViolation
from opsconductor.common.plan import ActionClass, Plan, parse_plan


class FixedHandler:
    """Unit-test handler whose estimate is ``params["ms"]`` per target (real ones: test_actions)."""

    name = "fixed"
    min_action_class = ActionClass.READ

    def estimate_ms(self, params: Mapping[str, Any], target_count: int) -> int:
        return int(params.get("ms", 0)) * target_count

    def validate(self, params: Mapping[str, Any]) -> list[FieldViolation]:
        return []

    async def run(self, ctx: ActionContext) -> ActionResult:  # pragma: no cover - never run
        raise AssertionError


class Lookup:
    def get(self, name: str) -> FixedHandler:
        return FixedHandler()


def plan(*steps: tuple[str, list[str], int]) -> Plan:
    return parse_plan(
        {
            "name": "p",
            "sla_class": "fast",
            "steps": [
                {
                    "id": f"s{i}",
                    "action": "fixed",
                    "action_class": cls,
                    "targets": [{"ref": r} for r in refs],
                    "params": {"ms": ms},
                }
                for i, (cls, refs, ms) in enumerate(steps)
            ],
        }
    )


def test_short_plan_runs_immediately_long_plan_in_background() -> None:
    short = estimate_duration(plan(("modify", ["a"], 2000), ("modify", ["a"], 3000)), Lookup())
    assert (short.serial_ms, short.wall_ms, short.parallel) == (5000, 5000, False)
    assert decide_mode(short, None) is ExecutionMode.IMMEDIATE
    long = estimate_duration(plan(("deploy", [f"h{i}" for i in range(50)], 1000)), Lookup())
    assert long.wall_ms == 50_000
    assert decide_mode(long, None) is ExecutionMode.BACKGROUND


def test_exactly_at_the_limit_is_immediate_and_background_can_be_requested() -> None:
    at_limit = estimate_duration(plan(("read", ["a"], IMMEDIATE_LIMIT_MS)), Lookup())
    assert decide_mode(at_limit, None) is ExecutionMode.IMMEDIATE
    assert decide_mode(at_limit, ExecutionMode.IMMEDIATE) is ExecutionMode.IMMEDIATE
    assert decide_mode(at_limit, ExecutionMode.BACKGROUND) is ExecutionMode.BACKGROUND
    over = estimate_duration(plan(("read", ["a"], IMMEDIATE_LIMIT_MS + 1)), Lookup())
    assert decide_mode(over, ExecutionMode.IMMEDIATE) is ExecutionMode.BACKGROUND


def test_independent_read_steps_parallelize_and_shorten_the_wall_time() -> None:
    p = plan(*[("read", [f"h{i}"], 3000) for i in range(4)])
    assert can_parallelize(p)
    estimate = estimate_duration(p, Lookup())
    assert (estimate.serial_ms, estimate.wall_ms) == (12_000, 3000)
    assert decide_mode(estimate, None) is ExecutionMode.IMMEDIATE


def test_more_parallel_steps_than_lanes_queue_behind_each_other() -> None:
    p = plan(*[("read", [f"h{i}"], 1000) for i in range(10)])
    assert estimate_duration(p, Lookup()).wall_ms == 2000


@pytest.mark.parametrize(
    "steps",
    [
        [("read", ["a"], 1)],
        [("read", ["a"], 1), ("read", ["a", "b"], 1)],
        [("read", ["a"], 1), ("modify", ["b"], 1)],
    ],
)
def test_single_steps_shared_targets_or_writes_do_not_parallelize(
    steps: list[tuple[str, list[str], int]],
) -> None:
    assert not can_parallelize(plan(*steps))


def test_observed_p95_raises_a_too_optimistic_estimate() -> None:
    p = plan(("read", ["a"], 100))
    assert estimate_duration(p, Lookup(), {"fixed": 12_000}).wall_ms == 12_000
    assert estimate_duration(p, Lookup(), {"fixed": 50}).wall_ms == 100
