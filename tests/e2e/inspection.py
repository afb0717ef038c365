"""What e2e tests look at besides the client: Postgres rows, service logs, and polled conditions.

Tests drive the system through the client only; these helpers read what it left behind (rows
written or not, audit events, leaked secrets) and wait for conditions with a deadline instead of
sleeping. ``module_end_checks`` is a module-scoped fixture a test module adopts with
``pytestmark = pytest.mark.usefixtures("module_end_checks")`` after binding it at module level
(``module_end_checks = inspection.module_end_checks``): at the end of the module it stops the
services (so every log line is on disk) and asserts the planted secret is nowhere in the
module's database or logs, and that no service logged an error.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import pytest
from opsc_test_actions.probe import echoes_of

from opsconductor.lifecycle.storage.role_bindings import bind_role

from .conftest import (
    API_TOKEN_SECRET,
    FANCY_SECRET,
    OTHER_PLANTED_SECRET,
    PLANTED_SECRET,
    Tenant,
)
from .stack import Stack

T = TypeVar("T")

#: The tables a submission can write to, with how each is scoped to a tenant.
_TENANT_TABLES = {
    "executions": "SELECT count(*) FROM executions WHERE tenant_id = $1",
    "execution_steps": (
        "SELECT count(*) FROM execution_steps s JOIN executions e ON e.id = s.execution_id "
        "WHERE e.tenant_id = $1"
    ),
    "execution_events": "SELECT count(*) FROM execution_events WHERE tenant_id = $1",
    "execution_locks": "SELECT count(*) FROM execution_locks WHERE tenant_id = $1",
    "execution_queue": "SELECT count(*) FROM execution_queue WHERE tenant_id = $1",
    "approvals": "SELECT count(*) FROM approvals WHERE tenant_id = $1",
}


async def wait_until(
    check: Callable[[], Awaitable[T | None]],
    *,
    within_s: float,
    what: str,
    interval_s: float = 0.02,
) -> T:
    """Poll ``check`` until it returns something truthy (returned); fail after ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


async def tenant_row_counts(pool: asyncpg.Pool, tenant_id: str) -> dict[str, int]:
    """How many rows of each table belong to ``tenant_id``."""
    return {
        table: int(await pool.fetchval(sql, tenant_id)) for table, sql in _TENANT_TABLES.items()
    }


async def rbac_violations(
    pool: asyncpg.Pool, tenant_id: str, actor_id: str
) -> list[dict[str, Any]]:
    """The ``rbac_violation`` events filed under ``tenant_id`` for ``actor_id``, oldest first.

    Each is its payload plus ``linked_execution_id``, the execution the event row hangs off.
    """
    rows = await pool.fetch(
        "SELECT execution_id, payload FROM execution_events "
        "WHERE tenant_id = $1 AND actor_id = $2 AND type = 'rbac_violation' ORDER BY id",
        tenant_id,
        actor_id,
    )
    return [{**row["payload"], "linked_execution_id": row["execution_id"]} for row in rows]


async def new_tenant(stack: Stack, pool: asyncpg.Pool) -> Tenant:
    """Another fresh tenant bound like the ``tenant`` fixture's (for cross-tenant tests)."""
    tenant = Tenant(id=f"t-{secrets.token_hex(4)}", stack=stack, pool=pool)
    for actor, role in (("alice", "operator"), ("dave", "deployer"), ("vera", "viewer")):
        await bind_role(pool, tenant.id, actor, role, created_by="e2e")
    await bind_role(pool, tenant.id, "ada", "admin", created_by="e2e")
    return tenant


async def database_text(pool: asyncpg.Pool) -> str:
    """Every row of every table of the ``public`` schema, one JSON document per line."""
    tables = await pool.fetch(
        "SELECT quote_ident(table_name) AS name FROM information_schema.tables "
        "WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY table_name"
    )
    assert {row["name"] for row in tables} >= {"executions", "execution_events"}, tables
    lines: list[str] = []
    for table in tables:
        rows = await pool.fetch(f"SELECT row_to_json(t)::text AS line FROM {table['name']} t")
        lines.extend(f"{table['name']}: {row['line']}" for row in rows)
    return "\n".join(lines)


def secret_fragments() -> list[str]:
    """The planted secrets, their random parts and the encoded echoes of FANCY_SECRET the
    probe produces: none may appear anywhere."""
    planted = (PLANTED_SECRET, OTHER_PLANTED_SECRET, API_TOKEN_SECRET, FANCY_SECRET)
    fragments = [fragment for value in planted for fragment in (value, value.rsplit("-", 1)[-1])]
    echoes = echoes_of(FANCY_SECRET)
    echoes.pop("codec_error")  # the error's text is not secret; the quoted character is
    return fragments + list(echoes.values())


async def assert_secret_nowhere(stack: Stack, pool: asyncpg.Pool) -> None:
    """The planted secret is in no row of the database and no line of any service log."""
    dump = await database_text(pool)
    logs = stack.logs()
    assert dump, "the database dump is empty: the scan would prove nothing"
    assert logs, "no service logged anything: the scan would prove nothing"
    for fragment in secret_fragments():
        assert fragment not in dump, "the planted secret was written to Postgres"
        assert fragment not in logs, "the planted secret appears in a service log"


def logged_errors(stack: Stack) -> list[str]:
    """Every error or critical line any service logged (bugs, unretrieved task exceptions)."""
    return [
        line
        for line in stack.logs().splitlines()
        if '"level": "error"' in line or '"level": "critical"' in line
    ]


@pytest.fixture(scope="module")
async def module_end_checks(stack: Stack, e2e_pool: asyncpg.Pool) -> AsyncIterator[None]:
    """After the module's tests: stop the services (so every line is on disk), then assert the
    planted secret is in no table and no log, and that no service logged an error."""
    yield
    await stack.stop()
    await assert_secret_nowhere(stack, e2e_pool)
    errors = logged_errors(stack)
    assert not errors, "a service logged errors:\n" + "\n".join(line[:2000] for line in errors)
