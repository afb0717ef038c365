-- The execution event log's statements (storage/events.py) and the plain NOTIFY.

-- name: append_event
-- One round trip for an execution's event: take the next seq, insert, notify ($6: the channel).
-- The NOTIFY is queued in the same statement and delivered at commit, never for a rolled-back
-- change.
WITH next AS (
    UPDATE executions SET event_seq = event_seq + 1 WHERE id = $1 RETURNING id, event_seq
), inserted AS (
    INSERT INTO execution_events (execution_id, tenant_id, actor_id, seq, type, payload)
    SELECT next.id, $2, $3, next.event_seq, $4, $5 FROM next
    RETURNING seq
)
SELECT seq, pg_notify($6, $1::text || ':' || seq) FROM inserted

-- name: append_unbound_event
-- An event of no execution (seq 0), notified as ":{event_id}" on channel $5.
WITH inserted AS (
    INSERT INTO execution_events (execution_id, tenant_id, actor_id, seq, type, payload)
    VALUES (NULL, $1, $2, 0, $3, $4)
    RETURNING id
)
SELECT id, pg_notify($5, ':' || id) FROM inserted

-- name: notify
-- NOTIFY channel $1 with payload $2, delivered when the caller's transaction commits.
SELECT pg_notify($1, $2)
