-- Immediate admission inside the one statement that creates the execution (storage/
-- executions.py, create_immediate_execution), so an immediate submit is one round trip: this
-- function takes the tenant's quota lock (the transaction-scoped advisory lock of
-- storage/quota_usage.py, first key p_lock_class), then counts the tenant's immediate
-- executions in flight. A VOLATILE plpgsql function runs each query on a fresh snapshot, taken
-- here after the lock was granted, so the count sees every earlier admission of the tenant
-- committed (its creating statement holds the lock until its transaction ends); the creating
-- statement inserts only if the count is below the limit.
CREATE FUNCTION immediate_admission(p_lock_class INTEGER, p_tenant_id TEXT, p_limit INTEGER)
RETURNS TABLE (in_flight BIGINT, soonest_end TIMESTAMPTZ)
-- One row, cheap: with the default estimate (1000 rows) the creating statement's plan looks
-- costly enough for JIT compilation, which took over a second per statement.
LANGUAGE plpgsql VOLATILE ROWS 1 COST 10 AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock_class, hashtext(p_tenant_id));
    IF p_limit = 0 THEN
        RETURN QUERY SELECT 0::BIGINT, NULL::TIMESTAMPTZ;
        RETURN;
    END IF;
    RETURN QUERY
    SELECT count(*),
           min(COALESCE(e.started_at, e.created_at)
               + make_interval(secs => COALESCE(e.estimated_duration_ms, e.timeout_ms) / 1000.0))
    FROM executions e
    WHERE e.tenant_id = p_tenant_id AND e.execution_mode = 'immediate'
      AND e.status IN ('pending', 'running');
END
$$;
