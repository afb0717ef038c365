-- The Postgres side of the queue: execution_queue rows (queue/jobs.py).

-- name: insert_queue_row
-- The row, or the one the execution already has, in one statement (a row committed after
-- this statement's snapshot is read by a second one).
WITH inserted AS (
    INSERT INTO execution_queue (execution_id, tenant_id, priority, max_attempts, state,
                                 available_at)
    VALUES ($1, $2, $3, $4,
            CASE WHEN $5::timestamptz > clock_timestamp() THEN 'delayed' ELSE 'ready' END,
            COALESCE($5::timestamptz, clock_timestamp()))
    ON CONFLICT (execution_id) DO NOTHING
    RETURNING *
)
SELECT * FROM inserted
UNION ALL
SELECT * FROM execution_queue WHERE execution_id = $1 AND NOT EXISTS (SELECT 1 FROM inserted)

-- name: get_queue_row
-- One queue row by its job id.
SELECT * FROM execution_queue WHERE id = $1

-- name: lock_queue_row
-- One queue row by its job id, locked for the caller's transaction.
SELECT * FROM execution_queue WHERE id = $1 FOR UPDATE

-- name: queue_row_of_execution
-- The queue row of an execution.
SELECT * FROM execution_queue WHERE execution_id = $1

-- name: lease_queue_row
-- The lease handoff: the queue row and the execution's fencing token change together. The
-- execution's worker_id is left to the claim (execution_leases.claim_execution), which reports it
-- as the previous holder when it takes a dead worker's execution over.
WITH leased AS (
    UPDATE execution_queue
    SET state = 'leased', lease_owner = $2, lease_token = $3, lease_expires_at = $4,
        lease_renewals = 0, attempts = $5, updated_at = clock_timestamp()
    WHERE id = $1
    RETURNING *
), fenced AS (
    UPDATE executions e SET lease_token = $3, updated_at = clock_timestamp()
    FROM leased WHERE e.id = leased.execution_id
    RETURNING e.id
)
SELECT leased.* FROM leased LEFT JOIN fenced ON fenced.id = leased.execution_id

-- name: renew_queue_row
-- Extend the lease (to $3, renewal count $4), fenced on the lease token.
UPDATE execution_queue
SET lease_expires_at = $3, lease_renewals = $4, updated_at = clock_timestamp()
WHERE id = $1 AND lease_token = $2 AND state = 'leased'

-- name: retry_queue_row
-- The retry and its event in one statement (seq handed out by the execution row, as
-- storage/events.py does; the audit hash is the insert trigger's; NOTIFY delivered at commit).
WITH retried AS (
    UPDATE execution_queue
    SET state = 'delayed', attempts = $3, available_at = $4, last_error = $5, lease_owner = NULL,
        lease_token = NULL, lease_expires_at = NULL, updated_at = clock_timestamp()
    WHERE id = $1 AND lease_token = $2 AND state = 'leased'
    RETURNING execution_id, tenant_id
), next AS (
    UPDATE executions e SET event_seq = e.event_seq + 1
    FROM retried WHERE e.id = retried.execution_id
    RETURNING e.id, e.event_seq
), event AS (
    INSERT INTO execution_events (execution_id, tenant_id, actor_id, seq, type, payload)
    SELECT next.id, retried.tenant_id, NULL, next.event_seq, 'retry_scheduled',
           jsonb_build_object('attempts', $3::int, 'available_at', $6::text,
                              'error_class', $5::jsonb -> 'error_class')
    FROM next, retried
    RETURNING execution_id, seq
)
SELECT retried.execution_id,
       (SELECT count(pg_notify($7, event.execution_id::text || ':' || event.seq)) FROM event)
           AS notified
FROM retried

-- name: release_queue_row
-- Hand a leased job back (ready now, or delayed to $3), fenced on the lease token.
UPDATE execution_queue
SET state = CASE WHEN $3::timestamptz > clock_timestamp() THEN 'delayed' ELSE 'ready' END,
    available_at = COALESCE($3::timestamptz, clock_timestamp()),
    lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = clock_timestamp()
WHERE id = $1 AND lease_token = $2 AND state = 'leased'

-- name: delete_queue_row
-- A job's row gone (its execution ended).
DELETE FROM execution_queue WHERE id = $1

-- name: delete_queue_row_fenced
-- A job's row gone, only while the lease token still holds it.
DELETE FROM execution_queue WHERE id = $1 AND lease_token = $2

-- name: queue_rows_missing
-- With the renewal limit of the execution's policy and the execution's correlation (request id,
-- traceparent): a re-pushed job needs them and the row has not.
SELECT q.*, p.max_lease_renewals, e.request_id, e.trace_context
FROM execution_queue q
JOIN executions e ON e.id = q.execution_id
LEFT JOIN timeout_policies p ON p.id = e.timeout_policy_id
WHERE NOT (q.id = ANY($1::uuid[]))
ORDER BY q.priority, q.enqueued_at, q.id
LIMIT $2

-- name: existing_queue_rows
-- Which of the job ids still have a queue row.
SELECT id FROM execution_queue WHERE id = ANY($1::uuid[])
