"""The roles → permissions policy: the packaged defaults, loading, validation, immutability."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from opsconductor.common.auth import Principal
from opsconductor.policy.rbac import (
    URGENT_PRIORITY,
    Authorizer,
    Permission,
    RbacPolicy,
    RbacPolicyError,
    action_permission,
    priority_permissions,
    submit_permissions,
)

P = Permission


@pytest.fixture(scope="module")
def policy() -> RbacPolicy:
    return RbacPolicy.load()


def _doc(**roles: Any) -> dict[str, Any]:
    return {"version": 1, "roles": roles}


# --- the packaged default policy ----------------------------------------------------------


def test_default_policy_defines_the_documented_roles(policy: RbacPolicy) -> None:
    assert policy.roles == {
        "viewer",
        "operator",
        "deployer",
        "approver",
        "responder",
        "admin",
        "service",
    }


def test_viewer_reads_but_changes_nothing(policy: RbacPolicy) -> None:
    grants = policy.grants("viewer")
    assert {P.EXECUTIONS_READ, P.EXECUTIONS_PREVIEW, P.EVENTS_READ, P.APPROVALS_READ} <= grants
    assert not grants & {P.EXECUTIONS_SUBMIT, P.EXECUTIONS_CANCEL, P.APPROVALS_DECIDE}


def test_operator_runs_read_and_modify_plans_but_not_deploys(policy: RbacPolicy) -> None:
    grants = policy.grants("operator")
    assert submit_permissions("read") <= grants
    assert submit_permissions("modify") <= grants
    assert not submit_permissions("deploy") <= grants
    assert P.EXECUTIONS_CANCEL in grants
    assert P.APPROVALS_DECIDE not in grants


def test_deployer_may_submit_deploy_plans(policy: RbacPolicy) -> None:
    assert submit_permissions("deploy") <= policy.grants("deployer")


def test_approver_decides_approvals_but_cannot_submit(policy: RbacPolicy) -> None:
    grants = policy.grants("approver")
    assert P.APPROVALS_DECIDE in grants
    assert P.EXECUTIONS_SUBMIT not in grants


def test_only_responders_and_admins_may_submit_urgent_plans(policy: RbacPolicy) -> None:
    """Priority 0 jumps the tenant's whole line: it needs ``executions:urgent``."""
    urgent = priority_permissions(URGENT_PRIORITY)
    assert urgent == {P.EXECUTIONS_SUBMIT, P.EXECUTIONS_URGENT}
    assert {role for role in policy.roles if urgent <= policy.grants(role)} == {
        "responder",
        "admin",
    }
    assert policy.grants("responder") - policy.grants("operator") == {P.EXECUTIONS_URGENT}
    for priority in (None, 1, 50, 100):
        assert priority_permissions(priority) == {P.EXECUTIONS_SUBMIT}


def test_admin_holds_every_permission(policy: RbacPolicy) -> None:
    assert policy.grants("admin") == frozenset(Permission)


def test_only_admin_may_read_audit_and_operate_the_system(policy: RbacPolicy) -> None:
    admin_only = {P.AUDIT_READ, P.ADMIN_FLAGS, P.ADMIN_DLQ, P.ADMIN_QUEUE}
    for role in policy.roles - {"admin"}:
        assert not policy.grants(role) & admin_only, role


def test_service_role_is_read_only(policy: RbacPolicy) -> None:
    assert policy.grants("service") == {P.EXECUTIONS_READ, P.APPROVALS_READ, P.EVENTS_READ}


def test_every_permission_is_documented_in_the_policy_file() -> None:
    """The header comment of the packaged file lists each permission the code knows."""
    text = resources.files("opsconductor.policy").joinpath("rbac_policy.yaml").read_text()
    header = text.split("version:", 1)[0]
    for permission in Permission:
        assert f"#   {permission.value} " in header, permission


def test_permissions_of_several_roles_are_united(policy: RbacPolicy) -> None:
    united = policy.permissions_for(["viewer", "approver"])
    assert united == policy.grants("viewer") | policy.grants("approver")


def test_unknown_role_grants_nothing(policy: RbacPolicy) -> None:
    assert policy.grants("superuser") == frozenset()
    assert policy.permissions_for(["superuser"]) == frozenset()


# --- action classes ---------------------------------------------------------------------------


@pytest.mark.parametrize("action_class", ["read", "modify", "deploy"])
def test_each_action_class_has_its_permission(action_class: str) -> None:
    assert action_permission(action_class) == f"actions:{action_class}"
    assert submit_permissions(action_class) == {
        P.EXECUTIONS_SUBMIT,
        Permission(f"actions:{action_class}"),
    }


def test_unknown_action_class_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown action class 'destroy'"):
        action_permission("destroy")


# --- loading and validation -------------------------------------------------------------------


def test_policy_is_loaded_from_an_override_path(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        yaml.safe_dump(
            _doc(
                reader={"permissions": ["executions:read"]},
                runner={"inherits": ["reader"], "permissions": ["executions:submit"]},
            )
        )
    )
    loaded = RbacPolicy.load(path)
    assert loaded.roles == {"reader", "runner"}
    assert loaded.grants("runner") == {P.EXECUTIONS_READ, P.EXECUTIONS_SUBMIT}


def test_inheritance_is_transitive() -> None:
    policy = RbacPolicy.from_document(
        _doc(
            a={"permissions": ["events:read"]},
            b={"inherits": ["a"]},
            c={"inherits": ["b"], "permissions": ["audit:read"]},
        )
    )
    assert policy.grants("c") == {P.EVENTS_READ, P.AUDIT_READ}
    assert policy.grants("b") == {P.EVENTS_READ}


def test_unknown_permission_is_an_error_naming_it_and_its_role() -> None:
    with pytest.raises(
        RbacPolicyError, match=r"role 'ops' grants unknown permission 'executions:nuke'"
    ):
        RbacPolicy.from_document(_doc(ops={"permissions": ["executions:read", "executions:nuke"]}))


def test_unknown_permission_in_a_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\nroles:\n  ops:\n    permissions: [admin:everything]\n")
    with pytest.raises(RbacPolicyError, match="admin:everything"):
        RbacPolicy.load(path)


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (["not", "a", "mapping"], "policy must be a mapping"),
        ({"roles": {"a": {}}}, "unsupported policy version None"),
        ({"version": 2, "roles": {"a": {}}}, "unsupported policy version 2"),
        ({"version": 1}, "'roles' must be a non-empty mapping"),
        ({"version": 1, "roles": {}}, "'roles' must be a non-empty mapping"),
        (_doc(a=["executions:read"]), "role 'a' must be a mapping"),
        (_doc(a={"permisions": ["executions:read"]}), r"unknown keys \['permisions'\]"),
        (_doc(a={"permissions": "executions:read"}), "permissions must be a list of strings"),
        (_doc(a={"permissions": [1]}), "permissions must be a list of strings"),
        (_doc(a={"inherits": "b"}), "inherits must be a list of strings"),
        (_doc(a={"inherits": ["ghost"]}), "role 'a' inherits unknown role 'ghost'"),
        (
            _doc(a={"inherits": ["b"]}, b={"inherits": ["c"]}, c={"inherits": ["a"]}),
            "inheritance cycle: a -> b -> c -> a",
        ),
        (_doc(a={"inherits": ["a"]}), "inheritance cycle: a -> a"),
    ],
)
def test_invalid_policy_document_is_refused(document: Any, expected: str) -> None:
    with pytest.raises(RbacPolicyError, match=expected):
        RbacPolicy.from_document(document, "test.yaml")


def test_invalid_role_name_is_refused() -> None:
    with pytest.raises(RbacPolicyError, match="invalid role name"):
        RbacPolicy({"": ["executions:read"]})


def test_unreadable_policy_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RbacPolicyError, match=r"cannot read rbac policy .*nope\.yaml"):
        RbacPolicy.load(missing)


def test_policy_file_that_is_not_yaml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("version: 1\nroles: {viewer: [\n")
    with pytest.raises(RbacPolicyError, match=r"broken\.yaml: not valid YAML"):
        RbacPolicy.load(str(path))


def test_policy_error_is_a_value_error_with_a_reason() -> None:
    assert issubclass(RbacPolicyError, ValueError)
    assert RbacPolicyError.reason == "INVALID_RBAC_POLICY"


# --- immutability -----------------------------------------------------------------------------


def test_policy_cannot_be_changed_after_loading(policy: RbacPolicy) -> None:
    with pytest.raises(AttributeError, match="immutable"):
        policy._grants = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        policy._grants["viewer"] = frozenset(Permission)  # type: ignore[index]
    assert "viewer" in repr(policy)


# --- argument checks of the authorizer (no database is touched) --------------------------------


class _UnusedPool:
    """Stands in for a pool in checks that must fail before any query."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the pool was used: {name}")


def test_authorizer_tier_must_be_known(policy: RbacPolicy) -> None:
    with pytest.raises(ValueError, match="tier must be one of"):
        Authorizer(_UnusedPool(), policy, tier="frontend")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("permissions", "error", "expected"),
    [
        ([], ValueError, "at least one permission"),
        ("executions:read", TypeError, "not one string"),
        (["executions:read", "executions:reed"], ValueError, "'executions:reed'"),
    ],
)
async def test_authorize_refuses_malformed_permission_requests(
    policy: RbacPolicy, permissions: Any, error: type[Exception], expected: str
) -> None:
    """Typos are programming errors: they fail loudly instead of silently denying (or allowing)."""
    authorizer = Authorizer(_UnusedPool(), policy, tier="api")
    with pytest.raises(error, match=expected):
        await authorizer.authorize(Principal("alice", "t"), tenant_id="t", permissions=permissions)


async def test_roles_in_another_tenant_are_never_looked_up(policy: RbacPolicy) -> None:
    authorizer = Authorizer(_UnusedPool(), policy, tier="worker")
    assert await authorizer.roles_for(Principal("alice", "tenant-a"), "tenant-b") == frozenset()
    assert authorizer.policy is policy
