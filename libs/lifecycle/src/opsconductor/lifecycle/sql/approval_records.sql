-- Approval reads (storage/approval_records.py): each request with the plan it covers, taken
-- from its execution's stored snapshot.

-- name: get_tenant_approval
-- One approval request of a tenant, with its plan.
SELECT a.*, e.plan_snapshot -> 'plan' AS plan
FROM approvals a JOIN executions e ON e.id = a.execution_id
WHERE a.id = $1 AND a.tenant_id = $2

-- name: step_approval
-- The request of an execution's step: the pending one, else the newest.
SELECT a.*, e.plan_snapshot -> 'plan' AS plan
FROM approvals a JOIN executions e ON e.id = a.execution_id
WHERE a.execution_id = $1 AND a.tenant_id = $2 AND a.step_id = $3
ORDER BY (a.state = 'pending') DESC, a.created_at DESC, a.id DESC
LIMIT 1

-- name: list_pending_approvals
-- A tenant's unexpired pending requests, oldest first, after the keyset cursor ($2, $3), $4 at
-- most.
SELECT a.*, e.plan_snapshot -> 'plan' AS plan
FROM approvals a JOIN executions e ON e.id = a.execution_id
WHERE a.tenant_id = $1 AND a.state = 'pending' AND a.expires_at > clock_timestamp()
  AND ($2::timestamptz IS NULL OR (a.created_at, a.id) > ($2::timestamptz, $3::uuid))
ORDER BY a.created_at, a.id
LIMIT $4

-- name: close_pending_approvals
-- Close every pending request of an execution (state $2), returning them.
UPDATE approvals SET state = $2::approval_state
WHERE execution_id = $1 AND state = 'pending'
RETURNING *

-- name: approval_owner
-- The tenant and execution of an approval request, for audit decisions only.
SELECT tenant_id, execution_id FROM approvals WHERE id = $1
