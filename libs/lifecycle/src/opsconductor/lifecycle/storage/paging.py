"""Keyset pagination tokens shared by every listing (executions, approvals, DLQ entries).

A token is the position of the last row returned, ``(created_at, id)``, plus a scope: a
fingerprint of the tenant and filters it was issued for, so a token cannot be replayed against
another listing. Tokens are opaque (url-safe base64 JSON) but not secret: they only carry what
the caller already received.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from uuid import UUID

from opsconductor.common.errors import FieldViolation, PlanValidationError


class InvalidPageRequestError(PlanValidationError):
    """The list request is invalid.

    A :class:`PlanValidationError` subclass only so the transport reports its field violations
    (``page_token``, ``page_size``, ``statuses``, ``mode``) the same way; its reason is generic.
    """

    reason = "INVALID_ARGUMENT"


def invalid_page_request(field_name: str, description: str) -> InvalidPageRequestError:
    """An :class:`InvalidPageRequestError` naming one field."""
    return InvalidPageRequestError(violations=[FieldViolation(field_name, description)])


def encode_page_token(created_at: datetime, row_id: UUID, scope: str) -> str:
    """The token of the position after the row ``(created_at, row_id)`` in listing ``scope``."""
    raw = json.dumps({"c": created_at.isoformat(), "i": str(row_id), "s": scope})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(token: str, scope: str) -> tuple[datetime, UUID]:
    """The position a token names; ``InvalidPageRequestError`` if it is not one of ours or was
    issued for another listing."""
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        created_at = datetime.fromisoformat(data["c"])
        row_id = UUID(data["i"])
        token_scope = data["s"]
    except (binascii.Error, UnicodeError, ValueError, KeyError, TypeError) as exc:
        raise invalid_page_request("page_token", "is not a token this service issued") from exc
    if token_scope != scope:
        raise invalid_page_request("page_token", "was issued for another tenant or other filters")
    return created_at, row_id
