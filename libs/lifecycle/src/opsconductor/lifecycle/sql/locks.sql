-- Mutual-exclusion locks on targets (storage/locks.py).

-- name: acquire_locks
-- Rows are visited in "C" collation order in every locking statement: the global order that makes
-- overlapping plans deadlock-free. Python's str ordering (code points) is the same order.
INSERT INTO execution_locks AS held
    (lock_key, tenant_id, target_ref, action, owner_token, owner_execution_id, expires_at)
SELECT r.lock_key, r.tenant_id, r.target_ref, r.action, $5, $6, now() + $7::interval
FROM unnest($1::varchar[], $2::varchar[], $3::varchar[], $4::varchar[])
    AS r (lock_key, tenant_id, target_ref, action)
ORDER BY r.lock_key COLLATE "C"
ON CONFLICT (lock_key) DO UPDATE
SET owner_token = EXCLUDED.owner_token,
    owner_execution_id = EXCLUDED.owner_execution_id,
    fencing_token = nextval('execution_lock_fencing_seq'),
    acquired_at = now(),
    expires_at = EXCLUDED.expires_at
WHERE held.expires_at < now()
    -- The same execution re-taking its locks after its worker died or lost its lease: the new
    -- owner gets a new fencing token, so the old one can neither release nor extend them.
    OR (EXCLUDED.owner_execution_id IS NOT NULL
        AND held.owner_execution_id = EXCLUDED.owner_execution_id)
RETURNING lock_key, fencing_token, expires_at

-- name: lock_holders
-- Who else holds any of the keys (for the busy answer).
SELECT lock_key, owner_execution_id FROM execution_locks
WHERE lock_key = ANY($1::varchar[]) AND owner_token <> $2
  AND owner_execution_id IS DISTINCT FROM $3
ORDER BY lock_key COLLATE "C"

-- name: release_locks
-- Release the caller's locks ($2: its owner token), each row locked first in the global key order.
DELETE FROM execution_locks
WHERE lock_key IN (
SELECT lock_key FROM execution_locks
WHERE lock_key = ANY($1::varchar[]) AND owner_token = $2
ORDER BY lock_key COLLATE "C"
FOR UPDATE
) AND owner_token = $2

-- name: extend_locks
-- Extend the caller's locks by $3, each row locked first in the global key order.
UPDATE execution_locks SET expires_at = now() + $3::interval
WHERE lock_key IN (
SELECT lock_key FROM execution_locks
WHERE lock_key = ANY($1::varchar[]) AND owner_token = $2
ORDER BY lock_key COLLATE "C"
FOR UPDATE
) AND owner_token = $2
RETURNING lock_key, fencing_token, expires_at

-- name: lock_status
-- One live lock and its holder.
SELECT lock_key, owner_execution_id, fencing_token, acquired_at, expires_at
FROM execution_locks WHERE lock_key = $1 AND expires_at >= now()

-- name: reap_locks
-- SKIP LOCKED: a row locked by someone else is being taken over, released or reaped by another
-- reaper; skipping it means the reaper never waits (so never deadlocks) and never double-counts.
-- The count goes to metric_counters in the same statement (a data-modifying CTE always runs):
-- exported by the api, since the reaper's process may live one pass only (migration 0009).
WITH reaped AS (
    DELETE FROM execution_locks
    WHERE lock_key IN (
        SELECT lock_key FROM execution_locks WHERE expires_at < now()
        FOR UPDATE SKIP LOCKED
    ) AND expires_at < now()
    RETURNING lock_key
), counted AS (
    UPDATE metric_counters SET value = value + (SELECT count(*) FROM reaped)
    WHERE name = 'mutex_reaped' AND EXISTS (SELECT 1 FROM reaped)
)
SELECT lock_key FROM reaped

-- name: release_execution_locks
-- Release every lock an execution holds, in the global key order.
DELETE FROM execution_locks
WHERE lock_key IN (
    SELECT lock_key FROM execution_locks WHERE owner_execution_id = $1
    ORDER BY lock_key COLLATE "C"
    FOR UPDATE
) AND owner_execution_id = $1
RETURNING lock_key
