"""Identifiers at the edge: the tenant id charset, printable actor ids, audit-safe text, and
the request-wide NUL check."""

from __future__ import annotations

import pytest

from opsconductor.common.errors import InvalidArgumentError
from opsconductor.common.identifiers import audit_text, identity_problem, is_valid_tenant_id
from opsconductor.execution.v1 import admin_service_pb2, execution_service_pb2, types_pb2
from opsconductor.rpc.decoding import (
    UndecodableRequest,
    check_text_fields,
    tolerant_deserializer,
)


@pytest.mark.parametrize("tenant", ["acme", "t-1", "a.b_c-9", "9", "_system", "x" * 100])
def test_tenant_ids_in_the_charset_are_valid(tenant: str) -> None:
    assert is_valid_tenant_id(tenant)


@pytest.mark.parametrize(
    "tenant", ["", "acme:prod", "acme\x00", " acme", "-acme", "a/b", "é", "x" * 101, "a b"]
)
def test_tenant_ids_outside_the_charset_are_invalid(tenant: str) -> None:
    assert not is_valid_tenant_id(tenant)


@pytest.mark.parametrize(
    ("claims", "problem"),
    [
        ({"tenant_id": "a:b", "actor_id": "x", "auth_method": "jwt"}, "tenant_id must be"),
        ({"tenant_id": "a", "actor_id": "x\x00", "auth_method": "jwt"}, "sub must not contain"),
        ({"tenant_id": "a", "actor_id": "x" * 201, "auth_method": "jwt"}, "sub must be at most"),
        ({"tenant_id": "a", "actor_id": " ", "auth_method": "jwt"}, "sub must be a non-empty"),
        ({"tenant_id": "a", "actor_id": "x", "auth_method": "j" * 51}, "auth_method must be"),
    ],
)
def test_identity_problems_name_the_claim(claims: dict[str, str], problem: str) -> None:
    found = identity_problem(**claims)
    assert found is not None
    assert found.startswith(problem)


def test_ordinary_identities_have_no_problem() -> None:
    assert (
        identity_problem(tenant_id="acme", actor_id="ada@example.com", auth_method="oidc") is None
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("acme", "acme"),
        ("acme\x00", "acme\\x00"),
        ("\u202eacme", "\\u202eacme"),
        ("", "(empty)"),
        ("t" * 150, "t" * 99 + "…"),
    ],
)
def test_audit_text_is_always_storable(value: str, expected: str) -> None:
    text = audit_text(value)
    assert text == expected
    assert len(text) <= 100
    assert text.isprintable()


def test_nul_characters_are_found_in_nested_repeated_and_map_fields() -> None:
    flags = admin_service_pb2.UpdateFeatureFlagsRequest()
    flags.flags.enabled_tenants.extend(["ok", "bad\x00"])
    with pytest.raises(InvalidArgumentError, match=r"flags\.enabled_tenants must not"):
        check_text_fields(flags)
    check_text_fields(admin_service_pb2.UpdateFeatureFlagsRequest())
    check_text_fields("not a message")


def test_plans_and_tenant_ids_are_left_to_their_own_validation() -> None:
    """NUL in a plan is parse_plan's (with a path); in tenant_id RBAC's (denied and audited)."""
    request = execution_service_pb2.SubmitExecutionRequest(tenant_id="a\x00")
    request.plan.name = "n\x00"
    request.plan.steps.add(id="s").targets.add(ref="r", tags={"k": "v\x00"})
    check_text_fields(request)


def test_map_fields_outside_plans_are_checked() -> None:
    target = types_pb2.Target(ref="r", tags={"k": "v\x00"})
    with pytest.raises(InvalidArgumentError, match="tags"):
        check_text_fields(target)


def test_the_tolerant_deserializer_names_the_message_type() -> None:
    decode = tolerant_deserializer(execution_service_pb2.GetExecutionRequest.FromString)
    assert decode is not None
    assert decode(b"\x12\x01a").execution_id == "a"
    placeholder = decode(b"\xff")
    assert isinstance(placeholder, UndecodableRequest)
    assert "GetExecutionRequest" in placeholder.error().message
    assert tolerant_deserializer(None) is None
