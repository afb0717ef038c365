"""The immediate/background decision: ``estimate_duration``, ``can_parallelize``, ``decide_mode``.

A plan runs immediately (synchronously, through the worker, never touching Redis) when its
estimated wall time is at most ``IMMEDIATE_LIMIT_MS``; otherwise in the background. A caller may
ask for background; it may not force a long plan to run immediately.

Steps run in order, because order is semantic, with one exception: when every step is read-only
and no two steps share a target, nothing one step does can affect another, so the worker runs
them concurrently (``can_parallelize``) and the wall time is the longest step, not the sum.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from opsconductor.actions.base import ActionHandler
from opsconductor.common.plan import ActionClass, Plan, Step

#: Plans estimated at or under this run immediately (spec §2.1: "operations < 10 s").
IMMEDIATE_LIMIT_MS = 10_000
#: How many steps of a parallelizable plan the worker runs at once.
MAX_PARALLEL_STEPS = 8


class ExecutionMode(StrEnum):
    """The values of the ``execution_mode`` Postgres enum."""

    IMMEDIATE = "immediate"
    BACKGROUND = "background"


class HandlerLookup(Protocol):
    def get(self, name: str) -> ActionHandler: ...


@dataclass(frozen=True)
class DurationEstimate:
    """Serial sum of the steps, whether they may overlap, and the resulting wall time."""

    serial_ms: int
    wall_ms: int
    parallel: bool


def step_estimate_ms(
    step: Step, handlers: HandlerLookup, observed_p95_ms: Mapping[str, int] | None = None
) -> int:
    """The handler's own estimate, raised to the observed p95 of that action when known."""
    estimate = handlers.get(step.action).estimate_ms(step.params, len(step.targets))
    observed = (observed_p95_ms or {}).get(step.action, 0)
    return max(int(estimate), int(observed), 0)


def can_parallelize(plan: Plan) -> bool:
    """True when every step is read-only and no two steps share a target."""
    if len(plan.steps) < 2:
        return False
    seen: set[str] = set()
    for step in plan.steps:
        if step.action_class is not ActionClass.READ:
            return False
        refs = {t.ref for t in step.targets}
        if refs & seen:
            return False
        seen |= refs
    return True


def estimate_duration(
    plan: Plan, handlers: HandlerLookup, observed_p95_ms: Mapping[str, int] | None = None
) -> DurationEstimate:
    """Estimated run time of ``plan``: serial sum, and wall time given ``can_parallelize``."""
    per_step = [step_estimate_ms(s, handlers, observed_p95_ms) for s in plan.steps]
    serial = sum(per_step)
    parallel = can_parallelize(plan)
    if not parallel:
        return DurationEstimate(serial_ms=serial, wall_ms=serial, parallel=False)
    # Steps start in plan order as slots free up: simulate MAX_PARALLEL_STEPS lanes.
    lanes = [0] * min(MAX_PARALLEL_STEPS, len(per_step))
    for ms in per_step:
        lane = lanes.index(min(lanes))
        lanes[lane] += ms
    return DurationEstimate(serial_ms=serial, wall_ms=max(lanes), parallel=True)


def decide_mode(estimate: DurationEstimate, requested: ExecutionMode | None) -> ExecutionMode:
    """Immediate when short enough and not asked for background; background otherwise."""
    if requested is ExecutionMode.BACKGROUND or estimate.wall_ms > IMMEDIATE_LIMIT_MS:
        return ExecutionMode.BACKGROUND
    return ExecutionMode.IMMEDIATE
