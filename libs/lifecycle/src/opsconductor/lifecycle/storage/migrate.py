"""Schema migrations: numbered SQL files applied in order, under a Postgres advisory lock.

Files
    ``NNNN_name.up.sql`` and ``NNNN_name.down.sql`` in one folder (``NNNN``: the version, at least
    four digits; ``name``: lower_snake_case, the same in both files). The up file is required; the
    down file only when the migration is to be reverted. Any other ``*.sql`` file in the folder is
    an error, so that a misnamed file cannot be skipped silently. A file must not contain
    transaction control (BEGIN/COMMIT): the runner wraps each one in a transaction of its own.

Where the folder is (:func:`find_migrations_dir`)
    1. the ``migrations_dir`` argument (``--dir`` on the command line);
    2. else the setting ``OPSC_MIGRATIONS_DIR``;
    3. else the first ``migrations/`` folder holding ``*.up.sql`` found walking up from this file,
       i.e. the repository's top-level ``migrations/`` for a checkout or an editable install.
    Container images copy the folder next to the application and set ``OPSC_MIGRATIONS_DIR``.

Guarantees
    - Runners serialize on a session-level advisory lock, key :data:`MIGRATION_LOCK_KEY`: several
      replicas or Jobs started together apply each migration exactly once; the others wait (as
      long as it takes), then find nothing to do. The lock is released when the runner's session
      ends, so the runner needs a real session: a direct connection or PgBouncer in session mode,
      not transaction pooling.
    - Each migration and its ledger row commit in one transaction: a failed migration leaves no
      trace and the ones before it stay applied.
    - Re-running is a no-op.
    - The ledger ``schema_migrations(version, name, checksum, applied_at)`` keeps the sha256 of each
      applied up file; running against a database whose applied migration has since been edited
      raises :class:`MigrationChecksumError`, and one that holds versions this code does not know
      (migrated by newer code), or that lacks a version older than its newest, raises
      :class:`MigrationStateError`. Nothing is changed in either case.
    - Reverting a migration without a down file raises :class:`MigrationDefinitionError` before
      anything is reverted.

Command line (``make migrate`` / ``make migrate-down``)::

    python -m opsconductor.lifecycle.storage.migrate up|down [--steps N]|status \
        [--dsn DSN] [--dir DIR]

The database comes from ``--dsn``, else ``OPSC_DATABASE_URL``, else ``DATABASE_URL``. Progress
is logged as structured lines (``migration_applied``, ``migration_reverted``, ...). On an expected
failure (no database configured, database unreachable, a failing or edited migration) the
command prints one line ``migrate: error: <reason>`` on stderr and exits 1, without a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import re
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NoReturn

import asyncpg
import structlog
from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from opsconductor.common.errors import (
    MigrationChecksumError,
    MigrationDefinitionError,
    MigrationError,
    MigrationStateError,
    OpsConductorError,
    StorageError,
)
from opsconductor.common.logconfig import configure_logging
from opsconductor.common.settings import ENV_PREFIX
from opsconductor.lifecycle.storage.queries import query

__all__ = [
    "MIGRATION_LOCK_KEY",
    "Migration",
    "MigrationChecksumError",
    "MigrationDefinitionError",
    "MigrationError",
    "MigrationSettings",
    "MigrationStateError",
    "applied_versions",
    "discover",
    "find_migrations_dir",
    "main",
    "migrate_down",
    "migrate_up",
]

# Named explicitly: run with `python -m`, this module is `__main__`.
log = structlog.get_logger("opsconductor.lifecycle.storage.migrate")

#: Key of the session-level advisory lock every runner holds while it works: the ASCII bytes of
#: "opsc_mig" read as a big-endian bigint. No other code in the system may use this key.
MIGRATION_LOCK_KEY: Final = 0x6F7073635F6D6967

_FILE_NAME = re.compile(r"(?P<version>\d{4,})_(?P<name>[a-z0-9][a-z0-9_]*)\.(?P<dir>up|down)\.sql")
_CONNECT_TIMEOUT_S = 10.0

_CREATE_LEDGER = query("create_migration_ledger")
_READ_LEDGER = query("read_migration_ledger")
_RECORD = query("record_migration")
_FORGET = query("forget_migration")
_TRY_LOCK = query("try_advisory_lock")
_LOCK = query("advisory_lock")
_LEDGER_EXISTS = query("migration_ledger_exists")

# What asyncpg raises when the database cannot be reached or the session breaks.
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)


class MigrationSettings(BaseSettings):
    """Environment of the migrations runner (prefix ``OPSC_``; ``DATABASE_URL`` also accepted)."""

    # Not a ServiceSettings: the runner needs no service fields, and a missing DATABASE_URL is
    # reported by the command line as one line rather than as a validation error.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, hide_input_in_errors=True
    )

    #: ``OPSC_DATABASE_URL``, else ``DATABASE_URL`` (as in ``ServiceSettings``).
    database_url: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices(f"{ENV_PREFIX}DATABASE_URL", "DATABASE_URL"),
    )
    #: ``OPSC_MIGRATIONS_DIR``: the folder of migration files.
    migrations_dir: Path | None = None


@dataclass(frozen=True)
class Migration:
    """One numbered migration: its up SQL, its optional down SQL and the up file's sha256."""

    version: int
    name: str
    up_sql: str = field(repr=False)
    down_sql: str | None = field(repr=False)
    checksum: str

    @property
    def label(self) -> str:
        """``NNNN_name``, as in the file names."""
        return f"{self.version:04d}_{self.name}"


@dataclass(frozen=True)
class _LedgerRow:
    version: int
    name: str
    checksum: str


def find_migrations_dir(migrations_dir: Path | None = None) -> Path:
    """Resolve the migrations folder: the argument, ``OPSC_MIGRATIONS_DIR``, or a walk upwards."""
    if migrations_dir is not None:
        return migrations_dir
    configured = MigrationSettings().migrations_dir
    if configured is not None:
        return configured
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "migrations"
        if candidate.is_dir() and any(candidate.glob("*.up.sql")):
            return candidate
    raise MigrationDefinitionError(
        "no migrations folder found above the installed package; set OPSC_MIGRATIONS_DIR"
    )


def discover(migrations_dir: Path) -> list[Migration]:
    """Read and check the migration files of ``migrations_dir``, ordered by version."""
    if not migrations_dir.is_dir():
        raise MigrationDefinitionError(f"migrations folder {migrations_dir} does not exist")
    files: dict[str, dict[int, tuple[str, Path]]] = {"up": {}, "down": {}}
    for path in sorted(migrations_dir.glob("*.sql")):
        match = _FILE_NAME.fullmatch(path.name)
        if match is None:
            raise MigrationDefinitionError(
                f"{path.name} in {migrations_dir} is not named NNNN_name.up.sql or "
                "NNNN_name.down.sql"
            )
        version, name = int(match["version"]), match["name"]
        same_direction = files[match["dir"]]
        if version in same_direction:
            raise MigrationDefinitionError(
                f"two {match['dir']} files for version {version} in {migrations_dir}: "
                f"{same_direction[version][1].name} and {path.name}"
            )
        same_direction[version] = (name, path)
    ups, downs = files["up"], files["down"]
    for version, (name, path) in downs.items():
        if version not in ups:
            raise MigrationDefinitionError(f"{path.name} has no matching up file")
        if ups[version][0] != name:
            raise MigrationDefinitionError(
                f"{path.name} does not match {ups[version][1].name}: the names differ"
            )
    migrations = []
    for version in sorted(ups):
        name, up_path = ups[version]
        up_bytes = up_path.read_bytes()
        down = downs.get(version)
        migrations.append(
            Migration(
                version=version,
                name=name,
                up_sql=up_bytes.decode("utf-8"),
                down_sql=down[1].read_text(encoding="utf-8") if down else None,
                checksum=hashlib.sha256(up_bytes).hexdigest(),
            )
        )
    return migrations


async def _connect(dsn: str) -> asyncpg.Connection:
    try:
        conn: asyncpg.Connection = await asyncpg.connect(dsn, timeout=_CONNECT_TIMEOUT_S)
    except (*_DRIVER_ERRORS, ValueError) as exc:
        # The driver's message names host and cause; the DSN (which may hold a password) is
        # never repeated.
        raise StorageError(
            f"cannot connect to the database: {type(exc).__name__}: {exc}".rstrip(": ")
        ) from exc
    return conn


@asynccontextmanager
async def _migration_session(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection holding the migration lock, with the ledger table in place."""
    conn = await _connect(dsn)
    try:
        if not await conn.fetchval(_TRY_LOCK, MIGRATION_LOCK_KEY):
            log.info("migration_lock_waiting", lock_key=MIGRATION_LOCK_KEY)
            await conn.execute(_LOCK, MIGRATION_LOCK_KEY)
        log.debug("migration_lock_acquired", lock_key=MIGRATION_LOCK_KEY)
        await conn.execute(_CREATE_LEDGER)
        yield conn
    except _DRIVER_ERRORS as exc:
        raise StorageError(f"database error during migration: {type(exc).__name__}: {exc}") from exc
    finally:
        # Ending the session releases its advisory lock, even when the session broke.
        await conn.close()


async def _read_ledger(conn: asyncpg.Connection) -> dict[int, _LedgerRow]:
    rows = await conn.fetch(_READ_LEDGER)
    return {
        row["version"]: _LedgerRow(row["version"], row["name"], row["checksum"]) for row in rows
    }


def _check_history(applied: dict[int, _LedgerRow], migrations: Sequence[Migration]) -> None:
    known = {m.version: m for m in migrations}
    unknown = sorted(set(applied) - set(known))
    if unknown:
        raise MigrationStateError(
            f"the database has migration(s) {unknown} that are not among the migration files; "
            "it was migrated by newer code",
            versions=unknown,
        )
    for version, row in applied.items():
        migration = known[version]
        if row.checksum != migration.checksum:
            raise MigrationChecksumError(
                f"migration {migration.label} was edited after it was applied (checksum "
                f"{row.checksum[:12]} in the database, {migration.checksum[:12]} on disk); "
                "add a new migration instead of editing an applied one",
                version=version,
            )


async def _run_step(
    conn: asyncpg.Connection, migration: Migration, sql: str, ledger_sql: str, *ledger_args: object
) -> None:
    """Run one migration's SQL and its ledger change in one transaction."""
    try:
        async with conn.transaction():
            await conn.execute(sql)
            await conn.execute(ledger_sql, *ledger_args)
    except asyncpg.PostgresError as exc:
        raise MigrationError(
            f"migration {migration.label} failed and was rolled back: {type(exc).__name__}: {exc}",
            version=migration.version,
        ) from exc


async def migrate_up(dsn: str, migrations_dir: Path | None = None) -> list[int]:
    """Apply every pending migration in order; return the versions applied (empty if none)."""
    migrations = discover(find_migrations_dir(migrations_dir))
    async with _migration_session(dsn) as conn:
        applied = await _read_ledger(conn)
        _check_history(applied, migrations)
        pending = [m for m in migrations if m.version not in applied]
        if pending and applied and pending[0].version < max(applied):
            raise MigrationStateError(
                f"migration {pending[0].label} is older than the newest applied one "
                f"({max(applied)}); renumber it after the applied migrations",
                version=pending[0].version,
            )
        for migration in pending:
            started = time.perf_counter()
            await _run_step(
                conn,
                migration,
                migration.up_sql,
                _RECORD,
                migration.version,
                migration.name,
                migration.checksum,
            )
            log.info(
                "migration_applied",
                version=migration.version,
                name=migration.name,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
            )
    log.info(
        "migrations_up_to_date",
        applied=[m.version for m in pending],
        version=migrations[-1].version if migrations else 0,
    )
    return [m.version for m in pending]


async def migrate_down(dsn: str, steps: int = 1, migrations_dir: Path | None = None) -> list[int]:
    """Revert the last ``steps`` applied migrations, newest first; return the versions reverted.

    Reverts fewer when fewer are applied. Every migration to revert must have a down file; this
    is checked before the first one is reverted.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")
    migrations = discover(find_migrations_dir(migrations_dir))
    by_version = {m.version: m for m in migrations}
    async with _migration_session(dsn) as conn:
        applied = await _read_ledger(conn)
        _check_history(applied, migrations)
        to_revert = [by_version[v] for v in sorted(applied, reverse=True)[:steps]]
        down_sql = {m.version: m.down_sql for m in to_revert if m.down_sql is not None}
        irreversible = [m.label for m in to_revert if m.version not in down_sql]
        if irreversible:
            raise MigrationDefinitionError(
                f"cannot revert {', '.join(irreversible)}: no down file", versions=irreversible
            )
        for migration in to_revert:
            started = time.perf_counter()
            await _run_step(
                conn, migration, down_sql[migration.version], _FORGET, migration.version
            )
            log.info(
                "migration_reverted",
                version=migration.version,
                name=migration.name,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
            )
    return [m.version for m in to_revert]


async def applied_versions(dsn: str) -> list[int]:
    """Versions recorded in the ledger, ascending (empty when the database was never migrated)."""
    conn = await _connect(dsn)
    try:
        if await conn.fetchval(_LEDGER_EXISTS) is None:
            return []
        return [row["version"] for row in await conn.fetch(_READ_LEDGER)]
    except _DRIVER_ERRORS as exc:
        raise StorageError(
            f"cannot read the migration ledger: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        await conn.close()


# --------------------------------------------------------------------------------------------------
# Command line


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dsn", help="database URL (default: $OPSC_DATABASE_URL, else $DATABASE_URL)"
    )
    common.add_argument(
        "--dir",
        dest="migrations_dir",
        type=Path,
        help="migrations folder (default: $OPSC_MIGRATIONS_DIR, else found above the package)",
    )
    parser = argparse.ArgumentParser(
        prog="python -m opsconductor.lifecycle.storage.migrate",
        description="Apply or revert the OpsConductor schema migrations.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", parents=[common], help="apply every pending migration")
    down = commands.add_parser("down", parents=[common], help="revert the last migration(s)")
    down.add_argument("--steps", type=_positive_int, default=1, help="how many (default 1)")
    commands.add_parser("status", parents=[common], help="list applied and pending migrations")
    return parser


async def _status(dsn: str, migrations_dir: Path | None) -> None:
    migrations = discover(find_migrations_dir(migrations_dir))
    applied = set(await applied_versions(dsn))
    for migration in migrations:
        state = "applied" if migration.version in applied else "pending"
        log.info("migration_status", version=migration.version, name=migration.name, state=state)


async def _run(args: argparse.Namespace, dsn: str) -> None:
    if args.command == "up":
        await migrate_up(dsn, args.migrations_dir)
    elif args.command == "down":
        reverted = await migrate_down(dsn, args.steps, args.migrations_dir)
        log.info("migrations_reverted", reverted=reverted)
    else:
        await _status(dsn, args.migrations_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 failed, 2 usage)."""
    args = _parser().parse_args(argv)
    dsn = args.dsn
    if not dsn:
        configured = MigrationSettings().database_url
        dsn = configured.get_secret_value() if configured is not None else ""
    if not dsn:
        print(
            "migrate: error: no database configured: set DATABASE_URL (or OPSC_DATABASE_URL) "
            "or pass --dsn",
            file=sys.stderr,
        )
        return 2
    try:
        asyncio.run(_run(args, dsn))
    except OpsConductorError as exc:
        print(f"migrate: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    return 0


def _cli() -> NoReturn:  # pragma: no cover - exercised as a subprocess by the tests
    configure_logging(service="migrate")
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    _cli()
