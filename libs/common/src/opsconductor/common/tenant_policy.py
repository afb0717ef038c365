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

import ipaddress
import os.path
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from opsconductor.common.errors import (
    FieldViolation,
    InvalidArgumentError,
    TenantPolicyDeniedError,
)
from opsconductor.common.settings import ENV_PREFIX, ServiceSettings

__all__ = [
    "EgressPolicy",
    "QuotaPolicy",
    "ShellPolicy",
    "TenantPolicies",
    "TenantPolicy",
    "TenantPolicyDeniedError",
    "TenantPolicyError",
    "is_interpreter",
    "is_worker_variable",
]


class TenantPolicyError(InvalidArgumentError):
    """The tenant policy file is unreadable or invalid."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# Programs that run code or other programs given as arguments: allowing one of them allows
# anything, so they need ``allow_interpreters``. Matched on the basename of the path and of
# what it resolves to (``/bin/sh`` -> ``dash``). Not exhaustive (``find -exec``, ``tar
# --to-command``...): the sandbox, not this list, is the boundary (docs/security.md).
_INTERPRETER = re.compile(
    r"(?:sh|ash|dash|bash|rbash|zsh|ksh|ksh93|mksh|pdksh|csh|tcsh|fish|yash|posh|ssh|busybox|toybox|python[0-9.]*|pypy[0-9.]*|perl[0-9.]*|ruby[0-9.]*|irb|"
    r"node(?:js)?|deno|bun|php[0-9.]*|lua(?:jit)?[0-9.]*|tclsh[0-9.]*|wish[0-9.]*|expect|"
    r"[gmn]?awk|sed|ed|ex|vim?|nvim|emacs|env|xargs|nice|nohup|timeout|setsid|stdbuf|chroot|"
    r"sudo|su|doas|runuser|setpriv|prlimit|unshare|nsenter|bwrap|flock|watch|script|strace|"
    r"ltrace|gdb|make|run-parts|systemd-run|ionice|taskset|chrt|time|osascript|java|erl|"
    r"guile|scheme|racket|R|Rscript|julia|pwsh|powershell)"
)
# The worker's own configuration and credentials: never passed to a step.
_WORKER_VARIABLES = frozenset(
    name
    for field in ServiceSettings.model_fields.values()
    if isinstance(field.validation_alias, AliasChoices)
    for name in field.validation_alias.choices
    if isinstance(name, str)
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_MIB = 1024 * 1024


def is_interpreter(path: str) -> bool:
    """Whether ``path`` (or what it resolves to) is a shell, an interpreter or a launcher."""
    names = {os.path.basename(path), os.path.basename(os.path.realpath(path))}
    return any(_INTERPRETER.fullmatch(name) for name in names)


def is_worker_variable(name: str) -> bool:
    """Whether ``name`` is one of the worker's settings (``OPSC_*``, ``DATABASE_URL``...)."""
    upper = name.upper()
    return upper.startswith(ENV_PREFIX) or upper in _WORKER_VARIABLES


class ShellPolicy(_Section):
    """Whether and how the ``shell`` action may run for a tenant (see docs/security.md).

    Off by default. ``executables`` are the absolute paths a step may run (``argv[0]``, exact
    match); a shell, interpreter or launcher (`is_interpreter`) among them needs
    ``allow_interpreters``. ``env_allow`` names the worker variables a step may pass through
    (never the worker's own settings). ``network``: the step shares the host's network
    (loopback included) instead of an empty network namespace. The limits apply to the
    step's whole sandbox: CPU seconds, address space, processes, file size, open files.
    """

    enabled: bool = False
    executables: tuple[str, ...] = ()
    allow_interpreters: bool = False
    env_allow: tuple[str, ...] = ()
    network: bool = False
    cpu_s: int = Field(default=10, ge=1, le=3600)
    memory_mb: int = Field(default=512, ge=16, le=65536)
    max_processes: int = Field(default=32, ge=1, le=4096)
    max_file_mb: int = Field(default=16, ge=1, le=65536)
    max_open_files: int = Field(default=256, ge=16, le=65536)

    @model_validator(mode="after")
    def _coherent(self) -> ShellPolicy:
        for path in self.executables:
            if not path.startswith("/") or os.path.normpath(path) != path or "\x00" in path:
                raise ValueError(f"executables: {path!r} is not a normalised absolute path")
            if is_interpreter(path) and not self.allow_interpreters:
                raise ValueError(
                    f"executables: {path!r} is a shell or interpreter; set allow_interpreters"
                )
        for name in self.env_allow:
            if not _ENV_NAME.fullmatch(name) or is_worker_variable(name):
                raise ValueError(f"env_allow: {name!r} is not a variable steps may receive")
        return self

    @property
    def memory_bytes(self) -> int:
        return self.memory_mb * _MIB

    @property
    def max_file_bytes(self) -> int:
        return self.max_file_mb * _MIB

    def step_violations(
        self, argv0: object, env_allow: Sequence[object], *, path: str = "params"
    ) -> list[FieldViolation]:
        """Why a ``shell`` step running ``argv0`` and passing ``env_allow`` is refused.

        Descriptions name the policy setting involved, never the submitted value.
        """
        if not self.enabled:
            return [
                FieldViolation(
                    path, "the shell action is disabled for this tenant (policy shell.enabled)"
                )
            ]
        found: list[FieldViolation] = []
        if isinstance(argv0, str) and argv0:
            where = f"{path}.argv[0]"
            if argv0 not in self.executables:
                found.append(
                    FieldViolation(
                        where,
                        "must be an absolute path allow-listed for this tenant "
                        "(policy shell.executables)",
                    )
                )
            elif is_interpreter(argv0) and not self.allow_interpreters:
                found.append(
                    FieldViolation(
                        where,
                        "resolves to a shell or interpreter, which this tenant may not run "
                        "(policy shell.allow_interpreters)",
                    )
                )
        allowed = set(self.env_allow)
        for index, name in enumerate(env_allow):
            if name not in allowed:
                found.append(
                    FieldViolation(
                        f"{path}.env_allow[{index}]",
                        "not a variable this tenant may pass through (policy shell.env_allow)",
                    )
                )
        return found


class EgressPolicy(_Section):
    """Where the ``http`` action may connect for a tenant (see docs/security.md, `egress`).

    Public addresses are always allowed; ``allow_networks`` (CIDRs, e.g. ``10.20.0.0/16``,
    ``127.0.0.1/32``) adds non-public ones — loopback, private, link-local... — that steps of
    this tenant may reach. The service's own ports stay refused on them regardless.
    """

    allow_networks: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _networks(self) -> EgressPolicy:
        for cidr in self.allow_networks:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"allow_networks: {cidr!r} is not a network (CIDR)") from None
        return self

    @property
    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """``allow_networks`` parsed."""
        return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in self.allow_networks)


class QuotaPolicy(_Section):
    """Per-tenant limits on queued, running and concurrent immediate work (docs/security.md,
    "Fair share and quotas"); ``opsconductor.policy.quotas`` applies them.

    ``max_queued``: background jobs waiting (ready or in retry backoff) — a submit beyond it is
    refused. ``max_running``: background jobs leased at once — the queue passes the tenant over
    until one ends. ``max_immediate``: immediate executions in flight — a submit beyond it is
    refused. Unset: the service's default (settings ``quota_max_*``); 0: no limit.
    """

    max_queued: int | None = Field(default=None, ge=0, le=1_000_000)
    max_running: int | None = Field(default=None, ge=0, le=100_000)
    max_immediate: int | None = Field(default=None, ge=0, le=100_000)


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

    @property
    def defaults(self) -> TenantPolicy:
        """The policy of every tenant without an entry of its own."""
        return self._defaults

    @property
    def tenants(self) -> Mapping[str, TenantPolicy]:
        """The tenants with an entry, each with its effective (merged) policy."""
        return dict(self._tenants)

    def for_tenant(self, tenant_id: str) -> TenantPolicy:
        """The effective policy of ``tenant_id`` (the defaults when it has no entry)."""
        return self._tenants.get(tenant_id, self._defaults)
