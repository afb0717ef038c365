-- Approval requests and decisions (storage/approvals.py).

-- name: create_approval
-- The hashes and the requester come from the execution row itself: an approval can only ever
-- cover what was stored for that execution.
-- On a conflict with the pending request of the same execution and step: nothing (read it with
-- pending_approval_for_step).
INSERT INTO approvals (tenant_id, execution_id, step_id, level, plan_hash, plan_snapshot_hash,
                       requested_by, runbook_url, expires_at)
SELECT e.tenant_id, e.id, $2, e.approval_level, e.plan_hash, e.plan_snapshot_hash, e.actor_id,
       e.plan_snapshot -> 'plan' ->> 'runbook_url', clock_timestamp() + $3::interval
FROM executions e WHERE e.id = $1
ON CONFLICT (execution_id, COALESCE(step_id, '')) WHERE state = 'pending' DO NOTHING
RETURNING *

-- name: pending_approval_for_step
-- The pending request of an execution's step.
SELECT * FROM approvals WHERE execution_id = $1 AND step_id = $2 AND state = 'pending'

-- name: mark_step_awaiting_approval
-- The step waits for its decision (from pending, running or a failed attempt).
UPDATE execution_steps SET status = 'awaiting_approval'
WHERE execution_id = $1 AND step_id = $2 AND status IN ('pending', 'running', 'failed')

-- name: decide_approval
-- Decide a pending, unexpired request once; nothing back when it was decided or expired.
UPDATE approvals
SET state = $2::approval_state, decided_by = $3, auth_method = $4, source_ip = $5,
    comment = $6, decided_at = clock_timestamp()
WHERE id = $1 AND state = 'pending' AND expires_at > clock_timestamp()
RETURNING *

-- name: invalidate_approval
-- A request that can no longer be acted on (pending, or approved but not yet used).
UPDATE approvals SET state = 'invalidated'
WHERE id = $1 AND state IN ('pending', 'approved')
RETURNING *

-- name: due_approvals
-- Pending requests past their expiry, oldest first, $1 at most (reaper).
SELECT id, execution_id FROM approvals
WHERE state = 'pending' AND expires_at <= clock_timestamp()
ORDER BY expires_at
LIMIT $1

-- name: expire_approval
-- Expire one pending request past its expiry, under compare-and-set.
UPDATE approvals SET state = 'expired'
WHERE id = $1 AND state = 'pending' AND expires_at <= clock_timestamp()
RETURNING *

-- name: undispatched_approved_executions
-- Immediate executions approved over $1 ago that no worker started (their dispatch was lost),
-- oldest decision first, $2 at most.
SELECT e.id, e.tenant_id, a.id AS approval_id FROM executions e
JOIN approvals a ON a.id = e.approval_id
WHERE e.status = 'awaiting_approval' AND e.execution_mode = 'immediate'
  AND a.state = 'approved' AND a.step_id IS NULL
  AND a.decided_at < clock_timestamp() - $1::interval
ORDER BY a.decided_at
LIMIT $2

-- name: execution_approved_by
-- Whether $3 approved the tenant's execution (the request it waits on).
SELECT 1 FROM executions e JOIN approvals a ON a.id = e.approval_id
WHERE e.id = $1 AND e.tenant_id = $2 AND a.state = 'approved' AND a.decided_by = $3

-- name: step_approved
-- Whether a step's request was approved for exactly this plan (hashes $3, $4).
SELECT 1 FROM approvals
WHERE execution_id = $1 AND step_id = $2 AND state = 'approved'
  AND plan_hash = $3 AND plan_snapshot_hash = $4

-- name: execution_cancel_requested
-- Whether a cancellation of the execution was requested.
SELECT cancelled_at IS NOT NULL FROM executions WHERE id = $1

-- name: execution_of_tenant_approval
-- The execution a tenant's approval request belongs to.
SELECT execution_id FROM approvals WHERE id = $1 AND tenant_id = $2

-- name: get_approval
-- One approval request, whatever its tenant (the caller checked it).
SELECT * FROM approvals WHERE id = $1

-- name: execution_of_approval
-- The execution an approval request belongs to.
SELECT execution_id FROM approvals WHERE id = $1
