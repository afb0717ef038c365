-- Audit events and the event chain (storage/audit.py, storage/audit_chain.py).

-- name: execution_in_tenant
-- Whether the execution exists in the tenant (an audit event is linked only then).
SELECT 1 FROM executions WHERE id = $1 AND tenant_id = $2

-- name: list_rbac_violations
-- A tenant's recorded denials of one type ($2), optionally of one actor ($3), newest first, $4 at
-- most.
SELECT id, tenant_id, actor_id, execution_id, payload, created_at
FROM execution_events
WHERE tenant_id = $1 AND type = $2 AND ($3::varchar IS NULL OR actor_id = $3)
ORDER BY created_at DESC, id DESC
LIMIT $4

-- name: execution_event_seq
-- The execution's last event seq, in the tenant.
SELECT event_seq FROM executions WHERE id = $1 AND tenant_id = $2

-- name: execution_event_links
-- Every event of an execution in seq order with its stored hash and its canonical form as the
-- chain trigger hashes it.
SELECT seq, hash,
       execution_event_canonical(execution_id, seq, tenant_id, actor_id, type, payload,
                                 created_at) AS canonical
FROM execution_events
WHERE execution_id = $1
ORDER BY seq
