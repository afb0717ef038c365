"""The plan model: strict validation with explicit limits, field paths, and no echoed secrets."""

from __future__ import annotations

import copy
import json
import math
import pickle
import traceback
from collections.abc import Callable
from enum import StrEnum
from types import MappingProxyType
from typing import Any

import pydantic
import pytest

from opsconductor.common import plan as plan_module
from opsconductor.common.errors import FieldViolation, PlanValidationError
from opsconductor.common.plan import (
    MAX_DESCRIPTION_LENGTH,
    MAX_NAME_LENGTH,
    MAX_PARAMS_BYTES,
    MAX_PARAMS_DEPTH,
    MAX_PLAN_BYTES,
    MAX_REPORTED_VIOLATIONS,
    MAX_RUNBOOK_URL_LENGTH,
    MAX_SAFE_INTEGER,
    MAX_STEPS,
    MAX_TAG_KEY_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    MAX_TAGS,
    MAX_TARGET_REF_LENGTH,
    MAX_TARGETS_PER_STEP,
    ActionClass,
    Plan,
    SecretRef,
    SlaClass,
    Step,
    Target,
    format_field_path,
    iter_secret_refs,
    parse_plan,
    parse_secret_ref,
    to_wire_dict,
)
from opsconductor.execution.v1 import types_pb2

SECRET = "Sup3r-S3cret-Value-0xDEADBEEF"


def plan_dict(**overrides: Any) -> dict[str, Any]:
    """A valid two-step plan in its JSON form."""
    data: dict[str, Any] = {
        "name": "restart web tier",
        "sla_class": "fast",
        "steps": [
            {
                "id": "check",
                "action": "http",
                "action_class": "read",
                "targets": [{"ref": "host:web-01", "tags": {"env": "production"}}],
                "params": {"url": "https://web-01/health", "expect": 200},
            },
            {
                "id": "restart",
                "action": "shell",
                "action_class": "modify",
                "targets": [{"ref": "host:web-02"}, {"ref": "host:web-01"}],
                "params": {"argv": ["systemctl", "restart", "web"]},
            },
        ],
    }
    data.update(overrides)
    return data


def violations_of(data: Any) -> list[FieldViolation]:
    with pytest.raises(PlanValidationError) as info:
        parse_plan(data)
    return info.value.violations


def fields_of(data: Any) -> list[str]:
    return [violation.field for violation in violations_of(data)]


def with_step(**changes: Any) -> dict[str, Any]:
    """The valid plan with its first step changed."""
    data = plan_dict()
    data["steps"][0].update(changes)
    return data


def with_target(**changes: Any) -> dict[str, Any]:
    """The valid plan with the first target of its first step changed."""
    data = plan_dict()
    data["steps"][0]["targets"][0].update(changes)
    return data


def nested(depth: int) -> dict[str, Any]:
    """Params whose containers nest ``depth`` levels deep (the params object is level 1)."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


# --- the happy path -------------------------------------------------------------------------


def test_valid_plan_parses_with_defaults() -> None:
    """A valid plan parses; omitted optional fields get their defaults."""
    plan = parse_plan(plan_dict())
    assert plan.name == "restart web tier"
    assert plan.sla_class is SlaClass.FAST
    assert plan.runbook_url is None
    assert plan.description == ""
    assert plan.steps[1].targets[1] == Target(ref="host:web-01")
    assert plan.steps[1].targets[0].tags == {}


def test_plan_exposes_action_class_targets_and_actions() -> None:
    """action_class is the riskiest step's; target_refs and actions are sorted and unique."""
    plan = parse_plan(plan_dict())
    assert plan.action_class is ActionClass.MODIFY
    assert plan.target_refs == ("host:web-01", "host:web-02")
    assert plan.actions == ("http", "shell")


def test_models_are_frozen() -> None:
    """A parsed plan cannot be altered in place (a copy with changes is a new plan)."""
    plan = parse_plan(plan_dict())
    with pytest.raises(pydantic.ValidationError):
        plan.name = "other"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        plan.steps[0].targets[0].ref = "host:x"  # type: ignore[misc]
    assert isinstance(plan.steps, tuple)


def test_wire_dict_round_trips_and_is_json() -> None:
    """to_wire_dict gives plain JSON data that parses back to an equal plan."""
    plan = parse_plan(plan_dict(runbook_url="https://runbooks.example/web", description="a\nb"))
    wire = to_wire_dict(plan)
    assert json.loads(json.dumps(wire)) == wire
    assert parse_plan(wire) == plan
    assert wire["steps"][0]["action_class"] == "read"


@pytest.mark.parametrize(
    ("model", "message"),
    [(Plan, types_pb2.Plan), (Step, types_pb2.Step), (Target, types_pb2.Target)],
)
def test_model_fields_are_the_proto_message_fields(
    model: type[pydantic.BaseModel], message: Any
) -> None:
    """The models carry exactly the fields of their proto messages (the wire contract)."""
    assert set(model.model_fields) == {field.name for field in message.DESCRIPTOR.fields}


@pytest.mark.parametrize(
    ("enum", "proto_enum", "prefix"),
    [
        (ActionClass, types_pb2.ActionClass, "ACTION_CLASS_"),
        (SlaClass, types_pb2.SlaClass, "SLA_CLASS_"),
    ],
)
def test_enums_match_the_proto_enums(enum: type[StrEnum], proto_enum: Any, prefix: str) -> None:
    """Every enum member has a proto value of the same name (besides *_UNSPECIFIED)."""
    names = {name.removeprefix(prefix) for name in proto_enum.DESCRIPTOR.values_by_name}
    assert names - {"UNSPECIFIED"} == {member.name for member in enum}


def test_models_build_directly_and_from_any_mapping() -> None:
    """Models build from keyword arguments and from read-only mappings as well as dicts."""
    step = Step(id="s", action="noop", action_class=ActionClass.READ, targets=(Target(ref="a"),))
    direct = Plan(name="p", steps=(step,), sla_class=SlaClass.MEDIUM)
    data = MappingProxyType(
        {
            "name": "p",
            "sla_class": "medium",
            "steps": (
                MappingProxyType(
                    {"id": "s", "action": "noop", "action_class": "read", "targets": [{"ref": "a"}]}
                ),
            ),
        }
    )
    assert parse_plan(data) == direct
    assert pickle.loads(pickle.dumps(direct)) == direct


def test_plan_model_validate_raises_pydantic_errors_without_inputs() -> None:
    """Plan.model_validate raises pydantic's error, whose text hides the submitted values."""
    data = with_step(params={"$secret": SECRET})
    with pytest.raises(pydantic.ValidationError) as info:
        Plan.model_validate(data)
    assert SECRET not in str(info.value)


# --- action and SLA classes ------------------------------------------------------------------


def test_action_classes_are_ordered_by_risk_not_alphabet() -> None:
    """read < modify < deploy, whereas alphabetically deploy would come first."""
    assert ActionClass.READ < ActionClass.MODIFY < ActionClass.DEPLOY
    assert ActionClass.DEPLOY > ActionClass.READ
    assert ActionClass.MODIFY <= ActionClass.MODIFY
    assert ActionClass.MODIFY >= ActionClass.READ
    assert not ActionClass.DEPLOY < ActionClass.MODIFY
    assert sorted([ActionClass.DEPLOY, ActionClass.READ, ActionClass.MODIFY]) == list(ActionClass)
    assert max(ActionClass) is ActionClass.DEPLOY
    assert [c.rank for c in ActionClass] == [0, 1, 2]


def test_action_class_compares_with_its_values_only() -> None:
    """Comparing with a value string works by rank; anything else is a TypeError."""
    assert ActionClass.READ < "deploy"
    assert ActionClass.DEPLOY > "modify"
    with pytest.raises(TypeError):
        _ = ActionClass.READ < "zzz"
    with pytest.raises(TypeError):
        _ = ActionClass.READ < 1


@pytest.mark.parametrize(
    ("classes", "expected"),
    [
        (["read", "read"], ActionClass.READ),
        (["read", "deploy", "modify"], ActionClass.DEPLOY),
        (["modify", "read"], ActionClass.MODIFY),
    ],
)
def test_plan_action_class_is_the_maximum(classes: list[str], expected: ActionClass) -> None:
    """The plan's class is the highest of its steps' classes."""
    steps = [
        {"id": f"s{i}", "action": "noop", "action_class": c, "targets": [{"ref": "a"}]}
        for i, c in enumerate(classes)
    ]
    assert parse_plan(plan_dict(steps=steps)).action_class is expected


# --- limits: each one violated gives the right field path --------------------------------------

Mutation = Callable[[], Any]

LIMIT_CASES: list[tuple[str, Mutation, str, str]] = [
    # (case id, invalid input, expected field path, fragment of the description)
    ("no steps", lambda: plan_dict(steps=[]), "steps", "at least 1"),
    (
        "too many steps",
        lambda: plan_dict(
            steps=[
                {"id": f"s{i}", "action": "noop", "action_class": "read", "targets": [{"ref": "a"}]}
                for i in range(MAX_STEPS + 1)
            ]
        ),
        "steps",
        f"at most {MAX_STEPS}",
    ),
    ("empty targets", lambda: with_step(targets=[]), "steps[0].targets", "at least 1"),
    (
        "too many targets",
        lambda: with_step(targets=[{"ref": f"h{i}"} for i in range(MAX_TARGETS_PER_STEP + 1)]),
        "steps[0].targets",
        f"at most {MAX_TARGETS_PER_STEP}",
    ),
    (
        "duplicate step id",
        lambda: plan_dict(steps=[plan_dict()["steps"][0]] * 2),
        "steps[1].id",
        "duplicate step id (also steps[0])",
    ),
    (
        "duplicate target ref",
        lambda: with_step(targets=[{"ref": "a"}, {"ref": "b"}, {"ref": "a", "tags": {"x": "y"}}]),
        "steps[0].targets[2].ref",
        "duplicate target ref (also targets[0])",
    ),
    ("empty step id", lambda: with_step(id=""), "steps[0].id", "step ids must be 1..100"),
    ("step id starts with dash", lambda: with_step(id="-x"), "steps[0].id", "starting with"),
    ("step id with space", lambda: with_step(id="a b"), "steps[0].id", "step ids"),
    ("step id too long", lambda: with_step(id="a" * 101), "steps[0].id", "1..100"),
    ("step id non-ascii", lambda: with_step(id="schritt-ü"), "steps[0].id", "step ids"),
    ("step id trailing newline", lambda: with_step(id="abc\n"), "steps[0].id", "step ids"),
    ("action with slash", lambda: with_step(action="a/b"), "steps[0].action", "action names"),
    ("action too long", lambda: with_step(action="a" * 101), "steps[0].action", "action names"),
    (
        "unknown action class",
        lambda: with_step(action_class="write"),
        "steps[0].action_class",
        "'read'",
    ),
    ("empty ref", lambda: with_target(ref=""), "steps[0].targets[0].ref", "1..300"),
    ("ref with space", lambda: with_target(ref="host a"), "steps[0].targets[0].ref", "whitespace"),
    ("ref with tab", lambda: with_target(ref="host\ta"), "steps[0].targets[0].ref", "printable"),
    ("ref with NUL", lambda: with_target(ref="host\x00a"), "steps[0].targets[0].ref", "NUL"),
    ("ref with DEL", lambda: with_target(ref="host\x7f"), "steps[0].targets[0].ref", "control"),
    (
        "ref with bidi override",
        lambda: with_target(ref="a\u202eb"),
        "steps[0].targets[0].ref",
        "format",
    ),
    ("ref too long", lambda: with_target(ref="h" * 301), "steps[0].targets[0].ref", "1..300"),
    (
        "too many tags",
        lambda: with_target(tags={f"k{i}": "v" for i in range(MAX_TAGS + 1)}),
        "steps[0].targets[0].tags",
        f"at most {MAX_TAGS} tags",
    ),
    (
        "tag key too long",
        lambda: with_target(tags={"k" * (MAX_TAG_KEY_LENGTH + 1): "v"}),
        "steps[0].targets[0].tags." + "k" * (MAX_TAG_KEY_LENGTH + 1),
        "tag keys must be 1..63",
    ),
    (
        "tag key with space",
        lambda: with_target(tags={"my key": "v"}),
        'steps[0].targets[0].tags["my key"]',
        "tag keys",
    ),
    (
        "empty tag key",
        lambda: with_target(tags={"": "v"}),
        'steps[0].targets[0].tags[""]',
        "tag keys",
    ),
    (
        "tag value too long",
        lambda: with_target(tags={"env": "v" * (MAX_TAG_VALUE_LENGTH + 1)}),
        "steps[0].targets[0].tags.env",
        "at most 256",
    ),
    (
        "tag value with newline",
        lambda: with_target(tags={"env": "prod\nuction"}),
        "steps[0].targets[0].tags.env",
        "printable",
    ),
    (
        "tag value not a string",
        lambda: with_target(tags={"env": 1}),
        "steps[0].targets[0].tags.env",
        "string",
    ),
    ("empty name", lambda: plan_dict(name=""), "name", "1..200"),
    ("blank name", lambda: plan_dict(name="   "), "name", "blank"),
    ("name too long", lambda: plan_dict(name="n" * 201), "name", "1..200"),
    ("name with newline", lambda: plan_dict(name="a\nb"), "name", "printable"),
    (
        "description too long",
        lambda: plan_dict(description="d" * (MAX_DESCRIPTION_LENGTH + 1)),
        "description",
        "0..4000",
    ),
    ("description with NUL", lambda: plan_dict(description="a\x00b"), "description", "NUL"),
    (
        "description with escape",
        lambda: plan_dict(description="\x1b[31m"),
        "description",
        "control",
    ),
    ("runbook ftp", lambda: plan_dict(runbook_url="ftp://runbooks/x"), "runbook_url", "http(s)"),
    ("runbook relative", lambda: plan_dict(runbook_url="/runbooks/x"), "runbook_url", "absolute"),
    ("runbook no host", lambda: plan_dict(runbook_url="https://"), "runbook_url", "absolute"),
    (
        "runbook javascript",
        lambda: plan_dict(runbook_url="javascript:alert(1)"),
        "runbook_url",
        "http",
    ),
    ("runbook bad ipv6", lambda: plan_dict(runbook_url="https://[::1/x"), "runbook_url", "http(s)"),
    (
        "runbook with space",
        lambda: plan_dict(runbook_url="https://a/b c"),
        "runbook_url",
        "whitespace",
    ),
    (
        "runbook too long",
        lambda: plan_dict(runbook_url="https://r/" + "a" * MAX_RUNBOOK_URL_LENGTH),
        "runbook_url",
        "at most 2000",
    ),
    (
        "runbook with credentials",
        lambda: plan_dict(runbook_url="https://user:pw@runbooks/x"),
        "runbook_url",
        "credentials",
    ),
    ("params not an object", lambda: with_step(params=["a"]), "steps[0].params", "JSON object"),
    (
        "params too big",
        lambda: with_step(params={"blob": "x" * MAX_PARAMS_BYTES}),
        "steps[0].params",
        f"the limit is {MAX_PARAMS_BYTES}",
    ),
    (
        "params too deep",
        lambda: with_step(params=nested(MAX_PARAMS_DEPTH + 1)),
        "steps[0].params" + ".k" * MAX_PARAMS_DEPTH,
        f"more than {MAX_PARAMS_DEPTH} levels",
    ),
    (
        "params list too deep",
        lambda: with_step(params={"a": [[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]}),
        "steps[0].params.a" + "[0]" * (MAX_PARAMS_DEPTH - 1),
        "levels deep",
    ),
    (
        "NUL in param string",
        lambda: with_step(params={"a": ["ok", "x\x00"]}),
        "steps[0].params.a[1]",
        "NUL",
    ),
    (
        "NUL in param key",
        lambda: with_step(params={"a": {"k\x00": 1}}),
        'steps[0].params.a["k\\u0000"]',
        "NUL",
    ),
    (
        "non-string key",
        lambda: with_step(params={"a": {1: 2}}),
        "steps[0].params.a",
        "keys must be strings",
    ),
    (
        "surrogate in param",
        lambda: with_step(params={"a": "\ud800"}),
        "steps[0].params.a",
        "surrogates",
    ),
    ("NaN param", lambda: with_step(params={"n": math.nan}), "steps[0].params.n", "finite"),
    (
        "infinite param",
        lambda: with_step(params={"n": [-math.inf]}),
        "steps[0].params.n[0]",
        "finite",
    ),
    (
        "huge int param",
        lambda: with_step(params={"n": MAX_SAFE_INTEGER + 1}),
        "steps[0].params.n",
        "within",
    ),
    ("bytes param", lambda: with_step(params={"b": b"\xff\xfe"}), "steps[0].params.b", "not bytes"),
    ("set param", lambda: with_step(params={"s": {1, 2}}), "steps[0].params.s", "not set"),
    ("unknown plan field", lambda: plan_dict(priority=1), "priority", "not a known field"),
    ("unknown step field", lambda: with_step(timeout=5), "steps[0].timeout", "not a known field"),
    (
        "unknown target field",
        lambda: with_target(host="x"),
        "steps[0].targets[0].host",
        "not a known field",
    ),
    (
        "missing name",
        lambda: {k: v for k, v in plan_dict().items() if k != "name"},
        "name",
        "is required",
    ),
    (
        "missing sla",
        lambda: {k: v for k, v in plan_dict().items() if k != "sla_class"},
        "sla_class",
        "is required",
    ),
    (
        "unknown sla",
        lambda: plan_dict(sla_class="instant"),
        "sla_class",
        "'fast', 'medium' or 'long'",
    ),
    (
        "missing action class",
        lambda: with_step(action_class=None),
        "steps[0].action_class",
        "one of",
    ),
    ("name not a string", lambda: plan_dict(name=5), "name", "must be a string"),
    ("name as bytes", lambda: plan_dict(name=b"\xff\xfegarbage"), "name", "must be a string"),
    ("steps not a list", lambda: plan_dict(steps="abc"), "steps", "must be a list"),
    ("step not an object", lambda: plan_dict(steps=["abc"]), "steps[0]", "JSON object"),
    (
        "tags not an object",
        lambda: with_target(tags=["env"]),
        "steps[0].targets[0].tags",
        "JSON object",
    ),
    ("plan is bytes", lambda: b"\xff\xfe\x00garbage", "", "JSON object"),
    ("plan is JSON text", lambda: json.dumps(plan_dict()), "", "JSON object"),
    ("plan is a list", lambda: [plan_dict()], "", "JSON object"),
    ("plan is None", lambda: None, "", "JSON object"),
]


@pytest.mark.parametrize(
    ("data", "field", "fragment"),
    [pytest.param(make, field, fragment, id=case) for case, make, field, fragment in LIMIT_CASES],
)
def test_each_violated_limit_names_its_field(data: Mutation, field: str, fragment: str) -> None:
    """Each invalid input raises PlanValidationError naming the field and what to do."""
    violations = violations_of(data())
    assert [v.field for v in violations] == [field], violations
    assert fragment in violations[0].description, violations[0]


def test_plan_too_big_is_reported_for_the_whole_plan() -> None:
    """A plan whose canonical JSON exceeds 512 KiB is refused as a whole (empty field path)."""
    blob = "x" * (MAX_PARAMS_BYTES - 100)
    steps = [
        {
            "id": f"s{i}",
            "action": "noop",
            "action_class": "read",
            "targets": [{"ref": "a"}],
            "params": {"b": blob},
        }
        for i in range(MAX_PLAN_BYTES // MAX_PARAMS_BYTES + 1)
    ]
    violations = violations_of(plan_dict(steps=steps))
    assert [v.field for v in violations] == [""]
    assert f"the limit is {MAX_PLAN_BYTES}" in violations[0].description


BOUNDARY_CASES: list[tuple[str, Mutation]] = [
    (
        "100 steps",
        lambda: plan_dict(
            steps=[
                {"id": f"s{i}", "action": "noop", "action_class": "read", "targets": [{"ref": "a"}]}
                for i in range(MAX_STEPS)
            ]
        ),
    ),
    (
        "500 targets",
        lambda: with_step(targets=[{"ref": f"h{i}"} for i in range(MAX_TARGETS_PER_STEP)]),
    ),
    ("100-char id", lambda: with_step(id="a" + "_.-9" * 24 + "Z" * 3)),
    ("300-char ref", lambda: with_target(ref="h" * MAX_TARGET_REF_LENGTH)),
    ("unicode ref", lambda: with_target(ref="host:сервер-01")),
    ("32 tags", lambda: with_target(tags={f"k{i}": "" for i in range(MAX_TAGS)})),
    ("tag key/value at limits", lambda: with_target(tags={"a/b.c-" + "k" * 57: "v w" * 85 + "x"})),
    ("200-char name", lambda: plan_dict(name="n" * MAX_NAME_LENGTH)),
    ("4000-char description", lambda: plan_dict(description="d\n\t\r" * 1000)),
    (
        "2000-char runbook",
        lambda: plan_dict(runbook_url="https://r/" + "a" * (MAX_RUNBOOK_URL_LENGTH - 10)),
    ),
    ("http runbook", lambda: plan_dict(runbook_url="HTTP://runbooks.internal:8080/x?y=1#z")),
    ("params at size limit", lambda: with_step(params={"b": "x" * (MAX_PARAMS_BYTES - 8)})),
    ("params at depth limit", lambda: with_step(params=nested(MAX_PARAMS_DEPTH))),
    ("control chars in params", lambda: with_step(params={"script": "echo a\nexit 1\t\x1b"})),
    (
        "largest safe integers",
        lambda: with_step(params={"n": [MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER]}),
    ),
    ("dollar keys", lambda: with_step(params={"body": {"$set": {"a": 1}}})),
]


@pytest.mark.parametrize(("data"), [pytest.param(make, id=case) for case, make in BOUNDARY_CASES])
def test_values_at_the_limits_are_accepted(data: Mutation) -> None:
    """Every limit is inclusive: a value exactly at it is valid."""
    parse_plan(data())


def test_params_size_limit_is_exact() -> None:
    """Params of exactly 64 KiB canonical JSON pass; one byte more fails."""
    overhead = len('{"b":""}')
    parse_plan(with_step(params={"b": "x" * (MAX_PARAMS_BYTES - overhead)}))
    assert fields_of(with_step(params={"b": "x" * (MAX_PARAMS_BYTES - overhead + 1)})) == [
        "steps[0].params"
    ]


def test_every_limit_is_documented_in_the_module_docstring() -> None:
    """Each MAX_* limit constant is listed in the module docstring's table."""
    limits = [name for name in plan_module.__all__ if name.startswith("MAX_")]
    undocumented = {
        "MAX_REPORTED_VIOLATIONS",
        "MAX_SAFE_INTEGER",
        "MAX_TAG_KEY_LENGTH",
        "MAX_TAG_VALUE_LENGTH",
    }
    for name in set(limits) - undocumented:
        assert f"``{name}``" in (plan_module.__doc__ or ""), name


def test_empty_runbook_url_means_none() -> None:
    """proto3 sends "" for an unset string: it is the same plan as no runbook URL."""
    assert parse_plan(plan_dict(runbook_url="")) == parse_plan(plan_dict())
    assert parse_plan(plan_dict(runbook_url=None)).runbook_url is None


# --- params normalisation and secret references ------------------------------------------------


@pytest.mark.parametrize("value", [float(2**53), float(2**60), -1e300, 1e300])
def test_whole_doubles_beyond_the_safe_range_are_refused_like_integers(value: float) -> None:
    """A double like 2^60 is stored as the integer it is; what the worker would refuse when it
    re-reads the stored plan, parse_plan refuses at submit, with the field path."""
    with pytest.raises(PlanValidationError) as info:
        parse_plan(with_step(params={"count": value}))
    assert info.value.violations[0].field == "steps[0].params.count"
    assert "within ±" in info.value.violations[0].description


def test_integral_floats_become_integers() -> None:
    """3.0 and 3 are the same parameter (google.protobuf.Struct only has doubles)."""
    params = {
        "n": 3.0,
        "z": -0.0,
        "f": 2.5,
        "flag": True,
        "none": None,
        "t": (1.0, "a"),
    }
    step = parse_plan(with_step(params=params)).steps[0]
    assert step.params == {
        "n": 3,
        "z": 0,
        "f": 2.5,
        "flag": True,
        "none": None,
        "t": [1, "a"],
    }
    assert type(step.params["n"]) is int
    assert step.params["flag"] is True


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ({"$secret": "env:DB_PASSWORD"}, SecretRef("env", "DB_PASSWORD")),
        ({"$secret": "file:db-password.txt"}, SecretRef("file", "db-password.txt")),
        ({"plain": "value"}, None),
    ],
)
def test_valid_secret_references(reference: dict[str, Any], expected: SecretRef | None) -> None:
    """A reference is exactly {"$secret": "<env|file>:<name>"}; other objects are not one."""
    assert parse_secret_ref(reference) == expected
    parse_plan(with_step(params={"password": reference}))
    if expected:
        assert str(expected) == reference["$secret"]


@pytest.mark.parametrize(
    ("reference", "fragment"),
    [
        ({"$secret": "env:X", "fallback": SECRET}, "no other keys"),
        ({"$secret": SECRET}, "provider one of env, file"),
        ({"$secret": f"vault:{SECRET}"}, "provider one of env, file"),
        ({"$secret": ["env:X"]}, "must be a string"),
        ({"$secret": "env:"}, "invalid secret name for provider 'env'"),
        ({"$secret": "env:1_STARTS_WITH_DIGIT"}, "invalid secret name"),
        ({"$secret": f"env:{SECRET}"}, "invalid secret name"),
        ({"$secret": "file:../etc/passwd"}, "invalid secret name for provider 'file'"),
        ({"$secret": "file:a/b"}, "invalid secret name"),
    ],
)
def test_malformed_secret_references_are_rejected(reference: dict[str, Any], fragment: str) -> None:
    """A "$secret" key with anything else, a bad provider or a bad name is an error at its path."""
    with pytest.raises(ValueError, match="secret"):
        parse_secret_ref(reference)
    violations = violations_of(with_step(params={"db": {"password": [reference]}}))
    assert [v.field for v in violations] == ["steps[0].params.db.password[0]"]
    assert fragment in violations[0].description


def test_iter_secret_refs_finds_every_reference_in_order() -> None:
    """Every reference, nested in objects and lists, is found; a reference is not descended."""
    params = {
        "a": {"$secret": "env:A"},
        "b": [{"x": {"$secret": "file:b"}}, "plain", 1],
        "c": {"d": {"$secret": "env:C"}},
    }
    step = parse_plan(with_step(params=params)).steps[0]
    assert list(iter_secret_refs(step.params)) == [
        SecretRef("env", "A"),
        SecretRef("file", "b"),
        SecretRef("env", "C"),
    ]


SECRET_LEAKS: list[tuple[str, Mutation]] = [
    ("as the reference", lambda: with_step(params={"pw": {"$secret": SECRET}})),
    ("next to a reference", lambda: with_step(params={"pw": {"$secret": "env:PW", "v": SECRET}})),
    ("in a bad provider", lambda: with_step(params={"pw": {"$secret": f"vault:{SECRET}"}})),
    ("beside a NaN", lambda: with_step(params={"pw": SECRET, "n": math.nan})),
    ("in oversize params", lambda: with_step(params={"pw": SECRET, "pad": "x" * MAX_PARAMS_BYTES})),
    ("beside a NUL", lambda: with_step(params={"pw": SECRET + "\x00"})),
    ("in a non-object params", lambda: with_step(params=[SECRET])),
    ("as an unknown field", lambda: with_step(password=SECRET)),
    ("as a bad action class", lambda: with_step(action_class=SECRET)),
    ("in runbook credentials", lambda: plan_dict(runbook_url=f"https://admin:{SECRET}@runbooks/x")),
    ("beside a bad step", lambda: plan_dict(steps=[{"params": {"pw": SECRET}}])),
]


@pytest.mark.parametrize(("data"), [pytest.param(make, id=case) for case, make in SECRET_LEAKS])
def test_a_secret_in_a_bad_plan_never_appears_in_the_error(data: Mutation) -> None:
    """Neither message, repr, violations, details nor the printed traceback quote a value."""
    with pytest.raises(PlanValidationError) as info:
        parse_plan(data())
    exc = info.value
    rendered = [
        str(exc),
        repr(exc),
        repr(exc.violations),
        repr(exc.details),
        "".join(traceback.format_exception(exc)),
    ]
    for text in rendered:
        assert SECRET not in text


# --- error reporting ---------------------------------------------------------------------------


def test_all_problems_are_reported_at_once() -> None:
    """Several independent problems give several violations, in document order."""
    data = plan_dict(name="", sla_class="x")
    data["steps"][1]["targets"] = []
    data["steps"][0]["id"] = "-"
    assert fields_of(data) == ["name", "steps[0].id", "steps[1].targets", "sla_class"]


def test_list_of_only_invalid_items_is_not_also_called_too_short() -> None:
    """When every step is invalid, the steps themselves are reported, not "steps: too short"."""
    assert fields_of(plan_dict(steps=[{"id": "a"}])) == [
        "steps[0].action",
        "steps[0].action_class",
        "steps[0].targets",
    ]


def test_violations_are_capped_with_a_summary() -> None:
    """A plan with hundreds of problems reports the first ones and how many were left out."""
    data = with_step(targets=[{"ref": f"bad ref {i}"} for i in range(MAX_TARGETS_PER_STEP)])
    violations = violations_of(data)
    assert len(violations) == MAX_REPORTED_VIOLATIONS + 1
    assert violations[0].field == "steps[0].targets[0].ref"
    assert violations[-1] == FieldViolation(
        "", f"{MAX_TARGETS_PER_STEP - MAX_REPORTED_VIOLATIONS} more problem(s) not shown"
    )


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        (("steps", 0, "targets", 2, "ref"), "steps[0].targets[2].ref"),
        (("steps", 0, "params", "Content-Type"), "steps[0].params.Content-Type"),
        (("params", "$secret"), 'params["$secret"]'),
        (("tags", "with space", "[key]"), 'tags["with space"]'),
        (("p", "k" * 100), 'p["' + "k" * 61 + '..."]'),
        ((0,), "[0]"),
        ((), ""),
    ],
)
def test_field_paths_are_readable(parts: tuple[str | int, ...], expected: str) -> None:
    """Paths use dots for plain names, brackets for indexes and quoted, shortened odd keys."""
    assert format_field_path(parts) == expected


def test_input_is_not_mutated() -> None:
    """Parsing never changes the caller's data (e.g. when normalising floats)."""
    data = with_step(params={"n": 1.0, "l": [2.0]})
    before = copy.deepcopy(data)
    parse_plan(data)
    assert data == before
    assert type(data["steps"][0]["params"]["n"]) is float
