"""Rollback safety of the latest migration, whatever it is (docs/deploy.md, expand/contract).

The previous release's schema is every migration but the latest. On a database holding data:

1. the previous release writes its rows (before the upgrade);
2. the latest migration is applied, and the previous release's *same statements* still work on
   the new schema (the expand rule: old code keeps running during a rollout and after a code
   rollback) — as do writes that refer to what the latest migration seeded;
3. the latest migration is reverted: it succeeds, every row the previous release wrote is still
   there unchanged, and the schema is exactly the previous release's;
4. ``up`` applies it again on top of that data.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from opsconductor.lifecycle.storage.migrate import (
    applied_versions,
    discover,
    find_migrations_dir,
    migrate_down,
    migrate_up,
)
from tests.conftest import RUN_ID, with_database

from .migration_helpers import dump_schema

#: Every row this test writes carries this tenant, so it can find exactly its own rows.
TENANT = "rollback-test"


def _previous_release_folder(tmp_path: Path) -> tuple[Path, int, int]:
    """A copy of the migrations without the latest one: (folder, latest, previous version)."""
    source = find_migrations_dir()
    migrations = discover(source)
    assert len(migrations) >= 2
    latest, previous = migrations[-1].version, migrations[-2].version
    folder = tmp_path / "previous-release"
    folder.mkdir()
    for path in source.glob("*.sql"):
        if int(path.name.split("_", 1)[0]) != latest:
            shutil.copy(path, folder / path.name)
    return folder, latest, previous


async def _fresh_database(server_dsn: str, label: str) -> str:
    name = f"opsc_test_{RUN_ID}_rollback_{label}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(with_database(server_dsn, "postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return with_database(server_dsn, name)


async def _drop(server_dsn: str, dsn: str) -> None:
    name = dsn.rsplit("/", 1)[1]
    admin = await asyncpg.connect(with_database(server_dsn, "postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def databases(server_dsn: str) -> AsyncIterator[tuple[str, str]]:
    """Two empty databases: the one rolled back, and a reference of the previous release."""
    subject = await _fresh_database(server_dsn, "subject")
    reference = await _fresh_database(server_dsn, "reference")
    try:
        yield subject, reference
    finally:
        await _drop(server_dsn, subject)
        await _drop(server_dsn, reference)


async def _columns(conn: asyncpg.Connection) -> dict[str, list[str]]:
    """The tables of the schema (but the ledger) and their columns, in order."""
    rows = await conn.fetch(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name <> 'schema_migrations' "
        "ORDER BY table_name, ordinal_position"
    )
    columns: dict[str, list[str]] = {}
    for row in rows:
        columns.setdefault(row["table_name"], []).append(row["column_name"])
    return columns


#: A policy of the test's own per write: SLA x action combinations the seed does not use (the
#: pair is unique).
_OWN_POLICY = {"before": ("long", "read"), "during": ("long", "modify")}


async def write_as_previous_release(conn: asyncpg.Connection, label: str) -> None:
    """What the previous release writes: an execution with its step, event, approval, queue
    row, DLQ entry and lock, a role binding, a flag and a timeout policy of its own — through
    plain INSERTs naming only columns of the original schema (a later migration that makes
    them fail broke the previous release)."""
    policy = f"rb_{label}"
    # Once the seed is there, the previous release's executions use its policies too.
    seeded = await conn.fetchval("SELECT id FROM timeout_policies WHERE id = 'fast_read'")
    await conn.execute(
        "INSERT INTO timeout_policies (id, sla_class, action_class, execution_timeout_ms, "
        "step_timeout_ms, max_attempts, max_lease_renewals) "
        "VALUES ($1, $2, $3, 600000, 300000, 3, 10)",
        policy,
        *_OWN_POLICY[label],
    )
    plan = json.dumps({"name": f"rollback {label}", "steps": [{"id": "s1", "action": "noop"}]})
    for policy_id in filter(None, (policy, seeded)):
        execution_id = await conn.fetchval(
            "INSERT INTO executions (tenant_id, actor_id, idempotency_key, plan_hash, "
            "plan_snapshot, plan_snapshot_hash, execution_mode, sla_class, action_class, "
            "timeout_policy_id, timeout_ms, status, event_seq) "
            "VALUES ($1, 'alice', $2, $3, $4::jsonb, $5, 'background', 'fast', 'read', $6, "
            "10000, 'queued', 1) RETURNING id",
            TENANT,
            uuid.uuid4().hex + uuid.uuid4().hex,
            "a" * 64,
            plan,
            "b" * 64,
            policy_id,
        )
        await conn.execute(
            "INSERT INTO execution_steps (execution_id, step_id, position, action, action_class, "
            "idempotency_key) VALUES ($1, 's1', 0, 'noop', 'read', $2)",
            execution_id,
            f"{execution_id}:s1",
        )
        await conn.execute(
            "INSERT INTO execution_events (execution_id, tenant_id, actor_id, seq, type, payload) "
            "VALUES ($1, $2, 'alice', 1, 'execution_started', '{}'::jsonb)",
            execution_id,
            TENANT,
        )
        await conn.execute(
            "INSERT INTO approvals (tenant_id, execution_id, level, plan_hash, plan_snapshot_hash, "
            "requested_by, expires_at) VALUES ($1, $2, 1, $3, $4, 'alice', now() + interval '1 h')",
            TENANT,
            execution_id,
            "a" * 64,
            "b" * 64,
        )
        await conn.execute(
            "INSERT INTO execution_queue (execution_id, tenant_id, max_attempts) "
            "VALUES ($1, $2, 3)",
            execution_id,
            TENANT,
        )
        await conn.execute(
            "INSERT INTO execution_dlq (execution_id, tenant_id, attempts, error_class) "
            "VALUES ($1, $2, 3, 'Boom')",
            execution_id,
            TENANT,
        )
        await conn.execute(
            "INSERT INTO execution_locks (lock_key, tenant_id, target_ref, action, owner_token, "
            "owner_execution_id, expires_at) VALUES ($1, $2, 'host:web-01', 'noop', $3, $4, "
            "now() + interval '1 minute')",
            f"lock:v1:{TENANT}:{execution_id}:noop",
            TENANT,
            uuid.uuid4(),
            execution_id,
        )
    await conn.execute(
        "INSERT INTO role_bindings (tenant_id, principal, role) VALUES ($1, $2, 'operator')",
        TENANT,
        f"alice-{label}",
    )
    await conn.execute(
        "INSERT INTO feature_flags (name, value, updated_by) VALUES ($1, 'true'::jsonb, 'test')",
        f"rb_{label}",
    )


async def snapshot(conn: asyncpg.Connection, schema: dict[str, list[str]]) -> dict[str, list[str]]:
    """Every row this test wrote (by its tenant, policy or flag names) in the tables and
    columns of ``schema`` (the previous release's), as text: a later comparison sees any
    changed value, not only a changed count, and ignores columns the latest migration adds."""
    ours = {
        "timeout_policies": "id LIKE 'rb\\_%'",
        "role_bindings": f"tenant_id = '{TENANT}'",
        "feature_flags": "name LIKE 'rb\\_%'",
    }
    result = {}
    for table, names in sorted(schema.items()):
        if table in ours:
            where = ours[table]
        elif "tenant_id" in names:
            where = f"tenant_id = '{TENANT}'"
        else:
            continue  # nothing of ours can be in it
        # Names come from the catalog, never from input.
        row = ", ".join(f'"{name}"' for name in names)
        rows = await conn.fetch(f'SELECT ROW({row})::text AS row FROM "{table}" WHERE {where}')
        result[table] = sorted(r["row"] for r in rows)
    return result


async def test_down_of_the_latest_migration_keeps_the_previous_releases_data(
    databases: tuple[str, str], tmp_path: Path
) -> None:
    subject, reference = databases
    previous_folder, latest, previous = _previous_release_folder(tmp_path)

    # The previous release, running with data.
    assert (await migrate_up(subject, previous_folder))[-1] == previous
    await migrate_up(reference, previous_folder)
    previous_schema = await dump_schema(reference)
    conn = await asyncpg.connect(subject)
    try:
        old_tables = await _columns(conn)
        await write_as_previous_release(conn, "before")
        before = await snapshot(conn, old_tables)
    finally:
        await conn.close()
    assert all(before[t] for t in ("executions", "execution_events", "execution_queue"))

    # Upgrade; the previous release keeps writing during the rollout.
    assert await migrate_up(subject) == [latest]
    conn = await asyncpg.connect(subject)
    try:
        await write_as_previous_release(conn, "during")
        upgraded = await snapshot(conn, old_tables)
    finally:
        await conn.close()
    for table, rows in before.items():
        assert set(rows) <= set(upgraded[table]), f"the upgrade changed rows of {table}"

    # Roll the schema back.
    assert await migrate_down(subject, steps=1) == [latest]
    assert (await applied_versions(subject))[-1] == previous
    conn = await asyncpg.connect(subject)
    try:
        after = await snapshot(conn, old_tables)
    finally:
        await conn.close()
    assert after == upgraded, "the down migration lost or changed the previous release's rows"
    assert await dump_schema(subject) == previous_schema

    # And forward again, on top of the data.
    assert await migrate_up(subject) == [latest]
    conn = await asyncpg.connect(subject)
    try:
        assert await snapshot(conn, old_tables) == upgraded
    finally:
        await conn.close()
