-- Leases on executions: claim, take-over, release, renewals and the reaper's scans
-- (storage/execution_leases.py).

-- name: take_over_execution
-- A new lease on a running execution whose worker died or lost its lease: new token and worker,
-- one more attempt, a new deadline.
UPDATE executions
SET lease_token = $2, worker_id = $3, attempts = attempts + 1, deadline_at = $4,
    updated_at = clock_timestamp()
WHERE id = $1

-- name: reset_running_steps
-- Steps left running by the previous lease holder start over.
UPDATE execution_steps SET status = 'pending', started_at = NULL, worker_id = NULL
WHERE execution_id = $1 AND status = 'running'
RETURNING step_id

-- name: release_claim
-- Clear the fencing token if it is still the caller's (the job goes back to the queue).
UPDATE executions SET lease_token = NULL, updated_at = clock_timestamp()
WHERE id = $1 AND lease_token = $2

-- name: lock_execution_for_claim
-- The execution row locked for a claim, with what the claim decides on.
SELECT status, lease_token, worker_id, tenant_id FROM executions WHERE id = $1 FOR UPDATE

-- name: execution_attempts
-- How many attempts the execution has had.
SELECT attempts FROM executions WHERE id = $1

-- name: count_lease_renewal
-- Count a lease renewal, fenced on the lease token.
UPDATE executions SET lease_renewals = lease_renewals + 1 WHERE id = $1 AND lease_token = $2

-- name: reset_steps_for_retry
-- A retried job's steps that ran, failed or were skipped start over.
UPDATE execution_steps
SET status = 'pending', started_at = NULL, ended_at = NULL, duration_ms = NULL, worker_id = NULL
WHERE execution_id = $1 AND status IN ('running', 'failed', 'skipped')
RETURNING step_id

-- name: lock_running_execution_of_worker
-- The execution row locked, if it is still running on this worker.
SELECT tenant_id FROM executions
WHERE id = $1 AND status = 'running' AND worker_id IS NOT DISTINCT FROM $2
FOR UPDATE

-- name: overdue_executions
-- Running executions whose deadline passed over $1 seconds ago (their worker died), oldest
-- deadline first, $2 at most.
SELECT * FROM executions
WHERE status = 'running' AND deadline_at < clock_timestamp() - make_interval(secs => $1)
ORDER BY deadline_at
LIMIT $2

-- name: unstarted_immediate_executions
-- Immediate executions no worker ever took: the api that created them died (or gave up on a
-- paused worker) before the hand-over. No worker id means no worker moved it to running.
SELECT id, status FROM executions
WHERE execution_mode = 'immediate' AND status IN ('pending', 'queued') AND worker_id IS NULL
  AND created_at < clock_timestamp() - make_interval(secs => $1)
ORDER BY created_at
LIMIT $2
