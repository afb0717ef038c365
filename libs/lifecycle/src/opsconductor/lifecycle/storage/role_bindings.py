"""Role bindings: which principal holds which role in which tenant (table ``role_bindings``).

The policy file says what a role may do; these rows say who has the role, per tenant. They are
the only source of a principal's roles: a token's claims never grant a role.
"""

from __future__ import annotations

from typing import Any, Final

import asyncpg

from opsconductor.common.errors import StorageError
from opsconductor.lifecycle.storage.queries import query

__all__ = ["bind_role", "load_roles", "unbind_role"]

# Everything asyncpg raises for a failed statement or a lost connection.
_DRIVER_ERRORS: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)

_SELECT_ROLES = query("load_roles")
_INSERT = query("bind_role")
_DELETE = query("unbind_role")


def _require(**values: str) -> None:
    for name, value in values.items():
        if not value:
            raise ValueError(f"{name} must not be empty")


async def load_roles(db: Any, tenant_id: str, principal: str) -> frozenset[str]:
    """Return the roles ``principal`` holds in ``tenant_id`` (``db``: a pool or a connection)."""
    try:
        rows = await db.fetch(_SELECT_ROLES, tenant_id, principal)
    except _DRIVER_ERRORS as exc:
        raise StorageError("could not load role bindings", tenant_id=tenant_id) from exc
    return frozenset(row["role"] for row in rows)


async def bind_role(
    db: Any, tenant_id: str, principal: str, role: str, created_by: str = "system"
) -> bool:
    """Grant ``role`` to ``principal`` in ``tenant_id``; True if new, False if already bound.

    The role name is not checked against the policy here: an unknown role grants nothing, and
    the authorizer logs it when it meets one.
    """
    _require(tenant_id=tenant_id, principal=principal, role=role, created_by=created_by)
    try:
        inserted = await db.fetchval(_INSERT, tenant_id, principal, role, created_by)
    except _DRIVER_ERRORS as exc:
        raise StorageError("could not bind role", tenant_id=tenant_id, role=role) from exc
    return inserted is not None


async def unbind_role(db: Any, tenant_id: str, principal: str, role: str) -> bool:
    """Revoke ``role`` from ``principal`` in ``tenant_id``; True if a binding was removed."""
    try:
        deleted = await db.fetchval(_DELETE, tenant_id, principal, role)
    except _DRIVER_ERRORS as exc:
        raise StorageError("could not unbind role", tenant_id=tenant_id, role=role) from exc
    return deleted is not None
