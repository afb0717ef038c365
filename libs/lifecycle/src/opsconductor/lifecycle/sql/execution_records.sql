-- The execution row lock every fenced writer takes (storage/execution_records.py).

-- name: lock_execution
-- Lock the execution row and read what fencing checks: its tenant, status and lease token.
SELECT id, tenant_id, actor_id, status, lease_token
FROM executions WHERE id = $1
FOR UPDATE
