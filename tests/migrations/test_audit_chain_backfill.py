"""Migration 0004 chains the events recorded before it, so old executions verify too."""

from __future__ import annotations

from uuid import UUID

from opsconductor.lifecycle.storage.audit_chain import verify_chain
from opsconductor.lifecycle.storage.db import connect
from opsconductor.lifecycle.storage.events import append_event
from opsconductor.lifecycle.storage.migrate import applied_versions, migrate_down, migrate_up

AUDIT_CHAIN_VERSION = 4


async def test_events_written_before_the_migration_are_chained_by_it(db_dsn: str) -> None:
    versions = await applied_versions(db_dsn)
    await migrate_down(db_dsn, steps=len([v for v in versions if v >= AUDIT_CHAIN_VERSION]))
    assert await applied_versions(db_dsn) == [1, 2, 3]
    conn = await connect(db_dsn)
    try:
        execution_ids: list[UUID] = []
        for key in ("1", "2"):
            execution_id: UUID = await conn.fetchval(
                """
                INSERT INTO executions (tenant_id, actor_id, idempotency_key, plan_hash,
                    plan_snapshot, plan_snapshot_hash, execution_mode, sla_class, action_class,
                    timeout_ms)
                VALUES ('old', 'alice', $1, $2, '{}', $2, 'immediate', 'fast', 'read', 10000)
                RETURNING id
                """,
                key * 64,
                "a" * 64,
            )
            execution_ids.append(execution_id)
            for index in range(3):
                await append_event(
                    conn,
                    tenant_id="old",
                    execution_id=execution_id,
                    actor_id="alice",
                    type="before_the_chain",
                    payload={"index": index},
                )
        await append_event(conn, tenant_id="old", execution_id=None, actor_id="x", type="lone")

        await migrate_up(db_dsn)
        for execution_id in execution_ids:
            verdict = await verify_chain(conn, "old", execution_id)
            assert verdict.intact
            assert verdict.events_checked == 3
        assert (
            await conn.fetchval("SELECT count(*) FROM execution_events WHERE hash IS NULL") == 1
        )  # the event of no execution is not chained
    finally:
        await conn.close()
