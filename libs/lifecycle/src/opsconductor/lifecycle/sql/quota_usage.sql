-- Quota accounting (storage/quota_usage.py).

-- name: lock_tenant_quota
-- The tenant's quota lock ($1: the quota class, $2: the tenant), held until the transaction ends.
SELECT pg_advisory_xact_lock($1::int4, hashtext($2))

-- name: count_waiting_jobs
-- Leased rows are running, not waiting: the running limit counts those (Redis, at dequeue).
SELECT count(*) FROM execution_queue WHERE tenant_id = $1 AND state <> 'leased'

-- name: live_execution_exists
-- Whether the tenant has a live (unretired) execution of the idempotency key.
SELECT EXISTS (
    SELECT 1 FROM executions
    WHERE tenant_id = $1 AND idempotency_key = $2 AND idempotency_retired_at IS NULL
)
