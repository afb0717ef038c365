"""Spec §1: the verification SQL of the checklist, run verbatim against a freshly migrated database.

The queries below are copied character for character from spec §1 (only split into one string
per statement, the ``-- Expected`` comments turned into assertions).
"""

from __future__ import annotations

import re

import asyncpg
import pytest

from opsconductor.lifecycle.storage.db import connect
from opsconductor.lifecycle.storage.migrate import discover, find_migrations_dir

from .migration_helpers import insert_execution

# §1.1 Tables & ENUMs
SPEC_TABLES = (
    "SELECT table_name FROM information_schema.tables \n"
    "WHERE table_name IN ('executions', 'execution_steps', 'approvals', 'execution_events', "
    "'execution_queue', 'execution_dlq', 'execution_locks', 'timeout_policies');"
)
SPEC_ENUMS = (
    "SELECT typname FROM pg_type \n"
    "WHERE typname IN ('execution_status', 'execution_mode', 'sla_class', 'approval_state');"
)
SPEC_POLICIES = "SELECT COUNT(*) FROM timeout_policies;"
# §1.2 Idempotency & Uniqueness
SPEC_UNIQUE_INDEX = (
    "SELECT indexname FROM pg_indexes \n"
    "WHERE tablename = 'executions' AND indexname = 'ux_exec_tenant_idem';"
)
SPEC_SNAPSHOT = (
    "SELECT id, plan_snapshot IS NOT NULL, plan_hash IS NOT NULL \nFROM executions LIMIT 1;"
)
# §1.3 Constraints & Validation
SPEC_CONSTRAINTS = (
    "SELECT conname FROM pg_constraint \n"
    "WHERE conrelid = 'executions'::regclass \n"
    "AND conname IN ('valid_cancellation', 'valid_result_size', 'valid_timing', 'valid_timeout');"
)
# §1.4 Observability Fields
SPEC_OBSERVABILITY = (
    "SELECT column_name FROM information_schema.columns \n"
    "WHERE table_name = 'executions' \n"
    "AND column_name IN ('worker_id', 'lease_renewals', 'cancel_checks_performed', "
    "'last_transition_at', 'last_transition_by', 'last_transition_from', 'timeout_policy_id');"
)


async def _fetch(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


async def test_spec_1_1_all_eight_tables_exist(db_dsn: str) -> None:
    rows = await _fetch(db_dsn, SPEC_TABLES)
    assert len(rows) == 8
    assert {r["table_name"] for r in rows} == {
        "executions",
        "execution_steps",
        "approvals",
        "execution_events",
        "execution_queue",
        "execution_dlq",
        "execution_locks",
        "timeout_policies",
    }


async def test_spec_1_1_all_four_enums_exist(db_dsn: str) -> None:
    rows = await _fetch(db_dsn, SPEC_ENUMS)
    assert len(rows) == 4


async def test_spec_1_1_six_timeout_policies_are_seeded(db_dsn: str) -> None:
    rows = await _fetch(db_dsn, SPEC_POLICIES)
    assert rows[0][0] == 6


async def test_timeout_policies_match_the_design(db_dsn: str) -> None:
    """DESIGN.md §3: fast 10 s, medium 30 s, long 10 min; attempts 3/5/3; renewals 1/3/10."""
    rows = await _fetch(
        db_dsn,
        "SELECT id, sla_class::text, action_class, execution_timeout_ms, max_attempts, "
        "max_lease_renewals FROM timeout_policies ORDER BY id",
    )
    assert [tuple(r) for r in rows] == [
        ("fast_modify", "fast", "modify", 10_000, 3, 1),
        ("fast_read", "fast", "read", 10_000, 3, 1),
        ("long_deploy", "long", "deploy", 600_000, 3, 10),
        ("medium_deploy", "medium", "deploy", 30_000, 5, 3),
        ("medium_modify", "medium", "modify", 30_000, 5, 3),
        ("medium_read", "medium", "read", 30_000, 5, 3),
    ]


async def test_spec_1_2_tenant_idempotency_unique_index_exists(db_dsn: str) -> None:
    rows = await _fetch(db_dsn, SPEC_UNIQUE_INDEX)
    assert len(rows) == 1


async def test_spec_1_2_unique_index_is_tenant_scoped(db_dsn: str) -> None:
    """The same key in another tenant is accepted; twice in one tenant is refused."""
    conn = await connect(db_dsn)
    try:
        await insert_execution(conn, tenant_id="t1", idempotency_key="k" * 64)
        await insert_execution(conn, tenant_id="t2", idempotency_key="k" * 64)
        with pytest.raises(asyncpg.UniqueViolationError) as caught:
            await insert_execution(conn, tenant_id="t1", idempotency_key="k" * 64)
        assert caught.value.constraint_name == "ux_exec_tenant_idem"
    finally:
        await conn.close()


async def test_spec_1_2_plan_snapshot_and_hash_are_stored(db_dsn: str) -> None:
    conn = await connect(db_dsn)
    try:
        execution_id = await insert_execution(conn)
    finally:
        await conn.close()
    rows = await _fetch(db_dsn, SPEC_SNAPSHOT)
    assert len(rows) == 1
    assert rows[0]["id"] == execution_id
    assert rows[0][1] is True
    assert rows[0][2] is True


async def test_plan_columns_have_the_spec_types(db_dsn: str) -> None:
    rows = await _fetch(
        db_dsn,
        "SELECT column_name, data_type, character_maximum_length FROM information_schema.columns "
        "WHERE table_name = 'executions' AND column_name IN ('plan_snapshot', 'plan_hash')",
    )
    assert {tuple(r) for r in rows} == {
        ("plan_snapshot", "jsonb", None),
        ("plan_hash", "character varying", 64),
    }


async def test_spec_1_3_all_four_check_constraints_exist(db_dsn: str) -> None:
    rows = await _fetch(db_dsn, SPEC_CONSTRAINTS)
    assert len(rows) == 4


async def test_spec_1_4_all_seven_observability_columns_exist(db_dsn: str) -> None:
    rows = await _fetch(db_dsn, SPEC_OBSERVABILITY)
    assert len(rows) == 7


async def test_observability_columns_have_the_spec_types_and_defaults(db_dsn: str) -> None:
    rows = await _fetch(
        db_dsn,
        "SELECT column_name, data_type, character_maximum_length, column_default "
        "FROM information_schema.columns WHERE table_name = 'executions' AND column_name IN "
        "('worker_id', 'lease_renewals', 'cancel_checks_performed', 'timeout_policy_id', "
        "'last_transition_at', 'last_transition_by', 'last_transition_from')",
    )
    columns = {r["column_name"]: tuple(r)[1:] for r in rows}
    assert columns["worker_id"] == ("character varying", 100, None)
    assert columns["lease_renewals"] == ("integer", None, "0")
    assert columns["cancel_checks_performed"] == ("integer", None, "0")
    assert columns["timeout_policy_id"] == ("character varying", 50, None)
    assert columns["last_transition_at"][0] == "timestamp with time zone"
    assert columns["last_transition_from"][0] == "USER-DEFINED"  # the execution_status enum


async def test_no_column_is_timestamp_without_time_zone(db_dsn: str) -> None:
    """Spec §1.1: every timestamp column of the public schema is ``timestamptz``."""
    rows = await _fetch(
        db_dsn,
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'public' AND data_type LIKE 'timestamp%'",
    )
    naive = [(r["table_name"], r["column_name"]) for r in rows if "without" in r["data_type"]]
    assert naive == []
    assert len(rows) > 20  # the query does see the schema's timestamp columns


def test_indexes_are_created_apart_from_their_tables() -> None:
    """Spec §1.1: no migration creates an index and a table in the same file."""
    for migration in discover(find_migrations_dir()):
        sql = re.sub(r"--[^\n]*", "", migration.up_sql).upper()
        assert not ("CREATE TABLE" in sql and "CREATE INDEX" in sql), migration.label
        assert "CREATE UNIQUE INDEX" not in sql or "CREATE TABLE" not in sql, migration.label


async def test_ledger_table_has_the_documented_columns(db_dsn: str) -> None:
    rows = await _fetch(
        db_dsn,
        "SELECT column_name, data_type, character_maximum_length FROM information_schema.columns "
        "WHERE table_name = 'schema_migrations' ORDER BY ordinal_position",
    )
    assert [tuple(r) for r in rows] == [
        ("version", "integer", None),
        ("name", "text", None),
        ("checksum", "character", 64),
        ("applied_at", "timestamp with time zone", None),
    ]
