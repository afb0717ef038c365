"""The migrations runner: ordering, idempotency, the advisory lock, the ledger and its checks."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from structlog.testing import capture_logs

from opsconductor.common.errors import StorageError
from opsconductor.lifecycle.storage import migrate
from opsconductor.lifecycle.storage.migrate import (
    MIGRATION_LOCK_KEY,
    MigrationChecksumError,
    MigrationDefinitionError,
    MigrationError,
    MigrationStateError,
    applied_versions,
    discover,
    find_migrations_dir,
    migrate_down,
    migrate_up,
)

from .migration_helpers import dump_schema

WriteMigrations = Callable[[dict[str, str]], Path]

#: The repository's migrations: tests of the real ones follow whatever number was added last.
REPOSITORY = discover(find_migrations_dir())
ALL_VERSIONS = [m.version for m in REPOSITORY]
#: What comes after the seed (0003): reverted by the "down to the seed" test.
AFTER_SEED = [v for v in ALL_VERSIONS if v > 3]
UNREACHABLE_DSN = "postgresql://postgres@127.0.0.1:1/postgres"

TWO_MIGRATIONS = {
    "0001_a.up.sql": "CREATE TABLE a (id int);",
    "0001_a.down.sql": "DROP TABLE a;",
    "0002_b.up.sql": "CREATE TABLE b (id int);",
    "0002_b.down.sql": "DROP TABLE b;",
}


async def _fetchval(dsn: str, sql: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def _wait_until(condition: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------------------------------
# Against the real migrations


async def test_migrate_up_applies_every_migration_in_order_on_an_empty_database(
    empty_db_dsn: str,
) -> None:
    with capture_logs() as logs:
        assert await migrate_up(empty_db_dsn) == ALL_VERSIONS
    assert await applied_versions(empty_db_dsn) == ALL_VERSIONS
    applied = [e for e in logs if e["event"] == "migration_applied"]
    assert [(e["version"], e["name"]) for e in applied] == [(m.version, m.name) for m in REPOSITORY]
    assert [(e["version"], e["name"]) for e in applied][:3] == [
        (1, "schema"),
        (2, "indexes"),
        (3, "seed"),
    ]


async def test_ledger_records_name_and_checksum_of_each_up_file(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
    finally:
        await conn.close()
    folder = find_migrations_dir()
    expected = {
        (m.version, m.name, hashlib.sha256((folder / f"{m.label}.up.sql").read_bytes()).hexdigest())
        for m in REPOSITORY
    }
    assert {tuple(r) for r in rows} == expected


async def test_rerunning_up_is_a_no_op(db_dsn: str) -> None:
    ledger = "SELECT array_agg((version, applied_at) ORDER BY version)::text FROM schema_migrations"
    ledger_before = await _fetchval(db_dsn, ledger)
    schema_before = await dump_schema(db_dsn)
    assert await migrate_up(db_dsn) == []
    assert await migrate_up(db_dsn) == []
    assert await _fetchval(db_dsn, ledger) == ledger_before
    assert await dump_schema(db_dsn) == schema_before


async def test_migrate_down_one_step_reverts_exactly_the_last_migration(db_dsn: str) -> None:
    assert await migrate_down(db_dsn, steps=1) == ALL_VERSIONS[-1:]
    assert await applied_versions(db_dsn) == ALL_VERSIONS[:-1]
    assert await migrate_up(db_dsn) == ALL_VERSIONS[-1:]


async def test_migrate_down_to_before_the_seed_reverts_exactly_those(db_dsn: str) -> None:
    assert await migrate_down(db_dsn, steps=len(AFTER_SEED) + 1) == [*AFTER_SEED[::-1], 3]
    assert await applied_versions(db_dsn) == [1, 2]
    # 0003 (seed rows) is gone; 0002 (indexes) and 0001 (tables) are still there.
    assert await _fetchval(db_dsn, "SELECT count(*) FROM timeout_policies") == 0
    assert await _fetchval(db_dsn, "SELECT count(*) FROM feature_flags") == 0
    assert await _fetchval(db_dsn, "SELECT to_regclass('ux_exec_tenant_idem')::text") == (
        "ux_exec_tenant_idem"
    )
    assert await migrate_up(db_dsn) == [3, *AFTER_SEED]
    assert await _fetchval(db_dsn, "SELECT count(*) FROM timeout_policies") == 6


async def test_down_all_then_up_leaves_an_identical_schema(db_dsn: str) -> None:
    before = await dump_schema(db_dsn)
    assert "CREATE TABLE public.executions" in before
    assert "ux_exec_tenant_idem" in before

    assert await migrate_down(db_dsn, steps=100) == ALL_VERSIONS[::-1]
    assert await applied_versions(db_dsn) == []
    # Nothing is left but the ledger: no table, sequence, index or type of the schema.
    leftovers = await _fetchval(
        db_dsn,
        "SELECT array_agg(relname::text ORDER BY relname) FROM pg_class "
        "WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'S', 'i', 'v') "
        "AND relname NOT IN ('schema_migrations', 'schema_migrations_pkey')",
    )
    assert leftovers is None
    types = await _fetchval(
        db_dsn,
        "SELECT count(*) FROM pg_type WHERE typnamespace = 'public'::regnamespace "
        "AND typtype = 'e'",
    )
    assert types == 0

    assert await migrate_up(db_dsn) == ALL_VERSIONS
    assert await dump_schema(db_dsn) == before


async def test_concurrent_runners_apply_each_migration_exactly_once(empty_db_dsn: str) -> None:
    """Five runners started together on one empty database: the advisory lock serializes them."""
    results = await asyncio.gather(*(migrate_up(empty_db_dsn) for _ in range(5)))
    assert sorted(v for applied in results for v in applied) == ALL_VERSIONS
    assert [applied for applied in results if applied] == [ALL_VERSIONS]
    assert await applied_versions(empty_db_dsn) == ALL_VERSIONS
    assert await _fetchval(empty_db_dsn, "SELECT count(*) FROM timeout_policies") == 6


async def test_runner_waits_while_another_session_holds_the_migration_lock(
    empty_db_dsn: str,
) -> None:
    holder = await asyncpg.connect(empty_db_dsn)
    waiting = (
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        with capture_logs() as logs:
            runner = asyncio.create_task(migrate_up(empty_db_dsn))

            async def runner_blocked() -> bool:
                return bool(await holder.fetchval(waiting) == 1)

            await _wait_until(runner_blocked)
            assert not runner.done()
            assert await applied_versions(empty_db_dsn) == []
            await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
            assert await asyncio.wait_for(runner, 30) == ALL_VERSIONS
        assert "migration_lock_waiting" in [e["event"] for e in logs]
    finally:
        await holder.close()


# --------------------------------------------------------------------------------------------------
# Ledger checks, failures and edge cases, on small migration folders of the test's own


async def test_migrations_are_applied_in_version_order_not_file_order(
    empty_db_dsn: str, write_migrations: WriteMigrations
) -> None:
    folder = write_migrations(
        {
            "0010_later.up.sql": "ALTER TABLE first ADD COLUMN b int;",
            "0002_first.up.sql": "CREATE TABLE first (a int);",
        }
    )
    assert await migrate_up(empty_db_dsn, folder) == [2, 10]


async def test_edited_applied_migration_is_refused_with_a_clear_error(
    empty_db_dsn: str, write_migrations: WriteMigrations
) -> None:
    folder = write_migrations(TWO_MIGRATIONS)
    assert await migrate_up(empty_db_dsn, folder) == [1, 2]
    write_migrations({"0001_a.up.sql": "CREATE TABLE a (id bigint);"})
    with pytest.raises(MigrationChecksumError, match="0001_a was edited after it was applied"):
        await migrate_up(empty_db_dsn, folder)
    with pytest.raises(MigrationChecksumError):
        await migrate_down(empty_db_dsn, 1, folder)
    assert await applied_versions(empty_db_dsn) == [1, 2]


async def test_database_migrated_by_newer_code_is_refused(
    empty_db_dsn: str, write_migrations: WriteMigrations
) -> None:
    folder = write_migrations(TWO_MIGRATIONS)
    await migrate_up(empty_db_dsn, folder)
    (folder / "0002_b.up.sql").unlink()
    (folder / "0002_b.down.sql").unlink()
    with pytest.raises(MigrationStateError, match=r"\[2\].*newer code") as caught:
        await migrate_up(empty_db_dsn, folder)
    assert caught.value.details == {"versions": [2]}


async def test_pending_migration_older_than_the_newest_applied_is_refused(
    empty_db_dsn: str, write_migrations: WriteMigrations
) -> None:
    folder = write_migrations({"0001_a.up.sql": "SELECT 1;", "0003_c.up.sql": "SELECT 3;"})
    await migrate_up(empty_db_dsn, folder)
    write_migrations({"0002_b.up.sql": "CREATE TABLE b (id int);"})
    with pytest.raises(MigrationStateError, match="0002_b is older than the newest applied"):
        await migrate_up(empty_db_dsn, folder)
    assert await applied_versions(empty_db_dsn) == [1, 3]


async def test_failing_migration_is_rolled_back_whole_and_earlier_ones_stay(
    empty_db_dsn: str, write_migrations: WriteMigrations
) -> None:
    folder = write_migrations(
        {
            "0001_a.up.sql": "CREATE TABLE a (id int);",
            "0002_b.up.sql": "CREATE TABLE b (id int);\nSELECT 1 / 0;",
        }
    )
    with pytest.raises(MigrationError, match="0002_b failed and was rolled back") as caught:
        await migrate_up(empty_db_dsn, folder)
    assert isinstance(caught.value.__cause__, asyncpg.DivisionByZeroError)
    assert await applied_versions(empty_db_dsn) == [1]
    assert await _fetchval(empty_db_dsn, "SELECT to_regclass('b')") is None
    assert await _fetchval(empty_db_dsn, "SELECT to_regclass('a')::text") == "a"


async def test_down_refuses_before_reverting_anything_when_a_down_file_is_missing(
    empty_db_dsn: str, write_migrations: WriteMigrations
) -> None:
    folder = write_migrations(
        {
            "0001_a.up.sql": "CREATE TABLE a (id int);",
            "0002_b.up.sql": "CREATE TABLE b (id int);",
            "0002_b.down.sql": "DROP TABLE b;",
        }
    )
    await migrate_up(empty_db_dsn, folder)
    with pytest.raises(MigrationDefinitionError, match="cannot revert 0001_a: no down file"):
        await migrate_down(empty_db_dsn, 2, folder)
    assert await applied_versions(empty_db_dsn) == [1, 2]
    assert await migrate_down(empty_db_dsn, 1, folder) == [2]
    assert await _fetchval(empty_db_dsn, "SELECT to_regclass('b')") is None


async def test_down_with_more_steps_than_applied_reverts_all_and_is_then_a_no_op(
    empty_db_dsn: str, write_migrations: WriteMigrations
) -> None:
    folder = write_migrations(TWO_MIGRATIONS)
    await migrate_up(empty_db_dsn, folder)
    assert await migrate_down(empty_db_dsn, 10, folder) == [2, 1]
    assert await migrate_down(empty_db_dsn, 1, folder) == []


async def test_down_steps_must_be_positive(empty_db_dsn: str) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        await migrate_down(empty_db_dsn, 0)


async def test_empty_migrations_folder_applies_nothing(
    empty_db_dsn: str, write_migrations: WriteMigrations
) -> None:
    assert await migrate_up(empty_db_dsn, write_migrations({})) == []
    assert await applied_versions(empty_db_dsn) == []


async def test_applied_versions_of_a_never_migrated_database_is_empty(empty_db_dsn: str) -> None:
    assert await applied_versions(empty_db_dsn) == []


@pytest.mark.parametrize("operation", ["up", "down", "applied"])
async def test_unreachable_database_raises_storage_error_without_the_dsn(operation: str) -> None:
    dsn = "postgresql://postgres:s3cret-pw@127.0.0.1:1/postgres"
    calls = {"up": migrate_up, "down": migrate_down, "applied": applied_versions}
    with pytest.raises(StorageError, match="cannot connect to the database") as caught:
        await calls[operation](dsn)
    assert "s3cret-pw" not in str(caught.value)


async def test_missing_database_raises_storage_error(server_dsn: str) -> None:
    parts = urlsplit(server_dsn)
    missing = urlunsplit(parts._replace(path="/opsc_no_such_database"))
    with pytest.raises(StorageError, match="InvalidCatalogNameError"):
        await migrate_up(missing)


async def test_broken_ledger_table_raises_storage_error(empty_db_dsn: str) -> None:
    """A foreign ``schema_migrations`` table is reported, not overwritten."""
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        await conn.execute("CREATE TABLE schema_migrations (something_else int)")
    finally:
        await conn.close()
    with pytest.raises(StorageError, match="UndefinedColumnError"):
        await migrate_up(empty_db_dsn)
    with pytest.raises(StorageError, match="cannot read the migration ledger"):
        await applied_versions(empty_db_dsn)


# --------------------------------------------------------------------------------------------------
# Discovery and the migrations folder (no database)


def test_discover_reads_the_repository_migrations(repo_root: Path) -> None:
    migrations = discover(repo_root / "migrations")
    assert [(m.version, m.name, m.label) for m in migrations][:3] == [
        (1, "schema", "0001_schema"),
        (2, "indexes", "0002_indexes"),
        (3, "seed", "0003_seed"),
    ]
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert all(m.down_sql for m in migrations)
    first = migrations[0]
    assert (
        first.checksum
        == hashlib.sha256((repo_root / "migrations/0001_schema.up.sql").read_bytes()).hexdigest()
    )
    assert "CREATE TABLE executions" in first.up_sql
    assert "up_sql" not in repr(first)  # the SQL is not dumped into logs and reprs


@pytest.mark.parametrize(
    ("files", "message"),
    [
        pytest.param({"1_short.up.sql": ""}, "not named NNNN_name", id="short-version"),
        pytest.param({"0001_Upper.up.sql": ""}, "not named NNNN_name", id="upper-case"),
        pytest.param({"0001_a.sql": ""}, "not named NNNN_name", id="no-direction"),
        pytest.param(
            {"0001_a.up.sql": "", "0001_b.up.sql": ""}, "two up files for version 1", id="dup"
        ),
        pytest.param({"0002_b.down.sql": ""}, "has no matching up file", id="orphan-down"),
        pytest.param(
            {"0001_a.up.sql": "", "0001_b.down.sql": ""}, "the names differ", id="name-mismatch"
        ),
    ],
)
def test_discover_rejects_malformed_folders(
    write_migrations: WriteMigrations, files: dict[str, str], message: str
) -> None:
    with pytest.raises(MigrationDefinitionError, match=message):
        discover(write_migrations(files))


def test_discover_ignores_files_that_are_not_sql(write_migrations: WriteMigrations) -> None:
    folder = write_migrations({"README.md": "notes", "0001_a.up.sql": "SELECT 1;"})
    assert [m.label for m in discover(folder)] == ["0001_a"]


def test_discover_of_a_missing_folder_fails(tmp_path: Path) -> None:
    with pytest.raises(MigrationDefinitionError, match="does not exist"):
        discover(tmp_path / "nowhere")


def test_migrations_folder_argument_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPSC_MIGRATIONS_DIR", "/elsewhere")
    assert find_migrations_dir(tmp_path) == tmp_path


def test_migrations_folder_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPSC_MIGRATIONS_DIR", str(tmp_path))
    assert find_migrations_dir() == tmp_path


def test_migrations_folder_found_walking_up_from_the_package(
    repo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPSC_MIGRATIONS_DIR", raising=False)
    assert find_migrations_dir() == repo_root / "migrations"


def test_missing_migrations_folder_says_how_to_configure_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An installed package with no migrations/ above it (a container without the folder)."""
    monkeypatch.delenv("OPSC_MIGRATIONS_DIR", raising=False)
    installed = tmp_path / "site-packages/opsconductor/lifecycle/storage/migrate.py"
    monkeypatch.setattr(migrate, "__file__", str(installed))
    with pytest.raises(MigrationDefinitionError, match="set OPSC_MIGRATIONS_DIR"):
        find_migrations_dir()
