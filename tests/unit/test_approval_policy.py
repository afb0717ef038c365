"""determine_approval_level: read 0, modify 1, deploy 2, step-by-step rules lift to 3."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from opsconductor.common.approval_policy import (
    ApprovalPolicy,
    ApprovalPolicyError,
    default_policy,
    determine_approval_level,
)
from opsconductor.common.errors import PlanValidationError
from opsconductor.common.plan import Plan, parse_plan


def make_plan(
    action_class: str = "read",
    action: str = "noop",
    targets: int = 1,
    tags: dict[str, str] | None = None,
    runbook_url: str | None = None,
) -> Plan:
    data: dict[str, Any] = {
        "name": "p",
        "sla_class": "fast",
        "steps": [
            {
                "id": "s1",
                "action": action,
                "action_class": action_class,
                "targets": [{"ref": f"host:{i}", "tags": tags or {}} for i in range(targets)],
                "params": {},
            }
        ],
    }
    if runbook_url:
        data["runbook_url"] = runbook_url
    return parse_plan(data)


def create_query_plan() -> Plan:
    return make_plan("read", "query")


def create_restart_plan() -> Plan:
    return make_plan("modify", "restart")


def create_deploy_plan() -> Plan:
    return make_plan("deploy", "deploy", runbook_url="https://runbooks.example/deploy")


def test_spec_6_1_levels_by_action_class() -> None:
    """Spec §6.1: query 0, restart 1, deploy 2."""
    assert determine_approval_level(create_query_plan()) == 0
    assert determine_approval_level(create_restart_plan()) == 1
    assert determine_approval_level(create_deploy_plan()) == 2


@pytest.mark.parametrize(
    ("plan", "why"),
    [
        (make_plan("modify", tags={"env": "production"}), "tagged env=production"),
        (make_plan("modify", targets=21), "21 targets exceed 20"),
        (make_plan("modify", action="terminate"), "destructive action terminate"),
        (make_plan("deploy", tags={"tier": "production"}), "tagged tier=production"),
    ],
)
def test_step_by_step_rules_lift_risky_plans_to_level_3(plan: Plan, why: str) -> None:
    assert determine_approval_level(plan) == 3
    assert any(why in r for r in default_policy().step_by_step_reasons(plan))


def test_read_only_plans_stay_auto_even_on_production_targets() -> None:
    assert determine_approval_level(make_plan("read", tags={"env": "production"}, targets=50)) == 0


def test_runbook_required_from_level_2() -> None:
    policy = default_policy()
    policy.check_runbook(make_plan("modify"), 1)
    policy.check_runbook(create_deploy_plan(), 2)
    with pytest.raises(PlanValidationError) as info:
        policy.check_runbook(make_plan("deploy"), 2)
    assert info.value.violations[0].field == "runbook_url"


def test_policy_is_data_loaded_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "base_levels: {read: 0, modify: 2, deploy: 3}\n"
        "step_by_step: {max_targets: 2}\n"
        "runbook_required_from_level: 4\napproval_ttl_s: 60\n"
    )
    policy = ApprovalPolicy.load(path)
    assert determine_approval_level(make_plan("modify"), policy) == 2
    assert determine_approval_level(make_plan("modify", targets=3), policy) == 3
    assert policy.approval_ttl_s == 60
    policy.check_runbook(make_plan("deploy"), 3)  # never required at 4


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "must be a mapping"),
        ({"base_levels": {"read": 0}}, "base_levels must give"),
        ({"base_levels": {"read": 0, "modify": 9, "deploy": 2}}, "base_levels.modify"),
        ({"base_levels": {"read": 0, "modify": 1, "deploy": 2}, "extra": 1}, "unknown keys"),
        ({"base_levels": {"read": 0, "modify": 1, "deploy": 2}, "step_by_step": 3}, "mapping"),
        (
            {"base_levels": {"read": 0, "modify": 1, "deploy": 2}, "step_by_step": {"x": 1}},
            "unknown step_by_step keys",
        ),
        (
            {
                "base_levels": {"read": 0, "modify": 1, "deploy": 2},
                "step_by_step": {"target_tags": {"env": "prod"}},
            },
            "target_tags",
        ),
        (
            {
                "base_levels": {"read": 0, "modify": 1, "deploy": 2},
                "step_by_step": {"max_targets": 0},
            },
            "max_targets",
        ),
        (
            {
                "base_levels": {"read": 0, "modify": 1, "deploy": 2},
                "step_by_step": {"destructive_actions": "rm"},
            },
            "destructive_actions",
        ),
        (
            {
                "base_levels": {"read": 0, "modify": 1, "deploy": 2},
                "runbook_required_from_level": 0,
            },
            "runbook_required_from_level",
        ),
        (
            {"base_levels": {"read": 0, "modify": 1, "deploy": 2}, "approval_ttl_s": -1},
            "approval_ttl_s",
        ),
    ],
)
def test_invalid_policy_documents_name_the_problem(doc: Any, message: str) -> None:
    with pytest.raises(ApprovalPolicyError, match=message):
        ApprovalPolicy.from_document(doc)


def test_unreadable_or_malformed_policy_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ApprovalPolicyError, match="cannot read"):
        ApprovalPolicy.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_levels: [\n")
    with pytest.raises(ApprovalPolicyError, match="not valid YAML"):
        ApprovalPolicy.load(bad)
