-- The migration runner's own bookkeeping (storage/migrate.py); the migrations themselves are the
-- numbered files it applies.

-- name: create_migration_ledger
-- The ledger of applied migrations, made on first use.
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     INTEGER     PRIMARY KEY,
    name        TEXT        NOT NULL,
    checksum    CHAR(64)    NOT NULL,
    applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
)

-- name: read_migration_ledger
-- The applied migrations, by version.
SELECT version, name, checksum FROM schema_migrations ORDER BY version

-- name: record_migration
-- A migration applied (in the transaction that applied it).
INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)

-- name: forget_migration
-- A migration reverted (in the transaction that reverted it).
DELETE FROM schema_migrations WHERE version = $1

-- name: migration_ledger_exists
-- The ledger table, or NULL when the database was never migrated.
SELECT to_regclass('schema_migrations')
