-- Feature flags (storage/flags.py, storage/flag_history.py).

-- name: load_flags
-- Every feature flag and its value.
SELECT name, value FROM feature_flags

-- name: lock_flags
-- Every feature flag, locked in name order (one order for every writer: no deadlock).
SELECT name, value FROM feature_flags ORDER BY name FOR UPDATE

-- name: upsert_flags
-- Write the flags of the JSON object $1 (name: value), by $2.
INSERT INTO feature_flags (name, value, updated_at, updated_by)
SELECT f.key, f.value, now(), $2
FROM jsonb_each($1::jsonb) AS f(key, value)
ON CONFLICT (name) DO UPDATE
SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at, updated_by = EXCLUDED.updated_by

-- name: list_flag_changes
-- Flag changes newest first, optionally of one flag ($1), after the keyset cursor ($2, $3), $4 at
-- most.
SELECT id, flag, old_value, new_value, changed_by, changed_at
FROM feature_flag_changes
WHERE ($1::text IS NULL OR flag = $1)
  AND ($2::timestamptz IS NULL OR (changed_at, id) < ($2, $3::uuid))
ORDER BY changed_at DESC, id DESC
LIMIT $4
