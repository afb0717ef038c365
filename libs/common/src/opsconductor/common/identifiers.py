"""Identifier rules, defined in the contract package the client shares
(:mod:`opsconductor.contract.identifiers`); re-exported here for the server code.
"""

from __future__ import annotations

from opsconductor.contract.identifiers import (
    MAX_ACTOR_ID_LENGTH,
    MAX_AUTH_METHOD_LENGTH,
    MAX_TENANT_ID_LENGTH,
    TENANT_ID_PATTERN,
    audit_text,
    identity_problem,
    is_valid_tenant_id,
)

__all__ = [
    "MAX_ACTOR_ID_LENGTH",
    "MAX_AUTH_METHOD_LENGTH",
    "MAX_TENANT_ID_LENGTH",
    "TENANT_ID_PATTERN",
    "audit_text",
    "identity_problem",
    "is_valid_tenant_id",
]
