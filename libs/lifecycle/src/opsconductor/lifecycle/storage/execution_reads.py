"""Reads of executions: one by id, and a tenant's list with keyset pagination.

Both are tenant-scoped: another tenant's execution is indistinguishable from a missing one.
Import these through :mod:`.executions`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Collection
from datetime import datetime
from typing import Any
from uuid import UUID

from opsconductor.common.errors import NotFoundError
from opsconductor.common.fsm import ExecutionStatus
from opsconductor.lifecycle.execution_logging import bind_execution
from opsconductor.lifecycle.storage.execution_records import (
    ExecutionRecord,
    PoolOrConnection,
    connection,
    execution_from_row,
    steps_from_column,
)
from opsconductor.lifecycle.storage.paging import (
    InvalidPageRequestError,
    decode_page_token,
    encode_page_token,
    invalid_page_request,
)
from opsconductor.lifecycle.storage.queries import query

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "InvalidPageRequestError",
    "as_execution_id",
    "bound_to_execution",
    "find_execution",
    "get_execution",
    "list_executions",
]

MAX_PAGE_SIZE = 200
DEFAULT_PAGE_SIZE = 50
_EXECUTION_MODES = frozenset({"immediate", "background"})
_SELECT_ONE = query("get_execution")
_SELECT_ONE_WITH_STEPS = query("get_execution_with_steps")
_FIND = query("find_execution")
_FIND_WITH_STEPS = query("find_execution_with_steps")
_FIND_TENANT = query("find_execution_tenant")
_LIST = query("list_executions")


async def get_execution(
    db: PoolOrConnection, tenant_id: str, execution_id: UUID | str, *, with_steps: bool = True
) -> ExecutionRecord:
    """Return one execution of ``tenant_id``; :class:`NotFoundError` if absent or another tenant's.

    Both cases raise the same error, so a caller cannot probe which ids exist elsewhere.
    """
    eid = as_execution_id(execution_id)
    async with connection(db) as conn:
        row = await conn.fetchrow(
            _SELECT_ONE_WITH_STEPS if with_steps else _SELECT_ONE, eid, tenant_id
        )
    if row is None:
        raise NotFoundError("execution not found", execution_id=str(eid))
    return execution_from_row(row, steps_from_column(row) if with_steps else ())


async def find_execution(
    db: PoolOrConnection, execution_id: UUID, *, with_steps: bool = True
) -> ExecutionRecord | None:
    """The execution (with its steps unless ``with_steps=False``), whatever its tenant, or None:
    for a service's own checks (which tenant a probe targeted, whether an approval binds it, a
    job's policy), never for a caller's reads."""
    async with connection(db) as conn:
        row = await conn.fetchrow(_FIND_WITH_STEPS if with_steps else _FIND, execution_id)
    if row is None:
        return None
    return execution_from_row(row, steps_from_column(row) if with_steps else ())


async def find_execution_tenant(db: PoolOrConnection, execution_id: UUID | str) -> str | None:
    """The tenant owning ``execution_id``, or None: for audit decisions only, never for reads."""
    try:
        eid = as_execution_id(execution_id)
    except NotFoundError:
        return None
    async with connection(db) as conn:
        tenant: str | None = await conn.fetchval(_FIND_TENANT, eid)
    return tenant


async def list_executions(
    db: PoolOrConnection,
    tenant_id: str,
    *,
    statuses: Collection[ExecutionStatus | str] = (),
    mode: str | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    page_token: str | None = None,
) -> tuple[list[ExecutionRecord], str | None]:
    """One page of a tenant's executions, newest first, and the token of the next page (or None).

    Keyset pagination on ``(created_at DESC, id DESC)``: stable while rows are added. A page size
    of 0 means the default; it is capped at 200. The opaque token is bound to the filters it was
    issued for; a malformed or mismatched token raises :class:`InvalidPageRequestError`.
    """
    wanted = _parse_statuses(statuses)
    if mode is not None and mode not in _EXECUTION_MODES:
        raise invalid_page_request("mode", f"must be one of {sorted(_EXECUTION_MODES)}")
    if page_size < 0:
        raise invalid_page_request("page_size", "must not be negative")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    scope = _filter_fingerprint(tenant_id, wanted, mode)
    after: tuple[datetime, UUID] | None = None
    if page_token:
        after = decode_page_token(page_token, scope)
    async with connection(db) as conn:
        rows = await conn.fetch(
            _LIST,
            tenant_id,
            wanted,
            mode,
            after[0] if after else None,
            after[1] if after else None,
            size + 1,
        )
    records = [execution_from_row(row) for row in rows[:size]]
    next_token = None
    if len(rows) > size:
        last = records[-1]
        next_token = encode_page_token(last.created_at, last.id, scope)
    return records, next_token


def _parse_statuses(statuses: Collection[ExecutionStatus | str]) -> list[str]:
    try:
        return sorted({ExecutionStatus(s).value for s in statuses})
    except ValueError as exc:
        allowed = sorted(s.value for s in ExecutionStatus)
        raise invalid_page_request("statuses", f"must be among {allowed}") from exc


def _filter_fingerprint(tenant_id: str, statuses: list[str], mode: str | None) -> str:
    canonical = json.dumps([tenant_id, statuses, mode], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def as_execution_id(value: UUID | str) -> UUID:
    """``value`` as a UUID; a malformed id raises :class:`NotFoundError` like an unknown one."""
    if isinstance(value, UUID):
        return value
    try:
        return UUID(value)
    except (ValueError, TypeError, AttributeError) as exc:
        # Same error as an unknown id: a malformed id simply names no execution.
        raise NotFoundError("execution not found", execution_id=str(value)) from exc


async def bound_to_execution(
    db: PoolOrConnection, execution_id: UUID, **extra: Any
) -> contextlib.AbstractContextManager[Any]:
    """:func:`~opsconductor.lifecycle.execution_logging.bind_execution` for the execution as it
    is now (one read), for work on it outside any request that already bound it (the reaper's
    passes); a no-op if it is gone."""
    record = await find_execution(db, execution_id, with_steps=False)
    if record is None:
        return contextlib.nullcontext()
    return bind_execution(record, **extra)
