"""The tenant policy document: defaults, per-tenant overrides, strict validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from opsconductor.common.tenant_policy import TenantPolicies, TenantPolicy, TenantPolicyError


def test_packaged_default_loads_and_applies_to_any_tenant() -> None:
    policies = TenantPolicies.load()
    assert policies.for_tenant("anyone") == TenantPolicy()


def test_unknown_keys_are_refused_with_their_path() -> None:
    with pytest.raises(TenantPolicyError, match=r"shell\.nope"):
        TenantPolicies.from_document({"defaults": {"shell": {"nope": True}}})
    with pytest.raises(TenantPolicyError, match="expected a mapping"):
        TenantPolicies.from_document({"tenant": {}})
    with pytest.raises(TenantPolicyError, match="must be a mapping"):
        TenantPolicies.from_document({"tenants": {"acme": 3}})
    with pytest.raises(TenantPolicyError, match="must be mappings"):
        TenantPolicies.from_document({"tenants": ["acme"]})


def test_file_errors_name_the_file_not_its_content(tmp_path: Path) -> None:
    with pytest.raises(TenantPolicyError, match="cannot read tenant policy"):
        TenantPolicies.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: [unclosed\n")
    with pytest.raises(TenantPolicyError, match="not valid YAML"):
        TenantPolicies.load(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert TenantPolicies.load(empty).for_tenant("x") == TenantPolicy()
