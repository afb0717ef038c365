"""Per-tenant policy for what plans may do: the shell sandbox, `http` egress, quotas.

Operator-owned data (``tenant_policy.yaml``, or the file ``OPSC_TENANT_POLICY_FILE`` names, e.g.
a mounted ConfigMap), never tenant self-service: a tenant cannot widen its own sandbox. The api
checks it at submit and the worker again before a step runs. Layout::

    defaults:            # applies to every tenant
      shell: {...}
      egress: {...}
      quotas: {...}
    tenants:
      acme:              # overrides, merged key by key over the defaults
        shell: {...}

Each section is its own model below; unknown keys are a load error, so a typo never silently
leaves a tenant on the defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from opsconductor.common.errors import InvalidArgumentError

__all__ = [
    "EgressPolicy",
    "QuotaPolicy",
    "ShellPolicy",
    "TenantPolicies",
    "TenantPolicy",
    "TenantPolicyError",
]


class TenantPolicyError(InvalidArgumentError):
    """The tenant policy file is unreadable or invalid."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ShellPolicy(_Section):
    """Whether and how the ``shell`` action may run for a tenant (see docs/security.md)."""


class EgressPolicy(_Section):
    """Where the ``http`` action may connect for a tenant (see docs/security.md)."""


class QuotaPolicy(_Section):
    """Per-tenant limits on queued, running and concurrent immediate work."""


class TenantPolicy(_Section):
    """The effective policy of one tenant."""

    shell: ShellPolicy = ShellPolicy()
    egress: EgressPolicy = EgressPolicy()
    quotas: QuotaPolicy = QuotaPolicy()


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class TenantPolicies:
    """Every tenant's effective policy, from one document."""

    def __init__(self, defaults: TenantPolicy, tenants: Mapping[str, TenantPolicy]) -> None:
        self._defaults = defaults
        self._tenants = dict(tenants)

    @classmethod
    def from_document(cls, doc: object, source: str = "<tenant policy>") -> TenantPolicies:
        """Validate ``doc`` (the parsed YAML); ``TenantPolicyError`` names what is wrong."""
        if doc is None:
            doc = {}
        if not isinstance(doc, Mapping) or set(doc) - {"defaults", "tenants"}:
            raise TenantPolicyError(f"{source}: expected a mapping with 'defaults' and 'tenants'")
        defaults_doc = doc.get("defaults") or {}
        tenants_doc = doc.get("tenants") or {}
        if not isinstance(defaults_doc, Mapping) or not isinstance(tenants_doc, Mapping):
            raise TenantPolicyError(f"{source}: 'defaults' and 'tenants' must be mappings")
        try:
            defaults = TenantPolicy.model_validate(defaults_doc)
            tenants = {}
            for tenant, override in tenants_doc.items():
                if not isinstance(override, Mapping):
                    raise TenantPolicyError(f"{source}: tenants.{tenant} must be a mapping")
                tenants[str(tenant)] = TenantPolicy.model_validate(_merge(defaults_doc, override))
        except ValidationError as exc:
            where = "; ".join(
                ".".join(str(p) for p in err["loc"]) + ": " + err["msg"] for err in exc.errors()
            )
            raise TenantPolicyError(f"{source}: {where}") from None
        return cls(defaults, tenants)

    @classmethod
    def load(cls, path: Path | None = None) -> TenantPolicies:
        """The policy in ``path``, or the packaged default ``tenant_policy.yaml``."""
        if path is None:
            resource = resources.files("opsconductor.common").joinpath("tenant_policy.yaml")
            text, source = resource.read_text("utf-8"), "tenant_policy.yaml (packaged)"
        else:
            try:
                text, source = path.read_text("utf-8"), str(path)
            except OSError as exc:
                raise TenantPolicyError(
                    f"cannot read tenant policy {path}: {exc.strerror}"
                ) from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError:
            raise TenantPolicyError(f"{source}: not valid YAML") from None
        return cls.from_document(doc, source)

    def for_tenant(self, tenant_id: str) -> TenantPolicy:
        """The effective policy of ``tenant_id`` (the defaults when it has no entry)."""
        return self._tenants.get(tenant_id, self._defaults)
