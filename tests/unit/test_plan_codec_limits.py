"""Decoding a plan message refuses what parse_plan would refuse, before building anything, and
never crashes on what a Struct can carry (NaN, ±Infinity, nulls, unset values)."""

from __future__ import annotations

import math
import time

import grpc
import pytest

from opsconductor.common import errors
from opsconductor.common.plan import MAX_TARGETS_PER_PLAN, parse_plan
from opsconductor.execution.v1 import types_pb2
from opsconductor.rpc.plan_codec import plan_from_proto
from opsconductor.rpc.status import status_for_exception


def _plan(steps: int, targets: int) -> types_pb2.Plan:
    plan = types_pb2.Plan(name="p", sla_class=types_pb2.SLA_CLASS_FAST)
    for index in range(steps):
        step = plan.steps.add(
            id=f"s{index}", action="noop", action_class=types_pb2.ACTION_CLASS_READ
        )
        for target in range(targets):
            step.targets.add(ref=f"host-{target:04d}")
    return plan


def test_a_100_by_500_plan_is_refused_by_counting_in_under_20_ms_of_cpu() -> None:
    """The finding's 390 KB preview: refused with a field path, on counts alone."""
    plan = _plan(100, 500)
    assert plan.ByteSize() > 390_000
    started = time.process_time()
    rounds = 50
    for _ in range(rounds):
        with pytest.raises(errors.PlanValidationError) as info:
            plan_from_proto(plan)
    per_call_ms = (time.process_time() - started) / rounds * 1000
    assert info.value.violations[0].field == "steps"
    assert str(MAX_TARGETS_PER_PLAN) in info.value.violations[0].description
    assert per_call_ms < 20, per_call_ms


@pytest.mark.parametrize(
    ("steps", "targets", "field"),
    [(101, 1, "steps"), (1, 501, "steps[0].targets")],
)
def test_per_step_and_per_plan_counts_are_checked_on_the_message(
    steps: int, targets: int, field: str
) -> None:
    with pytest.raises(errors.PlanValidationError) as info:
        plan_from_proto(_plan(steps, targets))
    assert info.value.violations[0].field == field


def test_the_total_target_limit_holds_for_the_json_form_too() -> None:
    """parse_plan counts before validating the steps (a JSON plan skips the codec)."""
    data = {
        "name": "p",
        "sla_class": "fast",
        "steps": [
            {
                "id": f"s{index}",
                "action": "noop",
                "action_class": "read",
                "targets": [{"ref": f"h{t}"} for t in range(500)],
            }
            for index in range(21)
        ],
    }
    with pytest.raises(errors.PlanValidationError) as info:
        parse_plan(data)
    assert "10000" in info.value.violations[0].description


def test_struct_values_of_every_kind_convert_and_non_finite_numbers_survive_to_validation() -> None:
    """json_format raised ValueError on NaN (→ INTERNAL); the walk keeps it for parse_plan."""
    plan = _plan(1, 1)
    plan.steps[0].params.update(
        {"nan": math.nan, "inf": -math.inf, "list": [1, "a", None, True, {"k": []}]}
    )
    plan.steps[0].params.fields["unset"].Clear()
    params = plan_from_proto(plan)["steps"][0]["params"]
    assert math.isnan(params["nan"])
    assert params["inf"] == -math.inf
    assert params["list"] == [1.0, "a", None, True, {"k": []}]
    assert params["unset"] is None
    with pytest.raises(errors.PlanValidationError) as info:
        parse_plan(plan_from_proto(plan))
    fields = {violation.field for violation in info.value.violations}
    # The first bad value of the params is reported, with its path.
    assert fields
    assert fields <= {"steps[0].params.nan", "steps[0].params.inf"}


class _DataError(Exception):
    sqlstate = "22001"


class _Unreachable(Exception):
    sqlstate = "08006"


def test_a_value_no_column_can_hold_is_invalid_argument_not_unavailable() -> None:
    """The backstop behind the edge checks: SQLSTATE class 22 is the request's fault."""
    try:
        raise errors.StorageError(
            "database error: StringDataRightTruncationError"
        ) from _DataError()
    except errors.StorageError as exc:
        status = status_for_exception(exc, request_id="r1")
    assert status.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot be stored" in status.details
    outage = errors.StorageError("down")
    outage.__cause__ = _Unreachable()
    assert status_for_exception(outage, request_id="r1").code is grpc.StatusCode.UNAVAILABLE
