-- Event reads (storage/event_reads.py).

-- name: events_after
-- An execution's events after a seq, in seq order, $3 at most (not tenant-scoped: the caller
-- checked the tenant).
SELECT id, execution_id, tenant_id, actor_id, seq, type, payload, created_at FROM execution_events
WHERE execution_id = $1 AND seq > $2
ORDER BY seq
LIMIT $3

-- name: event_head
-- executions.event_seq is the last seq handed out; the terminal event ($2) is written in the
-- transaction that makes the execution terminal.
SELECT e.tenant_id, e.event_seq,
       (SELECT min(v.seq) FROM execution_events v
        WHERE v.execution_id = e.id AND v.type = $2) AS completed_seq
FROM executions e WHERE e.id = $1

-- name: list_execution_events
-- A tenant's events of one execution ($2), in seq order: optionally of some types ($3), of an
-- actor ($4), after a seq ($5), after an id ($6), $7 at most. The same filter as
-- list_tenant_events but ordered by seq (its own statement, so each has its own plan).
SELECT id, execution_id, tenant_id, actor_id, seq, type, payload, created_at FROM execution_events
WHERE tenant_id = $1
  AND ($2::uuid IS NULL OR execution_id = $2)
  AND (cardinality($3::text[]) = 0 OR type = ANY($3::text[]))
  AND ($4::text IS NULL OR actor_id = $4)
  AND ($2::uuid IS NULL OR seq > $5)
  AND id > $6
ORDER BY seq
LIMIT $7

-- name: list_tenant_events
-- A tenant's events across executions ($2 NULL), in id order, with list_execution_events'
-- filters.
SELECT id, execution_id, tenant_id, actor_id, seq, type, payload, created_at FROM execution_events
WHERE tenant_id = $1
  AND ($2::uuid IS NULL OR execution_id = $2)
  AND (cardinality($3::text[]) = 0 OR type = ANY($3::text[]))
  AND ($4::text IS NULL OR actor_id = $4)
  AND ($2::uuid IS NULL OR seq > $5)
  AND id > $6
ORDER BY id
LIMIT $7
