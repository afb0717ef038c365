"""Read a plan file (YAML or JSON) into the plan's JSON form, naming the field of any problem.

The service is the one validator of a plan (``PreviewPlan``/``SubmitExecution`` answer
``INVALID_ARGUMENT`` with field violations); this module checks only what it needs to build the
``Plan`` message at all — the file parses, the shapes are mappings and lists, enum names are
known, no field is misspelt — so an operator gets the field path either way::

    plan.yaml: steps[1].targets[0].ref: must be a string

A target may be written as its ref alone (``targets: ["host:web-01"]``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import yaml

from opsconductor.execution.v1 import types_pb2

__all__ = ["PlanFileError", "load_plan_file"]

_PLAN_KEYS: Final = frozenset({"name", "sla_class", "runbook_url", "description", "steps"})
_STEP_KEYS: Final = frozenset({"id", "action", "action_class", "targets", "params"})
_TARGET_KEYS: Final = frozenset({"ref", "tags"})
_SLA_CLASSES: Final = tuple(
    n.removeprefix("SLA_CLASS_").lower()
    for n in types_pb2.SlaClass.DESCRIPTOR.values_by_name
    if "UNSPECIFIED" not in n
)
_ACTION_CLASSES: Final = tuple(
    n.removeprefix("ACTION_CLASS_").lower()
    for n in types_pb2.ActionClass.DESCRIPTOR.values_by_name
    if "UNSPECIFIED" not in n
)


class PlanFileError(Exception):
    """The plan file cannot be read, parsed or turned into a plan; the message names where."""


def _fail(source: str, field: str, problem: str) -> PlanFileError:
    return PlanFileError(f"{source}: {field}: {problem}" if field else f"{source}: {problem}")


def _parse(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanFileError(f"{path}: cannot read it ({exc.__class__.__name__.lower()})") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanFileError(
                f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}"
            ) from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise PlanFileError(f"{path}: {where}invalid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise PlanFileError(f"{path}: invalid YAML: {exc}") from None


def _check_keys(source: str, where: str, value: Mapping[Any, Any], known: frozenset[str]) -> None:
    for key in value:
        if key not in known:
            field = f"{where}.{key}" if where else str(key)
            raise _fail(source, field, f"unknown field (known: {', '.join(sorted(known))})")


def _text(source: str, field: str, value: Any, *, required: bool) -> str | None:
    if value is None:
        if required:
            raise _fail(source, field, "is required")
        return None
    if not isinstance(value, str):
        raise _fail(source, field, "must be a string")
    return value


def _enum(source: str, field: str, value: Any, allowed: tuple[str, ...]) -> str | None:
    text = _text(source, field, value, required=False)
    if text is not None and text.lower() not in allowed:
        raise _fail(source, field, f"must be one of {', '.join(allowed)}")
    return None if text is None else text.lower()


def _target(source: str, field: str, value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        return {"ref": value}
    if not isinstance(value, Mapping):
        raise _fail(source, field, "must be a mapping with a ref (or the ref as a string)")
    _check_keys(source, field, value, _TARGET_KEYS)
    ref = _text(source, f"{field}.ref", value.get("ref"), required=True)
    tags = value.get("tags") or {}
    if not isinstance(tags, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
    ):
        raise _fail(source, f"{field}.tags", "must be a mapping of strings to strings")
    return {"ref": ref, "tags": dict(tags)}


def _step(source: str, field: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(source, field, "must be a mapping")
    _check_keys(source, field, value, _STEP_KEYS)
    step: dict[str, Any] = {
        "id": _text(source, f"{field}.id", value.get("id"), required=True),
        "action": _text(source, f"{field}.action", value.get("action"), required=True),
    }
    action_class = _enum(
        source, f"{field}.action_class", value.get("action_class"), _ACTION_CLASSES
    )
    if action_class is not None:
        step["action_class"] = action_class
    targets = value.get("targets")
    if not isinstance(targets, list):
        raise _fail(source, f"{field}.targets", "must be a list of targets")
    step["targets"] = [_target(source, f"{field}.targets[{i}]", t) for i, t in enumerate(targets)]
    params = value.get("params") or {}
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise _fail(source, f"{field}.params", "must be a mapping with string keys")
    try:
        json.dumps(params, allow_nan=False)
    except (TypeError, ValueError):
        raise _fail(
            source, f"{field}.params", "must hold JSON values only (no dates, NaN or infinity)"
        ) from None
    step["params"] = dict(params)
    return step


def load_plan_file(path: str | Path) -> dict[str, Any]:
    """The plan's JSON form from a YAML (or ``.json``) file; :class:`PlanFileError` if unusable."""
    path = Path(path)
    source = str(path)
    data = _parse(path)
    if not isinstance(data, Mapping):
        raise _fail(
            source, "", "the file must hold one plan: a mapping with name, sla_class, steps"
        )
    _check_keys(source, "", data, _PLAN_KEYS)
    plan: dict[str, Any] = {"name": _text(source, "name", data.get("name"), required=True)}
    sla_class = _enum(source, "sla_class", data.get("sla_class"), _SLA_CLASSES)
    if sla_class is not None:
        plan["sla_class"] = sla_class
    for key in ("runbook_url", "description"):
        text = _text(source, key, data.get(key), required=False)
        if text is not None:
            plan[key] = text
    steps = data.get("steps")
    if not isinstance(steps, list):
        raise _fail(source, "steps", "must be a list of steps")
    plan["steps"] = [_step(source, f"steps[{i}]", s) for i, s in enumerate(steps)]
    return plan
