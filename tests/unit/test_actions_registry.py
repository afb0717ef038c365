"""The action registry: entry-point plugins, built-ins, and what it checks on a step."""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import EntryPoint
from typing import Any

import pytest

from opsconductor.actions import (
    ENTRY_POINT_GROUP,
    ActionContext,
    ActionHandler,
    ActionPluginError,
    ActionRegistry,
    ActionResult,
    UnknownActionError,
    builtin_handlers,
    default_registry,
)
from opsconductor.actions.http import HttpAction
from opsconductor.actions.noop import NoopAction
from opsconductor.actions.shell import ShellAction
from opsconductor.actions.sleep import SleepAction
from opsconductor.common.errors import FieldViolation, PlanValidationError
from opsconductor.common.plan import ActionClass, Plan, Step


class GreetAction:
    """A well-formed third-party handler."""

    name = "greet"
    min_action_class = ActionClass.READ

    def estimate_ms(self, params: Mapping[str, Any], target_count: int) -> int:
        return 10 * target_count

    def validate(self, params: Mapping[str, Any]) -> list[FieldViolation]:
        if "who" not in params:
            return [FieldViolation("params.who", "is required")]
        return []

    async def run(self, ctx: ActionContext) -> ActionResult:
        return ActionResult({"greeted": ctx.params["who"]})


class NegativeEstimateAction(GreetAction):
    name = "negative"

    def estimate_ms(self, params: Mapping[str, Any], target_count: int) -> int:
        return -50


class BrokenValidatorAction(GreetAction):
    name = "broken"

    def validate(self, params: Mapping[str, Any]) -> list[FieldViolation]:
        raise RuntimeError("plugin bug")


class BadClassAction(GreetAction):
    name = "badclass"

    def required_action_class(self, params: Mapping[str, Any]) -> str:
        return "read"


class WrongNameAction(GreetAction):
    name = "not-the-entry-point-name"


class FakeShell(GreetAction):
    name = "shell"


class NotAHandler:
    name = "nothing"


GREET_INSTANCE = GreetAction()


def _ep(name: str, attr: str) -> EntryPoint:
    return EntryPoint(name=name, value=f"{__name__}:{attr}", group=ENTRY_POINT_GROUP)


def _step(action: str, action_class: str = "read", **params: Any) -> Step:
    return Step.model_validate(
        {
            "id": "s1",
            "action": action,
            "action_class": action_class,
            "targets": [{"ref": "host-1"}, {"ref": "host-2"}],
            "params": params,
        }
    )


def test_default_registry_has_the_builtins_and_installed_plugins() -> None:
    registry = default_registry()
    assert {"noop", "sleep", "http", "shell"} <= set(registry.names())
    # The test plugin package declares "probe" through the same entry-point group.
    assert "probe" in registry
    assert default_registry() is registry  # loaded once
    assert isinstance(registry.get("shell"), ShellAction)


def test_builtins_are_present_without_any_entry_point() -> None:
    registry = ActionRegistry.from_entry_points(found=[])
    assert registry.names() == ("http", "noop", "shell", "sleep")
    assert all(isinstance(h, ActionHandler) for h in builtin_handlers())


def test_a_plugin_class_or_instance_is_loaded_from_its_entry_point() -> None:
    registry = ActionRegistry.from_entry_points(
        found=[_ep("greet", "GreetAction"), _ep("negative", "NegativeEstimateAction")]
    )
    assert isinstance(registry.get("greet"), GreetAction)
    instance = ActionRegistry.from_entry_points(found=[_ep("greet", "GREET_INSTANCE")])
    assert instance.get("greet") is GREET_INSTANCE


def test_builtins_declared_as_entry_points_are_not_duplicated() -> None:
    found = [
        EntryPoint("noop", "opsconductor.actions.noop:NoopAction", ENTRY_POINT_GROUP),
        EntryPoint("noop", "opsconductor.actions.noop:NoopAction", ENTRY_POINT_GROUP),
    ]
    assert ActionRegistry.from_entry_points(found=found).names() == (
        "http",
        "noop",
        "shell",
        "sleep",
    )


@pytest.mark.parametrize(
    ("entry_point", "message"),
    [
        (_ep("nothing", "NotAHandler"), "is not an action handler"),
        (_ep("greet", "WrongNameAction"), "the two must match"),
        (_ep("shell", "FakeShell"), "registered twice"),
        (
            EntryPoint("gone", "opsc_no_such_module:Action", ENTRY_POINT_GROUP),
            "failed to load: ModuleNotFoundError",
        ),
    ],
)
def test_a_broken_plugin_stops_a_strict_registry(entry_point: EntryPoint, message: str) -> None:
    with pytest.raises(ActionPluginError, match=message) as info:
        ActionRegistry.from_entry_points(found=[entry_point])
    assert info.value.reason == "ACTION_PLUGIN_INVALID"


def test_a_broken_plugin_is_skipped_by_a_lenient_registry() -> None:
    registry = ActionRegistry.from_entry_points(
        strict=False,
        found=[
            EntryPoint("gone", "opsc_no_such_module:Action", ENTRY_POINT_GROUP),
            _ep("shell", "FakeShell"),
            _ep("greet", "GreetAction"),
        ],
    )
    assert "gone" not in registry
    assert isinstance(registry.get("shell"), ShellAction)
    assert "greet" in registry


def test_two_plugins_cannot_claim_one_name() -> None:
    with pytest.raises(ActionPluginError, match="registered twice"):
        ActionRegistry([GreetAction(), GreetAction()])


@pytest.mark.parametrize(
    "handler",
    [NotAHandler(), type("Bad", (GreetAction,), {"name": "bad name!"})()],
)
def test_register_refuses_non_handlers_and_bad_names(handler: Any) -> None:
    with pytest.raises(ActionPluginError):
        ActionRegistry().register(handler)


def test_register_refuses_a_min_class_that_is_not_an_action_class() -> None:
    bad = type("BadMin", (GreetAction,), {"min_action_class": "read"})()
    with pytest.raises(ActionPluginError, match="min_action_class"):
        ActionRegistry().register(bad)


def test_unknown_action_is_a_plan_error_naming_the_field_and_known_actions() -> None:
    registry = ActionRegistry(builtin_handlers())
    with pytest.raises(UnknownActionError) as info:
        registry.get("reboot_everything", field="steps[2].action")
    assert isinstance(info.value, PlanValidationError)
    assert info.value.reason == "INVALID_PLAN"
    (violation,) = info.value.violations
    assert violation.field == "steps[2].action"
    assert "'shell'" in violation.description
    assert [v.field for v in registry.validate_step(_step("reboot_everything"))] == ["action"]


def test_valid_steps_have_no_violations() -> None:
    registry = ActionRegistry(builtin_handlers())
    assert registry.validate_step(_step("noop")) == []
    assert registry.validate_step(_step("sleep", seconds=1)) == []
    assert registry.validate_step(_step("http", url="https://example.test/x")) == []
    assert registry.validate_step(_step("shell", "modify", argv=["true"])) == []
    assert registry.validate_step(_step("shell", "deploy", argv=["true"])) == []


def test_declared_class_below_the_actions_minimum_is_refused() -> None:
    registry = ActionRegistry(builtin_handlers())
    (violation,) = registry.validate_step(_step("shell", "read", argv=["true"]))
    assert violation.field == "action_class"
    assert "'modify'" in violation.description


def test_http_class_depends_on_the_method() -> None:
    registry = ActionRegistry(builtin_handlers())
    url = "https://example.test/"
    assert registry.validate_step(_step("http", "read", url=url, method="GET")) == []
    assert registry.validate_step(_step("http", "read", url=url, method="head")) == []
    post = registry.validate_step(_step("http", "read", url=url, method="POST"))
    assert [v.field for v in post] == ["action_class"]
    assert registry.validate_step(_step("http", "modify", url=url, method="DELETE")) == []
    assert registry.required_action_class("http", {"method": "PUT"}) is ActionClass.MODIFY
    assert registry.required_action_class("http", {}) is ActionClass.READ
    assert registry.required_action_class("shell", {}) is ActionClass.MODIFY


def test_param_violations_are_prefixed_with_the_step_path() -> None:
    registry = ActionRegistry(builtin_handlers())
    violations = registry.validate_step(_step("sleep", seconds=-1), path="steps[3]")
    assert [v.field for v in violations] == ["steps[3].params.seconds"]


def test_malformed_secret_references_are_reported_even_past_the_plan_model() -> None:
    """A step built without validation (model_construct) still has its references checked."""
    step = Step.model_construct(
        id="s1",
        action="noop",
        action_class=ActionClass.READ,
        targets=(),
        params={"x": {"$secret": "vault:kv"}},
    )
    violations = ActionRegistry(builtin_handlers()).validate_step(step)
    assert [v.field for v in violations] == ["params.x"]


def test_a_plugin_validator_that_crashes_becomes_a_violation() -> None:
    registry = ActionRegistry([BrokenValidatorAction()])
    assert registry.validate_step(_step("broken", who="x")) == [
        FieldViolation("params", "could not be validated by the action handler")
    ]


def test_a_plugin_returning_a_non_class_requirement_is_an_error() -> None:
    registry = ActionRegistry([BadClassAction()])
    with pytest.raises(ActionPluginError, match="required_action_class"):
        registry.validate_step(_step("badclass", who="x"))


def test_validate_plan_and_check_plan_cover_every_step() -> None:
    registry = ActionRegistry([*builtin_handlers(), GreetAction()])
    plan = Plan.model_validate(
        {
            "name": "p",
            "sla_class": "fast",
            "steps": [
                {"id": "a", "action": "greet", "action_class": "read", "targets": [{"ref": "h"}]},
                {"id": "b", "action": "noop", "action_class": "read", "targets": [{"ref": "h"}]},
                {"id": "c", "action": "zzz", "action_class": "read", "targets": [{"ref": "h"}]},
            ],
        }
    )
    assert [v.field for v in registry.validate_plan(plan)] == [
        "steps[0].params.who",
        "steps[2].action",
    ]
    with pytest.raises(PlanValidationError) as info:
        registry.check_plan(plan)
    assert len(info.value.violations) == 2
    ok_plan = plan.model_copy(update={"steps": plan.steps[1:2]})
    registry.check_plan(ok_plan)


def test_estimates_come_from_the_handlers() -> None:
    registry = ActionRegistry([*builtin_handlers(), GreetAction(), NegativeEstimateAction()])
    assert registry.estimate_step_ms(_step("noop")) == 5
    assert registry.estimate_step_ms(_step("sleep", seconds=2.5)) == 2500
    assert registry.estimate_step_ms(_step("http", url="https://x.test/")) == 500
    assert registry.estimate_step_ms(_step("shell", "modify", argv=["true"])) == 1000
    assert registry.estimate_step_ms(_step("greet", who="x")) == 20  # 10 ms x 2 targets
    assert registry.estimate_step_ms(_step("negative", who="x")) == 0
    with pytest.raises(UnknownActionError):
        registry.estimate_step_ms(_step("zzz"))


def test_builtin_handler_types() -> None:
    kinds = {type(h) for h in builtin_handlers()}
    assert kinds == {NoopAction, SleepAction, HttpAction, ShellAction}
