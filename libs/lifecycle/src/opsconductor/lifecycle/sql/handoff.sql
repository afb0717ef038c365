-- The lease handoff from Redis to Postgres (queue/handoff.py).

-- name: hand_off
-- The lease handoff of a batch of dequeued jobs in one statement: each job's queue row leased ($5:
-- the worker), and each execution still in one of the claimable statuses $6 claimed (running, the
-- lease token, its event and its steps back). The lease the first renewal (made at once by the
-- worker, see handoff.FirstRenewal) sets: as lease.lease_seconds computes it from the execution's
-- timeout policy ($10 overrides it, $11 without a policy), or the dequeue's own deadline when no
-- such renewal follows ($9 false).
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[], $4::int[], $8::uuid[],
                         $9::bool[])
        AS i(job_id, lease_token, lease_expires_at, attempts, execution_id, renews)
), terms AS (
    SELECT i.*, CASE WHEN i.renews THEN COALESCE(
               $10::float8, (p.step_timeout_ms + p.lease_buffer_ms) / 1000.0, $11::float8)
           END AS lease_s
    FROM input i
    LEFT JOIN executions x ON x.id = i.execution_id
    LEFT JOIN timeout_policies p ON p.id = x.timeout_policy_id
), leased AS (
    UPDATE execution_queue q
    SET state = 'leased', lease_owner = $5, lease_token = t.lease_token,
        lease_expires_at = CASE WHEN t.lease_s IS NULL THEN t.lease_expires_at
                                ELSE clock_timestamp() + make_interval(secs => t.lease_s) END,
        lease_renewals = CASE WHEN t.lease_s IS NULL THEN 0 ELSE 1 END, attempts = t.attempts,
        updated_at = clock_timestamp()
    FROM terms t
    WHERE q.id = t.job_id
    RETURNING q.id, q.execution_id, t.lease_token, t.lease_s
), claimed AS (
    UPDATE executions e
    SET status = 'running', last_transition_from = e.status, last_transition_by = $5,
        last_transition_at = clock_timestamp(), updated_at = clock_timestamp(),
        started_at = COALESCE(e.started_at, GREATEST(clock_timestamp(), e.created_at)),
        worker_id = $5, lease_token = l.lease_token, attempts = e.attempts + 1,
        lease_renewals = e.lease_renewals + CASE WHEN l.lease_s IS NULL THEN 0 ELSE 1 END,
        deadline_at = clock_timestamp() + make_interval(secs => COALESCE(
            (SELECT p.execution_timeout_ms FROM timeout_policies p
             WHERE p.id = e.timeout_policy_id), 600000) / 1000.0),
        event_seq = e.event_seq + 1
    FROM leased l
    WHERE e.id = l.execution_id AND e.status = ANY($6::execution_status[])
    RETURNING e.*
), event AS (
    INSERT INTO execution_events (execution_id, tenant_id, actor_id, seq, type, payload)
    SELECT c.id, c.tenant_id, $5, c.event_seq, 'execution_running',
           jsonb_build_object('status', 'running', 'from', c.last_transition_from)
    FROM claimed c
    RETURNING execution_id, seq
)
SELECT i.job_id, l.id IS NOT NULL AS leased, l.lease_s,
       -- No row, and the execution has ended: the job was settled (its final transition
       -- deleted the row) but its holder died before its Redis ack. A terminal execution
       -- never moves again, so nothing of it can be left to run.
       l.id IS NULL AND EXISTS (
           SELECT 1 FROM executions x
           WHERE x.id = i.execution_id AND x.status = ANY($12::execution_status[])
       ) AS settled,
       c.*,
       CASE WHEN ev.seq IS NOT NULL
            THEN pg_notify($7, ev.execution_id::text || ':' || ev.seq) END AS notified,
       (SELECT jsonb_agg(s ORDER BY s.position) FROM execution_steps s
        WHERE s.execution_id = c.id) AS step_rows
FROM input i
LEFT JOIN leased l ON l.id = i.job_id
LEFT JOIN claimed c ON c.id = l.execution_id
LEFT JOIN event ev ON ev.execution_id = c.id

-- name: record_renewal
-- A lease renewal on both sides in one statement: the queue row's lease extended and the
-- execution's renewals counted, each fenced on the lease token.
WITH q AS (
    UPDATE execution_queue
    SET lease_expires_at = $3, lease_renewals = $4, updated_at = clock_timestamp()
    WHERE id = $1 AND lease_token = $2 AND state = 'leased'
    RETURNING id
), e AS (
    UPDATE executions SET lease_renewals = lease_renewals + 1
    WHERE id = $5 AND lease_token = $2
    RETURNING id
)
SELECT (SELECT count(*) FROM q) AS queue_rows, (SELECT count(*) FROM e) AS execution_rows
