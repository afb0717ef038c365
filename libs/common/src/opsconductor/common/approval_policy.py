"""How much human approval a plan needs: ``determine_approval_level(plan)``, one function used by
the api (at submit), the approvals service and the worker (re-check before the first step).

The policy is data (``approval_policy.yaml``, overridable by file): a base level per action class
(read 0, modify 1, deploy 2) and step-by-step rules that lift a non-read plan to level 3.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from opsconductor.common.errors import (
    ApprovalPolicyError,
    PlanValidationError,
)
from opsconductor.common.plan import ActionClass, Plan

LEVEL_AUTO = 0
LEVEL_CONFIRM = 1
LEVEL_PLAN_REVIEW = 2
LEVEL_STEP_BY_STEP = 3


@dataclass(frozen=True)
class ApprovalPolicy:
    """The approval rules. Build with ``ApprovalPolicy.from_document`` or ``load``."""

    base_levels: Mapping[ActionClass, int]
    production_tags: Mapping[str, frozenset[str]] = field(default_factory=dict)
    max_targets: int | None = None
    destructive_actions: frozenset[str] = frozenset()
    runbook_required_from_level: int = LEVEL_PLAN_REVIEW
    approval_ttl_s: int = 86400

    @classmethod
    def from_document(cls, doc: Mapping[str, Any], source: str = "<policy>") -> ApprovalPolicy:
        """Validate a parsed policy document; errors name the offending key."""

        def fail(what: str) -> ApprovalPolicyError:
            return ApprovalPolicyError(f"{source}: {what}")

        if not isinstance(doc, Mapping):
            raise fail("must be a mapping")
        unknown = set(doc) - {
            "base_levels",
            "step_by_step",
            "runbook_required_from_level",
            "approval_ttl_s",
        }
        if unknown:
            raise fail(f"unknown keys {sorted(unknown)}")
        raw_levels = doc.get("base_levels")
        if not isinstance(raw_levels, Mapping) or set(raw_levels) != {c.value for c in ActionClass}:
            raise fail("base_levels must give a level for each of read, modify, deploy")
        levels: dict[ActionClass, int] = {}
        for name, level in raw_levels.items():
            if not isinstance(level, int) or not 0 <= level <= LEVEL_STEP_BY_STEP:
                raise fail(f"base_levels.{name} must be an integer 0..3")
            levels[ActionClass(name)] = level
        rules = doc.get("step_by_step") or {}
        if not isinstance(rules, Mapping):
            raise fail("step_by_step must be a mapping")
        unknown = set(rules) - {"target_tags", "max_targets", "destructive_actions"}
        if unknown:
            raise fail(f"unknown step_by_step keys {sorted(unknown)}")
        tags = rules.get("target_tags") or {}
        if not isinstance(tags, Mapping) or not all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in tags.values()
        ):
            raise fail("step_by_step.target_tags must map tag names to lists of values")
        max_targets = rules.get("max_targets")
        if max_targets is not None and (not isinstance(max_targets, int) or max_targets < 1):
            raise fail("step_by_step.max_targets must be a positive integer")
        destructive = rules.get("destructive_actions") or []
        if not isinstance(destructive, list) or not all(isinstance(a, str) for a in destructive):
            raise fail("step_by_step.destructive_actions must be a list of action names")
        runbook_from = doc.get("runbook_required_from_level", LEVEL_PLAN_REVIEW)
        if not isinstance(runbook_from, int) or not 1 <= runbook_from <= 4:
            raise fail("runbook_required_from_level must be an integer 1..4 (4: never)")
        ttl = doc.get("approval_ttl_s", 86400)
        if not isinstance(ttl, int) or ttl <= 0:
            raise fail("approval_ttl_s must be a positive integer")
        return cls(
            base_levels=levels,
            production_tags={k: frozenset(v) for k, v in tags.items()},
            max_targets=max_targets,
            destructive_actions=frozenset(destructive),
            runbook_required_from_level=runbook_from,
            approval_ttl_s=ttl,
        )

    @classmethod
    def load(cls, path: Path | None = None) -> ApprovalPolicy:
        """The policy in ``path``, or the packaged default."""
        if path is None:
            text = files(__package__).joinpath("approval_policy.yaml").read_text("utf-8")
            source = "approval_policy.yaml"
        else:
            try:
                text = path.read_text("utf-8")
            except OSError as exc:
                raise ApprovalPolicyError(f"cannot read approval policy {path}: {exc}") from exc
            source = str(path)
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ApprovalPolicyError(f"{source}: not valid YAML ({exc})") from None
        return cls.from_document(doc, source)

    def step_by_step_reasons(self, plan: Plan) -> list[str]:
        """Why the plan needs per-step approval (empty: it does not)."""
        reasons = []
        for step in plan.steps:
            for target in step.targets:
                for tag, values in self.production_tags.items():
                    if target.tags.get(tag) in values:
                        reasons.append(f"target {target.ref} is tagged {tag}={target.tags[tag]}")
            if step.action in self.destructive_actions:
                reasons.append(f"step {step.id} runs destructive action {step.action}")
        if self.max_targets is not None and len(plan.target_refs) > self.max_targets:
            reasons.append(f"{len(plan.target_refs)} targets exceed {self.max_targets}")
        return reasons

    def level_for(self, plan: Plan) -> int:
        level = self.base_levels[plan.action_class]
        if plan.action_class is not ActionClass.READ and self.step_by_step_reasons(plan):
            level = LEVEL_STEP_BY_STEP
        return level

    def check_runbook(self, plan: Plan, level: int) -> None:
        """Reject a plan whose level requires a runbook URL it does not carry."""
        if level >= self.runbook_required_from_level and not plan.runbook_url:
            raise PlanValidationError.for_field(
                "runbook_url",
                f"plans needing approval level {level} must link the runbook reviewers follow "
                f"(required from level {self.runbook_required_from_level})",
            )


@lru_cache(maxsize=1)
def default_policy() -> ApprovalPolicy:
    return ApprovalPolicy.load()


def determine_approval_level(plan: Plan, policy: ApprovalPolicy | None = None) -> int:
    """0 read-only auto-execute, 1 confirmation, 2 plan review, 3 step-by-step."""
    return (policy or default_policy()).level_for(plan)
