-- Execution reads (storage/execution_reads.py). Those "with steps" bring the execution's steps
-- in position order as a JSON array column (steps_of_execution, read by steps_from_column), so
-- an execution and its steps are one round trip.

-- name: get_execution
-- One execution of a tenant (another tenant's is "not found").
SELECT * FROM executions WHERE id = $1 AND tenant_id = $2

-- name: get_execution_with_steps
-- One execution of a tenant, with its steps.
SELECT e.*, (
    SELECT coalesce(jsonb_agg(to_jsonb(s) ORDER BY s.position), '[]'::jsonb)
    FROM execution_steps s WHERE s.execution_id = e.id
) AS steps_of_execution FROM executions e WHERE e.id = $1 AND e.tenant_id = $2

-- name: find_execution
-- One execution whatever its tenant: for a service's own checks, never a caller's reads.
SELECT * FROM executions WHERE id = $1

-- name: find_execution_with_steps
-- One execution whatever its tenant, with its steps.
SELECT e.*, (
    SELECT coalesce(jsonb_agg(to_jsonb(s) ORDER BY s.position), '[]'::jsonb)
    FROM execution_steps s WHERE s.execution_id = e.id
) AS steps_of_execution FROM executions e WHERE e.id = $1

-- name: find_execution_tenant
-- The tenant owning an execution, for audit decisions only.
SELECT tenant_id FROM executions WHERE id = $1

-- name: list_executions
-- A tenant's executions newest first, optionally of some statuses ($2, empty: all) and a mode
-- ($3), after the keyset cursor ($4 created_at, $5 id), $6 at most.
SELECT * FROM executions
WHERE tenant_id = $1
  AND (cardinality($2::execution_status[]) = 0 OR status = ANY($2::execution_status[]))
  AND ($3::execution_mode IS NULL OR execution_mode = $3::execution_mode)
  AND ($4::timestamptz IS NULL OR (created_at, id) < ($4::timestamptz, $5::uuid))
ORDER BY created_at DESC, id DESC
LIMIT $6
