-- Session-level advisory locks (storage/advisory.py: the reaper; storage/migrate.py: the
-- migrations).

-- name: try_advisory_lock
-- Take the session lock $1 if free, without waiting; whether it was taken back.
SELECT pg_try_advisory_lock($1)

-- name: advisory_lock
-- Wait for the session lock $1.
SELECT pg_advisory_lock($1)

-- name: advisory_unlock
-- Release the session lock $1.
SELECT pg_advisory_unlock($1)
