-- Step rows: start, finish, skip (storage/execution_steps.py). Writers of a step hold its
-- execution's row lock.

-- name: load_steps
-- All steps of an execution in position order.
SELECT * FROM execution_steps WHERE execution_id = $1 ORDER BY position

-- name: lock_step
-- A step's row locked, with its status (the locking path, under the execution row's lock).
SELECT status FROM execution_steps WHERE execution_id = $1 AND step_id = $2 FOR UPDATE

-- name: start_step
-- (Re)start a step: one more attempt, on worker $3, its outcome of a previous attempt cleared.
UPDATE execution_steps
SET status = 'running', attempt = attempt + 1, worker_id = $3,
    started_at = clock_timestamp(), ended_at = NULL, duration_ms = NULL,
    result = NULL, error_class = NULL, error_message = NULL
WHERE execution_id = $1 AND step_id = $2
RETURNING *

-- name: finish_step
-- A step's outcome. One clock reading for both ended_at and duration_ms.
WITH t AS (SELECT clock_timestamp() AS now)
UPDATE execution_steps s
SET status = $3, result = $4, error_class = $5, error_message = $6,
    ended_at = GREATEST(t.now, s.started_at),
    duration_ms = (extract(epoch FROM GREATEST(t.now, s.started_at) - s.started_at) * 1000)::bigint
FROM t
WHERE s.execution_id = $1 AND s.step_id = $2
RETURNING s.*

-- name: start_step_fast
-- The usual case of a step start in one statement, its step_started event included: the UPDATE of
-- the execution row takes the row lock (first, as the locking path does) if it is running, the
-- lease token ($4, when given) still owns it and the step's status is one of $5, and hands out the
-- event's seq; the step is written and its event appended in the same statement. No row back: the
-- locking path finds out why. Step writers all hold the execution row lock, so the step's status
-- the UPDATE saw is the one the step UPDATE sees.
WITH e AS (
    UPDATE executions SET event_seq = event_seq + 1
    WHERE id = $1 AND 
    status = 'running' AND ($4::uuid IS NULL OR lease_token IS NOT DISTINCT FROM $4::uuid)
    AND EXISTS (
        SELECT 1 FROM execution_steps
        WHERE execution_id = $1 AND step_id = $2 AND status = ANY($5::varchar[])
    )
    RETURNING id, tenant_id, event_seq, true AS go
), 
s AS (
    UPDATE execution_steps s
    SET status = 'running', attempt = s.attempt + 1, worker_id = $3,
        started_at = clock_timestamp(), ended_at = NULL, duration_ms = NULL,
        result = NULL, error_class = NULL, error_message = NULL
    FROM e
    WHERE e.go AND s.execution_id = e.id AND s.step_id = $2 AND s.status = ANY($5::varchar[])
    RETURNING s.*, e.tenant_id, e.event_seq
), ev AS (
    INSERT INTO execution_events (execution_id, tenant_id, actor_id, seq, type, payload)
    SELECT s.execution_id, s.tenant_id, $3, s.event_seq, 'step_started', jsonb_build_object(
        'step_id', s.step_id, 'position', s.position, 'action', s.action,
        'attempt', s.attempt, 'worker_id', $3::text
    )
    FROM s
    RETURNING execution_id, seq
)
SELECT s.*,
    (SELECT count(pg_notify('execution_events', ev.execution_id::text || ':' || ev.seq))
     FROM ev) AS notified FROM s

-- name: check_cancel_and_start_step
-- The cancellation check between steps and the start of the next step in one statement: the
-- check is counted whatever happens, and the step starts (as in start_step_fast) only if no
-- cancellation was requested. The conditions are the row's own (re-checked on its newest
-- version by the UPDATE). No row back: the execution does not exist.
WITH e AS (
    UPDATE executions SET cancel_checks_performed = cancel_checks_performed + 1,
        event_seq = event_seq + CASE WHEN cancelled_at IS NULL AND 
    status = 'running' AND ($4::uuid IS NULL OR lease_token IS NOT DISTINCT FROM $4::uuid)
    AND EXISTS (
        SELECT 1 FROM execution_steps
        WHERE execution_id = $1 AND step_id = $2 AND status = ANY($5::varchar[])
    )
                                     THEN 1 ELSE 0 END
    WHERE id = $1
    RETURNING id, tenant_id, event_seq, cancelled_at IS NOT NULL AS cancelled,
        cancelled_at IS NULL AND 
    status = 'running' AND ($4::uuid IS NULL OR lease_token IS NOT DISTINCT FROM $4::uuid)
    AND EXISTS (
        SELECT 1 FROM execution_steps
        WHERE execution_id = $1 AND step_id = $2 AND status = ANY($5::varchar[])
    ) AS go
), 
s AS (
    UPDATE execution_steps s
    SET status = 'running', attempt = s.attempt + 1, worker_id = $3,
        started_at = clock_timestamp(), ended_at = NULL, duration_ms = NULL,
        result = NULL, error_class = NULL, error_message = NULL
    FROM e
    WHERE e.go AND s.execution_id = e.id AND s.step_id = $2 AND s.status = ANY($5::varchar[])
    RETURNING s.*, e.tenant_id, e.event_seq
), ev AS (
    INSERT INTO execution_events (execution_id, tenant_id, actor_id, seq, type, payload)
    SELECT s.execution_id, s.tenant_id, $3, s.event_seq, 'step_started', jsonb_build_object(
        'step_id', s.step_id, 'position', s.position, 'action', s.action,
        'attempt', s.attempt, 'worker_id', $3::text
    )
    FROM s
    RETURNING execution_id, seq
)
SELECT e.cancelled, s.*,
    (SELECT count(pg_notify('execution_events', ev.execution_id::text || ':' || ev.seq))
     FROM ev) AS notified FROM e LEFT JOIN s ON true

-- name: finish_step_fast
-- The usual case of a step finish in one statement, as start_step_fast: the execution row locked
-- if running and still owned by the lease token ($7), the running step's outcome written (one
-- clock reading for ended_at and duration_ms) and its step_<status> event appended. No row back:
-- the locking path finds out why.
WITH e AS (
    UPDATE executions SET event_seq = event_seq + 1
    WHERE id = $1 AND status = 'running'
      AND ($7::uuid IS NULL OR lease_token IS NOT DISTINCT FROM $7::uuid)
      AND EXISTS (
          SELECT 1 FROM execution_steps
          WHERE execution_id = $1 AND step_id = $2 AND status = 'running'
      )
    RETURNING id, tenant_id, event_seq
), t AS (SELECT clock_timestamp() AS now),
s AS (
    UPDATE execution_steps s
    SET status = $3, result = $4, error_class = $5, error_message = $6,
        ended_at = GREATEST(t.now, s.started_at),
        duration_ms = (
            extract(epoch FROM GREATEST(t.now, s.started_at) - s.started_at) * 1000
        )::bigint
    FROM e, t
    WHERE s.execution_id = e.id AND s.step_id = $2 AND s.status = 'running'
    RETURNING s.*, e.tenant_id, e.event_seq
), ev AS (
    INSERT INTO execution_events (execution_id, tenant_id, actor_id, seq, type, payload)
    SELECT s.execution_id, s.tenant_id, s.worker_id, s.event_seq, 'step_' || $3,
        jsonb_build_object(
            'step_id', s.step_id, 'position', s.position, 'action', s.action,
            'attempt', s.attempt, 'duration_ms', s.duration_ms
        ) || CASE WHEN $5::text IS NULL THEN '{}'::jsonb
                  ELSE jsonb_build_object('error_class', $5::text) END
    FROM s
    RETURNING execution_id, seq
)
SELECT s.*,
    (SELECT count(pg_notify('execution_events', ev.execution_id::text || ':' || ev.seq))
     FROM ev) AS notified FROM s

-- name: skip_remaining_steps
-- Skip the steps from position $2 on that are still in one of the statuses $3.
UPDATE execution_steps
SET status = 'skipped', ended_at = GREATEST(clock_timestamp(), started_at)
WHERE execution_id = $1 AND position >= $2 AND status = ANY($3::varchar[])
RETURNING *

-- name: lock_check_cancel_and_start_step
-- A run's first step: its one lock ($6..$9 its key, tenant, target and action; $10 the owner token,
-- $11 the lease; on behalf of execution $1, exactly as acquire_locks takes it), then, only if it
-- was granted, check_cancel_and_start_step's cancellation check and step start, in one statement
-- (one round trip less than taking the lock on its own). The execution row is locked first, then
-- the lock's row (the order of the final transition, which frees the locks), and no lock is taken
-- for an execution that does not exist. found false: no such execution; lock_fencing_token NULL:
-- the key is held by another owner (nothing taken, counted or started); else as
-- check_cancel_and_start_step.
WITH x AS MATERIALIZED (
    SELECT id FROM executions WHERE id = $1 FOR UPDATE
), l AS (
    INSERT INTO execution_locks AS held
        (lock_key, tenant_id, target_ref, action, owner_token, owner_execution_id, expires_at)
    SELECT $6, $7, $8, $9, $10, x.id, now() + $11::interval FROM x
    ON CONFLICT (lock_key) DO UPDATE
    SET owner_token = EXCLUDED.owner_token,
        owner_execution_id = EXCLUDED.owner_execution_id,
        fencing_token = nextval('execution_lock_fencing_seq'),
        acquired_at = now(),
        expires_at = EXCLUDED.expires_at
    WHERE held.expires_at < now()
        -- The same execution re-taking its lock (as acquire_locks): a new fencing token.
        OR (EXCLUDED.owner_execution_id IS NOT NULL
            AND held.owner_execution_id = EXCLUDED.owner_execution_id)
    RETURNING lock_key, fencing_token, expires_at
), e AS (
    UPDATE executions SET cancel_checks_performed = cancel_checks_performed + 1,
        event_seq = event_seq + CASE WHEN cancelled_at IS NULL AND
    status = 'running' AND ($4::uuid IS NULL OR lease_token IS NOT DISTINCT FROM $4::uuid)
    AND EXISTS (
        SELECT 1 FROM execution_steps
        WHERE execution_id = $1 AND step_id = $2 AND status = ANY($5::varchar[])
    )
                                     THEN 1 ELSE 0 END
    WHERE id = $1 AND EXISTS (SELECT 1 FROM l)
    RETURNING id, tenant_id, event_seq, cancelled_at IS NOT NULL AS cancelled,
        cancelled_at IS NULL AND
    status = 'running' AND ($4::uuid IS NULL OR lease_token IS NOT DISTINCT FROM $4::uuid)
    AND EXISTS (
        SELECT 1 FROM execution_steps
        WHERE execution_id = $1 AND step_id = $2 AND status = ANY($5::varchar[])
    ) AS go
),
s AS (
    UPDATE execution_steps s
    SET status = 'running', attempt = s.attempt + 1, worker_id = $3,
        started_at = clock_timestamp(), ended_at = NULL, duration_ms = NULL,
        result = NULL, error_class = NULL, error_message = NULL
    FROM e
    WHERE e.go AND s.execution_id = e.id AND s.step_id = $2 AND s.status = ANY($5::varchar[])
    RETURNING s.*, e.tenant_id, e.event_seq
), ev AS (
    INSERT INTO execution_events (execution_id, tenant_id, actor_id, seq, type, payload)
    SELECT s.execution_id, s.tenant_id, $3, s.event_seq, 'step_started', jsonb_build_object(
        'step_id', s.step_id, 'position', s.position, 'action', s.action,
        'attempt', s.attempt, 'worker_id', $3::text
    )
    FROM s
    RETURNING execution_id, seq
)
SELECT EXISTS (SELECT 1 FROM x) AS found,
    l.fencing_token AS lock_fencing_token, l.expires_at AS lock_expires_at, e.cancelled, s.*,
    (SELECT count(pg_notify('execution_events', ev.execution_id::text || ':' || ev.seq))
     FROM ev) AS notified
FROM (SELECT 1) AS one LEFT JOIN l ON true LEFT JOIN e ON true LEFT JOIN s ON true
