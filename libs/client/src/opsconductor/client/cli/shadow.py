"""The shadow report of a record-only rollout: what was recorded against what was expected.

During the dark launch (docs/rollout.md) a tenant's executions are recorded but no handler
runs. The team writes down, per plan, what each submission should have become and compares::

    tenant: internal            # optional; else --tenant / the context's tenant
    plans:
      - name: restart-web       # the plan's name
        mode: background        # immediate | background
        approval_level: 1
        targets: [host:web-01, host:web-02]   # every target of the plan (any order)
        steps: [drain, restart] # step ids in order, or {id, action, status} mappings
        record_only: true       # optional
        status: succeeded       # optional: the execution's final status
        count: 1                # optional: how many executions of this plan the period holds

Every field is optional but ``name``. A recorded execution whose plan is not listed, a listed
plan with no execution, and every field that differs is a mismatch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import yaml

from opsconductor.client.cli.plan_file import PlanFileError
from opsconductor.client.client import ExecutionClient
from opsconductor.client.models import Execution

__all__ = ["Expected", "ExpectedPlan", "Report", "compare", "load_expected", "recorded_executions"]

_PLAN_KEYS: Final = frozenset(
    {"name", "mode", "approval_level", "targets", "steps", "record_only", "status", "count"}
)
_STEP_KEYS: Final = frozenset({"id", "action", "status"})


@dataclass(frozen=True)
class ExpectedPlan:
    name: str
    mode: str | None = None
    approval_level: int | None = None
    targets: tuple[str, ...] | None = None
    steps: tuple[Mapping[str, str], ...] | None = None
    record_only: bool | None = None
    status: str | None = None
    count: int | None = None


@dataclass(frozen=True)
class Expected:
    plans: dict[str, ExpectedPlan]
    tenant: str | None = None


@dataclass
class Report:
    """What matched (plan names) and every mismatch, one sentence each."""

    matched: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)


def _bad(path: Path, where: str, problem: str) -> PlanFileError:
    return PlanFileError(f"{path}: {where}: {problem}")


def _steps(path: Path, where: str, value: Any) -> tuple[Mapping[str, str], ...]:
    if not isinstance(value, list):
        raise _bad(path, where, "must be a list of step ids or {id, action, status} mappings")
    steps: list[Mapping[str, str]] = []
    for index, item in enumerate(value):
        at = f"{where}[{index}]"
        if isinstance(item, str):
            steps.append({"id": item})
            continue
        if not isinstance(item, Mapping) or not isinstance(item.get("id"), str):
            raise _bad(path, at, "must be a step id or a mapping with an id")
        unknown = sorted(set(item) - _STEP_KEYS)
        if unknown or not all(isinstance(v, str) for v in item.values()):
            raise _bad(path, at, f"takes string values for {', '.join(sorted(_STEP_KEYS))}")
        steps.append(dict(item))
    return tuple(steps)


def _plan(path: Path, where: str, item: Any) -> ExpectedPlan:
    if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
        raise _bad(path, where, "must be a mapping with a plan name")
    unknown = sorted(set(item) - _PLAN_KEYS)
    if unknown:
        raise _bad(path, f"{where}.{unknown[0]}", f"unknown field (known: {sorted(_PLAN_KEYS)})")
    checks: dict[str, tuple[type, ...]] = {
        "mode": (str,),
        "approval_level": (int,),
        "record_only": (bool,),
        "status": (str,),
        "count": (int,),
    }
    for key, types in checks.items():
        value = item.get(key)
        wrong_bool = types == (int,) and isinstance(value, bool)
        if value is not None and (not isinstance(value, types) or wrong_bool):
            raise _bad(path, f"{where}.{key}", f"must be of type {types[0].__name__}")
    targets = item.get("targets")
    if targets is not None and (
        not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)
    ):
        raise _bad(path, f"{where}.targets", "must be a list of target refs")
    return ExpectedPlan(
        name=item["name"],
        mode=item.get("mode"),
        approval_level=item.get("approval_level"),
        targets=None if targets is None else tuple(sorted(set(targets))),
        steps=None if item.get("steps") is None else _steps(path, f"{where}.steps", item["steps"]),
        record_only=item.get("record_only"),
        status=item.get("status"),
        count=item.get("count"),
    )


def load_expected(path: Path) -> Expected:
    """The expected outcomes file; :class:`PlanFileError` (exit 2) naming the field if bad."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanFileError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PlanFileError(f"{path}: not valid YAML/JSON: {first}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("plans"), list):
        raise _bad(path, "plans", "the file must be a mapping with a list of plans")
    tenant = data.get("tenant")
    if tenant is not None and not isinstance(tenant, str):
        raise _bad(path, "tenant", "must be a string")
    plans: dict[str, ExpectedPlan] = {}
    for index, item in enumerate(data["plans"]):
        plan = _plan(path, f"plans[{index}]", item)
        if plan.name in plans:
            raise _bad(path, f"plans[{index}].name", f"plan {plan.name!r} is listed twice")
        plans[plan.name] = plan
    return Expected(plans=plans, tenant=tenant)


async def recorded_executions(
    client: ExecutionClient, *, tenant: str, since: datetime | None, until: datetime
) -> list[Execution]:
    """The tenant's executions created in ``[since, until]``, oldest first, with plan and steps."""
    found: list[Execution] = []
    async for execution in client.iter_executions(tenant_id=tenant, page_size=200):
        created = execution.created_at
        if created is None:
            continue
        if since is not None and created < since:
            break  # newest first: everything after this is older still
        if created <= until:
            found.append(await client.get(execution.execution_id, tenant_id=tenant))
    return list(reversed(found))


def _targets(execution: Execution) -> tuple[str, ...]:
    steps = (execution.plan or {}).get("steps", ())
    return tuple(sorted({t["ref"] for s in steps for t in s.get("targets", ())}))


def _step_problems(expected: tuple[Mapping[str, str], ...], execution: Execution) -> list[str]:
    actual = [
        {"id": s.step_id, "action": s.action, "status": s.status}
        for s in sorted(execution.steps, key=lambda s: s.position)
    ]
    if [s["id"] for s in expected] != [s["id"] for s in actual]:
        return [f"steps {[s['id'] for s in actual]}, expected {[s['id'] for s in expected]}"]
    problems = []
    for want, got in zip(expected, actual, strict=True):
        for key in ("action", "status"):
            if key in want and want[key] != got[key]:
                problems.append(f"step {got['id']} {key} {got[key]!r}, expected {want[key]!r}")
    return problems


def _problems(expected: ExpectedPlan, execution: Execution) -> list[str]:
    problems: list[str] = []
    scalar = {
        "mode": execution.execution_mode,
        "approval_level": execution.approval_level,
        "record_only": execution.record_only,
        "status": execution.status,
    }
    for key, actual in scalar.items():
        want = getattr(expected, key)
        if want is not None and want != actual:
            problems.append(f"{key} {actual!r}, expected {want!r}")
    if expected.targets is not None and expected.targets != _targets(execution):
        problems.append(f"targets {list(_targets(execution))}, expected {list(expected.targets)}")
    if expected.steps is not None:
        problems.extend(_step_problems(expected.steps, execution))
    return problems


def compare(expected: Expected, recorded: list[Execution]) -> Report:
    """Every mismatch between ``recorded`` executions and ``expected`` outcomes."""
    report = Report()
    by_plan: dict[str, list[Execution]] = {}
    for execution in recorded:
        name = str((execution.plan or {}).get("name", ""))
        by_plan.setdefault(name, []).append(execution)
    for name, executions in by_plan.items():
        if name not in expected.plans:
            ids = ", ".join(e.execution_id for e in executions)
            report.mismatches.append(f"plan {name!r}: not expected, recorded as {ids}")
    for name, plan in expected.plans.items():
        executions = by_plan.get(name, [])
        if not executions:
            report.mismatches.append(f"plan {name!r}: expected, but no execution was recorded")
            continue
        before = len(report.mismatches)
        if plan.count is not None and plan.count != len(executions):
            report.mismatches.append(
                f"plan {name!r}: {len(executions)} executions, expected {plan.count}"
            )
        for execution in executions:
            for problem in _problems(plan, execution):
                report.mismatches.append(
                    f"plan {name!r} execution {execution.execution_id}: {problem}"
                )
        if len(report.mismatches) == before:
            report.matched.append(name)
    return report
