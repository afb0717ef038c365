"""The secret catalogue: where each tenant's secrets may go, tenant namespaces, load errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from opsconductor.actions.registry import ActionRegistry
from opsconductor.common.plan import SecretRef, parse_plan
from opsconductor.common.secret_catalogue import (
    SecretCatalogue,
    SecretCatalogueError,
    SecretGrant,
    env_namespace,
    normalise_url,
)
from opsconductor.policy.enforcement import plan_secret_use_violations, step_secret_use

TOKEN = SecretRef("env", "API_TOKEN")


@pytest.mark.parametrize(
    ("tenant", "namespace"),
    [
        ("acme", "ACME"),
        ("Acme", "ACME"),
        ("team-a.prod", "TEAM_A_PROD"),
        ("_system", "_SYSTEM"),
        ("t-1a2b", "T_1A2B"),
        ("a--b", None),  # would be A__B: "__" separates namespace and name
        ("a_", None),  # trailing "_" would make A___X ambiguous
        ("a-", None),
        ("bad:tenant", None),
        ("", None),
    ],
)
def test_env_namespaces(tenant: str, namespace: str | None) -> None:
    assert env_namespace(tenant) == namespace


def test_tenants_sharing_a_namespace_are_refused_at_load() -> None:
    with pytest.raises(SecretCatalogueError, match="shares the environment namespace TEAM_A"):
        SecretCatalogue.from_document({"tenants": {"team-a": {}, "team.a": {}}})
    with pytest.raises(SecretCatalogueError, match="ACME"):
        SecretCatalogue.from_document({"tenants": {"acme": {}, "ACME": {}}})


GRANT = SecretGrant(
    http=(
        "api.example.com",
        "https://vault.example.com/v1/secret/",
        "http://legacy.example:8080/x",
    ),
    shell=("/usr/bin/psql",),
    actions=("probe",),
)


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://api.example.com/anything?x=1", True),
        ("http://API.Example.com.:81/", True),  # a host entry: any scheme, port, path
        ("https://api.example.com.evil.net/", False),
        ("https://evil.net/?h=api.example.com", False),
        ("https://vault.example.com/v1/secret/db", True),
        ("https://vault.example.com:443/v1/secret/", True),
        ("https://vault.example.com/v1/secret", False),  # the prefix ends with "/"
        ("https://vault.example.com/v1/secretive", False),
        ("https://vault.example.com/v1/secret/../../admin", False),
        ("https://vault.example.com/v1/secret/%2e%2e/admin", False),
        ("https://vault.example.com/v1/secret/a%2Fb", False),
        ("http://vault.example.com/v1/secret/db", False),  # scheme is part of a prefix
        ("https://vault.example.com:8443/v1/secret/db", False),  # and so is the port
        ("http://legacy.example:8080/x", True),
        ("http://legacy.example:8080/x/y", True),
        ("http://legacy.example:8080/xy", False),
        ("ftp://api.example.com/", False),
        ("not a url", False),
        ("https://[::1", False),
    ],
)
def test_http_destinations(url: str, allowed: bool) -> None:
    assert GRANT.allows("http", url) is allowed


def test_shell_and_other_actions() -> None:
    assert GRANT.allows("shell", "/usr/bin/psql")
    assert not GRANT.allows("shell", "/usr/bin/psql2")
    assert not GRANT.allows("shell", None)
    assert not GRANT.allows("http", None)
    assert GRANT.allows("probe", None)
    assert not GRANT.allows("noop", None)


def test_normalise_url() -> None:
    assert normalise_url("HTTPS://Host.Example./a/./b/../c/") == (
        "https",
        "host.example",
        443,
        "/a/c/",
    )
    assert normalise_url("http://h//x") == ("http", "h", 80, "/x")
    assert normalise_url("http://h:99999/") is None


@pytest.mark.parametrize(
    ("grant", "problem"),
    [
        ({"http": ["https://x.example/?q=1"]}, "without a query"),
        ({"http": ["ftp://x.example/"]}, "URL prefix"),
        ({"http": ["not a host!"]}, "not a host name"),
        ({"shell": ["psql"]}, "absolute path"),
        ({"shell": ["/usr/bin/../bin/psql"]}, "absolute path"),
        ({"actions": ["http"]}, "own destination list"),
        ({"hosts": ["x"]}, "Extra inputs"),
    ],
)
def test_invalid_grants_are_load_errors_naming_the_secret(
    grant: dict[str, Any], problem: str
) -> None:
    with pytest.raises(SecretCatalogueError, match=problem) as info:
        SecretCatalogue.from_document({"tenants": {"acme": {"env:API_TOKEN": grant}}})
    assert "tenants.acme.env:API_TOKEN" in str(info.value)


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ([], "expected a mapping"),
        ({"tenants": {}, "defaults": {}}, "expected a mapping"),
        ({"tenants": ["acme"]}, "must be a mapping"),
        ({"tenants": {"bad:tenant": {}}}, "not a valid tenant id"),
        ({"tenants": {"acme": ["env:X"]}}, "must map secret references"),
        ({"tenants": {"acme": {"vault:x": {}}}}, "provider one of"),
        ({"tenants": {"acme": {"env:bad-name": {}}}}, "invalid secret name"),
    ],
)
def test_invalid_documents(doc: object, problem: str) -> None:
    with pytest.raises(SecretCatalogueError, match=problem):
        SecretCatalogue.from_document(doc)


def test_load_from_a_file_and_the_empty_defaults(tmp_path: Path) -> None:
    path = tmp_path / "catalogue.yaml"
    path.write_text('tenants:\n  acme:\n    "env:API_TOKEN": {http: [api.example.com]}\n  quiet:\n')
    loaded = SecretCatalogue.load(path)
    assert loaded.tenants == frozenset({"acme", "quiet"})
    assert loaded.allows("acme", TOKEN, "http", "https://api.example.com/")
    assert not loaded.allows("quiet", TOKEN, "http", "https://api.example.com/")
    assert not loaded.allows("other", TOKEN, "http", "https://api.example.com/")
    assert SecretCatalogue.load(None).tenants == frozenset()
    assert SecretCatalogue.from_document(None).tenants == frozenset()
    with pytest.raises(SecretCatalogueError, match="cannot read"):
        SecretCatalogue.load(tmp_path / "missing.yaml")
    path.write_text("tenants: [unclosed")
    with pytest.raises(SecretCatalogueError, match="not valid YAML"):
        SecretCatalogue.load(path)


def _plan(*steps: dict[str, Any]) -> Any:
    return parse_plan({"name": "p", "sla_class": "fast", "steps": list(steps)})


def http_step(url: str, ref: str = "env:API_TOKEN") -> dict[str, Any]:
    return {
        "id": f"s{abs(hash(url)) % 1000}",
        "action": "http",
        "action_class": "read",
        "targets": [{"ref": "api"}],
        "params": {"url": url, "headers": {"Authorization": {"$secret": ref}}},
    }


def test_plan_secret_use_violations_name_the_field_and_read_the_same_for_every_cause() -> None:
    registry = ActionRegistry.from_entry_points()
    cat = SecretCatalogue.from_document(
        {"tenants": {"acme": {"env:API_TOKEN": {"http": ["api.example.com"]}}}}
    )
    plan = _plan(
        http_step("https://api.example.com/ok"),
        http_step("https://attacker.example/steal"),
        http_step("https://api.example.com/other", ref="env:NOT_CATALOGUED"),
    )
    violations = plan_secret_use_violations(registry, plan, cat, "acme")
    assert [v.field for v in violations] == [
        "steps[1].params.headers.Authorization",
        "steps[2].params.headers.Authorization",
    ]
    first, second = (v.description for v in violations)
    assert first.replace("API_TOKEN", "N") == second.replace("NOT_CATALOGUED", "N")
    assert "attacker" not in first
    assert plan_secret_use_violations(registry, plan, cat, "other-tenant")[0].field == (
        "steps[0].params.headers.Authorization"
    )


def test_step_secret_use_asks_the_handler_for_the_destination() -> None:
    registry = ActionRegistry.from_entry_points()
    plan = _plan(
        http_step("https://api.example.com/ok"),
        {
            "id": "sh",
            "action": "shell",
            "action_class": "modify",
            "targets": [{"ref": "h"}],
            "params": {"argv": ["/usr/bin/psql", "-c", "select 1"]},
        },
        {"id": "n", "action": "noop", "action_class": "read", "targets": [{"ref": "h"}]},
    )
    uses = [step_secret_use(registry, step, "acme") for step in plan.steps]
    assert [(u.action, u.destination) for u in uses] == [
        ("http", "https://api.example.com/ok"),
        ("shell", "/usr/bin/psql"),
        ("noop", None),
    ]


def test_a_broken_destination_hook_refuses_rather_than_crashes() -> None:
    class Broken:
        name = "broken"

        def secret_destination(self, params: object) -> str:
            raise RuntimeError("plugin bug")

    class Lookup:
        def get(self, name: str) -> Any:
            return Broken()

    plan = _plan({"id": "b", "action": "noop", "action_class": "read", "targets": [{"ref": "h"}]})
    assert step_secret_use(Lookup(), plan.steps[0], "acme").destination is None
