"""Spec §1.3: each CHECK constraint of ``executions`` rejects the rows it exists to reject."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from opsconductor.lifecycle.storage.db import connect

from .migration_helpers import insert_execution

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)
# Serialised by Postgres as {"blob": "xxx…"}: 12 bytes of JSON around the string.
OVER_10_KB = {"blob": "x" * 10_240}
AT_10_KB = {"blob": "x" * (10_240 - 12)}


@pytest.fixture
async def conn(db_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await connect(db_dsn)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.mark.parametrize(
    ("constraint", "overrides"),
    [
        pytest.param("valid_cancellation", {"cancelled_by": "bob"}, id="cancelled_by-alone"),
        pytest.param("valid_cancellation", {"cancelled_at": T0}, id="cancelled_at-alone"),
        pytest.param("valid_result_size", {"result_summary": OVER_10_KB}, id="result-over-10KB"),
        pytest.param(
            "valid_timing",
            {"created_at": T0, "started_at": T0 - SECOND},
            id="started-before-created",
        ),
        pytest.param(
            "valid_timing",
            {"created_at": T0, "started_at": T0 + SECOND, "ended_at": T0},
            id="ended-before-started",
        ),
        pytest.param("valid_timeout", {"timeout_ms": 0}, id="timeout-zero"),
        pytest.param("valid_timeout", {"timeout_ms": -1}, id="timeout-negative"),
    ],
)
async def test_check_constraint_rejects_violating_row(
    conn: asyncpg.Connection, constraint: str, overrides: dict[str, Any]
) -> None:
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await insert_execution(conn, **overrides)
    assert caught.value.constraint_name == constraint
    assert await conn.fetchval("SELECT count(*) FROM executions") == 0


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="minimal"),
        pytest.param({"cancelled_by": "bob", "cancelled_at": T0}, id="cancelled-pair"),
        pytest.param({"result_summary": AT_10_KB}, id="result-exactly-10KB"),
        pytest.param(
            {"created_at": T0, "started_at": T0, "ended_at": T0}, id="instant-run-equal-times"
        ),
        pytest.param({"timeout_ms": 1}, id="timeout-1ms"),
    ],
)
async def test_check_constraints_accept_boundary_rows(
    conn: asyncpg.Connection, overrides: dict[str, Any]
) -> None:
    """The constraints reject only violations: the limits themselves are allowed."""
    await insert_execution(conn, **overrides)
    assert await conn.fetchval("SELECT count(*) FROM executions") == 1


async def test_result_size_limit_is_10_kb_of_serialised_json(conn: asyncpg.Connection) -> None:
    execution_id = await insert_execution(conn, result_summary=AT_10_KB)
    size = await conn.fetchval(
        "SELECT octet_length(result_summary::text) FROM executions WHERE id = $1", execution_id
    )
    assert size == 10_240


async def test_constraint_applies_to_updates_too(conn: asyncpg.Connection) -> None:
    """Setting ``cancelled_by`` later without ``cancelled_at`` is refused just as on insert."""
    execution_id = await insert_execution(conn)
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await conn.execute("UPDATE executions SET cancelled_by = 'bob' WHERE id = $1", execution_id)
    assert caught.value.constraint_name == "valid_cancellation"
