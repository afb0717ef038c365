DELETE FROM feature_flags WHERE name IN (
    'stage_e_enabled', 'all_tenants_enabled', 'enabled_tenants',
    'record_only_tenants', 'max_approval_level', 'dispatch_paused'
);
-- A policy that executions refer to stays: removing it would mean deleting their history, and
-- a rollback never does that (tests/migrations/test_rollback.py). Up re-seeds the others and
-- leaves the kept ones as they are (ON CONFLICT DO NOTHING).
DELETE FROM timeout_policies AS p
WHERE p.id IN (
    'fast_read', 'fast_modify', 'medium_read', 'medium_modify', 'medium_deploy', 'long_deploy'
)
AND NOT EXISTS (SELECT 1 FROM executions AS e WHERE e.timeout_policy_id = p.id);
