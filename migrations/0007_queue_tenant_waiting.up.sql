-- Quota admission counts a tenant's waiting background jobs under the tenant's quota lock, at
-- every background submit (opsconductor.common.storage.quota_usage): without an index that is a
-- scan of the whole queue (11-18 ms at 50 000 rows of 100 tenants; 0.6-1.6 ms with this index),
-- and the scan serializes the tenant's submits.
CREATE INDEX ix_queue_tenant_waiting ON execution_queue (tenant_id) WHERE state <> 'leased';
