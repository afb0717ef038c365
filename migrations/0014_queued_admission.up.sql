-- Background admission inside the one statement that creates, queues and enqueues an execution
-- (storage/executions.py, create_queued_execution), so a background submit's Postgres work is
-- one statement: as immediate_admission (0012) does for immediate executions, this function
-- takes the tenant's quota lock (the transaction-scoped two-key advisory lock of
-- storage/quota_usage.py, first key p_lock_class), then counts the tenant's queue jobs waiting
-- (ready or delayed: leased ones are running). A VOLATILE plpgsql function runs its query on a
-- fresh snapshot, taken after the lock was granted, so the count sees every earlier admission
-- of the tenant committed (each holds the lock until its transaction ends).
CREATE FUNCTION queued_admission(p_lock_class INTEGER, p_tenant_id TEXT, p_limit INTEGER)
RETURNS TABLE (waiting BIGINT)
-- One row, cheap: keeps the creating statement's plan clear of JIT (as 0012).
LANGUAGE plpgsql VOLATILE ROWS 1 COST 10 AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock_class, hashtext(p_tenant_id));
    IF p_limit = 0 THEN
        RETURN QUERY SELECT 0::BIGINT;
        RETURN;
    END IF;
    RETURN QUERY
    SELECT count(*) FROM execution_queue q
    WHERE q.tenant_id = p_tenant_id AND q.state <> 'leased';
END
$$;
