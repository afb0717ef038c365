"""One principal flooding denials writes a bounded number of audit rows, every denial counted."""

from __future__ import annotations

import contextlib

import asyncpg

from opsconductor.common.auth import Principal
from opsconductor.common.errors import PermissionDeniedError
from opsconductor.policy.denial_audit import DEFAULT_BURST, DEFAULT_MAX_GROUPS
from opsconductor.policy.rbac import Authorizer, RbacPolicy

VIEWER = Principal(actor_id="vera", tenant_id="home")


async def test_a_flood_of_denials_under_invented_tenants_writes_bounded_rows(
    db_pool: asyncpg.Pool,
) -> None:
    """The finding: 3 000 rows in 9 s. Now: burst + max_groups + 1 rows, counts adding up."""
    authorizer = Authorizer(db_pool, RbacPolicy.load(), tier="api")
    total = 600
    for index in range(total):
        with contextlib.suppress(PermissionDeniedError):
            await authorizer.authorize(
                VIEWER, tenant_id=f"made-up-{index}", permissions=["executions:read"]
            )
    now = await db_pool.fetchval(
        "SELECT count(*) FROM execution_events WHERE type = 'rbac_violation'"
    )
    assert now == DEFAULT_BURST
    first = await db_pool.fetchrow(
        "SELECT tenant_id, payload FROM execution_events WHERE type = 'rbac_violation' "
        "ORDER BY id LIMIT 1"
    )
    assert first["tenant_id"] == "made-up-0"  # the first is never held back
    await authorizer.flush_audit()
    rows = await db_pool.fetch(
        "SELECT tenant_id, payload FROM execution_events WHERE type = 'rbac_violation'"
    )
    assert len(rows) == DEFAULT_BURST + DEFAULT_MAX_GROUPS + 1
    assert sum(int(row["payload"].get("count", 1)) for row in rows) == total
