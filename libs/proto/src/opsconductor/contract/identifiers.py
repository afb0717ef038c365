"""Identifiers a caller controls at the edge: what a tenant id, an actor id and an auth method
may look like, and how a value that fails those rules is still written to an audit row.

Tenant ids are part of keys (the lock key ``lock:v1:{tenant}:{target}:{action}``, Redis queue
keys) and of ``VARCHAR(100)`` columns, so they follow one documented charset: a letter, digit or
``_`` (the operators' ``_system`` tenant), then up to 99 letters, digits, ``_``, ``.`` or ``-`` —
no ``:``, no whitespace, no control characters, no NUL. Actor ids (``sub``) may be any printable
text up to the 200 characters of their columns (IdPs use e-mail addresses, URNs, UUIDs); auth
methods up to 50.

A token whose claims break these rules is refused (``UNAUTHENTICATED``): nothing downstream then
has to cope with an identifier it cannot store. A *requested* tenant id (the ``tenant_id`` field
of a request) is not checked here: it can only ever match the caller's own (valid) tenant, so a
bad one is a tenant mismatch — denied and audited, under :func:`audit_text` of what was sent.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "MAX_ACTOR_ID_LENGTH",
    "MAX_AUTH_METHOD_LENGTH",
    "MAX_TENANT_ID_LENGTH",
    "TENANT_ID_PATTERN",
    "audit_text",
    "identity_problem",
    "is_valid_tenant_id",
]

#: Width of every ``tenant_id`` column.
MAX_TENANT_ID_LENGTH: Final = 100
#: Width of ``executions.actor_id`` and the other principal columns.
MAX_ACTOR_ID_LENGTH: Final = 200
#: Width of ``approvals.auth_method``.
MAX_AUTH_METHOD_LENGTH: Final = 50
TENANT_ID_PATTERN: Final = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}"

_TENANT_ID = re.compile(TENANT_ID_PATTERN)
_TENANT_RULE: Final = (
    f"must be 1..{MAX_TENANT_ID_LENGTH} characters: a letter, digit or '_', then letters, "
    "digits, '_', '.' or '-'"
)


def is_valid_tenant_id(value: str) -> bool:
    """True when ``value`` follows the tenant id charset (see the module docstring)."""
    return _TENANT_ID.fullmatch(value) is not None


def _printable_problem(value: str, max_length: int) -> str | None:
    if not value.strip():
        return "must be a non-empty string"
    if len(value) > max_length:
        return f"must be at most {max_length} characters"
    if not value.isprintable():
        return "must not contain control characters"
    return None


def identity_problem(*, tenant_id: str, actor_id: str, auth_method: str) -> str | None:
    """What is wrong with a token's identity claims (``claim: problem``), or None if nothing."""
    if not is_valid_tenant_id(tenant_id):
        return f"tenant_id {_TENANT_RULE}"
    problem = _printable_problem(actor_id, MAX_ACTOR_ID_LENGTH)
    if problem is not None:
        return f"sub {problem}"
    problem = _printable_problem(auth_method, MAX_AUTH_METHOD_LENGTH)
    if problem is not None:
        return f"auth_method {problem}"
    return None


def audit_text(value: str, max_length: int = MAX_TENANT_ID_LENGTH) -> str:
    """``value`` as an audit row can hold it: control characters escaped (``\\x00``), cut to
    ``max_length`` with a trailing ``…`` when it was longer. Never raises, never empty."""
    escaped = "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in value
    )
    if len(escaped) > max_length:
        escaped = escaped[: max_length - 1] + "…"
    return escaped or "(empty)"
