"""No literal credentials in plans: a credential key holds a reference, credential-shaped text
is refused anywhere, and the refusal names the field path without quoting the value."""

from __future__ import annotations

from typing import Any

import pytest

from opsconductor.actions.registry import ActionRegistry
from opsconductor.common.errors import PlanValidationError
from opsconductor.common.plan import parse_plan
from opsconductor.common.secret_patterns import credential_kind
from opsconductor.common.secrets import is_credential_key, literal_credential_violations

REF = {"$secret": "env:API_TOKEN"}
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLWJ5dGVz"


@pytest.mark.parametrize(
    "key",
    [
        "password", "Password", "DB_PASSWORD", "passwd", "db-passphrase", "secret",
        "client_secret", "clientSecret", "token", "access_token", "X-Auth-Token", "Authorization",
        "authorization", "api_key", "apiKey", "X-Api-Key", "APIKEY", "private_key",
        "privateKey", "aws_access_key", "Cookie", "set-cookie", "credentials", "pwd", "jwt",
        "sessionid",
    ],
)  # fmt: skip
def test_credential_keys_are_recognised_whatever_the_case_or_separator(key: str) -> None:
    assert is_credential_key(key)


@pytest.mark.parametrize(
    "key",
    ["url", "method", "headers", "Accept", "Content-Type", "idempotency_key", "page_token",
     "token_type", "key_id", "public_key", "secret_ref", "passage", "pwdir", "monkey"],
)  # fmt: skip
def test_ordinary_keys_are_not_credential_keys(key: str) -> None:
    assert not is_credential_key(key)


def fields(params: Any) -> list[str]:
    return [v.field for v in literal_credential_violations(params)]


def test_literal_authorization_header_is_refused_with_its_path() -> None:
    params = {"url": "https://x.example/", "headers": {"Authorization": "Bearer abcdefghijkl"}}
    [violation] = literal_credential_violations(params, path="steps[0].params")
    assert violation.field == "steps[0].params.headers.Authorization"
    assert "abcdefghijkl" not in violation.description
    assert "secret reference" in violation.description


def test_nested_credentials_at_any_depth_and_in_lists_are_refused() -> None:
    params = {
        "body": {"db": {"auth": {"Password": "hunter2"}}, "items": [{"api-key": 12345}]},
        "tokens": ["literal-one", REF],
    }
    assert fields(params) == [
        "params.body.db.auth.Password",
        "params.body.items[0].api-key",
        "params.tokens[0]",
    ]


def test_references_null_and_booleans_under_credential_keys_pass() -> None:
    params = {
        "headers": {"Authorization": REF, "X-Api-Key": REF},
        "password": None,
        "use_token": True,
        "credentials": {"user": REF, "password": [REF, REF]},
    }
    assert fields(params) == []


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("Bearer abcdefghijklmnop", "a Bearer token"),
        ("token is bearer AbC123xyz.987", "a Bearer token"),
        ("Basic dXNlcjpwYXNzd29yZA==", "Basic credentials"),
        (JWT, "a JSON Web Token"),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow", "a PEM private key"),
        ("AKIAIOSFODNN7EXAMPLE", "an AWS access key id"),
        ("postgresql://app:s3cr3t@db:5432/x", "a password in a URL"),
    ],
)
def test_credential_shaped_values_are_refused_under_any_key(text: str, kind: str) -> None:
    assert credential_kind(text) == kind
    [violation] = literal_credential_violations({"headers": {"X-Note": text}})
    assert violation.field == "params.headers.X-Note"
    assert kind in violation.description
    assert text not in violation.description


@pytest.mark.parametrize(
    "text",
    ["the bearer of bad news", "Basic Authentication", "https://host:8443/path", "short",
     "https://user@host/", "plain text value"],
)  # fmt: skip
def test_ordinary_text_is_not_a_credential(text: str) -> None:
    assert credential_kind(text) is None
    assert fields({"note": text}) == []


def step_plan(action: str, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "p",
        "sla_class": "fast",
        "steps": [
            {
                "id": "s",
                "action": action,
                "action_class": "read",
                "targets": [{"ref": "t"}],
                "params": params,
            }
        ],
    }


def test_the_registry_refuses_a_plan_with_a_literal_authorization_header() -> None:
    """What SubmitExecution and PreviewPlan both call (``check_plan``) refuses it."""
    registry = ActionRegistry.from_entry_points()
    plan = parse_plan(
        step_plan(
            "http", {"url": "https://api.example/", "headers": {"Authorization": "Token abc123"}}
        )
    )
    with pytest.raises(PlanValidationError) as refused:
        registry.check_plan(plan)
    assert [v.field for v in refused.value.violations] == ["steps[0].params.headers.Authorization"]
    ok = parse_plan(
        step_plan("http", {"url": "https://api.example/", "headers": {"Authorization": REF}})
    )
    registry.check_plan(ok)
