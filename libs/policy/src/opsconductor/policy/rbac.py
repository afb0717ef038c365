"""Authorization: roles → permissions (policy file) and per-tenant role bindings (Postgres).

Both tiers use one :class:`Authorizer`: the api before it accepts a request, the worker (and the
approvals service) again before it acts, so a forged or replayed request that slips past the api
is still refused. A check runs in this order:

1. tenant isolation — the principal's tenant must be the tenant asked for (``TENANT_MISMATCH``);
2. the principal's roles *in that tenant*, read from ``role_bindings`` (never from the token);
3. every requested permission must be granted by one of those roles
   (``NO_ROLE_BINDING`` when there is no role at all, else ``MISSING_PERMISSION``).

Every denial raises :class:`PermissionDeniedError` and is recorded three ways: an
``rbac_violation`` event filed under the *targeted* tenant (its own transaction, so it survives
the caller's rollback), the counter ``opsc_rbac_violations_total{tier,reason}`` and a warning log
line ``rbac_violation``. A targeted tenant id no column can hold (a NUL byte, 300 characters) is
filed under its escaped, shortened form (:func:`~opsconductor.common.identifiers.audit_text`),
and each principal's rows are rate-limited, repeats aggregated
(:mod:`~opsconductor.policy.denial_audit`). Denial messages never name the tenant that was
targeted: in the worker and approvals tiers that is the tenant owning a foreign id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from enum import StrEnum
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, NoReturn, get_args
from uuid import UUID

import asyncpg
import structlog
import yaml
from prometheus_client import Counter

from opsconductor.common.auth import Principal
from opsconductor.common.errors import OpsConductorError, PermissionDeniedError, StorageError
from opsconductor.common.identifiers import audit_text
from opsconductor.lifecycle.storage.audit import record_rbac_violation
from opsconductor.lifecycle.storage.role_bindings import load_roles
from opsconductor.lifecycle.storage.role_cache import RoleCache
from opsconductor.policy.denial_audit import DenialAuditLimiter, DenialRecord

__all__ = [
    "RBAC_VIOLATIONS",
    "URGENT_PRIORITY",
    "Authorizer",
    "DenialReason",
    "Permission",
    "RbacPolicy",
    "RbacPolicyError",
    "Tier",
    "action_permission",
    "one_request",
    "priority_permissions",
    "submit_permissions",
]

log = structlog.get_logger(__name__)

Tier = Literal["api", "worker", "approvals", "progress"]
_TIERS: Final = frozenset(get_args(Tier))


class Permission(StrEnum):
    """Every permission the services check. The policy file may grant only these."""

    #: Submit a plan; also needs the ``actions:<class>`` permission of the plan's action class.
    EXECUTIONS_SUBMIT = "executions:submit"
    #: Get and list the tenant's executions.
    EXECUTIONS_READ = "executions:read"
    #: Cancel one of the tenant's executions.
    EXECUTIONS_CANCEL = "executions:cancel"
    #: Preview a plan (mode, approval level, timeouts, hash) without running it.
    EXECUTIONS_PREVIEW = "executions:preview"
    #: Submit at priority 0 (urgent): ahead of every other job of the tenant in the queue.
    EXECUTIONS_URGENT = "executions:urgent"
    #: See pending approvals and the plans they cover.
    APPROVALS_READ = "approvals:read"
    #: Approve or reject (self-approval is refused separately).
    APPROVALS_DECIDE = "approvals:decide"
    #: Stream or list execution events.
    EVENTS_READ = "events:read"
    #: Query the audit trail, including ``rbac_violation`` events.
    AUDIT_READ = "audit:read"
    #: Change feature flags (rollout stage, record-only tenants, approval levels).
    ADMIN_FLAGS = "admin:flags"
    #: Inspect and requeue dead-lettered executions.
    ADMIN_DLQ = "admin:dlq"
    #: Pause or resume dispatch and inspect the queue.
    ADMIN_QUEUE = "admin:queue"
    #: Run plans whose action class is ``read``.
    ACTIONS_READ = "actions:read"
    #: Run plans whose action class is ``modify``.
    ACTIONS_MODIFY = "actions:modify"
    #: Run plans whose action class is ``deploy``.
    ACTIONS_DEPLOY = "actions:deploy"


class DenialReason(StrEnum):
    """Why a check failed (label of the violations counter, ``reason`` of the event)."""

    TENANT_MISMATCH = "TENANT_MISMATCH"
    NO_ROLE_BINDING = "NO_ROLE_BINDING"
    MISSING_PERMISSION = "MISSING_PERMISSION"
    #: The request acts on an execution submitted by someone else (worker tier: a token
    #: replayed or forged to run another actor's execution).
    ACTOR_MISMATCH = "ACTOR_MISMATCH"
    #: The tenant's policy (``tenant_policy.yaml``) forbids what the plan asks for.
    TENANT_POLICY = "TENANT_POLICY"
    #: A step would use a secret the tenant's secret catalogue does not allow for it there.
    SECRET_USE_DENIED = "SECRET_USE_DENIED"  # noqa: S105 - a reason name


RBAC_VIOLATIONS: Final = Counter(
    "opsc_rbac_violations_total",
    "Requests refused by RBAC, by the tier that refused them and why.",
    ("tier", "reason"),
)


class RbacPolicyError(OpsConductorError, ValueError):
    """The RBAC policy is invalid."""

    reason = "INVALID_RBAC_POLICY"


def action_permission(action_class: str) -> Permission:
    """The permission needed to run a plan of ``action_class`` (read, modify or deploy)."""
    try:
        return Permission(f"actions:{action_class}")
    except ValueError:
        raise ValueError(f"unknown action class {action_class!r}") from None


#: The priority that needs ``executions:urgent`` (docs/security.md, "Fair share and quotas").
URGENT_PRIORITY: Final = 0


def priority_permissions(priority: int | None) -> frozenset[Permission]:
    """Permissions needed to submit at ``priority`` (None: the default), beside the plan's."""
    if priority == URGENT_PRIORITY:
        return frozenset({Permission.EXECUTIONS_SUBMIT, Permission.EXECUTIONS_URGENT})
    return frozenset({Permission.EXECUTIONS_SUBMIT})


def submit_permissions(action_class: str) -> frozenset[Permission]:
    """Permissions needed to submit a plan whose (highest) action class is ``action_class``."""
    return frozenset({Permission.EXECUTIONS_SUBMIT, action_permission(action_class)})


_ROLE_KEYS: Final = frozenset({"description", "permissions", "inherits"})
_POLICY_VERSION: Final = 1


def _str_list(value: object, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise RbacPolicyError(f"{where} must be a list of strings")
    return value


class RbacPolicy:
    """An immutable, validated mapping of role name → granted permissions."""

    __slots__ = ("_grants",)
    _grants: Mapping[str, frozenset[Permission]]

    def __init__(self, grants: Mapping[str, Iterable[str]]) -> None:
        """Build a policy from role → permission names; an unknown permission is an error."""
        resolved: dict[str, frozenset[Permission]] = {}
        for role, names in grants.items():
            if not isinstance(role, str) or not role:
                raise RbacPolicyError(f"invalid role name {role!r}")
            perms = set()
            for name in names:
                try:
                    perms.add(Permission(name))
                except ValueError:
                    raise RbacPolicyError(
                        f"role {role!r} grants unknown permission {name!r}"
                    ) from None
            resolved[role] = frozenset(perms)
        object.__setattr__(self, "_grants", MappingProxyType(resolved))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("RbacPolicy is immutable")

    def __repr__(self) -> str:
        return f"RbacPolicy(roles={sorted(self._grants)!r})"

    @classmethod
    def from_document(cls, document: object, source: str = "<policy>") -> RbacPolicy:
        """Build a policy from the parsed YAML document (``version``, ``roles`` with inherits)."""
        if not isinstance(document, Mapping):
            raise RbacPolicyError(f"{source}: policy must be a mapping")
        if document.get("version") != _POLICY_VERSION:
            raise RbacPolicyError(
                f"{source}: unsupported policy version {document.get('version')!r}"
            )
        roles = document.get("roles")
        if not isinstance(roles, Mapping) or not roles:
            raise RbacPolicyError(f"{source}: 'roles' must be a non-empty mapping")
        direct: dict[str, list[str]] = {}
        parents: dict[str, list[str]] = {}
        for role, spec in roles.items():
            if not isinstance(spec, Mapping):
                raise RbacPolicyError(f"{source}: role {role!r} must be a mapping")
            unknown = set(spec) - _ROLE_KEYS
            if unknown:
                raise RbacPolicyError(f"{source}: role {role!r} has unknown keys {sorted(unknown)}")
            direct[role] = _str_list(
                spec.get("permissions"), f"{source}: role {role!r} permissions"
            )
            parents[role] = _str_list(spec.get("inherits"), f"{source}: role {role!r} inherits")
        for role, names in parents.items():
            for parent in names:
                if parent not in direct:
                    raise RbacPolicyError(
                        f"{source}: role {role!r} inherits unknown role {parent!r}"
                    )
        return cls({role: _resolve(role, direct, parents, ()) for role in direct})

    @classmethod
    def load(cls, path: Path | str | None = None) -> RbacPolicy:
        """Load the policy file at ``path``, or the packaged default ``rbac_policy.yaml``."""
        try:
            if path is None:
                source = "rbac_policy.yaml (packaged)"
                text = (
                    resources.files("opsconductor.policy")
                    .joinpath("rbac_policy.yaml")
                    .read_text("utf-8")
                )
            else:
                source = str(path)
                text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise RbacPolicyError(f"cannot read rbac policy {path}: {exc.strerror}") from exc
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RbacPolicyError(f"{source}: not valid YAML") from exc
        return cls.from_document(document, source)

    @property
    def roles(self) -> frozenset[str]:
        """The names of all roles the policy defines."""
        return frozenset(self._grants)

    def grants(self, role: str) -> frozenset[Permission]:
        """Permissions of ``role`` (empty for a role the policy does not define)."""
        return self._grants.get(role, frozenset())

    def permissions_for(self, roles: Iterable[str]) -> frozenset[Permission]:
        """The union of the permissions of ``roles``; unknown roles grant nothing."""
        granted: set[Permission] = set()
        for role in roles:
            granted |= self.grants(role)
        return frozenset(granted)


def _resolve(
    role: str,
    direct: Mapping[str, list[str]],
    parents: Mapping[str, list[str]],
    chain: tuple[str, ...],
) -> set[str]:
    if role in chain:
        cycle = " -> ".join((*chain, role))
        raise RbacPolicyError(f"role inheritance cycle: {cycle}")
    names = set(direct[role])
    for parent in parents[role]:
        names |= _resolve(parent, direct, parents, (*chain, role))
    return names


#: How much of a targeted tenant id the payload keeps (the filing column keeps 100).
_MAX_AUDITED_TENANT: Final = 300

#: Roles read during the current request, by (authorizer, tenant, actor): see :func:`one_request`.
_REQUEST_ROLES: ContextVar[dict[tuple[int, str, str], frozenset[str]] | None] = ContextVar(
    "opsc_request_roles", default=None
)


@contextmanager
def one_request() -> Iterator[None]:
    """Within this block (one request), each tier reads a principal's roles once.

    A request that checks several permissions of one principal (tenant access, then the plan's
    action class; the worker's submitter and permission checks) would otherwise read the same
    ``role_bindings`` rows each time, a few milliseconds apart. The memo lives in a context
    variable: it ends with the block and is never shared between requests, so a revoked binding
    is seen by the very next request.
    """
    token = _REQUEST_ROLES.set({})
    try:
        yield
    finally:
        _REQUEST_ROLES.reset(token)


# Strong references to in-flight violation writes: a shielded task whose caller was cancelled
# must not be garbage-collected before it has written the audit record.
_PENDING_RECORDS: set[asyncio.Task[None]] = set()


class Authorizer:
    """Check a principal's permissions in a tenant and audit every refusal.

    ``tier`` ("api", "worker" or "approvals") labels the metric, the log line and the event, so
    the SOC can tell a refusal at the front door from one caught by the second line of defence.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        policy: RbacPolicy,
        *,
        tier: Tier,
        denial_audit: DenialAuditLimiter | None = None,
        role_cache: RoleCache | None = None,
    ) -> None:
        """``role_cache``: roles read through it (kept under a second, dropped on any change
        of ``role_bindings``); without it every request reads them from Postgres."""
        if tier not in _TIERS:
            raise ValueError(f"tier must be one of {sorted(_TIERS)}, not {tier!r}")
        self._pool = pool
        self._policy = policy
        self._tier: Tier = tier
        self._role_cache = role_cache
        self._audit = denial_audit or DenialAuditLimiter(self._write_record)
        # Every series of this tier at 0: the first denial must show as an increase.
        for reason in DenialReason:
            RBAC_VIOLATIONS.labels(tier=tier, reason=reason.value)

    async def flush_audit(self) -> None:
        """Write the pending aggregated denial rows (call at shutdown)."""
        await self._audit.flush()

    @property
    def policy(self) -> RbacPolicy:
        """The role → permission policy in force."""
        return self._policy

    async def roles_for(self, principal: Principal, tenant_id: str) -> frozenset[str]:
        """Roles ``principal`` holds in ``tenant_id``, read from Postgres.

        Empty when ``tenant_id`` is not the principal's own tenant: a token for one tenant gives
        no standing in another, whatever bindings exist there.
        """
        if principal.tenant_id != tenant_id:
            return frozenset()
        memo = _REQUEST_ROLES.get()
        key = (id(self), tenant_id, principal.actor_id)
        if memo is not None and key in memo:
            return memo[key]
        if self._role_cache is not None:
            roles = await self._role_cache.roles(self._pool, tenant_id, principal.actor_id)
        else:
            roles = await load_roles(self._pool, tenant_id, principal.actor_id)
        if memo is not None:
            memo[key] = roles
        return roles

    async def authorize(
        self,
        principal: Principal,
        *,
        tenant_id: str,
        permissions: Collection[str],
        execution_id: UUID | None = None,
        resource: str = "",
    ) -> None:
        """Return if ``principal`` may act in ``tenant_id`` with all ``permissions``; else deny.

        ``execution_id`` and ``resource`` (e.g. ``"ExecutionService/SubmitExecution"``) only
        describe the attempt in the audit record. Raises :class:`PermissionDeniedError` on a
        denial (after recording it), :class:`StorageError` if the roles cannot be read, and
        ``ValueError`` for an empty or unknown permission (a programming error).
        """
        requested = _requested(permissions)
        if principal.tenant_id != tenant_id:
            await self._deny(
                principal,
                tenant_id,
                requested,
                missing=requested,
                reason=DenialReason.TENANT_MISMATCH,
                roles=frozenset(),
                execution_id=execution_id,
                resource=resource,
            )
        roles = await self.roles_for(principal, tenant_id)
        unknown = roles - self._policy.roles
        if unknown:
            log.warning(
                "rbac_unknown_role",
                tenant_id=tenant_id,
                actor_id=principal.actor_id,
                roles=sorted(unknown),
            )
        missing = requested - self._policy.permissions_for(roles)
        if missing:
            reason = DenialReason.MISSING_PERMISSION if roles else DenialReason.NO_ROLE_BINDING
            await self._deny(
                principal,
                tenant_id,
                requested,
                missing=missing,
                reason=reason,
                roles=roles,
                execution_id=execution_id,
                resource=resource,
            )

    async def require_actor(
        self,
        principal: Principal,
        *,
        tenant_id: str,
        owner_actor_id: str,
        permissions: Collection[str],
        execution_id: UUID | None = None,
        resource: str = "",
    ) -> None:
        """Deny (and audit) unless ``principal`` is ``owner_actor_id`` (the submitter)."""
        if principal.actor_id != owner_actor_id:
            requested = _requested(permissions)
            await self._deny(
                principal,
                tenant_id,
                requested,
                missing=requested,
                reason=DenialReason.ACTOR_MISMATCH,
                roles=frozenset(),
                execution_id=execution_id,
                resource=resource,
            )

    async def _deny(
        self,
        principal: Principal,
        tenant_id: str,
        requested: frozenset[Permission],
        *,
        missing: frozenset[Permission],
        reason: DenialReason,
        roles: frozenset[str],
        execution_id: UUID | None,
        resource: str,
    ) -> NoReturn:
        await self.record_denial(
            principal,
            tenant_id=tenant_id,
            reason=reason,
            resource=resource,
            execution_id=execution_id,
            details={"permissions": sorted(requested), "missing": sorted(missing)},
        )
        # A mismatch names no tenant but the caller's own: the targeted one may be the owner of
        # a foreign execution id, which the caller must not learn.
        details: dict[str, object] = {"denial_reason": reason.value, "missing": sorted(missing)}
        if reason is not DenialReason.TENANT_MISMATCH:
            details["tenant_id"] = tenant_id
        raise PermissionDeniedError(
            _denial_message(principal, tenant_id, missing, reason, roles), **details
        )

    async def record_denial(
        self,
        principal: Principal,
        *,
        tenant_id: str,
        reason: DenialReason,
        resource: str = "",
        execution_id: UUID | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """Audit a refusal decided outside RBAC (e.g. the secret catalogue) like an RBAC one.

        The counter, the ``rbac_violation`` log line and a row through the per-principal
        budget (`DenialAuditLimiter`). ``details`` must name fields and rules, never a submitted
        value. The caller raises its own error afterwards.
        """
        payload: dict[str, Any] = {
            "actor_tenant": principal.tenant_id,
            "requested_tenant": audit_text(tenant_id, _MAX_AUDITED_TENANT),
            "reason": reason.value,
            "tier": self._tier,
            "resource": resource,
            "auth_method": principal.auth_method,
            **(details or {}),
        }
        # Metric and log first: they are synchronous, so even a cancelled caller leaves them.
        RBAC_VIOLATIONS.labels(tier=self._tier, reason=reason.value).inc()
        log.warning(
            "rbac_violation",
            actor_id=principal.actor_id,
            execution_id=str(execution_id) if execution_id else None,
            **payload,
        )
        record = DenialRecord(
            tenant_id=audit_text(tenant_id),
            actor_tenant=principal.tenant_id,
            actor_id=principal.actor_id,
            execution_id=execution_id,
            payload=payload,
        )
        task = asyncio.ensure_future(self._audit.record(record))
        _PENDING_RECORDS.add(task)
        task.add_done_callback(_PENDING_RECORDS.discard)
        # Shielded: cancelling the request (e.g. the client hanging up) must not erase the record.
        await asyncio.shield(task)

    async def _write_record(self, record: DenialRecord) -> None:
        try:
            await record_rbac_violation(
                self._pool,
                tenant_id=record.tenant_id,
                actor_id=record.actor_id,
                execution_id=record.execution_id,
                payload=record.payload,
            )
        except StorageError:
            # The request is refused either way; a lost audit row must be loud, not a new error.
            log.exception(
                "rbac_violation_record_failed",
                tenant_id=record.tenant_id,
                actor_id=record.actor_id,
                tier=self._tier,
            )


def _requested(permissions: Collection[str]) -> frozenset[Permission]:
    if isinstance(permissions, str):
        raise TypeError("permissions must be a collection of names, not one string")
    if not permissions:
        raise ValueError("authorize() needs at least one permission")
    try:
        return frozenset(Permission(name) for name in permissions)
    except ValueError as exc:
        raise ValueError(f"unknown permission requested: {exc}") from None


def _denial_message(
    principal: Principal,
    tenant_id: str,
    missing: frozenset[Permission],
    reason: DenialReason,
    roles: frozenset[str],
) -> str:
    needed = ", ".join(sorted(missing))
    if reason is DenialReason.TENANT_MISMATCH:
        return (
            f"actor {principal.actor_id!r} is authenticated for tenant {principal.tenant_id!r} "
            "and may act only in that tenant; use a token issued for the tenant you mean"
        )
    if reason is DenialReason.ACTOR_MISMATCH:
        return (
            f"actor {principal.actor_id!r} may not run an execution submitted by another actor "
            f"in tenant {tenant_id!r}"
        )
    if reason is DenialReason.NO_ROLE_BINDING:
        return (
            f"actor {principal.actor_id!r} has no role in tenant {tenant_id!r} (needs {needed}); "
            "ask a tenant admin to bind a role that grants it"
        )
    return (
        f"actor {principal.actor_id!r} lacks {needed} in tenant {tenant_id!r} "
        f"(roles: {', '.join(sorted(roles))}); ask a tenant admin for a role that grants it"
    )
