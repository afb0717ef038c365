-- The dead-letter queue (queue/dlq.py).

-- name: move_to_dlq
-- The move and its moved_to_dlq event in one statement (seq handed out by the execution row as
-- storage/events.py does; the audit hash is the insert trigger's; NOTIFY on $6 delivered at
-- commit). A template: dlq.py puts nothing, or move_to_dlq_counter for the reaper's moves, in
-- place of %COUNTED%.
WITH gone AS (
    DELETE FROM execution_queue WHERE execution_id = $1 RETURNING tenant_id
), moved AS (
    INSERT INTO execution_dlq (execution_id, tenant_id, attempts, error_class, error_message,
                               last_error)
    SELECT $1, gone.tenant_id, $2::int, $3::varchar, $4::text, $5::jsonb FROM gone
    RETURNING id, tenant_id
), next AS (
    UPDATE executions e SET event_seq = e.event_seq + 1
    FROM moved WHERE e.id = $1
    RETURNING e.id, e.event_seq
), event AS (
    INSERT INTO execution_events (execution_id, tenant_id, actor_id, seq, type, payload)
    SELECT next.id, moved.tenant_id, NULL, next.event_seq, 'moved_to_dlq',
           jsonb_build_object('dlq_id', moved.id::text, 'attempts', $2::int,
                              'error_class', $3::varchar)
    FROM next, moved
    RETURNING execution_id, seq
)%COUNTED%
SELECT moved.id, moved.tenant_id,
       (SELECT count(pg_notify($6, event.execution_id::text || ':' || event.seq)) FROM event)
           AS notified
FROM moved

-- name: move_to_dlq_counter
-- The reaper's moves are counted by the moving statement (its process may be gone before a
-- scrape; exported by the api as opsc_reaper_dlq_moves_total).
, counted AS (
    UPDATE metric_counters SET value = value + (SELECT count(*) FROM moved)
    WHERE name = 'reaper_dlq_moves' AND labels = '{}'::jsonb AND EXISTS (SELECT 1 FROM moved)
)

-- name: open_dlq_entry
-- An execution's newest entry not requeued yet.
SELECT id FROM execution_dlq WHERE execution_id = $1 AND requeued_at IS NULL
ORDER BY created_at DESC, id DESC LIMIT 1

-- name: get_dlq_entry
-- One DLQ entry.
SELECT * FROM execution_dlq WHERE id = $1

-- name: lock_dlq_entry
-- One DLQ entry, locked for the rest of the caller's transaction.
SELECT * FROM execution_dlq WHERE id = $1 FOR UPDATE

-- name: dlq_requeued_as
-- Where an entry went when it was requeued as a new execution (the api's audit event).
SELECT execution_id FROM execution_events
WHERE type = 'dlq_requeued' AND tenant_id = $2 AND payload->>'dlq_id' = $1
ORDER BY id DESC LIMIT 1

-- name: mark_dlq_requeued
-- Record who requeued the entry, now.
UPDATE execution_dlq SET requeued_at = clock_timestamp(), requeued_by = $2
WHERE id = $1 RETURNING *

-- name: list_dlq
-- DLQ entries newest first, optionally of a tenant ($1) and an error class ($2), requeued ones too
-- ($3), after the keyset cursor ($4, $5), $6 at most.
SELECT * FROM execution_dlq
WHERE ($1::varchar IS NULL OR tenant_id = $1)
  AND ($2::varchar IS NULL OR error_class = $2)
  AND ($3::boolean OR requeued_at IS NULL)
  AND ($4::timestamptz IS NULL OR (created_at, id) < ($4::timestamptz, $5::uuid))
ORDER BY created_at DESC, id DESC
LIMIT $6

-- name: dlq_size
-- How many entries the DLQ holds, optionally of a tenant, open ones unless $2.
SELECT count(*) FROM execution_dlq
WHERE ($1::varchar IS NULL OR tenant_id = $1) AND ($2::boolean OR requeued_at IS NULL)
