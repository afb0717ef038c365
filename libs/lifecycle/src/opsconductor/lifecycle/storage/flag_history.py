"""The record of feature-flag changes: who changed which flag when, from what to what.

Rows of ``feature_flag_changes`` are written by a trigger on ``feature_flags`` in the statement
that changes a flag (migration 0005), so every writer is recorded — the api, an older release
during a rollout, an operator's ``psql``. This module only reads them, newest first.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from opsconductor.common.errors import InvalidArgumentError
from opsconductor.lifecycle.storage.execution_records import PoolOrConnection, transaction
from opsconductor.lifecycle.storage.executions import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from opsconductor.lifecycle.storage.paging import (
    decode_page_token,
    encode_page_token,
    invalid_page_request,
)
from opsconductor.lifecycle.storage.queries import query

__all__ = ["FlagChange", "list_flag_changes"]

_MAX_FLAG_NAME = 100

_LIST = query("list_flag_changes")


@dataclass(frozen=True)
class FlagChange:
    """One write of one flag. ``old_value`` is None when the flag had no row (its default);
    ``new_value`` is None when the row was deleted (back to the default)."""

    id: UUID
    flag: str
    old_value: Any
    new_value: Any
    changed_by: str
    changed_at: datetime


def _scope(flag: str | None) -> str:
    return hashlib.sha256(json.dumps(["flag_changes", flag]).encode()).hexdigest()[:16]


async def list_flag_changes(
    db: PoolOrConnection,
    *,
    flag: str | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    page_token: str | None = None,
) -> tuple[list[FlagChange], str | None]:
    """One page of flag changes, newest first (of ``flag`` only, if given), and the next
    page's token (None at the end). A page size of 0 means the default, capped at the maximum;
    a malformed token, or one issued for another filter, is ``INVALID_ARGUMENT``. ``db`` must
    decode jsonb (``create_pool`` sets the codec)."""
    if page_size < 0:
        raise invalid_page_request("page_size", "must not be negative")
    if flag is not None and len(flag) > _MAX_FLAG_NAME:
        raise InvalidArgumentError("flag is too long", field="flag")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    scope = _scope(flag)
    after = decode_page_token(page_token, scope) if page_token else None
    async with transaction(db) as conn:
        rows = await conn.fetch(
            _LIST, flag, after[0] if after else None, after[1] if after else None, size + 1
        )
    changes = [
        FlagChange(
            id=row["id"],
            flag=row["flag"],
            old_value=row["old_value"],
            new_value=row["new_value"],
            changed_by=row["changed_by"],
            changed_at=row["changed_at"],
        )
        for row in rows[:size]
    ]
    next_token = None
    if len(rows) > size:
        next_token = encode_page_token(changes[-1].changed_at, changes[-1].id, scope)
    return changes, next_token
