-- The executions repository's statements (storage/executions.py).

-- name: retire_idempotency_keys
-- One batch of the reaper's key retirement: terminal executions that ended over the dedup
-- window ($1) ago, oldest first, $3 at most, skipping rows another transaction holds.
WITH due AS (
    SELECT id FROM executions
    WHERE idempotency_retired_at IS NULL AND ended_at IS NOT NULL
      AND ended_at < now() - $1::interval AND status = ANY($2::execution_status[])
    ORDER BY ended_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE executions e SET idempotency_retired_at = now() FROM due WHERE e.id = due.id

-- name: create_execution
-- Create, in one statement (atomic by itself): retire the key's terminal execution that ended
-- over the dedup window ($20) ago, insert the execution unless its key is live (ON CONFLICT on
-- ux_exec_tenant_idem) or, admitting, the tenant's immediate executions in flight reached $22
-- (0: no limit), its steps and its first event; else return the live execution of the key with
-- its steps. The INSERT reads `retired` first, so the key is retired before its conflict is
-- checked (a row version this statement retired no longer conflicts). No execution back (and a
-- count at the limit): refused; neither: a racing creator committed in between, go again.
-- A template: executions.py puts create_usage_unlimited or create_usage_admitted in place of
-- %USAGE% (the two creates differ only in how the tenant's usage is counted).
WITH usage AS (
    %USAGE%
), retired AS (
    UPDATE executions SET idempotency_retired_at = now()
    WHERE tenant_id = $2 AND idempotency_key = $5 AND idempotency_retired_at IS NULL
      AND status = ANY($21::execution_status[]) AND ended_at < now() - $20::interval
      -- A refused submit writes nothing, not even this.
      AND EXISTS (SELECT 1 FROM usage WHERE $22 = 0 OR usage.in_flight < $22)
    RETURNING id
), ins AS (
    INSERT INTO executions (
        id, tenant_id, actor_id, request_id, idempotency_key, plan_hash, plan_snapshot,
        plan_snapshot_hash, status, execution_mode, sla_class, action_class, approval_level,
        priority, timeout_policy_id, timeout_ms, estimated_duration_ms, record_only, started_at,
        trace_context, event_seq
    )
    SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9::execution_status, $10::execution_mode,
           $11::sla_class, $12, $13, $14, $15, $16, $17, $18,
           CASE WHEN $9::execution_status = 'running' THEN now() END, $19, 1
    FROM usage
    WHERE ($22 = 0 OR usage.in_flight < $22) AND (SELECT count(*) FROM retired) >= 0
    ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_retired_at IS NULL DO NOTHING
    RETURNING *
), steps AS (
    INSERT INTO execution_steps
        (execution_id, step_id, position, action, action_class, idempotency_key)
    SELECT ins.id, s.step_id, s.position, s.action, s.action_class, s.idempotency_key
    FROM ins, unnest($23::text[], $24::int[], $25::text[], $26::text[], $27::text[])
        AS s(step_id, position, action, action_class, idempotency_key)
    RETURNING *
), ev AS (
    INSERT INTO execution_events (execution_id, tenant_id, actor_id, seq, type, payload)
    SELECT ins.id, ins.tenant_id, ins.actor_id, 1, 'execution_started', jsonb_build_object(
        'mode', ins.execution_mode, 'status', ins.status, 'plan_hash', ins.plan_hash,
        'approval_level', ins.approval_level, 'sla_class', ins.sla_class,
        'timeout_policy_id', ins.timeout_policy_id
    )
    FROM ins
    RETURNING execution_id, seq
), live AS (
    SELECT e.* FROM executions e
    WHERE e.tenant_id = $2 AND e.idempotency_key = $5 AND e.idempotency_retired_at IS NULL
      AND NOT (e.status = ANY($21::execution_status[]) AND e.ended_at < now() - $20::interval)
      AND NOT EXISTS (SELECT 1 FROM ins)
), found AS (
    SELECT ins.*, true AS created FROM ins
    UNION ALL
    SELECT live.*, false FROM live
)
SELECT found.*,
    CASE WHEN found.created
        THEN (SELECT jsonb_agg(to_jsonb(st) ORDER BY st.position) FROM steps st)
        ELSE (SELECT jsonb_agg(to_jsonb(st) ORDER BY st.position)
              FROM execution_steps st WHERE st.execution_id = found.id)
    END AS steps_of_execution,
    usage.in_flight, usage.soonest_end,
    (SELECT count(pg_notify('execution_events', ev.execution_id::text || ':' || ev.seq))
     FROM ev) AS notified
FROM usage LEFT JOIN found ON true

-- name: create_usage_unlimited
-- create_execution's usage without admission: nothing counted, no lock.
SELECT 0::bigint AS in_flight, NULL::timestamptz AS soonest_end

-- name: create_usage_admitted
-- create_execution's usage when admitting: migration 0012's function takes the tenant's quota
-- lock ($28: its first key), then counts on a snapshot of its own taken once the lock is granted;
-- the lock is held until the statement's transaction ends.
SELECT in_flight, soonest_end FROM immediate_admission($28, $2, $22)

-- name: create_queued_execution
-- A background submit, in one statement: the tenant's quota lock and its waiting jobs counted
-- (migration 0014's function: $28 the lock's first key, $22 the max_queued limit, 0: none), the
-- key's retirement and the creation as create_execution's, but the execution is written queued
-- as transition() would move it from pending (last_transition_* by $29, event_seq 2), with its
-- steps, both events in seq order in one INSERT (execution_started as created pending, then
-- execution_queued with transition()'s payload; the audit chain hashes each onto the one before)
-- and its queue row (ready now, $30 attempts). A duplicate brings its queue job, if any.
WITH usage AS (
    SELECT waiting FROM queued_admission($28, $2, $22)
), retired AS (
    UPDATE executions SET idempotency_retired_at = now()
    WHERE tenant_id = $2 AND idempotency_key = $5 AND idempotency_retired_at IS NULL
      AND status = ANY($21::execution_status[]) AND ended_at < now() - $20::interval
      AND EXISTS (SELECT 1 FROM usage WHERE $22 = 0 OR usage.waiting < $22)
    RETURNING id
), ins AS (
    INSERT INTO executions (
        id, tenant_id, actor_id, request_id, idempotency_key, plan_hash, plan_snapshot,
        plan_snapshot_hash, status, execution_mode, sla_class, action_class, approval_level,
        priority, timeout_policy_id, timeout_ms, estimated_duration_ms, record_only,
        trace_context, event_seq, last_transition_from, last_transition_by, last_transition_at
    )
    SELECT $1, $2, $3, $4, $5, $6, $7, $8, 'queued', $10::execution_mode,
           $11::sla_class, $12, $13, $14, $15, $16, $17, $18, $19, 2,
           $9::execution_status, $29, clock_timestamp()
    FROM usage
    WHERE ($22 = 0 OR usage.waiting < $22) AND (SELECT count(*) FROM retired) >= 0
    ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_retired_at IS NULL DO NOTHING
    RETURNING *
), steps AS (
    INSERT INTO execution_steps
        (execution_id, step_id, position, action, action_class, idempotency_key)
    SELECT ins.id, s.step_id, s.position, s.action, s.action_class, s.idempotency_key
    FROM ins, unnest($23::text[], $24::int[], $25::text[], $26::text[], $27::text[])
        AS s(step_id, position, action, action_class, idempotency_key)
    RETURNING *
), ev AS (
    INSERT INTO execution_events (execution_id, tenant_id, actor_id, seq, type, payload)
    SELECT ins.id, ins.tenant_id, CASE WHEN t.n = 1 THEN ins.actor_id ELSE $29 END, t.n,
        CASE WHEN t.n = 1 THEN 'execution_started' ELSE 'execution_queued' END,
        CASE WHEN t.n = 1 THEN jsonb_build_object(
            'mode', ins.execution_mode, 'status', ins.last_transition_from,
            'plan_hash', ins.plan_hash, 'approval_level', ins.approval_level,
            'sla_class', ins.sla_class, 'timeout_policy_id', ins.timeout_policy_id
        ) ELSE jsonb_build_object('status', ins.status, 'from', ins.last_transition_from) END
    FROM ins, generate_series(1, 2) AS t(n)
    ORDER BY t.n
    RETURNING execution_id, seq
), job AS (
    INSERT INTO execution_queue (execution_id, tenant_id, priority, max_attempts, state,
                                 available_at)
    SELECT ins.id, ins.tenant_id, ins.priority, $30, 'ready', clock_timestamp() FROM ins
    RETURNING id
), live AS (
    SELECT e.* FROM executions e
    WHERE e.tenant_id = $2 AND e.idempotency_key = $5 AND e.idempotency_retired_at IS NULL
      AND NOT (e.status = ANY($21::execution_status[]) AND e.ended_at < now() - $20::interval)
      AND NOT EXISTS (SELECT 1 FROM ins)
), found AS (
    SELECT ins.*, true AS created FROM ins
    UNION ALL
    SELECT live.*, false FROM live
)
SELECT found.*,
    CASE WHEN found.created
        THEN (SELECT jsonb_agg(to_jsonb(st) ORDER BY st.position) FROM steps st)
        ELSE (SELECT jsonb_agg(to_jsonb(st) ORDER BY st.position)
              FROM execution_steps st WHERE st.execution_id = found.id)
    END AS steps_of_execution,
    CASE WHEN found.created THEN (SELECT job.id FROM job)
        ELSE (SELECT q.id FROM execution_queue q WHERE q.execution_id = found.id)
    END AS job_id,
    usage.waiting,
    (SELECT count(pg_notify('execution_events', ev.execution_id::text || ':' || ev.seq))
     FROM ev) AS notified
FROM usage LEFT JOIN found ON true

-- name: request_cancel
-- Record a cancellation request once: only while unset and the execution is not terminal ($5).
UPDATE executions
SET cancelled_by = $3, cancelled_at = GREATEST(clock_timestamp(), created_at),
    cancel_reason = $4, cancel_initiator = $6, updated_at = clock_timestamp()
WHERE id = $1 AND tenant_id = $2 AND cancelled_at IS NULL
  AND status <> ALL($5::execution_status[])
RETURNING *

-- name: increment_cancel_checks
-- Count $2 more cancellation checks on an execution; the new total back.
UPDATE executions SET cancel_checks_performed = cancel_checks_performed + $2
WHERE id = $1 RETURNING cancel_checks_performed

-- name: retire_idempotency_key
-- Retire one terminal execution's key now (nothing ran, so the plan may be submitted again).
UPDATE executions SET idempotency_retired_at = clock_timestamp(), updated_at = clock_timestamp()
WHERE id = $1 AND idempotency_retired_at IS NULL AND status = ANY($2::execution_status[])

-- name: check_cancel_requested
-- Count one cancellation check and say whether a cancellation was requested.
UPDATE executions SET cancel_checks_performed = cancel_checks_performed + 1
WHERE id = $1
RETURNING cancelled_at IS NOT NULL
