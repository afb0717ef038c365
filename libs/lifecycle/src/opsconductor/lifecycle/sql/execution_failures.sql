-- Ending an execution as failed (storage/execution_failures.py).

-- name: fail_running_steps_timed_out
-- The steps still running when the execution passed its deadline end failed.
UPDATE execution_steps
SET status = 'failed', ended_at = clock_timestamp(), error_class = 'EXECUTION_TIMEOUT',
    error_message = 'the execution passed its deadline; its worker stopped responding'
WHERE execution_id = $1 AND status = 'running'

-- name: skip_pending_steps
-- The steps that never ran are skipped.
UPDATE execution_steps SET status = 'skipped'
WHERE execution_id = $1 AND status IN ('pending', 'awaiting_approval')
