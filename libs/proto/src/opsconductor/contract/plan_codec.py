"""Plans between their JSON form (what ``parse_plan`` validates) and the ``Plan`` message.

Shared by the api (decoding submissions) and the client (encoding them), so both sides agree on
one mapping; it lives in the contract package so the client needs nothing of the servers. Enum
values travel as their lower-case names ("fast", "modify"); params are a
``google.protobuf.Struct``.

Decoding is where a hostile plan is cheapest to refuse: :func:`plan_from_proto` first counts
steps and targets on the message itself (a few microseconds even for 100 × 500 targets) and
refuses what ``parse_plan`` would refuse anyway, before a single dict or model is built. Params
are converted by a plain walk rather than ``json_format``, which raises on NaN and Infinity
before the plan's own finite-number rule could name the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2

from opsconductor.contract.errors import PlanValidationError
from opsconductor.contract.plan_limits import MAX_STEPS, MAX_TARGETS_PER_PLAN, MAX_TARGETS_PER_STEP
from opsconductor.execution.v1 import types_pb2

_SLA_PREFIX = "SLA_CLASS_"
_ACTION_CLASS_PREFIX = "ACTION_CLASS_"


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    """``SLA_CLASS_FAST`` -> ``"fast"``; unspecified -> ``""`` (reported as missing later)."""
    if value == 0:
        return ""
    try:
        return str(enum.Name(value)).removeprefix(prefix).lower()
    except ValueError:
        return f"<unknown enum value {value}>"


def _enum_value(enum: Any, name: object, prefix: str, field: str) -> int:
    if name in (None, ""):
        return 0
    if not isinstance(name, str):
        raise TypeError(f"{field} must be a string")
    try:
        return int(enum.Value(prefix + name.upper()))
    except ValueError:
        raise ValueError(f"{field}: unknown value {name!r}") from None


def check_plan_counts(message: types_pb2.Plan) -> None:
    """Refuse a plan with too many steps or targets, looking only at repeated-field lengths."""
    if len(message.steps) > MAX_STEPS:
        raise PlanValidationError.for_field("steps", f"must have at most {MAX_STEPS} item(s)")
    total = 0
    for index, step in enumerate(message.steps):
        count = len(step.targets)
        if count > MAX_TARGETS_PER_STEP:
            raise PlanValidationError.for_field(
                f"steps[{index}].targets", f"must have at most {MAX_TARGETS_PER_STEP} item(s)"
            )
        total += count
    if total > MAX_TARGETS_PER_PLAN:
        raise PlanValidationError.for_field(
            "steps",
            f"the plan has {total} targets in all; the limit is {MAX_TARGETS_PER_PLAN}",
        )


def _value(value: struct_pb2.Value) -> Any:
    # The decoder already bounds nesting (protobuf's recursion limit), so recursion is safe
    # here; parse_plan then enforces the plan's own, lower, depth limit with a field path.
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return _struct(value.struct_value)
    if kind == "list_value":
        return [_value(item) for item in value.list_value.values]
    if kind == "number_value":
        return value.number_value  # NaN and ±inf stay floats: parse_plan names the field
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None  # null_value, or a Value with no kind set


def _struct(message: struct_pb2.Struct) -> dict[str, Any]:
    return {key: _value(item) for key, item in message.fields.items()}


def plan_from_proto(message: types_pb2.Plan) -> dict[str, Any]:
    """The JSON form of a ``Plan`` message, ready for ``parse_plan``.

    Raises ``PlanValidationError`` at once, before converting anything, when the plan has more
    steps or targets than ``parse_plan`` allows.
    """
    check_plan_counts(message)
    plan: dict[str, Any] = {
        "name": message.name,
        "sla_class": _enum_name(types_pb2.SlaClass, message.sla_class, _SLA_PREFIX) or None,
        "steps": [
            {
                "id": step.id,
                "action": step.action,
                "action_class": _enum_name(
                    types_pb2.ActionClass, step.action_class, _ACTION_CLASS_PREFIX
                )
                or None,
                "targets": [{"ref": t.ref, "tags": dict(t.tags)} for t in step.targets],
                "params": _struct(step.params),
            }
            for step in message.steps
        ],
    }
    if message.runbook_url:
        plan["runbook_url"] = message.runbook_url
    if message.description:
        plan["description"] = message.description
    # Unset enums are left out, so validation reports them as missing fields.
    if plan["sla_class"] is None:
        del plan["sla_class"]
    for step in plan["steps"]:
        if step["action_class"] is None:
            del step["action_class"]
    return plan


def plan_to_proto(plan: Mapping[str, Any]) -> types_pb2.Plan:
    """The ``Plan`` message for a plan's JSON form (``to_wire_dict(plan)`` or a plain dict)."""
    message = types_pb2.Plan(
        name=plan.get("name", ""),
        runbook_url=plan.get("runbook_url") or "",
        description=plan.get("description") or "",
    )
    message.sla_class = _enum_value(  # type: ignore[assignment]
        types_pb2.SlaClass, plan.get("sla_class"), _SLA_PREFIX, "sla_class"
    )
    for index, step in enumerate(plan.get("steps", ())):
        pb_step = message.steps.add(
            id=step.get("id", ""),
            action=step.get("action", ""),
            action_class=_enum_value(
                types_pb2.ActionClass,
                step.get("action_class"),
                _ACTION_CLASS_PREFIX,
                f"steps[{index}].action_class",
            ),
        )
        for target in step.get("targets", ()):
            pb_step.targets.add(ref=target.get("ref", ""), tags=dict(target.get("tags") or {}))
        pb_step.params.update(dict(step.get("params") or {}))
    return message
