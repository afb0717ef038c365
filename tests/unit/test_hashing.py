"""Canonical JSON and hashes: identical plans hash the same, any real change changes the key."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from types import MappingProxyType
from typing import Any
from uuid import UUID

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from opsconductor.common.errors import PlanValidationError
from opsconductor.common.hashing import (
    canonical_json,
    idempotency_key,
    plan_digests,
    plan_hash,
    snapshot_hash,
    step_idempotency_key,
)
from opsconductor.common.plan import MAX_SAFE_INTEGER, ActionClass, parse_plan, to_wire_dict


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def simple_plan(targets: list[str], **overrides: Any) -> dict[str, Any]:
    plan: dict[str, Any] = {
        "name": "restart",
        "sla_class": "fast",
        "steps": [
            {
                "id": "restart",
                "action": "restart",
                "action_class": "modify",
                "targets": [{"ref": ref} for ref in targets],
            }
        ],
    }
    plan.update(overrides)
    return plan


# --- canonical JSON ------------------------------------------------------------------------------


def test_canonical_json_sorts_keys_without_whitespace_in_utf8() -> None:
    """Keys sorted at every level, compact separators, non-ASCII kept as UTF-8 text."""
    value = {"b": 1, "a": {"z": [3, 1], "é": "ü"}, "c": None, "d": True, "e": 1.5}
    assert canonical_json(value) == '{"a":{"z":[3,1],"é":"ü"},"b":1,"c":null,"d":true,"e":1.5}'


def test_canonical_json_sorts_targets_lists_at_any_depth_and_keeps_other_lists() -> None:
    """Every list under a "targets" key is sorted by canonical JSON; other lists keep order."""
    value = {
        "steps": [
            {"targets": [{"ref": "b"}, {"ref": "a", "tags": {"y": "1", "x": "2"}}]},
            {"targets": []},
        ],
        "deep": {"x": {"targets": ["c", "a", "b", "a"]}},
        "order": ["c", "a", "b"],
    }
    assert canonical_json(value) == (
        '{"deep":{"x":{"targets":["a","a","b","c"]}},"order":["c","a","b"],'
        '"steps":[{"targets":[{"ref":"a","tags":{"x":"2","y":"1"}},{"ref":"b"}]},{"targets":[]}]}'
    )


def test_canonical_json_accepts_models_enums_tuples_and_mappings() -> None:
    """A pydantic model is dumped in JSON mode; tuples are lists; any mapping is an object."""
    plan = parse_plan(simple_plan(["b", "a"]))
    assert canonical_json(plan) == canonical_json(to_wire_dict(plan))
    assert canonical_json(MappingProxyType({"k": (ActionClass.READ, 1)})) == '{"k":["read",1]}'


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ({"n": math.nan}, ValueError),
        ([math.inf], ValueError),
        ({1: "a"}, TypeError),
        ({"id": UUID(int=1)}, TypeError),
        ({"s": {1, 2}}, TypeError),
        (b"bytes", TypeError),
    ],
)
def test_canonical_json_refuses_non_json_values(value: Any, error: type[Exception]) -> None:
    """NaN, infinities, non-string keys and non-JSON types fail instead of hashing ambiguously."""
    with pytest.raises(error):
        canonical_json(value)


# --- plan hash -----------------------------------------------------------------------------------


def test_spec_reordered_targets_give_the_same_plan_hash() -> None:
    """Spec §3.1: two logically identical plans with different target order hash the same."""
    first = parse_plan(simple_plan(["server-01", "server-02", "server-03"]))
    second = parse_plan(simple_plan(["server-03", "server-01", "server-02"]))
    assert plan_hash(first) == plan_hash(second)


def test_plan_hash_is_a_stable_known_value() -> None:
    """The canonical form is pinned: changing it would silently break stored keys and approvals."""
    plan = simple_plan(["b", "a"], description="d")
    expected_text = (
        '{"description":"d","name":"restart","runbook_url":null,"sla_class":"fast","steps":[{"action":'
        '"restart","action_class":"modify","id":"restart","params":{},"targets":[{"ref":"a","tags":{}},'
        '{"ref":"b","tags":{}}]}]}'
    )
    assert canonical_json(parse_plan(plan)) == expected_text
    assert plan_hash(plan) == sha256(expected_text)
    assert plan_hash(plan) == "49bcf80524a6f6762028ab2fb0717cbbf07317597cbb87c538c367aec66a4256"


def test_plan_hash_is_the_same_for_model_wire_dict_and_sparse_dict() -> None:
    """A mapping is normalised first: omitted defaults, "" runbook and 3.0 vs 3 hash the same."""
    sparse = simple_plan(["a"])
    sparse["steps"][0]["params"] = {"n": 3}
    explicit = simple_plan(["a"], runbook_url="", description="")
    explicit["steps"][0]["params"] = {"n": 3.0}
    explicit["steps"][0]["targets"][0]["tags"] = {}
    plan = parse_plan(sparse)
    assert (
        plan_hash(plan) == plan_hash(sparse) == plan_hash(explicit) == plan_hash(to_wire_dict(plan))
    )
    assert re.fullmatch("[0-9a-f]{64}", plan_hash(plan))


def test_plan_hash_of_invalid_or_foreign_input_fails() -> None:
    """An invalid mapping raises PlanValidationError; a non-plan object raises TypeError."""
    with pytest.raises(PlanValidationError):
        plan_hash(simple_plan([]))
    with pytest.raises(TypeError):
        plan_hash(["not", "a", "plan"])  # type: ignore[arg-type]


# --- keys ----------------------------------------------------------------------------------------


def test_idempotency_key_is_exactly_the_spec_formula() -> None:
    """idempotency_key = sha256(canonical_json(plan) + tenant_id + actor_id) (spec §3.1)."""
    plan = parse_plan(simple_plan(["b", "a"]))
    expected = sha256(canonical_json(plan) + "tenant-1" + "alice")
    assert idempotency_key(plan, "tenant-1", "alice") == expected
    assert idempotency_key(to_wire_dict(plan), "tenant-1", "alice") == expected


@given(plan=st.deferred(lambda: plans()))
@settings(max_examples=50, deadline=None)
def test_plan_digests_are_plan_hash_idempotency_key_and_canonical_length(
    plan: dict[str, Any],
) -> None:
    """One canonical JSON for all three figures gives what each function gives on its own."""
    model = parse_plan(plan)
    for given_as in (plan, model, to_wire_dict(model)):
        digests = plan_digests(given_as, "tenant-1", "alice")
        assert digests.plan_hash == plan_hash(given_as)
        assert digests.idempotency_key == idempotency_key(given_as, "tenant-1", "alice")
        assert digests.canonical_length == len(canonical_json(to_wire_dict(model)))


def test_step_idempotency_key_joins_execution_and_step() -> None:
    """The step key is "{execution_id}:{step_id}" for a UUID or its string."""
    execution_id = UUID("12345678-1234-5678-1234-567812345678")
    expected = "12345678-1234-5678-1234-567812345678:restart"
    assert step_idempotency_key(execution_id, "restart") == expected
    assert step_idempotency_key(str(execution_id), "restart") == expected


def test_snapshot_hash_is_sha256_of_canonical_json() -> None:
    """The snapshot hash ignores key order and target order but not other content."""
    plan = to_wire_dict(parse_plan(simple_plan(["a", "b"])))
    snapshot = {"plan": plan, "timeout_policy_id": "fast_modify", "approval_level": 1}
    reordered = {
        "approval_level": 1,
        "timeout_policy_id": "fast_modify",
        "plan": to_wire_dict(parse_plan(simple_plan(["b", "a"]))),
    }
    assert snapshot_hash(snapshot) == snapshot_hash(reordered) == sha256(canonical_json(snapshot))
    assert snapshot_hash(snapshot) != snapshot_hash({**snapshot, "approval_level": 2})


# --- properties ----------------------------------------------------------------------------------

# Under coverage tracing on a busy machine, generating plans dominates: 50 examples per property
# keep each test well under 2 s. No deadline: a slow example on a loaded machine is not a bug.
property_test = settings(max_examples=50, deadline=None)

_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8)
_keys = _text.filter(lambda key: key != "$secret")
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER)
    # Whole doubles beyond ±(2^53 - 1) are refused like the integers they are stored as.
    | st.floats(
        allow_nan=False,
        allow_infinity=False,
        min_value=-MAX_SAFE_INTEGER,
        max_value=MAX_SAFE_INTEGER,
    )
    | _text
    | st.sampled_from([{"$secret": "env:DB_PASSWORD"}, {"$secret": "file:token"}])
)
_json = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_keys, children, max_size=3),
    max_leaves=6,
)
_params = st.dictionaries(_keys, _json, max_size=3)
# Cheap building blocks: generation, not hashing, dominates these tests' time (all the more
# under coverage), and the interesting variety is in params, key order and target order.
_ident = st.sampled_from(["noop", "http", "Shell9", "a.b-c_d", "9", "restart", "deploy.v2"])
_refs = [
    f"{kind}:{name}-{i}"
    for kind in ("host", "k8s/ns")
    for name in ("web", "Ünï")
    for i in (1, 2, 3)
]
_tags = st.sampled_from([{}, {"env": "production"}, {"env": "dev", "zone": "eu west", "role": ""}])


@st.composite
def plans(draw: st.DrawFn, min_steps: int = 1, params: bool = True) -> dict[str, Any]:
    """Valid plans in their JSON form (``params=False``: empty params, cheaper to generate)."""
    # Index prefixes make step ids unique by construction (rejection sampling is slow).
    actions = draw(st.lists(_ident, min_size=min_steps, max_size=3))
    steps = []
    for index, action in enumerate(actions):
        refs = draw(st.lists(st.sampled_from(_refs), min_size=1, max_size=4, unique=True))
        steps.append(
            {
                "id": f"{index}-{action}",
                "action": action,
                "action_class": draw(st.sampled_from(["read", "modify", "deploy"])),
                "targets": [{"ref": ref, "tags": draw(_tags)} for ref in refs],
                "params": draw(_params) if params else {},
            }
        )
    plan: dict[str, Any] = {
        "name": draw(st.text("ab XY", min_size=1, max_size=8).filter(str.strip)),
        "sla_class": draw(st.sampled_from(["fast", "medium", "long"])),
        "steps": steps,
    }
    if draw(st.booleans()):
        plan["description"] = draw(st.text("ab \n", max_size=8))
    return plan


def shuffled_keys(value: Any, rnd: random.Random) -> Any:
    """The same JSON value with every object's keys in a random insertion order."""
    if isinstance(value, dict):
        items = list(value.items())
        rnd.shuffle(items)
        return {key: shuffled_keys(item, rnd) for key, item in items}
    if isinstance(value, list):
        return [shuffled_keys(item, rnd) for item in value]
    return value


@property_test
@given(plan=plans(), seed=st.integers(0, 2**32))
def test_target_and_key_order_never_change_the_hash(plan: dict[str, Any], seed: int) -> None:
    """Any permutation of each step's targets and of every object's key order: same plan_hash."""
    rnd = random.Random(seed)
    variant = shuffled_keys(plan, rnd)
    for step in variant["steps"]:
        rnd.shuffle(step["targets"])
    parsed = parse_plan(plan)
    assert plan_hash(variant) == plan_hash(plan) == plan_hash(parsed)
    assert idempotency_key(variant, "t", "a") == idempotency_key(parsed, "t", "a")
    assert canonical_json(variant) == canonical_json(plan)


@property_test
@given(plan=plans(), action=_ident)
def test_changing_an_action_changes_the_key(plan: dict[str, Any], action: str) -> None:
    """Another action name in any one step gives another idempotency key."""
    assume(action != plan["steps"][-1]["action"])
    changed = json.loads(json.dumps(plan))
    changed["steps"][-1]["action"] = action
    assert idempotency_key(changed, "t", "a") != idempotency_key(plan, "t", "a")


@property_test
@given(plan=plans(min_steps=2), seed=st.integers(0, 2**32))
def test_changing_step_order_changes_the_key(plan: dict[str, Any], seed: int) -> None:
    """Step order is semantic: any other order of two or more distinct steps is another key."""
    rnd = random.Random(seed)
    order = list(range(len(plan["steps"])))
    while order == sorted(order):
        rnd.shuffle(order)
    changed = {**plan, "steps": [plan["steps"][i] for i in order]}
    assert idempotency_key(changed, "t", "a") != idempotency_key(plan, "t", "a")


@property_test
@given(plan=plans(), key=_keys, value=_json)
def test_changing_params_changes_the_key(plan: dict[str, Any], key: str, value: Any) -> None:
    """Setting a parameter so that the params mean something else gives another key."""
    changed = json.loads(json.dumps(plan))
    changed["steps"][0]["params"][key] = value
    before, after = parse_plan(plan), parse_plan(changed)
    # 3.0 and 3 are one parameter, and so are reorderings of a "targets" list (module docs).
    assume(canonical_json(before.steps[0].params) != canonical_json(after.steps[0].params))
    assert idempotency_key(after, "t", "a") != idempotency_key(before, "t", "a")


@property_test
@given(
    plan=plans(params=False),
    tenants=st.lists(_text, min_size=2, max_size=2, unique=True),
    actor=_text,
)
def test_changing_the_tenant_changes_the_key(
    plan: dict[str, Any], tenants: list[str], actor: str
) -> None:
    """The same plan and actor in another tenant has another key."""
    assert idempotency_key(plan, tenants[0], actor) != idempotency_key(plan, tenants[1], actor)


@property_test
@given(
    plan=plans(params=False),
    tenant=_text,
    actors=st.lists(_text, min_size=2, max_size=2, unique=True),
)
def test_changing_the_actor_changes_the_key(
    plan: dict[str, Any], tenant: str, actors: list[str]
) -> None:
    """The same plan in the same tenant submitted by another actor has another key."""
    assert idempotency_key(plan, tenant, actors[0]) != idempotency_key(plan, tenant, actors[1])
