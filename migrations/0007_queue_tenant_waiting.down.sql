DROP INDEX IF EXISTS ix_queue_tenant_waiting;
